//! Failure paths of the engine, driven by the mockall mocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idemq::{
    Backoff, Claim, Delivery, Engine, Error, Fenced, HandlerError, Lease, LeaseToken, Message,
    MockBroker, MockDedupStore, Release, Stopped,
};
use mockall::Sequence;
use tokio_util::sync::CancellationToken;

fn unavailable(op: &'static str) -> Error {
    Error::Unavailable {
        backend: "mock",
        op,
        source: "connection refused".into(),
    }
}

fn lease(key: &str, attempt: u32) -> Lease {
    Lease {
        scope: "s".into(),
        key: key.into(),
        token: LeaseToken(7),
        attempt,
    }
}

/// A mock broker that answers what the engine asks of every broker: no
/// queue name (asked at build), and connected (polled for its health).
fn mock_broker() -> MockBroker {
    let mut broker = MockBroker::new();
    broker.expect_destination().return_const(None::<String>);
    broker.expect_system().return_const(None::<&'static str>);
    broker.expect_is_connected().return_const(true);
    broker
}

/// A broker that hands out `deliveries` once each, then reports closed.
fn broker_with(deliveries: Vec<Delivery>, seq: &mut Sequence) -> MockBroker {
    let mut broker = mock_broker();
    // Told the concurrency once, before the first delivery.
    broker
        .expect_prepare()
        .times(1)
        .in_sequence(seq)
        .returning(|_| None);
    for d in deliveries {
        broker
            .expect_next()
            .times(1)
            .in_sequence(seq)
            .return_once(move || Ok(Some(d)));
    }
    broker.expect_next().returning(|| Ok(None));
    broker
}

fn counting_handler(calls: &Arc<AtomicU32>) -> impl idemq::Handler + use<> {
    let calls = calls.clone();
    move |_m: Message| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    }
}

