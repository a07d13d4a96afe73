//! Pausing and restarting the consumer while callers give up on `next`
//! (the engine drops it whenever its store gate closes) hands out every
//! message and acks none that was not handed out.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use idemq::{Broker, OutgoingMessage};
use idemq_rabbitmq::queue_depths;
use tokio::time::{Instant, timeout};

/// Each round pauses the consumer, then drops a `next` after 0 to 3 ms,
/// often while it is restarting the consumer, then handles a few
/// deliveries. Every message must be handed out, and once all are acked
/// the queue is empty. Before consumer changes ran to completion on
/// their own, a dropped restart left a consumer running at the broker
/// that nobody read, and the batched multiple acks of the next consumer
/// acked its deliveries: messages vanished without being handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_dropped_while_the_consumer_restarts_loses_nothing() {
    const N: usize = 400;
    let config = common::config("pause-dropped-next");
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    for i in 0..N {
        broker
            .publish(OutgoingMessage::new("m").with_message_id(format!("m-{i}")))
            .await
            .expect("publish");
    }
    let mut handed_out = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round: u64 = 0;
    while handed_out.len() < N && Instant::now() < deadline {
        round += 1;
        broker.pause().await.expect("pause");
        let cut = Duration::from_micros(round * 7919 % 3000);
        let mut taken = Vec::new();
        if let Ok(next) = timeout(cut, broker.next()).await {
            taken.push(next.expect("next").expect("open"));
        }
        for _ in 0..4 {
            match timeout(Duration::from_millis(500), broker.next()).await {
                Ok(next) => taken.push(next.expect("next").expect("open")),
                Err(_) => break,
            }
        }
        for d in taken {
            handed_out.insert(d.message_id.clone().expect("message id"));
            broker.ack(&d).await.expect("ack");
        }
    }
    broker.close().await;
    assert_eq!(
        handed_out.len(),
        N,
        "messages never handed out after {round} rounds"
    );
    let depths = queue_depths(&config).await.expect("depths");
    assert_eq!(depths.work, 0, "every message was acked");
    common::cleanup(common::connect(config).await.expect("reconnect")).await;
}
