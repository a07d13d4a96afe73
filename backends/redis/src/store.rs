//! [`RedisDedupStore`]: the [`DedupStore`] over Redis.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use idemq::coalesce::CoalescingStats;
use idemq::error::redact_url;
use idemq::key;
use idemq::{
    Claim, ClaimTtl, Coalescing, DedupStore, Error, Fenced, Lease, LeaseToken, Record, RecordState,
    Release, Revival,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, RedisError, RedisResult, ServerErrorKind, Value};

use crate::command;
use crate::config::RedisConfig;
use crate::connect;
use crate::error;
use crate::record::{self, DEAD, DONE};
use crate::scripts::{self, Lua};

mod scan;

pub use scan::RecordScan;

/// Longest duration handed to Redis, in ms (about 34 years): keeps every
/// deadline exact in Lua's doubles and within `PEXPIRE`'s range.
const MAX_MS: u64 = 1 << 40;
/// Longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Most keys one script call of a batch takes: larger batches are split
/// into calls of this many keys, sent together in one pipeline, so no
/// single call holds Redis for long.
pub const MAX_KEYS_PER_CALL: usize = 256;

/// A [`DedupStore`] keeping one Redis string per message key.
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
/// other TTLs than the store's last one), and what is not a record. The
/// store's own batching ([`RedisConfig::with_batching`]) is then off: no
/// fresh message needs a script, and one plain command per call measured
/// cheaper than the batcher's hand-offs. `complete_many` stays one script
/// call per batch, for its all-or-nothing.
///
/// A value that is not such a string under a record key makes every
/// operation on it but `forget` fail with a permanent error (`WRONGTYPE`,
/// naming the key), and is left as it is. That includes the records
/// earlier versions of this store wrote: hashes (`state`, `token`, `lease`
/// and `attempts` fields) and strings of the form
/// `state:token:lease:attempts`. **Upgrading from an earlier layout needs
/// an empty key prefix**, or a new one ([`RedisConfig::with_prefix`]); the
/// error says so.
///
/// Every operation is atomic: one command (the claim's `SET NX PX GET`,
/// or `DEL` for [`DedupStore::forget`]) or one Lua script (`EVALSHA`; sent
/// again as `EVAL` with its source when Redis lost its script cache). Each
/// is one round trip, but for a claim that meets a claimed or released
/// record (a redelivery, a retry, a takeover): the `SET`, then the script.
/// `renew` and `fail` compare the owner token first, `complete` and `bury`
/// the token and the attempt; none of them creates a record.
///
/// [`DedupStore::claim_many`] sends the `SET NX PX GET` of every key in
/// one pipeline, then, for the keys that answer left open, one script call
/// per [`MAX_KEYS_PER_CALL`] keys (in a second pipeline, only when there
/// are such keys). [`DedupStore::complete_many`] runs one script call per
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
/// The store's own `claim` and `complete` use these batches when many
/// tasks call at once ([`RedisConfig::with_batching`], on by default): an
/// [`idemq::Coalescing`] inside the store lets one batch of each kind out
/// at a time (which makes the largest batches; Redis runs one script at a
/// time anyway) and sends the calls that queued meanwhile together. A lone
/// caller goes straight out. [`RedisDedupStore::batching_stats`] says how
/// the calls went out.
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
    /// The batcher of `claim` and `complete` ([`RedisConfig::with_batching`]),
    /// over a handle on the same connection without one.
    batcher: Option<Coalescing<RedisDedupStore>>,
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
            .field("batching", &self.inner.config.batching())
            .finish()
    }
}

