//! [`RedisConfig`]: key prefix and timeouts of a [`crate::RedisDedupStore`].

use std::time::Duration;

use idemq::Error;

/// Longest accepted key prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 64;

/// How a [`crate::RedisDedupStore`] names its keys and how long it waits.
///
/// ```
/// use std::time::Duration;
/// use idemq_redis::RedisConfig;
///
/// let config = RedisConfig::new()
///     .with_prefix("orders-svc:")
///     .with_response_timeout(Duration::from_secs(1));
/// assert_eq!(config.prefix(), "orders-svc:");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    prefix: String,
    response_timeout: Duration,
    connection_timeout: Duration,
    reconnect_after_timeouts: u32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            prefix: RedisConfig::DEFAULT_PREFIX.to_owned(),
            response_timeout: RedisConfig::DEFAULT_RESPONSE_TIMEOUT,
            connection_timeout: RedisConfig::DEFAULT_CONNECTION_TIMEOUT,
            reconnect_after_timeouts: RedisConfig::DEFAULT_RECONNECT_AFTER_TIMEOUTS,
        }
    }
}

impl RedisConfig {
    /// The default key prefix, `idemq:`.
    pub const DEFAULT_PREFIX: &'static str = "idemq:";
    /// The default response timeout, 2 s.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
    /// The default connection timeout, 2 s.
    pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
    /// By default a connection that timed out 3 times in a row is replaced.
    pub const DEFAULT_RECONNECT_AFTER_TIMEOUTS: u32 = 3;

    /// The defaults: prefix `idemq:`, 2 s response and connection timeouts,
    /// a connection replaced after 3 timeouts in a row.
    pub fn new() -> Self {
        RedisConfig::default()
    }

    /// Sets the prefix put before every record key: a record lives at
    /// `<prefix>{<scope>:<key>}`. 1 to [`MAX_PREFIX_LEN`] bytes of
    /// `A-Z a-z 0-9 - _ . : /`; checked when the store is built.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets how long one operation may take in all, waiting for a
    /// reconnection included, before it fails with [`Error::Timeout`]
    /// (transient). Also the redis client's own response timeout.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets how long one attempt to (re)connect may take, the handshake
    /// (TLS, `AUTH`, `SELECT`) included. `connect` makes one attempt and
    /// fails with [`Error::Timeout`] naming this duration past it.
    pub fn with_connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Sets after how many timeouts in a row a store built from a URL drops
    /// its connection and opens a new one (a connection that stopped
    /// answering without closing, such as a half-open TCP connection, is
    /// otherwise kept until the kernel gives up on it). `0` turns this off.
    pub fn with_reconnect_after_timeouts(mut self, timeouts: u32) -> Self {
        self.reconnect_after_timeouts = timeouts;
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The response timeout.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The connection timeout.
    pub fn connection_timeout(&self) -> Duration {
        self.connection_timeout
    }

    /// After how many timeouts in a row the connection is replaced.
    pub fn reconnect_after_timeouts(&self) -> u32 {
        self.reconnect_after_timeouts
    }

    /// Checks the prefix and timeouts.
    pub fn validate(&self) -> Result<(), Error> {
        check_prefix(&self.prefix)?;
        if self.response_timeout.is_zero() {
            return Err(Error::Config("redis response timeout must be > 0".into()));
        }
        if self.connection_timeout.is_zero() {
            return Err(Error::Config("redis connection timeout must be > 0".into()));
        }
        Ok(())
    }
}

fn check_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
        return Err(Error::invalid(
            "redis key prefix",
            format!("must be 1 to {MAX_PREFIX_LEN} bytes, got {}", prefix.len()),
        ));
    }
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/');
    if !prefix.bytes().all(safe) {
        return Err(Error::invalid(
            "redis key prefix",
            "may only contain ASCII letters, digits, '-', '_', '.', ':' and '/'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        RedisConfig::new().validate().expect("defaults are valid");
        RedisConfig::new()
            .with_prefix("app/v1:dedup.")
            .validate()
            .expect("valid prefix");
        let long = "p".repeat(MAX_PREFIX_LEN + 1);
        for bad in ["", "a{b", "a}b", "a b", "a\nb", "é", long.as_str()] {
            assert!(
                matches!(
                    RedisConfig::new().with_prefix(bad).validate(),
                    Err(Error::InvalidInput {
                        what: "redis key prefix",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn zero_timeouts_are_rejected() {
        for config in [
            RedisConfig::new().with_response_timeout(Duration::ZERO),
            RedisConfig::new().with_connection_timeout(Duration::ZERO),
        ] {
            assert!(matches!(config.validate(), Err(Error::Config(_))));
        }
    }
}
