//! The store's connection and deadlines: opening it (one diagnosed
//! attempt first, see `first_connection.rs`), sending commands, pipelines
//! and scripts under [`RedisConfig::response_timeout`], and replacing a
//! connection that stopped answering.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use idemq::Error;
use idemq::error::redact_url;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Cmd, RedisError, RedisResult, ServerErrorKind, Value};

use super::first_connection;
use super::reply::expect_len;
use super::{Inner, NO_SLACK, RedisDedupStore};
use crate::config::RedisConfig;
use crate::error;
use crate::scripts::Lua;

/// Longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

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
        first_connection::first_connection(&client, &config, &target).await?;
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

    pub(super) fn build(
        manager: ConnectionManager,
        reopen: Option<(Client, ConnectionManagerConfig)>,
        config: RedisConfig,
        target: String,
    ) -> Self {
        RedisDedupStore {
            inner: Arc::new(Inner {
                conn: RwLock::new(manager),
                reopen,
                timeouts_in_a_row: AtomicU32::new(0),
                config,
                target,
                compare_and_set: AtomicBool::new(false),
                last_slack: AtomicU64::new(NO_SLACK),
            }),
        }
    }

    /// Sends `PING`; succeeds when Redis answers within the response
    /// timeout.
    pub async fn ping(&self) -> Result<(), Error> {
        let reply = self.send("ping", redis::cmd("PING")).await?;
        self.server_reply("ping", reply).map(drop)
    }

    pub(super) fn conn(&self) -> ConnectionManager {
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
    pub(super) fn server_reply(&self, op: &'static str, reply: Value) -> Result<Value, Error> {
        ok_or_server_error(reply).map_err(|e| error::map(op, self.after(), e))
    }

    /// Sends one command under the store's deadline (see [`Self::deadline`]).
    pub(super) fn send(
        &self,
        op: &'static str,
        cmd: Cmd,
    ) -> impl Future<Output = Result<Value, Error>> + '_ {
        let mut conn = self.conn();
        self.deadline(op, async move { conn.send_packed_command(&cmd).await })
    }

    /// Runs one exchange with Redis under the store's deadline and maps
    /// its errors; counts timeouts in a row. A combinator rather than an
    /// `async fn`, which would hold the exchange twice (as its argument and
    /// inside the timeout): a store call's future is boxed, allocated and
    /// copied on every call, so its size costs.
    pub(super) fn deadline<'a, T: 'a>(
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
    pub(super) async fn eval(
        &self,
        op: &'static str,
        script: &Lua,
        cmd: Cmd,
    ) -> Result<Value, Error> {
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
    pub(super) async fn eval_many(
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
    pub(super) async fn eval_batch(
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

fn is_noscript(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript))
}

fn ok_or_server_error(reply: Value) -> RedisResult<Value> {
    match reply {
        Value::ServerError(e) => Err(RedisError::from(e)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