impl RedisDedupStore {
    /// Connects to `url` (`redis://[user[:password]@]host[:port][/db]`, or
    /// `rediss://` for TLS) with the default [`RedisConfig`], and loads the
    /// scripts.
    ///
    /// The first connection is one attempt, not retried, so a mistake
    /// shows at once, with its cause (the URL in the message has its
    /// password masked):
    ///
    /// - a refused port: [`Error::Unavailable`] (transient), saying
    ///   `connection refused`;
    /// - no connection (nor `AUTH` and `SELECT` answered) within
    ///   [`RedisConfig::connection_timeout`]: [`Error::Timeout`] naming it;
    /// - a refused `AUTH` (a wrong password or user, a password for a
    ///   server without one) or `SELECT` (a database out of range): a
    ///   permanent [`Error::Backend`] with the server's words, such as
    ///   `authentication failed: WRONGPASS invalid username-password pair
    ///   or user is disabled.`;
    /// - an invalid URL: [`Error::InvalidInput`].
    ///
    /// Once that connection stood, the store's connection (a
    /// [`ConnectionManager`]) reconnects by itself after connection errors.
    /// Loading the scripts is bounded by the response timeout.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisConfig::default()).await
    }

    /// Connects to `url` with `config`; see [`RedisDedupStore::connect`].
    pub async fn connect_with(url: &str, config: RedisConfig) -> Result<Self, Error> {
        config.validate()?;
        let target = redact_url(url);
        if is_tls(url) {
            ensure_crypto_provider();
        }
        let client =
            Client::open(url).map_err(|e| Error::invalid("redis url", format!("{target}: {e}")))?;
        // One attempt first, for the cause: the manager would retry any
        // failure in the background until the deadline.
        connect::first_connection(&client, &config, &target).await?;
        // That connection stood: from here on the manager connects, and
        // reconnects by itself. Its connection opens with the first
        // exchange, `load_scripts` (under the response timeout).
        let manager_config = manager_config(&config);
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(|e| error::map("connect", config.connection_timeout(), e))?;
        let store = RedisDedupStore::build(manager, Some((client, manager_config)), config, target);
        store.load_scripts().await?;
        Ok(store)
    }

    /// Like [`RedisDedupStore::connect_with`], but sends nothing yet: the
    /// connection is opened by the first operation (which fails with a
    /// transient error while Redis cannot be reached). For services that
    /// must start while Redis is down. Call it within a Tokio runtime;
    /// fails only on an invalid URL or config, or outside a runtime.
    pub fn connect_lazy(url: &str, config: RedisConfig) -> Result<Self, Error> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "RedisDedupStore::connect_lazy must be called within a Tokio runtime".into(),
            ));
        }
        let target = redact_url(url);
        if is_tls(url) {
            ensure_crypto_provider();
        }
        let client =
            Client::open(url).map_err(|e| Error::invalid("redis url", format!("{target}: {e}")))?;
        let manager_config = manager_config(&config);
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(|e| error::map("connect", config.connection_timeout(), e))?;
        Ok(RedisDedupStore::build(
            manager,
            Some((client, manager_config)),
            config,
            target,
        ))
    }

    /// Wraps a connection the application already has. Its own response
    /// timeout stays as it was configured; the store still bounds each
    /// operation by [`RedisConfig::response_timeout`]. Such a store cannot
    /// replace a hung connection (see
    /// [`RedisConfig::with_reconnect_after_timeouts`]). Fails only when
    /// `config` is invalid; nothing is sent until the first operation.
    pub fn from_manager(manager: ConnectionManager, config: RedisConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(RedisDedupStore::build(
            manager,
            None,
            config,
            "<ConnectionManager>".to_owned(),
        ))
    }

    fn build(
        manager: ConnectionManager,
        reopen: Option<(Client, ConnectionManagerConfig)>,
        config: RedisConfig,
        target: String,
    ) -> Self {
        let batching = config.batching();
        let direct = RedisDedupStore {
            inner: Arc::new(Inner {
                conn: RwLock::new(manager),
                reopen,
                timeouts_in_a_row: AtomicU32::new(0),
                config,
                target,
                compare_and_set: AtomicBool::new(false),
                last_slack: AtomicU64::new(NO_SLACK),
            }),
            batcher: None,
        };
        RedisDedupStore {
            inner: direct.inner.clone(),
            batcher: batching.map(|n| Coalescing::new(direct).with_max_in_flight(n)),
        }
    }

    /// How the store's own `claim` and `complete` calls went out so far
    /// (alone or in batches), when it batches them
    /// ([`RedisConfig::with_batching`]).
    pub fn batching_stats(&self) -> Option<CoalescingStats> {
        self.batcher.as_ref().map(Coalescing::stats)
    }

    /// True when the server takes `SET ... IFEQ` (Valkey 8.1 and later,
    /// Redis 8.4 and later): `complete` and `bury` are then one plain `SET`
    /// each (still fenced by the owner token and attempt), the script only
    /// deciding what that `SET` could not, and the store's own batching is
    /// off. Read off `INFO server` by `connect`,
    /// `connect_with` and [`RedisDedupStore::load_scripts`]; a store from
    /// `connect_lazy` or `from_manager` uses the scripts until
    /// `load_scripts` is called.
    pub fn uses_set_ifeq(&self) -> bool {
        self.inner.compare_and_set.load(Ordering::Relaxed)
    }

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

    /// Sends `PING`; succeeds when Redis answers within the response
    /// timeout.
    pub async fn ping(&self) -> Result<(), Error> {
        let reply = self.send("ping", redis::cmd("PING")).await?;
        self.server_reply("ping", reply).map(drop)
    }

    /// Loads every script into Redis' script cache in one round trip, and
    /// reads the server's version: refuses one older than Redis 7.0, and
    /// notes whether it takes `SET ... IFEQ`
    /// ([`RedisDedupStore::uses_set_ifeq`]). Optional for the scripts: an
    /// operation whose script is missing sends its source instead (which
    /// caches it too).
    pub async fn load_scripts(&self) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        pipe.add_command(redis::cmd("INFO").arg("server").to_owned());
        for script in scripts::all() {
            pipe.add_command(script.load());
        }
        let mut conn = self.conn();
        let n = pipe.len();
        let mut replies = self
            .deadline("load_scripts", async move {
                conn.send_packed_commands(&pipe, 0, n).await
            })
            .await?
            .into_iter();
        // A server that does not answer INFO (a proxy, an ACL) is let be:
        // only a version known to be too old is refused.
        let info = match replies.next() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Value::VerbatimString { text, .. }) => text,
            _ => String::new(),
        };
        check_version(&info)?;
        self.inner
            .compare_and_set
            .store(has_set_ifeq(&info), Ordering::Relaxed);
        for reply in replies {
            self.server_reply("load_scripts", reply)?;
        }
        Ok(())
    }

    /// The batcher `claim` and `complete` go through, if any: none on a
    /// server with `IFEQ`, where a fresh message needs no script (a claim
    /// and a completion are a plain command each, cheaper alone than the
    /// batcher's hand-offs; a batch of completions needs the script, for
    /// its all-or-nothing).
    fn batcher(&self) -> Option<&Coalescing<RedisDedupStore>> {
        self.batcher
            .as_ref()
            .filter(|_| !self.inner.compare_and_set.load(Ordering::Relaxed))
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

    fn conn(&self) -> ConnectionManager {
        // A poisoned lock only means a panic while swapping a handle in;
        // the handle itself is whole either way.
        self.inner
            .conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn after(&self) -> Duration {
        self.inner.config.response_timeout()
    }

    /// A reply as the store's answer: a server error in it (a script's
    /// error, `WRONGTYPE`, ...) becomes the store's [`Error`] for `op`.
    fn server_reply(&self, op: &'static str, reply: Value) -> Result<Value, Error> {
        ok_or_server_error(reply).map_err(|e| error::map(op, self.after(), e))
    }

    /// Sends one command under the store's deadline (see [`Self::deadline`]).
    fn send(&self, op: &'static str, cmd: Cmd) -> impl Future<Output = Result<Value, Error>> + '_ {
        let mut conn = self.conn();
        self.deadline(op, async move { conn.send_packed_command(&cmd).await })
    }

    /// Runs one exchange with Redis under the store's deadline and maps
    /// its errors; counts timeouts in a row. A combinator rather than an
    /// `async fn`, which would hold the exchange twice (as its argument and
    /// inside the timeout): a store call's future is boxed, allocated and
    /// copied on every call, so its size costs.
    fn deadline<'a, T: 'a>(
        &'a self,
        op: &'static str,
        exchange: impl Future<Output = RedisResult<T>> + 'a,
    ) -> impl Future<Output = Result<T, Error>> + 'a {
        let after = self.after();
        tokio::time::timeout(after, exchange).map(move |outcome| self.outcome(op, after, outcome))
    }

    /// What an exchange under [`Self::deadline`] answers.
    fn outcome<T>(
        &self,
        op: &'static str,
        after: Duration,
        outcome: Result<RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, Error> {
        let err = match outcome {
            Ok(Ok(value)) => {
                if self.inner.timeouts_in_a_row.load(Ordering::Relaxed) != 0 {
                    self.inner.timeouts_in_a_row.store(0, Ordering::Relaxed);
                }
                return Ok(value);
            }
            Ok(Err(e)) => error::map(op, after, e),
            Err(_) => error::timeout(op, after),
        };
        if matches!(err, Error::Timeout { .. }) {
            self.timed_out();
        }
        Err(err)
    }

    fn timed_out(&self) {
        let limit = self.inner.config.reconnect_after_timeouts();
        let Some((client, manager_config)) = &self.inner.reopen else {
            return;
        };
        let seen = self.inner.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if limit == 0 || seen < limit {
            return;
        }
        // One of the concurrent callers that crossed the limit replaces it.
        if self
            .inner
            .timeouts_in_a_row
            .compare_exchange(seen, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone()) {
            Ok(fresh) => {
                tracing::warn!(
                    target: "idemq_redis",
                    redis = %self.inner.target,
                    timeouts = seen,
                    "redis stopped answering; replacing the connection"
                );
                *self.inner.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
            Err(e) => tracing::warn!(
                target: "idemq_redis",
                redis = %self.inner.target,
                error = %e,
                "could not open a replacement redis connection"
            ),
        }
    }

    /// Runs one script call; when Redis does not have the script (the
    /// `NOSCRIPT` call did not run) sends it again as `EVAL` with the source.
    async fn eval(&self, op: &'static str, script: &Lua, cmd: Cmd) -> Result<Value, Error> {
        let mut conn = self.conn();
        self.deadline(op, async move {
            let reply = conn.send_packed_command(&cmd).await?;
            if !is_noscript(&reply) {
                return ok_or_server_error(reply);
            }
            ok_or_server_error(conn.send_packed_command(&script.as_eval(&cmd)).await?)
        })
        .await
    }

    /// Runs many calls of one script in one pipeline; the calls Redis
    /// refused with `NOSCRIPT` (and so did not run) are sent again as `EVAL`
    /// with the source, in a second pipeline. Server errors stay in the
    /// replies.
    async fn eval_many(
        &self,
        op: &'static str,
        script: &Lua,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<Value>, Error> {
        let mut conn = self.conn();
        self.deadline(op, async move {
            let mut pipe = redis::pipe();
            for cmd in &cmds {
                pipe.add_command(cmd.clone());
            }
            let mut replies = conn.send_packed_commands(&pipe, 0, cmds.len()).await?;
            let missing: Vec<usize> = (0..replies.len())
                .filter(|&i| is_noscript(&replies[i]))
                .collect();
            if missing.is_empty() {
                return Ok(replies);
            }
            let mut again = redis::pipe();
            for &i in &missing {
                if let Some(cmd) = cmds.get(i) {
                    again.add_command(script.as_eval(cmd));
                }
            }
            let retried = conn.send_packed_commands(&again, 0, again.len()).await?;
            for (i, reply) in missing.into_iter().zip(retried) {
                if let Some(slot) = replies.get_mut(i) {
                    *slot = reply;
                }
            }
            Ok(replies)
        })
        .await
    }

    /// Runs the calls of one batch: a lone call as [`Self::eval`], more in
    /// one pipeline as [`Self::eval_many`]. Server errors stay in the
    /// replies.
    async fn eval_batch(
        &self,
        op: &'static str,
        script: &Lua,
        mut cmds: Vec<Cmd>,
    ) -> Result<Vec<Value>, Error> {
        if cmds.len() == 1
            && let Some(cmd) = cmds.pop()
        {
            return Ok(vec![self.eval(op, script, cmd).await?]);
        }
        let n = cmds.len();
        let replies = self.eval_many(op, script, cmds).await?;
        expect_len(op, &replies, n)?;
        Ok(replies)
    }

    /// One call of `claim.lua` over `keys` (checked), `tokens[i]` for
    /// `keys[i]`.
    fn claim_cmd<K: AsRef<str>>(
        &self,
        scope: &str,
        keys: &[K],
        tokens: &[LeaseToken],
        ttl: ClaimTtl,
    ) -> Cmd {
        let mut cmd = scripts::CLAIM.evalsha(keys.len());
        for key in keys {
            cmd.arg(self.key_unchecked(scope, key.as_ref()));
        }
        let (life, lease, slack) = claim_ms(ttl);
        cmd.arg(life).arg(lease).arg(slack);
        for token in tokens {
            cmd.arg(token.to_string());
        }
        cmd
    }

    /// Claims `keys` (checked) with `claim.lua`, `tokens[i]` for `keys[i]`:
    /// one script call per [`MAX_KEYS_PER_CALL`] keys, in one pipeline.
    async fn claim_scripted(
        &self,
        op: &'static str,
        scope: &str,
        keys: &[&str],
        tokens: &[LeaseToken],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        let chunks = || {
            keys.chunks(MAX_KEYS_PER_CALL)
                .zip(tokens.chunks(MAX_KEYS_PER_CALL))
        };
        let cmds = chunks()
            .map(|(keys, tokens)| self.claim_cmd(scope, keys, tokens, ttl))
            .collect();
        let replies = self.eval_batch(op, &scripts::CLAIM, cmds).await?;
        let mut claims = Vec::with_capacity(keys.len());
        for (reply, (keys, tokens)) in replies.into_iter().zip(chunks()) {
            let reply = self.server_reply(op, reply)?;
            claims.extend(parse_claims(op, reply, scope, keys, tokens)?);
        }
        Ok(claims)
    }

    /// Deletes the records a `claim_many` created, each only while it
    /// still holds the value written (`lua/unclaim.lua`); for a batch that
    /// failed after its fresh claims went through. Best effort: a failure
    /// is logged, and the claims then lapse with their lease.
    async fn unclaim(&self, fresh: &[(String, Vec<u8>)]) {
        let cmds = fresh
            .chunks(MAX_KEYS_PER_CALL)
            .map(|chunk| {
                let mut cmd = scripts::UNCLAIM.evalsha(chunk.len());
                for (record, _) in chunk {
                    cmd.arg(record);
                }
                for (_, value) in chunk {
                    cmd.arg(value);
                }
                cmd
            })
            .collect();
        let replies = self.eval_batch("claim_many", &scripts::UNCLAIM, cmds).await;
        let failed = match replies {
            Ok(replies) => replies
                .into_iter()
                .find_map(|reply| self.server_reply("claim_many", reply).err()),
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            tracing::warn!(
                target: "idemq_redis",
                redis = %self.inner.target,
                error = %e,
                claims = fresh.len(),
                "could not take back the fresh claims of a failed claim_many; \
                 they lapse with their lease"
            );
        }
    }

    /// One call of `settle.lua` over `leases` (checked): writes `state`.
    /// Each lease goes as the start of its claim record,
    /// `c:<token>:<attempt>:`, and the record to write in its place,
    /// `<state>:<token>:<attempt>:0`.
    fn settle_cmd(&self, state: &str, leases: &[Lease], keep_for: Duration) -> Cmd {
        let mut cmd = scripts::SETTLE.evalsha(leases.len());
        for lease in leases {
            cmd.arg(self.key_unchecked(&lease.scope, &lease.key));
        }
        cmd.arg(ms(keep_for));
        for lease in leases {
            command::settle_args(&mut cmd, state, lease);
        }
        cmd
    }

    /// `complete` or `bury` of one lease.
    async fn settle(
        &self,
        op: &'static str,
        state: &str,
        lease: &Lease,
        keep_for: Duration,
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        if let Some(fenced) = self.settle_if_equal(op, state, lease, keep_for).await? {
            return Ok(fenced);
        }
        let cmd = self.settle_cmd(state, std::slice::from_ref(lease), keep_for);
        let reply = self.eval(op, &scripts::SETTLE, cmd).await?;
        parse_fenced(op, reply)
    }

    /// `complete` or `bury` of one lease (checked) as one plain command,
    /// on a server that takes `SET ... IFEQ`: `SET <key> <new record> IFEQ
    /// <the claim as written> PX <keep_for> GET`. Answers `None` when that
    /// cannot decide (no `IFEQ`, a record to delete, an unknown slack, or
    /// a reply that is the caller's claim with another slack, or not a
    /// record), and the script then does.
    async fn settle_if_equal(
        &self,
        op: &'static str,
        state: &str,
        lease: &Lease,
        keep_for: Duration,
    ) -> Result<Option<Fenced>, Error> {
        let slack = self.inner.last_slack.load(Ordering::Relaxed);
        let keep = ms(keep_for);
        if !self.inner.compare_and_set.load(Ordering::Relaxed) || slack == NO_SLACK || keep < 1 {
            return Ok(None);
        }
        let prefix = self.inner.config.prefix();
        let (cmd, expected) = command::settle_if_equal(prefix, lease, state, slack, keep);
        let reply = self.send(op, cmd).await?;
        Ok(read_settled_if_equal(&reply, &expected, state))
    }

    async fn fenced(
        &self,
        op: &'static str,
        script: &Lua,
        lease: &Lease,
        arg: impl redis::ToRedisArgs,
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        let mut cmd = script.evalsha(1);
        cmd.arg(self.key_unchecked(&lease.scope, &lease.key))
            .arg(lease.token.to_string())
            .arg(arg);
        let reply = self.eval(op, script, cmd).await?;
        parse_fenced(op, reply)
    }
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        if let Some(batcher) = self.batcher() {
            return batcher.claim(scope, key, ttl).await;
        }
        key::check(scope, key)?;
        let token = LeaseToken::random();
        let (life, _, slack) = claim_ms(ttl);
        self.note_slack(slack);
        let prefix = self.inner.config.prefix();
        let cmd = command::fresh_claim(prefix, scope, key, token, slack, life);
        let reply = self.send("claim", cmd).await?;
        if let Some(claim) = read_fresh_claim(&reply, scope, key, token) {
            return Ok(claim);
        }
        // A redelivery, a retry or a takeover: boxed, so the future of the
        // usual path (boxed and copied on every call) stays small.
        Box::pin(self.claim_scripted("claim", scope, &[key], &[token], ttl))
            .await?
            .pop()
            .ok_or_else(|| error::unexpected("claim", "no answer".into()))
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.fenced("renew", &scripts::RENEW, lease, ms(extend))
            .await
    }

    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        if let Some(batcher) = self.batcher() {
            return batcher.complete(lease, keep_for).await;
        }
        self.settle("complete", DONE, lease, keep_for).await
    }

    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        let refund = match release {
            Release::CountAttempt => "0",
            Release::RefundAttempt => "1",
        };
        self.fenced("fail", &scripts::FAIL, lease, refund).await
    }

    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.settle("bury", DEAD, lease, keep_for).await
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        key::check(scope, key)?;
        let mut cmd = scripts::GET.evalsha(1);
        cmd.arg(self.key_unchecked(scope, key));
        let reply = self.eval("get", &scripts::GET, cmd).await?;
        parse_record("get", reply)
    }

    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        key::check(&lease.scope, &lease.key)?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key_unchecked(&lease.scope, &lease.key));
        let reply = self.send("lease_state", cmd).await?;
        match self.server_reply("lease_state", reply)? {
            Value::Nil => Ok(None),
            Value::BulkString(old) => {
                let Some((state, token, _)) = record::fields(&old) else {
                    return Err(error::unexpected(
                        "lease_state",
                        "the key holds a string that is not a dedup record".into(),
                    ));
                };
                if token != lease.token.to_string() {
                    return Ok(None);
                }
                Ok(record::state(state.as_bytes()))
            }
            other => Err(error::unexpected(
                "lease_state",
                format!("GET answered {other:?}"),
            )),
        }
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        key::check(scope, key)?;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key_unchecked(scope, key));
        let reply = self.send("forget", cmd).await?;
        match self.server_reply("forget", reply)? {
            Value::Int(n) => Ok(n > 0),
            other => Err(error::unexpected(
                "forget",
                format!("DEL answered {other:?}"),
            )),
        }
    }

    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        key::check(scope, key)?;
        let mut cmd = scripts::REVIVE.evalsha(1);
        cmd.arg(self.key_unchecked(scope, key));
        let reply = self.eval("revive", &scripts::REVIVE, cmd).await?;
        parse_revival(reply)
    }

    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        for key in keys {
            key::check(scope, key)?;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::random()).collect();
        let (life, _, slack) = claim_ms(ttl);
        self.note_slack(slack);
        let prefix = self.inner.config.prefix();
        let mut pipe = redis::pipe();
        for (key, &token) in keys.iter().zip(&tokens) {
            pipe.add_command(command::fresh_claim(prefix, scope, key, token, slack, life));
        }
        let mut conn = self.conn();
        let n = keys.len();
        let replies = self
            .deadline("claim_many", async move {
                conn.send_packed_commands(&pipe, 0, n).await
            })
            .await?;
        expect_len("claim_many", &replies, n)?;
        let mut claims = Vec::with_capacity(n);
        let mut rest = Vec::new();
        for (i, (reply, (key, &token))) in replies.iter().zip(keys.iter().zip(&tokens)).enumerate()
        {
            let claim = read_fresh_claim(reply, scope, key, token);
            if claim.is_none() {
                rest.push(i);
            }
            claims.push(claim);
        }
        if !rest.is_empty() {
            let rest_keys: Vec<&str> = rest.iter().map(|&i| keys[i].as_str()).collect();
            let rest_tokens: Vec<LeaseToken> = rest.iter().map(|&i| tokens[i]).collect();
            match self
                .claim_scripted("claim_many", scope, &rest_keys, &rest_tokens, ttl)
                .await
            {
                Ok(answers) => {
                    for (&i, answer) in rest.iter().zip(answers) {
                        claims[i] = Some(answer);
                    }
                }
                Err(e) => {
                    // Redis answered: the script changed nothing, so the
                    // batch changes nothing once its fresh claims go.
                    if matches!(e, Error::Backend { .. }) {
                        // What the pipeline wrote for the keys it found
                        // absent: record key and value.
                        let fresh: Vec<(String, Vec<u8>)> = replies
                            .iter()
                            .zip(keys.iter().zip(&tokens))
                            .filter(|(reply, _)| matches!(reply, Value::Nil))
                            .map(|(_, (key, &token))| {
                                (
                                    self.key_unchecked(scope, key),
                                    record::fresh_claim(token, slack),
                                )
                            })
                            .collect();
                        self.unclaim(&fresh).await;
                    }
                    return Err(e);
                }
            }
        }
        claims
            .into_iter()
            .collect::<Option<Vec<Claim>>>()
            .ok_or_else(|| error::unexpected("claim_many", "a key without an answer".into()))
    }

    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        for lease in leases {
            key::check(&lease.scope, &lease.key)?;
        }
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = leases
            .chunks(MAX_KEYS_PER_CALL)
            .map(|chunk| self.settle_cmd(DONE, chunk, keep_for))
            .collect();
        let replies = self
            .eval_batch("complete_many", &scripts::SETTLE, cmds)
            .await?;
        let mut fenced = Vec::with_capacity(leases.len());
        for (reply, chunk) in replies.into_iter().zip(leases.chunks(MAX_KEYS_PER_CALL)) {
            let reply = self.server_reply("complete_many", reply)?;
            fenced.extend(parse_settled("complete_many", reply, chunk.len())?);
        }
        Ok(fenced)
    }
}

