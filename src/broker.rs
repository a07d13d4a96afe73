//! The [`Broker`] trait: where deliveries come from and how they are settled.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::{DeadLetter, Delivery, OutgoingMessage};

/// A message broker seen from one consumer: a source of deliveries and the
/// operations that settle them.
///
/// Every delivery is settled exactly once, by `ack`, `nack`, `retry_later` or
/// `dead_letter`. The two publishing settlements are safe against loss:
/// the copy is confirmed by the broker *before* the original is acked, so a
/// crash in between leaves a duplicate (which the dedup store absorbs), never
/// a gap.
///
/// Implementations must be cancel safe in [`Broker::next`]: dropping the
/// future before it resolves must not lose a delivery.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Tells the broker, before the first [`Broker::next`], how many
    /// deliveries its consumer settles concurrently (the engine's
    /// concurrency). A broker whose limit of unsettled deliveries was not
    /// set explicitly sizes it from this (RabbitMQ: a prefetch of twice
    /// `concurrency`, so held acks never starve a handler); an explicit
    /// limit is kept. Answers that limit, when there is one, so the caller
    /// can say when it caps the concurrency. The default does nothing.
    async fn prepare(&self, concurrency: usize) -> Option<usize> {
        let _ = concurrency;
        None
    }

    /// Waits for the next delivery of the work queue. `Ok(None)` means the
    /// broker is closed for good and no delivery will ever come. After
    /// [`Broker::pause`], the first call resumes the flow of deliveries.
    async fn next(&self) -> Result<Option<Delivery>, Error>;

    /// Stops the flow of deliveries to this consumer until the next call
    /// of [`Broker::next`], and gives back (requeued, for other consumers)
    /// what the client holds that `next` has not handed out yet. The
    /// engine calls it when its dedup store fails (fail closed), so a
    /// consumer cut off from its store does not sit on messages others
    /// could handle. Answers whether the broker paused; the default does
    /// nothing and answers `false` (nothing is held ahead: the in-memory
    /// broker hands out only what `next` returns).
    async fn pause(&self) -> Result<bool, Error> {
        Ok(false)
    }

    /// Acknowledges a delivery: the broker forgets the message.
    async fn ack(&self, delivery: &Delivery) -> Result<(), Error>;

    /// Rejects a delivery. With `requeue` the broker delivers it again
    /// (flagged `redelivered`); without, the broker dead-letters it itself
    /// (reason `rejected`, see [`crate::BrokerDeath`]): nothing a broker
    /// gives up on vanishes.
    async fn nack(&self, delivery: &Delivery, requeue: bool) -> Result<(), Error>;

    /// Publishes a persistent copy carrying `attempt` in the
    /// [`crate::headers::ATTEMPT`] header to a delay stage, waits for the
    /// broker's confirm, then acks the original. The copy returns to the
    /// work queue after (at least) `delay`; brokers with fixed delay tiers
    /// round up to the next tier, capped at their longest.
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error>;

    /// Publishes a persistent copy to the dead-letter queue with the headers
    /// of [`DeadLetter::headers_for`], waits for the confirm, then acks the
    /// original. The original is never acked before the copy is confirmed.
    async fn dead_letter(&self, delivery: &Delivery, letter: &DeadLetter) -> Result<(), Error>;

    /// Publishes a persistent message to the work queue, with confirms.
    async fn publish(&self, message: OutgoingMessage) -> Result<(), Error>;

    /// Takes the next message of the dead-letter queue without waiting:
    /// `Ok(None)` when it is empty. The result is settled like any
    /// delivery (`ack` removes it from the dead-letter queue, `nack` with
    /// requeue puts it back). Used by replay and inspection.
    async fn next_dead_letter(&self) -> Result<Option<Delivery>, Error>;

    /// The name of the work queue this broker consumes, when it has one:
    /// the engine puts it on its metrics as `messaging.destination.name`.
    /// Asked once, when an engine is built. The default answers `None`.
    fn destination(&self) -> Option<String> {
        None
    }

    /// The messaging system, as OpenTelemetry's `messaging.system` names
    /// it (`rabbitmq`, say): the engine puts it on its spans. Asked once,
    /// when an engine is built. The default answers `None`.
    fn system(&self) -> Option<&'static str> {
        None
    }

    /// Whether the connection to the broker is up right now. `false`
    /// while a client reconnects (deliveries cannot come meanwhile): the
    /// engine's health then reads "broker reconnecting".
    /// Polled a few times a second, so it must be cheap and must not
    /// block. The default answers `true` (a broker without a connection).
    fn is_connected(&self) -> bool {
        true
    }
}

#[async_trait]
impl<T: Broker + ?Sized> Broker for Arc<T> {
    async fn prepare(&self, concurrency: usize) -> Option<usize> {
        (**self).prepare(concurrency).await
    }
    async fn next(&self) -> Result<Option<Delivery>, Error> {
        (**self).next().await
    }
    async fn pause(&self) -> Result<bool, Error> {
        (**self).pause().await
    }
    async fn ack(&self, delivery: &Delivery) -> Result<(), Error> {
        (**self).ack(delivery).await
    }
    async fn nack(&self, delivery: &Delivery, requeue: bool) -> Result<(), Error> {
        (**self).nack(delivery, requeue).await
    }
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error> {
        (**self).retry_later(delivery, delay, attempt).await
    }
    async fn dead_letter(&self, delivery: &Delivery, letter: &DeadLetter) -> Result<(), Error> {
        (**self).dead_letter(delivery, letter).await
    }
    async fn publish(&self, message: OutgoingMessage) -> Result<(), Error> {
        (**self).publish(message).await
    }
    async fn next_dead_letter(&self) -> Result<Option<Delivery>, Error> {
        (**self).next_dead_letter().await
    }
    fn destination(&self) -> Option<String> {
        (**self).destination()
    }
    fn system(&self) -> Option<&'static str> {
        (**self).system()
    }
    fn is_connected(&self) -> bool {
        (**self).is_connected()
    }
}
