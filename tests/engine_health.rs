//! The engine's health on the memory backends: the states of a run from
//! start to stop, and the store outage seen as `StoreUnavailable` for as
//! long as it lasts. Waits are on the health handle, not on sleeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::{
    Broker, Claim, ClaimTtl, DedupStore, Engine, EngineState, Error, Fenced, Health, Lease,
    Message, OutgoingMessage, Record, RecordState, Release, Revival, Stopped,
};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

/// Waits (on the clock of the test runtime, paused) until the state is
/// `want`, failing the test if it takes more than an hour.
async fn reaches(health: &mut Health, want: EngineState) {
    let reached = tokio::time::timeout(Duration::from_secs(3600), health.wait_for(|s| s == want))
        .await
        .unwrap_or_else(|_| panic!("never {want}; stuck at {}", health.state()));
    assert_eq!(reached, Some(want));
}

#[tokio::test(start_paused = true)]
async fn a_run_goes_from_starting_to_running_to_shutting_down_to_stopped() {
    let broker = MemoryBroker::new("q");
    let (started_tx, started_rx) = oneshot::channel();
    let started_tx = std::sync::Mutex::new(Some(started_tx));
    let finish = Arc::new(Notify::new());
    let handler = {
        let finish = finish.clone();
        move |_m: Message| {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let finish = finish.clone();
            async move {
                finish.notified().await;
                Ok::<(), idemq::HandlerError>(())
            }
        }
    };
    let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
        .scope("health")
        .shutdown_grace(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut health = engine.health();
    assert_eq!(health.state(), EngineState::Starting);
    assert!(!health.state().is_ready());

    let shutdown = CancellationToken::new();
    let run = tokio::spawn(engine.run(shutdown.clone()));
    reaches(&mut health, EngineState::Running).await;
    assert!(health.state().is_ready());

    // A handler in flight keeps the engine shutting down until it ends.
    broker
        .publish(OutgoingMessage::new("x").with_message_id("k"))
        .await
        .unwrap();
    started_rx.await.unwrap();
    shutdown.cancel();
    reaches(&mut health, EngineState::ShuttingDown).await;
    assert!(!run.is_finished());
    finish.notify_one();

    let report = run.await.unwrap();
    assert_eq!(report.handled, 1);
    assert!(matches!(report.stopped, Stopped::Shutdown), "{report}");
    assert_eq!(health.state(), EngineState::Stopped);
    // Once the engine is gone, `changed` ends (after the changes not yet
    // seen) and the state stays.
    while let Some(state) = health.changed().await {
        assert_eq!(state, EngineState::Stopped);
    }
    assert_eq!(health.state(), EngineState::Stopped);
}

#[tokio::test]
async fn an_engine_dropped_without_running_reads_stopped() {
    let engine = Engine::builder(
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        |_m: Message| async { Ok(()) },
    )
    .build()
    .unwrap();
    let mut health = engine.health();
    drop(engine);
    assert_eq!(health.state(), EngineState::Stopped);
    assert_eq!(health.changed().await, Some(EngineState::Stopped));
    assert_eq!(health.changed().await, None);
}

/// A memory store that fails every call while `down` is set.
#[derive(Clone, Default)]
struct Switchable {
    inner: MemoryDedupStore,
    down: Arc<AtomicBool>,
}

impl Switchable {
    fn check(&self, op: &'static str) -> Result<(), Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                backend: "test",
                op,
                source: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl DedupStore for Switchable {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        self.check("claim")?;
        self.inner.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.check("renew")?;
        self.inner.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.check("complete")?;
        self.inner.complete(lease, keep_for).await
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.check("fail")?;
        self.inner.fail(lease, release).await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.check("bury")?;
        self.inner.bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.check("get")?;
        self.inner.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.check("lease_state")?;
        self.inner.lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.check("forget")?;
        self.inner.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.check("revive")?;
        self.inner.revive(scope, key).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_reads_store_unavailable_until_the_store_answers() {
    let broker = MemoryBroker::new("q");
    broker
        .publish(OutgoingMessage::new("x").with_message_id("k"))
        .await
        .unwrap();
    let store = Switchable::default();
    store.down.store(true, Ordering::SeqCst);
    let engine = Engine::builder(broker.clone(), store.clone(), |_m: Message| async {
        Ok(())
    })
    .scope("health")
    .build()
    .unwrap();
    let mut health = engine.health();
    let run = tokio::spawn(engine.run(CancellationToken::new()));

    reaches(&mut health, EngineState::StoreUnavailable).await;
    assert!(!health.state().is_ready());
    // It stays so while the store keeps failing (claims of the requeued
    // delivery after each backoff): no flapping with the backoff.
    let changed = tokio::time::timeout(Duration::from_secs(30), health.changed()).await;
    assert!(
        changed.is_err(),
        "changed while the store was down: {changed:?}"
    );
    assert_eq!(broker.stats().acked, 0);

    store.down.store(false, Ordering::SeqCst);
    reaches(&mut health, EngineState::Running).await;
    broker.close_when_idle();
    let report = run.await.unwrap();
    assert_eq!(report.handled, 1);
    assert!(report.store_errors >= 2, "{report:?}");
    assert_eq!(health.state(), EngineState::Stopped);
}
