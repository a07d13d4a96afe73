//! Replay on the memory backends: what moves, what stays, and that no
//! message is lost or handled twice, whatever the records say and however
//! the run ends.
//!
//! One file, past 600 lines: one test per kind of record a dead letter
//! can meet, sharing the set-up that makes them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::replay::{
    Action, Confirm, DeadLetterInfo, DeadLetterQueue, Filter, Origin, ReplayEnd, ReplayMode,
};
use idemq::testing::store::{assert_applied, must_claim};
use idemq::{
    Broker, ClaimTtl, DedupStore, Delivery, Engine, Error, HandlerError, HeaderValue, Headers,
    KeyStrategy, Message, OutgoingMessage, RecordState, Replay, Report, headers,
};
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "orders";
const LONG: Duration = Duration::from_secs(600);

/// Handler runs per message id, and which ids fail (permanently).
#[derive(Clone, Default)]
struct World {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    failing: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl World {
    fn handler(&self) -> impl idemq::Handler + use<> {
        let w = self.clone();
        move |m: Message| {
            let w = w.clone();
            async move {
                let id = m.message_id().unwrap_or("?").to_owned();
                *w.runs.lock().unwrap().entry(id.clone()).or_default() += 1;
                if w.failing.lock().unwrap().contains(&id) {
                    return Err(HandlerError::permanent(format!("{id} is poison")));
                }
                Ok(())
            }
        }
    }
    fn fail(&self, ids: impl IntoIterator<Item = String>) {
        self.failing.lock().unwrap().extend(ids);
    }
    fn heal(&self) {
        self.failing.lock().unwrap().clear();
    }
    fn runs(&self, id: &str) -> u32 {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    /// Handler runs that succeeded, per id: the failing ones are the
    /// runs before the heal.
    fn runs_total(&self) -> u32 {
        self.runs.lock().unwrap().values().sum()
    }
}

async fn consume(broker: &MemoryBroker, store: &MemoryDedupStore, world: &World) -> Report {
    consume_as(broker, store, world, SCOPE, KeyStrategy::message_id()).await
}

async fn consume_as(
    broker: &MemoryBroker,
    store: &MemoryDedupStore,
    world: &World,
    scope: &str,
    key: KeyStrategy,
) -> Report {
    broker.close_when_idle();
    Engine::builder(broker.clone(), store.clone(), world.handler())
        .scope(scope)
        .key_strategy(key)
        .build()
        .expect("engine")
        .run(CancellationToken::new())
        .await
}

async fn publish(broker: &MemoryBroker, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        let msg = OutgoingMessage::new(format!("body of {id}"))
            .with_message_id(id)
            .with_header("tenant", "acme");
        broker.publish(msg).await.expect("publish");
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn dead_ids(broker: &MemoryBroker) -> Vec<String> {
    broker
        .dead_letters()
        .iter()
        .map(|d| d.message_id.clone().unwrap_or_default())
        .collect()
}

/// `n` poison messages end in the dead-letter queue, then the handler is
/// fixed.
async fn dead_lettered(n: usize) -> (MemoryBroker, MemoryDedupStore, World) {
    let (broker, store, world) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        World::default(),
    );
    world.fail(ids("m", n));
    publish(&broker, ids("m", n)).await;
    let report = consume(&broker, &store, &world).await;
    assert_eq!(report.dead_lettered, n as u64);
    world.heal();
    (broker, store, world)
}

/// A dead key handled since (a copy of it got through): its record is done.
async fn handled_since(store: &MemoryDedupStore, key: &str) {
    store.forget(SCOPE, key).await.unwrap();
    let lease = must_claim(store, SCOPE, key, ttl()).await;
    assert_applied(store.complete(&lease, LONG).await);
}

#[tokio::test]
async fn revive_moves_dead_keys_and_never_revives_a_done_one() {
    let (broker, store, world) = dead_lettered(6).await;
    handled_since(&store, "m0").await;
    // m1 is being handled right now by a live consumer.
    store.forget(SCOPE, "m1").await.unwrap();
    let _live = must_claim(&store, SCOPE, "m1", ttl()).await;

    let actions = Arc::new(Mutex::new(Vec::new()));
    let seen = actions.clone();
    let report = Replay::new(&broker, &store)
        .on_action(move |d: &Delivery, _info: &DeadLetterInfo, a: &Action| {
            seen.lock()
                .unwrap()
                .push((d.message_id.clone().unwrap(), a.clone()))
        })
        .run(&CancellationToken::new())
        .await;
    assert!(matches!(report.end, ReplayEnd::Finished), "{report}");
    assert_eq!(
        (
            report.cut_off,
            report.examined,
            report.moved,
            report.already_done,
            report.left_live
        ),
        (6, 6, 4, 1, 1),
        "{report}"
    );
    let actions = actions.lock().unwrap().clone();
    assert!(actions.contains(&("m0".into(), Action::AlreadyDone)));
    assert!(actions.contains(&(
        "m2".into(),
        Action::Move {
            previous: Some(RecordState::Dead)
        }
    )));
    assert!(matches!(
        &actions.iter().find(|(id, _)| id == "m1").unwrap().1,
        Action::LeftLive { .. }
    ));
    assert_eq!(dead_ids(&broker), ["m1"], "only the live one stays");
    assert_eq!(report.by_reason["permanent"].moved, 4);

    let handled = consume(&broker, &store, &world).await;
    assert_eq!(
        handled.handled, 4,
        "each revived message handled, from attempt 1"
    );
    for id in ["m2", "m3", "m4", "m5"] {
        assert_eq!(
            world.runs(id),
            2,
            "{id}: one poisoned run, one after replay"
        );
        let r = store.get(SCOPE, id).await.unwrap().unwrap();
        assert_eq!((r.state, r.attempts), (RecordState::Done, 1));
    }
    assert_eq!(world.runs("m0"), 1, "a done message is never handled again");
}

fn ttl() -> ClaimTtl {
    ClaimTtl {
        lease: LONG,
        retain: LONG,
    }
}

#[tokio::test]
async fn force_forgets_even_done_records() {
    let (broker, store, world) = dead_lettered(2).await;
    handled_since(&store, "m0").await;
    let report = Replay::new(&broker, &store)
        .mode(ReplayMode::Force)
        .run(&CancellationToken::new())
        .await;
    assert_eq!(
        (report.moved, report.forced, report.already_done),
        (2, 2, 0),
        "{report}"
    );
    consume(&broker, &store, &world).await;
    assert_eq!((world.runs("m0"), world.runs("m1")), (2, 2));
}

#[tokio::test]
async fn the_record_is_found_for_header_keys_and_custom_scopes() {
    let (broker, store, world) = (
        MemoryBroker::new("q"),
        MemoryDedupStore::new(),
        World::default(),
    );
    // Keyed by a header, in a scope of its own: nothing the replay could guess.
    for i in 0..5 {
        let msg = OutgoingMessage::new("x").with_header("x-order", format!("order #{i}"));
        broker.publish(msg).await.unwrap();
    }
    let failing = Arc::new(Mutex::new(true));
    let runs = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let (f, r) = (failing.clone(), runs.clone());
    let handler = move |m: Message| {
        let (f, r) = (f.clone(), r.clone());
        async move {
            *r.lock().unwrap().entry(m.key().to_owned()).or_default() += 1;
            if *f.lock().unwrap() {
                return Err(HandlerError::permanent("poison"));
            }
            Ok(())
        }
    };
    let engine = |h| {
        broker.close_when_idle();
        Engine::builder(broker.clone(), store.clone(), h)
            .scope("billing.v2")
            .key_strategy(KeyStrategy::message_id().with_header("x-order"))
            .build()
            .expect("engine")
    };
    let report = engine(handler.clone()).run(CancellationToken::new()).await;
    assert_eq!(report.dead_lettered, 5);
    let info = DeadLetterInfo::of(&broker.dead_letters()[0]);
    assert_eq!(info.scope.as_deref(), Some("billing.v2"));
    assert_eq!(info.key, Some(idemq::key::normalize(b"order #0")));
    *failing.lock().unwrap() = false;
    // No scope, no key strategy given: the dead letters name their records.
    let replay = Replay::new(&broker, &store)
        .run(&CancellationToken::new())
        .await;
    assert_eq!((replay.moved, replay.left_no_key), (5, 0), "{replay}");
    let report = engine(handler).run(CancellationToken::new()).await;
    assert_eq!(report.handled, 5);
    assert!(runs.lock().unwrap().values().all(|n| *n == 2), "{runs:?}");
    let _ = world;
}

#[tokio::test]
async fn broker_dead_letters_need_an_explicit_fallback_key() {
    // A quorum-like delivery limit: returned three times, the broker
    // dead-letters the message itself, without idemq's headers.
    let broker = MemoryBroker::new("q").with_delivery_limit(2);
    let store = MemoryDedupStore::new();
    let world = World::default();
    publish(&broker, ids("b", 2)).await;
    for _ in 0..6 {
        let d = broker.next().await.unwrap().unwrap();
        broker.nack(&d, true).await.unwrap();
    }
    assert_eq!(broker.stats().broker_dead_lettered, 2);
    let info = DeadLetterInfo::of(&broker.dead_letters()[0]);
    assert_eq!(
        (info.origin, info.reason.as_str()),
        (Origin::Broker, "delivery_limit")
    );
    assert_eq!(info.original_queue.as_deref(), Some("q"));

    let report = Replay::new(&broker, &store)
        .run(&CancellationToken::new())
        .await;
    assert_eq!((report.moved, report.left_no_key), (0, 2), "{report}");
    assert_eq!(dead_ids(&broker), ["b0", "b1"], "left, in order");
    let report = Replay::new(&broker, &store)
        .fallback_key(SCOPE, KeyStrategy::message_id())
        .run(&CancellationToken::new())
        .await;
    assert_eq!(report.moved, 2, "{report}");
    assert_eq!(report.by_reason["delivery_limit"].moved, 2);
    consume(&broker, &store, &world).await;
    assert_eq!((world.runs("b0"), world.runs("b1")), (1, 1));
}

#[tokio::test]
async fn the_copy_keeps_the_message_and_drops_the_failure() {
    let (broker, store, _world) = dead_lettered(1).await;
    Replay::new(&broker, &store)
        .run(&CancellationToken::new())
        .await;
    let copy = broker.next().await.unwrap().unwrap();
    assert_eq!(copy.message_id.as_deref(), Some("m0"));
    assert_eq!(&copy.body[..], b"body of m0");
    assert_eq!(
        copy.header("tenant"),
        Some(&HeaderValue::Str("acme".into()))
    );
    for name in headers::ALL {
        assert_eq!(copy.header(name), None, "{name} kept");
    }
    assert_eq!(copy.header(headers::REPLAYED), Some(&HeaderValue::Int(1)));
}

#[tokio::test]
async fn dry_run_changes_nothing_and_says_what_would_move() {
    let (broker, store, _world) = dead_lettered(5).await;
    let before: Vec<_> = broker
        .dead_letters()
        .iter()
        .map(|d| (d.message_id.clone(), d.headers.clone()))
        .collect();
    let records = |store: MemoryDedupStore| async move {
        let mut all = Vec::new();
        for id in ids("m", 5) {
            all.push(
                store
                    .get(SCOPE, &id)
                    .await
                    .unwrap()
                    .map(|r| (r.state, r.attempts)),
            );
        }
        all
    };
    let records_before = records(store.clone()).await;
    let report = Replay::new(&broker, &store)
        .dry_run(true)
        .filter(Filter::new().message_id("m1").message_id("m3"))
        .run(&CancellationToken::new())
        .await;
    assert!(report.dry_run);
    assert_eq!(
        (report.moved, report.skipped, report.examined),
        (2, 3, 5),
        "{report}"
    );
    let after: Vec<_> = broker
        .dead_letters()
        .iter()
        .map(|d| (d.message_id.clone(), d.headers.clone()))
        .collect();
    assert_eq!(
        after, before,
        "the dead-letter queue is the same, in the same order"
    );
    assert_eq!(records(store.clone()).await, records_before);
    assert_eq!(broker.stats().ready, 0);
}

#[tokio::test]
async fn filters_select_exactly_and_the_rest_keeps_its_order() {
    let (broker, store, world) = dead_lettered(10).await;
    let report = Replay::new(&broker, &store)
        .filter(
            Filter::new()
                .message_id("m2")
                .message_id("m7")
                .message_id("m8"),
        )
        .run(&CancellationToken::new())
        .await;
    assert_eq!((report.moved, report.skipped), (3, 7), "{report}");
    assert_eq!(
        dead_ids(&broker),
        ["m0", "m1", "m3", "m4", "m5", "m6", "m9"]
    );
    consume(&broker, &store, &world).await;
    assert_eq!(world.runs("m2") + world.runs("m7") + world.runs("m8"), 6);
    assert_eq!(world.runs("m0"), 1);

    let report = Replay::new(&broker, &store)
        .filter(Filter::new().reason("max-attempts"))
        .run(&CancellationToken::new())
        .await;
    assert_eq!(
        (report.moved, report.skipped),
        (0, 7),
        "no max-attempts dead letter"
    );
    let report = Replay::new(&broker, &store)
        .filter(Filter::new().header("tenant", "acme").original_queue("q"))
        .limit(4)
        .run(&CancellationToken::new())
        .await;
    assert!(matches!(report.end, ReplayEnd::LimitReached), "{report}");
    assert_eq!(report.moved, 4, "{report}");
    assert_eq!(dead_ids(&broker), ["m5", "m6", "m9"]);
}

#[tokio::test(start_paused = true)]
async fn rate_spaces_the_moves() {
    let (broker, store, _world) = dead_lettered(101).await;
    let start = tokio::time::Instant::now();
    let report = Replay::new(&broker, &store)
        .rate(50.0)
        .run(&CancellationToken::new())
        .await;
    assert_eq!(report.moved, 101);
    // 101 moves at 50/s: the first at once, the last 2 s later.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1980) && took <= Duration::from_millis(2200),
        "{took:?}"
    );
}

/// A consumer that keeps dead-lettering everything: the replay moves what
/// was there when it started and ends, it does not replay its own output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_ends_after_one_pass_while_the_consumer_dead_letters_everything() {
    let (broker, store, world) = dead_lettered(300).await;
    world.fail(ids("m", 300)); // still broken
    let shutdown = CancellationToken::new();
    let consumer = {
        let (broker, store, world, shutdown) = (
            broker.clone(),
            store.clone(),
            world.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            Engine::builder(broker, store, world.handler())
                .scope(SCOPE)
                .build()
                .unwrap()
                .run(shutdown)
                .await
        })
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        Replay::new(&broker, &store)
            .window(8)
            .run(&CancellationToken::new()),
    )
    .await
    .expect("the replay must end");
    assert_eq!(
        (report.cut_off, report.examined, report.moved),
        (300, 300, 300),
        "{report}"
    );
    shutdown.cancel();
    consumer.await.unwrap();
}

