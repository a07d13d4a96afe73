//! The engine's state machine on the memory backends, one test per
//! transition, plus a property-style test with several engines.
//!
//! One file, past 600 lines: one test per row of the state machine, read
//! side by side with `src/engine/process.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::testing::store::{assert_applied, must_claim};
use idemq::{
    Backoff, Broker, Claim, ClaimTtl, DedupStore, Engine, HandlerError, HeaderValue, KeyStrategy,
    Message, OutgoingMessage, RecordState, Report, Stopped, headers,
};
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "test";

fn fast_retries() -> Backoff {
    Backoff::new(Duration::from_millis(10), Duration::from_millis(100))
}

async fn publish(broker: &MemoryBroker, id: &str, body: &str) {
    broker
        .publish(OutgoingMessage::new(body.to_owned()).with_message_id(id))
        .await
        .expect("publish");
}

/// Counts handler runs per key.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, u32>>>);

impl Calls {
    fn record(&self, msg: &Message) -> u32 {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(msg.key().to_owned()).or_default();
        *n += 1;
        *n
    }
    fn of(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
    fn total(&self) -> u32 {
        self.0.lock().unwrap().values().sum()
    }
    /// A handler that counts its runs and succeeds.
    fn ok_handler(&self) -> impl idemq::Handler + use<> {
        let calls = self.clone();
        move |m: Message| {
            let calls = calls.clone();
            async move {
                calls.record(&m);
                Ok(())
            }
        }
    }
}

async fn run_until_idle<H: idemq::Handler>(
    broker: &MemoryBroker,
    store: &MemoryDedupStore,
    handler: H,
) -> Report {
    broker.close_when_idle();
    Engine::builder(broker.clone(), store.clone(), handler)
        .scope(SCOPE)
        .retry_backoff(fast_retries())
        .build()
        .expect("engine")
        .run(CancellationToken::new())
        .await
}

fn reason_of(d: &idemq::Delivery) -> String {
    d.header(headers::REASON)
        .and_then(HeaderValue::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn unique_messages_are_handled_once_and_acked() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    for i in 0..100 {
        publish(&broker, &format!("m{i}"), "{}").await;
    }
    let report = run_until_idle(&broker, &store, calls.ok_handler()).await;
    assert_eq!(
        (report.received, report.handled, report.duplicates),
        (100, 100, 0)
    );
    assert!(
        matches!(report.stopped, Stopped::BrokerClosed),
        "{}",
        report.stopped
    );
    assert_eq!(calls.total(), 100);
    let stats = broker.stats();
    assert_eq!(
        (stats.acked, stats.unacked, stats.ready, stats.dead),
        (100, 0, 0, 0)
    );
    assert_eq!(
        store.get(SCOPE, "m7").await.unwrap().unwrap().state,
        RecordState::Done
    );
}

#[tokio::test]
async fn duplicates_are_acked_without_running_the_handler() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    for id in ["a", "b", "a", "c", "b", "a"] {
        publish(&broker, id, "x").await;
    }
    let report = run_until_idle(&broker, &store, calls.ok_handler()).await;
    assert_eq!((report.handled, report.duplicates), (3, 3));
    assert_eq!((calls.of("a"), calls.of("b"), calls.of("c")), (1, 1, 1));
    assert_eq!(broker.stats().acked, 6);
}

#[tokio::test]
async fn missing_key_is_dead_lettered_never_dropped() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    broker.publish(OutgoingMessage::new("no id")).await.unwrap();
    let report = run_until_idle(&broker, &store, calls.ok_handler()).await;
    assert_eq!(
        (report.dead_lettered, report.handled, calls.total()),
        (1, 0, 0)
    );
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(reason_of(&dead[0]), "missing-key");
    assert_eq!(&dead[0].body[..], b"no id");
}

#[tokio::test]
async fn header_and_body_hash_keys_when_configured() {
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    for _ in 0..2 {
        broker
            .publish(OutgoingMessage::new("h").with_header("x-key", "k-1"))
            .await
            .unwrap();
        broker
            .publish(OutgoingMessage::new("same body"))
            .await
            .unwrap();
    }
    broker.close_when_idle();
    let report = Engine::builder(broker.clone(), store.clone(), |_m: Message| async {
        Ok(())
    })
    .scope(SCOPE)
    .key_strategy(
        KeyStrategy::message_id()
            .with_header("x-key")
            .with_body_hash(),
    )
    .build()
    .unwrap()
    .run(CancellationToken::new())
    .await;
    assert_eq!(
        (report.handled, report.duplicates, report.dead_lettered),
        (2, 2, 0)
    );
    assert_eq!(
        store.get(SCOPE, "k-1").await.unwrap().unwrap().state,
        RecordState::Done
    );
}

