//! Partial failures on the memory backends: settlements whose answer was
//! lost, a transactional commit of unknown outcome, and shutdown while the
//! store hangs. The same findings are tested against the real stores in
//! the backend crates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::testing::crash::{CrashPoint, CrashingStore};
use idemq::{
    Backoff, Broker, Claim, ClaimTtl, Completion, DedupStore, Engine, Error, Fenced, Handler,
    HandlerError, HandlerResultExt, Lease, Message, OutgoingMessage, RELEASE_BOUND, Record,
    RecordState, Release, Revival, Stopped,
};
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "partial";

async fn publish(broker: &MemoryBroker, n: usize) {
    for i in 0..n {
        broker
            .publish(OutgoingMessage::new("{}").with_message_id(format!("m{i}")))
            .await
            .expect("publish");
    }
}

fn engine<S: DedupStore, H: Handler>(
    broker: &MemoryBroker,
    store: S,
    handler: H,
) -> Engine<MemoryBroker, S, H> {
    Engine::builder(broker.clone(), store, handler)
        .scope(SCOPE)
        .retry_backoff(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(5),
        ))
        .failure_backoff(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(20),
        ))
        .build()
        .expect("engine")
}

/// Cancels `shutdown` and waits (an hour of tokio's paused clock at most)
/// for `run` to return: its report and how long the stop took.
async fn stop(
    shutdown: &CancellationToken,
    run: tokio::task::JoinHandle<idemq::Report>,
) -> (idemq::Report, Duration) {
    let asked = tokio::time::Instant::now();
    shutdown.cancel();
    let report = tokio::time::timeout(Duration::from_secs(3600), run)
        .await
        .expect("run must return while the store or the broker hangs")
        .expect("run task");
    (report, asked.elapsed())
}

/// Counts runs and succeeds.
fn counting(runs: &Arc<AtomicU32>) -> impl Handler + use<> {
    let runs = runs.clone();
    move |_m: Message| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Every completion is applied but its answer lost once: the engine's
/// retry finds its own done record. Every message handled once, acked,
/// and not one reported as a lost lease.
#[tokio::test]
async fn a_completion_whose_answer_was_lost_is_not_a_lost_lease() {
    let broker = MemoryBroker::new("q");
    publish(&broker, 20).await;
    broker.close_when_idle();
    let store = CrashingStore::new(MemoryDedupStore::new());
    store.crash_at(CrashPoint::AfterComplete, 20);
    let runs = Arc::new(AtomicU32::new(0));
    let report = engine(&broker, store.clone(), counting(&runs))
        .run(CancellationToken::new())
        .await;
    assert_eq!(store.crashes(), 20);
    assert_eq!((report.handled, report.lease_lost), (20, 0), "{report:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 20);
    let stats = broker.stats();
    assert_eq!((stats.acked, stats.requeued, stats.ready), (20, 0, 0));
    for i in 0..20 {
        let r = store.get(SCOPE, &format!("m{i}")).await.unwrap().unwrap();
        assert_eq!((r.state, r.attempts), (RecordState::Done, 1));
    }
}

/// A failed attempt's release applied with its answer lost: retried as
/// usual, not a lost lease.
#[tokio::test]
async fn a_release_whose_answer_was_lost_is_retried_not_lost() {
    let broker = MemoryBroker::new("q");
    publish(&broker, 1).await;
    broker.close_when_idle();
    let store = CrashingStore::new(MemoryDedupStore::new());
    store.crash_at(CrashPoint::AfterFail, 1);
    let runs = Arc::new(AtomicU32::new(0));
    let seen = runs.clone();
    let handler = move |_m: Message| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(HandlerError::retry("first run fails"))
            } else {
                Ok(())
            }
        }
    };
    let report = engine(&broker, store.clone(), handler)
        .run(CancellationToken::new())
        .await;
    assert_eq!(
        (report.handled, report.retried, report.lease_lost),
        (1, 1, 0)
    );
    let r = store.get(SCOPE, "m0").await.unwrap().unwrap();
    assert_eq!((r.state, r.attempts), (RecordState::Done, 2));
}

/// A handler that marks its key done itself (as a transactional one does
/// in its transaction) and then reports `outcome`: a commit whose answer
/// was lost looks exactly like this.
struct CommitsThenFails {
    store: MemoryDedupStore,
    commit: bool,
    runs: Arc<AtomicU32>,
}

#[async_trait]
impl Handler for CommitsThenFails {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let first = self.runs.fetch_add(1, Ordering::SeqCst) == 0;
        if first && self.commit {
            let done = self
                .store
                .complete(msg.lease(), msg.keep_for())
                .await
                .retryable()?;
            assert_eq!(done, Fenced::Applied);
        }
        if first {
            return Err(HandlerError::retry(
                "commit failed: connection reset by peer",
            ));
        }
        match self.store.complete(msg.lease(), msg.keep_for()).await {
            Ok(Fenced::Applied) => Ok(()),
            Ok(Fenced::LeaseLost) => Err(HandlerError::LeaseLost),
            Err(e) => Err(HandlerError::retry(e)),
        }
    }
    fn completion(&self) -> Completion {
        Completion::InHandler
    }
}

