//! [`Health`]: the engine's state, for readiness probes and dashboards.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use tokio::sync::watch;

/// What an engine is doing, as [`Health::state`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EngineState {
    /// Built, and not yet consuming: [`crate::Engine::run`] was not called,
    /// or is still telling the broker its concurrency (which waits for a
    /// broker that is connecting).
    Starting,
    /// Taking and handling deliveries.
    Running,
    /// The dedup store failed and has not answered since: the engine takes
    /// no delivery and runs no handler (it fails closed) until a store
    /// call succeeds again.
    StoreUnavailable,
    /// The broker's connection is down and its client reconnecting
    /// ([`crate::Broker::is_connected`] answers `false`): no delivery
    /// comes meanwhile.
    BrokerReconnecting,
    /// Shutdown was asked for (or the broker closed): no new delivery is
    /// taken, handlers in flight finish or are released.
    ShuttingDown,
    /// The run returned (or the engine was dropped).
    Stopped,
}

impl EngineState {
    /// A short lower-case name: `starting`, `running`, `store_unavailable`,
    /// `broker_reconnecting`, `shutting_down`, `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Starting => "starting",
            EngineState::Running => "running",
            EngineState::StoreUnavailable => "store_unavailable",
            EngineState::BrokerReconnecting => "broker_reconnecting",
            EngineState::ShuttingDown => "shutting_down",
            EngineState::Stopped => "stopped",
        }
    }

    /// Whether the engine handles messages now: [`EngineState::Running`]
    /// only. What a readiness probe answers.
    pub fn is_ready(self) -> bool {
        self == EngineState::Running
    }

    fn is_degraded(self) -> bool {
        matches!(
            self,
            EngineState::StoreUnavailable | EngineState::BrokerReconnecting
        )
    }
}

impl fmt::Display for EngineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handle on an engine's state, from [`crate::Engine::health`]. Cheap to
/// clone (clones watch the same engine); reading the state takes no lock
/// anyone waits on and costs the engine nothing.
///
/// Put it behind a readiness probe: ready while [`EngineState::Running`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
/// use idemq::memory::{MemoryBroker, MemoryDedupStore};
/// use idemq::{CancellationToken, Engine, EngineState, Health, Message};
///
/// // What the probe endpoint of your HTTP server calls (axum, hyper, ...):
/// // 200 when ready, 503 with the state otherwise.
/// fn readiness(health: &Health) -> (u16, &'static str) {
///     let state = health.state();
///     (if state.is_ready() { 200 } else { 503 }, state.as_str())
/// }
///
/// let engine = Engine::builder(MemoryBroker::new("orders"), MemoryDedupStore::new(),
///     |_m: Message| async { Ok(()) }).build()?;
/// let health = engine.health(); // before `run`, which takes the engine
/// assert_eq!(readiness(&health), (503, "starting"));
///
/// let shutdown = CancellationToken::new();
/// let run = tokio::spawn(engine.run(shutdown.clone()));
/// let mut watching = health.clone();
/// watching.wait_for(EngineState::is_ready).await;
/// assert_eq!(readiness(&health), (200, "running"));
///
/// shutdown.cancel();
/// run.await.expect("the run");
/// assert_eq!(health.state(), EngineState::Stopped);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Health {
    rx: watch::Receiver<EngineState>,
}

impl Health {
    /// The state now.
    pub fn state(&self) -> EngineState {
        *self.rx.borrow()
    }

    /// Waits until there is a state this handle has not seen (through
    /// `changed` or `wait_for`; a handle from [`crate::Engine::health`]
    /// has seen the state of that moment, a clone what its original had
    /// seen), and answers it. A handle that looks rarely sees only the
    /// latest of several quick changes. `None` once the engine is gone
    /// (its run returned, or it was dropped) and its last state was seen:
    /// no change can come any more, and [`Health::state`] keeps answering
    /// the last one.
    pub async fn changed(&mut self) -> Option<EngineState> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }

    /// Waits until the state satisfies `pred` (answers at once if it does
    /// already), and answers it. `None` if the engine went away first
    /// without the state ever satisfying `pred`.
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(EngineState) -> bool,
    ) -> Option<EngineState> {
        self.rx.wait_for(|s| pred(*s)).await.ok().map(|s| *s)
    }
}

/// The phase of the run, one of the states that hold whatever the store
/// and the broker do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    Starting = 0,
    Running,
    ShuttingDown,
    Stopped,
}

/// The engine's side of [`Health`]: what the state is computed from.
pub(crate) struct HealthCell {
    tx: watch::Sender<EngineState>,
    phase: AtomicU8,
    broker_down: AtomicBool,
    scope: String,
}

impl HealthCell {
    pub(crate) fn new(scope: &str) -> Self {
        HealthCell {
            tx: watch::Sender::new(EngineState::Starting),
            phase: AtomicU8::new(Phase::Starting as u8),
            broker_down: AtomicBool::new(false),
            scope: scope.to_owned(),
        }
    }

    pub(crate) fn subscribe(&self) -> Health {
        Health {
            rx: self.tx.subscribe(),
        }
    }

    pub(crate) fn set_phase(&self, phase: Phase, store_failures: &AtomicU32) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.refresh(store_failures);
    }

    /// Notes whether the broker is connected; answers whether that changed.
    pub(crate) fn set_broker_down(&self, down: bool) -> bool {
        self.broker_down.swap(down, Ordering::Relaxed) != down
    }

    /// Computes the state from the phase, the broker and the store (down
    /// while its consecutive failures are not zero) and publishes it if it
    /// changed, logging the change once. The inputs are read under the
    /// watch's lock, so the last refresh after the last change of an input
    /// publishes the state that holds.
    pub(crate) fn refresh(&self, store_failures: &AtomicU32) {
        self.tx.send_if_modified(|state| {
            let phase = self.phase.load(Ordering::Relaxed);
            let new = if phase == Phase::Stopped as u8 {
                EngineState::Stopped
            } else if phase == Phase::ShuttingDown as u8 {
                EngineState::ShuttingDown
            } else if phase == Phase::Starting as u8 {
                EngineState::Starting
            } else if self.broker_down.load(Ordering::Relaxed) {
                EngineState::BrokerReconnecting
            } else if store_failures.load(Ordering::Relaxed) != 0 {
                EngineState::StoreUnavailable
            } else {
                EngineState::Running
            };
            if new == *state {
                return false;
            }
            let was = std::mem::replace(state, new);
            if new.is_degraded() {
                tracing::warn!(scope = %self.scope, state = %new, %was, "engine degraded: {new}");
            } else if was.is_degraded() {
                tracing::info!(scope = %self.scope, state = %new, %was, "engine recovered: {new}");
            } else {
                tracing::info!(scope = %self.scope, state = %new, %was, "engine {new}");
            }
            true
        });
    }
}
