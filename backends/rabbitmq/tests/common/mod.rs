//! Helpers shared by the integration tests (real RabbitMQ).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use idemq::Error;
use idemq::testing::{service_unavailable, unique_scope};
use idemq_rabbitmq::{DEFAULT_URL, RabbitBroker, RabbitConfig, URL_ENV, delete_topology};
use lapin::uri::AMQPUri;
use tokio::time::{Instant, sleep};

/// The small retry tier the conformance suite's `retry_delay` matches.
pub const SHORT_TIER: Duration = Duration::from_millis(500);
/// A longer tier, to see delays are per tier.
pub const LONG_TIER: Duration = Duration::from_secs(2);

/// The server's URL: `AMQP_ADDR` or the default.
pub fn url() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A configuration on fresh queue names for test `name`.
pub fn config(name: &str) -> RabbitConfig {
    config_at(&url(), name)
}

/// Like [`config`], at another URL (a fault proxy).
pub fn config_at(url: &str, name: &str) -> RabbitConfig {
    RabbitConfig::new(url, format!("idemq-test.{}", unique_scope(name)))
        .with_retry_tiers([SHORT_TIER, LONG_TIER])
        .with_prefetch(16)
        .with_connect_timeout(Duration::from_secs(5))
        .with_publish_timeout(Duration::from_secs(10))
}

/// Connects, or skips (returns `None`) when RabbitMQ is unreachable.
pub async fn connect(config: RabbitConfig) -> Option<RabbitBroker> {
    match RabbitBroker::connect(config).await {
        Ok(broker) => Some(broker),
        Err(e @ (Error::Unavailable { .. } | Error::Timeout { .. })) => {
            service_unavailable("rabbitmq", e)
        }
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// Closes the broker and deletes its queues (through the direct URL).
pub async fn cleanup(broker: RabbitBroker) {
    let config = broker.config().clone();
    broker.close().await;
    let direct = RabbitConfig::new(url(), config.queue())
        .with_retry_tiers(config.retry_tiers().iter().copied());
    delete_topology(&direct)
        .await
        .expect("delete the test queues");
}

/// Waits until `cond` holds, failing the test after `within`.
pub async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// The server's address, for a fault proxy in front of it.
pub async fn upstream() -> SocketAddr {
    let uri: AMQPUri = url().parse().expect("AMQP URL");
    let host = format!("{}:{}", uri.authority.host, uri.authority.port);
    tokio::net::lookup_host(host)
        .await
        .expect("resolve the RabbitMQ host")
        .next()
        .expect("an address for the RabbitMQ host")
}

/// The server's URL with host and port replaced by `addr`.
pub fn url_via(addr: SocketAddr) -> String {
    let uri: AMQPUri = url().parse().expect("AMQP URL");
    let user = &uri.authority.userinfo;
    let vhost = uri.vhost.replace('%', "%25").replace('/', "%2f");
    format!("amqp://{}:{}@{addr}/{vhost}", user.username, user.password)
}

/// Logs to the test output, which the test harness shows for failing
/// tests only: what `RUST_LOG` asks for, or else idemq-rabbitmq's own `info`
/// and above (the supervisor says there why it rebuilt a connection, which
/// is what a failed recovery test needs to be understood).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("idemq_rabbitmq=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .with_thread_ids(true)
        .try_init();
}
