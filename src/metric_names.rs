//! The names of the metrics an [`crate::Engine`] exports through the
//! [`metrics`](https://docs.rs/metrics) facade, and of their labels.
//!
//! Names follow the OpenTelemetry messaging conventions where one exists
//! (`messaging.*`) and are idemq's own otherwise (`idemq.*`). An exporter
//! may rewrite them (Prometheus: dots become underscores, counters get
//! `_total`). Every series carries [`labels::SCOPE`], and
//! [`labels::DESTINATION`] when the broker names its work queue
//! ([`crate::Broker::destination`]). Install the recorder before building
//! the engine: its handles are taken once, at build.

/// Counter: deliveries taken from the broker (the report's `received`).
pub const CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";

/// Histogram, seconds: from taking a delivery to its settlement, labelled
/// with [`labels::OUTCOME`]. Deliveries whose settlement failed (and that
/// were given back to the broker) are recorded as `requeued`.
pub const PROCESS_DURATION: &str = "messaging.process.duration";

/// Counter: what became of deliveries, labelled with [`labels::OUTCOME`]
/// (one value per outcome counted in [`crate::Report`]).
pub const MESSAGES: &str = "idemq.messages";

/// Counter: messages sent to the dead-letter queue, labelled with
/// [`labels::DEAD_LETTER_REASON`].
pub const DEAD_LETTERS: &str = "idemq.dead_letters";

/// Histogram, seconds: dedup store calls, labelled with
/// [`labels::STORE_OPERATION`].
pub const STORE_DURATION: &str = "idemq.store.duration";

/// Counter: dedup store calls that failed, labelled with
/// [`labels::STORE_OPERATION`].
pub const STORE_ERRORS: &str = "idemq.store.errors";

/// Counter: broker calls that failed, labelled with
/// [`labels::BROKER_OPERATION`].
pub const BROKER_ERRORS: &str = "idemq.broker.errors";

/// Gauge: handlers running now.
pub const HANDLERS_IN_FLIGHT: &str = "idemq.handlers.in_flight";

/// Every metric name above.
pub const ALL: [&str; 8] = [
    CONSUMED_MESSAGES,
    PROCESS_DURATION,
    MESSAGES,
    DEAD_LETTERS,
    STORE_DURATION,
    STORE_ERRORS,
    BROKER_ERRORS,
    HANDLERS_IN_FLIGHT,
];

/// Label keys.
pub mod labels {
    /// The engine's dedup scope ([`crate::EngineBuilder::scope`]).
    pub const SCOPE: &str = "idemq.scope";
    /// The work queue, when the broker names it.
    pub const DESTINATION: &str = "messaging.destination.name";
    /// One of [`super::OUTCOMES`].
    pub const OUTCOME: &str = "idemq.outcome";
    /// A [`crate::DeadReason`] code (`max-attempts`, `permanent`, ...).
    pub const DEAD_LETTER_REASON: &str = "idemq.dead_letter.reason";
    /// One of [`super::STORE_OPERATIONS`].
    pub const STORE_OPERATION: &str = "idemq.store.operation";
    /// One of [`super::BROKER_OPERATIONS`].
    pub const BROKER_OPERATION: &str = "messaging.operation.name";
}

/// The values of [`labels::OUTCOME`], each counting what the
/// [`crate::Report`] field of the same meaning counts: `handled`,
/// `duplicate` (`duplicates`), `dead_duplicate` (`dead_duplicates`),
/// `deferred`, `retried`, `dead_lettered`, `lease_lost`, `released`,
/// `requeued`.
pub const OUTCOMES: [&str; 9] = [
    "handled",
    "duplicate",
    "dead_duplicate",
    "deferred",
    "retried",
    "dead_lettered",
    "lease_lost",
    "released",
    "requeued",
];

/// The values of [`labels::STORE_OPERATION`]: the [`crate::DedupStore`]
/// methods the engine calls.
pub const STORE_OPERATIONS: [&str; 6] =
    ["claim", "renew", "complete", "fail", "bury", "lease_state"];

/// The values of [`labels::BROKER_OPERATION`]: `receive` for
/// [`crate::Broker::next`], the method's name for the others.
pub const BROKER_OPERATIONS: [&str; 5] = ["receive", "ack", "nack", "retry_later", "dead_letter"];
