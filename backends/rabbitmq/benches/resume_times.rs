//! Measures how long a consumer takes to resume consuming after a
//! connection cut, over many cuts (a measurement that takes minutes, so a
//! bench, not a test).
//!
//! ```text
//! IDEMQ_CUTS=300 cargo bench -p idemq-rabbitmq --bench resume_times
//! ```
//!
//! A producer publishes directly to the server all along while a consumer
//! behind a `FaultProxy` acks what it gets; each round cuts the proxy,
//! waits for the broker to notice, holds the cut a moment, restores it, and
//! times how long until the consumer gets its next delivery. It prints
//! count, p50/p90/p99/max and how many rounds ended in a supervisor rebuild
//! (a new generation) rather than lapin's own recovery, then checks that
//! every message published was acked.
//!
//! `IDEMQ_CUTS` (default 300) sets the rounds; `IDEMQ_RECOVERY=patient`
//! turns lapin's own recovery on, quick as in the recovery tests, instead
//! of the defaults (a supervisor rebuild after every loss).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::testing::FaultProxy;
use idemq::{Broker, Error, OutgoingMessage};
use idemq_rabbitmq::{RabbitConfig, RabbitPublisher, RecoveryConfig};
use tokio::time::{Instant, sleep};

/// Longest a round may take before the run fails.
const ROUND_LIMIT: Duration = Duration::from_secs(60);
/// How far the producer may run ahead of the acks.
const MAX_AHEAD: u64 = 500;

fn recovery() -> RecoveryConfig {
    match std::env::var("IDEMQ_RECOVERY").as_deref() {
        Ok("patient") => RecoveryConfig {
            auto_recover: true,
            attempts: 200,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(300),
            ..RecoveryConfig::default()
        },
        _ => RecoveryConfig::default(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    common::init_tracing();
    let cuts: usize = std::env::var("IDEMQ_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let upstream = common::upstream().await;
    if let Err(e) = tokio::net::TcpStream::connect(upstream).await {
        let _: Option<()> = idemq::testing::service_unavailable("rabbitmq", e);
        return;
    }
    let proxy = FaultProxy::start(upstream).await.expect("fault proxy");
    let config = common::config_at(&common::url_via(proxy.addr()), "resume")
        .with_recovery(recovery())
        .with_connect_timeout(Duration::from_secs(15));
    let Some(broker) = common::connect(config).await else {
        return;
    };
    let direct = RabbitConfig::new(common::url(), broker.config().queue());
    let publisher = RabbitPublisher::connect(direct).await.expect("publisher");

    // Producer: one message every 2 ms, until told to stop, and never
    // more than MAX_AHEAD beyond what was acked (a consumer slowed by a
    // loaded machine is not what is measured).
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let acked_count = {
        let acked = acked.clone();
        move || acked.lock().map(|a| a.len() as u64).unwrap_or(0)
    };
    let producing = {
        let (stop, published, acked_count) = (stop.clone(), published.clone(), acked_count.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if i > acked_count() + MAX_AHEAD {
                    sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let id = format!("m{i:08}");
                publisher
                    .publish(OutgoingMessage::new(id.clone()).with_message_id(id))
                    .await
                    .expect("publish");
                i += 1;
                published.store(i, Ordering::SeqCst);
                sleep(Duration::from_millis(2)).await;
            }
            publisher.close().await;
        })
    };
    // Consumer: acks everything; counts deliveries.
    let received = Arc::new(AtomicU64::new(0));
    let consuming = {
        let (broker, received, acked) = (broker.clone(), received.clone(), acked.clone());
        tokio::spawn(async move {
            while let Ok(Some(d)) = broker.next().await {
                received.fetch_add(1, Ordering::SeqCst);
                match broker.ack(&d).await {
                    Ok(()) => {
                        if let Ok(mut a) = acked.lock() {
                            a.insert(d.message_id.clone().unwrap_or_default());
                        }
                    }
                    Err(Error::StaleDelivery { .. }) => {}
                    Err(e) => panic!("ack failed: {e}"),
                }
            }
        })
    };

    common::wait_until("first deliveries", Duration::from_secs(30), || {
        received.load(Ordering::SeqCst) > 10
    })
    .await;
    let mut times = Vec::with_capacity(cuts);
    let mut rebuilds = 0;
    let mut slow = Vec::new();
    for round in 0..cuts {
        let generation = broker.generation();
        proxy.cut();
        common::wait_until("the cut to be noticed", ROUND_LIMIT, || {
            !broker.is_connected()
        })
        .await;
        // Hold the cut a varying moment: lapin's first reconnection
        // attempts may or may not meet it.
        sleep(Duration::from_millis((round % 7) as u64 * 30)).await;
        let before = received.load(Ordering::SeqCst);
        proxy.restore();
        let restored = Instant::now();
        common::wait_until("consumption to resume", ROUND_LIMIT, || {
            received.load(Ordering::SeqCst) > before
        })
        .await;
        let took = restored.elapsed();
        let rebuilt = broker.generation() != generation;
        if rebuilt {
            rebuilds += 1;
        }
        if took > Duration::from_secs(2) {
            slow.push((round, took, rebuilt));
            eprintln!("round {round}: resumed after {took:?} (rebuilt: {rebuilt})");
        }
        times.push(took);
        // Let the connection settle before the next cut.
        sleep(Duration::from_millis(50)).await;
    }

    stop.store(true, Ordering::SeqCst);
    producing.await.expect("producer");
    let total = published.load(Ordering::SeqCst);

    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    eprintln!(
        "time to resume after a cut ({} recovery): count {}, p50 {:?}, p90 {:?}, p99 {:?}, \
         max {:?}, mean {:?}; {} needed a rebuild; {} over 2 s",
        std::env::var("IDEMQ_RECOVERY").unwrap_or_else(|_| "default".into()),
        times.len(),
        percentile(&times, 50.0),
        percentile(&times, 90.0),
        percentile(&times, 99.0),
        times.last().copied().unwrap_or_default(),
        mean,
        rebuilds,
        slow.len(),
    );
    common::wait_until("everything acked", ROUND_LIMIT, || acked_count() == total).await;
    eprintln!("{total} messages published, every one acked");
    let closing = broker.clone();
    common::cleanup(closing).await;
    consuming.await.expect("consumer");
}
