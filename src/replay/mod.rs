//! Replay: dead letters back into the work queue, without losing or
//! doubling a message.
//!
//! A [`Replay`] takes the dead letters that are in the dead-letter queue when
//! it starts (never its own output), oldest first, and for each one that
//! its [`Filter`] selects:
//!
//! 1. finds its dedup record: the scope and key the engine wrote into the
//!    dead letter ([`crate::headers::SCOPE`], [`crate::headers::KEY`]), or,
//!    only for dead letters that do not name one, the fallback key strategy
//!    given with [`Replay::fallback_key`];
//! 2. makes the key claimable again with [`DedupStore::revive`]: a dead,
//!    released or lapsed record is removed, so the copy is handled afresh
//!    from attempt 1; a **done** record is left alone and the dead letter
//!    is removed without a copy (`already-done`): so an interrupted or
//!    repeated replay can never make a message take effect twice; a key
//!    with a live lease is left in the queue. [`ReplayMode::Force`] forgets
//!    the record whatever its state instead;
//! 3. publishes a copy to the work queue, with every property of the
//!    original, idemq's failure headers removed and
//!    [`crate::headers::REPLAYED`] counted up; and removes the dead letter
//!    only once the broker confirmed the copy. Copies leave in queue order,
//!    many confirms outstanding at once.
//!
//! Dead letters that are not selected, or are left, go back to the queue at
//! the end of the run, in their order as far as the broker keeps it. A dry
//! run reads the records without changing them, reports what it would do,
//! and puts everything back.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
//! use idemq::CancellationToken;
//! use idemq::memory::{MemoryBroker, MemoryDedupStore};
//! use idemq::replay::{Filter, Replay};
//!
//! let broker = MemoryBroker::new("orders"); // or idemq_rabbitmq::RabbitDeadLetters
//! let store = MemoryDedupStore::new();
//! let report = Replay::new(&broker, &store)
//!     .filter(Filter::new().reason("max-attempts"))
//!     .rate(500.0) // moves per second at most
//!     .run(&CancellationToken::new())
//!     .await;
//! println!("{report}");
//! assert!(report.is_complete());
//! # Ok(()) }
//! ```
//!
//! One file, past 600 lines, because the move of one letter (read the
//! record, revive it, publish, then remove the letter) is one sequence
//! whose ordering is the guarantee; the filter, the queue and the
//! report are in their own files.

mod filter;
mod letter;
mod queue;
mod report;

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use filter::Filter;
pub use letter::{DeadLetterInfo, Origin};
#[cfg(feature = "mock")]
pub use queue::MockDeadLetterQueue;
pub use queue::{Confirm, DeadLetterQueue};
pub use report::{Action, ReasonCounts, ReplayEnd, ReplayReport};

use crate::error::Error;
use crate::key::{self, KeyStrategy};
use crate::message::{Delivery, HeaderValue, Headers, headers};
use crate::policy::Backoff;
use crate::spans;
use crate::store::{DedupStore, Record, RecordState, Revival};

/// Dead letters in flight at once by default (store calls and unconfirmed
/// copies).
pub const DEFAULT_WINDOW: usize = 256;

/// Dead letters decided with one store call at most.
const BATCH: usize = 64;

/// How often a store call that failed with a transient error is tried.
const STORE_TRIES: u32 = 4;

/// What a replay does to the record of a dead letter it moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplayMode {
    /// Revive it with [`DedupStore::revive`]: never a done key, never a
    /// live lease (the default).
    #[default]
    Revive,
    /// Forget it with [`DedupStore::forget`] whatever its state: a done
    /// message is handled again. For an operator who means exactly that.
    Force,
}

/// Called with each dead letter and what the replay does with it (in a dry
/// run, what it would do). Moves are reported once their copy is confirmed.
pub type Observer<'a> = Box<dyn FnMut(&Delivery, &DeadLetterInfo, &Action) + Send + 'a>;

/// A replay of dead letters; see the [module docs](self). Built with
/// [`Replay::new`], run once with [`Replay::run`].
pub struct Replay<'a, Q: ?Sized, S: ?Sized> {
    queue: &'a Q,
    store: &'a S,
    mode: ReplayMode,
    fallback: Option<(String, KeyStrategy)>,
    filter: Filter,
    limit: Option<u64>,
    rate: Option<f64>,
    dry_run: bool,
    window: usize,
    observer: Option<Observer<'a>>,
}

