//! `Coalescing`: concurrent claims and completions merged into batch calls,
//! with every caller answered exactly as the wrapped store answered its key.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idemq::coalesce::Coalescing;
use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::testing::store::{assert_applied, must_claim};
use idemq::{
    Broker, Claim, ClaimTtl, DedupStore, Engine, Error, Fenced, Lease, OutgoingMessage, Record,
    RecordState, Release, Revival,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const TTL: ClaimTtl = ClaimTtl {
    lease: Duration::from_secs(30),
    retain: Duration::from_secs(60),
};
const KEEP: Duration = Duration::from_secs(60);

mod conformance {
    use super::*;

    async fn setup() -> Option<Coalescing<MemoryDedupStore>> {
        // One slot, so the suite's concurrent calls really go through batches.
        Some(Coalescing::new(MemoryDedupStore::new()).with_max_in_flight(1))
    }

    idemq::dedup_store_conformance!(setup);
}

/// The scope and keys of one `claim_many` call.
type Batch = (String, Vec<String>);

/// A memory store that records every batch call, can hold calls at a gate
/// until the test lets them through, and can fail its batch forms.
#[derive(Clone, Default)]
struct Probe {
    store: MemoryDedupStore,
    /// Keys of each `claim_many` call, with its scope.
    claim_batches: Arc<Mutex<Vec<Batch>>>,
    complete_batches: Arc<Mutex<Vec<usize>>>,
    singles: Arc<AtomicUsize>,
    /// Calls waiting at the gate.
    waiting: Arc<AtomicUsize>,
    /// When set, every claim and claim_many waits for a permit.
    gate: Option<Arc<Semaphore>>,
    fail_batches: bool,
    /// A key whose record the store cannot read: its claims fail for good,
    /// and so does any batch holding it.
    poison: Option<&'static str>,
    /// When set, every claim and completion takes this long (a network).
    delay: Option<Duration>,
}

impl Probe {
    fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (
            Probe {
                gate: Some(gate.clone()),
                ..Probe::default()
            },
            gate,
        )
    }

    async fn pass(&self) {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(gate) = &self.gate {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            gate.acquire().await.expect("gate open").forget();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn claim_batches(&self) -> Vec<Batch> {
        self.claim_batches.lock().unwrap().clone()
    }
}

#[async_trait]
impl DedupStore for Probe {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        self.pass().await;
        self.singles.fetch_add(1, Ordering::SeqCst);
        if self.poison == Some(key) {
            return Err(poisoned());
        }
        self.store.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.store.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        self.store.complete(lease, keep_for).await
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.store.fail(lease, release).await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.store.bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.store.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.store.lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.store.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.store.revive(scope, key).await
    }
    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        self.pass().await;
        self.claim_batches
            .lock()
            .unwrap()
            .push((scope.to_owned(), keys.to_vec()));
        if keys.iter().any(|k| self.poison == Some(k.as_str())) {
            return Err(poisoned());
        }
        if self.fail_batches {
            return Err(Error::Unavailable {
                backend: "probe",
                op: "claim_many",
                source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into(),
            });
        }
        self.store.claim_many(scope, keys, ttl).await
    }
    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        self.complete_batches.lock().unwrap().push(leases.len());
        self.store.complete_many(leases, keep_for).await
    }
}

fn poisoned() -> Error {
    Error::Backend {
        backend: "probe",
        op: "claim",
        transient: false,
        source: "WRONGTYPE a foreign value at the key".into(),
    }
}

/// Waits until exactly `n` claims wait in the queue.
async fn wait_queued<S: DedupStore + 'static>(store: &Coalescing<S>, n: usize) {
    for _ in 0..2_000 {
        if store.stats().queued_claims == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!(
        "{} claims queued, waited for {n}",
        store.stats().queued_claims
    );
}