fn manager_config(config: &RedisConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.response_timeout()))
        .set_connection_timeout(Some(config.connection_timeout()))
        .set_max_delay(MAX_RECONNECT_DELAY)
}

fn is_tls(url: &str) -> bool {
    let scheme = url.split("://").next().unwrap_or_default();
    scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
}

/// rustls needs a process-wide crypto provider; install ring's unless the
/// application installed one already.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: one is in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The oldest Redis the store runs on: `SET` took `NX` and `GET` together
/// from 7.0 on (and `PEXPIRETIME` came with it).
const MIN_REDIS: (u32, u32) = (7, 0);

/// Refuses a server whose `INFO server` names a version older than
/// [`MIN_REDIS`]; lets anything it cannot read pass.
fn check_version(info: &str) -> Result<(), Error> {
    let Some(version) = info_field(info, "redis_version:") else {
        return Ok(());
    };
    if major_minor(version).is_some_and(|v| v < MIN_REDIS) {
        return Err(Error::Config(format!(
            "Redis {version} is too old: idemq-redis needs Redis {}.{} or later (SET ... NX GET)",
            MIN_REDIS.0, MIN_REDIS.1
        )));
    }
    Ok(())
}

/// Milliseconds for Redis: rounded up, so a short lease never becomes 0,
/// and capped at [`MAX_MS`].
fn ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(MAX_MS).min(MAX_MS)
}

