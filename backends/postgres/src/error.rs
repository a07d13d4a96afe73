//! Mapping sqlx errors onto [`idemq::Error`] and [`HandlerError`].

use std::fmt;

use idemq::{BoxError, Error, HandlerError, SharedError};

/// The backend name every error of this crate carries.
pub(crate) const BACKEND: &str = "postgres";

/// True when the same call may succeed later: connection trouble, pool
/// timeouts, serialization failures, deadlocks, server shutdown or
/// overload, lock or statement timeouts.
pub(crate) fn sqlx_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| sqlstate_is_transient(&c)),
        _ => false,
    }
}

/// SQLSTATEs worth retrying.
fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, ...)
        || matches!(
            code,
            "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available (lock_timeout)
                | "57014" // query_canceled (statement_timeout)
                | "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
                | "25006" // read_only_sql_transaction (after a failover)
        )
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// Maps a sqlx error from operation `op` onto [`Error`].
pub(crate) fn from_sqlx(op: &'static str, e: sqlx::Error) -> Error {
    if matches!(e, sqlx::Error::PoolClosed) {
        return Error::Closed { backend: BACKEND };
    }
    if is_unavailable(&e) {
        return Error::Unavailable {
            backend: BACKEND,
            op,
            source: SharedError::new(e),
        };
    }
    Error::Backend {
        backend: BACKEND,
        op,
        transient: sqlx_is_transient(&e),
        source: SharedError::new(e),
    }
}

/// `map_err` shorthand: `.map_err(op("claim"))`.
pub(crate) fn op(op: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| from_sqlx(op, e)
}

/// A backend error with a message of our own.
pub(crate) fn backend(op: &'static str, transient: bool, msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND,
        op,
        transient,
        source: SharedError::new(Message(msg.into())),
    }
}

/// A plain error message (used where the original error had to be dropped,
/// e.g. because it could have contained a password).
#[derive(Debug)]
pub(crate) struct Message(pub(crate) String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

/// A message of our own in front of the error it explains (kept as the
/// source, for callers that walk the chain).
#[derive(Debug)]
pub(crate) struct Explained {
    message: String,
    source: SharedError,
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Explained {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Maps the error of connecting to `target` (the URL with its password
/// masked) with the URL's `sslmode`, naming the target and saying what
/// happened: `connection refused`, the server's own words for a refused
/// login (a database or role that does not exist, a wrong password), with
/// their SQLSTATE, or, for a URL that asks for TLS from a build without it,
/// the feature to enable.
pub(crate) fn connect_failed(target: &str, ssl_mode: &str, e: sqlx::Error) -> Error {
    let message = match &e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("{target}: connection refused")
        }
        sqlx::Error::Tls(tls) if tls.to_string().contains("without TLS support") => {
            return Error::Config(format!(
                "{target} asks for TLS (sslmode={ssl_mode}), but idemq-postgres was built \
                 without TLS support: enable its `tls-rustls` feature \
                 (idemq-postgres = {{ features = [\"tls-rustls\"] }}), or connect with \
                 sslmode=prefer or sslmode=disable"
            ));
        }
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{target}: {} (SQLSTATE {code})", db.message()),
            None => format!("{target}: {}", db.message()),
        },
        other => format!("{target}: {other}"),
    };
    from_sqlx("connect", e).map_source(|source| SharedError::new(Explained { message, source }))
}

/// Turns a sqlx error met inside a handler into a [`HandlerError`]:
/// data errors (SQLSTATE class 22, "data exception") and integrity
/// violations (class 23: unique, foreign key, check, not-null) can never
/// succeed on a retry and become [`HandlerError::Permanent`] (the message
/// is dead-lettered); everything else becomes [`HandlerError::Retry`].
///
/// ```
/// # use idemq::HandlerError;
/// # async fn f(tx: &mut sqlx::PgConnection) -> Result<(), HandlerError> {
/// sqlx::query("INSERT INTO orders (id) VALUES ($1)")
///     .bind(42_i64)
///     .execute(&mut *tx)
///     .await
///     .map_err(idemq_postgres::sql_error)?;
/// # Ok(()) }
/// ```
pub fn sql_error(e: sqlx::Error) -> HandlerError {
    let permanent = match &e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    };
    if permanent {
        HandlerError::Permanent(Box::new(e))
    } else {
        HandlerError::Retry(Box::new(e))
    }
}