#[tokio::test]
async fn hostile_keys_are_hashed_into_the_scope() {
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    let hostile = "}{other-scope:key} with spaces\n";
    publish(&broker, hostile, "x").await;
    publish(&broker, hostile, "x").await;
    let report = run_until_idle(&broker, &store, |_m: Message| async { Ok(()) }).await;
    assert_eq!((report.handled, report.duplicates), (1, 1));
    let key = idemq::key::normalize(hostile.as_bytes());
    assert!(key.starts_with('~'));
    assert_eq!(
        store.get(SCOPE, &key).await.unwrap().unwrap().state,
        RecordState::Done
    );
}

#[tokio::test]
async fn retryable_failures_are_retried_with_backoff_then_succeed() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    publish(&broker, "flaky", "x").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (calls.clone(), seen.clone());
    let report = run_until_idle(&broker, &store, move |m: Message| {
        let (c, s) = (c.clone(), s.clone());
        async move {
            s.lock()
                .unwrap()
                .push((m.attempt(), m.delivery().retry_attempt()));
            if c.record(&m) < 3 {
                return Err(HandlerError::retry("not yet"));
            }
            Ok(())
        }
    })
    .await;
    assert_eq!(
        (report.retried, report.handled, report.dead_lettered),
        (2, 1, 0)
    );
    // Store attempts 1,2,3; the copies carry the attempt that failed.
    assert_eq!(*seen.lock().unwrap(), vec![(1, 0), (2, 1), (3, 2)]);
    assert_eq!(broker.stats().retried, 2);
}

#[tokio::test]
async fn the_attempt_limit_is_exact() {
    for max in [1u32, 3, 5] {
        let (broker, store, calls) = (
            MemoryBroker::new("q"),
            MemoryDedupStore::new(),
            Calls::default(),
        );
        publish(&broker, "poison", "x").await;
        broker.close_when_idle();
        let c = calls.clone();
        let report = Engine::builder(broker.clone(), store.clone(), move |m: Message| {
            let c = c.clone();
            async move {
                c.record(&m);
                Err(HandlerError::retry("always fails"))
            }
        })
        .scope(SCOPE)
        .max_attempts(max)
        .retry_backoff(fast_retries())
        .build()
        .unwrap()
        .run(CancellationToken::new())
        .await;
        assert_eq!(
            calls.of("poison"),
            max,
            "handler runs with max_attempts={max}"
        );
        assert_eq!(
            (report.retried, report.dead_lettered),
            (u64::from(max - 1), 1)
        );
        let dead = broker.dead_letters();
        assert_eq!(reason_of(&dead[0]), "max-attempts");
        assert_eq!(
            dead[0]
                .header(headers::ATTEMPTS)
                .and_then(HeaderValue::as_i64),
            Some(i64::from(max))
        );
        assert_eq!(
            dead[0]
                .header(headers::DETAIL)
                .and_then(HeaderValue::as_str),
            Some("always fails")
        );
        assert_eq!(
            store.get(SCOPE, "poison").await.unwrap().unwrap().state,
            RecordState::Dead
        );
    }
}

