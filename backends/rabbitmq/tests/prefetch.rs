//! The engine and the broker agree on how many deliveries are in flight:
//! a default configuration is sized by the engine (64 handlers run at
//! once at concurrency 64), an explicit prefetch is kept and caps it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idemq::memory::MemoryDedupStore;
use idemq::{Broker, Engine, Message, OutgoingMessage};
use idemq_rabbitmq::RabbitConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Handlers that stay in flight until released, counting themselves.
#[derive(Clone, Default)]
struct Gate {
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    open: Arc<Notify>,
}

impl Gate {
    fn handler(&self) -> impl idemq::Handler + use<> {
        let g = self.clone();
        move |_m: Message| {
            let g = g.clone();
            async move {
                let now = g.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                g.most.fetch_max(now, Ordering::SeqCst);
                let opened = g.open.notified();
                opened.await;
                g.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        }
    }
}

async fn in_flight_at_concurrency_64(prefetch: Option<u16>) -> Option<usize> {
    // As a user writes it (the tests' common config sets a prefetch).
    let mut config = RabbitConfig::new(
        common::url(),
        format!("idemq-test.{}", idemq::testing::unique_scope("prefetch")),
    )
    .with_retry_tiers([common::SHORT_TIER, common::LONG_TIER]);
    if let Some(p) = prefetch {
        config = config.with_prefetch(p);
    }
    let broker = common::connect(config).await?;
    for i in 0..128 {
        broker
            .publish(OutgoingMessage::new("x").with_message_id(format!("p{i}")))
            .await
            .expect("publish");
    }
    let gate = Gate::default();
    let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), gate.handler())
        .concurrency(64)
        .build()
        .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    let expected = usize::from(prefetch.unwrap_or(64)).min(64);
    let g = gate.clone();
    common::wait_until("handlers in flight", Duration::from_secs(20), move || {
        g.in_flight.load(Ordering::SeqCst) >= expected
    })
    .await;
    // No more come while they are held (each holds its delivery unacked).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let most = gate.most.load(Ordering::SeqCst);
    shutdown.cancel();
    while gate.in_flight.load(Ordering::SeqCst) > 0 {
        gate.open.notify_waiters();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.await.expect("engine");
    common::cleanup(broker).await;
    Some(most)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_configuration_runs_as_many_handlers_as_the_engine_asks() {
    if let Some(most) = in_flight_at_concurrency_64(None).await {
        assert_eq!(most, 64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_prefetch_is_kept_and_caps_the_engine() {
    if let Some(most) = in_flight_at_concurrency_64(Some(16)).await {
        assert_eq!(most, 16);
    }
}
