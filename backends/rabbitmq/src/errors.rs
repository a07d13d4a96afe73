//! Mapping lapin's errors onto [`idemq::Error`].

use idemq::{Error, SharedError};
use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// The backend name written in every error.
pub(crate) const BACKEND: &str = "rabbitmq";

/// True when the error means the connection or a channel went away (as
/// opposed to the broker refusing this one operation).
pub(crate) fn is_connection_error(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::RuntimeShutdownError(_) => true,
        ErrorKind::ProtocolError(p) => matches!(p.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

/// Maps a lapin error of operation `op`.
pub(crate) fn map(op: &'static str, e: lapin::Error) -> Error {
    if is_connection_error(&e) {
        return Error::Unavailable {
            backend: BACKEND,
            op,
            source: SharedError::new(e),
        };
    }
    let transient = match e.kind() {
        ErrorKind::ProtocolError(p) => !matches!(
            p.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
                    | AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::CONTENTTOOLARGE
            )
        ),
        _ => false,
    };
    Error::Backend {
        backend: BACKEND,
        op,
        transient,
        source: SharedError::new(e),
    }
}

/// A passive declaration's error: NOT_FOUND is [`Error::NotFound`] naming
/// the queue.
pub(crate) fn map_passive(queue: &str, op: &'static str, e: lapin::Error) -> Error {
    if let ErrorKind::ProtocolError(p) = e.kind()
        && matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    {
        return Error::NotFound {
            backend: BACKEND,
            what: format!("queue `{queue}`"),
        };
    }
    map(op, e)
}
