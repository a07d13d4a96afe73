//! The engines' counters summed per scope, through the `metrics` facade.
//!
//! An aborted engine (a simulated crash) never returns its `Report`, so the
//! figures of every engine incarnation are collected from the counters the
//! engine exports instead (see `idemq::metric_names`), each under the name
//! of the `Report` field it matches: the outcomes of `idemq.messages`, the
//! consumed messages as `received`, the errors of every operation summed
//! as `store_errors` and `broker_errors`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use idemq::metric_names::{self as names, labels};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

#[derive(Default)]
struct Recorder {
    counters: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        let event = match key.name() {
            names::MESSAGES => match label(labels::OUTCOME).as_str() {
                "duplicate" => "duplicates".to_owned(),
                "dead_duplicate" => "dead_duplicates".to_owned(),
                outcome => outcome.to_owned(),
            },
            names::CONSUMED_MESSAGES => "received".to_owned(),
            // One total over the operations: every operation's handle
            // shares the cell.
            names::STORE_ERRORS => "store_errors".to_owned(),
            names::BROKER_ERRORS => "broker_errors".to_owned(),
            _ => return Counter::noop(),
        };
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let counter = counters
            .entry((label(labels::SCOPE), event))
            .or_default()
            .clone();
        Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

static RECORDER: OnceLock<&'static Recorder> = OnceLock::new();

/// Installs the recorder (once per process; before any engine is built).
/// Panics if another global recorder was installed first.
pub fn install() {
    RECORDER.get_or_init(|| {
        let recorder: &'static Recorder = Box::leak(Box::default());
        if metrics::set_global_recorder(recorder).is_err() {
            panic!("another metrics recorder is installed; the chaos suite needs its own");
        }
        recorder
    });
}

/// The sum of `event` (a `Report` field's name) over every engine (every
/// incarnation) of `scope`.
pub fn total(scope: &str, event: &str) -> u64 {
    let Some(recorder) = RECORDER.get() else {
        return 0;
    };
    let counters = recorder.counters.lock().unwrap_or_else(|p| p.into_inner());
    counters
        .get(&(scope.to_owned(), event.to_owned()))
        .map_or(0, |c| c.load(Ordering::Relaxed))
}