/// A dead-letter queue whose removals fail from the `n`th on: a replay
/// stopped between a confirmed copy and the removal of its dead letter.
struct FailingRemovals {
    inner: MemoryBroker,
    removals: Mutex<u32>,
    fail_from: u32,
}

#[async_trait]
impl DeadLetterQueue for FailingRemovals {
    async fn depth(&self) -> Result<u64, Error> {
        self.inner.depth().await
    }
    async fn take(&self) -> Result<Option<Delivery>, Error> {
        self.inner.take().await
    }
    async fn republish(&self, letter: &Delivery, headers: Headers) -> Result<Confirm, Error> {
        self.inner.republish(letter, headers).await
    }
    async fn remove(&self, letter: &Delivery) -> Result<(), Error> {
        let n = {
            let mut n = self.removals.lock().unwrap();
            *n += 1;
            *n
        };
        if n >= self.fail_from {
            return Err(Error::Unavailable {
                backend: "test",
                op: "remove",
                source: "connection lost".into(),
            });
        }
        self.inner.remove(letter).await
    }
    async fn put_back(&self, letters: Vec<Delivery>) -> Result<(), Error> {
        self.inner.put_back(letters).await
    }
}

/// The defect of the forget-based replay: stopped after a copy was
/// confirmed but before its dead letter was removed, the id is both in the
/// work queue and in the dead-letter queue; once the copy is handled, the
/// next replay must not handle it again.
#[tokio::test]
async fn an_interrupted_replay_never_makes_a_message_take_effect_twice() {
    let (broker, store, world) = dead_lettered(20).await;
    let failing = FailingRemovals {
        inner: broker.clone(),
        removals: Mutex::new(0),
        fail_from: 8,
    };
    let report = Replay::new(&failing, &store)
        .window(4)
        .run(&CancellationToken::new())
        .await;
    assert!(matches!(report.end, ReplayEnd::Failed(_)), "{report}");
    assert!(report.moved >= 8, "{report}");
    // The copies whose removal failed are in both queues.
    broker.requeue_unacked();
    let in_both = dead_ids(&broker)
        .into_iter()
        .filter(|id| world.runs(id) == 1)
        .count();
    assert!(in_both > 0);
    consume(&broker, &store, &world).await;
    let again = Replay::new(&broker, &store)
        .run(&CancellationToken::new())
        .await;
    assert!(again.is_complete(), "{again}");
    assert!(again.already_done >= 1, "{again}");
    consume(&broker, &store, &world).await;
    for id in ids("m", 20) {
        assert_eq!(
            world.runs(&id),
            2,
            "{id}: one poisoned run and exactly one good one"
        );
    }
    assert_eq!(broker.stats().dead, 0);
    assert_eq!(world.runs_total(), 40);
}

