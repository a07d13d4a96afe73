//! Settlements whose answer was lost, against the real server: the store
//! applied the completion (or release), the engine saw an error. Its retry
//! finds the lease's own record and answers applied, so nothing is
//! reported as a lost lease, nothing runs twice, everything is acked.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemq::memory::MemoryBroker;
use idemq::testing::crash::{CrashPoint, CrashingStore};
use idemq::testing::unique_scope;
use idemq::{
    Backoff, Broker, DedupStore, Engine, HandlerError, Message, OutgoingMessage, RecordState,
};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_whose_answer_was_lost_are_not_lost_leases() {
    let Some(store) = common::store().await else {
        return;
    };
    const N: u32 = 40;
    let broker = MemoryBroker::new("partial");
    for i in 0..N {
        broker
            .publish(OutgoingMessage::new("{}").with_message_id(format!("m{i}")))
            .await
            .expect("publish");
    }
    broker.close_when_idle();
    let store = CrashingStore::new(store);
    // Every completion applied with its answer lost once, and the release
    // of each first failure too.
    store.crash_at(CrashPoint::AfterComplete, N);
    store.crash_at(CrashPoint::AfterFail, N / 4);
    let runs = Arc::new(AtomicU32::new(0));
    let seen = runs.clone();
    let handler = move |m: Message| {
        let runs = seen.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            // Every fourth message fails on its first run.
            let id: u32 = m.key()[1..].parse().unwrap_or(0);
            if id.is_multiple_of(4) && m.attempt() == 1 {
                return Err(HandlerError::retry("first run fails"));
            }
            Ok(())
        }
    };
    let scope = unique_scope("lost_answers");
    let report = Engine::builder(broker.clone(), store.clone(), handler)
        .scope(&scope)
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
        .run(CancellationToken::new())
        .await;
    assert_eq!(store.crashes(), u64::from(N + N / 4));
    assert_eq!(
        (report.handled, report.retried, report.lease_lost),
        (u64::from(N), u64::from(N / 4), 0),
        "{report:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        N + N / 4,
        "no handler ran twice"
    );
    let stats = broker.stats();
    assert_eq!(
        (stats.acked, stats.ready, stats.unacked),
        (u64::from(N), 0, 0)
    );
    for i in 0..N {
        let r = store
            .get(&scope, &format!("m{i}"))
            .await
            .expect("get")
            .expect("record");
        let attempts = if i.is_multiple_of(4) { 2 } else { 1 };
        assert_eq!((r.state, r.attempts), (RecordState::Done, attempts), "m{i}");
    }
}
