//! `idemq bench-replay`: replay throughput with confirms, next to a bare
//! loop that moves the same number of dead letters in the same run with
//! `basic.get`, a confirmed publish and an ack, one message at a time.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use futures::StreamExt;
use idemq::key::normalize;
use idemq::{
    BoxError, Claim, ClaimTtl, DeadLetter, DeadReason, DedupStore, Delivery, Fenced, Replay,
    ReplayReport,
};
use idemq_rabbitmq::{RabbitConfig, RabbitDeadLetters, delete_topology, queue_depths, topology};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::store::{StoreKind, StoreOpts, open_store};
use crate::{Conn, Outcome};

/// `idemq bench-replay`'s options.
#[derive(Args, Debug)]
pub struct BenchReplayArgs {
    /// Dead letters moved by each of the two.
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// The dedup store the replay revives records in.
    #[arg(long, value_enum, default_value = "redis")]
    store: StoreKind,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    body_size: usize,
    /// The replay's window (store calls and unconfirmed copies in flight).
    #[arg(long, default_value_t = idemq::replay::DEFAULT_WINDOW)]
    window: usize,
    /// Writes the figures as JSON to stdout.
    #[arg(long)]
    json: bool,
}

const LONG: std::time::Duration = std::time::Duration::from_secs(3600);

/// Fills the dead-letter queue of a fresh topology with `n` dead letters
/// naming their records in `scope` (oldest first), published with
/// pipelined confirms.
async fn fill(
    conn: &Connection,
    config: &RabbitConfig,
    scope: &str,
    n: usize,
    body: &[u8],
) -> Result<(), BoxError> {
    topology::declare(config).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let dlq = config.dead_letter_queue();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("r{i}");
        let origin = Delivery::new(0, "").with_message_id(id.clone());
        let letter = DeadLetter::new(DeadReason::Permanent, "bench", 1)
            .with_record(scope, normalize(id.as_bytes()));
        let headers =
            idemq_rabbitmq::headers::to_field_table(&letter.headers_for(&origin, config.queue()))?;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_headers(headers);
        pending.push(
            ch.basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?,
        );
    }
    for p in pending {
        p.await?;
    }
    let _ = ch.close(200, "filled".into()).await;
    Ok(())
}

/// Buries the record of every id, as the engine leaves a dead message's.
async fn bury_all(store: &dyn DedupStore, scope: &str, n: usize) -> Result<(), BoxError> {
    let ttl = ClaimTtl {
        lease: LONG,
        retain: LONG,
    };
    let results: Vec<Result<(), BoxError>> = futures::stream::iter(0..n)
        .map(|i| async move {
            let key = normalize(format!("r{i}").as_bytes());
            match store.claim(scope, &key, ttl).await? {
                Claim::Claimed(lease) => match store.bury(&lease, LONG).await? {
                    Fenced::Applied => Ok(()),
                    Fenced::LeaseLost => Err("bury lost its lease".into()),
                },
                other => Err(format!("fresh key {key}: {other:?}").into()),
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The bare loop: one dead letter at a time, `basic.get`, a confirmed
/// publish to the work queue, an ack.
async fn bare_loop(conn: &Connection, config: &RabbitConfig, n: usize) -> Result<f64, BoxError> {
    let getter = conn.create_channel().await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let dlq = config.dead_letter_queue();
    let started = Instant::now();
    for _ in 0..n {
        let Some(m) = getter
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            return Err("the bare loop found the dead-letter queue empty".into());
        };
        publisher
            .basic_publish(
                "".into(),
                config.queue().into(),
                BasicPublishOptions::default(),
                &m.delivery.data,
                m.delivery.properties.clone(),
            )
            .await?
            .await?;
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let took = started.elapsed().as_secs_f64();
    let _ = getter.close(200, "done".into()).await;
    let _ = publisher.close(200, "done".into()).await;
    Ok(n as f64 / took)
}

/// `idemq bench-replay`.
pub async fn run(conn_args: &Conn, a: BenchReplayArgs) -> Result<Outcome, BoxError> {
    let url = &conn_args.amqp_url;
    let run_id = format!("{:08x}", rand::random::<u32>());
    let scope = format!("bench-replay-{run_id}");
    let body = vec![b'x'; a.body_size];
    let bare_cfg = RabbitConfig::new(url.clone(), format!("idemq-bench-replay.{run_id}.bare"));
    let replay_cfg = RabbitConfig::new(url.clone(), format!("idemq-bench-replay.{run_id}.replay"));
    let store: Arc<dyn DedupStore> = open_store(&StoreOpts {
        kind: a.store,
        redis_url: conn_args.redis_url.clone(),
        database_url: conn_args.database_url.clone(),
        redis_prefix: None,
        table: None,
    })
    .await?;
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let result = async {
        eprintln!("filling two dead-letter queues with {} each", a.messages);
        fill(&conn, &bare_cfg, &scope, a.messages, &body).await?;
        fill(&conn, &replay_cfg, &scope, a.messages, &body).await?;
        bury_all(&*store, &scope, a.messages).await?;

        eprintln!("bare loop (basic.get, confirmed publish, ack, one at a time)");
        let bare = bare_loop(&conn, &bare_cfg, a.messages).await?;
        eprintln!("replay (window {})", a.window);
        let dlq = RabbitDeadLetters::connect(replay_cfg.clone())
            .await?
            .with_read_ahead(u16::try_from(a.window.saturating_mul(2)).unwrap_or(u16::MAX));
        let report: ReplayReport = Replay::new(&dlq, &*store)
            .window(a.window)
            .run(&CancellationToken::new())
            .await;
        dlq.close().await;
        check(&replay_cfg, &report, a.messages).await?;
        let bare_depths = queue_depths(&bare_cfg).await?;
        if (bare_depths.work as usize, bare_depths.dead) != (a.messages, 0) {
            return Err(format!("bare loop left {bare_depths:?}").into());
        }
        Ok::<_, BoxError>((bare, report.rate()))
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    for cfg in [&bare_cfg, &replay_cfg] {
        delete_topology(cfg).await?;
    }
    let (bare, replay) = result?;
    if a.json {
        println!(
            "{}",
            json!({
                "messages": a.messages,
                "store": format!("{:?}", a.store).to_lowercase(),
                "window": a.window,
                "bare_loop_per_sec": bare,
                "replay_per_sec": replay,
                "ratio": replay / bare,
            })
        );
    } else {
        println!("dead letters moved: {} each", a.messages);
        println!("bare loop (get, publish+confirm, ack)  {bare:>10.0} msg/s");
        println!(
            "idemq replay ({:?} store)          {replay:>10.0} msg/s",
            a.store
        );
        println!(
            "ratio                                  {:>10.2}x",
            replay / bare
        );
    }
    Ok(Outcome::Done)
}

/// Every dead letter moved, each record revived.
async fn check(config: &RabbitConfig, report: &ReplayReport, n: usize) -> Result<(), BoxError> {
    if !report.is_complete() || report.moved != n as u64 {
        return Err(format!("the replay did not move everything:\n{report}").into());
    }
    let d = queue_depths(config).await?;
    if (d.work as usize, d.dead) != (n, 0) {
        return Err(format!("after the replay: {d:?}").into());
    }
    Ok(())
}
