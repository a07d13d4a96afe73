//! The one error type of idemq and of every backend crate's trait methods.

use std::time::Duration;

/// A boxed error source, kept inside [`Error`] so callers can walk the chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong talking to a broker or a dedup store.
///
/// The engine decides between "back off and try again" and "give up" with
/// [`Error::is_transient`]. Backends map their own errors into these variants,
/// keeping the original error as the `source`. No variant ever carries a
/// connection string with a password in it.
#[derive(Debug, thiserror::Error)]
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
        source: BoxError,
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
        source: BoxError,
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
    pub fn map_source(self, f: impl FnOnce(BoxError) -> BoxError) -> Error {
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
