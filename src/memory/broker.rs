//! [`MemoryBroker`]: a complete broker in process memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::error::Error;
use crate::message::{BrokerDeath, DeadLetter, Delivery, Headers, OutgoingMessage, retry_headers};
use crate::replay::{Confirm, DeadLetterQueue};

const BACKEND: &str = "memory";

#[derive(Clone, Debug)]
struct Stored {
    body: Bytes,
    message_id: Option<String>,
    headers: Headers,
    redelivered: bool,
    delivery_count: u32,
    broker_death: Option<BrokerDeath>,
}

impl Stored {
    fn from_outgoing(m: OutgoingMessage) -> Self {
        Stored {
            body: m.body,
            message_id: m.message_id,
            headers: m.headers,
            redelivered: false,
            delivery_count: 0,
            broker_death: None,
        }
    }

    fn copy_of(d: &Delivery, headers: Headers) -> Self {
        Stored {
            body: d.body.clone(),
            message_id: d.message_id.clone(),
            headers,
            redelivered: false,
            delivery_count: 0,
            broker_death: d.broker_death.clone(),
        }
    }

    fn deliver(&self, tag: u64) -> Delivery {
        let mut d = Delivery::new(tag, self.body.clone());
        d.message_id.clone_from(&self.message_id);
        d.headers.clone_from(&self.headers);
        d.redelivered = self.redelivered;
        d.delivery_count = Some(self.delivery_count);
        d.broker_death.clone_from(&self.broker_death);
        d
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Work,
    Dead,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Stored>,
    delayed: BTreeMap<(Instant, u64), Stored>,
    unacked: HashMap<u64, (Origin, Stored), foldhash::fast::RandomState>,
    unacked_work: usize,
    dead: VecDeque<Stored>,
    next_tag: u64,
    closed: bool,
    close_when_idle: bool,
    stats: MemoryBrokerStats,
}

impl State {
    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    fn idle(&self) -> bool {
        self.ready.is_empty() && self.delayed.is_empty() && self.unacked_work == 0
    }

    fn take(&mut self, tag: u64) -> Result<(Origin, Stored), Error> {
        let (origin, stored) = self.unacked.remove(&tag).ok_or(Error::StaleDelivery {
            backend: BACKEND,
            tag,
        })?;
        if origin == Origin::Work {
            self.unacked_work -= 1;
        }
        Ok((origin, stored))
    }

    /// The broker's own dead-lettering, with its reason (an `x-death`).
    fn broker_dead_letter(&mut self, mut stored: Stored, queue: &str, reason: &str) {
        stored.broker_death = Some(BrokerDeath {
            reason: reason.to_owned(),
            queue: queue.to_owned(),
            count: 1,
            time_ms: Some(crate::message::unix_millis_now()),
        });
        stored.delivery_count = 0;
        stored.redelivered = false;
        self.stats.broker_dead_lettered += 1;
        self.dead.push_back(stored);
    }

    fn requeue(&mut self, origin: Origin, mut stored: Stored, limit: Option<(&str, u32)>) {
        stored.redelivered = true;
        stored.delivery_count += 1;
        match (origin, limit) {
            // Returned once too often: the broker dead-letters it itself.
            (Origin::Work, Some((queue, limit))) if stored.delivery_count > limit => {
                self.broker_dead_letter(stored, queue, "delivery_limit");
            }
            (Origin::Work, _) => self.ready.push_front(stored),
            (Origin::Dead, _) => self.dead.push_front(stored),
        }
    }
}

/// Counters of a [`MemoryBroker`], and what it holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryBrokerStats {
    /// Messages published to the work queue (replays included).
    pub published: u64,
    /// Deliveries handed out (redeliveries included).
    pub delivered: u64,
    /// Deliveries acked.
    pub acked: u64,
    /// Deliveries nacked with requeue.
    pub requeued: u64,
    /// Deliveries nacked without requeue (dead-lettered by the broker, as
    /// RabbitMQ's work queue does with idemq's topology).
    pub discarded: u64,
    /// Copies sent to the delay stage by `retry_later`.
    pub retried: u64,
    /// Copies sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Messages the broker dead-lettered itself (a rejection, its delivery
    /// limit), with a [`BrokerDeath`].
    pub broker_dead_lettered: u64,
    /// Messages waiting in the work queue now.
    pub ready: usize,
    /// Copies waiting out their retry delay now.
    pub delayed: usize,
    /// Deliveries handed out and not yet settled now.
    pub unacked: usize,
    /// Messages in the dead-letter queue now.
    pub dead: usize,
}

struct Inner {
    queue: String,
    prefetch: Option<usize>,
    delivery_limit: Option<u32>,
    state: Mutex<State>,
    changed: Notify,
}

