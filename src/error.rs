//! The one error type of idemq and of every backend crate's trait methods.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error: what [`SharedError::new`] and
/// [`HandlerError`](crate::HandlerError) take an error from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The client-library error inside an [`Error`], shared so that [`Error`]
/// is [`Clone`]: one failed batch call can answer each of its callers with
/// the same error, source and all.
///
/// It dereferences to the error itself, so `downcast_ref`, `source` and
/// `Display` reach the client library's error, and [`Error`]'s
/// [`source`](std::error::Error::source) is that error, not this wrapper.
/// It converts from whatever a [`BoxError`] converts from (any error, a
/// `String`, a `&str`, a `BoxError`); [`SharedError::from_arc`] takes an
/// error that is already shared.
///
/// Like `anyhow::Error`, it does not implement [`std::error::Error`]
/// itself: that would clash with the conversion from every error type.
/// [`SharedError::into_arc`] gives an `Arc` that does.
///
/// ```
/// use idemq::{Error, SharedError};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
/// let e = Error::Unavailable { backend: "redis", op: "claim", source: SharedError::new(io) };
/// let copy = e.clone();
/// let source = std::error::Error::source(&copy).expect("a source");
/// assert!(source.downcast_ref::<std::io::Error>().is_some());
/// ```
#[derive(Clone)]
pub struct SharedError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl SharedError {
    /// Wraps an error (or a message: a `String` or `&str` becomes an error
    /// that displays it). A [`BoxError`] is moved into the `Arc`, not
    /// wrapped again, so downcasting still finds the error inside it. Pass
    /// a concrete error itself, not a `Box<E>`: that is an error type of
    /// its own, and `downcast_ref::<E>` would not see through it.
    pub fn new(source: impl Into<BoxError>) -> Self {
        SharedError(Arc::from(source.into()))
    }

    /// Wraps an error that is already shared, without copying it.
    pub fn from_arc(source: Arc<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        SharedError(source)
    }

    /// The shared error, for code that wants a `std::error::Error` value.
    pub fn into_arc(self) -> Arc<dyn std::error::Error + Send + Sync + 'static> {
        self.0
    }
}

impl Deref for SharedError {
    type Target = dyn std::error::Error + Send + Sync + 'static;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl AsRef<dyn std::error::Error + Send + Sync + 'static> for SharedError {
    fn as_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl<E: Into<BoxError>> From<E> for SharedError {
    fn from(source: E) -> Self {
        SharedError::new(source)
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// Everything that can go wrong talking to a broker or a dedup store.
///
/// Cheap to clone: a client-library source is shared ([`SharedError`]),
/// not copied.
///
/// The engine decides between "back off and try again" and "give up" with
/// [`Error::is_transient`]. Backends map their own errors into these variants,
/// keeping the original error as the `source`. No variant ever carries a
/// connection string with a password in it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend could not be reached, or the connection broke mid-call.
    /// Transient: the same call may succeed once the backend answers again.
    #[error("{backend}: {op} failed, backend unavailable: {source}")]
    Unavailable {
        /// Which backend (`"redis"`, `"postgres"`, `"rabbitmq"`, `"memory"`).
        backend: &'static str,
        /// The operation that failed (`"claim"`, `"ack"`, ...).
        op: &'static str,
        /// What the client library said.
        #[source]
        source: SharedError,
    },
    /// The backend did not answer within the configured time. Transient.
    #[error("{backend}: {op} timed out after {after:?}")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// The operation that timed out.
        op: &'static str,
        /// The configured time limit.
        after: Duration,
    },
    /// The delivery cannot be settled: it was already acked/nacked, or it
    /// belongs to a channel that no longer exists (a broker connection was
    /// recovered since). The broker redelivers it; the dedup record makes the
    /// redelivery harmless. Not transient: retrying the same ack cannot work.
    #[error("{backend}: delivery {tag} is stale or already settled")]
    StaleDelivery {
        /// Which backend.
        backend: &'static str,
        /// The broker's delivery tag.
        tag: u64,
    },
    /// The broker answered a publish with a negative confirm. Transient.
    #[error("{backend}: publish to {target} was not confirmed by the broker")]
    NotConfirmed {
        /// Which backend.
        backend: &'static str,
        /// The queue or exchange the copy was published to.
        target: String,
    },
    /// A mandatory publish could not be routed to any queue (missing queue or
    /// binding). Permanent until the topology is fixed.
    #[error("{backend}: publish to {target} was unroutable")]
    Unroutable {
        /// Which backend.
        backend: &'static str,
        /// The routing target that had no queue.
        target: String,
    },
    /// A scope, key, table name, URL or other input is not acceptable.
    /// Permanent.
    #[error("invalid {what}: {detail}")]
    InvalidInput {
        /// What was rejected (`"scope"`, `"key"`, `"table name"`, ...).
        what: &'static str,
        /// Why, in words a user can act on.
        detail: String,
    },
    /// A configuration value is out of range or inconsistent. Permanent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The backend does not offer this operation. Permanent.
    #[error("{backend} does not support {op}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// The operation asked for.
        op: &'static str,
    },
    /// Something the operation needs does not exist (a queue, say), and
    /// the operation does not create it. Permanent.
    #[error("{backend}: {what} does not exist")]
    NotFound {
        /// Which backend.
        backend: &'static str,
        /// What is missing, named as the user knows it, such as "queue `orders`".
        what: String,
    },
    /// The broker or store was closed on purpose. Permanent.
    #[error("{backend}: closed")]
    Closed {
        /// Which backend.
        backend: &'static str,
    },
    /// Any other backend failure; `transient` says whether retrying can help.
    #[error("{backend}: {op} failed: {source}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The operation that failed.
        op: &'static str,
        /// Whether the same call may succeed later.
        transient: bool,
        /// What the client library said.
        #[source]
        source: SharedError,
    },
}

