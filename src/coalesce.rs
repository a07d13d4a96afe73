//! [`Coalescing`]: a [`DedupStore`] wrapper that merges the claims and the
//! completions of concurrent callers into batch calls.
//!
//! An engine with concurrency N calls `claim` and `complete` from up to N
//! tasks at once, one key each. Against a networked store each call is a
//! round trip and, for Postgres, a commit. `Coalescing` lets a few calls go
//! straight through (at most [`Coalescing::with_max_in_flight`] at a time);
//! the calls that arrive while those are out wait in a queue, and the next
//! free slot sends everything queued as one
//! [`DedupStore::claim_many`] / [`DedupStore::complete_many`]. A lone
//! caller never waits for a batch to fill: with nothing in flight its call
//! goes out at once, so sequential use costs what the plain store costs.
//!
//! It only pays off over a store whose batch forms are one round trip (the
//! Redis and Postgres stores); over a store that loops in `claim_many` it
//! adds a hop and batches nothing.
//!
//! ```
//! use idemq::coalesce::Coalescing;
//! use idemq::memory::MemoryDedupStore;
//! # use idemq::{Claim, ClaimTtl, DedupStore};
//! # use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
//! let store = Coalescing::new(MemoryDedupStore::new())
//!     .with_max_batch(256)
//!     .with_max_in_flight(4);
//! let ttl = ClaimTtl { lease: Duration::from_secs(30), retain: Duration::from_secs(60) };
//! assert!(matches!(store.claim("orders", "o-1", ttl).await?, Claim::Claimed(_)));
//! # Ok(()) }
//! ```
//!
//! One file, past 600 lines: one generic lane and the two wrappers that
//! use it, whose ordering and error rules are the point; a seventh is
//! its documentation.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::fast::RandomState;
use tokio::sync::oneshot;

use crate::Error;
use crate::key;
use crate::store::{
    Claim, ClaimTtl, DedupStore, Fenced, Lease, Record, RecordState, Release, Revival,
};

/// Default for [`Coalescing::with_max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 128;
/// Default for [`Coalescing::with_max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// A [`DedupStore`] that merges concurrent `claim` and `complete` calls into
/// `claim_many` / `complete_many` calls of the store it wraps.
///
/// What it promises:
///
/// - Every answer is the one the wrapped store gave for that key: the
///   batch forms answer key by key, so a batch means exactly what the same
///   calls one after another would. A batch never holds the same record
///   twice; a repeat waits for the next batch.
/// - Claims are grouped by scope and [`ClaimTtl`], completions by
///   `keep_for`; calls that differ go out in different batches.
/// - At most `max_in_flight` claim calls (single or batch) and as many
///   completion calls are outstanding at once; a batch holds at most
///   `max_batch` keys.
/// - A bad scope or key fails its own call with
///   [`Error::InvalidInput`] before it is queued; it never fails a batch.
/// - When a batch call fails with a transient error, every call in it
///   gets a clone of the error, its source included. When it fails for good
///   (say, one record holds a value the store cannot read), its calls are
///   made again one by one, so only the call at fault fails.
/// - A caller that gives up (its future dropped) while its claim is
///   queued is left out of the batch; one that gives up while the batch is
///   out has the claim it won given back at once (released, attempt
///   refunded), so no record stays claimed by nobody until its lease lapses.
///
/// `renew`, `fail`, `bury`, `get`, `forget` and the batch forms go straight
/// to the wrapped store. Cheap to clone: clones share the queues.
///
/// Batches are sent from tasks spawned on the current tokio runtime.
pub struct Coalescing<S> {
    inner: Arc<Shared<S>>,
}

impl<S> Clone for Coalescing<S> {
    fn clone(&self) -> Self {
        Coalescing {
            inner: self.inner.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Coalescing<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalescing")
            .field("store", &self.inner.store)
            .field("max_batch", &self.max_batch())
            .field("max_in_flight", &self.max_in_flight())
            .field("stats", &self.stats())
            .finish()
    }
}

/// How many calls went out how, since the wrapper was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoalescingStats {
    /// `claim` calls sent on their own (a slot was free).
    pub direct_claims: u64,
    /// `claim` calls that went out in a `claim_many`.
    pub batched_claims: u64,
    /// `claim_many` calls made for them.
    pub claim_batches: u64,
    /// `complete` calls sent on their own.
    pub direct_completes: u64,
    /// `complete` calls that went out in a `complete_many`.
    pub batched_completes: u64,
    /// `complete_many` calls made for them.
    pub complete_batches: u64,
    /// `claim` calls waiting in the queue right now.
    pub queued_claims: usize,
    /// `complete` calls waiting in the queue right now.
    pub queued_completes: usize,
}

