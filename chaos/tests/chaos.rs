//! The chaos suite: three engines on one RabbitMQ queue, each through its
//! own fault proxies, under link cuts, black holes, a crash, graceful
//! restarts and a long store partition of one engine. One test per store.
//!
//! Ignored by default (it takes a minute and a half and the real
//! services); `.ci/run` runs the short mode. Short (about 1,400 ids, 30 s of
//! chaos per store): `cargo test -p idemq-chaos -- --ignored`. Long:
//! `IDEMQ_CHAOS_MESSAGES=20000 IDEMQ_CHAOS_SECS=300 cargo test -p idemq-chaos --release -- --ignored --nocapture`
//! (`IDEMQ_CHAOS_SEED` repeats a schedule, `IDEMQ_CHAOS_VERBOSE=1` prints
//! the chaos events as they happen, `RUST_LOG` the engines' logs). Each
//! test prints one `CHAOS SUMMARY` line. Skips when a service is
//! unreachable, unless `IDEMQ_REQUIRE_SERVICES=1`.

use std::sync::Arc;

use idemq_chaos::harness::rabbitmq;
use idemq_chaos::postgres::PostgresMode;
use idemq_chaos::redis::RedisMode;
use idemq_chaos::{Settings, run};

/// The two runs share the machine's RabbitMQ and cores: one at a time, so
/// that neither's timing bounds (reconnects, shutdowns) pay for the other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the chaos suite: about 90 s on the real services; run with --ignored"]
async fn chaos_postgres_transactional() {
    let _turn = ONE_AT_A_TIME.lock().await;
    init_tracing();
    let settings = Settings::from_env();
    let Some(amqp) = rabbitmq().await else { return };
    let Some(mode) = PostgresMode::setup(&settings).await else {
        return;
    };
    run(Arc::new(mode), amqp, settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the chaos suite: about 90 s on the real services; run with --ignored"]
async fn chaos_redis() {
    let _turn = ONE_AT_A_TIME.lock().await;
    init_tracing();
    let settings = Settings::from_env();
    let Some(amqp) = rabbitmq().await else { return };
    let Some(mode) = RedisMode::setup(&settings).await else {
        return;
    };
    run(Arc::new(mode), amqp, settings).await;
}
