//! The engine on `MemoryBroker` + `RedisDedupStore`: duplicates are acked
//! and counted, failures retried then dead-lettered, nothing is lost.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::memory::MemoryBroker;
use idemq::{
    Backoff, Broker, DedupStore, Engine, HandlerError, HeaderValue, Message, OutgoingMessage,
    RecordState, Stopped, headers,
};
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "engine";
const MAX_ATTEMPTS: u32 = 3;

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, u32>>>);

impl Calls {
    fn record(&self, key: &str) -> u32 {
        let mut m = self.0.lock().expect("calls");
        let n = m.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }
    fn of(&self, key: &str) -> u32 {
        self.0.lock().expect("calls").get(key).copied().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_dedups_retries_and_dead_letters_with_redis() {
    let Some(store) = common::store().await else {
        return;
    };
    let broker = MemoryBroker::new("orders");
    // ok-*: succeed; late-*: fail twice, then succeed; flaky-*: always fail
    // (retryable); bad-*: fail permanently. ok-0..9 are published 3 times.
    let mut published = 0u64;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(format!("ok-{i}"));
    }
    for i in 0..5 {
        ids.push(format!("late-{i}"));
        ids.push(format!("flaky-{i}"));
        ids.push(format!("bad-{i}"));
    }
    for i in 0..10 {
        ids.push(format!("ok-{i}"));
        ids.push(format!("ok-{i}"));
    }
    for id in &ids {
        broker
            .publish(
                OutgoingMessage::new(format!("{{\"id\":\"{id}\"}}")).with_message_id(id.as_str()),
            )
            .await
            .expect("publish");
        published += 1;
    }
    broker.close_when_idle();

    let calls = Calls::default();
    let c = calls.clone();
    let handler = move |m: Message| {
        let c = c.clone();
        async move {
            let n = c.record(m.key());
            assert_eq!(n, m.attempt(), "the store counts every run of {}", m.key());
            match m.key().split('-').next() {
                Some("late") if n < 3 => Err(HandlerError::retry("not yet")),
                Some("flaky") => Err(HandlerError::retry("always down")),
                Some("bad") => Err(HandlerError::permanent("cannot parse")),
                _ => Ok(()),
            }
        }
    };
    let fast = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    let engine = Engine::builder(broker.clone(), store.clone(), handler)
        .scope(SCOPE)
        .concurrency(16)
        .lease(Duration::from_secs(10))
        .keep_for(Duration::from_secs(60))
        .max_attempts(MAX_ATTEMPTS)
        .retry_backoff(fast)
        .defer_bounds(Duration::from_millis(10), Duration::from_millis(100))
        .build()
        .expect("engine");
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        engine.run(CancellationToken::new()),
    )
    .await
    .expect("the run settles everything and stops");

    assert!(
        matches!(report.stopped, Stopped::BrokerClosed),
        "{}",
        report.stopped
    );
    // Handled once each: 40 ok + 5 late.
    assert_eq!(report.handled, 45, "{report:?}");
    assert_eq!(report.duplicates, 20, "{report:?}");
    assert_eq!(report.dead_lettered, 10, "{report:?}");
    assert_eq!(
        (report.store_errors, report.lease_lost),
        (0, 0),
        "{report:?}"
    );
    for i in 0..40 {
        assert_eq!(calls.of(&format!("ok-{i}")), 1, "ok-{i}");
    }
    for i in 0..5 {
        assert_eq!(calls.of(&format!("late-{i}")), 3, "late-{i}");
        assert_eq!(calls.of(&format!("flaky-{i}")), MAX_ATTEMPTS, "flaky-{i}");
        assert_eq!(calls.of(&format!("bad-{i}")), 1, "bad-{i}");
    }

    // Nothing lost: every delivery settled, each failure in the DLQ once.
    let stats = broker.stats();
    assert_eq!(
        (stats.ready, stats.delayed, stats.unacked),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.published, published, "{stats:?}");
    // Every delivery was settled once: acked, or sent on as a retry copy
    // or a dead letter (both confirmed before the original is acked).
    assert_eq!(
        stats.delivered,
        stats.acked + stats.retried + stats.dead_lettered,
        "{stats:?}"
    );
    assert_eq!((stats.requeued, stats.discarded), (0, 0), "{stats:?}");
    let dead = broker.dead_letters();
    let mut reasons: HashMap<String, String> = HashMap::new();
    for d in &dead {
        let id = d.message_id.clone().expect("dead letters keep their id");
        let reason = d
            .header(headers::REASON)
            .and_then(HeaderValue::as_str)
            .unwrap_or_default()
            .to_owned();
        assert!(
            reasons.insert(id.clone(), reason).is_none(),
            "{id} dead twice"
        );
    }
    assert_eq!(dead.len(), 10);
    for i in 0..5 {
        assert_eq!(reasons[&format!("flaky-{i}")], "max-attempts");
        assert_eq!(reasons[&format!("bad-{i}")], "permanent");
    }

    // And Redis agrees.
    let state = |key: String| {
        let store = store.clone();
        async move {
            let r = store.get(SCOPE, &key).await.expect("get").expect("record");
            (r.state, r.attempts)
        }
    };
    assert_eq!(state("ok-0".into()).await, (RecordState::Done, 1));
    assert_eq!(state("late-0".into()).await, (RecordState::Done, 3));
    assert_eq!(
        state("flaky-0".into()).await,
        (RecordState::Dead, MAX_ATTEMPTS)
    );
    assert_eq!(state("bad-0".into()).await, (RecordState::Dead, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_engines_handle_each_key_once() {
    let Some(store) = common::store().await else {
        return;
    };
    let broker = MemoryBroker::new("orders");
    for round in 0..2 {
        for i in 0..100 {
            // The second copy of a key often arrives while the first runs.
            let id = format!("m{}", if round == 0 { i } else { 99 - i });
            broker
                .publish(OutgoingMessage::new("{}").with_message_id(id))
                .await
                .expect("publish");
        }
    }
    broker.close_when_idle();
    let calls = Calls::default();
    let engines = (0..2).map(|_| {
        let c = calls.clone();
        let handler = move |m: Message| {
            let c = c.clone();
            async move {
                c.record(m.key());
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }
        };
        Engine::builder(broker.clone(), store.clone(), handler)
            .scope(SCOPE)
            .concurrency(8)
            .lease(Duration::from_secs(10))
            .keep_for(Duration::from_secs(60))
            .defer_bounds(Duration::from_millis(10), Duration::from_millis(100))
            .build()
            .expect("engine")
            .run(CancellationToken::new())
    });
    let reports = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(engines))
        .await
        .expect("both engines stop once all is settled");
    let mut total = reports[0].clone();
    total.merge(&reports[1]);
    assert_eq!((total.handled, total.duplicates), (100, 100), "{total:?}");
    for i in 0..100 {
        assert_eq!(calls.of(&format!("m{i}")), 1, "m{i}");
    }
    let stats = broker.stats();
    assert_eq!(
        (stats.ready, stats.delayed, stats.unacked, stats.dead),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.delivered, stats.acked + stats.retried, "{stats:?}");
}
