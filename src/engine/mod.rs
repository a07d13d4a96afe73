//! The engine: takes deliveries from a [`Broker`], claims their keys in a
//! [`DedupStore`], runs the [`Handler`], and settles each delivery on its
//! own. The per-delivery state machine is in `process.rs`, in the order of
//! the table in the design.

mod builder;
mod health;
pub(crate) mod meters;
mod process;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use builder::{BROKER_ACK_TIMEOUT, EngineBuilder, EngineConfig};
pub use health::{EngineState, Health};
pub use report::{Report, Stopped};

use crate::spans::{self, EngineSpans};
use crate::{Broker, DedupStore, Handler};
use health::{HealthCell, Phase};
use meters::{BaseLabels, BrokerOp, Meters, StoreOp};
use report::Counters;

/// How long, after the shutdown grace, the engine waits for the deliveries
/// still in flight to be released (claim given back, delivery requeued)
/// before it returns anyway. Deliveries not settled by then are left to
/// the broker (it redelivers what a closed consumer held) and their claims
/// to their leases: as after a crash, nothing is lost.
pub const RELEASE_BOUND: Duration = Duration::from_secs(2);

/// How soon a pause that failed (a broker client reconnecting) is tried
/// again while the store stays unreachable.
const PAUSE_RETRY: Duration = Duration::from_millis(200);

/// How often the engine asks the broker whether it is connected
/// ([`Broker::is_connected`]), for [`Health`].
const BROKER_POLL: Duration = Duration::from_millis(200);

/// A consumer that makes message handling idempotent.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
/// use idemq::memory::{MemoryBroker, MemoryDedupStore};
/// use idemq::{Broker, Engine, Message, OutgoingMessage};
///
/// let broker = MemoryBroker::new("orders");
/// for id in ["a", "b", "a"] {
///     broker.publish(OutgoingMessage::new("{}").with_message_id(id)).await?;
/// }
/// broker.close_when_idle(); // this example stops once all is settled
///
/// let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), |_msg: Message| async { Ok(()) })
///     .scope("orders")
///     .build()?;
/// let report = engine.run(idemq::CancellationToken::new()).await;
/// assert_eq!((report.handled, report.duplicates), (2, 1));
/// # Ok(()) }
/// ```
pub struct Engine<B, S, H> {
    shared: Arc<Shared<B, S, H>>,
}

impl<B, S, H> std::fmt::Debug for Engine<B, S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared<B, S, H> {
    pub(crate) broker: B,
    pub(crate) store: S,
    pub(crate) handler: H,
    pub(crate) cfg: EngineConfig,
    pub(crate) counters: Counters,
    pub(crate) meters: Meters,
    pub(crate) spans: EngineSpans,
    health: HealthCell,
    gate: StoreGate,
    /// Set once the broker paused on request ([`Broker::pause`]): a
    /// delivery the store failed for is then given back at once, for
    /// consumers that reach the store, instead of after a backoff.
    pub(crate) pausable: AtomicBool,
}

/// Fail-closed bookkeeping: consecutive store failures and the instant
/// before which no new delivery is taken.
struct StoreGate {
    epoch: Instant,
    failures: AtomicU32,
    paused_until_us: AtomicU64,
    /// Woken when the gate closes (the first failure after a success), so
    /// the intake loop notices while it waits for a slot or a delivery.
    closed: Notify,
}

impl StoreGate {
    fn paused_until(&self) -> Option<Instant> {
        let until = self.paused_until_us.load(Ordering::Relaxed);
        if until == 0 {
            return None; // the store never failed: skip the clock read
        }
        let until = self.epoch + Duration::from_micros(until);
        (until > Instant::now()).then_some(until)
    }
}

impl<B, S, H> Drop for Shared<B, S, H> {
    /// An engine dropped without running to its end is stopped all the same.
    fn drop(&mut self) {
        self.health.set_phase(Phase::Stopped, &self.gate.failures);
    }
}