#[tokio::test]
async fn a_claim_past_the_limit_is_dead_lettered_without_running_the_handler() {
    // A handler that crashed the process used up the attempts: each crash
    // left a lapsed claim, and each takeover counted.
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    let ttl = ClaimTtl {
        lease: Duration::from_millis(1),
        retain: Duration::from_secs(60),
    };
    for _ in 0..3 {
        assert!(matches!(
            store.claim(SCOPE, "crashy", ttl).await.unwrap(),
            Claim::Claimed(_)
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    publish(&broker, "crashy", "x").await;
    broker.close_when_idle();
    let report = Engine::builder(broker.clone(), store.clone(), calls.ok_handler())
        .scope(SCOPE)
        .max_attempts(3)
        .build()
        .unwrap()
        .run(CancellationToken::new())
        .await;
    assert_eq!(
        (calls.total(), report.dead_lettered, report.handled),
        (0, 1, 0)
    );
    assert_eq!(reason_of(&broker.dead_letters()[0]), "max-attempts");
    assert_eq!(
        store.get(SCOPE, "crashy").await.unwrap().unwrap().state,
        RecordState::Dead
    );
}

#[tokio::test]
async fn permanent_and_decode_failures_go_straight_to_the_dead_letter_queue() {
    #[derive(serde::Deserialize)]
    struct Order {
        qty: u32,
    }
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    publish(&broker, "bad-qty", r#"{"qty": 0}"#).await;
    publish(&broker, "not-json", "{{{").await;
    publish(&broker, "good", r#"{"qty": 2}"#).await;
    let c = calls.clone();
    let handler = idemq::json(move |order: Order, m: Message| {
        let c = c.clone();
        async move {
            c.record(&m);
            if order.qty == 0 {
                return Err(HandlerError::permanent("qty must be positive"));
            }
            Ok(())
        }
    });
    let report = run_until_idle(&broker, &store, handler).await;
    assert_eq!(
        (report.handled, report.dead_lettered, report.retried),
        (1, 2, 0)
    );
    assert_eq!((calls.of("bad-qty"), calls.of("not-json")), (1, 0));
    let mut reasons: Vec<_> = broker
        .dead_letters()
        .iter()
        .map(|d| (d.message_id.clone().unwrap(), reason_of(d)))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("bad-qty".into(), "permanent".into()),
            ("not-json".into(), "decode".into())
        ]
    );
    assert_eq!(
        store.get(SCOPE, "bad-qty").await.unwrap().unwrap().state,
        RecordState::Dead
    );
}

#[tokio::test(start_paused = true)]
async fn a_live_claim_defers_the_delivery_instead_of_requeueing_it() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    let ttl = ClaimTtl {
        lease: Duration::from_secs(5),
        retain: Duration::from_secs(60),
    };
    let other = must_claim(&store, SCOPE, "busy", ttl).await;
    // The other consumer finishes after 2 s.
    let s2 = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_applied(s2.complete(&other, Duration::from_secs(60)).await);
    });
    publish(&broker, "busy", "x").await;
    let report = run_until_idle(&broker, &store, calls.ok_handler()).await;
    // Deferrals of 100, 200, 400, 800 ms, then 1.6 s (past the 2 s the other
    // consumer took), then a duplicate: never a hot requeue loop, never a
    // second handler run.
    assert_eq!(
        (
            report.deferred,
            report.duplicates,
            report.handled,
            calls.total()
        ),
        (5, 1, 0, 0)
    );
    assert_eq!(broker.stats().requeued, 0);
}

async fn bury(store: &MemoryDedupStore, key: &str) {
    let ttl = ClaimTtl {
        lease: Duration::from_secs(5),
        retain: Duration::from_secs(60),
    };
    let lease = must_claim(store, SCOPE, key, ttl).await;
    assert_applied(store.bury(&lease, Duration::from_secs(60)).await);
}

#[tokio::test]
async fn copies_of_dead_messages_are_acked_or_dead_lettered_per_policy() {
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    bury(&store, "dead").await;
    publish(&broker, "dead", "a copy").await;
    let report = run_until_idle(&broker, &store, |_m: Message| async { Ok(()) }).await;
    assert_eq!(
        (report.dead_duplicates, report.dead_lettered, report.handled),
        (1, 0, 0)
    );

    let broker = MemoryBroker::new("q");
    publish(&broker, "dead", "a copy").await;
    broker.close_when_idle();
    let report = Engine::builder(broker.clone(), store.clone(), |_m: Message| async {
        Ok(())
    })
    .scope(SCOPE)
    .on_dead(idemq::OnDead::DeadLetter)
    .build()
    .unwrap()
    .run(CancellationToken::new())
    .await;
    assert_eq!((report.dead_duplicates, report.dead_lettered), (0, 1));
    assert_eq!(reason_of(&broker.dead_letters()[0]), "duplicate-of-dead");
}

