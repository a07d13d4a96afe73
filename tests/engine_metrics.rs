//! The engine's metrics, by name, labels and count, for a known mix of
//! messages: handled, duplicate, retried then handled, dead-lettered as
//! permanent, dead-lettered after max attempts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::metric_names::{self as names, labels};
use idemq::{Backoff, Broker, Engine, HandlerError, Message, OutgoingMessage, Report};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use tokio_util::sync::CancellationToken;

/// A counter's total, a histogram's number of samples (each at least
/// zero), or a gauge's value with how often it went up.
#[derive(Default)]
struct Cell {
    count: AtomicU64,
    gauge: AtomicI64,
    negative_samples: AtomicU64,
}

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.count.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.count.store(value, Ordering::Relaxed);
    }
}

impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if value.is_nan() || value < 0.0 {
            self.negative_samples.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.gauge.fetch_add(value as i64, Ordering::Relaxed);
    }
    fn decrement(&self, value: f64) {
        self.gauge.fetch_sub(value as i64, Ordering::Relaxed);
    }
    fn set(&self, value: f64) {
        self.gauge.store(value as i64, Ordering::Relaxed);
    }
}

type Labels = BTreeMap<String, String>;

/// A series: its kind (counter, gauge, histogram), name and labels.
type Series = (&'static str, String, Labels);

/// Every handle registered, by series.
#[derive(Default)]
struct Registry(Mutex<HashMap<Series, Arc<Cell>>>);

impl Registry {
    fn cell(&self, kind: &'static str, key: &Key) -> Arc<Cell> {
        let labels = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let mut all = self.0.lock().unwrap();
        let id = (kind, key.name().to_owned(), labels);
        assert!(!all.contains_key(&id), "registered twice: {id:?}");
        all.entry(id).or_default().clone()
    }

    /// The series of `name` with `label` = `value` (and the labels every
    /// series has).
    fn get(&self, kind: &'static str, name: &str, label: Option<(&str, &str)>) -> Arc<Cell> {
        let mut want: Labels = [(labels::SCOPE, "metered"), (labels::DESTINATION, "q")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if let Some((k, v)) = label {
            want.insert(k.to_owned(), v.to_owned());
        }
        let all = self.0.lock().unwrap();
        all.get(&(kind, name.to_owned(), want.clone()))
            .unwrap_or_else(|| panic!("no {kind} {name} {want:?}"))
            .clone()
    }

    fn count(&self, kind: &'static str, name: &str, label: Option<(&str, &str)>) -> u64 {
        self.get(kind, name, label).count.load(Ordering::Relaxed)
    }
}

struct TestRecorder(Arc<Registry>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.cell("counter", key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.cell("gauge", key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.0.cell("histogram", key))
    }
}

/// Runs the mix: `a` handled, `a` again a duplicate, `r` failing once then
/// handled, `p` failing permanently, `m` failing until its attempts (2)
/// are used up. One delivery at a time, so the duplicate meets a done key.
async fn run_the_mix(registry: &Arc<Registry>) -> Report {
    let broker = MemoryBroker::new("q");
    for id in ["a", "a", "r", "p", "m"] {
        broker
            .publish(OutgoingMessage::new("x").with_message_id(id))
            .await
            .unwrap();
    }
    broker.close_when_idle();
    let handler = |m: Message| async move {
        match (m.key(), m.attempt()) {
            ("r", 1) | ("m", _) => Err(HandlerError::retry("not yet")),
            ("p", _) => Err(HandlerError::permanent("never")),
            _ => Ok(()),
        }
    };
    // Handles are taken from the recorder in force when the engine is built.
    let recorder = TestRecorder(registry.clone());
    let engine = metrics::with_local_recorder(&recorder, || {
        Engine::builder(broker.clone(), MemoryDedupStore::new(), handler)
            .scope("metered")
            .concurrency(1)
            .max_attempts(2)
            .retry_backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(10),
            ))
            .build()
            .unwrap()
    });
    engine.run(CancellationToken::new()).await
}

