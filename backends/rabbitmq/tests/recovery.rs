//! Connection cuts through `idemq::testing::FaultProxy`: consumption
//! resumes within a bound, nothing is lost, settlements of a lost
//! connection fail as stale, and closing does not wait for a recovery.
//!
//! lapin's recovery and the supervisor's rebuild are both correct ways
//! back, and which one runs after a cut is up to timing (lapin's recovery
//! can stall, and is then replaced by a rebuild): the tests check what
//! users rely on, not which of the two ran, except where a test forces
//! the rebuild.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::testing::FaultProxy;
use idemq::testing::broker::{BrokerCaps, expect_quiet, must_next};
use idemq::{Broker, DeadLetter, DeadReason, Error, OutgoingMessage};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, RabbitPublisher, RecoveryConfig, queue_depths};
use tokio::time::{Instant, timeout};

/// How soon consumption must resume once the network is back: a few of
/// lapin's backoff steps or a rebuild, with room for a loaded machine, and
/// well under the 15 s `max_recovery_time`, so a recovery that stalls
/// unnoticed fails the test.
const RESUME_WITHIN: Duration = Duration::from_secs(10);

/// How long closing may take (it promises about 2 s), with room for a
/// loaded machine; far under the 15 s connect timeout it used to wait.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Deliveries due after a reconnection arrive within [`RESUME_WITHIN`].
fn caps() -> BrokerCaps {
    BrokerCaps {
        arrival: RESUME_WITHIN,
        ..BrokerCaps::default()
    }
}

async fn proxy() -> Option<FaultProxy> {
    common::init_tracing();
    let upstream = common::upstream().await;
    if let Err(e) = tokio::net::TcpStream::connect(upstream).await {
        return idemq::testing::service_unavailable("rabbitmq", e);
    }
    Some(
        FaultProxy::start(upstream)
            .await
            .expect("start the fault proxy"),
    )
}

/// Quick lapin recovery (opted into: off by default): many attempts,
/// short delays.
fn patient() -> RecoveryConfig {
    RecoveryConfig {
        auto_recover: true,
        attempts: 200,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(300),
        ..RecoveryConfig::default()
    }
}

/// lapin gives up at once: the supervisor must rebuild.
fn impatient() -> RecoveryConfig {
    RecoveryConfig {
        attempts: 1,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        // lapin's recovery can stall instead of giving up: bounded too.
        max_recovery_time: Duration::from_secs(2),
        rebuild_min_delay: Duration::from_millis(100),
        rebuild_max_delay: Duration::from_millis(500),
        ..RecoveryConfig::default()
    }
}

fn via(proxy: &FaultProxy, name: &str, recovery: RecoveryConfig) -> RabbitConfig {
    common::config_at(&common::url_via(proxy.addr()), name)
        .with_recovery(recovery)
        .with_connect_timeout(Duration::from_secs(2))
}