#[tokio::test]
async fn a_key_is_buried_only_after_its_dead_letter_landed() {
    // The delivery goes stale (connection drop) while the handler runs: the
    // dead-lettering fails, so the key must not be buried, and the
    // redelivered copy must reach the dead-letter queue.
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    publish(&broker, "poison", "x").await;
    let b = broker.clone();
    let report = run_until_idle(&broker, &store, move |m: Message| {
        let b = b.clone();
        async move {
            if m.attempt() == 1 {
                assert_eq!(b.requeue_unacked(), 1);
            }
            Err(HandlerError::permanent("poison"))
        }
    })
    .await;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let dead = broker.dead_letters();
    assert_eq!(
        (dead.len(), reason_of(&dead[0])),
        (1, "permanent".to_owned())
    );
    let record = store.get(SCOPE, "poison").await.unwrap().unwrap();
    assert_eq!((record.state, record.attempts), (RecordState::Dead, 2));
}

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_the_lease_keeps_it_by_renewal() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    publish(&broker, "slow", "x").await;
    publish(&broker, "slow", "x").await; // a duplicate arrives while the first runs
    broker.close_when_idle();
    let c = calls.clone();
    let report = Engine::builder(broker.clone(), store.clone(), move |m: Message| {
        let c = c.clone();
        async move {
            c.record(&m);
            tokio::time::sleep(Duration::from_secs(20)).await; // lease is 3 s
            Ok(())
        }
    })
    .scope(SCOPE)
    .lease(Duration::from_secs(3))
    .defer_bounds(Duration::from_millis(100), Duration::from_secs(1))
    .build()
    .unwrap()
    .run(CancellationToken::new())
    .await;
    assert_eq!(calls.of("slow"), 1, "renewal must keep the duplicate out");
    assert_eq!(
        (report.handled, report.lease_lost, report.duplicates),
        (1, 0, 1)
    );
    assert!(report.deferred >= 10, "the duplicate waited: {report:?}");
}