struct Shared<S> {
    store: S,
    max_batch: AtomicUsize,
    max_in_flight: AtomicUsize,
    claims: Lane<ClaimJob>,
    completes: Lane<CompleteJob>,
    counts: Counts,
}

impl<S> Shared<S> {
    fn max_batch(&self) -> usize {
        self.max_batch.load(Ordering::Relaxed)
    }
    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Counts {
    direct_claims: AtomicU64,
    batched_claims: AtomicU64,
    claim_batches: AtomicU64,
    direct_completes: AtomicU64,
    batched_completes: AtomicU64,
    complete_batches: AtomicU64,
}

struct Lane<J> {
    state: Mutex<LaneState<J>>,
}

struct LaneState<J> {
    in_flight: usize,
    queue: VecDeque<J>,
}

impl<J> Lane<J> {
    fn new() -> Self {
        Lane {
            state: Mutex::new(LaneState {
                in_flight: 0,
                queue: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LaneState<J>> {
        // The state stays consistent across a panic (counters and a queue
        // changed in single steps), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One queued call.
trait Job: Send + Sized + 'static {
    /// Whether `self` may share a batch call with `first`.
    fn joins(&self, first: &Self) -> bool;
    /// The record it touches: a batch holds each at most once.
    fn record(&self) -> (&str, &str);
    /// Whether its caller gave up waiting.
    fn abandoned(&self) -> bool;
}

struct ClaimJob {
    scope: String,
    key: String,
    ttl: ClaimTtl,
    reply: oneshot::Sender<Result<Claim, Error>>,
}

impl Job for ClaimJob {
    fn joins(&self, first: &Self) -> bool {
        self.scope == first.scope && self.ttl == first.ttl
    }
    fn record(&self) -> (&str, &str) {
        (&self.scope, &self.key)
    }
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

struct CompleteJob {
    lease: Lease,
    keep_for: Duration,
    reply: oneshot::Sender<Result<Fenced, Error>>,
}

impl Job for CompleteJob {
    fn joins(&self, first: &Self) -> bool {
        self.keep_for == first.keep_for
    }
    fn record(&self) -> (&str, &str) {
        (&self.lease.scope, &self.lease.key)
    }
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Which lane a slot belongs to.
#[derive(Clone, Copy)]
enum Which {
    Claims,
    Completes,
}

/// A taken in-flight slot; giving it back sends what queued meanwhile.
struct Slot<S: DedupStore + 'static> {
    shared: Arc<Shared<S>>,
    which: Which,
}

impl<S: DedupStore + 'static> Drop for Slot<S> {
    fn drop(&mut self) {
        match self.which {
            Which::Claims => {
                let mut st = self.shared.claims.lock();
                st.in_flight = st.in_flight.saturating_sub(1);
                flush_claims(&self.shared, st);
            }
            Which::Completes => {
                let mut st = self.shared.completes.lock();
                st.in_flight = st.in_flight.saturating_sub(1);
                flush_completes(&self.shared, st);
            }
        }
    }
}

impl<S: DedupStore + 'static> Coalescing<S> {
    /// Wraps `store` with [`DEFAULT_MAX_BATCH`] and
    /// [`DEFAULT_MAX_IN_FLIGHT`].
    pub fn new(store: S) -> Self {
        Coalescing {
            inner: Arc::new(Shared {
                store,
                max_batch: AtomicUsize::new(DEFAULT_MAX_BATCH),
                max_in_flight: AtomicUsize::new(DEFAULT_MAX_IN_FLIGHT),
                claims: Lane::new(),
                completes: Lane::new(),
                counts: Counts::default(),
            }),
        }
    }

    /// At most this many keys per batch call (at least 1). Applies to
    /// every clone.
    pub fn with_max_batch(self, max_batch: usize) -> Self {
        self.inner
            .max_batch
            .store(max_batch.max(1), Ordering::Relaxed);
        self
    }

    /// At most this many claim calls, and as many completion calls, out at
    /// once (at least 1). More lets a pooled store (Postgres) work on
    /// several batches in parallel; fewer makes bigger batches. Applies to
    /// every clone.
    pub fn with_max_in_flight(self, max_in_flight: usize) -> Self {
        self.inner
            .max_in_flight
            .store(max_in_flight.max(1), Ordering::Relaxed);
        self
    }

    fn slot(&self, which: Which) -> Slot<S> {
        Slot {
            shared: self.inner.clone(),
            which,
        }
    }
}

impl<S> Coalescing<S> {
    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner.store
    }

    /// The largest batch.
    pub fn max_batch(&self) -> usize {
        self.inner.max_batch.load(Ordering::Relaxed)
    }

    /// The most calls per kind out at once.
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::Relaxed)
    }

    /// How many calls went out alone and in batches so far.
    pub fn stats(&self) -> CoalescingStats {
        let c = &self.inner.counts;
        CoalescingStats {
            direct_claims: c.direct_claims.load(Ordering::Relaxed),
            batched_claims: c.batched_claims.load(Ordering::Relaxed),
            claim_batches: c.claim_batches.load(Ordering::Relaxed),
            direct_completes: c.direct_completes.load(Ordering::Relaxed),
            batched_completes: c.batched_completes.load(Ordering::Relaxed),
            complete_batches: c.complete_batches.load(Ordering::Relaxed),
            queued_claims: self.inner.claims.lock().queue.len(),
            queued_completes: self.inner.completes.lock().queue.len(),
        }
    }
}

/// Takes one batch off the queue: the first live job and the live jobs
/// after it that join it, one per record, up to `max`. Abandoned jobs are
/// dropped on the way (their callers are gone).
fn take_batch<J: Job>(queue: &mut VecDeque<J>, max: usize) -> Vec<J> {
    while queue.front().is_some_and(Job::abandoned) {
        queue.pop_front();
    }
    if queue.is_empty() {
        return Vec::new();
    }
    // First pass, borrowing: which jobs go (one per record, joining the
    // first). Second pass: move them out, keep the rest in order.
    let mut take = vec![false; queue.len()];
    {
        let mut seen: HashSet<(&str, &str), RandomState> =
            HashSet::with_capacity_and_hasher(max.min(queue.len()), RandomState::default());
        let first = &queue[0];
        let mut n = 0;
        for (i, job) in queue.iter().enumerate() {
            if n == max {
                break;
            }
            if job.abandoned() || !job.joins(first) {
                continue;
            }
            if seen.insert(job.record()) {
                take[i] = true;
                n += 1;
            }
        }
    }
    let mut batch = Vec::with_capacity(take.iter().filter(|t| **t).count());
    let mut rest = VecDeque::with_capacity(queue.len() - batch.capacity());
    for (job, go) in queue.drain(..).zip(take) {
        if go {
            batch.push(job);
        } else if !job.abandoned() {
            rest.push_back(job);
        }
    }
    *queue = rest;
    batch
}

/// Sends one batch; the slot it holds is given back when it is done.
type SendBatch<S, J> = fn(Arc<Shared<S>>, Vec<J>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Sends what is queued while slots are free. Called with the lane locked.
fn flush<S: DedupStore + 'static, J: Job>(
    shared: &Arc<Shared<S>>,
    mut st: MutexGuard<'_, LaneState<J>>,
    which: Which,
    send: SendBatch<S, J>,
) {
    while st.in_flight < shared.max_in_flight() && !st.queue.is_empty() {
        let batch = take_batch(&mut st.queue, shared.max_batch());
        if batch.is_empty() {
            break;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to send from (dropped outside one): the waiting
            // callers get an error from their dropped reply senders.
            st.queue.clear();
            return;
        };
        st.in_flight += 1;
        let slot = Slot {
            shared: shared.clone(),
            which,
        };
        let sending = send(shared.clone(), batch);
        rt.spawn(async move {
            sending.await;
            drop(slot);
        });
    }
}

fn flush_claims<S: DedupStore + 'static>(
    shared: &Arc<Shared<S>>,
    st: MutexGuard<'_, LaneState<ClaimJob>>,
) {
    flush(shared, st, Which::Claims, |sh, batch| {
        Box::pin(async move { run_claims(&sh, batch).await })
    });
}

fn flush_completes<S: DedupStore + 'static>(
    shared: &Arc<Shared<S>>,
    st: MutexGuard<'_, LaneState<CompleteJob>>,
) {
    flush(shared, st, Which::Completes, |sh, batch| {
        Box::pin(async move { run_completes(&sh, batch).await })
    });
}

