//! A wrong URL, password or database makes `connect` fail at once, with
//! what happened in the server's words, and never with the password: not
//! after seconds, as a timeout.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idemq::Error;
use idemq_redis::{RedisConfig, RedisDedupStore, redis};

/// The configured connection and response timeouts: every refusal below
/// must come well within them.
const PATIENT: Duration = Duration::from_secs(10);

/// "At once": a generous bound, far under [`PATIENT`].
const AT_ONCE: Duration = Duration::from_secs(3);

fn config() -> RedisConfig {
    RedisConfig::new()
        .with_prefix(common::fresh_prefix())
        .with_connection_timeout(PATIENT)
        .with_response_timeout(PATIENT)
}

/// `connect_with(url)`'s error and how long it took to come.
async fn refusal(url: &str) -> (Error, Duration) {
    let started = Instant::now();
    let err = RedisDedupStore::connect_with(url, config())
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

/// A refused handshake: permanent, from `connect`, at once, naming the URL
/// without its password, and saying `expected`.
fn assert_refused(err: &Error, took: Duration, expected: &str, secret: &str) {
    assert!(
        matches!(
            err,
            Error::Backend {
                backend: "redis",
                op: "connect",
                transient: false,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(expected), "{message}");
    assert!(!everything_shown(err).contains(secret), "{err:?}");
    assert!(took < AT_ONCE, "took {took:?}: {message}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A redis-server of the test's own on a free port, killed when dropped.
struct Throwaway {
    child: Child,
    addr: SocketAddr,
}

impl Throwaway {
    /// Starts `redis-server` with `args`; `None` (skip, or a failure with
    /// `IDEMQ_REQUIRE_SERVICES=1`) when it cannot be started.
    fn start(args: &[&str]) -> Option<Throwaway> {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => return idemq::testing::service_unavailable("redis-server", e),
        };
        let server = Throwaway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let started = Instant::now();
        while TcpStream::connect_timeout(&server.addr, Duration::from_millis(100)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return idemq::testing::service_unavailable(
                    "redis-server",
                    format!("no connection on {} after 10 s", server.addr),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_says_authentication_failed() {
    let secret = "idemq-wrong-pw-7f3a";
    let Some(server) = Throwaway::start(&["--requirepass", "idemq-right-pw"]) else {
        return;
    };
    let (err, took) = refusal(&format!("redis://:{secret}@{}", server.addr)).await;
    assert_refused(
        &err,
        took,
        "authentication failed: WRONGPASS invalid username-password pair or user is disabled.",
        secret,
    );
    assert!(
        err.to_string()
            .contains(&format!("redis://:***@{}", server.addr)),
        "{err}"
    );
    // The same over RESP3, where the password goes with `HELLO`.
    let (err, took) = refusal(&format!("redis://:{secret}@{}?protocol=resp3", server.addr)).await;
    assert_refused(
        &err,
        took,
        "authentication failed: WRONGPASS invalid username-password pair or user is disabled.",
        secret,
    );
    // No password at all: the server lets the connection in and refuses
    // its first command.
    let (err, took) = refusal(&format!("redis://{}", server.addr)).await;
    assert_refused(
        &err,
        took,
        "authentication failed: NOAUTH Authentication required. (the URL gives no password)",
        "idemq-right-pw",
    );
    // The right one connects, and the store works.
    let store = RedisDedupStore::connect_with(
        &format!("redis://:idemq-right-pw@{}", server.addr),
        config(),
    )
    .await
    .expect("the right password connects");
    store.ping().await.expect("ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_for_a_server_without_one_is_refused() {
    let Some(addr) = common::redis_addr_or_skip() else {
        return;
    };
    let secret = "idemq-needless-pw-51c2";
    let (err, took) = refusal(&format!("redis://:{secret}@{addr}")).await;
    // Redis and Valkey: "ERR AUTH <password> called without any password
    // configured for the default user. Are you sure your configuration is
    // correct?"
    assert_refused(
        &err,
        took,
        "authentication failed: ERR AUTH <password> called without any password configured",
        secret,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_acl_user_is_refused() {
    let Some(addr) = common::redis_addr_or_skip() else {
        return;
    };
    let secret = "idemq-nobody-pw-0d9e";
    let user = format!("idemq-nobody-{:08x}", rand::random::<u32>());
    let (err, took) = refusal(&format!("redis://{user}:{secret}@{addr}")).await;
    assert_refused(
        &err,
        took,
        "authentication failed: WRONGPASS invalid username-password pair or user is disabled.",
        secret,
    );
    assert!(
        err.to_string().contains(&format!("redis://{user}:***@")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_of_an_acl_user_is_refused() {
    let Some(addr) = common::redis_addr_or_skip() else {
        return;
    };
    let mut admin = common::raw().await;
    let user = format!("idemq-test-user-{:08x}", rand::random::<u32>());
    let right = "idemq-acl-right-pw";
    let wrong = "idemq-acl-wrong-pw-94b1";
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{right}"))
        .arg("~*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    // Everything first, the user deleted, then the assertions.
    let started = Instant::now();
    let refused =
        RedisDedupStore::connect_with(&format!("redis://{user}:{wrong}@{addr}"), config()).await;
    let took = started.elapsed();
    let accepted =
        RedisDedupStore::connect_with(&format!("redis://{user}:{right}@{addr}"), config())
            .await
            .map(drop);
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .expect("ACL DELUSER");
    let err = refused.expect_err("a wrong password must not connect");
    assert_refused(
        &err,
        took,
        "authentication failed: WRONGPASS invalid username-password pair or user is disabled.",
        wrong,
    );
    accepted.expect("the right password of the ACL user connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_out_of_range_is_refused() {
    let Some(addr) = common::redis_addr_or_skip() else {
        return;
    };
    for query in ["", "?protocol=resp3"] {
        let (err, took) = refusal(&format!("redis://{addr}/99{query}")).await;
        assert_refused(
            &err,
            took,
            &format!(
                "redis: connect failed: redis://{addr}/99{query}: \
                 the server refused to select database 99: ERR DB index is out of range"
            ),
            "no secret here",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_says_so_at_once() {
    // No server needed: a port where none listens.
    let port = free_port();
    let (err, took) = refusal(&format!("redis://:idemq-pw-3e5f@127.0.0.1:{port}")).await;
    assert!(
        matches!(
            err,
            Error::Unavailable {
                backend: "redis",
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
            "redis: connect failed, backend unavailable: redis://:***@127.0.0.1:{port}: connection refused"
        )
    );
    assert!(!everything_shown(&err).contains("idemq-pw-3e5f"), "{err:?}");
    assert!(took < AT_ONCE, "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_after_the_configured_connection_timeout() {
    // Takes TCP connections (the kernel's backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("address");
    let connection_timeout = Duration::from_millis(300);
    let config = RedisConfig::new()
        .with_connection_timeout(connection_timeout)
        .with_response_timeout(Duration::from_secs(5));
    let started = Instant::now();
    let err = RedisDedupStore::connect_with(&format!("redis://{addr}"), config)
        .await
        .expect_err("nobody answers");
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                backend: "redis",
                op: "connect",
                after,
            } if after == connection_timeout
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "redis: connect timed out after 300ms");
    assert!(took >= connection_timeout, "took {took:?}");
    assert!(took < AT_ONCE, "took {took:?}");
    drop(silent);
}
