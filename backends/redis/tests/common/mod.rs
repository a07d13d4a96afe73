//! Helpers shared by the integration tests: every test gets its own key
//! prefix on the Redis at `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! and skips (or fails, with `IDEMQ_REQUIRE_SERVICES=1`) when it is down.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::Duration;

use idemq_redis::redis::{self, IntoConnectionInfo};
use idemq_redis::{RedisConfig, RedisDedupStore};

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn fresh_prefix() -> String {
    format!("idemq-test-{:016x}:", rand::random::<u64>())
}

/// A store on a fresh prefix with the default timeouts.
pub async fn store() -> Option<RedisDedupStore> {
    store_with(RedisConfig::new()).await
}

/// Whether Redis takes TCP connections, probed once per test binary so a
/// run without Redis skips fast.
fn reachable() -> Result<SocketAddr, String> {
    static PROBE: OnceLock<Result<SocketAddr, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let info = redis_url()
                .into_connection_info()
                .map_err(|e| e.to_string())?;
            let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
                return Err(format!("not a plain TCP address: {:?}", info.addr()));
            };
            let addr = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| e.to_string())?
                .next()
                .ok_or_else(|| format!("{host} has no address"))?;
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map_err(|e| format!("{addr}: {e}"))?;
            Ok(addr)
        })
        .clone()
}

/// Redis' TCP address, or `None` (skip; a failure with
/// `IDEMQ_REQUIRE_SERVICES=1`) when it is unreachable.
pub fn redis_addr_or_skip() -> Option<SocketAddr> {
    match reachable() {
        Ok(addr) => Some(addr),
        Err(e) => idemq::testing::service_unavailable("redis", e),
    }
}

/// A store on a fresh prefix with `config`'s timeouts.
pub async fn store_with(config: RedisConfig) -> Option<RedisDedupStore> {
    if let Err(e) = reachable() {
        return idemq::testing::service_unavailable("redis", e);
    }
    let config = config.with_prefix(fresh_prefix());
    match RedisDedupStore::connect_with(&redis_url(), config).await {
        Ok(store) => Some(store),
        Err(e) => idemq::testing::service_unavailable("redis", e),
    }
}

/// A plain connection for looking at what the store wrote.
pub async fn raw() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis_url()).expect("REDIS_URL parses");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection to redis")
}

/// Redis' TCP address, for putting a proxy in front of it.
pub async fn redis_addr() -> SocketAddr {
    reachable().expect("redis is reachable (checked by store() first)")
}

pub async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("PTTL")
}

pub const SECOND: Duration = Duration::from_secs(1);

/// The Valkey at `VALKEY_URL` (default `redis://127.0.0.1:6390`): a server
/// that takes `SET ... IFEQ`, for the store's plain-command completions.
pub fn valkey_url() -> String {
    std::env::var("VALKEY_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".to_owned())
}

/// A store on a fresh prefix on the Valkey at [`valkey_url`]; skips (or
/// fails, with `IDEMQ_REQUIRE_SERVICES=1`) when it is down.
pub async fn valkey_store_with(config: RedisConfig) -> Option<RedisDedupStore> {
    let config = config
        .with_prefix(fresh_prefix())
        .with_connection_timeout(Duration::from_secs(2));
    match RedisDedupStore::connect_with(&valkey_url(), config).await {
        Ok(store) => Some(store),
        Err(e) => idemq::testing::service_unavailable("valkey", e),
    }
}

/// A plain connection to the Valkey at [`valkey_url`].
pub async fn valkey_raw() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(valkey_url()).expect("VALKEY_URL parses");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection to valkey")
}

/// Whether `err` is the store's permanent error (a Redis `Backend` error
/// that retrying does not cure), as for a key that holds no record.
pub fn is_permanent(err: &idemq::Error) -> bool {
    matches!(
        err,
        idemq::Error::Backend {
            backend: "redis",
            transient: false,
            ..
        }
    )
}
