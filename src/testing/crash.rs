//! Crash points: a [`DedupStore`] wrapper that fails the engine at a
//! chosen step, so a test can prove what happens there (to the engine, and
//! to a handler's own effects) without a real network fault.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use idemq::memory::{MemoryBroker, MemoryDedupStore};
//! use idemq::testing::crash::{CrashPoint, CrashingStore};
//! use idemq::{Broker, Engine, Message, OutgoingMessage};
//!
//! let broker = MemoryBroker::new("orders");
//! broker.publish(OutgoingMessage::new("{}").with_message_id("order-1")).await?;
//! broker.close_when_idle();
//! // The completion after the handler's effect is lost once: the message
//! // comes back and the handler runs again, so its effect must be idempotent.
//! let store = CrashingStore::new(MemoryDedupStore::new());
//! store.crash_at(CrashPoint::BeforeComplete, 1);
//! let runs = Arc::new(AtomicU32::new(0));
//! let counted = runs.clone();
//! let engine = Engine::builder(broker, store.clone(), move |_m: Message| {
//!     let runs = counted.clone();
//!     async move {
//!         runs.fetch_add(1, Ordering::SeqCst);
//!         Ok(())
//!     }
//! })
//! .lease(std::time::Duration::from_millis(50))
//! .build()?;
//! let report = engine.run(Default::default()).await;
//! assert_eq!(store.crashes(), 1);
//! assert_eq!((report.handled, runs.load(Ordering::SeqCst)), (1, 2));
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;
use crate::store::{
    Claim, ClaimTtl, DedupStore, Fenced, Lease, LeaseToken, Record, RecordState, Release, Revival,
};

/// A step of the per-delivery state machine where [`CrashingStore`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CrashPoint {
    /// The claim is taken in the store, and its answer lost: the consumer
    /// died right after claiming. The engine requeues the delivery; the
    /// claim holds until its lease lapses, then a redelivery takes it over
    /// (attempt counted).
    AfterClaim,
    /// The handler ran (its effect happened) but the completion never
    /// reaches the store: the consumer died before marking the key done.
    /// Every completion of that lease fails (retries included), so the
    /// handler runs again once the lease lapses: what a handler whose
    /// effect is not idempotent must not allow.
    BeforeComplete,
    /// The completion is written, and its answer lost (a timeout, a cut
    /// connection): the engine must find its own done record and ack, not
    /// report a lost lease or run the handler again.
    AfterComplete,
    /// A `fail` (release after a failed attempt) is written, and its
    /// answer lost.
    AfterFail,
}

#[derive(Debug, Default)]
struct Plan {
    armed: Vec<(CrashPoint, u32)>,
    crashes: u64,
    /// The leases a point fired for: it fires once per lease (for
    /// `BeforeComplete`, every later completion of the lease fails too).
    hit: Vec<(CrashPoint, LeaseToken)>,
}

/// A [`DedupStore`] that passes every call to the store it wraps, except
/// at the [`CrashPoint`]s armed with [`CrashingStore::crash_at`], where
/// it answers a transient error ([`Error::Unavailable`], backend
/// `"crash"`) before or after the call took effect. Cheap to clone;
/// clones share the plan.
#[derive(Clone, Debug)]
pub struct CrashingStore<S> {
    inner: S,
    plan: Arc<Mutex<Plan>>,
}

impl<S: DedupStore> CrashingStore<S> {
    /// Wraps `inner`, with nothing armed.
    pub fn new(inner: S) -> Self {
        CrashingStore {
            inner,
            plan: Arc::default(),
        }
    }

    /// Fails the calls that reach `point` for the next `times` leases,
    /// once per lease (adds to what is armed there already): a retry of
    /// the same call then goes through, as after a lost answer.
    pub fn crash_at(&self, point: CrashPoint, times: u32) {
        let mut plan = self.lock();
        match plan.armed.iter_mut().find(|(p, _)| *p == point) {
            Some((_, n)) => *n = n.saturating_add(times),
            None => plan.armed.push((point, times)),
        }
    }

    /// How many leases a crash point fired for so far.
    pub fn crashes(&self) -> u64 {
        self.lock().crashes
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `point` fires now for `lease` (and counts it down).
    fn fires(&self, point: CrashPoint, lease: LeaseToken) -> bool {
        let mut plan = self.lock();
        if plan.hit.contains(&(point, lease)) {
            return point == CrashPoint::BeforeComplete;
        }
        let fired = match plan.armed.iter_mut().find(|(p, _)| *p == point) {
            Some((_, n)) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        if fired {
            plan.crashes += 1;
            plan.hit.push((point, lease));
        }
        fired
    }
}

fn crash(op: &'static str, point: CrashPoint) -> Error {
    Error::Unavailable {
        backend: "crash",
        op,
        source: format!("crash point {point:?}").into(),
    }
}

#[async_trait]
impl<S: DedupStore> DedupStore for CrashingStore<S> {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        let claim = self.inner.claim(scope, key, ttl).await?;
        if let Claim::Claimed(lease) = &claim
            && self.fires(CrashPoint::AfterClaim, lease.token)
        {
            return Err(crash("claim", CrashPoint::AfterClaim));
        }
        Ok(claim)
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.inner.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        if self.fires(CrashPoint::BeforeComplete, lease.token) {
            return Err(crash("complete", CrashPoint::BeforeComplete));
        }
        let fenced = self.inner.complete(lease, keep_for).await?;
        if self.fires(CrashPoint::AfterComplete, lease.token) {
            return Err(crash("complete", CrashPoint::AfterComplete));
        }
        Ok(fenced)
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        let fenced = self.inner.fail(lease, release).await?;
        if self.fires(CrashPoint::AfterFail, lease.token) {
            return Err(crash("fail", CrashPoint::AfterFail));
        }
        Ok(fenced)
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.inner.bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.inner.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.inner.lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.inner.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.inner.revive(scope, key).await
    }
}