/// Life, lease and slack of a claim, ms, as `claim.lua` takes them: the
/// record lives `max(lease, retain, 1)` and outlives its lease by the
/// slack.
fn claim_ms(ttl: ClaimTtl) -> (u64, u64, u64) {
    let lease = ms(ttl.lease);
    let life = lease.max(ms(ttl.retain)).max(1);
    (life, lease, life - lease)
}

/// Reads what the `SET NX PX GET` of [`command::fresh_claim`] answered when
/// that decides the claim: nil (the key was absent: claimed, attempt 1), or
/// a done or dead record. `None` for anything else, which `claim.lua`
/// decides: a claimed or released record (its lease may have lapsed), or
/// something that is not a record (which it refuses with a clear error).
fn read_fresh_claim(reply: &Value, scope: &str, key: &str, token: LeaseToken) -> Option<Claim> {
    match reply {
        Value::Nil => Some(Claim::Claimed(Lease {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token,
            attempt: 1,
        })),
        Value::BulkString(old) => match record::state_letter(old)? {
            DONE => Some(Claim::Done),
            DEAD => Some(Claim::Dead),
            _ => None,
        },
        _ => None,
    }
}

/// What the `SET ... IFEQ <expected> GET` of
/// [`RedisDedupStore::settle_if_equal`] decides from its reply: applied
/// when the key held `expected` (`c:<token>:<attempt>:<slack>`), or held
/// the record this settlement writes (`<state>:<token>:<attempt>:0`: the
/// same lease settled it before and the answer was lost); lease lost when
/// it held nothing or a record that is not the caller's claim (any claim
/// of this lease starts as `expected` does, up to its last `:`). `None`
/// (the script decides) for the caller's claim with another slack, and
/// for anything that is not a record, or not a string.
fn read_settled_if_equal(reply: &Value, expected: &[u8], state: &str) -> Option<Fenced> {
    let mine = expected
        .iter()
        .rposition(|&b| b == b':')
        .map_or(expected, |colon| &expected[..=colon]);
    // `<state>:<token>:<attempt>:0`, compared piece by piece.
    let settled = |old: &[u8]| {
        mine.len() > 1
            && old.len() == state.len() + mine.len()
            && old.starts_with(state.as_bytes())
            && old[state.len()..].starts_with(&mine[1..])
            && old.ends_with(b"0")
    };
    match reply {
        Value::Nil => Some(Fenced::LeaseLost),
        Value::BulkString(old) if old == expected => Some(Fenced::Applied),
        Value::BulkString(old) if old.starts_with(mine) => None,
        Value::BulkString(old) if settled(old) => Some(Fenced::Applied),
        Value::BulkString(old) => record::state_letter(old).map(|_| Fenced::LeaseLost),
        _ => None,
    }
}

