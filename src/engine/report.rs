//! What an engine counts, as a [`Report`] and through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

use super::meters::{BaseLabels, Outcome};

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
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
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

/// Why [`crate::Engine::run`] returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown token was cancelled.
    #[default]
    Shutdown,
    /// The broker said no more deliveries will come.
    BrokerClosed,
    /// The broker failed with an error that retrying cannot fix.
    BrokerFailed(String),
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
