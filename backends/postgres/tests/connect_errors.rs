//! A wrong URL, database or user makes `connect` fail at once, with what
//! happened in the server's words, and never with the password: not as a
//! pool timeout, seconds later.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use idemq::Error;
use idemq_postgres::{CONNECT_TIMEOUT, PostgresDedupStore};
use sqlx::postgres::PgConnectOptions;

const SECRET: &str = "idemq-pg-pw-6a1d";

/// "At once": a generous bound, half of [`CONNECT_TIMEOUT`] (5 s), which
/// is what `connect` waits at most.
const AT_ONCE: Duration = Duration::from_millis(CONNECT_TIMEOUT.as_millis() as u64 / 2);

/// `connect(url)`'s error and how long it took to come.
async fn refusal(url: &str) -> (Error, Duration) {
    let started = Instant::now();
    let err = PostgresDedupStore::connect(url)
        .await
        .expect_err("connect must fail");
    (err, started.elapsed())
}

/// The whole text of `err`: its message, its `Debug` and its sources'.
fn everything_shown(err: &Error) -> String {
    let mut text = format!("{err}\n{err:?}");
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text.push_str(&format!("\n{e}\n{e:?}"));
        source = e.source();
    }
    text
}

fn assert_no_secret(err: &Error) {
    assert!(!everything_shown(err).contains(SECRET), "{err:?}");
}

/// Host and port of the test database, once it is known to answer;
/// `None` (skip) when it does not.
async fn server() -> Option<(String, u16)> {
    common::pool().await?;
    let options: PgConnectOptions = common::url().parse().expect("DATABASE_URL parses");
    Some((options.get_host().to_owned(), options.get_port()))
}

/// The test database's user.
fn user() -> String {
    let options: PgConnectOptions = common::url().parse().expect("DATABASE_URL parses");
    options.get_username().to_owned()
}

/// A permanent refusal of the login, from `connect`, at once, with the
/// URL without its password, and `expected`.
fn assert_login_refused(err: &Error, took: Duration, expected: &str) {
    assert!(
        matches!(
            err,
            Error::Backend {
                backend: "postgres",
                op: "connect",
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), expected);
    assert_no_secret(err);
    assert!(took < AT_ONCE, "took {took:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_says_so_at_once() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port();
    let (err, took) = refusal(&format!(
        "postgres://postgres:{SECRET}@127.0.0.1:{port}/test"
    ))
    .await;
    assert!(
        matches!(
            err,
            Error::Unavailable {
                backend: "postgres",
                op: "connect",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "postgres: connect failed, backend unavailable: \
             postgres://postgres:***@127.0.0.1:{port}/test: connection refused"
        )
    );
    assert_no_secret(&err);
    assert!(took < AT_ONCE, "took {took:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_database_is_named() {
    let Some((host, port)) = server().await else {
        return;
    };
    let user = user();
    let db = format!("idemq_no_such_db_{:08x}", rand::random::<u32>());
    let (err, took) = refusal(&format!("postgres://{user}:{SECRET}@{host}:{port}/{db}")).await;
    assert_login_refused(
        &err,
        took,
        &format!(
            "postgres: connect failed: postgres://{user}:***@{host}:{port}/{db}: \
             database \"{db}\" does not exist (SQLSTATE 3D000)"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_named() {
    let Some((host, port)) = server().await else {
        return;
    };
    let user = format!("idemq_nobody_{:08x}", rand::random::<u32>());
    let (err, took) = refusal(&format!("postgres://{user}:{SECRET}@{host}:{port}/test")).await;
    assert_login_refused(
        &err,
        took,
        &format!(
            "postgres: connect failed: postgres://{user}:***@{host}:{port}/test: \
             role \"{user}\" does not exist (SQLSTATE 28000)"
        ),
    );
}

/// Without the `tls-rustls` feature (the default), sqlx has no TLS: a URL
/// that requires it is a configuration error naming the feature.
#[cfg(not(feature = "tls-rustls"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_without_tls_names_the_feature() {
    let Some((host, port)) = server().await else {
        return;
    };
    let user = user();
    let url = format!("postgres://{user}:{SECRET}@{host}:{port}/test?sslmode=require");
    let (err, took) = refusal(&url).await;
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "invalid configuration: postgres://{user}:***@{host}:{port}/test?sslmode=require \
             asks for TLS (sslmode=require), but idemq-postgres was built without TLS support: \
             enable its `tls-rustls` feature (idemq-postgres = {{ features = [\"tls-rustls\"] }}), \
             or connect with sslmode=prefer or sslmode=disable"
        )
    );
    assert_no_secret(&err);
    assert!(took < AT_ONCE, "took {took:?}: {err}");
}

/// With the `tls-rustls` feature, `sslmode=require` talks TLS (the test
/// server has it on); whatever goes wrong is not the missing feature.
#[cfg(feature = "tls-rustls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_with_tls_connects() {
    let Some((host, port)) = server().await else {
        return;
    };
    let user = user();
    let url = format!("postgres://{user}:{SECRET}@{host}:{port}/test?sslmode=require");
    match PostgresDedupStore::connect(&url).await {
        Ok(store) => {
            let row: (bool,) =
                sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                    .fetch_one(store.pool())
                    .await
                    .expect("pg_stat_ssl");
            assert!(row.0, "the connection must be TLS");
        }
        Err(err) => {
            eprintln!("sslmode=require did not connect (a server without TLS?): {err}");
            assert!(!err.to_string().contains("tls-rustls"), "{err}");
            assert_no_secret(&err);
        }
    }
}
