//! The baselines: the smallest hand-written concurrent lapin consumers
//! doing the same dedup work as the engine by hand, to compare against.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use idemq::BoxError;
use idemq_postgres::sqlx::{self, PgPool};
use idemq_redis::redis::{self, aio::ConnectionManager};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use crate::counting::Meter;

/// The dedup work a baseline does per delivery.
#[derive(Clone)]
pub enum Work {
    /// None: consume and ack.
    Bare,
    /// `SET key 1 NX PX lease`, then on success `SET key done PX keep`.
    Redis {
        /// The connection (multiplexed).
        conn: ConnectionManager,
        /// Prepended to every message id.
        prefix: String,
    },
    /// `INSERT ... ON CONFLICT DO NOTHING`, then on success `UPDATE`.
    Postgres {
        /// The pool (same settings as the store's).
        pool: PgPool,
        /// Prepended to every message id.
        prefix: String,
    },
}

/// What a baseline run counted.
#[derive(Debug, Default)]
pub struct Counts {
    /// Messages whose dedup record this consumer created (the "handled" ones).
    pub handled: AtomicU64,
    /// Deliveries whose key was already there.
    pub duplicates: AtomicU64,
    /// Failing messages rejected without requeue.
    pub rejected: AtomicU64,
    /// Commands sent to the store.
    pub round_trips: AtomicU64,
    /// Work or ack errors (the delivery is requeued).
    pub errors: AtomicU64,
}

/// Creates the Postgres baseline's table (idempotent).
pub async fn prepare_postgres(pool: &PgPool) -> Result<(), BoxError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS idemq_bench_baseline (\
         key text PRIMARY KEY, state text NOT NULL, expires_at timestamptz NOT NULL)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes the Postgres baseline's rows of one run.
pub async fn cleanup_postgres(pool: &PgPool, prefix: &str) -> Result<(), BoxError> {
    sqlx::query("DELETE FROM idemq_bench_baseline WHERE key LIKE $1")
        .bind(format!("{prefix}%"))
        .execute(pool)
        .await?;
    Ok(())
}

/// Where a baseline consumes from, and its record lifetimes.
pub struct Source<'a> {
    /// RabbitMQ URL.
    pub amqp_url: &'a str,
    /// The queue.
    pub queue: &'a str,
    /// Deliveries in flight at most.
    pub prefetch: u16,
    /// TTL of a claim record.
    pub lease: Duration,
    /// TTL of a done record.
    pub keep: Duration,
}

/// Consumes `queue` with `prefetch` deliveries in flight, one task per
/// delivery, doing `work` and acking, until `meter` has seen every
/// expected settlement or `stop` is cancelled. Messages whose id starts
/// with `fail-` are rejected without requeue after the claim.
pub async fn run(
    source: Source<'_>,
    work: Work,
    meter: Arc<Meter>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Arc<Counts>, BoxError> {
    let Source {
        amqp_url,
        queue,
        prefetch,
        lease,
        keep,
    } = source;
    let conn = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "idemq-bench-baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let counts = Arc::new(Counts::default());
    let lease_ms = lease.as_millis() as u64;
    let keep_ms = keep.as_millis() as u64;
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => break,
        };
        let since = meter.received();
        let work = work.clone();
        let counts = counts.clone();
        let meter = meter.clone();
        tokio::spawn(async move {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            let outcome = do_work(&work, &id, lease_ms, keep_ms, &counts).await;
            let settled = match outcome {
                Ok(true) if id.starts_with("fail-") => {
                    counts.rejected.fetch_add(1, Ordering::Relaxed);
                    delivery
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                        .map(drop)
                }
                Ok(_) => delivery.ack(BasicAckOptions::default()).await.map(drop),
                Err(e) => {
                    eprintln!("baseline: {e}");
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    let _ = delivery.reject(BasicRejectOptions { requeue: true }).await;
                    return;
                }
            };
            match settled {
                Ok(()) => meter.settle(since),
                Err(e) => {
                    eprintln!("baseline: settle: {e}");
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Let settlements in flight finish before closing.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = channel.close(200, "bench done".into()).await;
    let _ = conn.close(200, "bench done".into()).await;
    Ok(counts)
}

/// Does the dedup work for one delivery; answers whether this consumer
/// created the record (true) or found it there (false).
async fn do_work(
    work: &Work,
    id: &str,
    lease_ms: u64,
    keep_ms: u64,
    counts: &Counts,
) -> Result<bool, BoxError> {
    let won = match work {
        Work::Bare => true,
        Work::Redis { conn, prefix } => {
            let mut conn = conn.clone();
            let key = format!("{prefix}{id}");
            counts.round_trips.fetch_add(1, Ordering::Relaxed);
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg("1")
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query_async(&mut conn)
                .await?;
            if set.is_some() && !id.starts_with("fail-") {
                counts.round_trips.fetch_add(1, Ordering::Relaxed);
                let () = redis::cmd("SET")
                    .arg(&key)
                    .arg("done")
                    .arg("PX")
                    .arg(keep_ms)
                    .query_async(&mut conn)
                    .await?;
            }
            set.is_some()
        }
        Work::Postgres { pool, prefix } => {
            let key = format!("{prefix}{id}");
            counts.round_trips.fetch_add(1, Ordering::Relaxed);
            let inserted = sqlx::query(
                "INSERT INTO idemq_bench_baseline (key, state, expires_at) \
                 VALUES ($1, 'claimed', now() + make_interval(secs => $2::float8 / 1000)) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&key)
            .bind(lease_ms as f64)
            .execute(pool)
            .await?
            .rows_affected()
                == 1;
            if inserted && !id.starts_with("fail-") {
                counts.round_trips.fetch_add(1, Ordering::Relaxed);
                sqlx::query(
                    "UPDATE idemq_bench_baseline SET state = 'done', \
                     expires_at = now() + make_interval(secs => $2::float8 / 1000) WHERE key = $1",
                )
                .bind(&key)
                .bind(keep_ms as f64)
                .execute(pool)
                .await?;
            }
            inserted
        }
    };
    if won {
        if !id.starts_with("fail-") {
            counts.handled.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        counts.duplicates.fetch_add(1, Ordering::Relaxed);
    }
    Ok(won)
}
