//! Messages whose AMQP properties lapin cannot parse (short strings that
//! are not UTF-8), published with the crate's raw client: they must not
//! block the work queue. Each ends in the dead-letter queue with reason
//! `malformed` and its body intact, and every good message behind it is
//! handled exactly once.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::memory::MemoryDedupStore;
use idemq::{
    Broker, Engine, HandlerResultExt, HeaderValue, KeyStrategy, Message, OutgoingMessage, Replay,
    Stopped,
};
use idemq_rabbitmq::testing::{RawProperties, RawValue, get_raw, publish_raw, quarantine};
use idemq_rabbitmq::{
    QueueType, RabbitBroker, RabbitConfig, RabbitDeadLetters, RabbitPublisher, queue_depths,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PREFETCH: u16 = 64;
const GOOD: usize = 300;
/// Generous: the point is "not blocked", not speed.
const WITHIN: Duration = Duration::from_secs(90);

type Seen = Arc<Mutex<HashMap<String, u32>>>;

fn config(name: &str, queue_type: QueueType) -> RabbitConfig {
    common::config(name)
        .with_queue_type(queue_type)
        .with_prefetch(PREFETCH)
}

/// Properties with a `message_id` that is not UTF-8.
fn bad_id(id: &[u8]) -> RawProperties {
    RawProperties {
        message_id: Some(id.to_vec()),
        delivery_mode: Some(2),
        content_type: Some(b"application/json".to_vec()),
        ..RawProperties::default()
    }
}

fn good_props(id: &str) -> RawProperties {
    RawProperties {
        message_id: Some(id.as_bytes().to_vec()),
        delivery_mode: Some(2),
        ..RawProperties::default()
    }
}

/// Runs the engine on `broker`, counting how often each key is handled.
fn run_engine(
    broker: &RabbitBroker,
    scope: &str,
) -> (
    Seen,
    CancellationToken,
    tokio::task::JoinHandle<idemq::Report>,
) {
    let seen: Seen = Arc::default();
    let handler = {
        let seen = seen.clone();
        move |msg: Message| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let mut seen = seen.lock().map_err(|e| e.to_string()).retryable()?;
                *seen.entry(msg.key().to_owned()).or_default() += 1;
                Ok(())
            }
        }
    };
    let engine = Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
        .scope(scope)
        .concurrency(usize::from(PREFETCH / 2))
        .build()
        .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    (seen, shutdown, running)
}

fn handled(seen: &Seen) -> usize {
    seen.lock().map(|s| s.len()).unwrap_or(0)
}

fn assert_each_once(seen: &Seen, expected: usize) {
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), expected, "distinct keys handled");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert!(
        seen.keys().all(|k| k.starts_with("order-")),
        "a malformed message reached the handler: {:?}",
        seen.keys()
            .filter(|k| !k.starts_with("order-"))
            .collect::<Vec<_>>()
    );
}

