//! The `tracing` spans idemq opens. Their fields are named by the
//! OpenTelemetry messaging conventions (`otel.name`, `otel.kind` and
//! `otel.status_code` are read by `tracing-opentelemetry`), so an
//! OpenTelemetry layer exports them as they are. They exist with or
//! without the `otel` feature: a span nobody subscribes to costs a check.
//!
//! Numbers are recorded as `i64`: `tracing-opentelemetry` exports an
//! unsigned field as a string.

use std::fmt;

use tracing::Span;
use tracing::field::{Empty, display};

use crate::engine::meters::{BrokerOp, StoreOp};
use crate::error::Error;
use crate::message::{Delivery, OutgoingMessage};
use crate::metric_names::{BROKER_OPERATIONS, STORE_OPERATIONS};

/// `error.type` of a failure that may pass (a retry can succeed).
pub(crate) const TRANSIENT: &str = "transient";
/// `error.type` of a failure that will not pass.
pub(crate) const PERMANENT: &str = "permanent";

/// The `otel.name` of the spans around dedup store calls, by operation.
const STORE_SPANS: [&str; STORE_OPERATIONS.len()] = [
    "store claim",
    "store renew",
    "store complete",
    "store fail",
    "store bury",
    "store lease_state",
];

/// What the spans of one engine say about its broker, and their names,
/// put together once when the engine is built.
pub(crate) struct EngineSpans {
    system: Option<&'static str>,
    destination: Option<String>,
    /// Whether deliveries carry RabbitMQ delivery tags.
    rabbitmq: bool,
    process: String,
    settle: [String; BROKER_OPERATIONS.len()],
}

impl EngineSpans {
    pub(crate) fn new(system: Option<&'static str>, destination: Option<String>) -> Self {
        // `{operation} {destination}`, as the conventions name spans.
        let name = |op: &str| match &destination {
            Some(queue) => format!("{op} {queue}"),
            None => op.to_owned(),
        };
        EngineSpans {
            rabbitmq: system == Some("rabbitmq"),
            process: name("process"),
            settle: BROKER_OPERATIONS.map(name),
            system,
            destination,
        }
    }

    /// The span of one delivery, `process <queue>`; with the `otel`
    /// feature, a child of the trace context its headers carry.
    pub(crate) fn message(&self, scope: &str, d: &Delivery, key: Option<&str>) -> Span {
        let span = tracing::info_span!(
            "idemq.message",
            otel.name = self.process.as_str(),
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            error.type = Empty,
            messaging.system = self.system,
            messaging.destination.name = self.destination.as_deref(),
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.message.id = d.message_id.as_deref(),
            messaging.message.body.size = d.body.len() as i64,
            messaging.rabbitmq.message.delivery_tag = self.rabbitmq.then_some(d.tag as i64),
            idemq.scope = scope,
            idemq.key = key,
            idemq.attempt = Empty,
            idemq.outcome = Empty,
            idemq.dead_letter.reason = Empty,
        );
        #[cfg(feature = "otel")]
        crate::otel::set_parent(&span, &d.headers);
        span
    }

    /// The span of one settlement of a delivery (a child of its
    /// `process` span): `ack <queue>`, `retry_later <queue>`, ...
    pub(crate) fn settle(&self, op: BrokerOp) -> Span {
        // Retrying and dead-lettering publish a copy, then ack.
        let (kind, op_type) = match op {
            BrokerOp::RetryLater | BrokerOp::DeadLetter => ("producer", "send"),
            _ => ("client", "settle"),
        };
        tracing::info_span!(
            "idemq.settle",
            otel.name = self.settle[op as usize].as_str(),
            otel.kind = kind,
            otel.status_code = Empty,
            otel.status_description = Empty,
            error.type = Empty,
            messaging.system = self.system,
            messaging.destination.name = self.destination.as_deref(),
            messaging.operation.type = op_type,
            messaging.operation.name = op.as_str(),
        )
    }
}

/// The span of one dedup store call (a child of the delivery's span).
pub(crate) fn store(op: StoreOp) -> Span {
    tracing::info_span!(
        "idemq.store",
        otel.name = STORE_SPANS[op as usize],
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        error.type = Empty,
        idemq.store.operation = op.as_str(),
    )
}

/// The span of publishing one message to `queue`, `send <queue>`: with
/// the `otel` feature, the context the message carries.
pub(crate) fn send(system: &'static str, queue: &str, m: &OutgoingMessage) -> Span {
    tracing::info_span!(
        "idemq.publish",
        otel.name = %format_args!("send {queue}"),
        otel.kind = "producer",
        messaging.system = system,
        messaging.destination.name = queue,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.message.id = m.message_id.as_deref(),
        messaging.message.body.size = m.body.len() as i64,
    )
}

/// The span of replaying one dead letter, `replay <queue>` (its original
/// queue, when the letter names it): with the `otel` feature, a child of
/// the trace context the letter carries, which its copy keeps.
pub(crate) fn replay(letter: &Delivery, queue: Option<&str>, reason: &str) -> Span {
    let name = match queue {
        Some(queue) => format!("replay {queue}"),
        None => "replay".to_owned(),
    };
    let span = tracing::info_span!(
        "idemq.replay",
        otel.name = name,
        otel.kind = "producer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        error.type = Empty,
        messaging.destination.name = queue,
        messaging.operation.type = "send",
        messaging.operation.name = "replay",
        messaging.message.id = letter.message_id.as_deref(),
        messaging.message.body.size = letter.body.len() as i64,
        idemq.dead_letter.reason = reason,
    );
    #[cfg(feature = "otel")]
    crate::otel::set_parent(&span, &letter.headers);
    span
}

/// Marks `span` failed: `otel.status_code = ERROR`, `error.type` (one of
/// [`TRANSIENT`], [`PERMANENT`]) and the error's text.
pub(crate) fn record_error(span: &Span, kind: &'static str, what: &dyn fmt::Display) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", kind);
    span.record("otel.status_description", display(what));
}

/// The `error.type` of an idemq error.
pub(crate) fn error_type(e: &Error) -> &'static str {
    if e.is_transient() {
        TRANSIENT
    } else {
        PERMANENT
    }
}
