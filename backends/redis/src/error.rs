//! Mapping redis errors into [`idemq::Error`].

use std::time::Duration;

use idemq::{Error, SharedError};
use redis::{ErrorKind, RedisError, ServerErrorKind};

pub(crate) const BACKEND: &str = "redis";

/// Maps a redis error: connection trouble is [`Error::Unavailable`], a
/// client-side response timeout [`Error::Timeout`] (both transient),
/// server states that pass (loading, failover, cluster down) a transient
/// [`Error::Backend`], and everything else (script errors, wrong types,
/// protocol or auth errors) a permanent [`Error::Backend`].
pub(crate) fn map(op: &'static str, after: Duration, e: RedisError) -> Error {
    if e.is_timeout() {
        return Error::Timeout {
            backend: BACKEND,
            op,
            after,
        };
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return Error::Unavailable {
            backend: BACKEND,
            op,
            source: SharedError::new(e),
        };
    }
    let transient = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        ) | ErrorKind::ClusterConnectionNotFound
    );
    Error::Backend {
        backend: BACKEND,
        op,
        transient,
        source: SharedError::new(e),
    }
}

/// A reply the store cannot read: the server runs something else than our
/// scripts, or the data under a key is not ours. Permanent.
pub(crate) fn unexpected(op: &'static str, what: String) -> Error {
    Error::Backend {
        backend: BACKEND,
        op,
        transient: false,
        source: what.into(),
    }
}

/// The store's own deadline on a whole operation passed.
pub(crate) fn timeout(op: &'static str, after: Duration) -> Error {
    Error::Timeout {
        backend: BACKEND,
        op,
        after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let after = Duration::from_secs(1);
        let io = |kind| RedisError::from(std::io::Error::from(kind));
        assert!(matches!(
            map("claim", after, io(std::io::ErrorKind::TimedOut)),
            Error::Timeout { op: "claim", .. }
        ));
        for kind in [
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            let e = map("claim", after, io(kind));
            assert!(
                matches!(
                    e,
                    Error::Unavailable {
                        backend: "redis",
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(e.is_transient());
        }
        let script = RedisError::from((ErrorKind::Client, "bad script"));
        assert!(!map("claim", after, script).is_transient());
        let wrongtype = redis::make_extension_error("WRONGTYPE".into(), Some("nope".into()));
        assert!(!map("claim", after, wrongtype).is_transient());
        assert!(!unexpected("claim", "odd".into()).is_transient());
        assert!(timeout("claim", after).is_transient());
    }
}
