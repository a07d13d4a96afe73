//! What an engine counts, as a [`Report`] and through the `metrics` facade.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::meters::{BaseLabels, Outcome};
use crate::Error;

macro_rules! counters {
    ($( $(#[$doc:meta])* $field:ident => $metric:ident $(($outcome:expr))? ),* $(,)?) => {
        /// What one engine run did, returned by [`crate::Engine::run`].
        ///
        /// The same figures are exported through the `metrics` facade
        /// (install the recorder before building the engine): `received`
        /// as [`crate::metric_names::CONSUMED_MESSAGES`], the outcomes as
        /// [`crate::metric_names::MESSAGES`] by `idemq.outcome`, the
        /// errors as [`crate::metric_names::STORE_ERRORS`] and
        /// [`crate::metric_names::BROKER_ERRORS`] by operation.
        ///
        /// `Display` writes it as one line for a log, the main figures
        /// always and the rest only when not zero:
        ///
        /// ```
        /// let report = idemq::Report::default();
        /// assert_eq!(
        ///     report.to_string(),
        ///     "received 0, handled 0, duplicates 0, retried 0, dead-lettered 0, deferred 0; \
        ///      stopped: shutdown"
        /// );
        /// ```
        ///
        /// New figures may be added, so it cannot be built field by field
        /// outside idemq: start from [`Report::default`] and
        /// [`Report::merge`] runs into it.
        #[derive(Clone, Debug, Default)]
        #[non_exhaustive]
        pub struct Report {
            $( $(#[$doc])* pub $field: u64, )*
            /// Why the run ended.
            pub stopped: Stopped,
        }

        impl Report {
            /// Adds another run's counts to this one (to sum several
            /// engines consuming one queue); keeps this one's `stopped`.
            pub fn merge(&mut self, other: &Report) {
                $( self.$field += other.$field; )*
            }
        }

        pub(crate) struct Counters {
            $( pub(crate) $field: Counter, )*
        }

        impl Counters {
            pub(crate) fn new(labels: &BaseLabels) -> Self {
                Counters {
                    $( $field: Counter::new(labels.$metric($($outcome)?)), )*
                }
            }

            pub(crate) fn report(&self, stopped: Stopped) -> Report {
                Report {
                    $( $field: self.$field.get(), )*
                    stopped,
                }
            }
        }
    };
}

counters! {
    /// Deliveries taken from the broker.
    received => consumed,
    /// Messages whose handler succeeded and whose done mark was written.
    handled => outcome(Outcome::Handled),
    /// Duplicates of completed messages, acked without running the handler.
    duplicates => outcome(Outcome::Duplicate),
    /// Copies of dead (buried) messages, acked without running the handler.
    dead_duplicates => outcome(Outcome::DeadDuplicate),
    /// Deliveries deferred with `retry_later` because another consumer
    /// held a live lease on their key.
    deferred => outcome(Outcome::Deferred),
    /// Failed attempts sent back with `retry_later` and backoff.
    retried => outcome(Outcome::Retried),
    /// Messages sent to the dead-letter queue.
    dead_lettered => outcome(Outcome::DeadLettered),
    /// Completions (or releases) refused because another consumer took the
    /// key over after this one's lease lapsed.
    lease_lost => outcome(Outcome::LeaseLost),
    /// Store calls that failed (the store was unreachable or erred),
    /// lease renewals and releases at shutdown included.
    store_errors => none,
    /// Broker calls that failed.
    broker_errors => none,
    /// Claims given back at shutdown because their handler did not finish
    /// within the grace period (their deliveries were requeued).
    released => outcome(Outcome::Released),
    /// Deliveries requeued without running the handler because the store
    /// could not be reached (fail closed).
    requeued => outcome(Outcome::Requeued),
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // (name, figure, written even when zero)
        let figures = [
            ("received", self.received, true),
            ("handled", self.handled, true),
            ("duplicates", self.duplicates, true),
            ("dead duplicates", self.dead_duplicates, false),
            ("retried", self.retried, true),
            ("dead-lettered", self.dead_lettered, true),
            ("deferred", self.deferred, true),
            ("lease lost", self.lease_lost, false),
            ("released", self.released, false),
            ("requeued", self.requeued, false),
            ("store errors", self.store_errors, false),
            ("broker errors", self.broker_errors, false),
        ];
        let mut sep = "";
        for (name, n, always) in figures {
            if always || n > 0 {
                write!(f, "{sep}{name} {n}")?;
                sep = ", ";
            }
        }
        write!(f, "; stopped: {}", self.stopped)
    }
}

/// Why [`crate::Engine::run`] returned.
///
/// `Display` says it in a few words (`shutdown`, `broker closed`,
/// `broker failed: ...`).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Stopped {
    /// The shutdown token was cancelled.
    #[default]
    Shutdown,
    /// The broker said no more deliveries will come.
    BrokerClosed,
    /// The broker failed with an error that retrying cannot fix.
    BrokerFailed(Error),
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::Shutdown => f.write_str("shutdown"),
            Stopped::BrokerClosed => f.write_str("broker closed"),
            Stopped::BrokerFailed(e) => write!(f, "broker failed: {e}"),
        }
    }
}

/// A figure of the report and the metric it is exported as. Padded to a
/// cache line: counters are bumped from every worker thread.
#[repr(align(64))]
pub(crate) struct Counter {
    value: AtomicU64,
    metric: metrics::Counter,
}

impl Counter {
    fn new(metric: metrics::Counter) -> Self {
        Counter {
            value: AtomicU64::new(0),
            metric,
        }
    }

    pub(crate) fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_displays_as_one_line() {
        let mut report = Report {
            received: 12,
            handled: 7,
            duplicates: 3,
            retried: 1,
            dead_lettered: 1,
            deferred: 2,
            requeued: 4,
            stopped: Stopped::BrokerClosed,
            ..Report::default()
        };
        assert_eq!(
            report.to_string(),
            "received 12, handled 7, duplicates 3, retried 1, dead-lettered 1, \
             deferred 2, requeued 4; stopped: broker closed"
        );
        report.dead_duplicates = 1;
        report.lease_lost = 2;
        report.released = 3;
        report.store_errors = 5;
        report.broker_errors = 6;
        report.stopped = Stopped::BrokerFailed(Error::Closed { backend: "memory" });
        assert_eq!(
            report.to_string(),
            "received 12, handled 7, duplicates 3, dead duplicates 1, retried 1, \
             dead-lettered 1, deferred 2, lease lost 2, released 3, requeued 4, \
             store errors 5, broker errors 6; stopped: broker failed: memory: closed"
        );
    }
}