#[tokio::test]
async fn a_lost_lease_never_overwrites_the_new_owner() {
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    publish(&broker, "k", "x").await;
    let new_owner = Arc::new(Mutex::new(None));
    let (s, n) = (store.clone(), new_owner.clone());
    let report = run_until_idle(&broker, &store, move |m: Message| {
        let (s, n) = (s.clone(), n.clone());
        async move {
            // Simulate another consumer taking over (an operator's forget,
            // then a new claim) while this handler runs.
            assert!(s.forget(SCOPE, m.key()).await.unwrap());
            let ttl = ClaimTtl {
                lease: Duration::from_secs(60),
                retain: Duration::from_secs(60),
            };
            let l = must_claim(&s, SCOPE, m.key(), ttl).await;
            *n.lock().unwrap() = Some(l);
            Ok(())
        }
    })
    .await;
    assert_eq!((report.lease_lost, report.handled), (1, 0));
    assert_eq!(broker.stats().acked, 1);
    let record = store.get(SCOPE, "k").await.unwrap().unwrap();
    assert_eq!(
        record.state,
        RecordState::Claimed,
        "the new owner's claim must stand"
    );
    let l = new_owner.lock().unwrap().clone().unwrap();
    assert_applied(store.complete(&l, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn a_panicking_handler_is_retried_not_fatal() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    publish(&broker, "p", "x").await;
    let c = calls.clone();
    let report = run_until_idle(&broker, &store, move |m: Message| {
        let c = c.clone();
        async move {
            if c.record(&m) == 1 {
                panic!("boom");
            }
            Ok(())
        }
    })
    .await;
    assert_eq!((report.retried, report.handled), (1, 1));
}

/// On a paused clock: the handlers' 5 ms only pass once every task waits,
/// so the engine fills all four slots before any handler ends, however
/// slow the machine (on a real clock a loaded machine could finish one
/// before the fourth starts, and the peak would read 3).
#[tokio::test(start_paused = true)]
async fn concurrency_bounds_the_handlers_in_flight() {
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    for i in 0..40 {
        publish(&broker, &format!("c{i}"), "x").await;
    }
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (now.clone(), peak.clone());
    broker.close_when_idle();
    let report = Engine::builder(broker.clone(), store.clone(), move |_m: Message| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let running = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    })
    .scope(SCOPE)
    .concurrency(4)
    .build()
    .unwrap()
    .run(CancellationToken::new())
    .await;
    assert_eq!(report.handled, 40);
    assert_eq!(peak.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_in_flight_releases_the_rest_and_loses_nothing() {
    let (broker, store, calls) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        Calls::default(),
    );
    for i in 0..10 {
        publish(
            &broker,
            &format!("s{i}"),
            if i % 3 == 0 { "hang" } else { "quick" },
        )
        .await;
    }
    let shutdown = CancellationToken::new();
    let c = calls.clone();
    let engine = Engine::builder(broker.clone(), store.clone(), move |m: Message| {
        let c = c.clone();
        async move {
            c.record(&m);
            let d = if &m.body()[..] == b"hang" { 3600 } else { 1 };
            tokio::time::sleep(Duration::from_secs(d)).await;
            Ok(())
        }
    })
    .scope(SCOPE)
    .concurrency(10)
    .shutdown_grace(Duration::from_secs(5))
    .build()
    .unwrap();
    let run = tokio::spawn(engine.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await; // all 10 in flight
    shutdown.cancel();
    let report = run.await.unwrap();
    assert!(
        matches!(report.stopped, Stopped::Shutdown),
        "{}",
        report.stopped
    );
    // Quick ones finished within the grace period; the 4 hanging ones were released.
    assert_eq!((report.handled, report.released), (6, 4));
    let stats = broker.stats();
    assert_eq!((stats.unacked, stats.ready, stats.acked), (0, 4, 6));
    for i in [0, 3, 6, 9] {
        let r = store.get(SCOPE, &format!("s{i}")).await.unwrap().unwrap();
        assert_eq!(
            (r.state, r.attempts),
            (RecordState::Released, 0),
            "attempt refunded"
        );
    }
    // A restarted consumer handles the rest: nothing lost.
    let report = run_until_idle(&broker, &store, |_m: Message| async { Ok(()) }).await;
    assert_eq!(report.handled, 4);
    for i in 0..10 {
        let r = store.get(SCOPE, &format!("s{i}")).await.unwrap().unwrap();
        assert_eq!((r.state, r.attempts), (RecordState::Done, 1));
    }
}

#[tokio::test]
async fn replay_brings_dead_letters_back_for_handling() {
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    publish(&broker, "r1", "x").await;
    let fixed = Arc::new(AtomicU32::new(0));
    let f = fixed.clone();
    let handler = move |_m: Message| {
        let f = f.clone();
        async move {
            if f.load(Ordering::SeqCst) == 0 {
                return Err(HandlerError::permanent("bug in handler"));
            }
            Ok(())
        }
    };
    let h = Arc::new(handler);
    let report = run_until_idle(&broker, &store, h.clone()).await;
    assert_eq!(report.dead_lettered, 1);
    fixed.store(1, Ordering::SeqCst);
    let replayed = idemq::Replay::new(&broker, &store)
        .run(&CancellationToken::new())
        .await;
    assert!(replayed.is_complete(), "{replayed}");
    assert_eq!((replayed.moved, replayed.already_done), (1, 0));
    let msgs = broker.stats();
    assert_eq!((msgs.dead, msgs.ready), (0, 1));
    // close_when_idle is sticky; the message is ready, so the run handles it.
    let report = run_until_idle(&broker, &store, h).await;
    assert_eq!((report.handled, report.dead_lettered), (1, 0));
}

/// K unique messages, each published 1 to 3 times, some failing
/// transiently, some permanently, consumed by several engines sharing one
/// broker and store, with simulated connection drops: every unique message
/// is handled successfully exactly once or dead-lettered, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_every_message_handled_once_or_dead_lettered() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("IDEMQ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("IDEMQ_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const K: usize = 400;
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Kind {
        Ok,
        Transient(u32),
        Permanent,
    }
    let kinds: Vec<Kind> = (0..K)
        .map(|_| match rng.random_range(0..10) {
            0..=5 => Kind::Ok,
            6..=8 => Kind::Transient(rng.random_range(1..=3)),
            _ => Kind::Permanent,
        })
        .collect();
    let (broker, store) = (MemoryBroker::new("q"), MemoryDedupStore::new());
    let mut publishes = Vec::new();
    for (i, _) in kinds.iter().enumerate() {
        for _ in 0..rng.random_range(1..=3) {
            publishes.push(i);
        }
    }
    // Interleave the copies.
    for i in (1..publishes.len()).rev() {
        publishes.swap(i, rng.random_range(0..=i));
    }
    for i in &publishes {
        publish(&broker, &format!("u{i}"), "x").await;
    }
    let successes = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let kinds = Arc::new(kinds);
    let shutdown = CancellationToken::new();
    let mut engines = Vec::new();
    for _ in 0..4 {
        let (s, k) = (successes.clone(), kinds.clone());
        let handler = move |m: Message| {
            let (s, k) = (s.clone(), k.clone());
            async move {
                let i: usize = m.key()[1..].parse().map_err(HandlerError::permanent)?;
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..2000))).await;
                match k[i] {
                    Kind::Permanent => Err(HandlerError::permanent("poison")),
                    Kind::Transient(n) if m.attempt() <= n => Err(HandlerError::retry("flaky")),
                    _ => {
                        *s.lock().unwrap().entry(m.key().to_owned()).or_default() += 1;
                        Ok(())
                    }
                }
            }
        };
        let engine = Engine::builder(broker.clone(), store.clone(), handler)
            .scope(SCOPE)
            .concurrency(8)
            .lease(Duration::from_millis(300))
            .retry_backoff(Backoff::new(
                Duration::from_millis(2),
                Duration::from_millis(20),
            ))
            .defer_bounds(Duration::from_millis(5), Duration::from_millis(50))
            .build()
            .unwrap();
        engines.push(tokio::spawn(engine.run(shutdown.clone())));
    }
    // Connection drops: unacked deliveries come back, their old acks go stale.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        broker.requeue_unacked();
    }
    broker.close_when_idle();
    let mut total = Report::default();
    for e in engines {
        total.merge(
            &tokio::time::timeout(Duration::from_secs(60), e)
                .await
                .expect("engines finish")
                .unwrap(),
        );
    }
    let successes = successes.lock().unwrap();
    let dead: Vec<String> = broker
        .dead_letters()
        .iter()
        .filter_map(|d| d.message_id.clone())
        .collect();
    for (i, kind) in kinds.iter().enumerate() {
        let key = format!("u{i}");
        let ok = successes.get(&key).copied().unwrap_or(0);
        let dl = dead.iter().filter(|d| **d == key).count();
        match kind {
            Kind::Permanent => assert!(
                ok == 0 && dl >= 1,
                "{key} {kind:?}: ok={ok} dead={dl} seed={seed}"
            ),
            _ => assert!(
                ok == 1 && dl == 0,
                "{key} {kind:?}: ok={ok} dead={dl} seed={seed}"
            ),
        }
    }
    let stats = broker.stats();
    assert_eq!(
        (stats.ready, stats.delayed, stats.unacked),
        (0, 0, 0),
        "nothing left behind"
    );
    assert_eq!(total.lease_lost, 0, "{total:?}");
    assert_eq!(total.handled as usize, successes.len(), "{total:?}");
    eprintln!("{total:?}");
}