impl<Q: ?Sized, S: ?Sized> std::fmt::Debug for Replay<'_, Q, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("mode", &self.mode)
            .field("fallback", &self.fallback)
            .field("filter", &self.filter)
            .field("limit", &self.limit)
            .field("rate", &self.rate)
            .field("dry_run", &self.dry_run)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// What the store said about a dead letter's record.
enum Verdict {
    Skip,
    NoKey,
    Unhandled,
    Revived(Revival),
    Forgot(bool),
    Failed(Error),
}

/// The state the stages of a run share.
struct Run<'a> {
    report: ReplayReport,
    held: Vec<Delivery>,
    observer: Option<Observer<'a>>,
    failure: Option<Error>,
    limit_reached: bool,
    /// Moves decided (revived or forced) and not yet settled or given up:
    /// the limit is checked against it before a store call.
    reserved: u64,
}

impl Run<'_> {
    fn note(&mut self, letter: &Delivery, info: &DeadLetterInfo, action: &Action) {
        self.report.count(&info.reason, action);
        if let Some(observe) = self.observer.as_mut() {
            observe(letter, info, action);
        }
    }

    fn leave(&mut self, letter: Delivery, info: &DeadLetterInfo, action: Action) {
        self.note(&letter, info, &action);
        self.held.push(letter);
    }

    fn fail(&mut self, e: Error) {
        tracing::error!(error = %e, "replay failed; settling what is in hand and stopping");
        self.failure.get_or_insert(e);
    }
}

