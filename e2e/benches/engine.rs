//! Messages per second through the engine on the memory backends with a
//! no-op handler, unique and 10%-duplicate mixes, next to a baseline
//! measured in the same run: a bare consume+ack loop over the same memory
//! broker (no dedup, no engine). The `memory_traced` group then installs
//! a subscriber and runs the engine with and without a
//! `tracing-opentelemetry` layer exporting every span through a batch
//! processor: the cost of OpenTelemetry tracing per message.
//!
//! `cargo bench -p idemq-e2e --bench engine`

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::{Broker, Engine, Message, OutgoingMessage};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const MESSAGES: u64 = 50_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<
    tracing_subscriber::Registry,
    opentelemetry_sdk::trace::SdkTracer,
>;

/// Installs the process's subscriber: a registry with an OpenTelemetry
/// layer that can be switched on and off, its spans going to an in-memory
/// exporter through the SDK's batch processor (what a service installs,
/// with a network exporter in its place). Answers the switch, and a check
/// that spans were exported.
fn install_tracing() -> (impl Fn(bool), impl Fn() -> usize) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter.clone())
        .build();
    let flushed = {
        let provider = provider.clone();
        move || {
            let _ = provider.force_flush();
            exporter.get_finished_spans().map_or(0, |s| s.len())
        }
    };
    let (layer, handle) = tracing_subscriber::reload::Layer::new(None::<OtelLayer>);
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
        .expect("the bench's only subscriber");
    let switch = move |on: bool| {
        let next = on.then(|| tracing_opentelemetry::layer().with_tracer(provider.tracer("bench")));
        handle.modify(|l| *l = next).expect("switch the layer");
    };
    (switch, flushed)
}

/// A broker holding `MESSAGES` messages, `dup_every`-th one a repeat.
async fn loaded(dup_every: Option<u64>) -> MemoryBroker {
    let broker = MemoryBroker::new("bench");
    for i in 0..MESSAGES {
        let id = match dup_every {
            Some(n) if i % n == n - 1 => i - 1,
            _ => i,
        };
        broker
            .publish(
                OutgoingMessage::new(
                    &b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"[..],
                )
                .with_message_id(format!("m{id}")),
            )
            .await
            .expect("publish");
    }
    broker.close_when_idle();
    broker
}

async fn bare_consume_ack(broker: MemoryBroker, concurrency: usize) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let tracker = tokio_util::task::TaskTracker::new();
    while let Some(d) = broker.next().await.expect("next") {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let b = broker.clone();
        tracker.spawn(async move {
            b.ack(&d).await.expect("ack");
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn engine_run(broker: MemoryBroker, concurrency: usize, unique: u64) {
    let engine = Engine::builder(broker, MemoryDedupStore::new(), |_m: Message| async {
        Ok(())
    })
    .scope("bench")
    .concurrency(concurrency)
    .build()
    .expect("engine");
    let report = engine.run(CancellationToken::new()).await;
    // Nothing lost: every unique message handled once, every repeat skipped
    // (a repeat that meets its original in flight is deferred first).
    assert_eq!(
        (report.handled, report.handled + report.duplicates),
        (unique, MESSAGES)
    );
}

/// `iters` runs of `run`, each over a freshly loaded broker; only the runs
/// are timed, not the loading.
fn timed<F: std::future::Future<Output = ()>>(
    rt: &Runtime,
    iters: u64,
    dup_every: Option<u64>,
    run: impl Fn(MemoryBroker) -> F,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let broker = rt.block_on(loaded(dup_every));
        let start = Instant::now();
        rt.block_on(run(broker));
        total += start.elapsed();
    }
    total
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(MESSAGES));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    let concurrency = 64;
    group.bench_function(BenchmarkId::new("baseline_consume_ack", "unique"), |b| {
        b.iter_custom(|iters| {
            timed(&rt, iters, None, |broker| {
                bare_consume_ack(broker, concurrency)
            })
        })
    });
    for (name, dups, unique) in [
        ("unique", None, MESSAGES),
        ("dup10pct", Some(10), MESSAGES - MESSAGES / 10),
    ] {
        group.bench_function(BenchmarkId::new("engine", name), |b| {
            b.iter_custom(|iters| {
                timed(&rt, iters, dups, |broker| {
                    engine_run(broker, concurrency, unique)
                })
            })
        });
    }
    group.finish();

    // The engine with and without the OpenTelemetry layer, in the same run
    // and under the same (otherwise empty) subscriber.
    let (switch, exported) = install_tracing();
    let mut group = c.benchmark_group("memory_traced");
    group.throughput(Throughput::Elements(MESSAGES));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for (name, on) in [("registry_only", false), ("otel_layer", true)] {
        group.bench_function(BenchmarkId::new("engine_unique", name), |b| {
            switch(on);
            b.iter_custom(|iters| {
                timed(&rt, iters, None, |broker| {
                    engine_run(broker, concurrency, MESSAGES)
                })
            })
        });
    }
    // The same four spans a unique message gets (process, two store calls,
    // ack), with their fields, and nothing else: what the tracing layer
    // costs by itself, without idemq.
    for (name, on) in [("registry_only", false), ("otel_layer", true)] {
        group.bench_function(BenchmarkId::new("bare_spans", name), |b| {
            switch(on);
            b.iter(|| {
                for i in 0..MESSAGES {
                    four_spans(i);
                }
            })
        });
    }
    group.finish();
    // The layer really was on: spans reached the exporter (the batch
    // processor drops what its queue cannot hold, as in production).
    assert!(exported() > 0, "no span was exported");
}

/// Four spans shaped like the engine's for one unique message.
fn four_spans(i: u64) {
    use tracing::field::Empty;
    let process = tracing::info_span!(
        "idemq.message",
        otel.name = "process bench",
        otel.kind = "consumer",
        otel.status_code = Empty,
        otel.status_description = Empty,
        error.type = Empty,
        messaging.system = "memory",
        messaging.destination.name = "bench",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.message.id = "m",
        messaging.message.body.size = 64i64,
        idemq.scope = "bench",
        idemq.key = "m",
        idemq.attempt = Empty,
        idemq.outcome = Empty,
        idemq.dead_letter.reason = Empty,
    );
    let _in = process.enter();
    process.record("idemq.attempt", 1i64);
    for op in ["store claim", "store complete"] {
        let _store = tracing::info_span!(
            "idemq.store",
            otel.name = op,
            otel.kind = "client",
            otel.status_code = Empty,
            otel.status_description = Empty,
            error.type = Empty,
            idemq.store.operation = op,
        )
        .entered();
    }
    let _ack = tracing::info_span!(
        "idemq.settle",
        otel.name = "ack bench",
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        error.type = Empty,
        messaging.system = "memory",
        messaging.destination.name = "bench",
        messaging.operation.type = "settle",
        messaging.operation.name = "ack",
    )
    .entered();
    process.record(
        "idemq.outcome",
        if i.is_multiple_of(2) {
            "handled"
        } else {
            "duplicate"
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
