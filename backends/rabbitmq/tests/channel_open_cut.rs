//! A publisher channel being opened when the link is cut. lapin 4.12.3
//! deadlocks on such a channel once its own recovery reopens it (it
//! cancels the old `channel.open` reply under the channel's status lock,
//! and dropping the channel in that reply takes the lock again): its I/O
//! thread hangs and the publishes wait until their timeout. With the
//! default configuration (lapin recovery off, the supervisor rebuilds)
//! every publish in flight goes through, consumption resumes and closing
//! returns.

mod common;

use std::time::Duration;

use idemq::testing::FaultProxy;
use idemq::{Broker, OutgoingMessage};
use tokio::time::timeout;

/// The whole scenario, with room for a loaded machine.
const SCENARIO_WITHIN: Duration = Duration::from_secs(60);

async fn scenario(round: usize) {
    common::init_tracing();
    let upstream = common::upstream().await;
    if let Err(e) = tokio::net::TcpStream::connect(upstream).await {
        let _: Option<()> = idemq::testing::service_unavailable("rabbitmq", e);
        return;
    }
    let proxy = FaultProxy::start(upstream)
        .await
        .expect("start the fault proxy");
    let config = common::config_at(&common::url_via(proxy.addr()), &format!("open-cut-{round}"))
        .with_connect_timeout(Duration::from_secs(2))
        .with_publish_timeout(Duration::from_secs(20));
    let broker = common::connect(config)
        .await
        .expect("connect through the proxy");
    broker
        .publish(OutgoingMessage::new("before").with_message_id("before"))
        .await
        .expect("publish before the cut");

    // Frames go nowhere: the first publish takes the pooled channel and
    // waits for its confirm, the second opens a channel and waits for
    // `channel.open-ok`. Then the link is cut and comes back.
    if round.is_multiple_of(2) {
        proxy.blackhole();
    }
    let mut pending = Vec::new();
    for n in 0..3 {
        let b = broker.clone();
        pending.push(tokio::spawn(async move {
            let id = format!("during-{n}");
            b.publish(OutgoingMessage::new(id.clone()).with_message_id(id))
                .await
        }));
    }
    // Odd rounds cut while the frames are on the wire: sooner or later
    // one lands between `channel.open` and its answer.
    let wait = if round.is_multiple_of(2) {
        300
    } else {
        (round as u64 * 7) % 23
    };
    tokio::time::sleep(Duration::from_millis(wait)).await;
    proxy.cut();
    proxy.restore();

    // Every publish in flight ends (published again on the recovered or
    // rebuilt connection), and the queue holds every message.
    for p in pending {
        timeout(Duration::from_secs(30), p)
            .await
            .expect("a publish in flight across the cut ends")
            .expect("the publish task")
            .expect("a publish in flight across the cut is published");
    }
    // Consumption starts across the recovery too (a transient error from
    // `next` is the engine's cue to try again, as here).
    let mut seen = std::collections::BTreeSet::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 4 {
        let next = tokio::time::timeout_at(until, broker.next())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} arrived within 30 s"));
        match next {
            Ok(Some(d)) => {
                seen.insert(String::from_utf8_lossy(&d.body).into_owned());
                broker.ack(&d).await.expect("ack");
            }
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("next: {other:?}"),
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["before", "during-0", "during-1", "during-2"]
    );
    timeout(Duration::from_secs(5), broker.close())
        .await
        .expect("close returns");
}

/// Runs the scenario on a runtime of its own, in a thread the test can
/// give up on: a deadlock that caught a runtime thread fails the test
/// instead of hanging it.
#[test]
fn a_channel_opening_across_a_cut_does_not_hang_the_runtime() {
    let rounds = std::env::var("IDEMQ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    for round in 0..rounds {
        let scenario = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(scenario(round));
            rt.shutdown_timeout(Duration::from_secs(5));
        });
        let deadline = std::time::Instant::now() + SCENARIO_WITHIN;
        while !scenario.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the scenario hung for {SCENARIO_WITHIN:?} (a runtime thread deadlocked?)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(panic) = scenario.join() {
            std::panic::resume_unwind(panic);
        }
    }
}
