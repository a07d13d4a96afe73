//! [`RabbitBroker`]: the [`Broker`] over lapin.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idemq::message::retry_headers;
use idemq::{Broker, DeadLetter, Delivery, Error, Headers, OutgoingMessage};
use lapin::BasicProperties;

use crate::config::RabbitConfig;
use crate::headers::{short_string, to_field_table, to_field_table_keeping};
use crate::link::{DELIVERY_COUNT, Handle, Link, Settlement};

/// A [`Broker`] on one RabbitMQ work queue.
///
/// [`RabbitBroker::connect`] declares the topology (see [`crate::topology`]),
/// sets the prefetch and starts a consumer. The connection recovers by
/// itself (lapin's automatic recovery, then a full rebuild by a supervisor
/// task when that gives up); [`Broker::next`] simply waits meanwhile.
/// Settling a delivery of a connection that was lost since fails with
/// [`Error::StaleDelivery`]: the broker redelivers the message.
///
/// Cloning is cheap and shares the connection. Dropping the last clone
/// closes it; [`RabbitBroker::close`] does so and waits for it.
#[derive(Clone)]
pub struct RabbitBroker {
    link: Arc<Link>,
}

impl RabbitBroker {
    /// Connects and declares the topology; consuming starts at the first
    /// [`Broker::next`], so a broker used only to publish holds no
    /// prefetched messages. One attempt,
    /// bounded by the connect timeout: an unreachable server, bad
    /// credentials or a queue declared with other arguments are reported
    /// here (the last one as [`Error::Config`]).
    pub async fn connect(config: RabbitConfig) -> Result<RabbitBroker, Error> {
        let link = Link::connect(config, true).await?;
        Ok(RabbitBroker {
            link: Arc::new(link),
        })
    }

    #[cfg(test)]
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.link.shared.cfg
    }

    /// The connection generation: 1 for the first connection, one more for
    /// every rebuild by the supervisor (lapin's own recoveries keep it).
    /// `None` while a rebuild is under way or after [`RabbitBroker::close`].
    pub fn generation(&self) -> Option<u64> {
        self.link.shared.generation()
    }

    /// True when the connection is up (not recovering, not being rebuilt).
    pub fn is_connected(&self) -> bool {
        self.link.shared.is_connected()
    }

    /// Stops consuming and closes the connection; [`Broker::next`] returns
    /// `Ok(None)` from then on. Unsettled deliveries go back to the queue.
    ///
    /// Returns within about 2 seconds, however the connection fares: on a
    /// connection that is up, the acks held for batching and
    /// `connection.close` are written within that; a connection that is
    /// lost or being recovered is not waited for (should lapin's recovery
    /// bring it back later, it is closed then).
    pub async fn close(&self) {
        self.link.close().await;
    }

    fn handle<'d>(&self, delivery: &'d Delivery) -> Result<&'d Handle, Error> {
        self.link.shared.handle(delivery)
    }
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", self.config())
            .field("generation", &self.generation())
            .finish()
    }
}

/// The properties of a new message: persistent, with id and headers.
pub(crate) fn new_properties(message: &OutgoingMessage) -> Result<BasicProperties, Error> {
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if !message.headers.is_empty() {
        props = props.with_headers(to_field_table(&message.headers)?);
    }
    if let Some(id) = &message.message_id {
        props = props.with_message_id(short_string("message id", id)?);
    }
    Ok(props)
}

/// The properties of a copy of a delivery: the original's (without
/// expiration and user id, which the broker would check against this
/// connection), persistent, with `headers`.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    mut headers: Headers,
) -> Result<BasicProperties, Error> {
    // The quorum queue's count belongs to the original; the copy is new.
    headers.remove(DELIVERY_COUNT);
    let table = to_field_table_keeping(&headers, original.headers().as_ref())?;
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    Ok(p)
}

#[async_trait]
impl Broker for RabbitBroker {
    /// Sizes the prefetch to twice `concurrency` unless
    /// [`RabbitConfig::with_prefetch`] set one; answers the prefetch.
    async fn prepare(&self, concurrency: usize) -> Option<usize> {
        Some(usize::from(
            self.link.shared.size_prefetch(concurrency).await,
        ))
    }

