//! Instrumentation for the bench: a [`DedupStore`] wrapper that counts
//! store round trips, and a [`Broker`] wrapper that times each delivery
//! from receipt to settlement and stops the run once every published
//! message is settled.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idemq::{
    Broker, Claim, ClaimTtl, DeadLetter, DedupStore, Delivery, Error, Fenced, Lease,
    OutgoingMessage, Record, RecordState, Release, Revival,
};
use tokio_util::sync::CancellationToken;

/// A [`DedupStore`] that forwards every call and counts it: one call is one
/// round trip to the store (the batch forms are one round trip each).
pub struct CountingStore<S> {
    inner: S,
    calls: Arc<AtomicU64>,
}

impl<S> CountingStore<S> {
    /// Wraps `inner`; the count is shared through `calls`.
    pub fn new(inner: S, calls: Arc<AtomicU64>) -> Self {
        CountingStore { inner, calls }
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl<S: DedupStore> DedupStore for CountingStore<S> {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        self.count();
        self.inner.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.count();
        self.inner.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.count();
        self.inner.complete(lease, keep_for).await
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.count();
        self.inner.fail(lease, release).await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.count();
        self.inner.bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.count();
        self.inner.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.count();
        self.inner.lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.count();
        self.inner.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.count();
        self.inner.revive(scope, key).await
    }
    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        self.count();
        self.inner.revive_many(records).await
    }
    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        self.count();
        self.inner.claim_many(scope, keys, ttl).await
    }
    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        self.count();
        self.inner.complete_many(leases, keep_for).await
    }
}

/// What a phase of the bench measures while it runs, shared between the
/// consumer and the bench driver.
pub struct Meter {
    /// Deliveries settled (acked, rejected or dead-lettered) so far.
    pub settled: AtomicU64,
    /// Settled deliveries after which the run is over.
    pub target: u64,
    /// Receipt-to-settlement latency of each settled delivery, in µs.
    latencies: Mutex<Vec<u32>>,
    /// When the first delivery was received: the phase's clock starts
    /// there, so connecting and declaring are not timed, for the baselines
    /// and the engine alike.
    first: std::sync::OnceLock<Instant>,
    /// When the last expected delivery was settled.
    finished: Mutex<Option<Instant>>,
    /// Cancelled once `settled` reaches `target`.
    pub done: CancellationToken,
}

impl Meter {
    /// A meter expecting `target` settlements.
    pub fn new(target: u64) -> Arc<Self> {
        Arc::new(Meter {
            settled: AtomicU64::new(0),
            target,
            latencies: Mutex::new(Vec::with_capacity(target as usize)),
            first: std::sync::OnceLock::new(),
            finished: Mutex::new(None),
            done: CancellationToken::new(),
        })
    }

    /// Notes a received delivery; answers the time, for [`Meter::settle`].
    pub fn received(&self) -> Instant {
        let now = Instant::now();
        let _ = self.first.set(now);
        now
    }

    /// The time from the first receipt to the last expected settlement (or
    /// to now, if the phase did not finish).
    pub fn elapsed(&self) -> Duration {
        let end = self.finished_at().unwrap_or_else(Instant::now);
        self.first
            .get()
            .map(|first| end.saturating_duration_since(*first))
            .unwrap_or_default()
    }

    /// Notes one settled delivery that was received at `since`.
    pub fn settle(&self, since: Instant) {
        let micros = u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX);
        if let Ok(mut l) = self.latencies.lock() {
            l.push(micros);
        }
        let n = self.settled.fetch_add(1, Ordering::AcqRel) + 1;
        if n == self.target {
            if let Ok(mut f) = self.finished.lock() {
                *f = Some(Instant::now());
            }
            self.done.cancel();
        }
    }

    /// Settled deliveries so far.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }

    /// When the target was reached, if it was.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished.lock().ok().and_then(|f| *f)
    }

    /// The p50 and p99 latencies in milliseconds.
    pub fn percentiles(&self) -> (f64, f64) {
        let mut l = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        if l.is_empty() {
            return (0.0, 0.0);
        }
        l.sort_unstable();
        let at = |q: f64| {
            let i = ((l.len() as f64 - 1.0) * q).round() as usize;
            f64::from(l[i.min(l.len() - 1)]) / 1000.0
        };
        (at(0.50), at(0.99))
    }
}

/// A [`Broker`] that notes when each delivery is received and reports its
/// settlement to a [`Meter`].
pub struct TimedBroker<B> {
    inner: B,
    meter: Arc<Meter>,
    received: Mutex<HashMap<u64, Instant>>,
}

impl<B> TimedBroker<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, meter: Arc<Meter>) -> Self {
        TimedBroker {
            inner,
            meter,
            received: Mutex::new(HashMap::new()),
        }
    }

    fn settled(&self, delivery: &Delivery) {
        let since = self
            .received
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&delivery.tag));
        if let Some(since) = since {
            self.meter.settle(since);
        }
    }
}

#[async_trait]
impl<B: Broker> Broker for TimedBroker<B> {
    async fn next(&self) -> Result<Option<Delivery>, Error> {
        let d = self.inner.next().await?;
        if let Some(d) = &d
            && let Ok(mut r) = self.received.lock()
        {
            r.insert(d.tag, self.meter.received());
        }
        Ok(d)
    }
    async fn ack(&self, delivery: &Delivery) -> Result<(), Error> {
        self.inner.ack(delivery).await?;
        self.settled(delivery);
        Ok(())
    }
    async fn nack(&self, delivery: &Delivery, requeue: bool) -> Result<(), Error> {
        self.inner.nack(delivery, requeue).await?;
        if requeue {
            if let Ok(mut r) = self.received.lock() {
                r.remove(&delivery.tag);
            }
        } else {
            self.settled(delivery);
        }
        Ok(())
    }
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error> {
        // The copy comes back later and is counted then.
        self.inner.retry_later(delivery, delay, attempt).await?;
        if let Ok(mut r) = self.received.lock() {
            r.remove(&delivery.tag);
        }
        Ok(())
    }
    async fn dead_letter(&self, delivery: &Delivery, letter: &DeadLetter) -> Result<(), Error> {
        self.inner.dead_letter(delivery, letter).await?;
        self.settled(delivery);
        Ok(())
    }
    async fn publish(&self, message: OutgoingMessage) -> Result<(), Error> {
        self.inner.publish(message).await
    }
    async fn next_dead_letter(&self) -> Result<Option<Delivery>, Error> {
        self.inner.next_dead_letter().await
    }
    fn destination(&self) -> Option<String> {
        self.inner.destination()
    }
    fn system(&self) -> Option<&'static str> {
        self.inner.system()
    }
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}