impl Error {
    /// True when the same operation may succeed if tried again later
    /// (connection trouble, timeouts, negative confirms). The engine backs off
    /// and retries on transient errors and fails closed meanwhile: it never
    /// runs a handler or acks a message while its store is unreachable.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::NotConfirmed { .. } => true,
            Error::Backend { transient, .. } => *transient,
            Error::StaleDelivery { .. }
            | Error::Unroutable { .. }
            | Error::InvalidInput { .. }
            | Error::Config(_)
            | Error::Unsupported { .. }
            | Error::NotFound { .. }
            | Error::Closed { .. } => false,
        }
    }

    /// The same error with its client-library source (of
    /// [`Error::Unavailable`] and [`Error::Backend`]) replaced by
    /// `f(source)`: for a backend that puts context in front of it. Other
    /// variants come back unchanged.
    pub fn map_source(self, f: impl FnOnce(SharedError) -> SharedError) -> Error {
        match self {
            Error::Unavailable {
                backend,
                op,
                source,
            } => Error::Unavailable {
                backend,
                op,
                source: f(source),
            },
            Error::Backend {
                backend,
                op,
                transient,
                source,
            } => Error::Backend {
                backend,
                op,
                transient,
                source: f(source),
            },
            other => other,
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidInput {
            what,
            detail: detail.into(),
        }
    }
}

/// Removes the password from a URL-like connection string, for logs, errors
/// and `Debug` output: `amqp://user:secret@host/` becomes
/// `amqp://user:***@host/`, and so do `password=` and `pass=` query values.
/// Strings without credentials come back unchanged.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    for span in password_spans(url).into_iter().rev() {
        out.replace_range(span, "***");
    }
    out
}

/// The passwords of a URL-like connection string (the userinfo's and any
/// `password=` or `pass=` query value), each as written and, when that
/// differs, percent-decoded: what to scrub from a client library's error
/// text, which may quote either. Empty passwords are left out.
pub fn url_passwords(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    for span in password_spans(url) {
        let raw = &url[span];
        if raw.is_empty() {
            continue;
        }
        let decoded = percent_decode(raw);
        if decoded != raw {
            out.push(decoded);
        }
        out.push(raw.to_owned());
    }
    out
}

