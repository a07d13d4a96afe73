//! Replay through [`RabbitDeadLetters`] on a real RabbitMQ: copies keep
//! every property, dry runs and filters leave the dead-letter queue as it
//! was, a run never replays its own output, a missing queue is a clear
//! error that creates nothing, and quorum queues work like classic ones.

mod common;

use std::time::Duration;

use idemq::memory::MemoryDedupStore;
use idemq::replay::{Filter, ReplayEnd};
use idemq::testing::service_unavailable;
use idemq::{
    Broker, DeadLetter, DeadReason, Engine, Error, HandlerError, Message, OutgoingMessage, Replay,
    headers,
};
use idemq_rabbitmq::{QueueType, RabbitBroker, RabbitConfig, RabbitDeadLetters, topology};
use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "replay";

/// Declares a fresh topology; `None` (skip) when RabbitMQ is unreachable.
async fn topology_for(name: &str, queue_type: QueueType) -> Option<RabbitConfig> {
    let config = common::config(name).with_queue_type(queue_type);
    match topology::declare(&config).await {
        Ok(()) => Some(config),
        Err(e @ (Error::Unavailable { .. } | Error::Timeout { .. })) => {
            service_unavailable("rabbitmq", e)
        }
        Err(e) => panic!("declare: {e}"),
    }
}

async fn raw_connection() -> Connection {
    Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .expect("connect")
}

/// Dead-letters `n` messages the way the engine does, each naming its
/// record in `SCOPE`; `tenant` alternates between `a` and `b`.
async fn dead_letter(config: &RabbitConfig, n: usize) {
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    for i in 0..n {
        let tenant = if i % 2 == 0 { "a" } else { "b" };
        let msg = OutgoingMessage::new(format!("body {i}"))
            .with_message_id(format!("m{i}"))
            .with_header("tenant", tenant);
        broker.publish(msg).await.expect("publish");
    }
    for _ in 0..n {
        let d = broker.next().await.expect("next").expect("delivery");
        let id = d.message_id.clone().expect("id");
        let reason = if id.ends_with('3') {
            DeadReason::MaxAttempts
        } else {
            DeadReason::Permanent
        };
        let letter = DeadLetter::new(reason, "broken", 1).with_record(SCOPE, id);
        broker.dead_letter(&d, &letter).await.expect("dead_letter");
    }
    broker.close().await;
}

/// The dead-letter queue's message ids in order, read with `basic.get` and
/// put back in order: the queue is as it was.
async fn dlq_ids(config: &RabbitConfig) -> Vec<String> {
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut held = Vec::new();
    while let Some(m) = ch
        .basic_get(
            config.dead_letter_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .expect("get")
    {
        held.push(m);
    }
    let ids: Vec<String> = held
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
        .collect();
    for m in held {
        m.delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .expect("nack");
    }
    conn.close(200, "done".into()).await.expect("close");
    // A quorum queue counts returned messages as ready a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (topology::queue_depths(config).await.expect("depths").dead as usize) < ids.len()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ids
}

async fn replay_with(
    config: &RabbitConfig,
    store: &MemoryDedupStore,
    build: impl FnOnce(
        Replay<'_, RabbitDeadLetters, MemoryDedupStore>,
    ) -> Replay<'_, RabbitDeadLetters, MemoryDedupStore>,
) -> idemq::ReplayReport {
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dead letters");
    let report = {
        let replay = build(Replay::new(&dlq, store));
        replay.run(&CancellationToken::new()).await
    };
    dlq.close().await;
    report
}

async fn cleanup(config: &RabbitConfig) {
    topology::delete_topology(config).await.expect("delete");
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

async fn work_queue_ids(config: &RabbitConfig, n: usize) -> Vec<String> {
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    let mut out = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), broker.next())
            .await
            .expect("a replayed message in time")
            .expect("next")
            .expect("delivery");
        out.push(d.message_id.clone().unwrap_or_default());
        broker.ack(&d).await.expect("ack");
    }
    broker.close().await;
    out
}