/// Whether the server of this `INFO server` takes `SET ... IFEQ`: Valkey
/// 8.1 and later, Redis 8.4 and later. Valkey names itself in
/// `server_name` and `valkey_version` (its `redis_version` stays 7.2.4).
fn has_set_ifeq(info: &str) -> bool {
    let at_least = |name: &str, want: (u32, u32)| {
        info_field(info, name)
            .and_then(major_minor)
            .is_some_and(|v| v >= want)
    };
    if info_field(info, "valkey_version:").is_some() {
        return at_least("valkey_version:", (8, 1));
    }
    info_field(info, "server_name:").is_none_or(|name| name == "redis")
        && at_least("redis_version:", (8, 4))
}

/// The value of the `name` line (`redis_version:`, say) of an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
}

/// The major and minor number of a version such as `7.0.15`.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

fn is_noscript(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

fn ok_or_server_error(reply: Value) -> RedisResult<Value> {
    match reply {
        Value::ServerError(e) => Err(RedisError::from(e)),
        other => Ok(other),
    }
}

fn expect_len(op: &'static str, replies: &[Value], n: usize) -> Result<(), Error> {
    if replies.len() == n {
        Ok(())
    } else {
        Err(error::unexpected(
            op,
            format!("{} replies to {n} commands", replies.len()),
        ))
    }
}

fn int(op: &'static str, v: &Value) -> Result<i64, Error> {
    match v {
        Value::Int(n) => Ok(*n),
        other => Err(error::unexpected(
            op,
            format!("expected an integer, got {other:?}"),
        )),
    }
}

fn ms_duration(n: i64) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(0))
}

