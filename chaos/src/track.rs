//! What the suite watches: every published copy of every message (through
//! a header it carries), which engine holds which delivery, every handler
//! run, and every completion's answer. Collected by thin wrappers around
//! the broker, the store and the handler that change nothing they forward.
//!
//! One file, past 600 lines: the tracker and the three wrappers that feed
//! it share its state and its notion of a copy.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use idemq::{
    Broker, Claim, ClaimTtl, Completion, DeadLetter, DedupStore, Delivery, Error, Fenced, Handler,
    HandlerError, Lease, Message, OutgoingMessage, Record, RecordState, Release, Revival,
};
use idemq_rabbitmq::RabbitBroker;
use tokio::time::Instant;

use crate::outcome::parse_id;

/// The header that numbers each published copy. Retried, deferred and
/// dead-lettered copies keep their delivery's headers, so it follows a
/// copy all the way.
pub const COPY_HEADER: &str = "x-chaos-copy";

/// The copy number a delivery carries.
pub fn copy_of(d: &Delivery) -> Option<u64> {
    d.header(COPY_HEADER)
        .and_then(idemq::HeaderValue::as_i64)
        .and_then(|n| u64::try_from(n).ok())
}

/// One published copy.
#[derive(Clone, Debug)]
struct Copy {
    id: u32,
    /// Not settled for good yet (acked or dead-lettered).
    live: bool,
    /// Last time anything happened to it: published, taken, settled,
    /// returned by a crash.
    touched: Instant,
    /// Already reported as stuck (reported once until touched again).
    stuck: bool,
    /// The last thing that happened to it was a store operation under its
    /// lease that failed: the engine is retrying its settlement through a
    /// store outage (backing off up to the failure backoff's cap), which holds
    /// the copy by design rather than hoarding it.
    store_waiting: bool,
    /// The last few things that happened to it.
    history: Vec<(Instant, String)>,
}

/// One handler run.
#[derive(Clone, Debug)]
pub struct Run {
    /// Engine slot.
    pub engine: usize,
    /// Engine incarnation.
    pub inc: u32,
    /// Attempt, as the store counted it.
    pub attempt: u32,
    /// The lease token.
    pub token: u64,
}

/// One effect recorded by a handler outside the dedup store.
#[derive(Clone, Debug)]
pub struct Effect {
    /// Engine slot.
    pub engine: usize,
    /// Engine incarnation.
    pub inc: u32,
    /// Attempt, as the store counted it.
    pub attempt: u32,
    /// The lease token of the run (0 when unknown).
    pub token: u64,
}

/// The answers `complete` got for one lease.
#[derive(Clone, Copy, Debug, Default)]
pub struct Completions {
    /// `Fenced::Applied`.
    pub applied: u32,
    /// `Fenced::LeaseLost`.
    pub lease_lost: u32,
    /// Errors (the store unreachable, a timeout).
    pub errors: u32,
}

#[derive(Default)]
struct State {
    copies: HashMap<u64, Copy>,
    /// Per incarnation: (copy, delivery tag) taken and not settled yet.
    in_flight: HashMap<u32, HashSet<(u64, u64)>>,
    /// Copies whose handler runs now, with how many runs.
    in_handler: HashMap<u64, u32>,
    runs: HashMap<u32, Vec<Run>>,
    effects: HashMap<u32, Vec<Effect>>,
    completes: HashMap<u64, Completions>,
    /// The copy each lease token was handed with (its handler ran).
    lease_copy: HashMap<u64, u64>,
    aborted: HashSet<u32>,
    max_attempt: u32,
    over_limit: Vec<String>,
    foreign: u64,
}

/// Shared by every engine incarnation of one run.
pub struct Tracker {
    epoch: Instant,
    max_attempts: u32,
    state: Mutex<State>,
}

/// A copy that sat untouched outside every engine's hands.
#[derive(Clone, Debug)]
pub struct Stuck {
    /// Copy number.
    pub copy: u64,
    /// Its id.
    pub id: u32,
    /// For how long nothing happened to it.
    pub untouched: Duration,
    /// What happened to it last, with times since the start of the run.
    pub history: String,
}

