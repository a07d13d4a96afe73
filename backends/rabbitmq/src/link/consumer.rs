//! The work queue's consumer: starting, pausing and resizing it (each
//! change [`detached`], so a caller that stops waiting cannot leave it half
//! done), reading its deliveries across recovery and rebuilds, and watching
//! consumers lapin's recovery may bring back after a cancel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use futures::StreamExt;
use idemq::{Delivery, Error, SharedError};
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use tokio::sync::Mutex;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::acks::AckBatcher;
use crate::errors::{BACKEND, map};
use crate::headers::short_string;

use super::generation::Generation;
use super::quarantine::is_parse_error;
use super::{POLL, Shared};

pub(super) struct ConsumerSlot {
    pub(super) channel: Channel,
    /// The running consumer: `None` until the first `next` (a broker only
    /// used to publish holds no prefetch nobody reads) and while paused.
    pub(super) consumer: Mutex<Option<Consumer>>,
    /// The prefetch the current consumer was started with.
    pub(super) prefetch: AtomicU16,
    /// Deliveries a replaced consumer had read ahead: handed out first.
    pub(super) backlog: StdMutex<VecDeque<LapinDelivery>>,
    /// No consumer runs (not started yet, or paused): `next` starts one.
    pub(super) paused: AtomicBool,
}

impl ConsumerSlot {
    /// Restarts the consumer with a larger prefetch (RabbitMQ applies a
    /// `basic.qos` to consumers started after it): the old one is
    /// cancelled, what it had read ahead stays ours and is handed out
    /// first, in order. A stopped consumer only gets the new `basic.qos`.
    /// Answers the cancelled consumer, to be watched ([`watch_cancelled`]).
    async fn grow(&self, queue: &str, prefetch: u16) -> Result<Option<Consumer>, Error> {
        let mut consumer = self.consumer.lock().await;
        if self.prefetch.load(Ordering::SeqCst) >= prefetch {
            return Ok(None);
        }
        let mut cancelled = None;
        if let Some(old) = consumer.as_mut() {
            let read = self.cancel_and_drain(old).await?;
            // Stopped until the new one runs: should starting it fail,
            // `next` starts one.
            cancelled = consumer.take();
            self.paused.store(true, Ordering::SeqCst);
            if let Ok(mut backlog) = self.backlog.lock() {
                backlog.extend(read);
            }
        }
        self.channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| map("basic.qos", e))?;
        self.prefetch.store(prefetch, Ordering::SeqCst);
        if cancelled.is_some() {
            *consumer = Some(self.consume(queue).await?);
            self.paused.store(false, Ordering::SeqCst);
        }
        Ok(cancelled)
    }

    /// Cancels the consumer and answers what it had read ahead: after
    /// cancel-ok the stream ends once what was read is handed out. On an
    /// error the caller keeps the consumer: lapin's recovery may restart
    /// it, and its deliveries must still be read.
    async fn cancel_and_drain(&self, consumer: &mut Consumer) -> Result<Vec<LapinDelivery>, Error> {
        self.channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| map("basic.cancel", e))?;
        let mut read = Vec::new();
        while let Ok(Some(Ok(d))) = timeout(POLL * 4, consumer.next()).await {
            read.push(d);
        }
        Ok(read)
    }

    async fn consume(&self, queue: &str) -> Result<Consumer, Error> {
        self.channel
            .basic_consume(
                short_string("queue name", queue)?,
                consumer_tag(queue),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map("basic.consume", e))
    }

    /// Cancels the consumer and requeues what it (and the backlog) held
    /// ahead, so that other consumers take it; answers how many. A second
    /// call before `resume` does nothing.
    ///
    /// Each delivery given back is noted open in `acks` until its nack is
    /// written, so no multiple ack covers it first. Answers also the
    /// cancelled consumer, to be watched ([`watch_cancelled`]).
    async fn pause(
        &self,
        acks: Option<&Arc<AckBatcher>>,
    ) -> Result<(usize, Option<Consumer>), Error> {
        let mut consumer = self.consumer.lock().await;
        if self.paused.load(Ordering::SeqCst) {
            return Ok((0, None));
        }
        let mut held = Vec::new();
        if let Some(running) = consumer.as_mut() {
            // On an error nothing changed: the consumer and the backlog
            // stay, and `next` goes on handing them out.
            held = self.cancel_and_drain(running).await?;
        }
        let cancelled = consumer.take();
        self.paused.store(true, Ordering::SeqCst);
        if let Ok(mut backlog) = self.backlog.lock() {
            held.splice(0..0, backlog.drain(..));
        }
        let mut given_back = 0;
        for d in held {
            if d.acker.poisoned() {
                continue; // of a lost channel: the broker has it back already
            }
            if let Some(acks) = acks {
                acks.opened(d.delivery_tag);
            }
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            match d.acker.nack(requeue).await {
                Ok(_) => given_back += 1,
                // Unsettled, it returns to the queue when the channel closes.
                Err(e) => {
                    debug!(error = %e, tag = d.delivery_tag, "could not give a delivery back")
                }
            }
            if let Some(acks) = acks {
                acks.closed(d.delivery_tag).await;
            }
        }
        Ok((given_back, cancelled))
    }

    /// Starts the consumer (the first time, or after `pause`).
    async fn resume(&self, queue: &str) -> Result<(), Error> {
        let mut consumer = self.consumer.lock().await;
        if !self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        *consumer = Some(self.consume(queue).await?);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Watches a consumer cancelled with `basic.cancel`, for `within`. lapin's
/// recovery restarts the consumers it knew when the connection was lost,
/// so one whose cancel-ok arrived while that recovery ran comes back to
/// life, delivering to a handle nobody reads: its messages would sit
/// unacked until the channel closes. A delivery on it marks the generation
/// broken; the rebuild closes the channel and the broker hands those
/// messages to live consumers.
fn watch_cancelled(generation: &Arc<Generation>, mut consumer: Consumer, within: Duration) {
    let generation = generation.clone();
    tokio::spawn(async move {
        let until = tokio::time::sleep(within);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = generation.retired.cancelled() => return,
                _ = &mut until => return,
                item = consumer.next() => {
                    // The end of its stream, an error, or a delivery of a
                    // lost channel: nothing to do.
                    if let Some(Ok(d)) = item && !d.acker.poisoned() {
                        warn!(generation = generation.id, tag = d.delivery_tag,
                            consumer = consumer.tag().as_str(),
                            "a cancelled consumer was restarted by lapin's recovery; rebuilding");
                        generation.mark_broken(
                            "a cancelled consumer was restarted by lapin's recovery".to_owned(),
                        );
                        return;
                    }
                }
            }
        }
    });
}