async fn dry_run_and_filters(queue_type: QueueType) {
    let Some(config) = topology_for("dry-run", queue_type).await else {
        return;
    };
    dead_letter(&config, 12).await;
    let before = dlq_ids(&config).await;
    assert_eq!(before, ids(12));
    let store = MemoryDedupStore::new();
    let report = replay_with(&config, &store, |r| r.dry_run(true)).await;
    assert_eq!((report.examined, report.moved), (12, 12), "{report}");
    assert_eq!(dlq_ids(&config).await, before, "a dry run changes nothing");

    let report = replay_with(&config, &store, |r| {
        r.filter(Filter::new().header("tenant", "a").reason("permanent"))
    })
    .await;
    assert!(matches!(report.end, ReplayEnd::Finished), "{report}");
    // Tenant a: m0 m2 m4 m6 m8 m10, none ends in 3.
    assert_eq!((report.moved, report.skipped), (6, 6), "{report}");
    assert_eq!(
        dlq_ids(&config).await,
        ["m1", "m3", "m5", "m7", "m9", "m11"],
        "the rest stays, in order"
    );
    assert_eq!(
        work_queue_ids(&config, 6).await,
        ["m0", "m2", "m4", "m6", "m8", "m10"],
        "copies leave in queue order"
    );
    let report = replay_with(&config, &store, |r| {
        r.filter(Filter::new().reason("max-attempts"))
    })
    .await;
    assert_eq!(report.moved, 1, "{report}");
    assert_eq!(dlq_ids(&config).await, ["m1", "m5", "m7", "m9", "m11"]);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_filters_leave_the_rest_in_order_classic() {
    dry_run_and_filters(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_filters_leave_the_rest_in_order_quorum() {
    dry_run_and_filters(QueueType::Quorum).await;
}

/// More dead letters left in place than the read-ahead: the consumer is
/// renewed instead of stalling, and everything left goes back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_more_than_the_read_ahead_does_not_stall() {
    let Some(config) = topology_for("read-ahead", QueueType::Classic).await else {
        return;
    };
    dead_letter(&config, 40).await;
    let store = MemoryDedupStore::new();
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dead letters")
        .with_read_ahead(7);
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        Replay::new(&dlq, &store)
            .filter(Filter::new().message_id("m39").message_id("m20"))
            .run(&CancellationToken::new()),
    )
    .await
    .expect("no stall");
    dlq.close().await;
    assert_eq!((report.moved, report.skipped), (2, 38), "{report}");
    let left: Vec<String> = ids(40)
        .into_iter()
        .filter(|id| id != "m39" && id != "m20")
        .collect();
    assert_eq!(dlq_ids(&config).await, left);
    cleanup(&config).await;
}

/// Every AMQP property and header of the original arrives on the copy, byte
/// for byte; idemq's failure headers do not, the replay count does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_survive_dead_letter_and_replay() {
    let Some(config) = topology_for("properties", QueueType::Classic).await else {
        return;
    };
    let mut table = FieldTable::default();
    table.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
    table.insert("x-n".into(), AMQPValue::ShortInt(-7));
    table.insert("x-flag".into(), AMQPValue::Boolean(true));
    let mut nested = FieldTable::default();
    nested.insert("a".into(), AMQPValue::LongLongInt(1));
    table.insert(
        "x-list".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::FieldTable(nested),
            AMQPValue::LongString(LongString::from(vec![0xff, 0x00])),
        ])),
    );
    let props = BasicProperties::default()
        .with_message_id("p-1".into())
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_correlation_id("corr-9".into())
        .with_reply_to("replies".into())
        .with_timestamp(1_700_000_123)
        .with_app_id("shop".into())
        .with_type("order.created".into())
        .with_priority(3)
        .with_delivery_mode(2)
        .with_headers(table.clone());
    let body = b"\x00\x01binary body\xff".to_vec();
    {
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        ch.basic_publish(
            ShortString::default(),
            config.queue().into(),
            BasicPublishOptions::default(),
            &body,
            props.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        conn.close(200, "done".into()).await.expect("close");
    }
    // The engine dead-letters it (the handler says it is poison).
    let store = MemoryDedupStore::new();
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    let engine = Engine::builder(broker.clone(), store.clone(), |_m: Message| async {
        Err::<(), _>(HandlerError::permanent("poison"))
    })
    .scope(SCOPE)
    .build()
    .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while topology::queue_depths(&config).await.expect("depths").dead == 0 {
        assert!(Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let report = running.await.expect("engine");
    assert_eq!(report.dead_lettered, 1);
    broker.close().await;

    let replay = replay_with(&config, &store, |r| r).await;
    assert_eq!(replay.moved, 1, "{replay}");

    let conn = raw_connection().await;
    let ch = conn.create_channel().await.expect("channel");
    let copy = ch
        .basic_get(config.queue().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the copy is in the work queue");
    conn.close(200, "done".into()).await.expect("close");
    assert_eq!(copy.delivery.data, body);
    let got = &copy.delivery.properties;
    assert_eq!(got.message_id(), props.message_id());
    assert_eq!(got.content_type(), props.content_type());
    assert_eq!(got.content_encoding(), props.content_encoding());
    assert_eq!(got.correlation_id(), props.correlation_id());
    assert_eq!(got.reply_to(), props.reply_to());
    assert_eq!(got.timestamp(), props.timestamp());
    assert_eq!(got.app_id(), props.app_id());
    assert_eq!(got.kind(), props.kind());
    assert_eq!(got.priority(), props.priority());
    assert_eq!(got.delivery_mode(), &Some(2));
    let mut expected = table;
    expected.insert(headers::REPLAYED.into(), AMQPValue::LongLongInt(1));
    assert_eq!(got.headers().as_ref(), Some(&expected));
    cleanup(&config).await;
}

/// The dead-letter queue or the work queue missing: a clear error naming
/// it, and nothing declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_a_clear_error_and_creates_nothing() {
    // Only to skip when RabbitMQ is unreachable: the probe's queues go at once.
    let Some(probe) = topology_for("probe", QueueType::Classic).await else {
        return;
    };
    cleanup(&probe).await;
    let config = common::config("missing");
    let err = RabbitDeadLetters::connect(config.clone())
        .await
        .expect_err("no such queue");
    let text = err.to_string();
    assert!(
        matches!(&err, Error::NotFound { what, .. } if what.contains(config.queue())),
        "{text}"
    );
    assert!(text.contains("does not exist"), "{text}");
    let conn = raw_connection().await;
    for queue in config.all_queues() {
        let ch = conn.create_channel().await.expect("channel");
        let found = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await;
        assert!(found.is_err(), "{queue} was created");
    }
    conn.close(200, "done".into()).await.ok();

    // Only the dead-letter queue missing.
    let config = common::config("no-dlq").with_dead_letter_queue("idemq-test.nowhere.dlq");
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        config.queue().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let err = RabbitDeadLetters::connect(config.clone())
        .await
        .expect_err("no dead-letter queue");
    assert!(
        err.to_string().contains("`idemq-test.nowhere.dlq`"),
        "{err}"
    );
    ch.queue_delete(config.queue().into(), Default::default())
        .await
        .expect("delete");
    conn.close(200, "done".into()).await.ok();
}

/// The consumer still dead-letters everything it gets: the replay moves
/// what was there at its start and ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_ends_while_the_consumer_dead_letters_everything() {
    let Some(config) = topology_for("one-pass", QueueType::Quorum).await else {
        return;
    };
    dead_letter(&config, 200).await;
    let store = MemoryDedupStore::new();
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    let engine = Engine::builder(broker.clone(), store.clone(), |_m: Message| async {
        Err::<(), _>(HandlerError::permanent("still broken"))
    })
    .scope(SCOPE)
    .concurrency(16)
    .build()
    .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        replay_with(&config, &store, |r| r.window(16)),
    )
    .await
    .expect("the replay ends");
    assert!(matches!(report.end, ReplayEnd::Finished), "{report}");
    assert_eq!(
        (report.cut_off, report.examined, report.moved),
        (200, 200, 200),
        "{report}"
    );
    shutdown.cancel();
    running.await.expect("engine");
    broker.close().await;
    cleanup(&config).await;
}