#[tokio::test]
async fn shutdown_settles_what_is_in_hand_and_reports_it() {
    let (broker, store, world) = dead_lettered(50).await;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let seen = Arc::new(Mutex::new(0u32));
    let s = seen.clone();
    let report = Replay::new(&broker, &store)
        .window(4)
        .on_action(move |_d: &Delivery, _i: &DeadLetterInfo, _a: &Action| {
            let mut n = s.lock().unwrap();
            *n += 1;
            if *n == 10 {
                stop.cancel();
            }
        })
        .run(&shutdown)
        .await;
    assert!(matches!(report.end, ReplayEnd::Interrupted), "{report}");
    let stats = broker.stats();
    assert_eq!(
        stats.ready as u64, report.moved,
        "every move reported is in the work queue"
    );
    assert_eq!(
        stats.dead as u64 + report.moved,
        50,
        "nothing lost: {report}"
    );
    assert_eq!(stats.unacked, 0);
    consume(&broker, &store, &world).await;
    assert_eq!(world.runs_total() as u64, 50 + report.moved);
}

#[tokio::test]
async fn origin_and_reason_of_engine_dead_letters() {
    let (broker, _store, _world) = dead_lettered(1).await;
    let info = DeadLetterInfo::of(&broker.dead_letters()[0]);
    assert_eq!(
        (info.origin, info.reason.as_str()),
        (Origin::Idemq, "permanent")
    );
    assert_eq!(
        (info.scope.as_deref(), info.key.as_deref()),
        (Some(SCOPE), Some("m0"))
    );
}

