//! The network breaks between the store and Redis: a `FaultProxy` cuts or
//! stalls the connection while claims run.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::SECOND;
use idemq::testing::FaultProxy;
use idemq::testing::store::{assert_applied, must_claim};
use idemq::{Claim, ClaimTtl, DedupStore, Error, Fenced};
use idemq_redis::{RedisConfig, RedisDedupStore};

const LONG: ClaimTtl = ClaimTtl {
    lease: Duration::from_secs(120),
    retain: Duration::from_secs(120),
};

/// A proxy in front of Redis and a store talking through it, with short
/// timeouts. `None` when Redis is down (skip).
async fn proxied(timeout: Duration) -> Option<(FaultProxy, RedisDedupStore)> {
    common::store().await?;
    let proxy = FaultProxy::start(common::redis_addr().await)
        .await
        .expect("start proxy");
    let config = RedisConfig::new()
        .with_prefix(common::fresh_prefix())
        .with_response_timeout(timeout)
        .with_connection_timeout(timeout);
    let url = format!("redis://default:secret@{}", proxy.addr());
    let store = RedisDedupStore::connect_with(&url, config)
        .await
        .expect("connect through the proxy");
    Some((proxy, store))
}

/// Tries `op` until it succeeds, for at most `within`; answers how long it
/// took. Every failure on the way must be transient.
async fn recovers<T, F, Fut>(within: Duration, mut op: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let started = Instant::now();
    loop {
        match op().await {
            Ok(_) => return started.elapsed(),
            Err(e) => {
                assert!(e.is_transient(), "must be transient: {e:?}");
                assert!(
                    started.elapsed() < within,
                    "no recovery within {within:?}, last error: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Lets the proxy act on a mode change before the next request goes out.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[derive(Default)]
struct Tally {
    won: HashMap<String, usize>,
    answers: usize,
    errors: usize,
    non_transient: Vec<String>,
    secrets_shown: Vec<String>,
}

fn record(t: &mut Tally, key: String, answer: Result<Claim, Error>) {
    match answer {
        Ok(Claim::Claimed(_)) => {
            *t.won.entry(key).or_default() += 1;
            t.answers += 1;
        }
        Ok(Claim::InProgress { .. } | Claim::Done) => t.answers += 1,
        Ok(Claim::Dead) => t.non_transient.push("unexpected Dead".into()),
        Err(e) => {
            t.errors += 1;
            let text = format!("{e} {e:?}");
            if text.contains("secret") {
                t.secrets_shown.push(text);
            }
            if !e.is_transient() {
                t.non_transient.push(format!("{e:?}"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_fails_transiently_then_recovers_without_double_claims() {
    let Some((proxy, store)) = proxied(Duration::from_millis(500)).await else {
        return;
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    const KEYS: usize = 400;
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (store, tally, stop, next) =
                (store.clone(), tally.clone(), stop.clone(), next.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    // Every key is claimed again and again, by many tasks.
                    let key = format!("k{}", next.fetch_add(1, Ordering::Relaxed) % KEYS);
                    let answer = store.claim("cut", &key, LONG).await;
                    let won = match &answer {
                        Ok(Claim::Claimed(lease)) => Some(lease.clone()),
                        _ => None,
                    };
                    {
                        let mut t = tally.lock().expect("tally");
                        record(&mut t, key, answer);
                    }
                    // Half of the winners complete; either way the key
                    // must never be won again.
                    if let Some(lease) = won.filter(|l| l.token.0.is_multiple_of(2)) {
                        let _ = store.complete(&lease, LONG.retain).await;
                    }
                }
            })
        })
        .collect();

    // Polled, not slept: a loaded machine may take its time.
    wait_until("claims to get through before the cut", || {
        tally.lock().expect("tally").answers > 0
    })
    .await;
    let accepted_before = proxy.connections_accepted();

    proxy.cut();
    wait_until("the cut connection to show as errors", || {
        tally.lock().expect("tally").errors > 0
    })
    .await;

    proxy.restore();
    let restored = Instant::now();
    let answers_at_restore = tally.lock().expect("tally").answers;
    // Recovery by itself: the same workers get answers again.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tally.lock().expect("tally").answers > answers_at_restore + 500 {
            break;
        }
        assert!(
            restored.elapsed() < 10 * SECOND,
            "the store did not recover within 10 s of the restore"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    assert!(
        proxy.connections_accepted() > accepted_before,
        "it reconnected"
    );

    // After the run, every operation works again.
    recovers(5 * SECOND, || store.claim("cut", "after", LONG)).await;

    let t = tally.lock().expect("tally");
    assert!(t.non_transient.is_empty(), "{:?}", t.non_transient);
    assert!(t.secrets_shown.is_empty(), "{:?}", t.secrets_shown);
    let twice: Vec<_> = t.won.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys won more than once: {twice:?}");
    assert!(!t.won.is_empty());
    eprintln!(
        "cut: {} answers, {} transient errors, {} keys won once, recovered in {:?}",
        t.answers,
        t.errors,
        t.won.len(),
        restored.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_connection_times_out_instead_of_hanging() {
    let timeout = Duration::from_millis(300);
    let Some((proxy, store)) = proxied(timeout).await else {
        return;
    };
    let lease = must_claim(&store, "bh", "k", LONG).await;
    let accepted_before = proxy.connections_accepted();

    proxy.blackhole();
    settle().await;
    for round in 0..4 {
        let started = Instant::now();
        let results = futures::future::join_all((0..8).map(|i| {
            let store = store.clone();
            async move { store.claim("bh", &format!("x{i}"), LONG).await }
        }))
        .await;
        let took = started.elapsed();
        for r in results {
            match r {
                Err(
                    e @ Error::Timeout {
                        backend: "redis",
                        after,
                        ..
                    },
                ) => {
                    assert!(e.is_transient());
                    assert_eq!(after, timeout);
                }
                other => panic!("round {round}: expected a timeout, got {other:?}"),
            }
        }
        assert!(
            took >= timeout - Duration::from_millis(50) && took < timeout * 3,
            "round {round}: took {took:?} for a {timeout:?} timeout"
        );
    }
    let renewed = store.renew(&lease, LONG.lease).await;
    assert!(matches!(renewed, Err(Error::Timeout { .. })), "{renewed:?}");
    // Timeouts in a row made the store open a replacement connection.
    assert!(
        proxy.connections_accepted() > accepted_before,
        "a hung connection must be replaced"
    );

    proxy.restore();
    let took = recovers(5 * SECOND, || store.renew(&lease, LONG.lease)).await;
    assert_applied(store.complete(&lease, LONG.retain).await);
    eprintln!("blackhole: recovered {took:?} after the restore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_forms_fail_transiently_when_cut() {
    let Some((proxy, store)) = proxied(Duration::from_millis(300)).await else {
        return;
    };
    let keys: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    proxy.cut();
    settle().await;
    let err = store
        .claim_many("batch", &keys, LONG)
        .await
        .expect_err("cut");
    assert!(err.is_transient(), "{err:?}");
    proxy.restore();
    recovers(5 * SECOND, || store.ping()).await;
    let claims = store
        .claim_many("batch", &keys, LONG)
        .await
        .expect("claim_many after restore");
    let leases: Vec<_> = claims
        .into_iter()
        .map(|c| c.into_lease().expect("nothing ran during the cut"))
        .collect();
    proxy.cut();
    settle().await;
    let err = store
        .complete_many(&leases, LONG.retain)
        .await
        .expect_err("cut");
    assert!(err.is_transient(), "{err:?}");
    proxy.restore();
    recovers(5 * SECOND, || store.ping()).await;
    assert_eq!(
        store
            .complete_many(&leases, LONG.retain)
            .await
            .expect("complete_many after restore"),
        vec![Fenced::Applied; 10]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanning_states_times_out_per_round_trip() {
    let timeout = Duration::from_millis(300);
    let Some((proxy, store)) = proxied(timeout).await else {
        return;
    };
    let keys: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    store
        .claim_many("scan", &keys, LONG)
        .await
        .expect("claim_many");
    let found = store.scan_states(Some("scan"), 1000).await.expect("scan");
    assert_eq!((found.counts.claimed, found.complete), (20, true));

    proxy.blackhole();
    settle().await;
    let started = Instant::now();
    let err = store
        .scan_states(None, 1000)
        .await
        .expect_err("no answer through a hung link");
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                backend: "redis",
                op: "scan_states",
                after,
            } if after == timeout
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(
        took < timeout * 3,
        "took {took:?} for a {timeout:?} timeout"
    );

    proxy.restore();
    recovers(5 * SECOND, || store.scan_states(Some("scan"), 1000)).await;
    let found = store.scan_states(Some("scan"), 1000).await.expect("scan");
    assert_eq!(found.counts.claimed, 20);
}

/// Waits (10 s at most) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + 10 * SECOND;
    while !cond() {
        assert!(Instant::now() < until, "waited 10 s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Health through a real store outage: the engine's link to Redis is
/// black-holed, so its claims time out; a readiness probe reads
/// `StoreUnavailable` (and the delivery is not handled) until the link is
/// back, then `Running`, and the message is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reads_store_unavailable_while_the_link_is_black_holed() {
    use idemq::memory::MemoryBroker;
    use idemq::{
        Backoff, Broker, CancellationToken, Engine, EngineState, Message, OutgoingMessage,
    };

    let Some((proxy, store)) = proxied(Duration::from_millis(300)).await else {
        return;
    };
    let broker = MemoryBroker::new("health");
    proxy.blackhole();
    broker
        .publish(OutgoingMessage::new("x").with_message_id("k"))
        .await
        .expect("publish");
    let engine = Engine::builder(broker.clone(), store, |_m: Message| async { Ok(()) })
        .scope("health")
        .failure_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .build()
        .expect("engine");
    let health = engine.health();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(engine.run(shutdown.clone()));

    wait_until("health to read StoreUnavailable", || {
        health.state() == EngineState::StoreUnavailable
    })
    .await;
    assert!(!health.state().is_ready());
    assert_eq!(
        broker.stats().acked,
        0,
        "nothing is handled while the store is away"
    );

    proxy.restore();
    wait_until("the message to be handled after the restore", || {
        broker.stats().acked > 0
    })
    .await;
    assert_eq!(health.state(), EngineState::Running);
    assert!(health.state().is_ready());
    shutdown.cancel();
    let report = run.await.expect("engine task");
    assert_eq!(report.handled, 1, "{report}");
    assert!(report.store_errors >= 1, "{report}");
}