/// Reads a reply of `claim.lua` over `keys`: an array of one integer per
/// key, in order, or for one key the integer alone. Anything else is an
/// error.
fn parse_claims<K: AsRef<str>>(
    op: &'static str,
    reply: Value,
    scope: &str,
    keys: &[K],
    tokens: &[LeaseToken],
) -> Result<Vec<Claim>, Error> {
    let items = match reply {
        Value::Int(_) if keys.len() == 1 && tokens.len() == 1 => vec![reply],
        Value::Array(items)
            if items.len() == keys.len() && tokens.len() == keys.len() && keys.len() != 1 =>
        {
            items
        }
        other => {
            return Err(error::unexpected(
                op,
                format!("claim of {} keys answered {other:?}", keys.len()),
            ));
        }
    };
    items
        .iter()
        .zip(keys.iter().zip(tokens))
        .map(|(item, (key, &token))| parse_claim(op, item, scope, key.as_ref(), token))
        .collect()
}

/// Reads one key's answer of `claim.lua`: `4 * attempts` claimed, `1`
/// done, `2` dead, `4 * remaining lease ms + 3` in progress.
fn parse_claim(
    op: &'static str,
    item: &Value,
    scope: &str,
    key: &str,
    token: LeaseToken,
) -> Result<Claim, Error> {
    let n = int(op, item)?;
    match (n, n % 4) {
        (1, _) => Ok(Claim::Done),
        (2, _) => Ok(Claim::Dead),
        (4.., 0) => {
            let attempt = u32::try_from(n / 4).map_err(|_| {
                error::unexpected(op, format!("attempt count out of range: {}", n / 4))
            })?;
            Ok(Claim::Claimed(Lease {
                scope: scope.to_owned(),
                key: key.to_owned(),
                token,
                attempt,
            }))
        }
        (3.., 3) => Ok(Claim::InProgress {
            retry_after: ms_duration(n / 4),
        }),
        _ => Err(error::unexpected(op, format!("claim answered {n}"))),
    }
}

/// Reads a reply of `settle.lua` over `n` keys: an array of one integer
/// per key, or for one key the integer alone.
fn parse_settled(op: &'static str, reply: Value, n: usize) -> Result<Vec<Fenced>, Error> {
    match reply {
        Value::Int(_) if n == 1 => Ok(vec![parse_fenced(op, reply)?]),
        Value::Array(items) if items.len() == n && n != 1 => items
            .into_iter()
            .map(|item| parse_fenced(op, item))
            .collect(),
        other => Err(error::unexpected(
            op,
            format!("{op} of {n} keys answered {other:?}"),
        )),
    }
}

fn parse_fenced(op: &'static str, reply: Value) -> Result<Fenced, Error> {
    match reply {
        Value::Int(1) => Ok(Fenced::Applied),
        Value::Int(0) => Ok(Fenced::LeaseLost),
        other => Err(error::unexpected(op, format!("{op} answered {other:?}"))),
    }
}