/// Waits until `n` calls sit at the probe's gate.
async fn wait_at_gate(probe: &Probe, n: usize) {
    for _ in 0..2_000 {
        if probe.waiting.load(Ordering::SeqCst) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!(
        "{} calls at the gate, waited for {n}",
        probe.waiting.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_go_out_in_batches_and_each_caller_gets_its_own_answer() {
    let (probe, gate) = Probe::gated();
    let store = Coalescing::new(probe.clone())
        .with_max_in_flight(2)
        .with_max_batch(50);
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let lease = must_claim(&store, "s", &format!("k{i}"), TTL).await;
                assert_eq!(
                    (lease.key.as_str(), lease.attempt),
                    (format!("k{i}").as_str(), 1)
                );
                assert_applied(store.complete(&lease, KEEP).await);
            })
        })
        .collect();
    // Two calls hold the slots; everything else waits in the queue.
    wait_at_gate(&probe, 2).await;
    wait_queued(&store, 298).await;
    gate.add_permits(10_000);
    for t in tasks {
        t.await.expect("claimer");
    }
    let stats = store.stats();
    assert_eq!(stats.direct_claims + stats.batched_claims, 300);
    assert_eq!(stats.direct_completes + stats.batched_completes, 300);
    assert_eq!((stats.direct_claims, stats.batched_claims), (2, 298));
    let batches = probe.claim_batches();
    assert_eq!(batches.len() as u64, stats.claim_batches);
    assert!(
        batches.iter().all(|(_, keys)| keys.len() <= 50),
        "max_batch kept"
    );
    // 298 queued claims in batches of at most 50.
    assert_eq!(batches.len(), 6);
    let mut seen = HashSet::new();
    for (_, keys) in &batches {
        for k in keys {
            assert!(seen.insert(k.clone()), "{k} claimed in two batches");
        }
    }
    assert_eq!(seen.len() as u64 + stats.direct_claims, 300);
    for i in 0..300 {
        let rec = probe
            .get("s", &format!("k{i}"))
            .await
            .unwrap()
            .expect("record");
        assert_eq!((rec.state, rec.attempts), (RecordState::Done, 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_never_twice_in_one_batch_and_has_one_winner() {
    let (probe, gate) = Probe::gated();
    let store = Coalescing::new(probe.clone()).with_max_in_flight(1);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            // Every fourth caller uses another key, so batches mix keys.
            let key = if i % 4 == 0 {
                format!("other{i}")
            } else {
                "hot".to_owned()
            };
            tokio::spawn(async move { (key.clone(), store.claim("s", &key, TTL).await.unwrap()) })
        })
        .collect();
    wait_at_gate(&probe, 1).await;
    wait_queued(&store, 99).await;
    gate.add_permits(10_000);
    let mut hot_wins = 0;
    let mut hot_in_progress = 0;
    for t in tasks {
        match t.await.expect("claimer") {
            (key, Claim::Claimed(_)) if key == "hot" => hot_wins += 1,
            (key, Claim::InProgress { .. }) if key == "hot" => hot_in_progress += 1,
            (_, Claim::Claimed(_)) => {}
            (key, other) => panic!("{key}: {other:?}"),
        }
    }
    assert_eq!((hot_wins, hot_in_progress), (1, 74));
    for (_, keys) in probe.claim_batches() {
        let distinct: HashSet<_> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "a batch repeated a key: {keys:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_different_scopes_or_ttls_never_share_a_batch() {
    let (probe, gate) = Probe::gated();
    let store = Coalescing::new(probe.clone()).with_max_in_flight(1);
    let other_ttl = ClaimTtl {
        lease: Duration::from_secs(5),
        ..TTL
    };
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let store = store.clone();
            let (scope, ttl) = match i % 3 {
                0 => ("a", TTL),
                1 => ("b", TTL),
                _ => ("a", other_ttl),
            };
            tokio::spawn(async move {
                let lease = must_claim(&store, scope, &format!("k{i}"), ttl).await;
                assert_eq!(lease.scope, scope);
                (scope, i, lease)
            })
        })
        .collect();
    wait_at_gate(&probe, 1).await;
    wait_queued(&store, 89).await;
    gate.add_permits(10_000);
    for t in tasks {
        let (scope, i, _) = t.await.expect("claimer");
        let rec = probe
            .get(scope, &format!("k{i}"))
            .await
            .unwrap()
            .expect("record");
        let want = if i % 3 == 2 { 5 } else { 30 };
        let left = rec.lease_remaining.expect("claimed").as_secs();
        assert!(
            left <= want && left + 2 >= want,
            "k{i}: lease {left}s, want {want}s"
        );
    }
    for (scope, keys) in probe.claim_batches() {
        let ids: Vec<usize> = keys.iter().map(|k| k[1..].parse().unwrap()).collect();
        let kinds: HashSet<usize> = ids.iter().map(|i| i % 3).collect();
        assert_eq!(kinds.len(), 1, "batch mixed scopes or ttls: {keys:?}");
        let kind = *kinds.iter().next().unwrap();
        assert_eq!(scope, if kind == 1 { "b" } else { "a" });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_every_call_in_it_with_a_transient_error() {
    let (mut probe, gate) = Probe::gated();
    probe.fail_batches = true;
    let store = Coalescing::new(probe.clone()).with_max_in_flight(1);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.claim("s", &format!("k{i}"), TTL).await })
        })
        .collect();
    wait_at_gate(&probe, 1).await;
    wait_queued(&store, 19).await;
    gate.add_permits(10_000);
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        match t.await.expect("claimer") {
            Ok(Claim::Claimed(_)) => ok += 1,
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                assert!(
                    matches!(
                        e,
                        Error::Unavailable {
                            op: "claim_many",
                            ..
                        }
                    ),
                    "{e:?}"
                );
                let source = std::error::Error::source(&e).expect("a source");
                let io = source.downcast_ref::<std::io::Error>();
                assert_eq!(
                    io.map(std::io::Error::kind),
                    Some(std::io::ErrorKind::ConnectionReset),
                    "every caller gets the store's own error: {e:?}"
                );
                failed += 1;
            }
            Ok(other) => panic!("{other:?}"),
        }
    }
    // The one direct call went through; the 19 queued ones shared a failure.
    assert_eq!((ok, failed), (1, 19));
    assert!(!probe.claim_batches().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_fails_its_batch_for_good_fails_only_its_own_call() {
    let (mut probe, gate) = Probe::gated();
    probe.poison = Some("k7");
    let store = Coalescing::new(probe.clone()).with_max_in_flight(1);
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.claim("s", "first", TTL).await })
    };
    wait_at_gate(&probe, 1).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { (i, store.claim("s", &format!("k{i}"), TTL).await) })
        })
        .collect();
    wait_queued(&store, 20).await;
    gate.add_permits(10_000);
    first
        .await
        .unwrap()
        .unwrap()
        .into_lease()
        .expect("a won claim");
    for t in tasks {
        match t.await.expect("claimer") {
            (7, Err(e)) => assert!(!e.is_transient(), "{e:?}"),
            (7, other) => panic!("the poisoned key answered {other:?}"),
            (i, answer) => assert_eq!(
                answer.unwrap().into_lease().expect("a won claim").key,
                format!("k{i}")
            ),
        }
    }
    // The batch failed once, then its calls went out one by one.
    assert_eq!(probe.claim_batches().len(), 1);
    assert_eq!(probe.singles.load(Ordering::SeqCst), 21);
}