impl<B: Broker, S: DedupStore, H: Handler> Shared<B, S, H> {
    /// Makes a store call, timed, in a span of its own, and (when it
    /// fails) counted by operation.
    pub(crate) async fn store_call<T>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T, crate::Error>>,
    ) -> Result<T, crate::Error> {
        let span = spans::store(op);
        let started = std::time::Instant::now();
        let result = call.instrument(span.clone()).await;
        self.meters.store_call(op, started, result.is_err());
        if let Err(e) = &result {
            self.counters.store_errors.inc();
            spans::record_error(&span, spans::error_type(e), e);
        }
        result
    }

    /// Notes a broker call that failed.
    pub(crate) fn broker_failed(&self, op: BrokerOp) {
        self.counters.broker_errors.inc();
        self.meters.broker_failed(op);
    }

    /// Notes a store failure that closes the gate; answers how long to
    /// back off.
    pub(crate) fn store_failed(&self, op: StoreOp, err: &crate::Error) -> Duration {
        let n = self
            .gate
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n == 1 {
            self.gate.closed.notify_waiters();
            self.health.refresh(&self.gate.failures);
        }
        let delay = self.cfg.failure_backoff.delay(n);
        let until = (Instant::now() + delay).duration_since(self.gate.epoch);
        self.gate.paused_until_us.fetch_max(
            u64::try_from(until.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        tracing::warn!(op = op.as_str(), error = %err, transient = err.is_transient(), backoff = ?delay,
            "dedup store failed; pausing consumption (fail closed)");
        delay
    }

    pub(crate) fn store_ok(&self) {
        if self.gate.failures.load(Ordering::Relaxed) != 0 {
            self.gate.failures.store(0, Ordering::Relaxed);
            self.health.refresh(&self.gate.failures);
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.health.set_phase(phase, &self.gate.failures);
    }

    /// Polls [`Broker::is_connected`] for [`Health`] until `stop`.
    async fn watch_broker(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(BROKER_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.health.set_broker_down(!self.broker.is_connected()) {
                self.health.refresh(&self.gate.failures);
            }
        }
    }
}

impl<B: Broker, S: DedupStore, H: Handler> Engine<B, S, H> {
    /// Starts building an engine over a broker, a store and a handler.
    pub fn builder(broker: B, store: S, handler: H) -> EngineBuilder<B, S, H> {
        EngineBuilder::new(broker, store, handler)
    }

    fn from_parts(broker: B, store: S, handler: H, cfg: EngineConfig) -> Self {
        let destination = broker.destination();
        let spans = EngineSpans::new(broker.system(), destination.clone());
        let labels = BaseLabels::new(&cfg.scope, destination);
        let counters = Counters::new(&labels);
        let meters = Meters::new(&labels);
        let health = HealthCell::new(&cfg.scope);
        Engine {
            shared: Arc::new(Shared {
                broker,
                store,
                handler,
                counters,
                meters,
                spans,
                health,
                cfg,
                gate: StoreGate {
                    epoch: Instant::now(),
                    failures: AtomicU32::new(0),
                    paused_until_us: AtomicU64::new(0),
                    closed: Notify::new(),
                },
                pausable: AtomicBool::new(false),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// A handle on the engine's state ([`EngineState`]): take it before
    /// [`Engine::run`] (which takes the engine) and keep it for as long as
    /// you like; it reads [`EngineState::Stopped`] once the run returned.
    /// Changes are logged once each (a warning when the engine degrades,
    /// info otherwise), never per message. See [`Health`] for a readiness
    /// probe.
    pub fn health(&self) -> Health {
        self.shared.health.subscribe()
    }

    /// Consumes until `shutdown` is cancelled or the broker closes, with up
    /// to `concurrency` deliveries in flight, each settled on its own.
    ///
    /// On shutdown it stops taking deliveries, lets in-flight handlers
    /// finish for up to the grace period, then releases the claims of
    /// those still running (their attempt refunded) and requeues their
    /// deliveries. It returns what it did, at most the grace period plus
    /// [`RELEASE_BOUND`] after `shutdown`, even while the store or the
    /// broker hangs. A transient broker error is
    /// retried with backoff; a permanent one ends the run
    /// ([`Stopped::BrokerFailed`]) after in-flight work is settled.
    pub async fn run(self, shutdown: CancellationToken) -> Report {
        let sh = self.shared;
        // The poller ends with the run, also when the run is dropped.
        let poller = CancellationToken::new();
        let _poller_guard = poller.clone().drop_guard();
        tokio::spawn({
            let sh = sh.clone();
            async move { sh.watch_broker(poller).await }
        });
        // Preparing may wait on a broker that is being recovered; shutdown
        // does not wait for it.
        let prepared = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                sh.set_phase(Phase::Stopped);
                return sh.counters.report(Stopped::Shutdown);
            }
            prepared = sh.broker.prepare(sh.cfg.concurrency) => prepared,
        };
        sh.set_phase(Phase::Running);
        if let Some(limit) = prepared
            && limit < sh.cfg.concurrency
        {
            tracing::warn!(
                concurrency = sh.cfg.concurrency,
                broker_limit = limit,
                "the broker hands out at most {limit} unsettled deliveries (its prefetch), so at \
                 most {limit} handlers run at once, not {}: raise the prefetch to twice the \
                 concurrency, or leave it unset so the broker sizes it",
                sh.cfg.concurrency
            );
        }
        let slots = Arc::new(Semaphore::new(sh.cfg.concurrency));
        let tracker = TaskTracker::new();
        let abort = CancellationToken::new();
        let stop = CancellationToken::new();
        let mut broker_failures = 0u32;
        let mut paused = false;
        let mut pause_failures = 0u32;
        let stopped = loop {
            if let Some(until) = sh.gate.paused_until() {
                // Fail closed without hoarding: stop the flow and give back
                // what the broker client holds, for consumers that reach
                // the store; `next` resumes it after the backoff.
                let mut wake = until;
                if !paused {
                    // A pause may wait on a broker that is being recovered;
                    // shutdown does not wait for it.
                    let pause = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break Stopped::Shutdown,
                        pause = sh.broker.pause() => pause,
                    };
                    match pause {
                        Ok(true) => {
                            paused = true;
                            sh.pausable.store(true, Ordering::Relaxed);
                            tracing::warn!(
                                "dedup store unreachable: consumption paused, deliveries held \
                                 ahead given back to the broker"
                            );
                        }
                        Ok(false) => paused = true,
                        // Typically a broker client that is reconnecting:
                        // once it is back it holds a fresh prefetch, so the
                        // pause is tried again soon, not after the backoff.
                        Err(e) => {
                            if pause_failures == 0 {
                                tracing::warn!(error = %e,
                                    "could not pause the consumer; trying again shortly");
                            } else {
                                tracing::debug!(error = %e, "could not pause the consumer");
                            }
                            pause_failures = pause_failures.saturating_add(1);
                            wake = wake.min(Instant::now() + PAUSE_RETRY);
                        }
                    }
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break Stopped::Shutdown,
                    _ = tokio::time::sleep_until(wake) => {}
                }
                continue;
            }
            paused = false;
            pause_failures = 0;
            let gate_closed = sh.gate.closed.notified();
            tokio::pin!(gate_closed);
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Stopped::Shutdown,
                _ = &mut gate_closed => continue,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break Stopped::Shutdown, // never closed; no panic path
                },
            };
            // `next` is cancel safe: a delivery it was about to return stays
            // with the broker.
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Stopped::Shutdown,
                _ = &mut gate_closed => continue,
                next = sh.broker.next() => next,
            };
            match next {
                Ok(Some(delivery)) => {
                    broker_failures = 0;
                    sh.counters.received.inc();
                    let started = std::time::Instant::now();
                    let (sh, abort, stop) = (sh.clone(), abort.clone(), stop.clone());
                    // Boxed: tokio moves a spawned future several times, and
                    // the state machine is over a kilobyte; a box is 8 bytes.
                    tracker.spawn(Box::pin(async move {
                        tokio::select! {
                            biased;
                            outcome = process::process(&sh, delivery, &abort) => {
                                sh.meters.processed(outcome, started);
                            }
                            _ = stop.cancelled() => {}
                        }
                        drop(slot);
                    }));
                }
                Ok(None) => break Stopped::BrokerClosed,
                Err(e) if e.is_transient() => {
                    sh.broker_failed(BrokerOp::Receive);
                    broker_failures = broker_failures.saturating_add(1);
                    let delay = sh.cfg.failure_backoff.delay(broker_failures);
                    tracing::warn!(error = %e, backoff = ?delay, "broker failed to deliver; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Stopped::Shutdown,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    sh.broker_failed(BrokerOp::Receive);
                    tracing::error!(error = %e, "broker failed for good; stopping");
                    break Stopped::BrokerFailed(e);
                }
            }
        };
        sh.set_phase(Phase::ShuttingDown);
        tracker.close();
        if tokio::time::timeout(sh.cfg.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?sh.cfg.shutdown_grace, in_flight = tracker.len(),
                "grace period over; releasing the claims of unfinished handlers");
            abort.cancel();
            if tokio::time::timeout(RELEASE_BOUND, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(bound = ?RELEASE_BOUND, unsettled = tracker.len(),
                    "deliveries still unsettled after the release bound (store or broker hung); \
                     leaving them to the broker's redelivery and their claims to their leases");
                stop.cancel();
                tracker.wait().await;
            }
        }
        sh.set_phase(Phase::Stopped);
        sh.counters.report(stopped)
    }
}
