//! Publishes demo orders to RabbitMQ: persistent, with publisher confirms,
//! every order with a stable `message_id`, every tenth published twice (as
//! a producer that retries after a lost confirm would).
//!
//! `cargo run -p idemq-e2e --example producer -- [COUNT]` (default 1000) publishes to the
//! queue `IDEMQ_QUEUE` (default `idemq-demo.orders`) at `AMQP_ADDR`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`), declaring it and its
//! retry and dead-letter queues first.

use idemq::OutgoingMessage;
use idemq_rabbitmq::{RabbitConfig, RabbitPublisher};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: u32 = match std::env::args().nth(1) {
        Some(n) => n
            .parse()
            .map_err(|e| format!("COUNT must be a number: {e}"))?,
        None => 1000,
    };
    let queue = std::env::var("IDEMQ_QUEUE").unwrap_or_else(|_| "idemq-demo.orders".into());
    let config = RabbitConfig::from_env(&queue);
    println!(
        "publishing {count} orders to {queue} at {}",
        config.redacted_url()
    );
    let publisher = RabbitPublisher::connect(config).await?;
    publisher.declare_topology().await?;
    let mut sent = 0;
    for id in 0..count {
        let body = format!(r#"{{"id":{id},"cents":{}}}"#, 100 + id);
        let copies = if id % 10 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            publisher
                .publish(OutgoingMessage::new(body.clone()).with_message_id(format!("order-{id}")))
                .await?;
            sent += 1;
        }
    }
    publisher.close().await;
    println!(
        "published {sent} messages ({} duplicates), all confirmed",
        sent - count
    );
    Ok(())
}
