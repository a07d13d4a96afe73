//! The engine on RabbitMQ with Redis as the dedup store.
//!
//! Publishes a demo batch to a fresh queue (orders, a tenth of them twice,
//! some that fail once, some that can never succeed), consumes it, prints
//! what happened and the dead letters' reasons, deletes its queues and exits
//! (or stops gracefully on Ctrl-C).
//!
//! `cargo run -p idemq-e2e --example rabbitmq_redis` with RabbitMQ at `AMQP_ADDR` and
//! Redis at `REDIS_URL` (defaults: the local servers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::{
    Broker, CancellationToken, Engine, HandlerError, HandlerResultExt, Message, OutgoingMessage,
    headers,
};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, RabbitPublisher, delete_topology};
use idemq_redis::RedisDedupStore;

const ORDERS: u32 = 500;

#[derive(serde::Deserialize)]
struct Order {
    id: u32,
    cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = format!("idemq-demo.redis.{:08x}", rand::random::<u32>());
    // Short retry tiers so the demo's retries come back within a second.
    let config = RabbitConfig::from_env(&queue)
        .with_retry_tiers([Duration::from_millis(200), Duration::from_secs(1)]);
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // The store batches concurrent claims and completions by itself (one
    // script call of each kind in flight): no wrapper needed.
    let store = RedisDedupStore::connect(&redis_url).await?;
    let broker = RabbitBroker::connect(config.clone()).await?;
    println!(
        "queue {queue} at {}; dedup in {store:?}",
        config.redacted_url()
    );

    let publisher = RabbitPublisher::connect(config.clone()).await?;
    let mut published = 0;
    for id in 0..ORDERS {
        let body = format!(r#"{{"id":{id},"cents":{}}}"#, 100 + id);
        for _ in 0..(1 + u32::from(id % 10 == 0)) {
            publisher
                .publish(OutgoingMessage::new(body.clone()).with_message_id(format!("order-{id}")))
                .await?;
            published += 1;
        }
    }
    publisher.close().await;
    println!("published {published} messages for {ORDERS} orders");

    let charged: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let handler = {
        let charged = charged.clone();
        idemq::json(move |order: Order, msg: Message| {
            let charged = charged.clone();
            async move {
                if order.id % 50 == 7 {
                    return Err(HandlerError::permanent("card declined for good"));
                }
                if order.id % 20 == 3 && msg.attempt() == 1 {
                    return Err(HandlerError::retry("payment gateway timeout"));
                }
                let _ = order.cents; // charge the card here
                let mut charged = charged.lock().map_err(|e| e.to_string()).retryable()?;
                *charged.entry(order.id).or_default() += 1;
                Ok(())
            }
        })
    };
    let engine = Engine::builder(broker.clone(), store, handler)
        .scope(format!("demo-{queue}").replace("idemq-demo.", ""))
        .concurrency(32)
        .keep_for(Duration::from_secs(600)) // a demo: its records need not stay a day
        .retry_backoff(idemq::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(1),
        ))
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));

    // Done when every order is charged or dead-lettered (or on Ctrl-C).
    let poison = (0..ORDERS).filter(|id| id % 50 == 7).count();
    let watch = {
        let (charged, config, shutdown) = (charged.clone(), config.clone(), shutdown.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let done = charged.lock().map(|c| c.len()).unwrap_or(0);
                let dead = idemq_rabbitmq::queue_depths(&config)
                    .await
                    .map(|d| d.dead as usize)
                    .unwrap_or(0);
                if done + dead >= ORDERS as usize && dead >= poison {
                    break;
                }
            }
            shutdown.cancel();
        }
    };
    tokio::select! {
        _ = watch => {}
        _ = tokio::signal::ctrl_c() => { println!("Ctrl-C: shutting down gracefully"); shutdown.cancel(); }
    }
    let report = running.await?;

    println!("{report}");
    let mut reasons: HashMap<String, usize> = HashMap::new();
    while let Some(dead) = broker.next_dead_letter().await? {
        let reason = dead
            .header(headers::REASON)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned();
        *reasons.entry(reason).or_default() += 1;
        broker.ack(&dead).await?;
    }
    println!("dead letters by reason: {reasons:?}");
    let twice = charged
        .lock()
        .map(|c| c.values().filter(|n| **n > 1).count())
        .unwrap_or(0);
    println!(
        "orders charged: {} (charged twice: {twice})",
        charged.lock().map(|c| c.len()).unwrap_or(0)
    );
    broker.close().await;
    delete_topology(&config).await?;
    if twice > 0 {
        return Err("an order was charged twice".into());
    }
    Ok(())
}
