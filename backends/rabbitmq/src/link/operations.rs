//! What the broker, publisher and dead-letter reader do over a link:
//! publish, `basic.get`, settle; and checking a delivery's handle.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemq::{Delivery, Error};
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::ShortString;
use lapin::{Acker, BasicProperties, Channel, Confirmation};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tracing::debug;

use crate::config::QueueType;
use crate::errors::{BACKEND, is_connection_error, map};
use crate::headers::{broker_death, from_field_table, short_string};

use super::generation::Generation;
use super::{POLL, Shared};

/// The quorum queue header counting deliveries.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";

/// How a delivery is settled.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Settlement {
    /// `basic.ack` (batched on the consumer channel).
    Ack,
    /// `basic.nack`, back to the queue or (without `requeue`) to the
    /// queue's dead-letter target, if any.
    Nack { requeue: bool },
}

/// What a delivery carries for its settlement.
#[derive(Debug)]
pub(crate) struct Handle {
    /// The link that delivered it.
    pub link: u64,
    /// The generation (connection incarnation) that delivered it.
    pub generation: u64,
    /// lapin's acker (poisoned by lapin when its channel is lost).
    pub acker: Acker,
    /// The original properties, copied onto retried and dead-lettered copies.
    pub properties: BasicProperties,
    /// Delivered by the consumer channel, whose acks are batched.
    pub batched: bool,
}

impl Shared {
    /// The current generation; waits while it is being rebuilt. `Ok(None)`
    /// once closed; `Timeout` when `deadline` passes first.
    pub(super) async fn wait_generation(
        &self,
        deadline: Option<Instant>,
        op: &'static str,
    ) -> Result<Option<Arc<Generation>>, Error> {
        let mut rx = self.current.subscribe();
        loop {
            if self.closed.is_cancelled() {
                return Ok(None);
            }
            if let Some(g) = rx.borrow_and_update().clone()
                && !g.retired.is_cancelled()
            {
                return Ok(Some(g));
            }
            let until = deadline.unwrap_or_else(far_future);
            tokio::select! {
                _ = self.closed.cancelled() => return Ok(None),
                changed = rx.changed() => if changed.is_err() { return Ok(None) },
                _ = sleep_until(until) => return Err(self.timeout(op)),
            }
        }
    }

    fn timeout(&self, op: &'static str) -> Error {
        Error::Timeout {
            backend: BACKEND,
            op,
            after: self.cfg.publish_timeout(),
        }
    }

    /// After a connection-level error: waits until lapin has recovered the
    /// connection, or the supervisor has replaced the generation, then
    /// returns so the caller tries again. Fails at `deadline`.
    async fn pause_after(
        &self,
        generation: &Generation,
        channel: Option<Channel>,
        cause: lapin::Error,
        deadline: Instant,
        op: &'static str,
    ) -> Result<(), Error> {
        debug!(op, error = %cause, generation = generation.id,
            "RabbitMQ operation hit a broken connection; waiting for it to come back");
        let recovered = async {
            if let Some(ch) = channel
                && ch.wait_for_recovery(cause.clone()).await.is_ok()
            {
                return;
            }
            // Nothing to wait on in lapin: poll until the connection is
            // usable again or the supervisor retires this generation.
            loop {
                if generation.conn.status().connected() {
                    sleep(POLL).await; // no tight loop on a dead channel
                    return;
                }
                if generation.conn_dead() {
                    generation.mark_broken(format!("{op} failed: {cause}"));
                    generation.retired.cancelled().await;
                    return;
                }
                sleep(POLL).await;
            }
        };
        tokio::select! {
            _ = self.closed.cancelled() => Err(Error::Closed { backend: BACKEND }),
            _ = generation.retired.cancelled() => Ok(()),
            _ = recovered => Ok(()),
            _ = sleep_until(deadline) => Err(Error::Unavailable {
                backend: BACKEND,
                op,
                source: Box::new(cause.clone()),
            }),
        }
    }

