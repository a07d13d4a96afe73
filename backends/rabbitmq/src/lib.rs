//! # idemq-rabbitmq: the RabbitMQ broker of idemq
//!
//! [`RabbitBroker`] implements [`idemq::Broker`] over
//! [lapin](https://docs.rs/lapin): consumption with a prefetch of twice
//! the engine's concurrency, each delivery settled on its own (acks batched
//! into `basic.ack(multiple)`, see [`RabbitConfig::with_ack_batching`]);
//! retries through
//! one delay queue per backoff tier; a dead-letter queue whose copies carry
//! the reason; every copy published persistent, `mandatory`, with publisher
//! confirms, and the original acked only once the copy is confirmed.
//!
//! ## Topology
//!
//! Declared idempotently on connect, names derived from the work queue `Q`
//! (all overridable in [`RabbitConfig`]):
//!
//! | queue | what |
//! | --- | --- |
//! | `Q` | the durable work queue, classic or quorum ([`QueueType`]), dead-lettering to `Q.dlq`: what the broker gives up on (a rejection, a quorum queue's delivery limit, [`RabbitConfig::with_delivery_limit`]) lands there with its `x-death` reason |
//! | `Q.retry.<tier>` | one per backoff tier (default 100ms, 1s, 5s, 30s, 2m, 10m), queue-level `x-message-ttl`, dead-lettering back to `Q` |
//! | `Q.dlq` | the dead-letter queue, read by [`RabbitDeadLetters`] for `idemq::Replay` |
//!
//! Queues declared before with other arguments are adopted with one
//! warning when what differs is a safety argument, or refused at start
//! with a way to migrate; see [`topology`].
//!
//! `retry_later(delay)` goes to the smallest tier at least `delay` long
//! (the longest when none is). A queue-level TTL means no message waits
//! behind a longer-lived one (no head-of-line blocking).
//!
//! ## Connection loss
//!
//! A supervisor task rebuilds connection, topology and consumer with
//! exponential backoff ([`RecoveryConfig`]); lapin's own automatic recovery
//! can go first, but is off by default (lapin 4.12.3 can deadlock in it, see
//! [`RecoveryConfig::auto_recover`]). Meanwhile
//! [`idemq::Broker::next`] waits and publishes wait (up to the publish
//! timeout). Deliveries of a lost connection cannot be settled any more:
//! `ack`/`nack`/`retry_later`/`dead_letter` report
//! [`idemq::Error::StaleDelivery`], and the broker delivers the message
//! again. Connection events are logged with `tracing`, the URL's password
//! redacted.
//!
//! ## Headers
//!
//! Retried and dead-lettered copies carry the headers of
//! [`idemq::message::retry_headers`] and [`idemq::DeadLetter::headers_for`],
//! like every idemq broker. AMQP field tables map onto [`idemq::Headers`] as
//! described in [`headers`]. On quorum queues `x-delivery-count` is exposed
//! as [`idemq::Delivery::delivery_count`].
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! use idemq::{Broker, OutgoingMessage};
//! use idemq_rabbitmq::{QueueType, RabbitBroker, RabbitConfig};
//!
//! # async fn demo() -> Result<(), idemq::Error> {
//! // AMQP_ADDR, else amqp://guest:guest@127.0.0.1:5672/%2f
//! let config = RabbitConfig::from_env("orders")
//!     .with_queue_type(QueueType::Quorum)
//!     .with_retry_tiers([Duration::from_secs(1), Duration::from_secs(30), Duration::from_secs(600)]);
//! let broker = RabbitBroker::connect(config).await?;
//!
//! broker
//!     .publish(OutgoingMessage::new(r#"{"order":1}"#).with_message_id("order-1"))
//!     .await?;
//! if let Some(delivery) = broker.next().await? {
//!     // ... handle it, then settle it exactly once:
//!     broker.ack(&delivery).await?;
//! }
//! broker.close().await;
//! # Ok(()) }
//! ```
//!
//! Producers that do not consume use [`RabbitPublisher`].
//!
//! `amqps://` URLs use rustls (ring) with the platform's native root
//! certificates. The crate needs a tokio runtime.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
mod broker;
mod config;
mod dead_letters;
mod errors;
pub mod headers;
mod link;
mod publisher;
mod raw;
pub mod topology;

/// The `messaging.system` of this backend's spans.
pub(crate) const SYSTEM: &str = "rabbitmq";

pub use broker::RabbitBroker;
pub use config::{
    DEAD_LETTER_DELIVERY_LIMIT, DEFAULT_ACK_DELAY, DEFAULT_DELIVERY_LIMIT, DEFAULT_PREFETCH,
    DEFAULT_RETRY_TIERS, DEFAULT_URL, QueueType, RabbitConfig, RecoveryConfig, URL_ENV,
};
pub use dead_letters::{DEFAULT_READ_AHEAD, RabbitDeadLetters};
pub use publisher::{RabbitPublisher, generate_message_id};
#[cfg(feature = "testing")]
pub use raw::testing;
pub use topology::{QueueDepths, QueueRole, QueueStat, delete_topology, queue_depths, queue_stats};
