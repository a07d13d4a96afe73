//! The engine's counters reach the `metrics` facade with the same values as
//! its report.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::{Broker, Engine, HandlerError, Message, OutgoingMessage};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Cell(AtomicU64);
impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// Counters by their `event` label.
#[derive(Default)]
struct Events(Mutex<HashMap<String, Arc<Cell>>>);

impl Events {
    fn get(&self, event: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(event)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }
}

struct TestRecorder(Arc<Events>);
impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        assert_eq!(key.name(), "idemq_messages_total");
        assert!(
            key.labels()
                .any(|l| l.key() == "scope" && l.value() == "metered")
        );
        let event = key
            .labels()
            .find(|l| l.key() == "event")
            .map(|l| l.value().to_owned())
            .unwrap();
        let cell = self.0.0.lock().unwrap().entry(event).or_default().clone();
        Counter::from_arc(cell)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn counters_reach_the_metrics_facade() {
    let events = Arc::new(Events::default());
    let recorder = TestRecorder(events.clone());
    let broker = MemoryBroker::new("q");
    for id in ["a", "b", "a", "bad"] {
        broker
            .publish(OutgoingMessage::new("x").with_message_id(id))
            .await
            .unwrap();
    }
    broker.close_when_idle();
    let handler = |m: Message| async move {
        if m.key() == "bad" {
            return Err(HandlerError::permanent("bad"));
        }
        Ok(())
    };
    // Handles are taken from the recorder in force when the engine is built.
    let engine = metrics::with_local_recorder(&recorder, || {
        Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
            .scope("metered")
            .build()
            .unwrap()
    });
    let report = engine.run(CancellationToken::new()).await;
    assert_eq!(
        (report.handled, report.duplicates, report.dead_lettered),
        (2, 1, 1)
    );
    for (event, value) in [
        ("received", report.received),
        ("handled", report.handled),
        ("duplicates", report.duplicates),
        ("dead_lettered", report.dead_lettered),
        ("retried", report.retried),
    ] {
        assert_eq!(events.get(event), value, "{event}");
    }
}