    async fn next(&self) -> Result<Option<Delivery>, Error> {
        self.link.shared.next().await
    }

    /// The work queue's name ([`RabbitConfig::queue`]).
    fn destination(&self) -> Option<String> {
        Some(self.config().queue().to_owned())
    }

    /// `rabbitmq`.
    fn system(&self) -> Option<&'static str> {
        Some(crate::SYSTEM)
    }

    /// The same as [`RabbitBroker::is_connected`]: `false` while lapin
    /// recovers the connection or the supervisor rebuilds it.
    fn is_connected(&self) -> bool {
        self.link.shared.is_connected()
    }

    /// Cancels the consumer (`basic.cancel`) and requeues what it had
    /// prefetched but not handed out; the next [`Broker::next`] starts it
    /// again.
    async fn pause(&self) -> Result<bool, Error> {
        self.link.shared.pause().await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), Error> {
        self.link
            .shared
            .settle(delivery, Settlement::Ack, "ack")
            .await
    }

    async fn nack(&self, delivery: &Delivery, requeue: bool) -> Result<(), Error> {
        self.link
            .shared
            .settle(delivery, Settlement::Nack { requeue }, "nack")
            .await
    }

    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error> {
        // A stale delivery comes back by itself: no copy for it.
        let handle = self.handle(delivery)?;
        let queue = self.config().retry_queue(delay);
        let props = copy_properties(&handle.properties, retry_headers(delivery, attempt))?;
        self.link
            .shared
            .publish(&queue, &delivery.body, props, "retry_later")
            .await?;
        self.ack(delivery).await
    }

    async fn dead_letter(&self, delivery: &Delivery, letter: &DeadLetter) -> Result<(), Error> {
        let handle = self.handle(delivery)?;
        let queue = self.config().dead_letter_queue();
        let headers = letter.headers_for(delivery, self.config().queue());
        let props = copy_properties(&handle.properties, headers)?;
        self.link
            .shared
            .publish(&queue, &delivery.body, props, "dead_letter")
            .await?;
        self.ack(delivery).await
    }

    /// With the `otel` feature, the current trace context goes into the
    /// message's headers unless it carries one.
    async fn publish(&self, message: OutgoingMessage) -> Result<(), Error> {
        crate::publisher::publish_traced(&self.link, self.config().queue(), message).await
    }

    async fn next_dead_letter(&self) -> Result<Option<Delivery>, Error> {
        let queue = self.config().dead_letter_queue();
        self.link.shared.get(&queue).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idemq::HeaderValue;
    use lapin::types::{AMQPValue, FieldArray, FieldTable};

    #[test]
    fn copies_keep_properties_but_not_expiration_or_delivery_count() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
        );
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_expiration("1000".into())
            .with_user_id("someone".into())
            .with_headers(table.clone());
        let mut headers = crate::headers::from_field_table(&table);
        headers.insert("x-idemq-attempt".into(), HeaderValue::Int(2));
        let copy = copy_properties(&original, headers).expect("props");
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(
            copy.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*copy.delivery_mode(), Some(2));
        assert!(copy.expiration().is_none() && copy.user_id().is_none());
        let h = copy.headers().clone().unwrap_or_default();
        assert!(!h.contains_key("x-delivery-count"));
        assert_eq!(h.inner().get("x-death"), table.inner().get("x-death"));
        assert_eq!(
            h.inner().get("x-idemq-attempt"),
            Some(&AMQPValue::LongLongInt(2))
        );
    }

    #[test]
    fn new_messages_are_persistent_and_checked() {
        let p = new_properties(&OutgoingMessage::new("b").with_message_id("id")).expect("props");
        assert_eq!(*p.delivery_mode(), Some(2));
        assert!(p.headers().is_none());
        let long = OutgoingMessage::new("b").with_message_id("i".repeat(256));
        assert!(matches!(
            new_properties(&long),
            Err(Error::InvalidInput { .. })
        ));
    }
}
