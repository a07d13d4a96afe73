//! One message's whole life in one OpenTelemetry trace (feature `otel`):
//! published in a producer's span, failed (retried), failed again
//! (dead-lettered), replayed, handled. Every `process` span is a child of
//! the `send` span whose context the message carries (retried copies,
//! dead letters and replayed copies keep it), and settlements and store
//! calls are children of the `process` span they belong to. Run on the
//! in-memory backends and on RabbitMQ.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::testing::{service_unavailable, unique_scope};
use idemq::{
    Backoff, Broker, Engine, Error, HandlerError, Message, OutgoingMessage, Replay, Report,
};
use idemq_rabbitmq::{
    RabbitBroker, RabbitConfig, RabbitDeadLetters, delete_topology, queue_depths,
};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceContextExt, TraceId, TracerProvider};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// The exporter behind the process-wide subscriber (engines spawn tasks
/// on runtime threads, so a thread-local subscriber would miss them).
/// Tests running at once tell their spans apart by trace id.
fn exporter() -> &'static InMemorySpanExporter {
    static CELL: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &CELL
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("idemq-e2e"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("the only global subscriber");
            (exporter, provider)
        })
        .0
}

/// A handler that fails (transiently) until healed.
fn handler(healthy: &Arc<AtomicBool>) -> impl idemq::Handler + use<> {
    let healthy = healthy.clone();
    move |_m: Message| {
        let healthy = healthy.clone();
        async move {
            if healthy.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(HandlerError::retry("the downstream service is down"))
            }
        }
    }
}

fn engine<B: Broker>(
    broker: B,
    store: &MemoryDedupStore,
    scope: &str,
    healthy: &Arc<AtomicBool>,
) -> Engine<B, MemoryDedupStore, impl idemq::Handler + use<B>> {
    Engine::builder(broker, store.clone(), handler(healthy))
        .scope(scope)
        .max_attempts(2)
        .retry_backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .expect("engine")
}

/// Publishes one message inside a producer span; answers that span's
/// trace and span ids.
async fn publish_traced<B: Broker>(broker: &B, id: &str) -> (TraceId, SpanId) {
    let producer = tracing::info_span!("producer");
    let sc = producer.context().span().span_context().clone();
    assert!(sc.is_valid(), "the OpenTelemetry layer is installed");
    broker
        .publish(OutgoingMessage::new(r#"{"total":5}"#).with_message_id(id))
        .instrument(producer)
        .await
        .expect("publish");
    (sc.trace_id(), sc.span_id())
}

/// The finished spans of one trace.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    let mut spans: Vec<SpanData> = exporter()
        .get_finished_spans()
        .expect("spans")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    spans.sort_by_key(|s| s.start_time);
    spans
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    let key = Key::from(key.to_owned());
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| &kv.value)
}

fn str_attr(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn children<'a>(spans: &'a [SpanData], parent: &SpanData, name: &str) -> Vec<&'a SpanData> {
    named(spans, name)
        .into_iter()
        .filter(|s| s.parent_span_id == parent.span_context.span_id())
        .collect()
}

/// The parent chain and attributes of the whole story, as `system`
/// consuming `queue` tells it.
fn check_trace(
    spans: &[SpanData],
    producer: SpanId,
    system: &str,
    queue: &str,
    id: &str,
    scope: &str,
) {
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    let [send] = named(spans, &format!("send {queue}"))[..] else {
        panic!("one send span in {names:?}");
    };
    assert_eq!(
        send.parent_span_id, producer,
        "send is the producer's child"
    );
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(str_attr(send, "messaging.system").as_deref(), Some(system));
    assert_eq!(str_attr(send, "messaging.message.id").as_deref(), Some(id));

    let process = named(spans, &format!("process {queue}"));
    assert_eq!(process.len(), 3, "three attempts in {names:?}");
    let expected = [
        ("retried", Some("transient"), None),
        ("dead_lettered", Some("transient"), Some("max-attempts")),
        ("handled", None, None),
    ];
    for (i, (p, (outcome, error, reason))) in process.iter().zip(expected).enumerate() {
        let what = format!("process span {i} ({outcome})");
        assert_eq!(
            p.parent_span_id,
            send.span_context.span_id(),
            "{what}: the send span's child"
        );
        assert!(
            p.parent_span_is_remote,
            "{what}: its parent came in the headers"
        );
        assert_eq!(p.span_kind, SpanKind::Consumer, "{what}");
        for (key, value) in [
            ("messaging.system", system),
            ("messaging.destination.name", queue),
            ("messaging.operation.type", "process"),
            ("messaging.message.id", id),
            ("idemq.scope", scope),
            ("idemq.key", id),
            ("idemq.outcome", outcome),
        ] {
            assert_eq!(str_attr(p, key).as_deref(), Some(value), "{what}: {key}");
        }
        assert_eq!(
            attr(p, "messaging.message.body.size"),
            Some(&Value::I64(11)),
            "{what}"
        );
        assert_eq!(str_attr(p, "error.type").as_deref(), error, "{what}");
        assert_eq!(
            str_attr(p, "idemq.dead_letter.reason").as_deref(),
            reason,
            "{what}"
        );
        match error {
            Some(_) => assert!(
                matches!(p.status, Status::Error { .. }),
                "{what}: {:?}",
                p.status
            ),
            None => assert_eq!(p.status, Status::Unset, "{what}"),
        }
        assert_eq!(
            children(spans, p, "store claim").len(),
            1,
            "{what}: its claim"
        );
    }
    assert_eq!(attr(process[0], "idemq.attempt"), Some(&Value::I64(1)));
    assert_eq!(attr(process[1], "idemq.attempt"), Some(&Value::I64(2)));
    assert!(attr(process[2], "idemq.attempt").is_some());
    assert_eq!(children(spans, process[0], "store fail").len(), 1);
    assert_eq!(
        children(spans, process[0], &format!("retry_later {queue}")).len(),
        1
    );
    assert_eq!(
        children(spans, process[1], &format!("dead_letter {queue}")).len(),
        1
    );
    assert_eq!(children(spans, process[1], "store bury").len(), 1);
    assert_eq!(children(spans, process[2], "store complete").len(), 1);
    assert_eq!(
        children(spans, process[2], &format!("ack {queue}")).len(),
        1
    );

    let [replay] = named(spans, &format!("replay {queue}"))[..] else {
        panic!("one replay span in {names:?}");
    };
    assert_eq!(
        replay.parent_span_id,
        send.span_context.span_id(),
        "replay joins the trace"
    );
    assert!(process[1].end_time <= replay.start_time && replay.end_time <= process[2].start_time);
    assert_eq!(
        str_attr(replay, "idemq.dead_letter.reason").as_deref(),
        Some("max-attempts")
    );
}