async fn run_claims<S: DedupStore>(shared: &Shared<S>, batch: Vec<ClaimJob>) {
    let Some(first) = batch.first() else { return };
    let (scope, ttl) = (first.scope.clone(), first.ttl);
    let keys: Vec<String> = batch.iter().map(|j| j.key.clone()).collect();
    shared.counts.claim_batches.fetch_add(1, Ordering::Relaxed);
    shared
        .counts
        .batched_claims
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let answers = shared
        .store
        .claim_many(&scope, &keys, ttl)
        .await
        .and_then(|a| same_len("claim_many", a, batch.len()));
    match answers {
        Ok(answers) => {
            for (job, answer) in batch.into_iter().zip(answers) {
                answer_claim(shared, job.reply, Ok(answer)).await;
            }
        }
        // One bad record (say, a foreign value at its key) must not fail
        // the calls it happened to share a batch with: call them one by one.
        Err(e) if !e.is_transient() && batch.len() > 1 => {
            for job in batch {
                if job.abandoned() {
                    continue;
                }
                let answer = shared.store.claim(&job.scope, &job.key, job.ttl).await;
                answer_claim(shared, job.reply, answer).await;
            }
        }
        Err(e) => reply_all(batch.into_iter().map(|j| j.reply), e),
    }
}

