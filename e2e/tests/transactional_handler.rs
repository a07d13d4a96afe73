//! The README's "testing a transactional handler" example, run for real:
//! the in-memory broker, the Postgres store, a handler whose write and
//! done mark commit together. A duplicate delivery and a failure after
//! the write still leave exactly one row per order.

use std::time::Duration;

use idemq::memory::MemoryBroker;
use idemq::testing::{service_unavailable, unique_scope};
use idemq::{Backoff, Broker, Engine, HandlerError, Message, OutgoingMessage};
use idemq_postgres::sqlx::{self, PgConnection};
use idemq_postgres::{PostgresDedupStore, sql_error};

#[tokio::test]
async fn a_duplicate_and_a_failure_after_the_write_leave_one_row_each() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = match PostgresDedupStore::connect(&url).await {
        Ok(store) => store,
        Err(e) => return service_unavailable("postgres", e).unwrap_or(()),
    };
    store.migrate().await.expect("migrate");
    let run = unique_scope("tx-readme");
    sqlx::query("CREATE TABLE IF NOT EXISTS readme_charges (run text, order_id text)")
        .execute(store.pool())
        .await
        .expect("table");

    let broker = MemoryBroker::new("orders");
    for id in ["o-1", "o-2", "o-1"] {
        let message = OutgoingMessage::new("{}").with_message_id(id);
        broker.publish(message).await.expect("publish");
    }
    broker.close_when_idle();
    let handler = {
        let run = run.clone();
        store.transactional(move |tx: &mut PgConnection, msg: Message| {
            let run = run.clone();
            Box::pin(async move {
                sqlx::query("INSERT INTO readme_charges (run, order_id) VALUES ($1, $2)")
                    .bind(&run)
                    .bind(msg.key())
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
                if msg.key() == "o-2" && msg.attempt() == 1 {
                    // After the write: it rolls back with the attempt.
                    return Err(HandlerError::retry("gateway timeout"));
                }
                Ok(())
            })
        })
    };
    let report = Engine::builder(broker, store.clone(), handler)
        .scope(run.clone())
        .retry_backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .expect("engine")
        .run(Default::default())
        .await;
    assert_eq!(
        (report.handled, report.duplicates, report.retried),
        (2, 1, 1)
    );
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT order_id, count(*) FROM readme_charges WHERE run = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(&run)
    .fetch_all(store.pool())
    .await
    .expect("rows");
    assert_eq!(rows, [("o-1".to_owned(), 1), ("o-2".to_owned(), 1)]);
    sqlx::query("DELETE FROM readme_charges WHERE run = $1")
        .bind(&run)
        .execute(store.pool())
        .await
        .expect("clean up");
}
