//! The engine end to end on RabbitMQ with a real dedup store: Redis, and
//! Postgres in transactional mode. Duplicates are skipped, retries come
//! back after their delay tier, poison messages reach the dead-letter queue
//! with their reason, and every order takes effect exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::testing::{service_unavailable, unique_scope};
use idemq::{
    Backoff, Broker, DedupStore, Engine, Handler, HandlerError, Message, OutgoingMessage, Report,
    headers,
};
use idemq_postgres::sqlx::{self, PgConnection};
use idemq_postgres::{PostgresDedupStore, sql_error};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, RabbitPublisher, delete_topology, queue_depths};
use idemq_redis::RedisDedupStore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ORDERS: u32 = 300;
const TIER: Duration = Duration::from_millis(300);

fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| idemq_rabbitmq::DEFAULT_URL.into())
}

fn poison(id: u32) -> bool {
    id % 50 == 7
}

fn flaky(id: u32) -> bool {
    id % 20 == 3
}

/// When each attempt of each order ran.
type Attempts = Arc<Mutex<HashMap<u32, Vec<Instant>>>>;

fn order_id(msg: &Message) -> Result<u32, HandlerError> {
    msg.key()
        .strip_prefix("order-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| HandlerError::permanent("not an order"))
}

fn note_attempt(attempts: &Attempts, id: u32) {
    attempts
        .lock()
        .unwrap()
        .entry(id)
        .or_default()
        .push(Instant::now());
}

async fn rabbit(name: &str) -> Option<(RabbitBroker, RabbitConfig)> {
    let config = RabbitConfig::new(amqp_url(), format!("idemq-e2e.{}", unique_scope(name)))
        .with_retry_tiers([TIER, Duration::from_secs(2)])
        .with_prefetch(16);
    match RabbitBroker::connect(config.clone()).await {
        Ok(b) => Some((b, config)),
        Err(e) => service_unavailable("rabbitmq", e),
    }
}

/// Publishes the orders, a tenth of them twice; answers how many messages.
async fn publish_orders(config: &RabbitConfig) -> u32 {
    let publisher = RabbitPublisher::connect(config.clone())
        .await
        .expect("publisher");
    let mut n = 0;
    for id in 0..ORDERS {
        for _ in 0..(1 + u32::from(id % 10 == 0)) {
            let msg = OutgoingMessage::new(format!(r#"{{"id":{id}}}"#))
                .with_message_id(format!("order-{id}"));
            publisher.publish(msg).await.expect("publish");
            n += 1;
        }
    }
    publisher.close().await;
    n
}

/// Runs the engine until every order took effect or was dead-lettered.
async fn consume<S: DedupStore, H: Handler>(
    broker: &RabbitBroker,
    config: &RabbitConfig,
    store: S,
    handler: H,
    effects: impl AsyncFn() -> usize,
) -> Report {
    let engine = Engine::builder(broker.clone(), store, handler)
        .scope(unique_scope("e2e"))
        .concurrency(16)
        .retry_backoff(Backoff::new(TIER, TIER).without_jitter())
        .build()
        .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    let poisoned = (0..ORDERS).filter(|id| poison(*id)).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut settled_before = false;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let depths = queue_depths(config).await.expect("depths");
        let dead = depths.dead as usize;
        // A duplicate that met its original in progress waits in a retry
        // queue, and counts as a duplicate only once it comes back: stop
        // when nothing has waited for two polls in a row (a message handed
        // to the engine just before the first is handled by the second).
        let waiting = depths.work + depths.retry.iter().map(|(_, n)| *n).sum::<u32>();
        let done = effects().await;
        let settled = done + dead >= ORDERS as usize && dead >= poisoned && waiting == 0;
        if settled && settled_before {
            break;
        }
        settled_before = settled;
        assert!(
            Instant::now() < deadline,
            "not done: {done} effects, {dead} dead"
        );
    }
    shutdown.cancel();
    running.await.expect("engine task")
}

/// What every backend combination must show.
async fn check(
    broker: &RabbitBroker,
    config: &RabbitConfig,
    report: &Report,
    published: u32,
    attempts: &Attempts,
) {
    let poisoned = (0..ORDERS).filter(|id| poison(*id)).count() as u64;
    let flakies = (0..ORDERS).filter(|id| flaky(*id) && !poison(*id)).count() as u64;
    assert_eq!(report.handled, u64::from(ORDERS) - poisoned, "{report:?}");
    assert_eq!(report.dead_lettered, poisoned, "{report:?}");
    assert_eq!(report.retried, flakies, "{report:?}");
    // Every extra publish was skipped as a duplicate (some after a deferral).
    assert_eq!(
        report.duplicates + report.dead_duplicates,
        u64::from(published - ORDERS),
        "{report:?}"
    );
    // Retries waited for their tier.
    for (id, at) in attempts.lock().unwrap().iter() {
        if flaky(*id) && !poison(*id) {
            assert_eq!(at.len(), 2, "order {id} ran {} times", at.len());
            let gap = at[1] - at[0];
            assert!(
                gap >= TIER - Duration::from_millis(20),
                "order {id} retried after {gap:?}"
            );
        }
    }
    // Poison messages are in the dead-letter queue with their reason.
    let mut dead = Vec::new();
    while let Some(d) = broker.next_dead_letter().await.expect("dlq") {
        let reason = d
            .header(headers::REASON)
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        dead.push((d.message_id.clone().unwrap_or_default(), reason));
        broker.ack(&d).await.expect("ack dead letter");
    }
    dead.sort();
    let mut expected: Vec<_> = (0..ORDERS)
        .filter(|id| poison(*id))
        .map(|id| (format!("order-{id}"), Some("permanent".to_owned())))
        .collect();
    expected.sort();
    assert_eq!(dead, expected);
    let depths = queue_depths(config).await.expect("depths");
    assert_eq!(depths.work, 0, "nothing left in the work queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_and_redis() {
    let Some((broker, config)) = rabbit("redis").await else {
        return;
    };
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = match RedisDedupStore::connect(&url).await {
        Ok(s) => s,
        Err(e) => return service_unavailable("redis", e).unwrap_or(()),
    };
    let published = publish_orders(&config).await;
    let attempts: Attempts = Arc::default();
    let effects: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let handler = {
        let (attempts, effects) = (attempts.clone(), effects.clone());
        move |msg: Message| {
            let (attempts, effects) = (attempts.clone(), effects.clone());
            async move {
                let id = order_id(&msg)?;
                note_attempt(&attempts, id);
                if poison(id) {
                    return Err(HandlerError::permanent("card declined"));
                }
                if flaky(id) && msg.attempt() == 1 {
                    return Err(HandlerError::retry("gateway timeout"));
                }
                *effects.lock().unwrap().entry(id).or_default() += 1;
                Ok(())
            }
        }
    };
    let counted = effects.clone();
    let report = consume(&broker, &config, store, handler, async || {
        counted.lock().unwrap().len()
    })
    .await;
    assert!(
        effects.lock().unwrap().values().all(|n| *n == 1),
        "an order took effect twice"
    );
    check(&broker, &config, &report, published, &attempts).await;
    broker.close().await;
    delete_topology(&config).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_and_postgres_transactional() {
    let Some((broker, config)) = rabbit("pg").await else {
        return;
    };
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = match PostgresDedupStore::connect(&url).await {
        Ok(s) => s,
        Err(e) => return service_unavailable("postgres", e).unwrap_or(()),
    };
    store.migrate().await.expect("migrate");
    sqlx::query("CREATE TABLE IF NOT EXISTS idemq_e2e_effects (run text NOT NULL, order_id bigint NOT NULL)")
        .execute(store.pool())
        .await
        .expect("business table");
    let run = unique_scope("run");
    let published = publish_orders(&config).await;
    let attempts: Attempts = Arc::default();
    let handler = {
        let (attempts, run) = (attempts.clone(), run.clone());
        store.transactional(move |tx: &mut PgConnection, msg: Message| {
            let (attempts, run) = (attempts.clone(), run.clone());
            Box::pin(async move {
                let id = order_id(&msg)?;
                note_attempt(&attempts, id);
                if poison(id) {
                    return Err(HandlerError::permanent("card declined"));
                }
                sqlx::query("INSERT INTO idemq_e2e_effects (run, order_id) VALUES ($1, $2)")
                    .bind(&run)
                    .bind(i64::from(id))
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
                if flaky(id) && msg.attempt() == 1 {
                    // Fails after writing: the write must roll back.
                    return Err(HandlerError::retry("gateway timeout"));
                }
                Ok(())
            })
        })
    };
    let (pool, r) = (store.pool().clone(), run.clone());
    let distinct = async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(DISTINCT order_id) FROM idemq_e2e_effects WHERE run = $1",
        )
        .bind(&r)
        .fetch_one(&pool)
        .await
        .unwrap_or(0) as usize
    };
    let report = consume(&broker, &config, store.clone(), handler, distinct).await;
    let (rows, orders): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT order_id) FROM idemq_e2e_effects WHERE run = $1",
    )
    .bind(&run)
    .fetch_one(store.pool())
    .await
    .expect("count");
    let took_effect = (0..ORDERS).filter(|id| !poison(*id)).count() as i64;
    assert_eq!(
        (rows, orders),
        (took_effect, took_effect),
        "exactly one row per order"
    );
    check(&broker, &config, &report, published, &attempts).await;
    broker.close().await;
    delete_topology(&config).await.expect("cleanup");
}