/// A broker whose prefetch is below the engine's concurrency caps it: the
/// engine says so once at start; a prefetch that does not cap it says
/// nothing.
#[tokio::test]
async fn a_prefetch_below_the_concurrency_is_warned_about_at_start() {
    let logs = idemq::testing::LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    for (prefetch, warned) in [(4, true), (8, false)] {
        logs.clear();
        let broker = MemoryBroker::with_prefetch("q", prefetch);
        broker.close_when_idle();
        let engine = Engine::builder(
            broker,
            MemoryDedupStore::new(),
            Calls::default().ok_handler(),
        )
        .concurrency(8)
        .build()
        .expect("engine");
        engine.run(CancellationToken::new()).await;
        let text = logs.text();
        assert_eq!(
            text.contains("so at most 4 handlers run at once, not 8"),
            warned,
            "prefetch {prefetch}: {text}"
        );
    }
}

#[tokio::test]
async fn risky_settings_are_warned_about_at_build() {
    let logs = idemq::testing::LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let build = |keep_for: Duration, lease: Duration| {
        Engine::builder(
            MemoryBroker::new("q"),
            MemoryDedupStore::new(),
            Calls::default().ok_handler(),
        )
        .keep_for(keep_for)
        .lease(lease)
        .max_attempts(5)
        .retry_backoff(Backoff::new(
            Duration::from_secs(60),
            Duration::from_secs(600),
        ))
        .build()
        .expect("engine")
    };
    let window = "the dedup window (keep_for) is shorter";
    let lease = "the lease is longer than RabbitMQ's default delivery acknowledgement timeout";
    // Retries of 60+120+240+480 s and five 60 s leases: 20 min to come back.
    for (keep_for, lease_for, warn_window, warn_lease) in [
        (
            Duration::from_secs(600),
            Duration::from_secs(60),
            true,
            false,
        ),
        (
            Duration::from_secs(1200),
            Duration::from_secs(60),
            false,
            false,
        ),
        (
            Duration::from_secs(24 * 3600),
            Duration::from_secs(3600),
            false,
            true,
        ),
        (
            Duration::from_secs(24 * 3600),
            Duration::from_secs(300),
            false,
            false,
        ),
    ] {
        logs.clear();
        drop(build(keep_for, lease_for));
        let text = logs.text();
        assert_eq!(text.contains(window), warn_window, "{keep_for:?}: {text}");
        assert_eq!(text.contains(lease), warn_lease, "{lease_for:?}: {text}");
    }
}