impl<'a, Q, S> Replay<'a, Q, S>
where
    Q: DeadLetterQueue + ?Sized,
    S: DedupStore + ?Sized,
{
    /// A replay of `queue`'s dead letters whose records live in `store`,
    /// with the defaults: revive mode, no filter, no limit, no rate limit,
    /// no fallback key, [`DEFAULT_WINDOW`] in flight.
    pub fn new(queue: &'a Q, store: &'a S) -> Self {
        Replay {
            queue,
            store,
            mode: ReplayMode::Revive,
            fallback: None,
            filter: Filter::new(),
            limit: None,
            rate: None,
            dry_run: false,
            window: DEFAULT_WINDOW,
            observer: None,
        }
    }

    /// Revive (default) or force.
    pub fn mode(mut self, mode: ReplayMode) -> Self {
        self.mode = mode;
        self
    }

    /// Shorthand for [`ReplayMode::Force`] when `force` is true.
    pub fn force(self, force: bool) -> Self {
        self.mode(if force {
            ReplayMode::Force
        } else {
            ReplayMode::Revive
        })
    }

    /// For dead letters that do not name their record (dead-lettered by the
    /// broker, or by an idemq before this one wrote it): the scope and the
    /// key strategy of the consumer that claimed them. Without it such dead
    /// letters are left in the queue (`left-no-key`): guessing a key could
    /// miss the record, and the copy would then be acked as a copy of a
    /// dead message without being handled.
    pub fn fallback_key(mut self, scope: impl Into<String>, strategy: KeyStrategy) -> Self {
        self.fallback = Some((scope.into(), strategy));
        self
    }

    /// Moves only the dead letters `filter` selects; the others stay.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Moves at most `n` dead letters.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Publishes at most `per_second` copies a second (evenly spaced).
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = (per_second.is_finite() && per_second > 0.0).then_some(per_second);
        self
    }

    /// Changes nothing: reads the records, reports what would happen, and
    /// puts every dead letter back.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Dead letters in flight at once: store calls under way and copies
    /// awaiting their confirm (at least 1).
    pub fn window(mut self, n: usize) -> Self {
        self.window = n.max(1);
        self
    }

    /// Calls `f` with each dead letter taken and what is done with it.
    pub fn on_action(
        mut self,
        f: impl FnMut(&Delivery, &DeadLetterInfo, &Action) + Send + 'a,
    ) -> Self {
        self.observer = Some(Box::new(f));
        self
    }

    /// Runs the replay until every dead letter that was in the queue at the
    /// start was looked at, the limit is reached, `shutdown` is cancelled or
    /// an operation fails for good. Dead letters in hand are settled first
    /// (a copy awaiting its confirm is waited for), so the report always
    /// says what was moved, whatever the end.
    pub async fn run(mut self, shutdown: &CancellationToken) -> ReplayReport {
        let started = Instant::now();
        let observer = self.observer.take();
        let run = Mutex::new(Run {
            report: ReplayReport::new(self.dry_run),
            held: Vec::new(),
            observer,
            failure: None,
            limit_reached: false,
            reserved: 0,
        });
        match self.queue.depth().await {
            Ok(depth) => {
                lock(&run).report.cut_off = depth;
                // Stops taking (and starting store calls) on shutdown, at the
                // limit, or after a failure.
                let halt = shutdown.child_token();
                self.stages(&run, depth, &halt).await;
            }
            Err(e) => lock(&run).fail(e),
        }
        let mut run = run.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut held = std::mem::take(&mut run.held);
        held.sort_by_key(|d| d.tag);
        if let Err(e) = self.queue.put_back(held).await {
            // The broker returns unsettled dead letters by itself once the
            // replay's connection goes: nothing is lost.
            tracing::warn!(error = %e, "could not put the dead letters left back; the broker returns them when the connection closes");
            run.failure.get_or_insert(e);
        }
        let mut report = run.report;
        report.end = match run.failure {
            Some(e) => ReplayEnd::Failed(e),
            None if run.limit_reached => ReplayEnd::LimitReached,
            None if shutdown.is_cancelled() && report.examined < report.cut_off => {
                ReplayEnd::Interrupted
            }
            None => ReplayEnd::Finished,
        };
        report.elapsed = started.elapsed();
        report
    }

    /// Three stages joined in one task: take (in order), decide (store
    /// calls, many at once, answers in order), and confirm (copies
    /// published in order, confirms awaited together, then the removal).
    async fn stages(&self, run: &Mutex<Run<'a>>, cut_off: u64, halt: &CancellationToken) {
        let (taken_tx, mut taken_rx) = mpsc::channel::<Delivery>(self.window);
        let (sent_tx, mut sent_rx) = mpsc::channel(self.window);

        let take = async move {
            let mut taken = 0u64;
            while taken < cut_off && !halt.is_cancelled() {
                match self.queue.take().await {
                    Ok(Some(letter)) => {
                        taken += 1;
                        lock(run).report.examined += 1;
                        if taken_tx.send(letter).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        lock(run).fail(e);
                        halt.cancel();
                    }
                }
            }
        };

        let decide = async move {
            // What is taken together is decided together: one batch store
            // call (revive_many), a few batches at once.
            let taken = futures::stream::poll_fn(|cx| taken_rx.poll_recv(cx));
            let mut decided = taken
                .ready_chunks(BATCH)
                .map(|letters| self.decide(run, halt, letters))
                .buffered(self.window.div_ceil(BATCH))
                .flat_map(futures::stream::iter);
            let mut pacer = self.rate.map(Pacer::new);
            while let Some((letter, info, verdict)) = decided.next().await {
                let Some((letter, info, action)) = self.act(run, letter, info, verdict) else {
                    continue;
                };
                let confirm: Confirm = if action.is_move() {
                    if lock(run).failure.is_some() {
                        // Revived, but the run failed: leave it (a revived
                        // key without its copy is handled when it comes again).
                        release(run, 1);
                        lock(run).leave(letter, &info, Action::Unhandled);
                        continue;
                    }
                    if let Some(pacer) = pacer.as_mut() {
                        pacer.wait().await;
                    }
                    let span = spans::replay(&letter, info.original_queue.as_deref(), &info.reason);
                    let republished = self
                        .queue
                        .republish(&letter, replay_headers(&letter))
                        .instrument(span.clone())
                        .await;
                    match republished {
                        Ok(confirm) => confirm,
                        Err(e) => {
                            spans::record_error(&span, spans::error_type(&e), &e);
                            release(run, 1);
                            let mut r = lock(run);
                            r.fail(e);
                            r.leave(letter, &info, Action::Unhandled);
                            halt.cancel();
                            continue;
                        }
                    }
                } else {
                    // Already done: removed without a copy.
                    Box::pin(std::future::ready(Ok(())))
                };
                if sent_tx.send((letter, info, action, confirm)).await.is_err() {
                    break;
                }
            }
        };

        let confirm = async move {
            let sent = futures::stream::poll_fn(|cx| sent_rx.poll_recv(cx));
            let mut confirmed = sent
                .map(
                    |(letter, info, action, confirm): (_, _, _, Confirm)| async move {
                        let result = confirm.await;
                        (letter, info, action, result)
                    },
                )
                .buffered(self.window);
            while let Some((letter, info, action, result)) = confirmed.next().await {
                // A move's reservation is released in the same step that
                // counts it moved (or left), so the limit never sees it
                // in neither.
                let reserved = u64::from(action.is_move());
                match result {
                    Ok(()) => {
                        let removed = self.queue.remove(&letter).await;
                        let mut r = lock(run);
                        r.reserved = r.reserved.saturating_sub(reserved);
                        // The copy is in the work queue either way.
                        r.note(&letter, &info, &action);
                        if let Err(e) = removed {
                            r.fail(e);
                            halt.cancel();
                        }
                    }
                    Err(e) => {
                        let mut r = lock(run);
                        r.reserved = r.reserved.saturating_sub(reserved);
                        r.fail(e);
                        r.leave(letter, &info, Action::Unhandled);
                        halt.cancel();
                    }
                }
            }
        };

        futures::join!(take, decide, confirm);
    }

    /// Reads dead letters and asks the store about their records, all in
    /// one call (one call per record for a dry run or a forced one).
    async fn decide(
        &self,
        run: &Mutex<Run<'a>>,
        halt: &CancellationToken,
        letters: Vec<Delivery>,
    ) -> Vec<(Delivery, DeadLetterInfo, Verdict)> {
        let mut out = Vec::with_capacity(letters.len());
        let mut asked: Vec<usize> = Vec::new();
        let mut records: Vec<(String, String)> = Vec::new();
        for letter in letters {
            let info = DeadLetterInfo::of(&letter);
            let verdict = if !self.filter.matches(&letter, &info) {
                Verdict::Skip
            } else if let Some(record) = self.record_of(&letter, &info) {
                if halt.is_cancelled() || !self.reserve(run, halt) {
                    Verdict::Unhandled
                } else {
                    asked.push(out.len());
                    records.push(record);
                    Verdict::Unhandled // until the store answers
                }
            } else {
                Verdict::NoKey
            };
            out.push((letter, info, verdict));
        }
        if records.is_empty() {
            return out;
        }
        let answers: Result<Vec<Verdict>, Error> = if self.dry_run {
            let gets = records
                .iter()
                .map(|(scope, key)| retry(move || self.store.get(scope, key)));
            futures::future::try_join_all(gets).await.map(|found| {
                found
                    .into_iter()
                    .map(|r| Verdict::Revived(self.dry_verdict(r)))
                    .collect()
            })
        } else {
            match self.mode {
                ReplayMode::Revive => retry(|| self.store.revive_many(&records))
                    .await
                    .map(|r| r.into_iter().map(Verdict::Revived).collect()),
                ReplayMode::Force => {
                    let forgets = records
                        .iter()
                        .map(|(scope, key)| retry(move || self.store.forget(scope, key)));
                    futures::future::try_join_all(forgets)
                        .await
                        .map(|r| r.into_iter().map(Verdict::Forgot).collect())
                }
            }
        };
        match answers {
            Ok(answers) if answers.len() == asked.len() => {
                for (i, verdict) in asked.into_iter().zip(answers) {
                    out[i].2 = verdict;
                }
            }
            failed => {
                let e = failed.err().unwrap_or_else(|| {
                    Error::invalid(
                        "revive_many",
                        "the store answered for another number of records",
                    )
                });
                // The first carries the error (and its reservation goes
                // with its verdict); the others are left unhandled.
                release(run, asked.len().saturating_sub(1) as u64);
                halt.cancel();
                if let Some(&first) = asked.first() {
                    out[first].2 = Verdict::Failed(e);
                }
            }
        }
        out
    }

    /// Counts a move against the limit before its store call; false (and
    /// the run halts) once the limit is taken.
    fn reserve(&self, run: &Mutex<Run<'a>>, halt: &CancellationToken) -> bool {
        let Some(limit) = self.limit else {
            lock(run).reserved += 1;
            return true;
        };
        let mut r = lock(run);
        if r.report.moved + r.reserved >= limit {
            r.limit_reached = true;
            halt.cancel();
            return false;
        }
        r.reserved += 1;
        true
    }

    /// What a dry run expects revive (or forget) to answer for `record`.
    fn dry_verdict(&self, record: Option<Record>) -> Revival {
        let Some(record) = record else {
            return Revival::Revived { previous: None };
        };
        match (self.mode, record.state, record.lease_remaining) {
            (ReplayMode::Revive, RecordState::Done, _) => Revival::Done,
            (ReplayMode::Revive, RecordState::Claimed, Some(left)) if !left.is_zero() => {
                Revival::InProgress { retry_after: left }
            }
            (_, state, _) => Revival::Revived {
                previous: Some(state),
            },
        }
    }

    /// Settles what the store said about a dead letter: leaves it in the
    /// queue, or hands it back with its action (a move to publish, or an
    /// already-done dead letter to remove).
    fn act(
        &self,
        run: &Mutex<Run<'a>>,
        letter: Delivery,
        info: DeadLetterInfo,
        verdict: Verdict,
    ) -> Option<(Delivery, DeadLetterInfo, Action)> {
        let action = match verdict {
            Verdict::Skip => Action::Skipped,
            Verdict::NoKey => Action::LeftNoKey,
            Verdict::Unhandled => Action::Unhandled,
            Verdict::Failed(e) => {
                release(run, 1);
                lock(run).fail(e);
                Action::Unhandled
            }
            Verdict::Revived(Revival::Done) => {
                release(run, 1);
                Action::AlreadyDone
            }
            Verdict::Revived(Revival::InProgress { retry_after }) => {
                release(run, 1);
                let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
                Action::LeftLive { retry_after_ms: ms }
            }
            Verdict::Revived(Revival::Revived { previous }) => Action::Move { previous },
            Verdict::Forgot(existed) => Action::Force { existed },
        };
        let settles = action.is_move() || action == Action::AlreadyDone;
        let mut r = lock(run);
        if settles && (self.dry_run || r.failure.is_some()) {
            if action.is_move() {
                r.reserved = r.reserved.saturating_sub(1);
            }
            if !self.dry_run {
                // Never a removal after a failure: left as it is.
                r.leave(letter, &info, Action::Unhandled);
                return None;
            }
        }
        if settles && !self.dry_run {
            return Some((letter, info, action));
        }
        // Left in the queue, and in a dry run, everything.
        r.leave(letter, &info, action);
        None
    }

    /// The scope and key of a dead letter's record: the ones it names, or
    /// those the fallback strategy finds.
    fn record_of(&self, letter: &Delivery, info: &DeadLetterInfo) -> Option<(String, String)> {
        if let (Some(scope), Some(key)) = (&info.scope, &info.key) {
            return Some((scope.clone(), key.clone()));
        }
        let (scope, strategy) = self.fallback.as_ref()?;
        let key = strategy.extract(letter)?;
        key::check(scope, &key).ok()?;
        Some((scope.clone(), key))
    }
}