/// Runs a change of the consumer (start, pause, new prefetch) in a task of
/// its own, so that it completes even when the caller stops waiting: a
/// cancelled `next` must not leave a consumer started at the broker but
/// not recorded here (its deliveries would sit unread, and a multiple ack
/// could cover them), nor deliveries taken from the backlog and not given
/// back.
async fn detached<T: Send + 'static>(
    change: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    match tokio::spawn(change).await {
        Ok(result) => result,
        Err(e) => Err(Error::Backend {
            backend: BACKEND,
            op: "consumer change",
            transient: true,
            source: SharedError::new(e),
        }),
    }
}

impl Shared {
    /// Sizes the prefetch for an engine of `concurrency` (twice it), unless
    /// the configuration sets one; answers the prefetch in force. The
    /// current consumer is restarted with it when it had less; later
    /// generations start with it.
    pub async fn size_prefetch(&self, concurrency: usize) -> u16 {
        if let Some(explicit) = self.cfg.explicit_prefetch() {
            return explicit;
        }
        let want = u16::try_from(concurrency.saturating_mul(2))
            .unwrap_or(u16::MAX)
            .max(1);
        let before = self.prefetch.fetch_max(want, Ordering::SeqCst);
        if want <= before {
            return before;
        }
        let current = self.current.borrow().clone();
        if let Some(generation) = current.filter(|g| g.consumer.is_some())
            && let Err(e) = detached({
                let (queue, watch) = (self.cfg.queue().to_owned(), self.cancelled_watch());
                async move {
                    if let Some(slot) = &generation.consumer
                        && let Some(cancelled) = slot.grow(&queue, want).await?
                    {
                        watch_cancelled(&generation, cancelled, watch);
                    }
                    Ok(())
                }
            })
            .await
        {
            // The next generation starts with it anyway.
            warn!(error = %e, prefetch = want, "could not raise the consumer's prefetch now");
        }
        want
    }