/// The commit landed but the handler saw an error: the engine reads the
/// record before it retries, finds the key done by this lease, and acks.
/// The handler ran once; nothing is retried, released or lost.
#[tokio::test]
async fn a_commit_that_landed_though_it_failed_is_handled_once() {
    let broker = MemoryBroker::new("q");
    publish(&broker, 1).await;
    broker.close_when_idle();
    let store = MemoryDedupStore::new();
    let runs = Arc::new(AtomicU32::new(0));
    let handler = CommitsThenFails {
        store: store.clone(),
        commit: true,
        runs: runs.clone(),
    };
    let report = engine(&broker, store.clone(), handler)
        .run(CancellationToken::new())
        .await;
    assert_eq!(
        (report.handled, report.retried, report.lease_lost),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = broker.stats();
    assert_eq!((stats.acked, stats.retried, stats.requeued), (1, 0, 0));
    let r = store.get(SCOPE, "m0").await.unwrap().unwrap();
    assert_eq!((r.state, r.attempts), (RecordState::Done, 1));
}

/// The commit did not land: the read finds the claim still held, and the
/// failure is retried as any other.
#[tokio::test]
async fn a_commit_that_did_not_land_is_retried() {
    let broker = MemoryBroker::new("q");
    publish(&broker, 1).await;
    broker.close_when_idle();
    let store = MemoryDedupStore::new();
    let runs = Arc::new(AtomicU32::new(0));
    let handler = CommitsThenFails {
        store: store.clone(),
        commit: false,
        runs: runs.clone(),
    };
    let report = engine(&broker, store.clone(), handler)
        .run(CancellationToken::new())
        .await;
    assert_eq!(
        (report.handled, report.retried, report.lease_lost),
        (1, 1, 0)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let r = store.get(SCOPE, "m0").await.unwrap().unwrap();
    assert_eq!((r.state, r.attempts), (RecordState::Done, 2));
}

/// A store that answers claims and then hangs on every settlement (and on
/// the read of a lease): a partition that begins mid-message.
#[derive(Clone)]
struct HangsAfterClaim(MemoryDedupStore);

#[async_trait]
impl DedupStore for HangsAfterClaim {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        self.0.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.0.renew(lease, extend).await
    }
    async fn complete(&self, _: &Lease, _: Duration) -> Result<Fenced, Error> {
        std::future::pending().await
    }
    async fn fail(&self, _: &Lease, _: Release) -> Result<Fenced, Error> {
        std::future::pending().await
    }
    async fn bury(&self, _: &Lease, _: Duration) -> Result<Fenced, Error> {
        std::future::pending().await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.0.get(scope, key).await
    }
    async fn lease_state(&self, _: &Lease) -> Result<Option<RecordState>, Error> {
        std::future::pending().await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.0.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.0.revive(scope, key).await
    }
}

/// Shutdown while every settlement hangs: `run` still returns within the
/// grace period plus [`RELEASE_BOUND`] (on tokio's paused clock), and the
/// deliveries it could not settle are still the broker's, not lost.
#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_while_the_store_hangs() {
    let broker = MemoryBroker::new("q");
    publish(&broker, 6).await;
    let store = HangsAfterClaim(MemoryDedupStore::new());
    let runs = Arc::new(AtomicU32::new(0));
    let grace = Duration::from_secs(3);
    let engine = Engine::builder(broker.clone(), store, counting(&runs))
        .scope(SCOPE)
        .shutdown_grace(grace)
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(engine.run(shutdown.clone()));
    while runs.load(Ordering::SeqCst) < 6 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (report, took) = stop(&shutdown, run).await;
    assert!(took <= grace + RELEASE_BOUND, "{took:?}");
    assert!(
        matches!(report.stopped, Stopped::Shutdown),
        "{}",
        report.stopped
    );
    assert_eq!(report.handled, 0);
    // Nothing acked, nothing dropped: the broker still holds all six.
    let stats = broker.stats();
    assert_eq!(stats.acked, 0);
    assert_eq!(broker.requeue_unacked() + stats.ready, 6);
}

/// The memory broker, with `prepare` and `pause` as a client that is
/// reconnecting sees them: hanging, or failing a number of times.
struct Reconnecting {
    inner: MemoryBroker,
    prepare_hangs: bool,
    pause_hangs: bool,
    pause_failures_left: AtomicU32,
    pauses: AtomicU32,
}

