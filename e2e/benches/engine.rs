//! Messages per second through the engine on the memory backends with a
//! no-op handler, unique and 10%-duplicate mixes, next to a baseline
//! measured in the same run: a bare consume+ack loop over the same memory
//! broker (no dedup, no engine).
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
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let broker = rt.block_on(loaded(None));
                let start = Instant::now();
                rt.block_on(bare_consume_ack(broker, concurrency));
                total += start.elapsed();
            }
            total
        })
    });
    for (name, dups, unique) in [
        ("unique", None, MESSAGES),
        ("dup10pct", Some(10), MESSAGES - MESSAGES / 10),
    ] {
        group.bench_function(BenchmarkId::new("engine", name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let broker = rt.block_on(loaded(dups));
                    let start = Instant::now();
                    rt.block_on(engine_run(broker, concurrency, unique));
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
