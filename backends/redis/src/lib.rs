//! # idemq-redis: the Redis dedup store of idemq
//!
//! [`RedisDedupStore`] implements [`idemq::DedupStore`] over Redis (7.0
//! or later): one short string per message key, claimed under a fenced
//! lease, every operation atomic (a claim of an absent key is a plain
//! `SET NX PX GET`; the rest are Lua scripts; leases are timed by the
//! server's clock, through the record's own TTL). Records expire by
//! themselves; a lapsed lease keeps its attempt count. The layout of a
//! record: [`record`].
//! `claim_many` and `complete_many` send many keys per round trip (up to
//! [`MAX_KEYS_PER_CALL`] per script call) and need a standalone Redis (see
//! [`RedisDedupStore`] on Redis Cluster). To merge concurrent `claim` and
//! `complete` calls into such batches, wrap the store in an
//! [`idemq::Coalescing`].
//!
//! ```no_run
//! use std::time::Duration;
//! use idemq::{Claim, ClaimTtl, DedupStore};
//! use idemq_redis::{RedisConfig, RedisDedupStore};
//!
//! # async fn run() -> Result<(), idemq::Error> {
//! let store = RedisDedupStore::connect_with(
//!     "redis://127.0.0.1:6379",
//!     RedisConfig::new()
//!         .with_prefix("orders-svc:")
//!         .with_response_timeout(Duration::from_secs(1)),
//! )
//! .await?;
//! let ttl = ClaimTtl {
//!     lease: Duration::from_secs(300),
//!     retain: Duration::from_secs(24 * 3600),
//! };
//! if let Claim::Claimed(lease) = store.claim("orders", "order-42", ttl).await? {
//!     // ... handle the message once ...
//!     let _ = store.complete(&lease, Duration::from_secs(24 * 3600)).await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! For operators, [`RedisDedupStore::scan_states`] counts the records by
//! state with a bounded `SCAN` (an estimate beyond its bound, see
//! [`RecordScan`]).
//!
//! Errors are [`idemq::Error`]s with `backend: "redis"`: connection trouble
//! and timeouts are transient ([`idemq::Error::is_transient`]), script and
//! protocol errors are not. Passwords never show in `Debug` output, logs or
//! errors.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod command;
mod config;
mod error;
pub mod record;
mod scripts;
mod store;

pub use config::{MAX_PREFIX_LEN, RedisConfig};
pub use store::{MAX_KEYS_PER_CALL, RecordScan, RedisDedupStore};

/// The redis crate this store is built on, for [`RedisDedupStore::from_manager`].
pub use redis;
