//! The first connection of [`crate::RedisDedupStore::connect_with`]: one
//! attempt, no retries, so a wrong URL, password or database fails at once
//! with what went wrong, in the server's words.
//!
//! A redis [`redis::aio::ConnectionManager`] retries a failed connection in
//! the background (and so does its first one), whatever the reason: a
//! refused port, a wrong password or a database that does not exist all
//! came out as a timeout of the whole `connect`, seconds later. The store
//! opens one plain connection first, bounded by the connection timeout,
//! and only hands over to the manager (whose retries then cover the
//! reconnections) once that connection stood.

use std::fmt;
use std::time::Duration;

use idemq::{Error, SharedError};
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisConnectionInfo, RedisError, Value};

use crate::config::RedisConfig;
use crate::error::{self, BACKEND};

/// Opens one connection to `client`'s server, once (no retries), with the
/// handshake the store's connections make (`AUTH`, `SELECT`), and closes
/// it (after a `PING`, which a server with a password refuses to a client
/// that gave none). Fails with the cause: [`Error::Timeout`] after the
/// configured connection timeout; [`Error::Unavailable`] (transient) for a
/// refused port and other connection trouble; a permanent
/// [`Error::Backend`] for a refused `AUTH`, `SELECT` or `PING` (`NOAUTH`),
/// with the server's words. Every message names `target`, the URL with
/// its password masked.
pub(crate) async fn first_connection(
    client: &Client,
    config: &RedisConfig,
    target: &str,
) -> Result<(), Error> {
    let after = config.connection_timeout();
    // No response timeout of its own: the connection timeout bounds the
    // whole handshake, so a timeout here is always the connection timeout.
    let connection_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(after))
        .set_response_timeout(None);
    let attempt = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&connection_config)
            .await?;
        // A server with a password lets a client without one connect, and
        // refuses its first command.
        let ping = conn.send_packed_command(&redis::cmd("PING")).await;
        Ok::<_, RedisError>(server_words(ping))
    };
    let e = match tokio::time::timeout(after, attempt).await {
        Ok(Ok(Some(words))) if words.starts_with("NOAUTH") => {
            return Err(Error::Backend {
                backend: BACKEND,
                op: "connect",
                transient: false,
                source: SharedError::new(ConnectError {
                    message: format!(
                        "{target}: authentication failed: {words} (the URL gives no password)"
                    ),
                    source: None,
                }),
            });
        }
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => return Err(error::timeout("connect", after)),
    };
    if e.is_timeout() {
        return Err(error::timeout("connect", after));
    }
    if e.is_connection_refusal() {
        return Err(unavailable(format!("{target}: connection refused"), e));
    }
    if e.is_io_error() || e.is_connection_dropped() {
        return Err(unavailable(format!("{target}: {e}"), e));
    }
    // The server answered, and refused the handshake: ask it again, step
    // by step, for its own words (the redis crate keeps only "Password
    // authentication failed" of a refused `AUTH`).
    let refusal = tokio::time::timeout(after, refusal(client, after))
        .await
        .ok()
        .flatten();
    match refusal {
        Some(Refusal::Auth(words)) => Err(refused(
            format!("{target}: authentication failed: {words}"),
            e,
        )),
        Some(Refusal::Select(db, words)) => Err(refused(
            format!("{target}: the server refused to select database {db}: {words}"),
            e,
        )),
        None if is_auth_error(&e) => {
            let words = match (e.code(), e.detail()) {
                (Some(code), Some(detail)) => format!("{code} {detail}"),
                _ => e.to_string(),
            };
            Err(refused(
                format!("{target}: authentication failed: {words}"),
                e,
            ))
        }
        None => Err(with_target(error::map("connect", after, e), target)),
    }
}

/// A refused `AUTH` as the redis crate reports it (RESP2), or the
/// server's refusal of a `HELLO ... AUTH` (RESP3).
fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// What the server said no to in the handshake.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// `AUTH`: the server's words.
    Auth(String),
    /// `SELECT <db>`: the database, and the server's words.
    Select(i64, String),
}