/// Takes the one dead letter with lapin (so lapin can read the copy) and
/// checks it against the original.
async fn assert_dead_letter(
    broker: &RabbitBroker,
    body: &[u8],
    message_id: Option<&str>,
    kept: &[(&str, &[u8])],
) -> idemq::Delivery {
    let deadline = Instant::now() + Duration::from_secs(10);
    let letter = loop {
        if let Some(d) = broker.next_dead_letter().await.expect("read the DLQ") {
            break d;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(&letter.body[..], body, "the body, byte for byte");
    assert_eq!(letter.message_id.as_deref(), message_id);
    assert_eq!(
        letter.header("x-idemq-reason"),
        Some(&HeaderValue::Str("malformed".into()))
    );
    assert_eq!(
        letter.header("x-idemq-original-queue"),
        Some(&HeaderValue::Str(broker.config().queue().into()))
    );
    assert!(matches!(
        letter.header("x-idemq-dead-at-ms"),
        Some(HeaderValue::Int(_))
    ));
    let Some(HeaderValue::Str(detail)) = letter.header("x-idemq-detail") else {
        panic!("no detail: {letter:?}");
    };
    for (name, bytes) in kept {
        assert_eq!(
            letter.header(name),
            Some(&HeaderValue::Bytes(bytes.to_vec())),
            "{name}"
        );
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(detail.contains(&hex), "{detail} should name {hex}");
    }
    broker.ack(&letter).await.expect("ack the dead letter");
    letter
}

async fn publish_good(config: &RabbitConfig, range: std::ops::Range<usize>) {
    let publisher = RabbitPublisher::connect(config.clone())
        .await
        .expect("publisher");
    for i in range {
        publisher
            .publish(
                OutgoingMessage::new(format!("{{\"n\":{i}}}"))
                    .with_message_id(format!("order-{i:05}")),
            )
            .await
            .expect("publish");
    }
    publisher.close().await;
}

/// A running consumer meets a malformed message followed by hundreds of
/// good ones.
async fn malformed_in_a_running_stream(name: &str, queue_type: QueueType) {
    common::init_tracing();
    let Some(broker) = common::connect(config(name, queue_type)).await else {
        return;
    };
    let url = common::url();
    let queue = broker.config().queue().to_owned();
    let generation = broker.generation();
    // Good messages before and after it: the consumer holds a prefetch of
    // them, unacked, when it meets the malformed one.
    publish_good(broker.config(), 0..GOOD / 3).await;
    let body = b"{\"order\":11,\"raw\":\"\xff\"}".to_vec();
    publish_raw(&url, &queue, &bad_id(b"\xff\xfeorder-11"), &body)
        .await
        .expect("publish the malformed message");
    publish_good(broker.config(), GOOD / 3..GOOD).await;
    let started = Instant::now();
    let (seen, shutdown, running) = run_engine(&broker, name);
    common::wait_until("every good message handled", WITHIN, || {
        handled(&seen) == GOOD
    })
    .await;
    let flowing = started.elapsed();
    shutdown.cancel();
    let report = running.await.expect("engine task");
    assert!(
        matches!(report.stopped, Stopped::Shutdown),
        "{}",
        report.stopped
    );
    assert_each_once(&seen, GOOD);
    assert!(
        broker.generation() > generation,
        "the failed connection was rebuilt"
    );
    assert_dead_letter(
        &broker,
        &body,
        Some("\\xff\\xfeorder-11"),
        &[("x-idemq-malformed-message-id", b"\xff\xfeorder-11")],
    )
    .await;
    let depths = queue_depths(broker.config()).await.expect("depths");
    assert_eq!((depths.work, depths.dead), (0, 0), "{depths:?}");
    eprintln!(
        "{name}: malformed message moved and {GOOD} good messages handled {flowing:?} after \
         the engine started; {report:?}"
    );
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_in_a_running_stream_classic() {
    malformed_in_a_running_stream("malformed-stream-classic", QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_in_a_running_stream_quorum() {
    malformed_in_a_running_stream("malformed-stream-quorum", QueueType::Quorum).await;
}

/// The malformed message is at the head before the consumer starts:
/// `connect` quarantines it and succeeds, well within its timeout.
async fn malformed_head_before_connect(name: &str, queue_type: QueueType) {
    common::init_tracing();
    let cfg = config(name, queue_type).with_connect_timeout(Duration::from_secs(15));
    // Declare the topology, then leave the queue to the producers.
    let Some(declared) = common::connect(cfg.clone()).await else {
        return;
    };
    declared.close().await;
    let url = common::url();
    let body = vec![0u8, 159, 146, 150, 255];
    publish_raw(&url, cfg.queue(), &bad_id(b"\xc3\x28head"), &body)
        .await
        .expect("publish the malformed message");
    publish_good(&cfg, 0..GOOD).await;

    let started = Instant::now();
    let broker = RabbitBroker::connect(cfg.clone())
        .await
        .expect("connect despite a malformed head message");
    let connected = started.elapsed();
    assert!(
        connected < Duration::from_secs(10),
        "connect took {connected:?}"
    );
    let (seen, shutdown, running) = run_engine(&broker, name);
    common::wait_until("every good message handled", WITHIN, || {
        handled(&seen) == GOOD
    })
    .await;
    let flowing = started.elapsed();
    shutdown.cancel();
    running.await.expect("engine task");
    assert_each_once(&seen, GOOD);
    assert_dead_letter(
        &broker,
        &body,
        Some("\\xc3(head"),
        &[("x-idemq-malformed-message-id", b"\xc3\x28head")],
    )
    .await;
    eprintln!("{name}: connected in {connected:?}, all handled after {flowing:?}");
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_head_before_connect_classic() {
    malformed_head_before_connect("malformed-head-classic", QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_head_before_connect_quorum() {
    malformed_head_before_connect("malformed-head-quorum", QueueType::Quorum).await;
}

/// A bad header name (nested too) and a bad correlation id, with a good
/// message id: the copy keeps the id, escapes the bad strings and keeps
/// their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_header_key_and_correlation_id() {
    common::init_tracing();
    let name = "malformed-header-key";
    let Some(broker) = common::connect(config(name, QueueType::Classic)).await else {
        return;
    };
    let url = common::url();
    let queue = broker.config().queue().to_owned();
    let headers = RawValue::encode_table(&[
        (b"tenant".to_vec(), RawValue::text("t-1")),
        (b"bad\xffkey".to_vec(), RawValue::text("v")),
        (
            b"nested".to_vec(),
            RawValue::Table(vec![(b"\xfe".to_vec(), RawValue::long_long(1))]),
        ),
    ])
    .expect("table");
    let props = RawProperties {
        message_id: Some(b"order-hdr".to_vec()),
        correlation_id: Some(b"corr-\x80".to_vec()),
        headers: Some(headers),
        delivery_mode: Some(2),
        ..RawProperties::default()
    };
    let body = b"header body".to_vec();
    let (seen, shutdown, running) = run_engine(&broker, name);
    publish_raw(&url, &queue, &props, &body)
        .await
        .expect("publish the malformed message");
    publish_good(broker.config(), 0..50).await;
    common::wait_until("every good message handled", WITHIN, || {
        handled(&seen) == 50
    })
    .await;
    shutdown.cancel();
    running.await.expect("engine task");
    assert_each_once(&seen, 50);
    let letter = assert_dead_letter(
        &broker,
        &body,
        Some("order-hdr"),
        &[
            ("x-idemq-malformed-correlation-id", b"corr-\x80"),
            ("x-idemq-malformed-header-key-1", b"bad\xffkey"),
            ("x-idemq-malformed-header-key-2", b"\xfe"),
        ],
    )
    .await;
    assert_eq!(
        letter.header("tenant"),
        Some(&HeaderValue::Str("t-1".into()))
    );
    assert_eq!(
        letter.header("bad\\xffkey"),
        Some(&HeaderValue::Str("v".into()))
    );
    common::cleanup(broker).await;
}

/// The quarantine by hand: only the malformed messages move; the others
/// go back (in their order, on a classic queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_moves_only_malformed_messages() {
    common::init_tracing();
    let name = "malformed-quarantine";
    let Some(broker) = common::connect(config(name, QueueType::Classic)).await else {
        return;
    };
    let cfg = broker.config().clone();
    broker.close().await;
    let url = common::url();
    let queue = cfg.queue();
    for (i, props) in [
        good_props("order-1"),
        bad_id(b"\xff1"),
        good_props("order-2"),
        bad_id(b"\xff2"),
        good_props("order-3"),
    ]
    .iter()
    .enumerate()
    {
        publish_raw(&url, queue, props, format!("body-{i}").as_bytes())
            .await
            .expect("publish");
    }
    let dlq = cfg.dead_letter_queue();
    assert_eq!(
        quarantine(&url, queue, &dlq, 100)
            .await
            .expect("quarantine"),
        2
    );
    // Nothing left to move.
    assert_eq!(
        quarantine(&url, queue, &dlq, 100)
            .await
            .expect("quarantine"),
        0
    );
    let mut order = Vec::new();
    while let Some(m) = get_raw(&url, queue, true).await.expect("get") {
        order.push(String::from_utf8_lossy(&m.body).into_owned());
    }
    assert_eq!(order, ["body-0", "body-2", "body-4"]);
    let mut dead = Vec::new();
    while let Some(m) = get_raw(&url, &dlq, true).await.expect("get") {
        assert_eq!(m.properties.delivery_mode, Some(2));
        dead.push(String::from_utf8_lossy(&m.body).into_owned());
    }
    assert_eq!(dead, ["body-1", "body-3"]);
    let reopened = common::connect(cfg).await.expect("reconnect");
    common::cleanup(reopened).await;
}

/// The raw client reports the server's refusals as typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_client_reports_server_closes() {
    let url = common::url();
    // Skip when the server is down (a plain lapin connect decides).
    let Some(broker) = common::connect(config("malformed-raw-errors", QueueType::Classic)).await
    else {
        return;
    };
    let err = publish_raw(&url, "idemq-test.no-such-queue", &good_props("x"), b"x")
        .await
        .expect_err("unroutable");
    assert!(err.to_string().contains("312"), "{err}");
    let err = get_raw(&url, "idemq-test.no-such-queue", true)
        .await
        .expect_err("no such queue");
    assert!(err.to_string().contains("404"), "{err}");
    let bad_user = url.replacen("guest:guest", "guest:wrong", 1);
    if bad_user != url {
        let err = get_raw(&bad_user, broker.config().queue(), true)
            .await
            .expect_err("bad password");
        assert!(err.to_string().contains("403"), "{err}");
    }
    let tls = url.replacen("amqp://", "amqps://", 1);
    let err = get_raw(&tls, broker.config().queue(), true)
        .await
        .expect_err("tls");
    assert!(err.to_string().contains("TLS"), "{err}");
    common::cleanup(broker).await;
}

/// The copy in the dead-letter queue is readable by lapin, so replay can
/// take it: without a dedup record named in it (the quarantine knows no
/// scope) it is left, unless a fallback key is given; then it goes back to
/// the work queue with its escaped id and the original bytes kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_copies_can_be_replayed() {
    common::init_tracing();
    let name = "malformed-replay";
    let Some(broker) = common::connect(config(name, QueueType::Classic)).await else {
        return;
    };
    let cfg = broker.config().clone();
    broker.close().await;
    let url = common::url();
    publish_raw(&url, cfg.queue(), &bad_id(b"\xffreplay"), b"replay body")
        .await
        .expect("publish");
    let dlq_name = cfg.dead_letter_queue();
    assert_eq!(
        quarantine(&url, cfg.queue(), &dlq_name, 10)
            .await
            .expect("quarantine"),
        1
    );
    let store = MemoryDedupStore::new();
    let dlq = RabbitDeadLetters::connect(cfg.clone())
        .await
        .expect("dead letters");
    let report = Replay::new(&dlq, &store)
        .run(&CancellationToken::new())
        .await;
    assert_eq!((report.moved, report.left_no_key), (0, 1), "{report}");
    let report = Replay::new(&dlq, &store)
        .fallback_key(name, KeyStrategy::message_id())
        .run(&CancellationToken::new())
        .await;
    assert_eq!(report.moved, 1, "{report}");
    dlq.close().await;
    let back = get_raw(&url, cfg.queue(), true)
        .await
        .expect("get")
        .expect("the replayed copy");
    assert_eq!(back.body, b"replay body");
    assert_eq!(
        back.properties.message_id.as_deref(),
        Some(&b"\\xffreplay"[..])
    );
    let table = RawValue::decode_table(back.properties.headers.as_deref().unwrap_or_default())
        .expect("headers");
    assert!(
        table
            .iter()
            .any(|(k, v)| k == b"x-idemq-malformed-message-id"
                && *v == RawValue::Bytes(b"\xffreplay".to_vec())),
        "{table:?}"
    );
    let reopened = common::connect(cfg).await.expect("reconnect");
    common::cleanup(reopened).await;
}
