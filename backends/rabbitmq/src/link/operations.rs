//! What the broker, publisher and dead-letter reader do over a link:
//! publish and `basic.get` (both retried across connection recovery by one
//! helper, [`Shared::across_recovery`]), settle; and checking a delivery's
//! handle.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemq::{Delivery, Error, SharedError};
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
                source: SharedError::new(cause.clone()),
            }),
        }
    }

    /// Runs `attempt` on the current generation until it answers, within
    /// the publish timeout from now: `publish` and `get` across connection
    /// recovery and rebuilds. Waits while the generation is being rebuilt;
    /// tries again on the next one when the generation is retired during a
    /// step of the attempt ([`Attempt::step`]); after a connection-level
    /// error ([`Stop::Broken`]) waits for the connection to come back
    /// ([`Shared::pause_after`], `Unavailable` at the deadline) and tries
    /// again. Answers the timeout error when a step or the wait for a
    /// generation reaches the deadline, any other error as it is.
    async fn across_recovery<T, Fut>(
        &self,
        op: &'static str,
        mut attempt: impl FnMut(Attempt) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Stop>>,
    {
        let deadline = Instant::now() + self.cfg.publish_timeout();
        loop {
            let Some(generation) = self.wait_generation(Some(deadline), op).await? else {
                return Err(Error::Closed { backend: BACKEND });
            };
            let on = Attempt {
                generation: generation.clone(),
                deadline,
            };
            match attempt(on).await {
                Ok(answer) => return Ok(answer),
                Err(Stop::Retired) => continue,
                Err(Stop::TimedOut) => return Err(self.timeout(op)),
                Err(Stop::Failed(e)) => return Err(e),
                Err(Stop::Broken(cause, channel)) => {
                    self.pause_after(&generation, channel, cause, deadline, op)
                        .await?;
                }
            }
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
        let routing_key = &short_string("queue name", queue)?;
        let properties = &properties;
        self.across_recovery(op, |on| async move {
            let channel = on
                .step(on.generation.checkout())
                .await?
                .map_err(|e| Stop::lapin(op, e, None))?;
            // Timed out, or replaced meanwhile (then published again on the
            // new connection): the channel is dropped (closed), its confirm
            // still due.
            let sent = on
                .step(async {
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
                })
                .await?;
            match sent {
                Ok(confirmation) => {
                    on.generation.checkin(channel);
                    confirmed(confirmation, queue).map_err(Stop::Failed)
                }
                Err(e) => Err(Stop::lapin(op, e, Some(channel))),
            }
        })
        .await
    }

    /// Takes one message of `queue` with `basic.get`, unacked.
    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, Error> {
        const OP: &str = "next_dead_letter";
        let queue_name = &short_string("queue name", queue)?;
        self.across_recovery(OP, |on| async move {
            // The generation's `basic.get` channel, kept while lapin has it
            // up or is recovering it, and held for the whole get. Waiting
            // for it is not a step: neither deadline nor retirement cut it.
            let mut getter = on.generation.getter.lock().await;
            let channel = match getter.as_ref() {
                Some(ch) if ch.status().connected() || ch.status().reconnecting() => ch.clone(),
                _ => {
                    let ch = on
                        .step(on.generation.conn.create_channel())
                        .await?
                        .map_err(|e| Stop::lapin(OP, e, None))?;
                    *getter = Some(ch.clone());
                    ch
                }
            };
            let got = on
                .step(channel.basic_get(queue_name.clone(), BasicGetOptions { no_ack: false }))
                .await?;
            match got {
                Ok(message) => {
                    Ok(message.map(|m| self.to_delivery(m.delivery, on.generation.id, false)))
                }
                Err(e) => {
                    *getter = None;
                    Err(Stop::lapin(OP, e, Some(channel)))
                }
            }
        })
        .await
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

/// One try of an operation run by [`Shared::across_recovery`]: the
/// generation it runs on and the deadline of all tries.
struct Attempt {
    generation: Arc<Generation>,
    deadline: Instant,
}

impl Attempt {
    /// Runs one step of the try, bounded by the deadline and raced against
    /// the generation's retirement (dropped when either comes first).
    async fn step<F: Future>(&self, step: F) -> Result<F::Output, Stop> {
        tokio::select! {
            r = timeout_at(self.deadline, step) => r.map_err(|_| Stop::TimedOut),
            _ = self.generation.retired.cancelled() => Err(Stop::Retired),
        }
    }
}

/// Why a try of [`Shared::across_recovery`] ended without an answer.
enum Stop {
    /// The generation was retired: try again on the next one.
    Retired,
    /// The deadline passed.
    TimedOut,
    /// A connection-level error: wait for the connection to come back (on
    /// the channel it happened on, if any) and try again.
    Broken(lapin::Error, Option<Channel>),
    /// Any other error: answered as it is.
    Failed(Error),
}

impl Stop {
    /// A lapin error of `op`, on `channel` if any: a connection-level
    /// error is waited out, any other answered.
    fn lapin(op: &'static str, cause: lapin::Error, channel: Option<Channel>) -> Stop {
        if is_connection_error(&cause) {
            Stop::Broken(cause, channel)
        } else {
            Stop::Failed(map(op, cause))
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
