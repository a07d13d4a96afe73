//! Ack batching: acks settled out of order all reach RabbitMQ (as multiple
//! acks where they can), an unsettled delivery holds the others back for
//! at most the ack delay, and a settled delivery cannot be settled again.

mod common;

use std::time::Duration;

use idemq::testing::broker::{BrokerCaps, must_next};
use idemq::{Broker, Delivery, Error, OutgoingMessage};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, queue_depths};
use rand::seq::SliceRandom;

async fn publish(broker: &RabbitBroker, n: usize) {
    for i in 0..n {
        broker
            .publish(OutgoingMessage::new("a").with_message_id(format!("a{i}")))
            .await
            .expect("publish");
    }
}

async fn take(broker: &RabbitBroker, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(must_next(broker, &BrokerCaps::default()).await);
    }
    out
}

/// Closes `broker` (unacked deliveries go back to the queue) and answers
/// how many messages the work queue then holds.
async fn left_after_close(broker: RabbitBroker, config: &RabbitConfig) -> u32 {
    broker.close().await;
    // The broker requeues a closed channel's unacked deliveries at once;
    // give the queue a moment to count them.
    let mut work = 0;
    for _ in 0..20 {
        work = queue_depths(config).await.expect("queue depths").work;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if work == queue_depths(config).await.expect("queue depths").work {
            break;
        }
    }
    work
}

/// Publishes ten messages, takes them, acks all but the oldest, waits
/// `pause`, closes: answers how many came back to the queue (1 when every
/// ack arrived). `None` when RabbitMQ is down (skip).
async fn ack_all_but_the_oldest(config: &RabbitConfig, pause: Duration) -> Option<u32> {
    let broker = common::connect(config.clone()).await?;
    publish(&broker, 10).await;
    let inflight = take(&broker, 10).await;
    for d in &inflight[1..] {
        broker.ack(d).await.expect("ack");
    }
    tokio::time::sleep(pause).await;
    let left = left_after_close(broker, config).await;
    cleanup(config).await;
    Some(left)
}

async fn cleanup(config: &RabbitConfig) {
    let broker = common::connect(config.clone()).await.expect("reconnect");
    common::cleanup(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_any_order_all_reach_the_broker() {
    let config = common::config("acks_order").with_prefetch(200);
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    publish(&broker, 200).await;
    let mut inflight = take(&broker, 200).await;
    inflight.shuffle(&mut rand::rng());
    // Settled from many tasks at once, in a random order.
    let broker = std::sync::Arc::new(broker);
    let tasks: Vec<_> = inflight
        .into_iter()
        .map(|d| {
            let broker = broker.clone();
            tokio::spawn(async move { broker.ack(&d).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("acker").expect("ack");
    }
    let broker = std::sync::Arc::into_inner(broker).expect("one owner left");
    assert_eq!(
        left_after_close(broker, &config).await,
        0,
        "every ack arrived"
    );
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_delivery_holds_later_acks_back_only_briefly() {
    // The oldest stays unsettled; the nine acks after it are held behind
    // it, and go out one by one once the 50 ms delay is over.
    let config = common::config("acks_hold")
        .with_prefetch(100)
        .with_ack_batching(Some(Duration::from_millis(50)));
    let Some(left) = ack_all_but_the_oldest(&config, Duration::from_millis(400)).await else {
        return;
    };
    assert_eq!(left, 1, "past the delay the held acks went out one by one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_between_acks_requeues_exactly_that_delivery() {
    let config = common::config("acks_nack").with_prefetch(100);
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    publish(&broker, 30).await;
    let inflight = take(&broker, 30).await;
    // Settle newest first: acks are held behind the older deliveries until
    // those settle; every tenth is nacked back to the queue in between.
    for (i, d) in inflight.iter().enumerate().rev() {
        if i % 10 == 5 {
            broker.nack(d, true).await.expect("nack");
        } else {
            broker.ack(d).await.expect("ack");
        }
    }
    let mut back: Vec<String> = Vec::new();
    for d in take(&broker, 3).await {
        assert!(d.redelivered);
        back.push(d.message_id.clone().unwrap_or_default());
        broker.ack(&d).await.expect("ack");
    }
    back.sort();
    assert_eq!(back, ["a15", "a25", "a5"]);
    assert_eq!(left_after_close(broker, &config).await, 0);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_delivery_cannot_be_settled_again() {
    let config = common::config("acks_twice").with_prefetch(100);
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    publish(&broker, 3).await;
    let inflight = take(&broker, 3).await;
    // Held (an older delivery is still open), then settled again: refused,
    // and the channel stays healthy.
    broker.ack(&inflight[1]).await.expect("ack");
    let again = broker.nack(&inflight[1], true).await;
    assert!(
        matches!(again, Err(Error::StaleDelivery { .. })),
        "{again:?}"
    );
    let again = broker.ack(&inflight[1]).await;
    assert!(
        matches!(again, Err(Error::StaleDelivery { .. })),
        "{again:?}"
    );
    broker.ack(&inflight[0]).await.expect("ack");
    broker.ack(&inflight[2]).await.expect("ack");
    publish(&broker, 1).await;
    let d = take(&broker, 1).await.remove(0);
    broker.ack(&d).await.expect("the channel still works");
    assert_eq!(left_after_close(broker, &config).await, 0);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_batching_every_ack_goes_out_alone() {
    let config = common::config("acks_off")
        .with_prefetch(100)
        .with_ack_batching(None);
    assert_eq!(config.ack_delay(), None);
    let Some(left) = ack_all_but_the_oldest(&config, Duration::ZERO).await else {
        return;
    };
    assert_eq!(left, 1, "no delay: the nine acks were out before the close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_writes_the_held_acks_first() {
    // A delay far longer than the test: only the close can send them.
    let config = common::config("acks_close")
        .with_prefetch(100)
        .with_ack_batching(Some(Duration::from_secs(60)));
    let Some(left) = ack_all_but_the_oldest(&config, Duration::ZERO).await else {
        return;
    };
    assert_eq!(
        left, 1,
        "the nine held acks went out before the channel closed"
    );
}
