//! The maintenance subcommands: inspect, forget, purge, replay.

use std::sync::Arc;
use std::time::Duration;

use idemq::error::redact_url;
use idemq::{BoxError, DedupStore, Record, RecordState, Replay};
use idemq_postgres::PostgresDedupStore;
use idemq_rabbitmq::{RabbitConfig, RabbitDeadLetters};
use idemq_redis::{RedisConfig, RedisDedupStore};

/// Which dedup store a command talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// `RedisDedupStore` at `REDIS_URL`.
    Redis,
    /// `PostgresDedupStore` at `DATABASE_URL`.
    Postgres,
}

/// Where a store is and how it is laid out.
#[derive(Clone, Debug)]
pub struct StoreOpts {
    /// Which store.
    pub kind: StoreKind,
    /// Redis URL.
    pub redis_url: String,
    /// Postgres URL.
    pub database_url: String,
    /// Redis key prefix (`None`: the store's default).
    pub redis_prefix: Option<String>,
    /// Postgres table (`None`: the store's default).
    pub table: Option<String>,
}

/// Connects to the store of `opts`.
pub async fn open_store(opts: &StoreOpts) -> Result<Arc<dyn DedupStore>, BoxError> {
    match opts.kind {
        StoreKind::Redis => {
            let mut config = RedisConfig::new();
            if let Some(prefix) = &opts.redis_prefix {
                config = config.with_prefix(prefix.clone());
            }
            let store = RedisDedupStore::connect_with(&opts.redis_url, config)
                .await
                .map_err(|e| format!("redis at {}: {e}", redact_url(&opts.redis_url)))?;
            Ok(Arc::new(store))
        }
        StoreKind::Postgres => Ok(Arc::new(open_postgres(opts).await?)),
    }
}

/// Connects to Postgres and makes sure the table exists.
pub async fn open_postgres(opts: &StoreOpts) -> Result<PostgresDedupStore, BoxError> {
    let mut store = PostgresDedupStore::connect(&opts.database_url)
        .await
        .map_err(|e| format!("postgres at {}: {e}", redact_url(&opts.database_url)))?;
    if let Some(table) = &opts.table {
        store = store.with_table(table)?;
    }
    store.migrate().await?;
    Ok(store)
}

fn state_name(s: RecordState) -> &'static str {
    match s {
        RecordState::Claimed => "claimed",
        RecordState::Released => "released",
        RecordState::Done => "done",
        RecordState::Dead => "dead",
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// One line describing `record` (or its absence) for `key`.
pub fn describe(key: &str, record: Option<&Record>) -> String {
    match record {
        None => format!("{key}: absent"),
        Some(r) => format!(
            "{key}: {} attempts={} lease_remaining={} expires_in={}",
            state_name(r.state),
            r.attempts,
            r.lease_remaining.map_or_else(|| "-".to_owned(), secs),
            secs(r.expires_in)
        ),
    }
}

/// `idemq inspect`: prints each key's record.
pub async fn inspect(opts: &StoreOpts, scope: &str, keys: &[String]) -> Result<(), BoxError> {
    let store = open_store(opts).await?;
    for key in keys {
        let record = store.get(scope, key).await?;
        println!("{}", describe(key, record.as_ref()));
    }
    Ok(())
}

/// `idemq forget`: deletes each key's record.
pub async fn forget(opts: &StoreOpts, scope: &str, keys: &[String]) -> Result<(), BoxError> {
    let store = open_store(opts).await?;
    for key in keys {
        let was = store.forget(scope, key).await?;
        println!("{key}: {}", if was { "forgotten" } else { "was not there" });
    }
    Ok(())
}

/// `idemq purge`: deletes expired Postgres rows in batches.
pub async fn purge(opts: &StoreOpts, batch: usize) -> Result<(), BoxError> {
    let store = open_postgres(opts).await?;
    let n = store.purge(batch).await?;
    println!("purged {n} expired rows from {}", store.table());
    store.pool().close().await;
    Ok(())
}

/// `idemq replay`: moves dead letters of `queue` back to it.
pub async fn replay(
    amqp_url: &str,
    queue: &str,
    opts: &StoreOpts,
    max: usize,
) -> Result<(), BoxError> {
    let store = open_store(opts).await?;
    let dlq = RabbitDeadLetters::connect(RabbitConfig::new(amqp_url, queue))
        .await
        .map_err(|e| format!("rabbitmq at {}: {e}", redact_url(amqp_url)))?;
    let report = Replay::new(&dlq, &store)
        .limit(max as u64)
        .run(&Default::default())
        .await;
    dlq.close().await;
    println!("{report}");
    Ok(())
}
