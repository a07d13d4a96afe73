//! The idemq engine on RabbitMQ and `MemoryDedupStore`, with the
//! connection cut in the middle of a stream of thousands of messages:
//! every unique message is handled exactly once and none is lost.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::memory::MemoryDedupStore;
use idemq::testing::FaultProxy;
use idemq::{Engine, HandlerResultExt, Message, OutgoingMessage, Stopped};
use idemq_rabbitmq::{RabbitConfig, RabbitPublisher, RecoveryConfig, queue_depths};
use tokio_util::sync::CancellationToken;

const UNIQUE: usize = 3000;
const DUPLICATES: usize = 300;
const CONCURRENCY: u16 = 16;

type Seen = Arc<Mutex<HashMap<String, u32>>>;

async fn exactly_once_across_a_cut(name: &str, recovery: RecoveryConfig, rebuild: bool) {
    common::init_tracing();
    let upstream = common::upstream().await;
    if let Err(e) = tokio::net::TcpStream::connect(upstream).await {
        let _: Option<()> = idemq::testing::service_unavailable("rabbitmq", e);
        return;
    }
    let proxy = FaultProxy::start(upstream).await.expect("fault proxy");
    let config = common::config_at(&common::url_via(proxy.addr()), name)
        .with_prefetch(CONCURRENCY)
        .with_recovery(recovery)
        .with_connect_timeout(Duration::from_secs(2));
    let broker = common::connect(config)
        .await
        .expect("connect through the proxy");
    let direct = RabbitConfig::new(common::url(), broker.config().queue())
        .with_retry_tiers(broker.config().retry_tiers().iter().copied());

    let seen: Seen = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |msg: Message| {
            let seen = seen.clone();
            async move {
                // Long enough for deliveries to be in flight at the cut.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let mut seen = seen.lock().map_err(|e| e.to_string()).retryable()?;
                *seen.entry(msg.key().to_owned()).or_default() += 1;
                Ok(())
            }
        }
    };
    let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
        .scope(format!("engine-{name}"))
        .concurrency(usize::from(CONCURRENCY))
        .build()
        .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));

    // The producer talks to the server directly; some ids twice.
    let publisher = RabbitPublisher::connect(direct.clone())
        .await
        .expect("publisher");
    let producing = tokio::spawn(async move {
        for i in (0..UNIQUE).chain(0..DUPLICATES) {
            let id = format!("order-{i:05}");
            publisher
                .publish(OutgoingMessage::new(format!("{{\"n\":{i}}}")).with_message_id(id))
                .await
                .expect("publish");
        }
        publisher.close().await;
    });
    let handled = || seen.lock().map(|s| s.len()).unwrap_or(0);

    common::wait_until("a third handled", Duration::from_secs(60), || {
        handled() >= UNIQUE / 3
    })
    .await;
    let generation = broker.generation();
    proxy.cut();
    common::wait_until(
        "the broker to notice the cut",
        Duration::from_secs(10),
        || !broker.is_connected(),
    )
    .await;
    if rebuild {
        common::wait_until(
            "the supervisor to retire the connection",
            Duration::from_secs(10),
            || broker.generation().is_none(),
        )
        .await;
    }
    let during = handled();
    proxy.restore();
    // Well under the 15 s `max_recovery_time`: a recovery that stalls
    // unnoticed fails here.
    common::wait_until("handling to resume", Duration::from_secs(10), || {
        handled() > during
    })
    .await;
    producing.await.expect("producer");
    common::wait_until("every message handled", Duration::from_secs(120), || {
        handled() == UNIQUE
    })
    .await;
    // Let the redeliveries and duplicates drain: every queue empty.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let d = queue_depths(&direct).await.expect("depths");
        if d.work == 0 && d.retry.iter().all(|(_, n)| *n == 0) {
            assert_eq!(d.dead, 0, "nothing may be dead-lettered");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queues did not drain: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let report = running.await.expect("engine task");

    assert!(during < UNIQUE, "the cut came after the stream");
    // Without `rebuild`, lapin's recovery or a rebuild may have resumed
    // consumption (a stalled recovery is replaced by a rebuild): both are
    // correct, so only what the engine promises is checked.
    if rebuild {
        assert!(broker.generation() > generation, "no rebuild happened");
    }
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), UNIQUE);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert!(
        matches!(report.stopped, Stopped::Shutdown),
        "{}",
        report.stopped
    );
    assert_eq!(report.handled, UNIQUE as u64, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert!(report.duplicates >= DUPLICATES as u64, "{report:?}");
    eprintln!("{report:?}");
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_handles_each_message_once_across_lapin_recovery() {
    let recovery = RecoveryConfig {
        attempts: 200,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(300),
        max_recovery_time: Duration::from_secs(5),
        ..RecoveryConfig::default()
    };
    exactly_once_across_a_cut("engine-lapin", recovery, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_handles_each_message_once_across_a_rebuild() {
    let recovery = RecoveryConfig {
        attempts: 1,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        // lapin's recovery can stall instead of giving up: bounded too.
        max_recovery_time: Duration::from_secs(2),
        rebuild_min_delay: Duration::from_millis(100),
        rebuild_max_delay: Duration::from_millis(500),
        ..RecoveryConfig::default()
    };
    exactly_once_across_a_cut("engine-rebuild", recovery, true).await;
}
