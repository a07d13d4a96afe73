//! W3C trace context in message headers (feature `otel`).
//!
//! A message carries the trace it belongs to in the [`TRACEPARENT`] and
//! [`TRACESTATE`] headers, written by OpenTelemetry's
//! [`TraceContextPropagator`]. With this feature:
//!
//! * the engine reads them from each delivery and makes its `process
//!   <queue>` span a child of that context, so every attempt of a message
//!   joins the trace of its publisher;
//! * [`Broker::publish`](crate::Broker::publish) of the in-memory broker
//!   and of `idemq-rabbitmq` (feature `otel` there) inject the current
//!   context into a message that has no `traceparent` yet;
//! * [`inject`] does it for any [`Headers`] (a producer that publishes
//!   through another client, say).
//!
//! Retried copies, dead letters and replayed messages keep the headers of
//! the original, so publish, every attempt, the dead letter, the replay and
//! the attempt that finally succeeds all show in one trace.
//!
//! The current context is that of the current `tracing` span, as seen by a
//! [`tracing_opentelemetry`] layer; when that has none, OpenTelemetry's own
//! current context. Nothing is written when neither is in a trace.
//!
//! ```
//! use idemq::OutgoingMessage;
//! use opentelemetry::trace::TraceContextExt;
//!
//! let mut message = OutgoingMessage::new("{}").with_message_id("order-1");
//! idemq::otel::inject(&mut message.headers); // inside a traced span: writes `traceparent`
//! let cx = idemq::otel::extract(&message.headers); // the context a consumer joins
//! assert!(!cx.span().span_context().is_valid()); // this example runs in no trace
//! ```

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{HeaderValue, Headers};

/// The W3C `traceparent` header: version, trace id, parent span id, flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header: vendor-specific trace data.
pub const TRACESTATE: &str = "tracestate";

/// Reads trace context from idemq [`Headers`]: string values, and byte
/// values that are UTF-8 (some AMQP clients send strings as bytes).
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.get(key)? {
            HeaderValue::Str(s) => Some(s),
            HeaderValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes trace context into idemq [`Headers`], as string values.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), HeaderValue::Str(value));
    }
}

/// The context a message published now belongs to: the current `tracing`
/// span's, else OpenTelemetry's current context.
pub fn current() -> Context {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        cx
    } else {
        Context::current()
    }
}

/// Writes the [current] context into `headers` (`traceparent`, and
/// `tracestate`), replacing what they held. Writes nothing outside a trace.
pub fn inject(headers: &mut Headers) {
    inject_context(&current(), headers);
}

/// Writes `cx` into `headers`. Writes nothing when `cx` is in no trace.
pub fn inject_context(cx: &Context, headers: &mut Headers) {
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// The context `headers` carry: a remote parent when they hold a valid
/// `traceparent`, else an empty context.
pub fn extract(headers: &Headers) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Injects the current context unless the message already carries one
/// (one set by its producer, or kept from the original of a copy).
pub(crate) fn inject_if_absent(headers: &mut Headers) {
    if !headers.contains_key(TRACEPARENT) {
        inject(headers);
    }
}

/// Makes `span` a child of the context `headers` carry, if any. Must run
/// before the span is first entered.
pub(crate) fn set_parent(span: &tracing::Span, headers: &Headers) {
    if span.is_disabled() || !headers.contains_key(TRACEPARENT) {
        return;
    }
    let cx = extract(headers);
    if cx.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer: nothing to join then.
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    fn remote() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn inject_then_extract_round_trips() {
        let mut h = Headers::new();
        inject_context(&remote(), &mut h);
        assert_eq!(
            h.get(TRACEPARENT),
            Some(&HeaderValue::Str(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()
            ))
        );
        assert_eq!(
            h.get(TRACESTATE),
            Some(&HeaderValue::Str("vendor=x".into()))
        );
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_valid());
        assert_eq!(sc.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert_eq!(sc.trace_state().get("vendor"), Some("x"));
    }

    #[test]
    fn byte_headers_are_read_as_utf8() {
        let mut h = Headers::new();
        h.insert(
            TRACEPARENT.into(),
            HeaderValue::Bytes(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_vec()),
        );
        assert!(extract(&h).span().span_context().is_valid());
        h.insert(TRACEPARENT.into(), HeaderValue::Bytes(vec![0xff]));
        assert!(!extract(&h).span().span_context().is_valid());
        h.insert(TRACEPARENT.into(), HeaderValue::Int(1));
        assert!(!extract(&h).span().span_context().is_valid());
    }

    #[test]
    fn outside_a_trace_nothing_is_written() {
        let mut h = Headers::new();
        inject(&mut h);
        assert!(h.is_empty());
        inject_context(&Context::new(), &mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn a_carried_context_is_kept() {
        let mut h = Headers::new();
        inject_context(&remote(), &mut h);
        let before = h.clone();
        inject_if_absent(&mut h);
        assert_eq!(h, before);
    }
}