    /// How long a cancelled consumer is watched for a restart by lapin's
    /// recovery: a recovery under way when it was cancelled ends within
    /// `max_recovery_time` (or the generation is rebuilt), twice that
    /// leaves room for restoring the channel's consumers.
    fn cancelled_watch(&self) -> Duration {
        self.cfg.recovery().max_recovery_time * 2 + Duration::from_secs(5)
    }

    /// Pauses the current consumer (see [`ConsumerSlot::pause`]); answers
    /// whether there was one to pause.
    pub async fn pause(&self) -> Result<bool, Error> {
        let current = self.current.borrow().clone();
        let Some(generation) = current.filter(|g| g.consumer.is_some()) else {
            return Ok(false);
        };
        let watch = self.cancelled_watch();
        let given_back = detached(async move {
            let Some(slot) = &generation.consumer else {
                return Ok(0);
            };
            let (given_back, cancelled) = slot.pause(generation.acks.as_ref()).await?;
            if let Some(cancelled) = cancelled {
                watch_cancelled(&generation, cancelled, watch);
            }
            Ok(given_back)
        })
        .await?;
        info!(
            queue = self.cfg.queue(),
            given_back, "consumer paused; deliveries held ahead given back"
        );
        Ok(true)
    }

    /// The next delivery of the consumer; waits across recovery and
    /// rebuilds. Cancel safe: lapin keeps a delivery until it is returned.
    pub async fn next(&self) -> Result<Option<Delivery>, Error> {
        loop {
            let Some(generation) = self.wait_generation(None, "next").await? else {
                return Ok(None);
            };
            let Some(slot) = generation.consumer.as_ref() else {
                return Err(Error::Unsupported {
                    backend: BACKEND,
                    op: "next on a publisher",
                });
            };
            if slot.paused.load(Ordering::SeqCst) {
                let (g, queue) = (generation.clone(), self.cfg.queue().to_owned());
                let started = tokio::select! {
                    _ = self.closed.cancelled() => return Ok(None),
                    _ = generation.retired.cancelled() => continue,
                    started = detached(async move {
                        match &g.consumer {
                            Some(slot) => slot.resume(&queue).await,
                            None => Ok(()),
                        }
                    }) => started,
                };
                match started {
                    Ok(()) => {}
                    // Closed or replaced while it started.
                    Err(_) if self.closed.is_cancelled() => return Ok(None),
                    Err(_) if generation.retired.is_cancelled() => continue,
                    Err(e) => return Err(e),
                }
                debug!(queue = self.cfg.queue(), "consumer started");
            }
            let mut consumer = tokio::select! {
                _ = self.closed.cancelled() => return Ok(None),
                _ = generation.retired.cancelled() => continue,
                c = slot.consumer.lock() => c,
            };
            let read_ahead = slot.backlog.lock().ok().and_then(|mut b| b.pop_front());
            let item = match (read_ahead, consumer.as_mut()) {
                (Some(d), _) => Some(Ok(d)),
                // Paused again since it was started: start it again.
                (None, None) => continue,
                (None, Some(running)) => tokio::select! {
                    _ = self.closed.cancelled() => return Ok(None),
                    _ = generation.retired.cancelled() => continue,
                    item = running.next() => item,
                },
            };
            drop(consumer);
            let reason = match item {
                Some(Ok(d)) => {
                    if d.acker.poisoned() {
                        // Prefetched on a channel that was lost since: it
                        // cannot be settled and comes back from the broker.
                        debug!(
                            tag = d.delivery_tag,
                            "skipping a delivery of a lost channel"
                        );
                        continue;
                    }
                    if let Some(acks) = &generation.acks
                        && let Some(skipped) = acks.opened(d.delivery_tag)
                    {
                        // Delivered to this channel and never handed out: a
                        // consumer nobody reads. Multiple acks stop short of
                        // them, and the rebuild gives them back.
                        warn!(generation = generation.id, tags = ?skipped,
                            "deliveries of the consumer channel were never handed out; rebuilding");
                        generation.mark_broken(format!(
                            "deliveries {skipped:?} of the consumer channel were never handed out"
                        ));
                    }
                    let batched = generation.acks.is_some();
                    return Ok(Some(self.to_delivery(d, generation.id, batched)));
                }
                Some(Err(e)) => {
                    if is_parse_error(&e) {
                        generation.note_parse_error(&e);
                    }
                    format!("the consumer failed: {e}")
                }
                None => "the broker cancelled the consumer (queue deleted?)".to_owned(),
            };
            warn!(generation = generation.id, queue = self.cfg.queue(), %reason,
                "RabbitMQ consumer stopped; rebuilding");
            generation.mark_broken(reason);
            tokio::select! {
                _ = self.closed.cancelled() => return Ok(None),
                _ = generation.retired.cancelled() => {}
            }
        }
    }
}

