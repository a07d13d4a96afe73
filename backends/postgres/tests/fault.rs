//! Network faults between the store and Postgres, through
//! `idemq::testing::FaultProxy`: transient errors while the connection is
//! cut or hung, recovery afterwards, and never two winners or two
//! completions for one key.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::testing::store::must_claim;
use idemq::testing::{FaultProxy, unique_scope};
use idemq::{Claim, ClaimTtl, DedupStore, Error, Fenced};
use idemq_postgres::PostgresDedupStore;
use sqlx::postgres::PgPoolOptions;

/// A stop flag shared by the workers.
#[derive(Clone, Default)]
struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

const TTL: ClaimTtl = ClaimTtl {
    // Long enough never to lapse during the test: a second winner for a key
    // would then be a real bug, not a takeover.
    lease: Duration::from_secs(120),
    retain: Duration::from_secs(120),
};

/// The proxy in front of the test server and a store whose pool goes
/// through it, or `None` (skip).
async fn proxied() -> Option<(FaultProxy, PostgresDedupStore)> {
    common::store().await?; // migrates the shared table directly
    let url = common::url();
    let (head, rest) = url.split_once('@')?;
    let (hostport, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream: SocketAddr = match tokio::net::lookup_host(hostport).await {
        Ok(mut addrs) => addrs.next()?,
        Err(e) => return idemq::testing::service_unavailable("postgres", e),
    };
    let proxy = FaultProxy::start(upstream).await.expect("start proxy");
    let via_proxy = format!("{head}@{}/{tail}", proxy.addr());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&via_proxy)
        .await
        .expect("connect through the proxy");
    let store = PostgresDedupStore::new(pool)
        .with_table(common::TEST_TABLE)
        .expect("valid")
        .with_op_timeout(Duration::from_millis(700));
    Some((proxy, store))
}

#[derive(Default)]
struct Tally {
    won: HashMap<String, usize>,
    applied: HashMap<String, usize>,
    errors: Vec<String>,
    ok_ops: usize,
}

/// Workers claiming and completing keys until `stop`; every outcome tallied.
async fn hammer(
    store: PostgresDedupStore,
    scope: String,
    keys: usize,
    tally: Arc<Mutex<Tally>>,
    stop: CancelFlag,
) {
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let key = format!("k{}", i % keys);
        i += 1;
        match store.claim(&scope, &key, TTL).await {
            Ok(Claim::Claimed(lease)) => {
                tally
                    .lock()
                    .unwrap()
                    .won
                    .entry(key.clone())
                    .and_modify(|n| *n += 1)
                    .or_insert(1);
                match store.complete(&lease, TTL.retain).await {
                    Ok(Fenced::Applied) => {
                        let mut t = tally.lock().unwrap();
                        *t.applied.entry(key).or_default() += 1;
                        t.ok_ops += 1;
                    }
                    Ok(Fenced::LeaseLost) => panic!("a live lease was lost: {lease:?}"),
                    Err(e) => record_error(&tally, e),
                }
            }
            Ok(_) => tally.lock().unwrap().ok_ops += 1,
            Err(e) => {
                record_error(&tally, e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn record_error(tally: &Mutex<Tally>, e: Error) {
    assert!(e.is_transient(), "a network fault must be transient: {e:?}");
    assert!(
        matches!(
            e,
            Error::Unavailable {
                backend: "postgres",
                ..
            } | Error::Timeout {
                backend: "postgres",
                ..
            }
        ),
        "{e:?}"
    );
    tally.lock().unwrap().errors.push(e.to_string());
}

async fn run_fault(fault: impl Fn(&FaultProxy), name: &str) {
    let Some((proxy, store)) = proxied().await else {
        return;
    };
    let scope = unique_scope(name);
    let keys = 40;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = CancelFlag::default();
    let workers: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(hammer(
                store.clone(),
                scope.clone(),
                keys,
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    fault(&proxy);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (errors_during, ok_before_restore) = {
        let t = tally.lock().unwrap();
        (t.errors.len(), t.ok_ops)
    };
    assert!(errors_during > 0, "the fault must surface as errors");
    // While the fault lasts, nothing succeeds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tally.lock().unwrap().ok_ops,
        ok_before_restore,
        "an operation succeeded through a dead link"
    );

    proxy.restore();
    let recovered = async {
        loop {
            if store.claim(&scope, "after", TTL).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), recovered)
        .await
        .expect("the store recovers once the network is back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for w in workers {
        w.await.expect("worker");
    }
    let ok_after = tally.lock().unwrap().ok_ops;
    assert!(ok_after > ok_before_restore, "work resumed after restore");

    // No key won twice, none completed twice; done only what was won.
    let t = std::mem::take(&mut *tally.lock().unwrap());
    let mut kinds: Vec<&str> = t
        .errors
        .iter()
        .map(|e| e.split(':').nth(2).unwrap_or(e))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    eprintln!(
        "{name}: {} keys won, {} completed, {} ok ops, {} transient errors ({kinds:?})",
        t.won.len(),
        t.applied.len(),
        t.ok_ops,
        t.errors.len()
    );
    for (key, n) in &t.won {
        assert_eq!(*n, 1, "{key} was won {n} times");
    }
    for (key, n) in &t.applied {
        assert_eq!(*n, 1, "{key} was completed {n} times");
        assert!(t.won.contains_key(key));
    }
    let won: HashSet<&String> = t.won.keys().collect();
    for i in 0..keys {
        let key = format!("k{i}");
        let claim = store
            .claim(&scope, &key, TTL)
            .await
            .expect("claim after recovery");
        match claim {
            // Completed (maybe its answer was lost): it must have been won.
            Claim::Done => assert!(won.contains(&key), "{key} is done but nobody won it"),
            // Claimed by a request whose answer was lost, or won and its
            // completion lost: held until the lease lapses.
            Claim::InProgress { .. } => {}
            // Nobody reached this key before: fine, unless it was won.
            Claim::Claimed(_) => assert!(!won.contains(&key), "{key} was won twice"),
            Claim::Dead => panic!("{key} is dead but nobody buried it"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_give_transient_errors_then_recover() {
    run_fault(FaultProxy::cut, "fault_cut").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_connections_time_out_then_recover() {
    run_fault(FaultProxy::blackhole, "fault_hang").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_states_is_bounded_by_the_operation_timeout() {
    let Some((proxy, store)) = proxied().await else {
        return;
    };
    let scope = unique_scope("fault_count");
    must_claim(&store, &scope, "k", TTL).await;
    let counts = store.count_states(Some(&scope)).await.expect("count");
    assert_eq!((counts.claimed, counts.total()), (1, 1));
    proxy.blackhole();
    let started = std::time::Instant::now();
    let err = store
        .count_states(None)
        .await
        .expect_err("no answer through a hung link");
    // The 700 ms operation timeout (or the pool's 500 ms acquire timeout,
    // when it checks the idle connection first), not TCP's.
    assert!(started.elapsed() < Duration::from_secs(3), "{err:?}");
    assert!(
        matches!(
            err,
            Error::Timeout {
                backend: "postgres",
                op: "count_states",
                ..
            } | Error::Unavailable {
                backend: "postgres",
                op: "count_states",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    proxy.restore();
    let recovered = async {
        loop {
            if let Ok(counts) = store.count_states(Some(&scope)).await {
                return counts;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let counts = tokio::time::timeout(Duration::from_secs(10), recovered)
        .await
        .expect("counts again once the network is back");
    assert_eq!(counts.claimed, 1);
}
