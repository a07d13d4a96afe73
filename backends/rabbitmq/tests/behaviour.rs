//! RabbitMQ-specific behaviour: retry tiers, dead-letter headers, quorum
//! delivery counts, unroutable publishes, the producer API, topology checks.

mod common;

use std::time::Duration;

use common::{LONG_TIER, SHORT_TIER};
use idemq::testing::broker::{BrokerCaps, expect_quiet, must_next};
use idemq::{
    Broker, DeadLetter, DeadReason, Delivery, Error, HeaderValue, OutgoingMessage, headers,
};
use idemq_rabbitmq::{QueueType, RabbitBroker, RabbitPublisher, queue_depths};
use tokio::time::{Instant, timeout};

fn caps() -> BrokerCaps {
    BrokerCaps::default()
}

fn id(d: &Delivery) -> &str {
    d.message_id.as_deref().unwrap_or("<none>")
}

async fn retry_depths(broker: &RabbitBroker) -> Vec<u32> {
    queue_depths(broker.config())
        .await
        .expect("queue depths")
        .retry
        .into_iter()
        .map(|(_, n)| n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_tiers_really_delay() {
    let Some(broker) = common::connect(common::config("tiers")).await else {
        return;
    };
    broker
        .publish(OutgoingMessage::new("t").with_message_id("t"))
        .await
        .expect("publish");
    let d = must_next(&broker, &caps()).await;

    // 1 s rounds up to the 2 s tier, and waits there.
    let start = Instant::now();
    broker
        .retry_later(&d, Duration::from_secs(1), 1)
        .await
        .expect("retry_later");
    let depths = retry_depths(&broker).await;
    // The copy sits in the 2 s tier until its TTL ends: a read that took
    // longer (a stalled machine) may find it gone already.
    if start.elapsed() < LONG_TIER {
        assert_eq!(depths, [0, 1]);
    }
    let early = LONG_TIER - Duration::from_millis(300);
    let remaining = early.saturating_sub(start.elapsed());
    assert!(
        timeout(remaining, broker.next()).await.is_err(),
        "the copy came back before its 2 s tier"
    );
    let copy = timeout(LONG_TIER + caps().arrival, broker.next())
        .await
        .expect("the copy came back")
        .expect("next")
        .expect("a delivery");
    assert!(start.elapsed() + Duration::from_millis(50) >= LONG_TIER);
    assert_eq!((id(&copy), copy.retry_attempt()), ("t", 1));
    // Went through a TTL queue: RabbitMQ's x-death is there, as a string form.
    assert!(
        copy.header("x-death")
            .and_then(HeaderValue::as_str)
            .is_some()
    );

    // A delay beyond every tier is capped at the longest; a short one goes
    // to the shortest, and comes back first. Which queue each copy waited
    // in is in its x-death header, however slow the machine; the depths and
    // the order are checked whenever the time that passed allows them.
    let config = broker.config().clone();
    let (short_queue, long_queue) = (
        config.retry_queue(SHORT_TIER),
        config.retry_queue(LONG_TIER),
    );
    let long_sent = Instant::now();
    broker
        .retry_later(&copy, Duration::from_secs(3600), 2)
        .await
        .expect("retry_later");
    broker
        .publish(OutgoingMessage::new("s").with_message_id("s"))
        .await
        .expect("publish");
    let s = must_next(&broker, &caps()).await;
    let short_sent = Instant::now();
    broker
        .retry_later(&s, Duration::from_millis(1), 1)
        .await
        .expect("retry_later");
    let depths = retry_depths(&broker).await;
    if short_sent.elapsed() < SHORT_TIER {
        assert_eq!(depths, [1, 1]);
    }
    // The short copy is due SHORT_TIER after it was sent, the long one
    // LONG_TIER after its own send: the short one first, unless the two
    // sends were that far apart.
    let short_first = short_sent - long_sent + SHORT_TIER < LONG_TIER - Duration::from_millis(300);
    let first = must_next(&broker, &caps()).await;
    broker.ack(&first).await.expect("ack");
    let second = must_next(&broker, &caps()).await;
    broker.ack(&second).await.expect("ack");
    if short_first {
        assert_eq!(id(&first), "s", "the short tier's copy is not held up");
    }
    let (short_copy, long_copy) = if id(&first) == "s" {
        (&first, &second)
    } else {
        (&second, &first)
    };
    assert_eq!((id(short_copy), short_copy.retry_attempt()), ("s", 1));
    assert_eq!((id(long_copy), long_copy.retry_attempt()), ("t", 2));
    let waited_in = |d: &Delivery, queue: &str| {
        d.header("x-death")
            .and_then(HeaderValue::as_str)
            .is_some_and(|deaths| deaths.contains(&format!("\"queue\": \"{queue}\"")))
    };
    assert!(waited_in(short_copy, &short_queue), "{short_copy:?}");
    assert!(!waited_in(short_copy, &long_queue), "{short_copy:?}");
    assert!(waited_in(long_copy, &long_queue), "{long_copy:?}");
    assert!(!waited_in(long_copy, &short_queue), "{long_copy:?}");
    expect_quiet(&broker, &caps()).await;
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_arrive_with_their_headers() {
    let Some(broker) = common::connect(common::config("dead")).await else {
        return;
    };
    broker
        .publish(
            OutgoingMessage::new("poison")
                .with_message_id("p")
                .with_header("x-tenant", "acme")
                .with_header("x-bin", HeaderValue::Bytes(vec![0, 159, 146, 150])),
        )
        .await
        .expect("publish");
    let d = must_next(&broker, &caps()).await;
    broker.retry_later(&d, SHORT_TIER, 1).await.expect("retry");
    let copy = must_next(&broker, &caps()).await;
    let first_failure = copy
        .header(headers::FIRST_FAILURE_MS)
        .and_then(HeaderValue::as_i64)
        .expect("first failure");
    let letter = DeadLetter::new(DeadReason::MaxAttempts, "gave up", 5);
    broker
        .dead_letter(&copy, &letter)
        .await
        .expect("dead_letter");
    expect_quiet(&broker, &caps()).await;

    let dead = broker
        .next_dead_letter()
        .await
        .expect("dlq")
        .expect("a dead letter");
    let h = |name: &str| dead.header(name).cloned();
    assert_eq!((id(&dead), &dead.body[..]), ("p", &b"poison"[..]));
    assert_eq!(h("x-tenant"), Some("acme".into()));
    assert_eq!(h("x-bin"), Some(HeaderValue::Bytes(vec![0, 159, 146, 150])));
    assert_eq!(h(headers::REASON), Some("max-attempts".into()));
    assert_eq!(h(headers::DETAIL), Some("gave up".into()));
    assert_eq!(h(headers::ATTEMPTS).and_then(|v| v.as_i64()), Some(5));
    assert_eq!(h(headers::ATTEMPT).and_then(|v| v.as_i64()), Some(1));
    assert_eq!(
        h(headers::ORIGINAL_QUEUE),
        Some(broker.config().queue().into())
    );
    assert_eq!(
        h(headers::FIRST_FAILURE_MS).and_then(|v| v.as_i64()),
        Some(first_failure),
        "the first failure time of the retry is kept"
    );
    let dead_at = h(headers::DEAD_AT_MS).and_then(|v| v.as_i64());
    assert!(dead_at.is_some_and(|t| t >= first_failure));
    assert!(
        dead.delivery_count.is_none(),
        "classic queues keep no count"
    );

    // A dead letter nacked with requeue stays in the dead-letter queue.
    broker.nack(&dead, true).await.expect("nack");
    let again = broker
        .next_dead_letter()
        .await
        .expect("dlq")
        .expect("the dead letter again");
    assert!(again.redelivered);
    assert_eq!(id(&again), "p");
    broker.ack(&again).await.expect("ack");
    assert!(broker.next_dead_letter().await.expect("dlq").is_none());
    let depths = queue_depths(broker.config()).await.expect("depths");
    assert_eq!((depths.work, depths.dead), (0, 0));
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_count_deliveries() {
    let config = common::config("quorum-count").with_queue_type(QueueType::Quorum);
    let Some(broker) = common::connect(config).await else {
        return;
    };
    broker
        .publish(OutgoingMessage::new("q").with_message_id("q"))
        .await
        .expect("publish");
    let mut counts = Vec::new();
    let mut d = must_next(&broker, &caps()).await;
    for _ in 0..2 {
        counts.push(d.delivery_count);
        broker.nack(&d, true).await.expect("nack");
        d = must_next(&broker, &caps()).await;
        assert!(d.redelivered);
    }
    counts.push(d.delivery_count);
    assert_eq!(counts, [Some(0), Some(1), Some(2)]);

    // A retried copy is a new message: its count starts again.
    broker.retry_later(&d, SHORT_TIER, 1).await.expect("retry");
    let copy = must_next(&broker, &caps()).await;
    assert_eq!((id(&copy), copy.delivery_count), ("q", Some(0)));
    assert!(copy.header("x-delivery-count").is_none());
    broker.ack(&copy).await.expect("ack");
    expect_quiet(&broker, &caps()).await;
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_twice_or_elsewhere_is_an_error() {
    let Some(broker) = common::connect(common::config("twice")).await else {
        return;
    };
    broker
        .publish(OutgoingMessage::new("x").with_message_id("x"))
        .await
        .expect("publish");
    let d = must_next(&broker, &caps()).await;
    broker.ack(&d).await.expect("ack");
    for second in [
        broker.ack(&d).await,
        broker.nack(&d, true).await,
        broker.retry_later(&d, SHORT_TIER, 1).await,
    ] {
        assert!(
            matches!(second, Err(Error::StaleDelivery { .. })),
            "{second:?}"
        );
    }
    // No copy was published for the stale retry.
    expect_quiet(&broker, &caps()).await;
    assert_eq!(retry_depths(&broker).await, [0, 0]);

    let foreign = Delivery::new(1, "x");
    assert!(matches!(
        broker.ack(&foreign).await,
        Err(Error::InvalidInput { .. })
    ));
    // The consumer channel survived all that (no double ack reached the
    // broker, which would have closed it).
    broker
        .publish(OutgoingMessage::new("y").with_message_id("y"))
        .await
        .expect("publish");
    let y = must_next(&broker, &caps()).await;
    broker.ack(&y).await.expect("ack");
    assert_eq!(broker.generation(), Some(1));
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_generates_ids_and_reports_unroutable_messages() {
    let config = common::config("publisher");
    let publisher = match RabbitPublisher::connect(config.clone()).await {
        Ok(p) => p,
        Err(e) => {
            let _: Option<()> = idemq::testing::service_unavailable("rabbitmq", e);
            return;
        }
    };
    // Nothing declared yet: the message has no queue to go to.
    let lost = publisher.publish(OutgoingMessage::new("early")).await;
    assert!(matches!(lost, Err(Error::Unroutable { .. })), "{lost:?}");

    publisher.declare_topology().await.expect("declare");
    let generated = publisher
        .publish_with_id(OutgoingMessage::new("one").with_header("x-n", 1i64))
        .await
        .expect("publish");
    let given = publisher
        .publish_with_id(OutgoingMessage::new("two").with_message_id("given"))
        .await
        .expect("publish");
    assert_eq!(given, "given");
    publisher
        .publish(OutgoingMessage::new("three"))
        .await
        .expect("publish");

    let broker = common::connect(config).await.expect("broker");
    let one = must_next(&broker, &caps()).await;
    assert_eq!(one.message_id.as_deref(), Some(generated.as_str()));
    assert_eq!(one.header("x-n"), Some(&HeaderValue::Int(1)));
    let two = must_next(&broker, &caps()).await;
    assert_eq!(id(&two), "given");
    let three = must_next(&broker, &caps()).await;
    assert_eq!(three.message_id, None, "publish never makes up an id");
    for d in [&one, &two, &three] {
        broker.ack(d).await.expect("ack");
    }
    publisher.close().await;
    assert!(matches!(
        publisher.publish(OutgoingMessage::new("late")).await,
        Err(Error::Closed { .. })
    ));
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_idempotent_and_conflicts_are_reported() {
    let config = common::config("topology");
    let Some(first) = common::connect(config.clone()).await else {
        return;
    };
    // Declaring the same topology again is fine.
    let second = common::connect(config.clone())
        .await
        .expect("second broker");
    second.close().await;

    // The same queues declared as quorum queues conflict.
    let conflicting =
        RabbitBroker::connect(config.clone().with_queue_type(QueueType::Quorum)).await;
    match conflicting {
        Err(Error::Config(why)) => assert!(why.contains(config.queue()), "{why}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    // Other tiers are other queues: no conflict.
    let other_tiers = config.clone().with_retry_tiers([Duration::from_secs(7)]);
    let third = common::connect(other_tiers.clone())
        .await
        .expect("third broker");
    third.close().await;
    idemq_rabbitmq::delete_topology(&other_tiers)
        .await
        .expect("delete");
    common::cleanup(first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_consumption_and_hides_the_password() {
    let Some(broker) = common::connect(common::config("close")).await else {
        return;
    };
    let shown = format!("{broker:?}");
    assert!(!shown.contains(":guest@"), "{shown}");
    assert!(broker.is_connected());
    let config = broker.config().clone();
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.next().await })
    };
    broker.close().await;
    let ended = timeout(caps().arrival, waiting)
        .await
        .expect("next returned")
        .expect("task");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert!(matches!(broker.next().await, Ok(None)));
    assert!(!broker.is_connected() && broker.generation().is_none());
    assert!(matches!(
        broker.publish(OutgoingMessage::new("late")).await,
        Err(Error::Closed { .. })
    ));
    idemq_rabbitmq::delete_topology(&config)
        .await
        .expect("delete");
}

#[tokio::test]
async fn unreachable_server_fails_fast_without_leaking_the_password() {
    // A port nothing listens on.
    let config = idemq_rabbitmq::RabbitConfig::new("amqp://user:s3cret@127.0.0.1:1/%2f", "q")
        .with_connect_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let err = RabbitBroker::connect(config)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!err.to_string().contains("s3cret") && !format!("{err:?}").contains("s3cret"));
}