/// Opens a connection without credentials or database (RESP2) and sends
/// the handshake's authentication and `SELECT` one at a time, as the
/// redis crate sends them: `AUTH <user> <password>` (or `AUTH <password>`
/// without a user) for RESP2, `HELLO ... AUTH <user or default>
/// <password>` for RESP3 (as `HELLO 2`, which authenticates the same way
/// and keeps this connection on RESP2). Answers the first refusal; `None`
/// when both pass, or the server could not be asked.
async fn refusal(client: &Client, after: Duration) -> Option<Refusal> {
    let info = client.get_connection_info();
    let settings = info.redis_settings();
    let bare = Client::open(
        info.clone()
            .set_redis_settings(RedisConnectionInfo::default()),
    )
    .ok()?;
    let connection_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(after))
        .set_response_timeout(None);
    let mut conn = bare
        .get_multiplexed_async_connection_with_config(&connection_config)
        .await
        .ok()?;
    if let Some(password) = settings.password() {
        let resp3 = settings.protocol().supports_resp3();
        let mut auth = if resp3 {
            redis::cmd("HELLO")
                .arg(2)
                .arg("AUTH")
                .arg(settings.username().unwrap_or("default"))
                .to_owned()
        } else {
            redis::cmd("AUTH")
        };
        if !resp3 && let Some(user) = settings.username() {
            auth.arg(user);
        }
        auth.arg(password);
        let mut words = server_words(conn.send_packed_command(&auth).await);
        // A server without ACLs (before 6.0) takes `AUTH <password>` only;
        // the redis crate then tries that, and so does this.
        if !resp3
            && settings.username().is_some()
            && words
                .as_deref()
                .is_some_and(|w| w.contains("wrong number of arguments"))
        {
            let auth = redis::cmd("AUTH").arg(password).to_owned();
            words = server_words(conn.send_packed_command(&auth).await);
        }
        if let Some(words) = words {
            return Some(Refusal::Auth(words));
        }
    }
    let db = settings.db();
    if db != 0 {
        let select = redis::cmd("SELECT").arg(db).to_owned();
        if let Some(words) = server_words(conn.send_packed_command(&select).await) {
            return Some(Refusal::Select(db, words));
        }
    }
    None
}

/// The server's error in a reply, as it wrote it (`<CODE> <details>`);
/// `None` for any other reply, or an error that is not the server's.
fn server_words(reply: Result<Value, RedisError>) -> Option<String> {
    let (code, details) = match &reply {
        Ok(Value::ServerError(e)) => (e.code(), e.details()),
        Err(e) => (e.code()?, e.detail()),
        Ok(_) => return None,
    };
    Some(match details {
        Some(details) => format!("{code} {details}"),
        None => code.to_owned(),
    })
}

/// A refused handshake: permanent (the URL, password or database must
/// change first).
fn refused(message: String, source: RedisError) -> Error {
    Error::Backend {
        backend: BACKEND,
        op: "connect",
        transient: false,
        source: SharedError::new(ConnectError {
            message,
            source: Some(SharedError::new(source)),
        }),
    }
}

fn unavailable(message: String, source: RedisError) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        op: "connect",
        source: SharedError::new(ConnectError {
            message,
            source: Some(SharedError::new(source)),
        }),
    }
}

/// `err` with `target` (the redacted URL) put before its source's message.
fn with_target(err: Error, target: &str) -> Error {
    err.map_source(|source| {
        SharedError::new(ConnectError {
            message: format!("{target}: {source}"),
            source: Some(source),
        })
    })
}

/// What went wrong connecting, in words; the client library's error, if
/// any, as its source.
#[derive(Debug)]
struct ConnectError {
    message: String,
    source: Option<SharedError>,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_words_are_code_and_details() {
        let wrongpass = redis::make_extension_error(
            "WRONGPASS".into(),
            Some("invalid username-password pair or user is disabled.".into()),
        );
        assert_eq!(
            server_words(Err(wrongpass)).as_deref(),
            Some("WRONGPASS invalid username-password pair or user is disabled.")
        );
        assert_eq!(server_words(Ok(Value::Okay)), None);
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(server_words(Err(io)), None);
    }

    #[test]
    fn the_target_goes_before_the_cause() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let e = with_target(
            error::map("connect", Duration::from_secs(1), io),
            "redis://u:***@h:1",
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("redis: connect failed, backend unavailable: redis://u:***@h:1: "),
            "{e}"
        );
    }
}
