//! The engine on RabbitMQ with Postgres as the dedup store, in
//! transactional mode: the handler's own write (a row in a `charges` table
//! with no unique constraint) and the done mark commit in one transaction,
//! so every order is charged exactly once even across retries, crashes and
//! duplicates.
//!
//! Publishes a demo batch to a fresh queue, consumes it, checks the
//! `charges` table, deletes its queues and exits (or stops gracefully on
//! Ctrl-C). `cargo run -p idemq-e2e --example rabbitmq_postgres` with RabbitMQ at
//! `AMQP_ADDR` and Postgres at `DATABASE_URL` (defaults: the local servers).

use std::collections::HashMap;
use std::time::Duration;

use idemq::{
    Broker, CancellationToken, Coalescing, Engine, HandlerError, Message, OutgoingMessage, headers,
};
use idemq_postgres::sqlx::{self, PgConnection};
use idemq_postgres::{PostgresDedupStore, sql_error};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, RabbitPublisher, delete_topology};

const ORDERS: i64 = 500;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let run = format!("{:08x}", rand::random::<u32>());
    let queue = format!("idemq-demo.pg.{run}");
    let config = RabbitConfig::from_env(&queue)
        .with_retry_tiers([Duration::from_millis(200), Duration::from_secs(1)]);
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = PostgresDedupStore::connect(&db_url).await?;
    store.migrate().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS idemq_demo_charges (
             run text NOT NULL, order_id bigint NOT NULL, cents bigint NOT NULL,
             charged_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(store.pool())
    .await?;
    let broker = RabbitBroker::connect(config.clone()).await?;
    println!(
        "queue {queue} at {}; dedup in {store:?}",
        config.redacted_url()
    );

    let publisher = RabbitPublisher::connect(config.clone()).await?;
    let mut published = 0;
    for id in 0..ORDERS {
        let body = format!(r#"{{"id":{id},"cents":{}}}"#, 100 + id);
        for _ in 0..(1 + i64::from(id % 10 == 0)) {
            publisher
                .publish(OutgoingMessage::new(body.clone()).with_message_id(format!("order-{id}")))
                .await?;
            published += 1;
        }
    }
    publisher.close().await;
    println!("published {published} messages for {ORDERS} orders");

    let handler = {
        let run = run.clone();
        store.transactional(move |tx: &mut PgConnection, msg: Message| {
            let run = run.clone();
            Box::pin(async move {
                #[derive(serde::Deserialize)]
                struct Order {
                    id: i64,
                    cents: i64,
                }
                let order: Order = msg.json()?;
                if order.id % 50 == 7 {
                    return Err(HandlerError::permanent("card declined for good"));
                }
                sqlx::query(
                    "INSERT INTO idemq_demo_charges (run, order_id, cents) VALUES ($1, $2, $3)",
                )
                .bind(&run)
                .bind(order.id)
                .bind(order.cents)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
                if order.id % 20 == 3 && msg.attempt() == 1 {
                    // Fails after its write: the write rolls back with it.
                    return Err(HandlerError::retry("payment gateway timeout"));
                }
                Ok(())
            })
        })
    };
    // Concurrent claims go out as one statement per batch (completions are
    // written by the transactional handler itself).
    let engine = Engine::builder(broker.clone(), Coalescing::new(store.clone()), handler)
        .scope(format!("demo-pg-{run}"))
        .concurrency(32)
        .keep_for(Duration::from_secs(600))
        .retry_backoff(idemq::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(1),
        ))
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));

    let poison = (0..ORDERS).filter(|id| id % 50 == 7).count() as i64;
    let watch = {
        let (pool, config, shutdown, run) = (
            store.pool().clone(),
            config.clone(),
            shutdown.clone(),
            run.clone(),
        );
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let charged: i64 = sqlx::query_scalar(
                    "SELECT count(DISTINCT order_id) FROM idemq_demo_charges WHERE run = $1",
                )
                .bind(&run)
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                let dead = idemq_rabbitmq::queue_depths(&config)
                    .await
                    .map(|d| i64::from(d.dead))
                    .unwrap_or(0);
                if charged + dead >= ORDERS && dead >= poison {
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
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT order_id) FROM idemq_demo_charges WHERE run = $1",
    )
    .bind(&run)
    .fetch_one(store.pool())
    .await?;
    println!("charges table: {rows} rows for {distinct} orders (run {run})");
    broker.close().await;
    delete_topology(&config).await?;
    if rows != distinct {
        return Err("an order was charged twice".into());
    }
    Ok(())
}