impl Tracker {
    /// A tracker for engines allowing `max_attempts` handler runs per id.
    pub fn new(max_attempts: u32, epoch: Instant) -> Arc<Tracker> {
        Arc::new(Tracker {
            epoch,
            max_attempts,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy is about to be published.
    pub fn published(&self, copy: u64, id: u32) {
        self.lock().copies.insert(
            copy,
            Copy {
                id,
                live: true,
                touched: Instant::now(),
                stuck: false,
                store_waiting: false,
                history: vec![(Instant::now(), "published".into())],
            },
        );
    }

    fn touch(state: &mut State, copy: u64, live: Option<bool>, what: impl FnOnce() -> String) {
        if let Some(c) = state.copies.get_mut(&copy) {
            c.touched = Instant::now();
            if c.history.len() >= 6 {
                c.history.remove(0);
            }
            c.history.push((c.touched, what()));
            c.stuck = false;
            c.store_waiting = false;
            if let Some(live) = live {
                c.live = live;
            }
        }
    }

    fn taken(&self, inc: u32, d: &Delivery) {
        let mut s = self.lock();
        let Some(copy) = copy_of(d) else {
            s.foreign += 1;
            return;
        };
        s.in_flight.entry(inc).or_default().insert((copy, d.tag));
        Self::touch(&mut s, copy, Some(true), || format!("taken by i{inc}"));
    }

    /// A settlement of `d` starts (it may wait for the broker).
    fn settling(&self, inc: u32, d: &Delivery, op: &'static str) {
        let mut s = self.lock();
        if let Some(copy) = copy_of(d) {
            Self::touch(&mut s, copy, None, || format!("{op} by i{inc}..."));
        }
    }

    fn settled(
        &self,
        inc: u32,
        d: &Delivery,
        op: &'static str,
        r: &Result<(), Error>,
        finished: bool,
    ) {
        let mut s = self.lock();
        let Some(copy) = copy_of(d) else { return };
        if let Some(set) = s.in_flight.get_mut(&inc) {
            set.remove(&(copy, d.tag));
        }
        let answer = match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        Self::touch(&mut s, copy, finished.then_some(false), || {
            format!("{op} by i{inc}: {answer}")
        });
    }

    /// Incarnation `inc` crashed: what it held goes back to the queue.
    pub fn aborted(&self, inc: u32) {
        let mut s = self.lock();
        s.aborted.insert(inc);
        self.release(&mut s, inc);
    }

    /// Incarnation `inc` stopped; answers how many deliveries it left
    /// unsettled (none, for an engine that returned from `run`).
    pub fn stopped(&self, inc: u32) -> usize {
        let mut s = self.lock();
        self.release(&mut s, inc)
    }

    fn release(&self, s: &mut State, inc: u32) -> usize {
        let held = s.in_flight.remove(&inc).unwrap_or_default();
        for (copy, _) in &held {
            Self::touch(s, *copy, None, || format!("released: i{inc} ended"));
        }
        held.len()
    }

    /// Whether incarnation `inc` was aborted.
    pub fn was_aborted(&self, inc: u32) -> bool {
        self.lock().aborted.contains(&inc)
    }

    fn run_started(&self, id: u32, run: Run) {
        let mut s = self.lock();
        s.max_attempt = s.max_attempt.max(run.attempt);
        if run.attempt > self.max_attempts {
            let line = format!(
                "id {id}: handler ran at attempt {} (max_attempts {}) on engine {} incarnation {}",
                run.attempt, self.max_attempts, run.engine, run.inc
            );
            s.over_limit.push(line);
        }
        s.runs.entry(id).or_default().push(run);
    }

    /// A handler recorded the effect of `id` (outside the dedup store).
    pub fn effect(&self, id: u32, effect: Effect) {
        self.lock().effects.entry(id).or_default().push(effect);
    }

    /// A store operation under the lease `token` starts (`answer` None) or
    /// ends: the engine is working on the copy, which is not idle then.
    fn store_op(&self, token: u64, op: &'static str, answer: Option<String>) {
        let mut s = self.lock();
        let Some(&copy) = s.lease_copy.get(&token) else {
            return;
        };
        let failed = answer.as_deref().is_some_and(|a| a.starts_with("error"));
        Self::touch(&mut s, copy, None, || match answer {
            None => format!("store {op}..."),
            Some(a) => format!("store {op}: {a}"),
        });
        if failed && let Some(c) = s.copies.get_mut(&copy) {
            c.store_waiting = true;
        }
    }

    fn completed(&self, token: u64, answer: &Result<Fenced, Error>) {
        let mut s = self.lock();
        let c = s.completes.entry(token).or_default();
        match answer {
            Ok(Fenced::Applied) => c.applied += 1,
            Ok(Fenced::LeaseLost) => c.lease_lost += 1,
            Err(_) => c.errors += 1,
        }
    }

    /// The effects handlers recorded, per id.
    pub fn effects(&self) -> HashMap<u32, Vec<Effect>> {
        self.lock().effects.clone()
    }

    /// The answers `complete` got for the lease `token`.
    pub fn completions(&self, token: u64) -> Completions {
        self.lock()
            .completes
            .get(&token)
            .copied()
            .unwrap_or_default()
    }

    /// The handler runs of `id`.
    pub fn runs(&self, id: u32) -> Vec<Run> {
        self.lock().runs.get(&id).cloned().unwrap_or_default()
    }

    /// The highest attempt a handler ran at.
    pub fn max_attempt(&self) -> u32 {
        self.lock().max_attempt
    }

    /// Handler runs past `max_attempts`, described.
    pub fn over_limit(&self) -> Vec<String> {
        self.lock().over_limit.clone()
    }

    /// Deliveries without the copy header (none are expected).
    pub fn foreign(&self) -> u64 {
        self.lock().foreign
    }

    /// Copies not settled for good, and deliveries engines hold now.
    pub fn pending(&self) -> (Vec<(u64, u32)>, usize) {
        let s = self.lock();
        let mut live: Vec<_> = s
            .copies
            .iter()
            .filter(|(_, c)| c.live)
            .map(|(n, c)| (*n, c.id))
            .collect();
        live.sort_unstable();
        (live, s.in_flight.values().map(HashSet::len).sum())
    }

    /// The live copy whose handler is not running that was untouched the
    /// longest, with how long (for verbose progress lines).
    pub fn oldest_idle(&self) -> Option<(u64, u32, Duration)> {
        let s = self.lock();
        let now = Instant::now();
        s.copies
            .iter()
            .filter(|(n, c)| c.live && !s.in_handler.contains_key(n))
            .map(|(n, c)| (*n, c.id, now.saturating_duration_since(c.touched)))
            .max_by_key(|(_, _, age)| *age)
    }

    /// Live copies whose handler is not running, untouched for longer than
    /// `after` (not taken, not settled, not handled: waiting in a
    /// consumer's prefetch, or taken and held while the engine backs off),
    /// not reported before. A copy whose last store operation failed gets
    /// `store_grace` more: its engine waits out the failure backoff before the
    /// next try, as designed.
    pub fn newly_stuck(&self, after: Duration, store_grace: Duration) -> Vec<Stuck> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = Instant::now();
        let mut out = Vec::new();
        for (n, c) in s.copies.iter_mut() {
            let untouched = now.saturating_duration_since(c.touched);
            let limit = if c.store_waiting {
                after + store_grace
            } else {
                after
            };
            if c.live && !c.stuck && untouched > limit && !s.in_handler.contains_key(n) {
                c.stuck = true;
                let history: Vec<String> = c
                    .history
                    .iter()
                    .map(|(t, what)| {
                        format!("{:.1}s {what}", t.duration_since(self.epoch).as_secs_f64())
                    })
                    .collect();
                out.push(Stuck {
                    copy: *n,
                    id: c.id,
                    untouched,
                    history: history.join(" > "),
                });
            }
        }
        out.sort_by_key(|s| s.copy);
        out
    }
}

/// The RabbitMQ broker of one engine incarnation, noting what it hands out
/// and how each delivery is settled.
#[derive(Clone)]
pub struct TrackedBroker {
    /// The broker itself.
    pub inner: RabbitBroker,
    /// Where to note.
    pub tracker: Arc<Tracker>,
    /// The incarnation.
    pub inc: u32,
}

#[async_trait]
impl Broker for TrackedBroker {
    async fn prepare(&self, concurrency: usize) -> Option<usize> {
        self.inner.prepare(concurrency).await
    }
    async fn next(&self) -> Result<Option<Delivery>, Error> {
        let next = self.inner.next().await;
        if let Ok(Some(d)) = &next {
            self.tracker.taken(self.inc, d);
        }
        next
    }
    async fn pause(&self) -> Result<bool, Error> {
        self.inner.pause().await
    }
    async fn ack(&self, delivery: &Delivery) -> Result<(), Error> {
        self.tracker.settling(self.inc, delivery, "ack");
        let r = self.inner.ack(delivery).await;
        self.tracker
            .settled(self.inc, delivery, "ack", &r, r.is_ok());
        r
    }
    async fn nack(&self, delivery: &Delivery, requeue: bool) -> Result<(), Error> {
        self.tracker.settling(self.inc, delivery, "nack");
        let r = self.inner.nack(delivery, requeue).await;
        self.tracker
            .settled(self.inc, delivery, "nack", &r, r.is_ok() && !requeue);
        r
    }
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error> {
        self.tracker.settling(self.inc, delivery, "retry_later");
        let r = self.inner.retry_later(delivery, delay, attempt).await;
        self.tracker
            .settled(self.inc, delivery, "retry_later", &r, false);
        r
    }
    async fn dead_letter(&self, delivery: &Delivery, letter: &DeadLetter) -> Result<(), Error> {
        self.tracker.settling(self.inc, delivery, "dead_letter");
        let r = self.inner.dead_letter(delivery, letter).await;
        self.tracker
            .settled(self.inc, delivery, "dead_letter", &r, r.is_ok());
        r
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

/// A store noting the answers `complete` gets, per lease token.
#[derive(Clone)]
pub struct RecordedStore {
    /// The store itself.
    pub inner: Arc<dyn DedupStore>,
    /// Where to note.
    pub tracker: Arc<Tracker>,
}

impl RecordedStore {
    /// Runs a store operation under `lease`, noting its start and answer on
    /// the copy the lease was handed with.
    async fn noted<T: std::fmt::Debug>(
        &self,
        lease: &Lease,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let token = lease.token.0;
        self.tracker.store_op(token, op, None);
        let r = call.await;
        let answer = match &r {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        };
        self.tracker.store_op(token, op, Some(answer));
        r
    }
}

#[async_trait]
impl DedupStore for RecordedStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        self.inner.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.inner.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        let r = self
            .noted(lease, "complete", self.inner.complete(lease, keep_for))
            .await;
        self.tracker.completed(lease.token.0, &r);
        r
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.noted(lease, "fail", self.inner.fail(lease, release))
            .await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.noted(lease, "bury", self.inner.bury(lease, keep_for))
            .await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.inner.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.noted(lease, "lease_state", self.inner.lease_state(lease))
            .await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.inner.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.inner.revive(scope, key).await
    }
    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        self.inner.claim_many(scope, keys, ttl).await
    }
    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        self.inner.revive_many(records).await
    }
    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        let r = self.inner.complete_many(leases, keep_for).await;
        for (i, lease) in leases.iter().enumerate() {
            let one = match &r {
                Ok(answers) => answers
                    .get(i)
                    .copied()
                    .ok_or(Error::Closed { backend: "chaos" }),
                Err(_) => Err(Error::Closed { backend: "chaos" }),
            };
            self.tracker.completed(lease.token.0, &one);
        }
        r
    }
}

