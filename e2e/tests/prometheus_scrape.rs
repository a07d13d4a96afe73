//! The Prometheus example's setup, scraped over HTTP: every documented
//! metric is on the endpoint under its Prometheus name, and the counts
//! are those of the mix.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use idemq::metric_names::{self, labels};

#[path = "../examples/prometheus.rs"]
#[allow(dead_code)] // its `main` is the example's
mod example;

/// Each metric name and the suffix the exporter gives its kind.
const EXPORTED: [(&str, &str); 8] = [
    (metric_names::CONSUMED_MESSAGES, "_total"),
    (metric_names::PROCESS_DURATION, "_seconds"),
    (metric_names::MESSAGES, "_total"),
    (metric_names::DEAD_LETTERS, "_total"),
    (metric_names::STORE_DURATION, "_seconds"),
    (metric_names::STORE_ERRORS, "_total"),
    (metric_names::BROKER_ERRORS, "_total"),
    (metric_names::HANDLERS_IN_FLIGHT, ""),
];

/// How Prometheus spells a name or label key.
fn prom(name: &str) -> String {
    name.replace('.', "_")
}

/// The value of the series of `metric` whose labels include `with`.
fn value(body: &str, metric: &str, with: &[(&str, &str)]) -> Option<f64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once("} ")?;
        with.iter()
            .all(|(k, v)| labels.contains(&format!("{}=\"{v}\"", prom(k))))
            .then(|| value.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_every_documented_metric_with_the_counts_of_the_mix() {
    let addr: SocketAddr = {
        let probe = TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address")
    };
    example::install(addr).expect("install the exporter");
    let report = example::run_mix().await.expect("the mix");
    assert_eq!(
        (
            report.received,
            report.handled,
            report.duplicates,
            report.retried,
            report.dead_lettered
        ),
        (7, 4, 1, 1, 1),
        "{report:?}"
    );

    let mut body = Err(std::io::Error::other("not scraped"));
    for _ in 0..50 {
        body = example::scrape(addr).await;
        if body.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = body.expect("scrape the endpoint");

    let documented: Vec<&str> = EXPORTED.iter().map(|(name, _)| *name).collect();
    assert_eq!(documented, metric_names::ALL, "every metric is checked");
    for (name, suffix) in EXPORTED {
        let exported = format!("{}{suffix}", prom(name));
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("# TYPE {exported} "))),
            "{exported} is not on the endpoint:\n{body}"
        );
    }

    let base = [
        (labels::SCOPE, example::QUEUE),
        (labels::DESTINATION, example::QUEUE),
    ];
    let messages = prom(metric_names::MESSAGES) + "_total";
    for (outcome, n) in [
        ("handled", 4.0),
        ("duplicate", 1.0),
        ("retried", 1.0),
        ("dead_lettered", 1.0),
        ("deferred", 0.0),
        ("requeued", 0.0),
    ] {
        let with = [base[0], base[1], (labels::OUTCOME, outcome)];
        assert_eq!(value(&body, &messages, &with), Some(n), "{outcome}");
    }
    let consumed = prom(metric_names::CONSUMED_MESSAGES) + "_total";
    assert_eq!(value(&body, &consumed, &base), Some(7.0));
    let dead = prom(metric_names::DEAD_LETTERS) + "_total";
    let permanent = [base[0], base[1], (labels::DEAD_LETTER_REASON, "permanent")];
    assert_eq!(value(&body, &dead, &permanent), Some(1.0));
    let durations = prom(metric_names::PROCESS_DURATION) + "_seconds_count";
    let handled = [base[0], base[1], (labels::OUTCOME, "handled")];
    assert_eq!(value(&body, &durations, &handled), Some(4.0));
    let claims = prom(metric_names::STORE_DURATION) + "_seconds_count";
    let claim = [base[0], base[1], (labels::STORE_OPERATION, "claim")];
    assert_eq!(value(&body, &claims, &claim), Some(7.0));
    let in_flight = prom(metric_names::HANDLERS_IN_FLIGHT);
    assert_eq!(value(&body, &in_flight, &base), Some(0.0));
}