impl Reconnecting {
    fn new(inner: &MemoryBroker) -> Reconnecting {
        Reconnecting {
            inner: inner.clone(),
            prepare_hangs: false,
            pause_hangs: false,
            pause_failures_left: AtomicU32::new(0),
            pauses: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl Broker for Reconnecting {
    async fn prepare(&self, concurrency: usize) -> Option<usize> {
        if self.prepare_hangs {
            std::future::pending::<()>().await;
        }
        self.inner.prepare(concurrency).await
    }
    async fn next(&self) -> Result<Option<idemq::Delivery>, Error> {
        self.inner.next().await
    }
    async fn pause(&self) -> Result<bool, Error> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        if self.pause_hangs {
            std::future::pending::<()>().await;
        }
        let failing =
            self.pause_failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(Error::Unavailable {
                backend: "test",
                op: "basic.cancel",
                source: "the channel is reconnecting".into(),
            });
        }
        self.inner.pause().await
    }
    async fn ack(&self, d: &idemq::Delivery) -> Result<(), Error> {
        self.inner.ack(d).await
    }
    async fn nack(&self, d: &idemq::Delivery, requeue: bool) -> Result<(), Error> {
        self.inner.nack(d, requeue).await
    }
    async fn retry_later(
        &self,
        d: &idemq::Delivery,
        delay: Duration,
        attempt: u32,
    ) -> Result<(), Error> {
        self.inner.retry_later(d, delay, attempt).await
    }
    async fn dead_letter(&self, d: &idemq::Delivery, l: &idemq::DeadLetter) -> Result<(), Error> {
        self.inner.dead_letter(d, l).await
    }
    async fn publish(&self, m: OutgoingMessage) -> Result<(), Error> {
        self.inner.publish(m).await
    }
    async fn next_dead_letter(&self) -> Result<Option<idemq::Delivery>, Error> {
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

/// A store whose every claim fails transiently: the engine's gate closes.
fn unreachable_store() -> CrashingStore<MemoryDedupStore> {
    let store = CrashingStore::new(MemoryDedupStore::new());
    store.crash_at(CrashPoint::AfterClaim, 1_000);
    store
}

/// Shutdown while the broker hangs in `prepare` (at start) or in `pause`
/// (the store is unreachable, so the engine pauses its consumer): `run`
/// returns within the grace period plus [`RELEASE_BOUND`] and nothing is
/// acked or lost.
#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_a_broker_stuck_in_prepare_or_pause() {
    for in_prepare in [true, false] {
        let inner = MemoryBroker::new("q");
        publish(&inner, 4).await;
        let store = unreachable_store();
        let runs = Arc::new(AtomicU32::new(0));
        let grace = Duration::from_secs(3);
        let mut broker = Reconnecting::new(&inner);
        broker.prepare_hangs = in_prepare;
        broker.pause_hangs = true;
        let engine = Engine::builder(broker, store.clone(), counting(&runs))
            .scope(SCOPE)
            .shutdown_grace(grace)
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(engine.run(shutdown.clone()));
        if !in_prepare {
            while store.crashes() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (report, took) = stop(&shutdown, run).await;
        assert!(
            took <= grace + RELEASE_BOUND,
            "in_prepare={in_prepare}: {took:?}"
        );
        assert!(
            matches!(report.stopped, Stopped::Shutdown),
            "{}",
            report.stopped
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "no handler runs without the store"
        );
        let stats = inner.stats();
        assert_eq!(stats.acked, 0);
        assert_eq!(
            inner.requeue_unacked() + stats.ready,
            4,
            "in_prepare={in_prepare}"
        );
    }
}

/// A pause that fails (the broker client is reconnecting, and will hold a
/// fresh prefetch once it is back) is tried again within a second, not
/// after the failure backoff: the consumer does not sit on deliveries other
/// consumers could take.
#[tokio::test(start_paused = true)]
async fn a_failed_pause_is_tried_again_before_the_failure_backoff_ends() {
    let inner = MemoryBroker::new("q");
    publish(&inner, 4).await;
    let store = unreachable_store();
    let broker = Arc::new(Reconnecting::new(&inner));
    broker.pause_failures_left.store(3, Ordering::SeqCst);
    let runs = Arc::new(AtomicU32::new(0));
    let engine = Engine::builder(broker.clone(), store.clone(), counting(&runs))
        .scope(SCOPE)
        .failure_backoff(Backoff::new(
            Duration::from_secs(30),
            Duration::from_secs(30),
        ))
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(engine.run(shutdown.clone()));
    while store.crashes() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        broker.pauses.load(Ordering::SeqCst),
        4,
        "three failed pauses, then one that went through, within 2 s of a 30 s backoff"
    );
    assert_eq!(inner.stats().acked, 0);
    shutdown.cancel();
    let report = run.await.unwrap();
    assert!(
        matches!(report.stopped, Stopped::Shutdown),
        "{}",
        report.stopped
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