/// Hands a claim's answer to its caller. When the caller is gone, nobody
/// will complete a claim it won: give it back rather than let the record
/// stay claimed until the lease lapses.
async fn answer_claim<S: DedupStore>(
    shared: &Shared<S>,
    reply: oneshot::Sender<Result<Claim, Error>>,
    answer: Result<Claim, Error>,
) {
    if let Err(Ok(Claim::Claimed(lease))) = reply.send(answer)
        && let Err(e) = shared.store.fail(&lease, Release::RefundAttempt).await
    {
        tracing::warn!(error = %e, key = %lease.key,
            "could not release a claim whose caller gave up; its lease will lapse");
    }
}

async fn run_completes<S: DedupStore>(shared: &Shared<S>, batch: Vec<CompleteJob>) {
    let Some(first) = batch.first() else { return };
    let keep_for = first.keep_for;
    let leases: Vec<Lease> = batch.iter().map(|j| j.lease.clone()).collect();
    shared
        .counts
        .complete_batches
        .fetch_add(1, Ordering::Relaxed);
    shared
        .counts
        .batched_completes
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let answers = shared
        .store
        .complete_many(&leases, keep_for)
        .await
        .and_then(|a| same_len("complete_many", a, batch.len()));
    match answers {
        Ok(answers) => {
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = job.reply.send(Ok(answer));
            }
        }
        Err(e) if !e.is_transient() && batch.len() > 1 => {
            for job in batch {
                let answer = shared.store.complete(&job.lease, job.keep_for).await;
                let _ = job.reply.send(answer);
            }
        }
        Err(e) => reply_all(batch.into_iter().map(|j| j.reply), e),
    }
}

fn same_len<T>(op: &'static str, answers: Vec<T>, want: usize) -> Result<Vec<T>, Error> {
    if answers.len() == want {
        Ok(answers)
    } else {
        Err(Error::Backend {
            backend: "store",
            op,
            transient: true,
            source: format!("{} answers for {want} keys", answers.len()).into(),
        })
    }
}

fn reply_all<T>(replies: impl Iterator<Item = oneshot::Sender<Result<T, Error>>>, e: Error) {
    for reply in replies {
        let _ = reply.send(Err(e.clone()));
    }
}

/// The error of a call whose batch never answered (its task was dropped
/// with the runtime). Transient: the same call may work again.
fn gone(op: &'static str) -> Error {
    Error::Backend {
        backend: "store",
        op,
        transient: true,
        source: "the batch carrying this call was dropped before it answered".into(),
    }
}

#[async_trait]
impl<S: DedupStore + 'static> DedupStore for Coalescing<S> {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        key::check(scope, key)?;
        let queued = {
            let mut st = self.inner.claims.lock();
            if st.in_flight < self.inner.max_in_flight() {
                st.in_flight += 1;
                None
            } else {
                let (reply, rx) = oneshot::channel();
                st.queue.push_back(ClaimJob {
                    scope: scope.to_owned(),
                    key: key.to_owned(),
                    ttl,
                    reply,
                });
                Some(rx)
            }
        };
        match queued {
            Some(rx) => rx.await.unwrap_or_else(|_| Err(gone("claim"))),
            None => {
                let _slot = self.slot(Which::Claims);
                self.inner
                    .counts
                    .direct_claims
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.store.claim(scope, key, ttl).await
            }
        }
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.inner.store.renew(lease, extend).await
    }

    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        let queued = {
            let mut st = self.inner.completes.lock();
            if st.in_flight < self.inner.max_in_flight() {
                st.in_flight += 1;
                None
            } else {
                let (reply, rx) = oneshot::channel();
                st.queue.push_back(CompleteJob {
                    lease: lease.clone(),
                    keep_for,
                    reply,
                });
                Some(rx)
            }
        };
        match queued {
            Some(rx) => rx.await.unwrap_or_else(|_| Err(gone("complete"))),
            None => {
                let _slot = self.slot(Which::Completes);
                self.inner
                    .counts
                    .direct_completes
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.store.complete(lease, keep_for).await
            }
        }
    }

    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.inner.store.fail(lease, release).await
    }

    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.inner.store.bury(lease, keep_for).await
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.inner.store.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.inner.store.lease_state(lease).await
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.inner.store.forget(scope, key).await
    }

    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.inner.store.revive(scope, key).await
    }

    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        self.inner.store.revive_many(records).await
    }

    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        self.inner.store.claim_many(scope, keys, ttl).await
    }

    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        self.inner.store.complete_many(leases, keep_for).await
    }
}
