//! idemq in one file, with no services: the in-memory broker and store.
//!
//! Publishes a few thousand orders, a tenth of them twice or more (the
//! at-least-once duplicates a real broker produces), some that fail a few
//! times before succeeding, and some that can never succeed; then consumes
//! them with four concurrent engines and prints what happened.
//!
//! Run it with `cargo run --example quickstart`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::{
    Backoff, Broker, CancellationToken, Engine, HandlerError, Message, OutgoingMessage, Report,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Order {
    id: u32,
    amount_cents: u64,
}

const ORDERS: u32 = 3000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new("orders");
    let store = MemoryDedupStore::new();

    // Produce: every order has a stable message id; every tenth goes out twice
    // (and every fiftieth three times), as redeliveries and producer retries do.
    let mut published = 0;
    for id in 0..ORDERS {
        let copies = 1 + u32::from(id % 10 == 0) + u32::from(id % 50 == 0);
        for _ in 0..copies {
            let body = serde_json::to_vec(&Order {
                id,
                amount_cents: u64::from(id) * 100,
            })?;
            broker
                .publish(OutgoingMessage::new(body).with_message_id(format!("order-{id}")))
                .await?;
            published += 1;
        }
    }
    println!("published {published} messages for {ORDERS} orders");

    // The "side effect": money charged per order. It must happen once.
    let charged: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let shutdown = CancellationToken::new();
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let charged = charged.clone();
        let handler = idemq::json(move |order: Order, msg: Message| {
            let charged = charged.clone();
            async move {
                if order.id.is_multiple_of(97) {
                    // A bug no retry can fix: straight to the dead-letter queue.
                    return Err(HandlerError::permanent("amount fails validation"));
                }
                if order.id.is_multiple_of(13) && msg.attempt() < 3 {
                    // The payment provider timed out: try again later.
                    return Err(HandlerError::retry("payment provider timeout"));
                }
                *charged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(order.id)
                    .or_default() += 1;
                Ok(())
            }
        });
        let engine = Engine::builder(broker.clone(), store.clone(), handler)
            .scope("orders")
            .concurrency(32)
            .retry_backoff(Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(50),
            ))
            .build()?;
        consumers.push(tokio::spawn(engine.run(shutdown.clone())));
    }
    // Stop each consumer once every message is settled.
    broker.close_when_idle();

    let mut total = Report::default();
    for consumer in consumers {
        let report = consumer.await?;
        total.merge(&report);
        total.stopped = report.stopped; // the same for all four: broker closed
    }

    let charged = charged.lock().unwrap_or_else(|p| p.into_inner());
    let charged_twice = charged.values().filter(|n| **n > 1).count();
    let dead = broker.dead_letters();
    println!("{total}");
    if let Some(first) = dead.first() {
        let reason = first
            .header(idemq::headers::REASON)
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        println!(
            "first dead letter: {} ({reason})",
            first.message_id.as_deref().unwrap_or("?")
        );
    }
    println!(
        "orders charged: {} (charged twice: {charged_twice})",
        charged.len()
    );

    let expected_dead = (0..ORDERS).filter(|id| id % 97 == 0).count();
    let ok = charged_twice == 0
        && charged.len() + expected_dead == ORDERS as usize
        && dead.len() == expected_dead;
    if !ok {
        return Err("some order was charged twice or lost".into());
    }
    println!("every order charged exactly once or dead-lettered: ok");
    Ok(())
}