#[tokio::test]
async fn peek_reads_and_leaves_the_queue_as_it_was() {
    let (broker, _store, _world) = dead_lettered(5).await;
    let before = dead_ids(&broker);
    let seen = idemq::replay::peek(&broker, 3).await.unwrap();
    let seen: Vec<_> = seen.iter().map(|d| d.message_id.clone().unwrap()).collect();
    assert_eq!(seen, ["m0", "m1", "m2"]);
    assert_eq!(dead_ids(&broker), before);
    assert_eq!(idemq::replay::peek(&broker, 100).await.unwrap().len(), 5);
    assert_eq!(broker.stats().unacked, 0);
}

/// A dead-letter queue whose takes and removals take a while (a broker
/// over a network): the limit still holds exactly, however moves, takes
/// and removals interleave.
struct SlowRemove(MemoryBroker);

#[async_trait]
impl DeadLetterQueue for SlowRemove {
    async fn depth(&self) -> Result<u64, Error> {
        self.0.depth().await
    }
    async fn take(&self) -> Result<Option<Delivery>, Error> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.0.take().await
    }
    async fn republish(&self, letter: &Delivery, headers: Headers) -> Result<Confirm, Error> {
        self.0.republish(letter, headers).await
    }
    async fn remove(&self, letter: &Delivery) -> Result<(), Error> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.0.remove(letter).await
    }
    async fn put_back(&self, letters: Vec<Delivery>) -> Result<(), Error> {
        self.0.put_back(letters).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_while_removals_are_slow() {
    let (broker, store, _world) = dead_lettered(40).await;
    for limit in [1, 5, 17] {
        let before = broker.dead_letters().len();
        let report = Replay::new(&SlowRemove(broker.clone()), &store)
            .limit(limit)
            .run(&CancellationToken::new())
            .await;
        assert!(matches!(report.end, ReplayEnd::LimitReached), "{report}");
        assert_eq!(report.moved, limit, "{report}");
        assert_eq!(broker.dead_letters().len(), before - limit as usize);
    }
}
