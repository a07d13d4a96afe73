//! Messages lapin cannot parse: telling its parse error from others, and
//! running the quarantine of [`crate::raw`] on the work queue when one has
//! failed a connection (see the module docs of [`super`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use idemq::{Error, SharedError};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, error, info, warn};

use crate::config::RabbitConfig;
use crate::errors::BACKEND;
use crate::raw::{self, RawError};

use super::Shared;

/// Messages a quarantine takes from the head of the work queue beyond the
/// prefetch: a message that failed a connection was among the unacked
/// deliveries of that connection, which go back to the head of the queue.
const QUARANTINE_MARGIN: usize = 64;
/// The longest a quarantine may take (each read and write is bounded by
/// the connect timeout as well).
const QUARANTINE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a quarantine that found nothing waits before it looks once
/// more: the broker may not have put the failed connection's messages back
/// yet.
const QUARANTINE_SETTLE: Duration = Duration::from_millis(250);

/// What a quarantine run came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Quarantined {
    /// Moved this many messages to the dead-letter queue.
    Moved(usize),
    /// Found nothing lapin cannot parse.
    Nothing,
    /// Could not run (TLS, the server unreachable, ...); logged.
    Failed,
}

impl Shared {
    /// Runs the quarantine on the work queue (see [`crate::raw`]) and logs
    /// what came of it: every moved message at ERROR (by the quarantine),
    /// a failure at ERROR the first time and at WARN after.
    pub(super) async fn quarantine(&self) -> Quarantined {
        let queue = self.cfg.queue();
        let dlq = self.cfg.dead_letter_queue();
        let q = raw::Quarantine {
            uri: &self.uri,
            queue,
            dead_letter_queue: &dlq,
            max: usize::from(self.prefetch()) + QUARANTINE_MARGIN,
            io_timeout: self.cfg.connect_timeout(),
            connection_name: format!("idemq-quarantine:{queue}"),
        };
        let started = Instant::now();
        let mut looked_again = false;
        loop {
            let run = tokio::select! {
                _ = self.closed.cancelled() => return Quarantined::Failed,
                run = timeout(QUARANTINE_TIMEOUT, raw::quarantine(&q)) => run,
            };
            let error = match run {
                Ok(Ok(report)) if !report.moved.is_empty() => {
                    info!(queue, dead_letter_queue = %dlq, elapsed = ?started.elapsed(),
                        "quarantine done: {}", raw::summary(&report));
                    return Quarantined::Moved(report.moved.len());
                }
                Ok(Ok(report)) if !looked_again => {
                    // The broker may not have put the failed connection's
                    // messages back yet.
                    debug!(queue, "quarantine found nothing: {}", raw::summary(&report));
                    looked_again = true;
                    tokio::select! {
                        _ = self.closed.cancelled() => return Quarantined::Failed,
                        _ = sleep(QUARANTINE_SETTLE) => {}
                    }
                    continue;
                }
                Ok(Ok(report)) => {
                    raw::warn_nothing_found(queue, &report);
                    return Quarantined::Nothing;
                }
                Ok(Err(e)) => e,
                Err(_) => RawError::Timeout {
                    during: "quarantining",
                    after: QUARANTINE_TIMEOUT,
                },
            };
            self.log_quarantine_failure(&dlq, &error);
            return Quarantined::Failed;
        }
    }

    fn log_quarantine_failure(&self, dlq: &str, error: &RawError) {
        let queue = self.cfg.queue();
        let url = self.cfg.redacted_url();
        if self.quarantine_failed_before.swap(true, Ordering::SeqCst) {
            warn!(%url, queue, %error,
                "the work queue is still blocked by a message lapin cannot parse; \
                 moving it failed again");
            return;
        }
        let remedy = format!(
            "remove it by hand: `{queue}` dead-letters rejected messages to `{dlq}`, so \
             `rabbitmqadmin get queue={queue} count=1 ackmode=reject_requeue_false` (or the \
             management UI's Get messages with \"Reject requeue false\") moves its head \
             message there (look first with ackmode=reject_requeue_true; that copy keeps the \
             bad bytes, so idemq cannot replay it), or move it with a shovel; idemq keeps \
             retrying with backoff meanwhile"
        );
        match error {
            RawError::Unsupported(what) => error!(%url, queue, dead_letter_queue = dlq,
                "queue `{queue}` is blocked: a message there has AMQP properties lapin \
                 cannot parse (a short string that is not UTF-8: message_id, correlation_id, \
                 a header name...), so every connection that consumes it fails, and idemq \
                 cannot move it because its raw AMQP client does not support {what}; {remedy}"),
            other => error!(%url, queue, dead_letter_queue = dlq, error = %other,
                "queue `{queue}` is blocked: a message there has AMQP properties lapin \
                 cannot parse (a short string that is not UTF-8: message_id, correlation_id, \
                 a header name...), so every connection that consumes it fails, and moving \
                 it to `{dlq}` failed: {other}; if this persists, {remedy}"),
        }
    }
}

/// True for lapin's error for bytes it cannot parse (a message with a
/// short string that is not UTF-8, say). lapin never recovers from it.
pub(super) fn is_parse_error(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ParsingError(_))
}

/// True when `e` was caused by lapin's [`is_parse_error`].
pub(super) fn caused_by_parse_error(e: &Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<lapin::Error>()
            .is_some_and(is_parse_error)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// A build that failed on lapin's parse error.
pub(super) fn parse_failure(e: lapin::Error) -> Error {
    Error::Backend {
        backend: BACKEND,
        op: "consume",
        transient: true,
        source: SharedError::new(e),
    }
}

/// Why [`Link::connect`](super::Link::connect) gave up on a work queue whose messages lapin
/// cannot parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "queue `{queue}` holds a message whose AMQP properties lapin cannot parse, and idemq \
     could not move it to `{dead_letter_queue}` (see the ERROR logged before): {cause}"
)]
struct Blocked {
    queue: String,
    dead_letter_queue: String,
    #[source]
    cause: Error,
}

pub(super) fn blocked(cfg: &RabbitConfig, cause: Error) -> Error {
    Error::Backend {
        backend: BACKEND,
        op: "connect",
        transient: true,
        source: SharedError::new(Blocked {
            queue: cfg.queue().to_owned(),
            dead_letter_queue: cfg.dead_letter_queue(),
            cause,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64};

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test]
    async fn quarantine_over_tls_fails_fast_and_says_so_once() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let cfg = RabbitConfig::new("amqps://guest:guest@127.0.0.1:1/%2f", "q");
        let uri = cfg.validate().expect("uri");
        let shared = Shared {
            cfg,
            uri,
            consume: true,
            link_id: 1,
            current: watch::channel(None).0,
            closed: CancellationToken::new(),
            next_generation: AtomicU64::new(0),
            prefetch: AtomicU16::new(1),
            quarantine_failed_before: AtomicBool::new(false),
        };
        let started = Instant::now();
        assert_eq!(shared.quarantine().await, Quarantined::Failed);
        assert!(shared.quarantine_failed_before.load(Ordering::SeqCst));
        assert_eq!(shared.quarantine().await, Quarantined::Failed);
        assert!(started.elapsed() < Duration::from_secs(1));
        let e = blocked(&shared.cfg, Error::Closed { backend: BACKEND });
        assert!(!caused_by_parse_error(&e));
        let text = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(text.contains("`q`") && text.contains("`q.dlq`"), "{text}");
    }
}
