//! [`RedisDedupStore`]: the [`DedupStore`](idemq::DedupStore) over Redis, by concern:
//!
//! - this file: the type, its documentation and its small accessors;
//! - `connection.rs`: opening the connection, sending commands and
//!   scripts under the store's deadline, replacing a hung connection
//!   (`first_connection.rs`: the single diagnosed attempt `connect` makes
//!   first);
//! - `server.rs`: what the server is (version, `SET ... IFEQ`) and its
//!   script cache;
//! - `operations.rs`: the [`DedupStore`](idemq::DedupStore) operations;
//! - `reply.rs`: reading what Redis and the scripts answer;
//! - `scan.rs`: [`RedisDedupStore::scan_states`], for operators.
//!
//! The record the operations read and write: [`crate::record`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use idemq::Error;
use idemq::key;
use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisConfig;
use crate::record;

mod connection;
mod first_connection;
mod operations;
mod reply;
mod scan;
mod server;

pub use scan::RecordScan;

/// Most keys one script call of a batch takes: larger batches are split
/// into calls of this many keys, sent together in one pipeline, so no
/// single call holds Redis for long.
pub const MAX_KEYS_PER_CALL: usize = 256;

/// A [`DedupStore`](idemq::DedupStore) keeping one Redis string per message key.
///
/// What a record holds, where it lives and how long: [`crate::record`].
/// A claim of an absent key needs no script: `claim` sends `SET <key>
/// <fresh claim> NX PX <life> GET`, one atomic command that claims the key
/// when it is absent and otherwise answers what it holds, untouched. A
/// done or dead record answers the claim from that reply. A claimed or
/// released record (whose lease may have lapsed), or anything that is not
/// a record, goes to the claim script in a second round trip, which
/// decides atomically (takeover, attempt count, in progress, or the
/// error). `complete` and `bury` read the record first and write only
/// when it is the caller's claim (its token and attempt): a `GET`, then a
/// `SET PX` (or a `DEL`), in one script, so a record that is not theirs is
/// never touched. The store needs Redis 7.0 or later (`SET` with both `NX`
/// and `GET`, and `PEXPIRETIME`); `connect` refuses older servers.
///
/// On a server that takes `SET ... IFEQ` (Valkey 8.1 and later, Redis 8.4
/// and later; [`RedisDedupStore::uses_set_ifeq`], read by `connect` and
/// [`RedisDedupStore::load_scripts`]), `complete` and `bury` first send
/// one plain command instead: `SET <key> <new record> IFEQ <the claim as
/// this store wrote it> PX <keep_for> GET`. It writes only when the key
/// holds exactly the caller's claim, so it is fenced as the script is; it
/// never creates a key. The reply decides: the claim (applied), nothing or
/// another record (lease lost). The script then decides what it cannot:
/// the caller's claim with another slack (a renewed lease, or a claim with
/// other TTLs than the store's last one), and what is not a record.
/// `complete_many` stays one script call per batch, for its
/// all-or-nothing.
///
/// A value that is not such a string under a record key makes every
/// operation on it but `forget` fail with a permanent error (`WRONGTYPE`,
/// naming the key), and is left as it is.
///
/// Every operation is atomic: one command (the claim's `SET NX PX GET`,
/// or `DEL` for [`DedupStore::forget`](idemq::DedupStore::forget)) or one Lua script (`EVALSHA`; sent
/// again as `EVAL` with its source when Redis lost its script cache). Each
/// is one round trip, but for a claim that meets a claimed or released
/// record (a redelivery, a retry, a takeover): the `SET`, then the script.
/// `renew` and `fail` compare the owner token first, `complete` and `bury`
/// the token and the attempt; none of them creates a record.
///
/// [`DedupStore::claim_many`](idemq::DedupStore::claim_many) sends the `SET NX PX GET` of every key in
/// one pipeline, then, for the keys that answer left open, one script call
/// per [`MAX_KEYS_PER_CALL`] keys (in a second pipeline, only when there
/// are such keys). [`DedupStore::complete_many`](idemq::DedupStore::complete_many) runs one script call per
/// [`MAX_KEYS_PER_CALL`] keys, in one pipeline. Both answer exactly as the
/// same single calls made one after the other would, in order: a key twice
/// in one batch is claimed by its first occurrence and answers in progress
/// for the second. A batch of up to [`MAX_KEYS_PER_CALL`] keys with a key
/// that fails (a value that is not a record) answers that error as a whole
/// and changes nothing: `complete_many` reads every key before it writes
/// one; the claim script puts back what it wrote for the keys before the
/// bad one, value and exact expiry; and the claims the pipeline made for
/// absent keys are deleted again (each only while it still holds the claim
/// written) before the error is answered. Until then they were visible, as
/// claims in progress. (So [`idemq::Coalescing`], which then makes the
/// batch's calls again one by one, gets the answers those calls would have
/// had.)
///
/// To merge the `claim` and `complete` calls of many concurrent tasks into
/// such batches, wrap the store in an [`idemq::Coalescing`], as any other
/// store.
///
/// One script call or pipeline touches keys of any hash slot, so
/// **batches need a standalone Redis** (or a primary with replicas); on a
/// Redis Cluster only batches whose keys all share a slot work, the others
/// fail with `CROSSSLOT`.
///
/// The connection is a redis [`ConnectionManager`]: it reconnects by itself
/// after a connection error. Every operation is bounded by the configured
/// [`RedisConfig::response_timeout`], waiting for a reconnection included,
/// and fails with a transient [`Error`] past it. A store built from a URL
/// also replaces a connection that timed out
/// [`RedisConfig::reconnect_after_timeouts`] times in a row (a connection
/// that hangs without closing is never noticed by the manager otherwise).
///
/// Cheap to clone: clones share the connection. `Debug` output and errors
/// never show the password of the URL.
#[derive(Clone)]
pub struct RedisDedupStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RwLock<ConnectionManager>,
    /// What it takes to open a fresh connection (stores built from a URL).
    reopen: Option<(Client, ConnectionManagerConfig)>,
    timeouts_in_a_row: AtomicU32,
    config: RedisConfig,
    /// The URL with its password masked, for `Debug` and logs.
    target: String,
    /// The server takes `SET ... IFEQ` (Valkey 8.1+, Redis 8.4+), read by
    /// [`RedisDedupStore::load_scripts`]: `complete` and `bury` are then
    /// a plain `SET` when the record is the claim as this store wrote it.
    compare_and_set: AtomicBool,
    /// The slack of the last claim this store sent ([`NO_SLACK`] before
    /// the first): what a claim record holds after the lease, so what
    /// `complete` compares against with `IFEQ`. A guess that misses (a
    /// claim with another TTL, a renewed lease) costs the script call the
    /// store makes without `IFEQ`.
    last_slack: AtomicU64,
}