    /// Publishes to the default exchange with routing key `queue`,
    /// mandatory, on a confirm channel, and waits for the confirm. Retries
    /// (until the publish timeout) across connection recovery: a copy may
    /// then be published twice, which the dedup record absorbs.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        op: &'static str,
    ) -> Result<(), Error> {
        let routing_key = short_string("queue name", queue)?;
        let deadline = Instant::now() + self.cfg.publish_timeout();
        loop {
            let Some(generation) = self.wait_generation(Some(deadline), op).await? else {
                return Err(Error::Closed { backend: BACKEND });
            };
            let checkout = tokio::select! {
                r = timeout_at(deadline, generation.checkout()) => r,
                _ = generation.retired.cancelled() => continue,
            };
            let channel = match checkout {
                Err(_) => return Err(self.timeout(op)),
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) if is_connection_error(&e) => {
                    self.pause_after(&generation, None, e, deadline, op).await?;
                    continue;
                }
                Ok(Err(e)) => return Err(map(op, e)),
            };
            let send = timeout_at(deadline, async {
                channel
                    .basic_publish(
                        ShortString::default(),
                        routing_key.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        body,
                        properties.clone(),
                    )
                    .await?
                    .await
            });
            let sent = tokio::select! {
                sent = send => sent,
                // Replaced meanwhile: publish again on the new connection.
                _ = generation.retired.cancelled() => continue,
            };
            match sent {
                // The channel is dropped (closed): its confirm is still due.
                Err(_) => return Err(self.timeout(op)),
                Ok(Ok(confirmation)) => {
                    generation.checkin(channel);
                    return confirmed(confirmation, queue);
                }
                Ok(Err(e)) if is_connection_error(&e) => {
                    self.pause_after(&generation, Some(channel), e, deadline, op)
                        .await?;
                }
                Ok(Err(e)) => return Err(map(op, e)),
            }
        }
    }

    /// Takes one message of `queue` with `basic.get`, unacked.
    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, Error> {
        const OP: &str = "next_dead_letter";
        let queue_name = short_string("queue name", queue)?;
        let deadline = Instant::now() + self.cfg.publish_timeout();
        loop {
            let Some(generation) = self.wait_generation(Some(deadline), OP).await? else {
                return Err(Error::Closed { backend: BACKEND });
            };
            let mut getter = generation.getter.lock().await;
            let channel = match getter.as_ref() {
                Some(ch) if ch.status().connected() || ch.status().reconnecting() => ch.clone(),
                _ => match tokio::select! {
                    r = timeout_at(deadline, generation.conn.create_channel()) => r,
                    _ = generation.retired.cancelled() => continue,
                } {
                    Err(_) => return Err(self.timeout(OP)),
                    Ok(Ok(ch)) => {
                        *getter = Some(ch.clone());
                        ch
                    }
                    Ok(Err(e)) if is_connection_error(&e) => {
                        drop(getter);
                        self.pause_after(&generation, None, e, deadline, OP).await?;
                        continue;
                    }
                    Ok(Err(e)) => return Err(map(OP, e)),
                },
            };
            let got = tokio::select! {
                got = timeout_at(
                    deadline,
                    channel.basic_get(queue_name.clone(), BasicGetOptions { no_ack: false }),
                ) => got,
                _ = generation.retired.cancelled() => continue,
            };
            match got {
                Err(_) => return Err(self.timeout(OP)),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(message))) => {
                    return Ok(Some(self.to_delivery(
                        message.delivery,
                        generation.id,
                        false,
                    )));
                }
                Ok(Err(e)) => {
                    *getter = None;
                    drop(getter);
                    if !is_connection_error(&e) {
                        return Err(map(OP, e));
                    }
                    self.pause_after(&generation, Some(channel), e, deadline, OP)
                        .await?;
                }
            }
        }
    }

    pub(super) fn to_delivery(&self, d: LapinDelivery, generation: u64, batched: bool) -> Delivery {
        let properties = d.properties;
        let headers = properties
            .headers()
            .as_ref()
            .map(from_field_table)
            .unwrap_or_default();
        let broker_death = properties.headers().as_ref().and_then(broker_death);
        let delivery_count = match self.cfg.queue_type() {
            QueueType::Quorum => Some(
                headers
                    .get(DELIVERY_COUNT)
                    .and_then(idemq::HeaderValue::as_i64)
                    .and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(0),
            ),
            QueueType::Classic => None,
        };
        let mut delivery = Delivery::new(d.delivery_tag, Bytes::from(d.data));
        delivery.message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        delivery.headers = headers;
        delivery.redelivered = d.redelivered;
        delivery.delivery_count = delivery_count;
        delivery.broker_death = broker_death;
        delivery.with_handle(Handle {
            link: self.link_id,
            generation,
            acker: d.acker,
            properties,
            batched,
        })
    }

    /// The delivery's handle, checked to come from this link and the
    /// current generation.
    pub fn handle<'d>(&self, delivery: &'d Delivery) -> Result<&'d Handle, Error> {
        self.handle_and_generation(delivery).map(|(h, _)| h)
    }

    fn handle_and_generation<'d>(
        &self,
        delivery: &'d Delivery,
    ) -> Result<(&'d Handle, Arc<Generation>), Error> {
        let Some(handle) = delivery.handle::<Handle>() else {
            return Err(Error::invalid(
                "delivery",
                "it was not delivered by a RabbitMQ broker",
            ));
        };
        if handle.link != self.link_id {
            return Err(Error::invalid(
                "delivery",
                "it was delivered by another RabbitMQ broker instance",
            ));
        }
        let current = self.current.borrow().clone();
        match current {
            Some(g) if g.id == handle.generation && handle.acker.usable() => Ok((handle, g)),
            current => {
                debug!(
                    tag = delivery.tag,
                    generation = handle.generation,
                    current = ?current.map(|g| g.id),
                    "settling a stale delivery"
                );
                Err(stale(delivery))
            }
        }
    }

    /// Acks or nacks through lapin's acker.
    pub async fn settle(
        &self,
        delivery: &Delivery,
        how: Settlement,
        op: &'static str,
    ) -> Result<(), Error> {
        let (handle, generation) = self.handle_and_generation(delivery)?;
        let batcher = generation.acks.as_ref().filter(|_| handle.batched);
        let send = async {
            match (how, batcher) {
                (Settlement::Ack, Some(acks)) => {
                    // Held, or sent with others; see `acks`.
                    acks.ack(delivery.tag, handle.acker.clone()).await
                }
                (Settlement::Ack, None) => handle.acker.ack(BasicAckOptions::default()).await,
                (Settlement::Nack { .. }, Some(acks)) if !acks.is_open(delivery.tag) => Ok(false),
                (Settlement::Nack { requeue }, _) => {
                    let sent = handle
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue,
                        })
                        .await;
                    // Only now may a multiple ack pass this tag.
                    if let Some(acks) = batcher {
                        acks.closed(delivery.tag).await;
                    }
                    sent
                }
            }
        };
        // lapin resolves an ack once its frame is written; on a connection
        // that is being replaced (or whose I/O loop stalled) that may be
        // never, so the wait is bounded.
        let result = tokio::select! {
            r = timeout(self.cfg.publish_timeout(), send) => match r {
                Ok(r) => r,
                Err(_) if generation.usable() => return Err(self.timeout(op)),
                Err(_) => return Err(stale(delivery)),
            },
            _ = generation.retired.cancelled() => return Err(stale(delivery)),
        };
        match result {
            Ok(true) => Ok(()),
            // Used already, or poisoned by a channel loss (lapin recovery).
            Ok(false) => Err(stale(delivery)),
            Err(e) if handle.acker.poisoned() || is_connection_error(&e) => Err(stale(delivery)),
            Err(e) => Err(map(op, e)),
        }
    }
}

fn stale(delivery: &Delivery) -> Error {
    Error::StaleDelivery {
        backend: BACKEND,
        tag: delivery.tag,
    }
}

pub(crate) fn confirmed(confirmation: Confirmation, queue: &str) -> Result<(), Error> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(Error::Unroutable {
            backend: BACKEND,
            target: queue.to_owned(),
        }),
        // NotRequested cannot happen on a confirm channel; never call it success.
        Confirmation::Nack(None) | Confirmation::NotRequested => Err(Error::NotConfirmed {
            backend: BACKEND,
            target: queue.to_owned(),
        }),
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_map_to_errors() {
        assert!(confirmed(Confirmation::Ack(None), "q").is_ok());
        assert!(matches!(
            confirmed(Confirmation::Nack(None), "q"),
            Err(Error::NotConfirmed { .. })
        ));
        assert!(matches!(
            confirmed(Confirmation::NotRequested, "q"),
            Err(Error::NotConfirmed { .. })
        ));
    }
}