#[tokio::test]
async fn memory_one_trace_from_publish_through_replay_to_handled() {
    exporter();
    let queue = unique_scope("otel-orders");
    let scope = unique_scope("otel");
    let broker = MemoryBroker::new(queue.clone());
    let store = MemoryDedupStore::new();
    let healthy = Arc::new(AtomicBool::new(false));
    let (trace, producer) = publish_traced(&broker, "order-1").await;

    broker.close_when_idle();
    let report = engine(broker.clone(), &store, &scope, &healthy)
        .run(CancellationToken::new())
        .await;
    assert_eq!((report.retried, report.dead_lettered), (1, 1), "{report:?}");

    healthy.store(true, Ordering::SeqCst);
    let replay = Replay::new(&broker, &store)
        .run(&CancellationToken::new())
        .await;
    assert_eq!(replay.moved, 1, "{replay}");
    broker.close_when_idle();
    let report = engine(broker.clone(), &store, &scope, &healthy)
        .run(CancellationToken::new())
        .await;
    assert_eq!(report.handled, 1, "{report:?}");

    check_trace(
        &spans_of(trace),
        producer,
        "memory",
        &queue,
        "order-1",
        &scope,
    );
}

/// Runs an engine on RabbitMQ until nothing waits in the work and retry
/// queues and `dead` dead letters are there.
async fn consume_rabbit(
    config: &RabbitConfig,
    store: &MemoryDedupStore,
    scope: &str,
    healthy: &Arc<AtomicBool>,
    dead: u32,
) -> Report {
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine(broker.clone(), store, scope, healthy).run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = queue_depths(config).await.expect("depths");
        let waiting = d.work + d.retry.iter().map(|(_, n)| n).sum::<u32>();
        if waiting == 0 && d.dead == dead {
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {d:?}");
    }
    shutdown.cancel();
    let report = running.await.expect("engine");
    broker.close().await;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_one_trace_from_publish_through_replay_to_handled() {
    exporter();
    let url = std::env::var("AMQP_ADDR").unwrap_or_else(|_| idemq_rabbitmq::DEFAULT_URL.into());
    let config = RabbitConfig::new(url, format!("idemq-e2e.{}", unique_scope("otel")))
        .with_retry_tiers([Duration::from_millis(100)]);
    let broker = match RabbitBroker::connect(config.clone()).await {
        Ok(b) => b,
        Err(e @ (Error::Unavailable { .. } | Error::Timeout { .. })) => {
            return service_unavailable("rabbitmq", e).unwrap_or(());
        }
        Err(e) => panic!("connect: {e}"),
    };
    let scope = unique_scope("otel");
    let store = MemoryDedupStore::new();
    let healthy = Arc::new(AtomicBool::new(false));
    // Broker::publish of the consumer's own broker injects the context.
    let (trace, producer) = publish_traced(&broker, "order-1").await;
    broker.close().await;

    let report = consume_rabbit(&config, &store, &scope, &healthy, 1).await;
    assert_eq!((report.retried, report.dead_lettered), (1, 1), "{report:?}");
    healthy.store(true, Ordering::SeqCst);
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dead letters");
    let replay = Replay::new(&dlq, &store)
        .run(&CancellationToken::new())
        .await;
    dlq.close().await;
    assert_eq!(replay.moved, 1, "{replay}");
    let report = consume_rabbit(&config, &store, &scope, &healthy, 0).await;
    assert_eq!(report.handled, 1, "{report:?}");

    let spans = spans_of(trace);
    check_trace(
        &spans,
        producer,
        "rabbitmq",
        config.queue(),
        "order-1",
        &scope,
    );
    for p in named(&spans, &format!("process {}", config.queue())) {
        assert!(
            matches!(attr(p, "messaging.rabbitmq.message.delivery_tag"), Some(Value::I64(t)) if *t > 0),
            "{:?}",
            p.attributes
        );
    }
    delete_topology(&config).await.expect("cleanup");
}