/// The state a script answered as a record's state letter.
fn state_letter(op: &'static str, letter: &Value) -> Result<RecordState, Error> {
    match letter {
        Value::BulkString(s) => record::state(s).ok_or_else(|| {
            error::unexpected(
                op,
                format!("unknown record state {:?}", String::from_utf8_lossy(s)),
            )
        }),
        other => Err(error::unexpected(op, format!("record state {other:?}"))),
    }
}

/// `lua/revive.lua`'s reply: `{state, removed, lease ms left}`.
fn parse_revival(reply: Value) -> Result<Revival, Error> {
    const OP: &str = "revive";
    let Value::Array(items) = reply else {
        return Err(error::unexpected(OP, format!("revive answered {reply:?}")));
    };
    let [state, removed, left] = items.as_slice() else {
        return Err(error::unexpected(OP, format!("revive answered {items:?}")));
    };
    let previous = match state {
        Value::BulkString(s) if s.as_slice() == b"-" => None,
        letter => Some(state_letter(OP, letter)?),
    };
    Ok(match (previous, int(OP, removed)?) {
        (previous, 1) => Revival::Revived { previous },
        (Some(RecordState::Done), _) => Revival::Done,
        (Some(RecordState::Claimed), _) => Revival::InProgress {
            retry_after: ms_duration(int(OP, left)?),
        },
        (other, _) => {
            return Err(error::unexpected(
                OP,
                format!("revive left a {other:?} record in place"),
            ));
        }
    })
}