/// A handler noting each run (id, attempt, engine, incarnation) before
/// handing the message on.
pub struct TrackedHandler {
    /// The handler itself.
    pub inner: Arc<dyn Handler>,
    /// Where to note.
    pub tracker: Arc<Tracker>,
    /// Engine slot.
    pub engine: usize,
    /// Engine incarnation.
    pub inc: u32,
}

/// The id of a message of this suite, or a permanent error.
pub fn id_of(msg: &Message) -> Result<u32, HandlerError> {
    msg.message_id()
        .and_then(parse_id)
        .ok_or_else(|| HandlerError::permanent("not a message of the chaos suite"))
}

/// Marks a copy as being handled while it lives.
struct Handling<'a> {
    tracker: &'a Tracker,
    copy: Option<u64>,
}

impl<'a> Handling<'a> {
    fn new(tracker: &'a Tracker, copy: Option<u64>) -> Self {
        if let Some(copy) = copy {
            let mut s = tracker.lock();
            *s.in_handler.entry(copy).or_default() += 1;
            Tracker::touch(&mut s, copy, None, || "handler starts".into());
        }
        Handling { tracker, copy }
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        let Some(copy) = self.copy else { return };
        let mut s = self.tracker.lock();
        if let Some(n) = s.in_handler.get_mut(&copy) {
            *n -= 1;
            if *n == 0 {
                s.in_handler.remove(&copy);
            }
        }
        Tracker::touch(&mut s, copy, None, || "handler ends".into());
    }
}

#[async_trait]
impl Handler for TrackedHandler {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let copy = copy_of(msg.delivery());
        if let Some(copy) = copy {
            let token = msg.lease().token.0;
            self.tracker.lock().lease_copy.insert(token, copy);
        }
        let _handling = Handling::new(&self.tracker, copy);
        let id = id_of(&msg)?;
        self.tracker.run_started(
            id,
            Run {
                engine: self.engine,
                inc: self.inc,
                attempt: msg.attempt(),
                token: msg.lease().token.0,
            },
        );
        self.inner.handle(msg).await
    }

    fn completion(&self) -> Completion {
        self.inner.completion()
    }
}
