//! `idemq stats`: the queues of a topology, its dead letters by reason, and
//! the dedup records by state.

use std::collections::BTreeMap;

use clap::Args;
use idemq::replay::{DeadLetterInfo, peek};
use idemq::{BoxError, RecordCounts};
use idemq_rabbitmq::{QueueRole, RabbitDeadLetters, queue_stats};
use serde_json::{Value, json};

use crate::store::{Opened, StoreOpts, open};
use crate::{Outcome, QueueArgs, StoreArgs};

/// `idemq stats`'s options.
#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    queue: QueueArgs,
    /// Also count the dedup records of this store.
    #[arg(long, value_enum)]
    store: Option<crate::store::StoreKind>,
    /// Redis key prefix (default: the store's, `idemq:`).
    #[arg(long)]
    redis_prefix: Option<String>,
    /// Postgres table (default: the store's, `idemq_dedup`).
    #[arg(long)]
    table: Option<String>,
    /// Count the records of this scope only.
    #[arg(long)]
    scope: Option<String>,
    /// Dead letters read (and put back) to group them by reason.
    #[arg(long, default_value_t = 10_000)]
    sample: u64,
    /// Redis keys scanned at most: beyond it the counts are an estimate.
    #[arg(long, default_value_t = 100_000)]
    scan: u64,
    /// Writes the figures as JSON to stdout.
    #[arg(long)]
    json: bool,
}

impl StatsArgs {
    /// The store to count, when one is asked for.
    fn store_opts(&self, conn: &crate::Conn) -> Option<StoreOpts> {
        let kind = self.store?;
        Some(crate::store_opts(
            conn,
            &StoreArgs {
                store: kind,
                redis_prefix: self.redis_prefix.clone(),
                table: self.table.clone(),
            },
        ))
    }
}

fn role_name(role: QueueRole) -> String {
    match role {
        QueueRole::Work => "work".to_owned(),
        QueueRole::Retry(tier) => format!("retry {tier:?}"),
        QueueRole::Dead => "dead letters".to_owned(),
    }
}

/// `idemq stats`.
pub async fn stats(conn: &crate::Conn, a: StatsArgs) -> Result<Outcome, BoxError> {
    let url = &conn.amqp_url;
    let config = a.queue.config(url);
    let queues = queue_stats(&config).await?;
    let dlq_exists = queues.iter().any(|q| q.role == QueueRole::Dead && q.exists);
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut read = 0;
    if dlq_exists && queues.iter().any(|q| q.role == QueueRole::Work && q.exists) {
        let dlq = RabbitDeadLetters::connect(config.clone()).await?;
        let letters = peek(&dlq, a.sample).await;
        dlq.close().await;
        for letter in letters? {
            read += 1;
            let info = DeadLetterInfo::of(&letter);
            let reason = format!("{} ({})", info.reason, info.origin);
            *by_reason.entry(reason).or_default() += 1;
        }
    }
    let records = match a.store_opts(conn) {
        None => None,
        Some(opts) => Some(count(&opts, a.scope.as_deref(), a.scan).await?),
    };
    if a.json {
        let queues: Vec<Value> = queues
            .iter()
            .map(|q| {
                json!({
                    "name": q.name, "role": role_name(q.role), "exists": q.exists,
                    "messages": q.messages, "consumers": q.consumers,
                })
            })
            .collect();
        let records = records.map(|(counts, how)| json!({ "counts": counts, "method": how }));
        println!(
            "{}",
            json!({
                "queues": queues,
                "dead_letters_read": read,
                "dead_letters_by_reason": by_reason,
                "records": records,
            })
        );
        return Ok(Outcome::Done);
    }
    println!(
        "{:<40} {:<14} {:>10} {:>9}",
        "QUEUE", "ROLE", "MESSAGES", "CONSUMERS"
    );
    for q in &queues {
        if q.exists {
            println!(
                "{:<40} {:<14} {:>10} {:>9}",
                q.name,
                role_name(q.role),
                q.messages,
                q.consumers
            );
        } else {
            println!("{:<40} {:<14} {:>10}", q.name, role_name(q.role), "absent");
        }
    }
    if read > 0 {
        println!("\ndead letters by reason ({read} read and put back):");
        for (reason, n) in &by_reason {
            println!("  {reason:<32} {n:>8}");
        }
    }
    if let Some((c, how)) = records {
        let scope = a
            .scope
            .as_deref()
            .map_or_else(|| "all scopes".to_owned(), |s| format!("scope {s}"));
        println!("\ndedup records, {scope} ({how}):");
        for (name, n) in [
            ("claimed (live lease)", c.claimed),
            ("claimed (lease lapsed)", c.lapsed),
            ("released", c.released),
            ("done", c.done),
            ("dead", c.dead),
        ] {
            println!("  {name:<32} {n:>8}");
        }
    }
    Ok(Outcome::Done)
}

/// The records of the store by state, and how they were counted.
async fn count(
    opts: &StoreOpts,
    scope: Option<&str>,
    scan: u64,
) -> Result<(RecordCounts, String), BoxError> {
    Ok(match open(opts).await? {
        Opened::Postgres(store) => {
            let counts = store.count_states(scope).await?;
            store.pool().close().await;
            (counts, "postgres, exact".to_owned())
        }
        Opened::Redis(store) => {
            let found = store.scan_states(scope, scan).await?;
            let how = if found.complete {
                format!("redis, all {} keys scanned", found.scanned)
            } else {
                format!(
                    "redis, an estimate: {} keys scanned of more (--scan to read more)",
                    found.scanned
                )
            };
            (found.counts, how)
        }
    })
}