/// `rate` is never exceeded (what the clock allows to check here; the
/// spacing itself is checked exactly on a paused clock in the core tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_is_not_exceeded() {
    let Some(config) = topology_for("rate", QueueType::Classic).await else {
        return;
    };
    dead_letter(&config, 31).await;
    let store = MemoryDedupStore::new();
    let started = Instant::now();
    let report = replay_with(&config, &store, |r| r.rate(100.0)).await;
    let took = started.elapsed();
    assert_eq!(report.moved, 31);
    // 31 moves at 100/s: 30 intervals of 10 ms at least.
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let _ = work_queue_ids(&config, 31).await;
    cleanup(&config).await;
}

/// A consumer's copy of the dead-letter queue reads what a replay puts
/// back, and only that: a replay interrupted with dead letters in hand
/// leaves none unsettled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_leaves_nothing_unsettled() {
    let Some(config) = topology_for("interrupt", QueueType::Classic).await else {
        return;
    };
    dead_letter(&config, 300).await;
    let store = MemoryDedupStore::new();
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dlq");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let mut seen = 0;
    let report = Replay::new(&dlq, &store)
        .window(8)
        .on_action(move |_, _, _| {
            seen += 1;
            if seen == 50 {
                stop.cancel();
            }
        })
        .run(&shutdown)
        .await;
    dlq.close().await;
    assert!(matches!(report.end, ReplayEnd::Interrupted), "{report}");
    let left = dlq_ids(&config).await;
    assert_eq!(
        left.len() as u64 + report.moved,
        300,
        "nothing lost: {report}"
    );
    let moved = work_queue_ids(&config, report.moved as usize).await;
    let mut all: Vec<String> = moved.into_iter().chain(left).collect();
    all.sort();
    let mut expected = ids(300);
    expected.sort();
    assert_eq!(
        all, expected,
        "each message exactly once, in one queue or the other"
    );
    cleanup(&config).await;
}
