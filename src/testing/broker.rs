//! The behaviour every [`Broker`] shows. Each function takes a broker on
//! fresh, empty queues and panics (fails the test) on a deviation.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::{Instant, timeout};

use crate::broker::Broker;
use crate::message::{DeadLetter, DeadReason, Delivery, HeaderValue, OutgoingMessage, headers};

/// What a broker under test can do, for the suite's timing.
#[derive(Clone, Copy, Debug)]
pub struct BrokerCaps {
    /// A delay the broker honours as it is (for tiered brokers: a tier).
    pub retry_delay: Duration,
    /// How long to wait to be sure nothing more arrives.
    pub quiet: Duration,
    /// How long a delivery that is due may take to arrive.
    pub arrival: Duration,
}

impl Default for BrokerCaps {
    fn default() -> Self {
        BrokerCaps {
            retry_delay: Duration::from_millis(500),
            quiet: Duration::from_millis(300),
            arrival: Duration::from_secs(5),
        }
    }
}

/// Waits for the next delivery, failing the test after `caps.arrival`.
pub async fn must_next<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) -> Delivery {
    match timeout(caps.arrival, broker.next()).await {
        Ok(Ok(Some(d))) => d,
        Ok(other) => panic!("expected a delivery, got {other:?}"),
        Err(_) => panic!("no delivery within {:?}", caps.arrival),
    }
}

/// Fails the test if anything is delivered within `caps.quiet`.
pub async fn expect_quiet<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    if let Ok(got) = timeout(caps.quiet, broker.next()).await {
        panic!("expected no delivery, got {got:?}");
    }
}

async fn must_next_dead<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) -> Delivery {
    let deadline = Instant::now() + caps.arrival;
    loop {
        if let Some(d) = broker.next_dead_letter().await.expect("next_dead_letter") {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter within {:?}",
            caps.arrival
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn id(d: &Delivery) -> &str {
    d.message_id.as_deref().unwrap_or("<none>")
}

/// Bodies, ids and headers arrive as published, in order, not redelivered.
pub async fn delivers_what_was_published<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    for i in 0..3 {
        let msg = OutgoingMessage::new(format!("body-{i}"))
            .with_message_id(format!("m{i}"))
            .with_header("x-test", format!("h{i}"))
            .with_header("x-n", i64::from(i));
        broker.publish(msg).await.expect("publish");
    }
    broker
        .publish(OutgoingMessage::new("anonymous"))
        .await
        .expect("publish");
    for i in 0..3 {
        let d = must_next(broker, caps).await;
        assert_eq!(id(&d), format!("m{i}"));
        assert_eq!(&d.body[..], format!("body-{i}").as_bytes());
        assert_eq!(d.header("x-test"), Some(&HeaderValue::Str(format!("h{i}"))));
        assert_eq!(
            d.header("x-n").and_then(HeaderValue::as_i64),
            Some(i64::from(i))
        );
        assert!(!d.redelivered);
        broker.ack(&d).await.expect("ack");
    }
    let anon = must_next(broker, caps).await;
    assert_eq!(
        (anon.message_id.as_deref(), &anon.body[..]),
        (None, &b"anonymous"[..])
    );
    broker.ack(&anon).await.expect("ack");
}

/// An acked message is gone; acking it again is an error, not a success.
pub async fn ack_removes<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    broker
        .publish(OutgoingMessage::new("x").with_message_id("a"))
        .await
        .expect("publish");
    let d = must_next(broker, caps).await;
    broker.ack(&d).await.expect("ack");
    expect_quiet(broker, caps).await;
    assert!(broker.next_dead_letter().await.expect("dlq").is_none());
}

/// `nack` with requeue delivers the message again, flagged redelivered.
pub async fn nack_requeue_redelivers<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    broker
        .publish(OutgoingMessage::new("x").with_message_id("n"))
        .await
        .expect("publish");
    let first = must_next(broker, caps).await;
    assert!(!first.redelivered);
    broker.nack(&first, true).await.expect("nack");
    let again = must_next(broker, caps).await;
    assert_eq!((id(&again), again.redelivered), ("n", true));
    if let (Some(a), Some(b)) = (first.delivery_count, again.delivery_count) {
        assert!(b > a, "delivery count must grow: {a} then {b}");
    }
    broker.ack(&again).await.expect("ack");
    expect_quiet(broker, caps).await;
}

/// `nack` without requeue does not deliver the message again: the broker
/// dead-letters it itself (reason `rejected`).
pub async fn nack_without_requeue_dead_letters<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    broker
        .publish(OutgoingMessage::new("x").with_message_id("d"))
        .await
        .expect("publish");
    let d = must_next(broker, caps).await;
    broker.nack(&d, false).await.expect("nack");
    expect_quiet(broker, caps).await;
    let dead = must_next_dead(broker, caps).await;
    assert_eq!(id(&dead), "d");
    let death = dead
        .broker_death
        .clone()
        .expect("the broker's own dead letter");
    assert_eq!(death.reason, "rejected");
    broker.ack(&dead).await.expect("ack dead letter");
}

