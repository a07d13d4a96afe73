//! The engine's metric handles, registered once when the engine is built
//! (names in [`crate::metric_names`]), so counting a message is an atomic
//! add through a handle, never a registry lookup.

use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Label, Unit};

use crate::message::DeadReason;
use crate::metric_names::{self as names, labels};

/// What became of one delivery: a value of the `idemq.outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Handled = 0,
    Duplicate,
    DeadDuplicate,
    Deferred,
    Retried,
    DeadLettered,
    LeaseLost,
    Released,
    Requeued,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        names::OUTCOMES[self as usize]
    }
}

/// A [`crate::DedupStore`] call the engine makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Claim = 0,
    Renew,
    Complete,
    Fail,
    Bury,
    LeaseState,
}

impl StoreOp {
    pub(crate) fn as_str(self) -> &'static str {
        names::STORE_OPERATIONS[self as usize]
    }
}

/// A [`crate::Broker`] call the engine counts the failures of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BrokerOp {
    Receive = 0,
    Ack,
    Nack,
    RetryLater,
    DeadLetter,
}

impl BrokerOp {
    pub(crate) fn as_str(self) -> &'static str {
        names::BROKER_OPERATIONS[self as usize]
    }
}

const REASONS: [DeadReason; 5] = [
    DeadReason::MissingKey,
    DeadReason::MaxAttempts,
    DeadReason::Permanent,
    DeadReason::Decode,
    DeadReason::DuplicateOfDead,
];

fn reason_index(reason: DeadReason) -> usize {
    match reason {
        DeadReason::MissingKey => 0,
        DeadReason::MaxAttempts => 1,
        DeadReason::Permanent => 2,
        DeadReason::Decode => 3,
        DeadReason::DuplicateOfDead => 4,
    }
}

/// The labels every series carries: scope, and the queue when known.
#[derive(Clone)]
pub(crate) struct BaseLabels(Vec<Label>);

impl BaseLabels {
    pub(crate) fn new(scope: &str, destination: Option<String>) -> Self {
        let mut base = vec![Label::new(labels::SCOPE, scope.to_owned())];
        if let Some(queue) = destination {
            base.push(Label::new(labels::DESTINATION, queue));
        }
        BaseLabels(base)
    }

    fn with(&self, key: &'static str, value: &'static str) -> Vec<Label> {
        let mut all = self.0.clone();
        all.push(Label::new(key, value));
        all
    }

    /// The `idemq.messages` counter of one outcome.
    pub(crate) fn outcome(&self, outcome: Outcome) -> Counter {
        metrics::counter!(
            names::MESSAGES,
            self.with(labels::OUTCOME, outcome.as_str())
        )
    }

    /// The consumed-messages counter.
    pub(crate) fn consumed(&self) -> Counter {
        metrics::counter!(names::CONSUMED_MESSAGES, self.0.clone())
    }

    /// No metric: the figure is exported by operation instead.
    pub(crate) fn none(&self) -> Counter {
        Counter::noop()
    }
}

/// The handles besides the report's counters.
pub(crate) struct Meters {
    process: [Histogram; names::OUTCOMES.len()],
    dead_letters: [Counter; REASONS.len()],
    store_duration: [Histogram; names::STORE_OPERATIONS.len()],
    store_errors: [Counter; names::STORE_OPERATIONS.len()],
    broker_errors: [Counter; names::BROKER_OPERATIONS.len()],
    in_flight: Gauge,
}

impl Meters {
    pub(crate) fn new(base: &BaseLabels) -> Self {
        describe();
        Meters {
            process: names::OUTCOMES.map(|o| {
                metrics::histogram!(names::PROCESS_DURATION, base.with(labels::OUTCOME, o))
            }),
            dead_letters: REASONS.map(|r| {
                metrics::counter!(
                    names::DEAD_LETTERS,
                    base.with(labels::DEAD_LETTER_REASON, r.as_str())
                )
            }),
            store_duration: names::STORE_OPERATIONS.map(|op| {
                metrics::histogram!(
                    names::STORE_DURATION,
                    base.with(labels::STORE_OPERATION, op)
                )
            }),
            store_errors: names::STORE_OPERATIONS.map(|op| {
                metrics::counter!(names::STORE_ERRORS, base.with(labels::STORE_OPERATION, op))
            }),
            broker_errors: names::BROKER_OPERATIONS.map(|op| {
                metrics::counter!(
                    names::BROKER_ERRORS,
                    base.with(labels::BROKER_OPERATION, op)
                )
            }),
            in_flight: metrics::gauge!(names::HANDLERS_IN_FLIGHT, base.0.clone()),
        }
    }

    /// Records how long a delivery took, by what became of it.
    pub(crate) fn processed(&self, outcome: Outcome, started: Instant) {
        self.process[outcome as usize].record(started.elapsed());
    }

    pub(crate) fn dead_lettered(&self, reason: DeadReason) {
        self.dead_letters[reason_index(reason)].increment(1);
    }

    pub(crate) fn store_call(&self, op: StoreOp, started: Instant, failed: bool) {
        self.store_duration[op as usize].record(started.elapsed());
        if failed {
            self.store_errors[op as usize].increment(1);
        }
    }

    pub(crate) fn broker_failed(&self, op: BrokerOp) {
        self.broker_errors[op as usize].increment(1);
    }

    /// Counts a handler as running until the guard is dropped (also when
    /// the handler panics or its future is dropped at shutdown).
    pub(crate) fn handler_running(&self) -> InFlight<'_> {
        self.in_flight.increment(1.0);
        InFlight(&self.in_flight)
    }
}

/// Counts one running handler; see [`Meters::handler_running`].
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Units and descriptions, for exporters that show them.
fn describe() {
    metrics::describe_counter!(names::CONSUMED_MESSAGES, "Deliveries taken from the broker");
    metrics::describe_histogram!(
        names::PROCESS_DURATION,
        Unit::Seconds,
        "From taking a delivery to its settlement, by outcome"
    );
    metrics::describe_counter!(names::MESSAGES, "What became of deliveries, by outcome");
    metrics::describe_counter!(
        names::DEAD_LETTERS,
        "Messages sent to the dead-letter queue, by reason"
    );
    metrics::describe_histogram!(
        names::STORE_DURATION,
        Unit::Seconds,
        "Dedup store calls, by operation"
    );
    metrics::describe_counter!(
        names::STORE_ERRORS,
        "Failed dedup store calls, by operation"
    );
    metrics::describe_counter!(names::BROKER_ERRORS, "Failed broker calls, by operation");
    metrics::describe_gauge!(names::HANDLERS_IN_FLIGHT, "Handlers running now");
}