/// A broker in process memory: one work queue, a delay stage and a
/// dead-letter queue, shared by every clone (so several engines can consume
/// from it like consumers of one RabbitMQ queue).
///
/// It behaves like the real one where that matters to the engine: unacked
/// deliveries are tracked, `nack` with requeue redelivers with the
/// `redelivered` flag and a growing delivery count, `retry_later` copies
/// come back after their delay (on the tokio clock, so tests can pause
/// time), dead letters carry their headers and can be read back and
/// replayed, and [`MemoryBroker::requeue_unacked`] simulates a consumer
/// whose connection dropped.
///
/// [`Broker::next`] waits while nothing is due. It returns `None` after
/// [`MemoryBroker::close`], or after [`MemoryBroker::close_when_idle`] once
/// nothing is ready, delayed or unacked: that is how a test or a batch job
/// says "stop when everything is settled".
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("queue", &self.inner.queue)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new("work")
    }
}

impl MemoryBroker {
    /// A broker whose work queue is called `queue` (the name goes into the
    /// original-queue header of dead letters), with no prefetch limit.
    pub fn new(queue: impl Into<String>) -> Self {
        Self::build(queue.into(), None)
    }

    /// The same with a prefetch limit: at most `prefetch` deliveries of the
    /// work queue are unacked at once, across all consumers.
    pub fn with_prefetch(queue: impl Into<String>, prefetch: usize) -> Self {
        Self::build(queue.into(), Some(prefetch.max(1)))
    }

