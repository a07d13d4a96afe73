//! The engine's health on RabbitMQ: a connection cut through
//! `idemq::testing::FaultProxy` reads `BrokerReconnecting` until the
//! connection is back, then `Running`, and consumption goes on.

mod common;

use std::time::Duration;

use idemq::memory::MemoryDedupStore;
use idemq::testing::FaultProxy;
use idemq::{Broker, Engine, EngineState, Health, Message, OutgoingMessage, Stopped};
use idemq_rabbitmq::RecoveryConfig;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// How long a state may take to show: the engine polls the connection
/// every 200 ms; lapin notices a cut and recovers within a few of its
/// backoff steps. Room for a loaded machine.
const WITHIN: Duration = Duration::from_secs(20);

async fn reaches(health: &mut Health, want: EngineState) {
    let reached = timeout(WITHIN, health.wait_for(|s| s == want))
        .await
        .unwrap_or_else(|_| panic!("never {want} within {WITHIN:?}; at {}", health.state()));
    assert_eq!(reached, Some(want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_reads_broker_reconnecting_then_running_again() {
    common::init_tracing();
    let upstream = common::upstream().await;
    if let Err(e) = tokio::net::TcpStream::connect(upstream).await {
        let _: Option<()> = idemq::testing::service_unavailable("rabbitmq", e);
        return;
    }
    let proxy = FaultProxy::start(upstream).await.expect("fault proxy");
    let config = common::config_at(&common::url_via(proxy.addr()), "health")
        .with_recovery(RecoveryConfig {
            attempts: 200,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(300),
            ..RecoveryConfig::default()
        })
        .with_connect_timeout(Duration::from_secs(2));
    let broker = common::connect(config)
        .await
        .expect("connect through the proxy");

    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |m: Message| {
        let _ = handled_tx.send(m.key().to_owned());
        async { Ok::<(), idemq::HandlerError>(()) }
    };
    let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
        .scope(idemq::testing::unique_scope("health"))
        .build()
        .expect("engine");
    let mut health = engine.health();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(engine.run(shutdown.clone()));
    reaches(&mut health, EngineState::Running).await;

    proxy.cut();
    reaches(&mut health, EngineState::BrokerReconnecting).await;
    assert!(!health.state().is_ready());
    proxy.restore();
    reaches(&mut health, EngineState::Running).await;

    // Consumption goes on over the recovered connection.
    broker
        .publish(OutgoingMessage::new("x").with_message_id("after-the-cut"))
        .await
        .expect("publish");
    let key = timeout(WITHIN, handled.recv())
        .await
        .expect("handled within the bound");
    assert_eq!(key.as_deref(), Some("after-the-cut"));

    shutdown.cancel();
    let report = run.await.expect("the run");
    assert_eq!(report.handled, 1);
    assert!(matches!(report.stopped, Stopped::Shutdown), "{report}");
    assert_eq!(health.state(), EngineState::Stopped);
    common::cleanup(broker).await;
}