/// Reads a reply of `get.lua`: nil, or `[state letter, attempts, lease ms
/// left, PTTL]`.
fn parse_record(op: &'static str, reply: Value) -> Result<Option<Record>, Error> {
    let items = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        other => return Err(error::unexpected(op, format!("get answered {other:?}"))),
    };
    let [state, attempts, lease_left, pttl] = items.as_slice() else {
        return Err(error::unexpected(op, format!("get answered {items:?}")));
    };
    let state = state_letter(op, state)?;
    let attempts = u32::try_from(int(op, attempts)?)
        .map_err(|_| error::unexpected(op, format!("attempt count out of range: {attempts:?}")))?;
    let lease_left = int(op, lease_left)?;
    let pttl = int(op, pttl)?;
    Ok(Some(Record {
        state,
        attempts,
        lease_remaining: (state == RecordState::Claimed).then(|| ms_duration(lease_left)),
        // A record without expiry is never written by this store; say "never".
        expires_in: if pttl < 0 {
            Duration::MAX
        } else {
            ms_duration(pttl)
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_7_0_are_refused() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        for old in ["6.2.14", "6.0.20", "5.0.14"] {
            let err = check_version(&info(old)).expect_err(old);
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains(old), "{err}");
            assert!(err.to_string().contains("7.0"), "{err}");
        }
        for fine in ["7.0.0", "7.0.15", "7.4.2", "10.0.0"] {
            assert!(check_version(&info(fine)).is_ok(), "{fine}");
        }
        // What it cannot read is let be.
        for unknown in ["", "# Server\r\n", &info("unstable"), &info("7")] {
            assert!(check_version(unknown).is_ok(), "{unknown:?}");
        }
    }

    #[test]
    fn set_ifeq_is_read_off_the_server_name_and_version() {
        let redis = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        let valkey = |v: &str| {
            format!(
                "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:{v}\r\n"
            )
        };
        for yes in [
            redis("8.4.0"),
            redis("9.0.1"),
            valkey("8.1.0"),
            valkey("9.1.2"),
        ] {
            assert!(has_set_ifeq(&yes), "{yes:?}");
        }
        let no = [
            redis("7.0.15"),
            redis("8.2.3"),
            redis("unstable"),
            valkey("8.0.4"),
            valkey("7.2.11"),
            String::new(),
            // Another server that says it is Redis 8.4: its SET may not know IFEQ.
            "# Server\r\nredis_version:8.4.0\r\nserver_name:dragonfly\r\n".to_owned(),
        ];
        for no in no {
            assert!(!has_set_ifeq(&no), "{no:?}");
        }
    }

    #[test]
    fn a_set_ifeq_decides_only_what_it_can() {
        let expected = "c:0000000000000007:2:540000";
        let read = |v: Value| read_settled_if_equal(&v, expected.as_bytes(), "d");
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(read(bulk(expected)), Some(Fenced::Applied));
        // This lease's own done record: a completion retried.
        assert_eq!(read(bulk("d:0000000000000007:2:0")), Some(Fenced::Applied));
        assert_eq!(read(Value::Nil), Some(Fenced::LeaseLost));
        for other in [
            "c:0000000000000008:3:540000",
            "c:0000000000000007:1:540000",
            "r:0000000000000007:2:540000",
            "d:0000000000000007:1:0",
            "d:0000000000000007:2:00",
            "d:0000000000000008:2:0",
            "x:0000000000000007:2:0",
            "x:0000000000000009:5:0",
        ] {
            assert_eq!(read(bulk(other)), Some(Fenced::LeaseLost), "{other}");
        }
        // The caller's claim with another slack (a renewed lease), or not
        // a record: the script decides (and refuses what is no record).
        for undecided in [
            bulk("c:0000000000000007:2:1000"),
            bulk("c:0000000000000007:2:"),
            bulk("not a record"),
            bulk("d:7:2:0:extra"),
            Value::Int(1),
            Value::Okay,
        ] {
            assert_eq!(read(undecided.clone()), None, "{undecided:?}");
        }
    }

    #[test]
    fn milliseconds_round_up_and_cap() {
        assert_eq!(ms(Duration::ZERO), 0);
        assert_eq!(ms(Duration::from_micros(1)), 1);
        assert_eq!(ms(Duration::from_millis(400)), 400);
        assert_eq!(ms(Duration::from_micros(400_001)), 401);
        assert_eq!(ms(Duration::MAX), MAX_MS);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(
            redact_url("redis+unix:///tmp/r.sock?db=1&pass=secret"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
        assert!(is_tls("rediss://h") && is_tls("REDISS://h") && !is_tls("redis://h"));
    }

    #[test]
    fn a_failed_claim_many_takes_back_exactly_what_its_claims_wrote() {
        let token = LeaseToken(0x5f0e_1d2c_3b4a_5968);
        let cmd = command::fresh_claim("p:", "s", "k", token, 30_000, 60_000);
        let written = cmd.args_iter().nth(2).map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes.to_vec(),
            _ => Vec::new(),
        });
        assert_eq!(
            written.as_deref(),
            Some(record::fresh_claim(token, 30_000).as_slice())
        );
    }

    #[test]
    fn a_fresh_claim_decides_only_what_it_can() {
        let token = LeaseToken(7);
        let read = |v: Value| read_fresh_claim(&v, "s", "k", token);
        assert_eq!(
            read(Value::Nil),
            Some(Claim::Claimed(Lease {
                scope: "s".into(),
                key: "k".into(),
                token,
                attempt: 1
            }))
        );
        let old = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(read(old("d:00ff:3:0")), Some(Claim::Done));
        assert_eq!(read(old("x:00ff:9:0")), Some(Claim::Dead));
        // Left to claim.lua: live or lapsed claims, released records, and
        // anything that is not a record (it refuses them with the hint).
        for other in [
            old("c:00ff:1:30000"),
            old("r:00ff:2:30000"),
            old("d:00ff:1700000000000:3"),
            old("d:00ff:3"),
            old("d:00ff:3:0:1"),
            old("d:xyz:3:0"),
            old("d::3:0"),
            old("d:00ff:-3:0"),
            old("done"),
            Value::BulkString(vec![0xff, b':']),
            Value::Okay,
            Value::Int(1),
            Value::Array(vec![]),
        ] {
            assert_eq!(read(other.clone()), None, "{other:?}");
        }
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let token = LeaseToken(7);
        let claim = |n| {
            let mut claims = parse_claims("claim", Value::Int(n), "s", &["k"], &[token])?;
            assert_eq!(claims.len(), 1);
            Ok::<_, Error>(claims.remove(0))
        };
        assert_eq!(
            claim(4 * 3).expect("claimed"),
            Claim::Claimed(Lease {
                scope: "s".into(),
                key: "k".into(),
                token,
                attempt: 3
            })
        );
        assert_eq!(claim(1).expect("done"), Claim::Done);
        assert_eq!(claim(2).expect("dead"), Claim::Dead);
        assert_eq!(
            claim(4 * 1500 + 3).expect("busy"),
            Claim::InProgress {
                retry_after: Duration::from_millis(1500)
            }
        );
        for n in [0, 5, 6, 9, 10, -1, -3, -4, 4 * (1 << 33)] {
            let e = claim(n).expect_err("must be rejected");
            assert!(!e.is_transient());
        }
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(4)]),
            Value::BulkString(b"4".to_vec()),
            Value::Array(vec![Value::Int(4), Value::Int(1)]),
        ] {
            let e = parse_claims("claim", bad, "s", &["k"], &[token]).expect_err("rejected");
            assert!(!e.is_transient());
        }
        for bad in [
            Value::Int(4),
            Value::Array(vec![Value::Int(4)]),
            Value::Array(vec![Value::Int(4), Value::Nil]),
            Value::Array(vec![Value::Int(4), Value::Int(4), Value::Int(4)]),
        ] {
            let e = parse_claims("claim", bad, "s", &["k", "l"], &[token, token])
                .expect_err("rejected");
            assert!(!e.is_transient());
        }
        // Many keys: one answer each, in order.
        let many = parse_claims(
            "claim_many",
            Value::Array(vec![Value::Int(4), Value::Int(4 * 20 + 3), Value::Int(1)]),
            "s",
            &["a", "b", "c"],
            &[LeaseToken(1), LeaseToken(2), LeaseToken(3)],
        )
        .expect("three answers");
        assert_eq!(
            many,
            vec![
                Claim::Claimed(Lease {
                    scope: "s".into(),
                    key: "a".into(),
                    token: LeaseToken(1),
                    attempt: 1
                }),
                Claim::InProgress {
                    retry_after: Duration::from_millis(20)
                },
                Claim::Done,
            ]
        );
        assert_eq!(
            parse_settled(
                "complete_many",
                Value::Array(vec![Value::Int(1), Value::Int(0)]),
                2
            )
            .expect("two answers"),
            vec![Fenced::Applied, Fenced::LeaseLost]
        );
        assert_eq!(
            parse_settled("complete", Value::Int(0), 1).expect("one answer"),
            vec![Fenced::LeaseLost]
        );
        for (bad, n) in [
            (Value::Int(1), 2),
            (Value::Array(vec![Value::Int(1)]), 1),
            (Value::Array(vec![Value::Int(1)]), 2),
            (Value::Array(vec![Value::Int(1), Value::Int(2)]), 2),
        ] {
            assert!(parse_settled("complete", bad, n).is_err());
        }
        assert_eq!(
            parse_fenced("renew", Value::Int(1)).expect("ok"),
            Fenced::Applied
        );
        assert_eq!(
            parse_fenced("renew", Value::Int(0)).expect("ok"),
            Fenced::LeaseLost
        );
        assert!(parse_fenced("renew", Value::Int(2)).is_err());
        assert_eq!(parse_record("get", Value::Nil).expect("absent"), None);
        let record = parse_record(
            "get",
            Value::Array(vec![
                Value::BulkString(b"c".to_vec()),
                Value::Int(2),
                Value::Int(-5),
                Value::Int(1000),
            ]),
        )
        .expect("record")
        .expect("present");
        assert_eq!(
            record,
            Record {
                state: RecordState::Claimed,
                attempts: 2,
                lease_remaining: Some(Duration::ZERO),
                expires_in: Duration::from_secs(1),
            }
        );
        assert!(
            parse_record(
                "get",
                Value::Array(vec![
                    Value::BulkString(b"claimed".to_vec()),
                    Value::Int(2),
                    Value::Int(0),
                    Value::Int(0),
                ]),
            )
            .is_err()
        );
    }
}