async fn cut_until_noticed(proxy: &FaultProxy, broker: &RabbitBroker) {
    proxy.cut();
    common::wait_until(
        "the broker to notice the cut",
        Duration::from_secs(10),
        || !broker.is_connected(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_resumes_consumption_and_stale_settles_fail() {
    let Some(proxy) = proxy().await else { return };
    let broker = common::connect(via(&proxy, "cut-resumes", patient()))
        .await
        .expect("connect through the proxy");
    for id in ["a", "b"] {
        broker
            .publish(OutgoingMessage::new(id).with_message_id(id))
            .await
            .expect("publish");
    }
    let a = must_next(&broker, &caps()).await;
    let b = must_next(&broker, &caps()).await;
    let accepted = proxy.connections_accepted();

    cut_until_noticed(&proxy, &broker).await;
    // Publishing waits for the connection instead of failing at once.
    let publishing = {
        let broker = broker.clone();
        tokio::spawn(async move {
            broker
                .publish(OutgoingMessage::new("c").with_message_id("c"))
                .await
        })
    };
    proxy.restore();

    let mut back = BTreeMap::new();
    for _ in 0..3 {
        let d = must_next(&broker, &caps()).await;
        back.insert(d.message_id.clone().unwrap_or_default(), d);
    }
    publishing
        .await
        .expect("task")
        .expect("publish across the cut");
    assert_eq!(
        back.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(back["a"].redelivered && back["b"].redelivered);
    assert!(proxy.connections_accepted() > accepted);
    assert!(broker.is_connected());

    // The deliveries of the lost channel cannot be settled any more.
    assert!(matches!(
        broker.ack(&a).await,
        Err(Error::StaleDelivery { .. })
    ));
    let letter = DeadLetter::new(DeadReason::Permanent, "x", 1);
    assert!(matches!(
        broker.dead_letter(&b, &letter).await,
        Err(Error::StaleDelivery { .. })
    ));
    assert!(broker.next_dead_letter().await.expect("dlq").is_none());
    for d in back.values() {
        broker.ack(d).await.expect("ack the redeliveries");
    }
    expect_quiet(&broker, &caps()).await;
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_rebuilds_when_lapin_gives_up() {
    let Some(proxy) = proxy().await else { return };
    let broker = common::connect(via(&proxy, "rebuild", impatient()))
        .await
        .expect("connect through the proxy");
    broker
        .publish(OutgoingMessage::new("r").with_message_id("r"))
        .await
        .expect("publish");
    let first = must_next(&broker, &caps()).await;
    let generation = broker.generation().expect("a generation");

    cut_until_noticed(&proxy, &broker).await;
    common::wait_until(
        "lapin to give up and the supervisor to retire the connection",
        Duration::from_secs(10),
        || broker.generation().is_none(),
    )
    .await;
    proxy.restore();

    let again = must_next(&broker, &caps()).await;
    assert_eq!(again.message_id.as_deref(), Some("r"));
    assert!(again.redelivered);
    let rebuilt = broker.generation().expect("a generation");
    assert!(rebuilt > generation, "{rebuilt} after {generation}");
    assert!(matches!(
        broker.ack(&first).await,
        Err(Error::StaleDelivery { .. })
    ));
    assert!(matches!(
        broker.retry_later(&first, common::SHORT_TIER, 1).await,
        Err(Error::StaleDelivery { .. })
    ));
    broker.ack(&again).await.expect("ack");
    // The rebuilt connection publishes and consumes as before.
    broker
        .publish(OutgoingMessage::new("s").with_message_id("s"))
        .await
        .expect("publish");
    let s = must_next(&broker, &caps()).await;
    broker
        .retry_later(&s, common::SHORT_TIER, 1)
        .await
        .expect("retry");
    let copy = must_next(&broker, &caps()).await;
    assert_eq!(
        (copy.message_id.as_deref(), copy.retry_attempt()),
        (Some("s"), 1)
    );
    broker.ack(&copy).await.expect("ack");
    expect_quiet(&broker, &caps()).await;
    common::cleanup(broker).await;
}

/// Runs a consumer that acks everything, recording what it acked.
fn consume_all(
    broker: RabbitBroker,
    acked: Arc<Mutex<BTreeSet<String>>>,
    stale: Arc<Mutex<u64>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(d)) = broker.next().await {
            match broker.ack(&d).await {
                Ok(()) => {
                    if let Ok(mut acked) = acked.lock() {
                        acked.insert(d.message_id.clone().unwrap_or_default());
                    }
                }
                Err(Error::StaleDelivery { .. }) => {
                    if let Ok(mut stale) = stale.lock() {
                        *stale += 1;
                    }
                }
                Err(e) => panic!("ack failed: {e}"),
            }
        }
    })
}

/// A consumer acks a stream of messages while the connection is cut once;
/// with `rebuild`, the supervisor's rebuild is awaited before the network
/// comes back (lapin's recovery is set up to give up).
async fn no_message_lost(recovery: RecoveryConfig, name: &str, rebuild: bool) {
    const N: usize = 600;
    let Some(proxy) = proxy().await else { return };
    let broker = common::connect(via(&proxy, name, recovery))
        .await
        .expect("connect through the proxy");
    // The producer talks to the server directly and keeps publishing.
    let direct = RabbitConfig::new(common::url(), broker.config().queue());
    let publisher = RabbitPublisher::connect(direct).await.expect("publisher");
    let ids: Vec<String> = (0..N).map(|i| format!("m{i:04}")).collect();
    let producing = {
        let ids = ids.clone();
        tokio::spawn(async move {
            for id in ids {
                publisher
                    .publish(OutgoingMessage::new(id.clone()).with_message_id(id))
                    .await
                    .expect("publish");
            }
            publisher.close().await;
        })
    };
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stale = Arc::new(Mutex::new(0));
    let consuming = consume_all(broker.clone(), acked.clone(), stale.clone());
    let count = || acked.lock().map(|a| a.len()).unwrap_or(0);

    common::wait_until("a third acked", Duration::from_secs(30), || {
        count() >= N / 3
    })
    .await;
    let accepted = proxy.connections_accepted();
    let generation = broker.generation();
    cut_until_noticed(&proxy, &broker).await;
    if rebuild {
        common::wait_until(
            "the supervisor to retire the connection",
            Duration::from_secs(10),
            || broker.generation().is_none(),
        )
        .await;
    }
    let during = count();
    proxy.restore();
    common::wait_until("consumption to resume", RESUME_WITHIN, || count() > during).await;
    producing.await.expect("producer");
    common::wait_until("everything acked", Duration::from_secs(60), || count() == N).await;

    assert!(during < N, "the cut came after the stream ended");
    assert!(proxy.connections_accepted() > accepted, "no reconnection");
    if rebuild {
        assert!(broker.generation() > generation, "no rebuild");
    }
    let acked: BTreeSet<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    assert_eq!(acked, ids.into_iter().collect::<BTreeSet<_>>());
    expect_quiet(&broker, &caps()).await;
    let depths = queue_depths(
        &RabbitConfig::new(common::url(), broker.config().queue())
            .with_retry_tiers(broker.config().retry_tiers().iter().copied()),
    )
    .await
    .expect("depths");
    assert_eq!((depths.work, depths.dead), (0, 0));
    eprintln!(
        "stale acks after the cut: {}",
        stale.lock().map(|s| *s).unwrap_or(0)
    );
    let closing = broker.clone();
    common::cleanup(closing).await;
    timeout(Duration::from_secs(10), consuming)
        .await
        .expect("the consumer ended after close")
        .expect("consumer task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_lost_across_a_cut() {
    no_message_lost(patient(), "lost-cut", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_lost_across_a_rebuild() {
    no_message_lost(impatient(), "lost-rebuild", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_network_is_detected_by_heartbeats() {
    let Some(proxy) = proxy().await else { return };
    let config = via(&proxy, "hung", patient()).with_heartbeat(Some(1));
    let broker = common::connect(config)
        .await
        .expect("connect through the proxy");
    broker
        .publish(OutgoingMessage::new("h").with_message_id("h"))
        .await
        .expect("publish");
    let first = must_next(&broker, &caps()).await;

    proxy.blackhole();
    common::wait_until(
        "missed heartbeats to be noticed",
        Duration::from_secs(20),
        || !broker.is_connected(),
    )
    .await;
    proxy.restore();

    let again = must_next(&broker, &caps()).await;
    assert_eq!(again.message_id.as_deref(), Some("h"));
    assert!(again.redelivered);
    assert!(matches!(
        broker.ack(&first).await,
        Err(Error::StaleDelivery { .. })
    ));
    broker.ack(&again).await.expect("ack");
    expect_quiet(&broker, &caps()).await;
    common::cleanup(broker).await;
}

/// Consumers on `queue`, by a passive declaration on a fresh connection.
async fn consumers(queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(&common::url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = conn.close(200, "bye".into()).await;
    q.consumer_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_takes_too_long_is_abandoned_and_reaped() {
    let Some(proxy) = proxy().await else { return };
    // lapin would retry for minutes; the supervisor waits 1 s.
    let recovery = RecoveryConfig {
        attempts: 1000,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_recovery_time: Duration::from_secs(1),
        rebuild_min_delay: Duration::from_millis(100),
        rebuild_max_delay: Duration::from_millis(300),
        ..RecoveryConfig::default()
    };
    let broker = common::connect(via(&proxy, "abandon", recovery))
        .await
        .expect("connect through the proxy");
    let queue = broker.config().queue().to_owned();
    broker
        .publish(OutgoingMessage::new("z").with_message_id("z"))
        .await
        .expect("publish");
    let first = must_next(&broker, &caps()).await;

    cut_until_noticed(&proxy, &broker).await;
    common::wait_until(
        "the supervisor to abandon lapin's recovery",
        Duration::from_secs(10),
        || broker.generation().is_none(),
    )
    .await;
    proxy.restore();

    let again = must_next(&broker, &caps()).await;
    assert_eq!(again.message_id.as_deref(), Some("z"));
    assert!(broker.generation() > Some(1));
    assert!(matches!(
        broker.ack(&first).await,
        Err(Error::StaleDelivery { .. })
    ));
    broker.ack(&again).await.expect("ack");
    // Unless it stalled, lapin still recovers the abandoned connection,
    // consumer and all; it is closed as soon as it is up, so no message is
    // held by it for long.
    for i in 0..20 {
        let id = format!("after-{i}");
        broker
            .publish(OutgoingMessage::new(id.clone()).with_message_id(id))
            .await
            .expect("publish");
    }
    let mut got = BTreeSet::new();
    while got.len() < 20 {
        let d = must_next(&broker, &caps()).await;
        broker.ack(&d).await.expect("ack");
        got.insert(d.message_id.unwrap_or_default());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumers(&queue).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned consumer lingers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_quiet(&broker, &caps()).await;
    common::cleanup(broker).await;
}

/// What the network does while the broker is closed.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Cut, and new connections refused: lapin keeps reconnecting.
    Refused,
    /// Cut, and new connections held without a byte forwarded: lapin's
    /// reconnection attempt hangs in the handshake.
    BlackholedReconnect,
    /// No cut, but nothing forwarded: the connection still looks up, and
    /// `connection.close` is never answered.
    Blackholed,
}

/// Closes a consuming broker (with the default 15 s connect timeout)
/// while `fault` holds: `close` must return within [`CLOSE_WITHIN`], the
/// broker must be closed, and once the network is back no consumer may be
/// left behind (a connection lapin recovers after the close is closed
/// then).
async fn close_is_prompt(fault: Fault, name: &str) {
    let Some(proxy) = proxy().await else { return };
    let config = common::config_at(&common::url_via(proxy.addr()), name)
        .with_recovery(patient())
        .with_connect_timeout(Duration::from_secs(15));
    let broker = common::connect(config)
        .await
        .expect("connect through the proxy");
    let queue = broker.config().queue().to_owned();
    broker
        .publish(OutgoingMessage::new("q").with_message_id("q"))
        .await
        .expect("publish");
    let held = must_next(&broker, &caps()).await;
    // An ack held for batching, which closing writes when it can.
    broker.ack(&held).await.expect("ack");
    broker
        .publish(OutgoingMessage::new("u").with_message_id("u"))
        .await
        .expect("publish");
    let unsettled = must_next(&broker, &caps()).await;
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.next().await })
    };

    match fault {
        Fault::Refused => cut_until_noticed(&proxy, &broker).await,
        Fault::BlackholedReconnect => {
            cut_until_noticed(&proxy, &broker).await;
            let accepted = proxy.connections_accepted();
            proxy.blackhole();
            common::wait_until(
                "lapin to try reconnecting into the black hole",
                RESUME_WITHIN,
                || proxy.connections_accepted() > accepted,
            )
            .await;
        }
        Fault::Blackholed => proxy.blackhole(),
    }
    let started = Instant::now();
    timeout(CLOSE_WITHIN, broker.close())
        .await
        .unwrap_or_else(|_| panic!("{fault:?}: close took longer than {CLOSE_WITHIN:?}"));
    eprintln!("{fault:?}: closed in {:?}", started.elapsed());
    let ended = timeout(CLOSE_WITHIN, waiting)
        .await
        .expect("next returned after close")
        .expect("task");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert!(matches!(broker.next().await, Ok(None)));
    assert!(!broker.is_connected() && broker.generation().is_none());
    assert!(matches!(
        broker.ack(&unsettled).await,
        Err(Error::StaleDelivery { .. })
    ));

    // Once the network is back, lapin may still recover the abandoned
    // connection, consumer and all, until the reaper closes it: wait for
    // the queue to settle with no consumer, the unsettled message back
    // (the acked one gone, unless its held ack could not be written
    // before the connection went), and to stay so a while.
    proxy.restore();
    let direct = RabbitConfig::new(common::url(), &queue)
        .with_retry_tiers(broker.config().retry_tiers().iter().copied());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut settled_since: Option<Instant> = None;
    loop {
        let depths = queue_depths(&direct).await.expect("depths");
        let settled =
            consumers(&queue).await == 0 && (1..=2).contains(&depths.work) && depths.dead == 0;
        match (settled, settled_since) {
            (true, Some(since)) if since.elapsed() >= Duration::from_secs(3) => break,
            (true, None) => settled_since = Some(Instant::now()),
            (true, Some(_)) => {}
            (false, _) => settled_since = None,
        }
        assert!(
            Instant::now() < deadline,
            "{fault:?}: a consumer outlived the close, or messages went missing: {depths:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_a_recovery_refused_by_the_network() {
    close_is_prompt(Fault::Refused, "close-refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_a_recovery_stuck_in_its_handshake() {
    close_is_prompt(Fault::BlackholedReconnect, "close-blackholed-reconnect").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_a_hung_network() {
    close_is_prompt(Fault::Blackholed, "close-blackholed").await;
}