#[tokio::test(start_paused = true)]
async fn metrics_have_standard_names_labels_and_counts() {
    let registry = Arc::new(Registry::default());
    let report = run_the_mix(&registry).await;
    assert_eq!(
        (
            report.received,
            report.handled,
            report.duplicates,
            report.retried,
            report.dead_lettered
        ),
        (7, 2, 1, 2, 2),
        "{report:?}"
    );

    let counter = |name, label| registry.count("counter", name, label);
    assert_eq!(counter(names::CONSUMED_MESSAGES, None), 7);

    // One series per outcome, each equal to the report's figure.
    let outcomes = [
        ("handled", report.handled),
        ("duplicate", report.duplicates),
        ("dead_duplicate", report.dead_duplicates),
        ("deferred", report.deferred),
        ("retried", report.retried),
        ("dead_lettered", report.dead_lettered),
        ("lease_lost", report.lease_lost),
        ("released", report.released),
        ("requeued", report.requeued),
    ];
    assert_eq!(outcomes.map(|(o, _)| o), names::OUTCOMES);
    for (outcome, want) in outcomes {
        assert_eq!(
            counter(names::MESSAGES, Some((labels::OUTCOME, outcome))),
            want,
            "{outcome}"
        );
    }

    for (reason, want) in [
        ("permanent", 1),
        ("max-attempts", 1),
        ("missing-key", 0),
        ("decode", 0),
        ("duplicate-of-dead", 0),
    ] {
        assert_eq!(
            counter(
                names::DEAD_LETTERS,
                Some((labels::DEAD_LETTER_REASON, reason))
            ),
            want,
            "{reason}"
        );
    }

    // A duration per delivery, labelled with what became of it.
    let histogram = |name, label| registry.count("histogram", name, label);
    for (outcome, want) in [
        ("handled", 2),
        ("duplicate", 1),
        ("retried", 2),
        ("dead_lettered", 2),
        ("deferred", 0),
        ("requeued", 0),
    ] {
        assert_eq!(
            histogram(names::PROCESS_DURATION, Some((labels::OUTCOME, outcome))),
            want,
            "{outcome}"
        );
    }

    // Store calls: a claim per delivery, a completion per success, a
    // release per retried attempt, a burial per dead letter.
    for (op, want) in [
        ("claim", 7),
        ("complete", 2),
        ("fail", 2),
        ("bury", 2),
        ("renew", 0),
        ("lease_state", 0),
    ] {
        let op_label = Some((labels::STORE_OPERATION, op));
        assert_eq!(histogram(names::STORE_DURATION, op_label), want, "{op}");
        assert_eq!(counter(names::STORE_ERRORS, op_label), 0, "{op}");
    }
    for op in names::BROKER_OPERATIONS {
        assert_eq!(
            counter(names::BROKER_ERRORS, Some((labels::BROKER_OPERATION, op))),
            0,
            "{op}"
        );
    }

    // Six handler runs (a, r twice, p, m twice), none running at the end.
    let in_flight = registry.get("gauge", names::HANDLERS_IN_FLIGHT, None);
    assert_eq!(in_flight.count.load(Ordering::Relaxed), 6);
    assert_eq!(in_flight.gauge.load(Ordering::Relaxed), 0);

    // Every series carries the scope and the queue, and only idemq's names
    // are used; durations are never negative.
    let all = registry.0.lock().unwrap();
    for ((kind, name, series), cell) in all.iter() {
        assert!(names::ALL.contains(&name.as_str()), "{kind} {name}");
        assert_eq!(
            series.get(labels::SCOPE).map(String::as_str),
            Some("metered")
        );
        assert_eq!(
            series.get(labels::DESTINATION).map(String::as_str),
            Some("q")
        );
        assert_eq!(cell.negative_samples.load(Ordering::Relaxed), 0, "{name}");
    }
}
