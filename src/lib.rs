//! # idemq: idempotent, replayable message consumption
//!
//! A broker such as RabbitMQ delivers every message *at least* once: a
//! consumer that crashes or acks late gets it again. idemq turns that into
//! "the effect happens once": every message carries a key (its
//! `message_id`); before the handler runs, the [`Engine`] claims the key in
//! a [`DedupStore`] under a fenced lease; a finished key is marked done and
//! kept for a dedup window, so later copies are acked without running the
//! handler; a failed one is released with its attempt counted and retried
//! with backoff, until it goes to a dead-letter queue, from which a
//! [`Replay`] brings it back.
//!
//! The engine is generic over two small traits, [`Broker`] and
//! [`DedupStore`], and a [`Handler`] (any async closure
//! `Fn(Message) -> Result<(), HandlerError>`, or [`json`] for typed bodies).
//! Backends live in their own crates (`idemq-rabbitmq`, `idemq-redis`,
//! `idemq-postgres`); [`memory`] has in-memory ones for tests and
//! single-process use.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
//! use idemq::memory::{MemoryBroker, MemoryDedupStore};
//! use idemq::{Broker, CancellationToken, Engine, HandlerError, Message, OutgoingMessage};
//!
//! let broker = MemoryBroker::new("orders");
//! broker.publish(OutgoingMessage::new("charge 5").with_message_id("order-1")).await?;
//! broker.publish(OutgoingMessage::new("charge 5").with_message_id("order-1")).await?; // a duplicate
//! broker.close_when_idle();
//!
//! let handler = |msg: Message| async move {
//!     if msg.body().is_empty() {
//!         return Err(HandlerError::permanent("empty order")); // dead-lettered at once
//!     }
//!     Ok(()) // charge the card here
//! };
//! let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
//!     .scope("orders")
//!     .concurrency(32)
//!     .build()?;
//! let report = engine.run(CancellationToken::new()).await;
//! assert_eq!((report.handled, report.duplicates), (1, 1));
//! # Ok(()) }
//! ```
//!
//! ## Metrics, traces and health
//!
//! The engine counts through the `metrics` facade, under the names of
//! [`metric_names`] (install a recorder before building the engine);
//! [`Engine::health`] hands out a [`Health`] handle for readiness probes.
//!
//! Each delivery runs in a `tracing` span named, by the OpenTelemetry
//! messaging conventions, `process <queue>` (its `otel.name`), with:
//!
//! * `messaging.system` ([`Broker::system`]), `messaging.destination.name`
//!   ([`Broker::destination`]), `messaging.operation.type = process`,
//!   `messaging.message.id`, `messaging.message.body.size`, and
//!   `messaging.rabbitmq.message.delivery_tag` on RabbitMQ;
//! * `idemq.scope`, `idemq.key`, `idemq.attempt` (as the store counted
//!   it), `idemq.outcome` (a value of [`metric_names::OUTCOMES`]) and
//!   `idemq.dead_letter.reason` (a [`DeadReason`] code);
//! * on failure, `otel.status_code = ERROR`, `otel.status_description`
//!   and `error.type`: `transient` (a retry may succeed) or `permanent`.
//!
//! Its children are the store calls (`store claim`, `store complete`, ...,
//! with `idemq.store.operation`) and the settlements (`ack <queue>`,
//! `nack <queue>`, `retry_later <queue>`, `dead_letter <queue>`);
//! publishing opens `send <queue>` and a replay `replay <queue>` per
//! message. A `tracing-opentelemetry` layer exports them as they are;
//! without a subscriber they cost a check each.
//!
//! With the `otel` feature the W3C trace context travels with the
//! message (`idemq::otel`): publishing injects it into the headers, the engine
//! makes each `process` span a child of it, and retried copies, dead
//! letters and replayed copies keep it, so a message's whole story is one
//! trace.
//!
//! ## Features
//!
//! * `mock`: `MockBroker` and `MockDedupStore` (mockall), for unit
//!   tests of code that takes the traits.
//! * `testing`: the conformance suites every backend must pass, the
//!   loopback `testing::FaultProxy`, and helpers for tests against real
//!   services.
//! * `otel`: trace context propagation through message headers
//!   (`idemq::otel`, over `opentelemetry` 0.33 and
//!   `tracing-opentelemetry` 0.34).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod coalesce;
pub mod engine;
pub mod error;
pub mod handler;
pub mod key;
pub mod memory;
pub mod message;
pub mod metric_names;
#[cfg(feature = "otel")]
pub mod otel;
pub mod policy;
pub mod replay;
mod spans;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use broker::Broker;
pub use coalesce::Coalescing;
pub use engine::{
    Engine, EngineBuilder, EngineConfig, EngineState, Health, RELEASE_BOUND, Report, Stopped,
};
pub use error::{BoxError, Error, SharedError};
pub use handler::{Completion, Handler, HandlerError, HandlerResultExt, JsonHandler, json};
pub use key::KeyStrategy;
pub use message::{
    BrokerDeath, DeadLetter, DeadReason, Delivery, HeaderValue, Headers, Message, OutgoingMessage,
    headers,
};
pub use policy::{Backoff, OnDead};
pub use replay::{Replay, ReplayReport};
pub use store::{
    Claim, ClaimTtl, DedupStore, Fenced, Lease, LeaseToken, Record, RecordCounts, RecordState,
    Release, Revival,
};
/// The token that stops [`Engine::run`], re-exported so that using the
/// engine needs no direct dependency on `tokio-util`.
pub use tokio_util::sync::CancellationToken;

#[cfg(feature = "mock")]
pub use broker::MockBroker;
#[cfg(feature = "mock")]
pub use store::MockDedupStore;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