/// `retry_later` acks the original and the copy comes back after the
/// delay, carrying the attempt and first-failure headers.
pub async fn retry_later_comes_back_after_delay<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    broker
        .publish(
            OutgoingMessage::new("again")
                .with_message_id("r")
                .with_header("x-keep", "yes"),
        )
        .await
        .expect("publish");
    let d = must_next(broker, caps).await;
    let start = Instant::now();
    broker
        .retry_later(&d, caps.retry_delay, 2)
        .await
        .expect("retry_later");
    assert!(
        timeout(caps.retry_delay / 2, broker.next()).await.is_err(),
        "the copy came back before half its delay"
    );
    let copy = match timeout(caps.retry_delay + caps.arrival, broker.next()).await {
        Ok(Ok(Some(d))) => d,
        other => panic!("the retried copy did not come back: {other:?}"),
    };
    let waited = start.elapsed();
    assert!(
        waited + Duration::from_millis(50) >= caps.retry_delay,
        "came back after {waited:?}"
    );
    assert_eq!((id(&copy), &copy.body[..]), ("r", &b"again"[..]));
    assert_eq!(copy.retry_attempt(), 2);
    assert_eq!(copy.header("x-keep"), Some(&HeaderValue::Str("yes".into())));
    assert!(
        copy.header(headers::FIRST_FAILURE_MS)
            .and_then(HeaderValue::as_i64)
            .is_some()
    );
    broker.ack(&copy).await.expect("ack");
    expect_quiet(broker, caps).await;
}

/// `dead_letter` acks the original and the dead-letter queue holds a copy
/// with body, id, the delivery's headers and the reason headers.
pub async fn dead_letter_keeps_body_id_and_reason<B: Broker + ?Sized>(
    broker: &B,
    caps: &BrokerCaps,
) {
    assert!(broker.next_dead_letter().await.expect("dlq").is_none());
    broker
        .publish(
            OutgoingMessage::new("poison")
                .with_message_id("p")
                .with_header("x-keep", "yes"),
        )
        .await
        .expect("publish");
    let d = must_next(broker, caps).await;
    let letter = DeadLetter::new(DeadReason::Permanent, "boom", 3).with_record("orders", "p");
    broker.dead_letter(&d, &letter).await.expect("dead_letter");
    expect_quiet(broker, caps).await;
    let dead = must_next_dead(broker, caps).await;
    assert_eq!((id(&dead), &dead.body[..]), ("p", &b"poison"[..]));
    let h = |name| dead.header(name).cloned();
    assert_eq!(h("x-keep"), Some(HeaderValue::Str("yes".into())));
    assert_eq!(
        h(headers::REASON),
        Some(HeaderValue::Str("permanent".into()))
    );
    assert_eq!(h(headers::DETAIL), Some(HeaderValue::Str("boom".into())));
    assert_eq!(h(headers::ATTEMPTS).and_then(|v| v.as_i64()), Some(3));
    assert!(
        h(headers::ORIGINAL_QUEUE).and_then(|v| v.as_str().map(|s| !s.is_empty())) == Some(true)
    );
    assert!(
        h(headers::FIRST_FAILURE_MS)
            .and_then(|v| v.as_i64())
            .is_some()
    );
    assert!(h(headers::DEAD_AT_MS).and_then(|v| v.as_i64()).is_some());
    assert_eq!(h(headers::SCOPE), Some(HeaderValue::Str("orders".into())));
    assert_eq!(h(headers::KEY), Some(HeaderValue::Str("p".into())));
    broker.ack(&dead).await.expect("ack dead letter");
    assert!(broker.next_dead_letter().await.expect("dlq").is_none());
}

/// Many deliveries in flight, each settled on its own and in any order.
pub async fn settles_each_delivery_on_its_own<B: Broker + ?Sized>(broker: &B, caps: &BrokerCaps) {
    for i in 0..6 {
        broker
            .publish(OutgoingMessage::new("x").with_message_id(format!("s{i}")))
            .await
            .expect("publish");
    }
    let mut inflight = Vec::new();
    for _ in 0..6 {
        inflight.push(must_next(broker, caps).await);
    }
    let ids: BTreeSet<String> = inflight.iter().map(|d| id(d).to_owned()).collect();
    assert_eq!(ids.len(), 6);
    inflight.reverse();
    let mut requeued = BTreeSet::new();
    for d in &inflight {
        let n: u32 = id(d)[1..].parse().expect("id");
        if n.is_multiple_of(2) {
            broker.ack(d).await.expect("ack");
        } else {
            broker.nack(d, true).await.expect("nack");
            requeued.insert(id(d).to_owned());
        }
    }
    let mut back = BTreeSet::new();
    for _ in 0..requeued.len() {
        let d = must_next(broker, caps).await;
        assert!(d.redelivered);
        back.insert(id(&d).to_owned());
        broker.ack(&d).await.expect("ack");
    }
    assert_eq!(back, requeued);
    expect_quiet(broker, caps).await;
}
