//! Which dedup store a command talks to, and how to open it.

use std::sync::Arc;
use std::time::Duration;

use idemq::error::redact_url;
use idemq::{BoxError, DedupStore, RecordState};
use idemq_postgres::PostgresDedupStore;
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

/// An open store of either kind.
pub enum Opened {
    /// Redis.
    Redis(RedisDedupStore),
    /// Postgres.
    Postgres(PostgresDedupStore),
}

impl Opened {
    /// The store behind the trait.
    pub fn dyn_store(&self) -> Arc<dyn DedupStore> {
        match self {
            Opened::Redis(s) => Arc::new(s.clone()),
            Opened::Postgres(s) => Arc::new(s.clone()),
        }
    }
}

/// Connects to the store of `opts`.
pub async fn open(opts: &StoreOpts) -> Result<Opened, BoxError> {
    match opts.kind {
        StoreKind::Redis => {
            let mut config = RedisConfig::new();
            if let Some(prefix) = &opts.redis_prefix {
                config = config.with_prefix(prefix.clone());
            }
            let store = RedisDedupStore::connect_with(&opts.redis_url, config)
                .await
                .map_err(|e| format!("redis at {}: {e}", redact_url(&opts.redis_url)))?;
            Ok(Opened::Redis(store))
        }
        StoreKind::Postgres => Ok(Opened::Postgres(open_postgres(opts).await?)),
    }
}

/// Connects to the store of `opts`, behind the trait.
pub async fn open_store(opts: &StoreOpts) -> Result<Arc<dyn DedupStore>, BoxError> {
    Ok(open(opts).await?.dyn_store())
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

/// A record state as the commands print it.
pub fn state_name(s: RecordState) -> &'static str {
    match s {
        RecordState::Claimed => "claimed",
        RecordState::Released => "released",
        RecordState::Done => "done",
        RecordState::Dead => "dead",
    }
}

/// Seconds with one decimal: `12.3s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