/// Wraps an [`Error`] as a retryable handler error.
pub(crate) fn retry(e: Error) -> HandlerError {
    HandlerError::Retry(Box::new(e) as BoxError)
}

/// Scrubs `secret` out of an error before it goes anywhere: when any level
/// of the error's chain mentions it, the whole chain is replaced by its
/// text with the secret masked (the source is lost, the secret is not
/// shown); otherwise the error is kept as it is.
pub(crate) fn scrub(e: Error, secrets: &[String]) -> Error {
    let secrets: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    if secrets.is_empty() {
        return e;
    }
    let mut chain = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(&e);
    while let Some(err) = cur {
        chain.push(err.to_string());
        chain.push(format!("{err:?}"));
        cur = err.source();
    }
    if !chain.iter().any(|t| secrets.iter().any(|s| t.contains(s))) {
        return e;
    }
    let mut text = chain
        .iter()
        .step_by(2)
        .cloned()
        .collect::<Vec<_>>()
        .join(": ");
    for s in &secrets {
        text = text.replace(s, "***");
    }
    let transient = e.is_transient();
    Error::Backend {
        backend: BACKEND,
        op: "connect",
        transient,
        source: SharedError::new(Message(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sqlstates() {
        for c in [
            "08006", "08001", "40001", "40P01", "57P01", "53300", "55P03",
        ] {
            assert!(sqlstate_is_transient(c), "{c}");
        }
        for c in ["23505", "42P01", "22001", "42601"] {
            assert!(!sqlstate_is_transient(c), "{c}");
        }
    }

    #[test]
    fn maps_connection_errors_to_transient() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let e = from_sqlx("claim", io);
        assert!(matches!(
            e,
            Error::Unavailable {
                backend: "postgres",
                op: "claim",
                ..
            }
        ));
        assert!(e.is_transient());
        assert!(from_sqlx("claim", sqlx::Error::PoolTimedOut).is_transient());
        assert!(matches!(
            from_sqlx("claim", sqlx::Error::PoolClosed),
            Error::Closed {
                backend: "postgres"
            }
        ));
        let decode = from_sqlx("get", sqlx::Error::ColumnNotFound("x".into()));
        assert!(matches!(
            decode,
            Error::Backend {
                transient: false,
                ..
            }
        ));
    }

    #[test]
    fn connect_errors_say_what_happened() {
        let target = "postgres://u:***@h:1/db";
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = connect_failed(target, "prefer", refused);
        assert!(
            matches!(e, Error::Unavailable { op: "connect", .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "postgres: connect failed, backend unavailable: postgres://u:***@h:1/db: connection refused"
        );
        let no_tls = sqlx::Error::Tls(
            "TLS upgrade required by connect options but SQLx was built without TLS support enabled"
                .into(),
        );
        let e = connect_failed(target, "require", no_tls);
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        assert!(e.to_string().contains("`tls-rustls` feature"), "{e}");
        assert!(!e.is_transient());
        // A real TLS failure is left as it is (transient), with the target.
        let e = connect_failed(
            target,
            "require",
            sqlx::Error::Tls("handshake failed".into()),
        );
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.to_string().ends_with(&format!("{target}: error occurred while attempting to establish a TLS connection: handshake failed")), "{e}");
    }

    #[test]
    fn scrubs_secrets() {
        let e = backend("connect", true, "could not use hunter22 for user");
        let s = scrub(e, &["hunter22".into()]);
        assert!(!s.to_string().contains("hunter22"), "{s}");
        assert!(!format!("{s:?}").contains("hunter22"));
        assert!(s.is_transient());
        let clean = scrub(
            backend("connect", false, "nothing here"),
            &["hunter22".into()],
        );
        assert!(clean.to_string().contains("nothing here"));
    }
}