fn consumer_tag(queue: &str) -> ShortString {
    let mut short = String::new();
    for c in queue.chars() {
        if short.len() + c.len_utf8() > 200 {
            break;
        }
        short.push(c);
    }
    let tag = format!("idemq-{short}-{:016x}", rand::random::<u64>());
    ShortString::try_new(tag).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tokio::time::{Instant, timeout_at};

    use super::*;
    use crate::config::RabbitConfig;

    #[test]
    fn consumer_tags_are_short_strings() {
        let tag = consumer_tag(&"é".repeat(300));
        assert!(tag.as_str().starts_with("idemq-"));
        assert!(tag.as_str().len() <= 255);
    }

    /// A consumer on the consumer channel that nobody reads (as lapin's
    /// recovery can leave one) takes every other delivery: its messages
    /// must come back, not sit unacked until the connection ends. The
    /// skipped tags mark the generation broken, and the rebuild returns
    /// them to the queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_to_a_consumer_nobody_reads_come_back() {
        use idemq::{Broker, OutgoingMessage};
        const N: usize = 40;
        let url = std::env::var(crate::URL_ENV).unwrap_or_else(|_| crate::DEFAULT_URL.to_owned());
        let queue = format!("idemq-test.{}", idemq::testing::unique_scope("orphan"));
        let cfg = RabbitConfig::new(url, queue.clone()).with_prefetch(4);
        let broker = match crate::RabbitBroker::connect(cfg.clone()).await {
            Ok(b) => b,
            Err(e) => return idemq::testing::service_unavailable("rabbitmq", e).unwrap_or(()),
        };
        for i in 0..N {
            broker
                .publish(OutgoingMessage::new("m").with_message_id(format!("m-{i}")))
                .await
                .expect("publish");
        }
        let first = broker.next().await.expect("next").expect("open");
        let mut handed_out = std::collections::HashSet::from([first.message_id.clone()]);
        broker.ack(&first).await.expect("ack");
        let generation = broker
            .link()
            .shared
            .current
            .borrow()
            .clone()
            .expect("generation");
        let channel = &generation.consumer.as_ref().expect("consumer").channel;
        let _unread = channel
            .basic_consume(
                short_string("queue", &queue).expect("queue"),
                "nobody-reads".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("a second consumer");
        let deadline = Instant::now() + Duration::from_secs(30);
        while handed_out.len() < N && Instant::now() < deadline {
            let Ok(next) = timeout_at(deadline, broker.next()).await else {
                break;
            };
            let d = next.expect("next").expect("open");
            handed_out.insert(d.message_id.clone());
            // A delivery of the replaced generation is stale: it comes back.
            let _ = broker.ack(&d).await;
        }
        assert_eq!(handed_out.len(), N, "messages held by the unread consumer");
        assert!(
            generation.retired.is_cancelled(),
            "the generation was replaced"
        );
        broker.close().await;
        crate::delete_topology(&cfg).await.expect("delete");
    }
}