fn engine<H: idemq::Handler>(
    broker: MockBroker,
    store: MockDedupStore,
    handler: H,
) -> Engine<MockBroker, MockDedupStore, H> {
    Engine::builder(broker, store, handler)
        .scope("s")
        .concurrency(1)
        .failure_backoff(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .build()
        .expect("engine")
}

#[tokio::test(start_paused = true)]
async fn store_down_means_no_handler_call_no_ack_and_a_pause() {
    let mut seq = Sequence::new();
    let deliveries = (0..3)
        .map(|i| Delivery::new(i, "x").with_message_id(format!("m{i}")))
        .collect();
    let mut broker = broker_with(deliveries, &mut seq);
    broker.expect_ack().never();
    // The consumer is asked to pause (give back what it holds) while the
    // store is down; this one cannot, so the engine backs off instead.
    broker.expect_pause().times(1..).returning(|| Ok(false));
    broker
        .expect_nack()
        .times(3)
        .withf(|_, requeue| *requeue)
        .returning(|_, _| Ok(()));
    let mut store = MockDedupStore::new();
    store
        .expect_claim()
        .times(3)
        .returning(|_, _, _| Err(unavailable("claim")));
    let calls = Arc::new(AtomicU32::new(0));
    let started = tokio::time::Instant::now();
    let report = engine(broker, store, counting_handler(&calls))
        .run(CancellationToken::new())
        .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "fail closed: the handler never runs without a claim"
    );
    assert_eq!(
        (report.store_errors, report.requeued, report.handled),
        (3, 3, 0)
    );
    // Backoff grows with consecutive failures: at least 50+100+200 ms (jittered halves).
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn complete_reporting_lease_lost_is_counted_and_never_overwritten() {
    let mut seq = Sequence::new();
    let mut broker = broker_with(vec![Delivery::new(1, "x").with_message_id("k")], &mut seq);
    broker.expect_ack().times(1).returning(|_| Ok(()));
    broker.expect_nack().never();
    let mut store = MockDedupStore::new();
    store
        .expect_claim()
        .times(1)
        .returning(|_, k, _| Ok(Claim::Claimed(lease(k, 1))));
    store
        .expect_complete()
        .times(1)
        .returning(|_, _| Ok(Fenced::LeaseLost));
    store.expect_fail().never();
    store.expect_bury().never();
    store.expect_forget().never();
    let calls = Arc::new(AtomicU32::new(0));
    let report = engine(broker, store, counting_handler(&calls))
        .run(CancellationToken::new())
        .await;
    assert_eq!(
        (
            report.lease_lost,
            report.handled,
            calls.load(Ordering::SeqCst)
        ),
        (1, 0, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn complete_failing_keeps_the_lease_and_requeues() {
    let mut seq = Sequence::new();
    let mut broker = broker_with(vec![Delivery::new(1, "x").with_message_id("k")], &mut seq);
    broker.expect_ack().never();
    broker.expect_pause().returning(|| Ok(false));
    broker
        .expect_nack()
        .times(1)
        .withf(|_, requeue| *requeue)
        .returning(|_, _| Ok(()));
    let mut store = MockDedupStore::new();
    store
        .expect_claim()
        .returning(|_, k, _| Ok(Claim::Claimed(lease(k, 1))));
    store
        .expect_complete()
        .times(4)
        .returning(|_, _| Err(unavailable("complete")));
    store.expect_fail().never(); // releasing would let another consumer run it again at once
    let calls = Arc::new(AtomicU32::new(0));
    let report = engine(broker, store, counting_handler(&calls))
        .run(CancellationToken::new())
        .await;
    assert_eq!((report.handled, report.store_errors), (0, 4));
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_cannot_be_scheduled_is_requeued_not_lost() {
    let mut seq = Sequence::new();
    let mut broker = broker_with(vec![Delivery::new(1, "x").with_message_id("k")], &mut seq);
    broker.expect_retry_later().times(1).returning(|_, _, _| {
        Err(Error::NotConfirmed {
            backend: "mock",
            target: "q.retry".into(),
        })
    });
    broker
        .expect_nack()
        .times(1)
        .withf(|_, requeue| *requeue)
        .returning(|_, _| Ok(()));
    broker.expect_ack().never();
    let mut store = MockDedupStore::new();
    store
        .expect_claim()
        .returning(|_, k, _| Ok(Claim::Claimed(lease(k, 1))));
    store
        .expect_fail()
        .times(1)
        .withf(|_, r| *r == Release::CountAttempt)
        .returning(|_, _| Ok(Fenced::Applied));
    let handler = |_m: Message| async { Err(HandlerError::retry("later")) };
    let report = engine(broker, store, handler)
        .run(CancellationToken::new())
        .await;
    assert_eq!((report.retried, report.broker_errors), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_that_does_not_land_releases_instead_of_burying() {
    let mut seq = Sequence::new();
    let mut broker = broker_with(vec![Delivery::new(1, "x").with_message_id("k")], &mut seq);
    broker.expect_dead_letter().times(4).returning(|_, _| {
        Err(Error::NotConfirmed {
            backend: "mock",
            target: "q.dlq".into(),
        })
    });
    broker
        .expect_nack()
        .times(1)
        .withf(|_, requeue| *requeue)
        .returning(|_, _| Ok(()));
    broker.expect_ack().never();
    let mut store = MockDedupStore::new();
    store
        .expect_claim()
        .returning(|_, k, _| Ok(Claim::Claimed(lease(k, 1))));
    store.expect_bury().never();
    store
        .expect_fail()
        .times(1)
        .returning(|_, _| Ok(Fenced::Applied));
    let handler = |_m: Message| async { Err(HandlerError::permanent("poison")) };
    let report = engine(broker, store, handler)
        .run(CancellationToken::new())
        .await;
    assert_eq!((report.dead_lettered, report.broker_errors), (0, 4));
}

#[tokio::test(start_paused = true)]
async fn transient_broker_errors_are_retried_and_permanent_ones_stop_the_run() {
    let mut seq = Sequence::new();
    let mut broker = mock_broker();
    broker.expect_prepare().returning(|_| None);
    broker
        .expect_next()
        .times(2)
        .in_sequence(&mut seq)
        .returning(|| Err(unavailable("next")));
    broker
        .expect_next()
        .times(1)
        .in_sequence(&mut seq)
        .return_once(|| Ok(Some(Delivery::new(1, "x").with_message_id("k"))));
    broker
        .expect_next()
        .in_sequence(&mut seq)
        .returning(|| Err(Error::Config("queue deleted".into())));
    broker.expect_ack().times(1).returning(|_| Ok(()));
    let mut store = MockDedupStore::new();
    store
        .expect_claim()
        .returning(|_, k, _| Ok(Claim::Claimed(lease(k, 1))));
    store
        .expect_complete()
        .returning(|_, _| Ok(Fenced::Applied));
    let calls = Arc::new(AtomicU32::new(0));
    let report = engine(broker, store, counting_handler(&calls))
        .run(CancellationToken::new())
        .await;
    assert_eq!((report.handled, report.broker_errors), (1, 3));
    assert!(
        matches!(report.stopped, Stopped::BrokerFailed(Error::Config(ref e)) if e == "queue deleted"),
        "{report:?}"
    );
}

type Noop = fn(Message) -> std::future::Ready<Result<(), HandlerError>>;
type Builder = idemq::EngineBuilder<MockBroker, MockDedupStore, Noop>;

fn build(f: fn(Builder) -> Builder) -> Result<(), Error> {
    let handler: Noop = |_| std::future::ready(Ok(()));
    f(Engine::builder(
        mock_broker(),
        MockDedupStore::new(),
        handler,
    ))
    .build()
    .map(|_| ())
}

#[test]
fn bad_settings_are_typed_errors() {
    assert!(matches!(
        build(|b| b.scope("has space")),
        Err(Error::InvalidInput { what: "scope", .. })
    ));
    assert!(matches!(build(|b| b.concurrency(0)), Err(Error::Config(_))));
    assert!(matches!(
        build(|b| b.max_attempts(0)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        build(|b| b.lease(Duration::ZERO)),
        Err(Error::Config(_))
    ));
    assert!(build(|b| b.scope("orders.v2")).is_ok());
}
