//! Replay end to end on RabbitMQ with the real dedup stores: a consumer
//! that keys by a header, in a scope of its own, dead-letters everything;
//! the handler is fixed; a replay that is told nothing about scopes or
//! keys revives exactly the dead keys, and every message is handled once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::testing::{service_unavailable, unique_scope};
use idemq::{
    DedupStore, Engine, HandlerError, KeyStrategy, Message, OutgoingMessage, RecordState, Replay,
};
use idemq_postgres::PostgresDedupStore;
use idemq_rabbitmq::{
    QueueType, RabbitBroker, RabbitConfig, RabbitDeadLetters, RabbitPublisher, delete_topology,
    queue_depths,
};
use idemq_redis::RedisDedupStore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const N: usize = 40;

fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| idemq_rabbitmq::DEFAULT_URL.into())
}

/// Handler runs per key, and whether the handler is broken.
#[derive(Clone, Default)]
struct World {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    broken: Arc<Mutex<bool>>,
}

impl World {
    fn handler(&self) -> impl idemq::Handler + use<> {
        let w = self.clone();
        move |m: Message| {
            let w = w.clone();
            async move {
                *w.runs
                    .lock()
                    .unwrap()
                    .entry(m.key().to_owned())
                    .or_default() += 1;
                if *w.broken.lock().unwrap() {
                    return Err(HandlerError::permanent("the handler has a bug"));
                }
                Ok(())
            }
        }
    }
}

/// Runs an engine keyed by the `x-order` header in `scope` until the work
/// queue is empty and `until` holds.
async fn consume<S: DedupStore + Clone>(
    config: &RabbitConfig,
    store: &S,
    scope: &str,
    world: &World,
    until: impl Fn(u32) -> bool,
) -> idemq::Report {
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    let engine = Engine::builder(broker.clone(), store.clone(), world.handler())
        .scope(scope)
        .key_strategy(KeyStrategy::message_id().with_header("x-order"))
        .concurrency(8)
        .build()
        .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = queue_depths(config).await.expect("depths");
        let waiting = d.work + d.retry.iter().map(|(_, n)| n).sum::<u32>();
        if waiting == 0 && until(d.dead) {
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {d:?}");
    }
    shutdown.cancel();
    let report = running.await.expect("engine");
    broker.close().await;
    report
}

async fn header_keyed_round_trip<S: DedupStore + Clone>(store: S, queue_type: QueueType) {
    let config = RabbitConfig::new(amqp_url(), format!("idemq-e2e.{}", unique_scope("replay")))
        .with_queue_type(queue_type)
        .with_retry_tiers([Duration::from_millis(200)]);
    let publisher = match RabbitPublisher::connect(config.clone()).await {
        Ok(p) => p,
        Err(e) => return service_unavailable("rabbitmq", e).unwrap_or(()),
    };
    publisher.declare_topology().await.expect("declare");
    for i in 0..N {
        // No message id: the consumer keys by a header it was told about.
        let msg = OutgoingMessage::new("{}").with_header("x-order", format!("order #{i}"));
        publisher.publish(msg).await.expect("publish");
    }
    publisher.close().await;
    let scope = unique_scope("billing");
    let world = World::default();
    *world.broken.lock().unwrap() = true;
    let report = consume(&config, &store, &scope, &world, |dead| dead as usize == N).await;
    assert_eq!(report.dead_lettered, N as u64, "{report:?}");
    *world.broken.lock().unwrap() = false;

    // The replay is told nothing: the dead letters name scope and key.
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dead letters");
    let replay = Replay::new(&dlq, &store)
        .run(&CancellationToken::new())
        .await;
    dlq.close().await;
    assert!(replay.is_complete(), "{replay}");
    assert_eq!(
        (replay.moved, replay.left_no_key),
        (N as u64, 0),
        "{replay}"
    );

    let report = consume(&config, &store, &scope, &world, |dead| dead == 0).await;
    assert_eq!(report.handled, N as u64, "{report:?}");
    let runs = world.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), N);
    for (key, n) in &runs {
        assert_eq!(
            *n, 2,
            "{key}: one run that failed, exactly one after the replay"
        );
        let r = store.get(&scope, key).await.expect("get").expect("record");
        assert_eq!((r.state, r.attempts), (RecordState::Done, 1), "{key}");
    }
    delete_topology(&config).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_keyed_dead_letters_replay_once_each_with_redis() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = match RedisDedupStore::connect(&url).await {
        Ok(s) => s,
        Err(e) => return service_unavailable("redis", e).unwrap_or(()),
    };
    header_keyed_round_trip(store, QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_keyed_dead_letters_replay_once_each_with_postgres_on_quorum_queues() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = match PostgresDedupStore::connect(&url).await {
        Ok(s) => s,
        Err(e) => return service_unavailable("postgres", e).unwrap_or(()),
    };
    store.migrate().await.expect("migrate");
    header_keyed_round_trip(store, QueueType::Quorum).await;
}