/// Where the passwords of `url` are, as byte ranges in order: the
/// userinfo's (`scheme://user:PASSWORD@host`), then the query's.
fn password_spans(url: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let Some(scheme_end) = url.find("://") else {
        return spans;
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority_end = start + rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &url[start..authority_end];
    if let Some(at) = authority.rfind('@')
        && let Some(colon) = authority[..at].find(':')
    {
        // A user name alone is not a secret.
        spans.push(start + colon + 1..start + at);
    }
    if let Some(q) = url[authority_end..].find('?') {
        let mut pos = authority_end + q + 1;
        let query_end = url[pos..].find('#').map_or(url.len(), |h| pos + h);
        for pair in url[pos..query_end].split('&') {
            if let Some((k, _)) = pair.split_once('=')
                && (k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass"))
            {
                spans.push(pos + k.len() + 1..pos + pair.len());
            }
            pos += pair.len() + 1;
        }
    }
    spans
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("redis://:p@ss@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://user@host"), "rediss://user@host");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/test?password=x"),
            "postgres://root@127.0.0.1/test?password=***"
        );
        assert_eq!(
            redact_url("redis://h/0?pass=x&db=1"),
            "redis://h/0?pass=***&db=1"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("amqp://u:@h/"), "amqp://u:***@h/");
    }

    #[test]
    fn finds_passwords_in_urls() {
        assert_eq!(
            url_passwords("postgres://u:p%40ss@h/db"),
            ["p@ss", "p%40ss"]
        );
        assert_eq!(
            url_passwords("postgres://u@h/db?password=xyz&sslmode=disable"),
            ["xyz"]
        );
        assert_eq!(url_passwords("redis://:a@b@h/0?pass=c"), ["a@b", "c"]);
        assert!(url_passwords("postgres://u@h/db").is_empty());
        assert!(url_passwords("amqp://u:@h/").is_empty(), "nothing to scrub");
    }

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "from the client library")
    }

    /// The error behind `source()`: the client library's, not the wrapper.
    fn io_kind(e: &Error) -> Option<std::io::ErrorKind> {
        std::error::Error::source(e)?
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
    }

    #[test]
    fn source_and_downcast_reach_the_client_error_through_clones() {
        let e = Error::Backend {
            backend: "redis",
            op: "claim",
            transient: true,
            source: SharedError::new(io(std::io::ErrorKind::BrokenPipe)),
        };
        let copy = e.clone();
        assert_eq!(io_kind(&e), Some(std::io::ErrorKind::BrokenPipe));
        assert_eq!(io_kind(&copy), Some(std::io::ErrorKind::BrokenPipe));
        assert_eq!(copy.to_string(), e.to_string());
        assert!(copy.is_transient());
        let (Error::Backend { source: a, .. }, Error::Backend { source: b, .. }) = (&e, &copy)
        else {
            unreachable!()
        };
        assert!(Arc::ptr_eq(&a.clone().into_arc(), &b.clone().into_arc()));
    }

    #[test]
    fn shared_error_conversions_keep_the_error_inside() {
        let boxed: BoxError = Box::new(io(std::io::ErrorKind::TimedOut));
        let from_box = SharedError::from(boxed);
        assert!(from_box.downcast_ref::<std::io::Error>().is_some());

        let arc: Arc<dyn std::error::Error + Send + Sync> = Arc::new(io(std::io::ErrorKind::Other));
        let from_arc = SharedError::from_arc(arc.clone());
        assert!(Arc::ptr_eq(&from_arc.clone().into_arc(), &arc));
        assert!(from_arc.downcast_ref::<std::io::Error>().is_some());

        let text: SharedError = "connection refused".into();
        assert_eq!(text.to_string(), "connection refused");
        assert_eq!(format!("{text:?}"), "\"connection refused\"");
        let e = Error::Unavailable {
            backend: "rabbitmq",
            op: "ack",
            source: format!("channel {} closed", 3).into(),
        };
        assert_eq!(
            e.to_string(),
            "rabbitmq: ack failed, backend unavailable: channel 3 closed"
        );
    }

    #[test]
    fn map_source_puts_context_in_front_of_the_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("while connecting: {0}")]
        struct Context(#[source] SharedError);

        let e = Error::Unavailable {
            backend: "postgres",
            op: "connect",
            source: io(std::io::ErrorKind::ConnectionRefused).into(),
        };
        let mapped = e.map_source(|s| Context(s).into());
        let context = std::error::Error::source(&mapped).expect("a source");
        assert!(context.downcast_ref::<Context>().is_some(), "{mapped:?}");
        let inner = context
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            inner.map(std::io::Error::kind),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(
            mapped
                .to_string()
                .ends_with("while connecting: from the client library")
        );
        let closed = Error::Closed { backend: "memory" }.map_source(|_| unreachable!());
        assert!(matches!(closed, Error::Closed { .. }));
    }

    #[test]
    fn transient_classification() {
        let e = Error::Timeout {
            backend: "redis",
            op: "claim",
            after: Duration::from_secs(1),
        };
        assert!(e.is_transient());
        assert!(!Error::invalid("key", "empty").is_transient());
        assert!(
            !Error::StaleDelivery {
                backend: "memory",
                tag: 1
            }
            .is_transient()
        );
    }
}