#[tokio::test]
async fn a_bad_key_fails_only_its_own_call() {
    let store = Coalescing::new(MemoryDedupStore::new());
    let err = store.claim("s", "", TTL).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    let err = store.claim("bad scope\n", "k", TTL).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    must_claim(&store, "s", "k", TTL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_while_queued_claims_nothing() {
    let (probe, gate) = Probe::gated();
    let store = Coalescing::new(probe.clone()).with_max_in_flight(1);
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.claim("s", "first", TTL).await })
    };
    wait_at_gate(&probe, 1).await;
    let quitter = {
        let store = store.clone();
        tokio::spawn(async move { store.claim("s", "quitter", TTL).await })
    };
    wait_queued(&store, 1).await;
    quitter.abort();
    let _ = quitter.await;
    gate.add_permits(10_000);
    first
        .await
        .unwrap()
        .unwrap()
        .into_lease()
        .expect("a won claim");
    // The next call drains the queue; the abandoned claim is not in it.
    must_claim(&store, "s", "later", TTL).await;
    assert_eq!(probe.get("s", "quitter").await.unwrap(), None);
    assert!(
        probe
            .claim_batches()
            .iter()
            .all(|(_, keys)| !keys.contains(&"quitter".to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_while_its_batch_is_out_has_the_claim_given_back() {
    let (probe, gate) = Probe::gated();
    let store = Coalescing::new(probe.clone()).with_max_in_flight(1);
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.claim("s", "first", TTL).await })
    };
    wait_at_gate(&probe, 1).await;
    let quitter = {
        let store = store.clone();
        tokio::spawn(async move { store.claim("s", "quitter", TTL).await })
    };
    wait_queued(&store, 1).await;
    // Let the direct call through: its slot goes to the queued claim, whose
    // batch then waits at the gate.
    gate.add_permits(1);
    first
        .await
        .unwrap()
        .unwrap()
        .into_lease()
        .expect("a won claim");
    wait_at_gate(&probe, 1).await;
    quitter.abort();
    let _ = quitter.await;
    gate.add_permits(10_000);
    // The batch answered nobody: the claim is released, attempt refunded.
    let mut rec = None;
    for _ in 0..100 {
        rec = probe.get("s", "quitter").await.unwrap();
        if rec
            .as_ref()
            .is_some_and(|r| r.state == RecordState::Released)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rec = rec.expect("the batch claimed the key");
    assert_eq!((rec.state, rec.attempts), (RecordState::Released, 0));
    let again = must_claim(&store, "s", "quitter", TTL).await;
    assert_eq!(again.attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_on_a_coalescing_store_handles_each_id_once_and_loses_nothing() {
    let broker = MemoryBroker::new("q");
    // Store calls take a millisecond, so the engine's 64 tasks overlap.
    let probe = Probe {
        delay: Some(Duration::from_millis(1)),
        ..Probe::default()
    };
    let store = Coalescing::new(probe.clone()).with_max_in_flight(2);
    let unique = 2_000;
    let mut published = 0;
    for i in 0..unique {
        // Every fifth id is published twice, the copies far apart.
        let copies = if i % 5 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            broker
                .publish(OutgoingMessage::new("{}").with_message_id(format!("m{i}")))
                .await
                .unwrap();
            published += 1;
        }
    }
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (handled, runs) = (handled.clone(), runs.clone());
        move |m: idemq::Message| {
            let (handled, runs) = (handled.clone(), runs.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                handled.lock().unwrap().insert(m.key().to_owned());
                Ok(())
            }
        }
    };
    broker.close_when_idle();
    let report = Engine::builder(broker.clone(), store.clone(), handler)
        .scope("e")
        .concurrency(64)
        .build()
        .unwrap()
        .run(CancellationToken::new())
        .await;
    assert_eq!(report.handled, unique);
    assert_eq!(runs.load(Ordering::SeqCst), unique as usize);
    assert_eq!(handled.lock().unwrap().len(), unique as usize);
    assert_eq!(report.received, published + report.deferred);
    let stats = broker.stats();
    assert_eq!((stats.unacked, stats.ready, stats.dead), (0, 0, 0));
    assert_eq!(stats.acked, published);
    let s = store.stats();
    assert!(s.batched_claims > 0 && s.batched_completes > 0, "{s:?}");
    for i in 0..unique {
        let rec = store
            .get("e", &format!("m{i}"))
            .await
            .unwrap()
            .expect("record");
        assert_eq!(rec.state, RecordState::Done, "m{i}");
    }
}
