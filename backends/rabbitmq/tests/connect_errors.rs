//! Connection errors say what happened, fast, and administration calls
//! that succeed log no errors. (A test binary of its own: it installs a
//! global log subscriber to see lapin's threads too.)

mod common;

use std::time::Duration;

use idemq::Error;
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, RabbitDeadLetters, RabbitPublisher, topology};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_say_what_happened_and_successes_log_no_errors() {
    let logs = idemq::testing::LogBuffer::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .init();

    // A refused port is "connection refused", at once, with no password.
    let refused = RabbitConfig::new("amqp://guest:s3cret@127.0.0.1:1/%2f", "q");
    let started = Instant::now();
    for err in [
        RabbitBroker::connect(refused.clone())
            .await
            .map(drop)
            .expect_err("refused"),
        RabbitPublisher::connect(refused.clone())
            .await
            .map(drop)
            .expect_err("refused"),
        RabbitDeadLetters::connect(refused.clone())
            .await
            .map(drop)
            .expect_err("refused"),
    ] {
        let text = err.to_string();
        assert!(matches!(err, Error::Unavailable { .. }), "{text}");
        assert!(text.to_lowercase().contains("connection refused"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Successful administration and a clean close log nothing at WARN or above.
    let config = common::config("quiet");
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    logs.clear();
    topology::declare(&config).await.expect("declare");
    topology::queue_depths(&config).await.expect("depths");
    topology::queue_stats(&config).await.expect("stats");
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dlq");
    idemq::replay::peek(&dlq, 10).await.expect("peek");
    dlq.close().await;
    broker.close().await;
    topology::delete_topology(&config).await.expect("delete");
    // lapin's threads log a moment after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = logs.text();
    assert!(text.is_empty(), "{text}");
}