    fn build(queue: String, prefetch: Option<usize>) -> Self {
        MemoryBroker {
            inner: Arc::new(Inner {
                queue,
                prefetch,
                delivery_limit: None,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// Like a quorum queue's delivery limit: a work-queue message returned
    /// (nacked with requeue, or unacked when a consumer drops) more than
    /// `limit` times is moved to the dead-letter queue by the broker, with
    /// a [`BrokerDeath`] of reason `delivery_limit`. Set it before sharing
    /// the broker (clones made before do not see it).
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.delivery_limit = Some(limit);
        }
        self
    }

    fn limit(&self) -> Option<(&str, u32)> {
        self.inner
            .delivery_limit
            .map(|l| (self.inner.queue.as_str(), l))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        self.inner.changed.notify_waiters();
    }

    /// Counters and current sizes.
    pub fn stats(&self) -> MemoryBrokerStats {
        let s = self.state();
        MemoryBrokerStats {
            ready: s.ready.len(),
            delayed: s.delayed.len(),
            unacked: s.unacked.len(),
            dead: s.dead.len(),
            ..s.stats
        }
    }

    /// Stops deliveries: every `next` returns `None` from now on.
    pub fn close(&self) {
        self.state().closed = true;
        self.wake();
    }

    /// `next` returns `None` once nothing is ready, delayed or unacked.
    pub fn close_when_idle(&self) {
        self.state().close_when_idle = true;
        self.wake();
    }

    /// Puts every unacked delivery back at the head of its queue, flagged
    /// redelivered, as a broker does when a consumer's connection drops.
    /// Settling one of the old deliveries afterwards fails with
    /// [`Error::StaleDelivery`]. Answers how many were requeued.
    pub fn requeue_unacked(&self) -> usize {
        let mut s = self.state();
        let all: Vec<_> = s.unacked.drain().collect();
        s.unacked_work = 0;
        let n = all.len();
        // Put them back in tag order (the order they were delivered in).
        let mut all = all;
        all.sort_by_key(|(tag, _)| std::cmp::Reverse(*tag));
        for (_, (origin, stored)) in all {
            s.requeue(origin, stored, self.limit());
        }
        drop(s);
        self.wake();
        n
    }

    /// A copy of every message in the dead-letter queue (unacked ones not
    /// included), oldest first, as deliveries with tag 0 (not settleable).
    pub fn dead_letters(&self) -> Vec<Delivery> {
        self.state().dead.iter().map(|m| m.deliver(0)).collect()
    }

    /// A delivery if one is due now, or the end of the stream; `None` when
    /// the caller has to wait.
    fn try_next(&self) -> Option<Result<Option<Delivery>, Error>> {
        let mut s = self.state();
        if s.closed || (s.close_when_idle && s.idle()) {
            return Some(Ok(None));
        }
        if !s.delayed.is_empty() {
            s.promote_due(Instant::now());
        }
        let may_take = self.inner.prefetch.is_none_or(|p| s.unacked_work < p);
        if may_take && let Some(stored) = s.ready.pop_front() {
            return Some(Ok(Some(self.unacked_delivery(
                &mut s,
                Origin::Work,
                stored,
            ))));
        }
        None
    }

    fn unacked_delivery(&self, s: &mut State, origin: Origin, stored: Stored) -> Delivery {
        s.next_tag += 1;
        let tag = s.next_tag;
        s.stats.delivered += 1;
        if origin == Origin::Work {
            s.unacked_work += 1;
        }
        let d = stored.deliver(tag);
        s.unacked.insert(tag, (origin, stored));
        d
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn prepare(&self, _concurrency: usize) -> Option<usize> {
        self.inner.prefetch
    }

    /// The work queue's name, as given to [`MemoryBroker::new`].
    fn destination(&self) -> Option<String> {
        Some(self.inner.queue.clone())
    }

    /// `memory`.
    fn system(&self) -> Option<&'static str> {
        Some(BACKEND)
    }

    async fn next(&self) -> Result<Option<Delivery>, Error> {
        // Fast path: something is ready, no need to register for wake-ups.
        if let Some(found) = self.try_next() {
            return found;
        }
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = self.try_next() {
                return found;
            }
            let due = self
                .state()
                .delayed
                .first_key_value()
                .map(|((due, _), _)| *due);
            match due {
                Some(due) => {
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), Error> {
        let mut s = self.state();
        s.take(delivery.tag)?;
        s.stats.acked += 1;
        let idle = s.idle();
        drop(s);
        if idle || self.inner.prefetch.is_some() {
            self.wake();
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, requeue: bool) -> Result<(), Error> {
        let mut s = self.state();
        let (origin, stored) = s.take(delivery.tag)?;
        match (requeue, origin) {
            (true, _) => {
                s.stats.requeued += 1;
                s.requeue(origin, stored, self.limit());
            }
            // Rejected: the work queue dead-letters it, as RabbitMQ's does.
            (false, Origin::Work) => {
                s.stats.discarded += 1;
                let queue = self.inner.queue.as_str();
                s.broker_dead_letter(stored, queue, "rejected");
            }
            (false, Origin::Dead) => s.stats.discarded += 1,
        }
        drop(s);
        self.wake();
        Ok(())
    }

    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error> {
        let mut s = self.state();
        s.take(delivery.tag)?;
        s.next_tag += 1;
        let seq = s.next_tag;
        let copy = Stored::copy_of(delivery, retry_headers(delivery, attempt));
        s.delayed.insert((Instant::now() + delay, seq), copy);
        s.stats.retried += 1;
        drop(s);
        self.wake();
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, letter: &DeadLetter) -> Result<(), Error> {
        let headers = letter.headers_for(delivery, &self.inner.queue);
        let mut s = self.state();
        s.take(delivery.tag)?;
        s.dead.push_back(Stored::copy_of(delivery, headers));
        s.stats.dead_lettered += 1;
        drop(s);
        self.wake();
        Ok(())
    }

    /// With the `otel` feature, the current trace context goes into the
    /// message's headers unless it carries one already.
    async fn publish(&self, message: OutgoingMessage) -> Result<(), Error> {
        let span = crate::spans::send(BACKEND, &self.inner.queue, &message);
        let _entered = span.enter();
        #[cfg(feature = "otel")]
        let message = {
            let mut message = message;
            crate::otel::inject_if_absent(&mut message.headers);
            message
        };
        let mut s = self.state();
        if s.closed {
            return Err(Error::Closed { backend: BACKEND });
        }
        s.ready.push_back(Stored::from_outgoing(message));
        s.stats.published += 1;
        drop(s);
        self.wake();
        Ok(())
    }

    async fn next_dead_letter(&self) -> Result<Option<Delivery>, Error> {
        let mut s = self.state();
        let Some(stored) = s.dead.pop_front() else {
            return Ok(None);
        };
        Ok(Some(self.unacked_delivery(&mut s, Origin::Dead, stored)))
    }
}

/// The dead-letter queue of a [`MemoryBroker`], for [`crate::Replay`]:
/// copies go to the work queue at once (the confirm is immediate).
#[async_trait]
impl DeadLetterQueue for MemoryBroker {
    async fn depth(&self) -> Result<u64, Error> {
        Ok(self.state().dead.len() as u64)
    }

    async fn take(&self) -> Result<Option<Delivery>, Error> {
        self.next_dead_letter().await
    }

    async fn republish(&self, letter: &Delivery, headers: Headers) -> Result<Confirm, Error> {
        let mut s = self.state();
        if s.closed {
            return Err(Error::Closed { backend: BACKEND });
        }
        s.ready.push_back(Stored::copy_of(letter, headers));
        s.stats.published += 1;
        drop(s);
        self.wake();
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    async fn remove(&self, letter: &Delivery) -> Result<(), Error> {
        self.ack(letter).await
    }

    async fn put_back(&self, letters: Vec<Delivery>) -> Result<(), Error> {
        // A requeued dead letter goes to the head of the queue: the last
        // one first keeps their order.
        for letter in letters.iter().rev() {
            self.nack(letter, true).await?;
        }
        Ok(())
    }
}