/// Reads up to `limit` dead letters, oldest first, and puts them all back:
/// the queue is as it was (its order as far as the broker keeps it). For
/// listing and inspection; counts against nothing.
pub async fn peek<Q: DeadLetterQueue + ?Sized>(
    queue: &Q,
    limit: u64,
) -> Result<Vec<Delivery>, Error> {
    let wanted = queue.depth().await?.min(limit);
    let mut taken = Vec::new();
    let mut failed = None;
    while (taken.len() as u64) < wanted {
        match queue.take().await {
            Ok(Some(letter)) => taken.push(letter),
            Ok(None) => break,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let put_back = queue.put_back(taken.clone()).await;
    if let Some(e) = failed {
        return Err(e);
    }
    put_back?;
    Ok(taken)
}

/// The headers of a replayed copy: the dead letter's own, without idemq's
/// failure headers, with the replay count one up.
pub fn replay_headers(letter: &Delivery) -> Headers {
    let mut h = letter.headers.clone();
    for name in headers::ALL {
        h.remove(name);
    }
    let replayed = letter
        .header(headers::REPLAYED)
        .and_then(HeaderValue::as_i64)
        .unwrap_or(0);
    h.insert(
        headers::REPLAYED.into(),
        HeaderValue::Int(replayed.saturating_add(1)),
    );
    h
}

fn lock<'r, 'a>(run: &'r Mutex<Run<'a>>) -> std::sync::MutexGuard<'r, Run<'a>> {
    // A panic inside an observer poisons the lock; the counts stay usable.
    run.lock().unwrap_or_else(|p| p.into_inner())
}

fn release(run: &Mutex<Run<'_>>, n: u64) {
    let mut r = lock(run);
    r.reserved = r.reserved.saturating_sub(n);
}

/// Calls `op` until it succeeds, fails for good, or has failed
/// transiently [`STORE_TRIES`] times.
async fn retry<T, F, Fut>(mut op: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.is_transient() && attempt < STORE_TRIES => {
                tracing::warn!(error = %e, attempt, "replay: store call failed; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Spaces publishes evenly at a rate.
struct Pacer {
    start: Instant,
    every: Duration,
    sent: u32,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        Pacer {
            start: Instant::now(),
            every: Duration::from_secs_f64(1.0 / per_second),
            sent: 0,
        }
    }

    async fn wait(&mut self) {
        let due = self.start + self.every.saturating_mul(self.sent);
        self.sent = self.sent.saturating_add(1);
        tokio::time::sleep_until(due).await;
    }
}
