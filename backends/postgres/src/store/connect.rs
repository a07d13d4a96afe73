//! Connecting pools, and bounding calls with the operation timeout.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgConnection, PgPool};

use idemq::Error;

use crate::error::{BACKEND, connect_failed, from_sqlx};

/// `fut` within `limit` (when there is one), its error mapped: a
/// timeout is [`Error::Timeout`] (transient).
pub(crate) async fn bounded<T>(
    limit: Option<Duration>,
    op: &'static str,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Error> {
    match limit {
        None => fut.await.map_err(|e| from_sqlx(op, e)),
        Some(after) => match tokio::time::timeout(after, fut).await {
            Ok(r) => r.map_err(|e| from_sqlx(op, e)),
            Err(_) => Err(Error::Timeout {
                backend: BACKEND,
                op,
                after,
            }),
        },
    }
}

/// `postgres://user@host:port/db`, built from the options: no password.
pub(super) fn describe(o: &PgConnectOptions) -> String {
    let db = o.get_database().unwrap_or("");
    match o.get_socket() {
        Some(socket) => format!("postgres://{}@{}/{db}", o.get_username(), socket.display()),
        None => format!(
            "postgres://{}@{}:{}/{db}",
            o.get_username(),
            o.get_host(),
            o.get_port()
        ),
    }
}

/// How long [`PostgresDedupStore::connect`](super::PostgresDedupStore::connect) waits for its first
/// connection; also the acquire timeout of the pool it builds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool of [`PostgresDedupStore::connect`], after one plain connection
/// that stood (its errors mapped by [`connect_failed`]).
pub(super) async fn connect_pool(url: &str, target: &str) -> Result<PgPool, Error> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::invalid("postgres url", format!("{target}: {e}")))?;
    let ssl_mode = ssl_mode_name(options.get_ssl_mode());
    let first = async {
        let conn = PgConnection::connect_with(&options).await?;
        // Only a courtesy to the server: the connection stood.
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, first).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(connect_failed(target, ssl_mode, e)),
        Err(_) => {
            return Err(Error::Timeout {
                backend: BACKEND,
                op: "connect",
                after: CONNECT_TIMEOUT,
            });
        }
    }
    PgPoolOptions::new()
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| connect_failed(target, ssl_mode, e))
}

/// `sslmode` as a URL writes it.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}
