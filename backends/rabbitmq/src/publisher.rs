//! [`RabbitPublisher`]: publishing for producers that do not consume.

use std::fmt;
use std::sync::Arc;

use idemq::{Error, OutgoingMessage};
use tracing::Instrument;

use crate::broker::new_properties;
use crate::config::RabbitConfig;
use crate::link::Link;

/// A random message id: 32 lowercase hex digits (128 random bits).
pub fn generate_message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Publishes persistent messages with publisher confirms, over a connection
/// that recovers by itself like [`crate::RabbitBroker`]'s. It neither
/// consumes nor declares queues (see [`RabbitPublisher::declare_topology`]).
///
/// Every publish is `mandatory`: a message no queue takes is reported as
/// [`Error::Unroutable`], a negative confirm as [`Error::NotConfirmed`].
/// A publish interrupted by a connection loss is retried until the publish
/// timeout, so the broker may receive it twice; the consumer's dedup record
/// absorbs that.
///
/// ```no_run
/// # async fn demo() -> Result<(), idemq::Error> {
/// use idemq::OutgoingMessage;
/// use idemq_rabbitmq::{RabbitConfig, RabbitPublisher};
///
/// let publisher = RabbitPublisher::connect(RabbitConfig::from_env("orders")).await?;
/// publisher.declare_topology().await?;
/// publisher
///     .publish(OutgoingMessage::new(r#"{"order":1}"#).with_message_id("order-1"))
///     .await?;
/// let id = publisher.publish_with_id(OutgoingMessage::new(r#"{"order":2}"#)).await?;
/// println!("published {id}");
/// publisher.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitPublisher {
    link: Arc<Link>,
}

impl RabbitPublisher {
    /// Connects (one attempt, bounded by the connect timeout). Messages go
    /// to `config.queue()` unless [`RabbitPublisher::publish_to`] names
    /// another queue.
    pub async fn connect(config: RabbitConfig) -> Result<RabbitPublisher, Error> {
        let link = Link::connect(config, false).await?;
        Ok(RabbitPublisher {
            link: Arc::new(link),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.link.shared.cfg
    }

    /// True when the connection is up.
    pub fn is_connected(&self) -> bool {
        self.link.shared.is_connected()
    }

    /// Declares the work, retry and dead-letter queues of the configuration
    /// (idempotent), so messages published before any consumer started are
    /// routable.
    pub async fn declare_topology(&self) -> Result<(), Error> {
        crate::topology::declare(self.config()).await
    }

    /// Publishes `message` to the work queue as it is (no id is made up
    /// when it has none) and waits for the broker's confirm.
    pub async fn publish(&self, message: OutgoingMessage) -> Result<(), Error> {
        let queue = self.config().queue().to_owned();
        self.publish_to(&queue, message).await
    }

    /// Publishes `message` to the work queue with its `message_id`, or a
    /// [`generate_message_id`] when it has none, and returns the id used:
    /// the key the consumer deduplicates on. Publishing again with the
    /// returned id is then a safe retry.
    pub async fn publish_with_id(&self, mut message: OutgoingMessage) -> Result<String, Error> {
        let id = message
            .message_id
            .get_or_insert_with(generate_message_id)
            .clone();
        self.publish(message).await?;
        Ok(id)
    }

    /// Publishes `message` as it is to `queue` (through the default
    /// exchange) and waits for the confirm. With the `otel` feature, the
    /// current trace context goes into its headers unless it carries one.
    pub async fn publish_to(&self, queue: &str, message: OutgoingMessage) -> Result<(), Error> {
        publish_traced(&self.link, queue, message).await
    }

    /// Closes the connection, within about 2 seconds whatever its state
    /// (as [`crate::RabbitBroker::close`]). Publishing afterwards fails with
    /// [`Error::Closed`].
    pub async fn close(&self) {
        self.link.close().await;
    }
}

/// Publishes `message` to `queue` in a `send <queue>` span (a producer
/// span by the OpenTelemetry messaging conventions); with the `otel`
/// feature, that span's context is what the message carries, unless it
/// carries a context already.
pub(crate) async fn publish_traced(
    link: &Link,
    queue: &str,
    message: OutgoingMessage,
) -> Result<(), Error> {
    let span = tracing::info_span!(
        "idemq.publish",
        otel.name = %format_args!("send {queue}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        messaging.system = crate::SYSTEM,
        messaging.destination.name = queue,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.message.id = message.message_id.as_deref(),
        messaging.message.body.size = message.body.len() as i64,
    );
    #[cfg(feature = "otel")]
    let message = {
        let mut message = message;
        if !message.headers.contains_key(idemq::otel::TRACEPARENT) {
            let _in_span = span.enter();
            idemq::otel::inject(&mut message.headers);
        }
        message
    };
    let props = new_properties(&message)?;
    let published = link
        .shared
        .publish(queue, &message.body, props, "publish")
        .instrument(span.clone())
        .await;
    if let Err(e) = &published {
        span.record("otel.status_code", "ERROR");
        span.record(
            "error.type",
            if e.is_transient() {
                "transient"
            } else {
                "permanent"
            },
        );
    }
    published
}

impl fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitPublisher")
            .field("config", self.config())
            .field("connected", &self.is_connected())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct_hex() {
        let a = generate_message_id();
        let b = generate_message_id();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