/// [`Inner::last_slack`] before any claim.
const NO_SLACK: u64 = u64::MAX;

impl fmt::Debug for RedisDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedupStore")
            .field("target", &self.inner.target)
            .field("prefix", &self.inner.config.prefix())
            .field("response_timeout", &self.inner.config.response_timeout())
            .field(
                "connection_timeout",
                &self.inner.config.connection_timeout(),
            )
            .finish()
    }
}

impl RedisDedupStore {
    /// The configuration the store runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// A handle on the store's connection (shared, not a new one).
    pub fn connection_manager(&self) -> ConnectionManager {
        self.conn()
    }

    /// The Redis key holding the record of `(scope, key)`:
    /// `<prefix>{<scope>:<key>}`. Scope and key are checked as every
    /// operation checks them.
    pub fn record_key(&self, scope: &str, key: &str) -> Result<String, Error> {
        key::check(scope, key)?;
        Ok(self.key_unchecked(scope, key))
    }

    /// Notes the slack of a claim sent now (see [`Inner::last_slack`]);
    /// written only when it changes, so concurrent claims do not contend
    /// for the cache line.
    fn note_slack(&self, slack: u64) {
        if self.inner.last_slack.load(Ordering::Relaxed) != slack {
            self.inner.last_slack.store(slack, Ordering::Relaxed);
        }
    }

    fn key_unchecked(&self, scope: &str, key: &str) -> String {
        record::key_parts(self.inner.config.prefix(), scope, key).concat()
    }
}
