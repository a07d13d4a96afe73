//! `idemq replay` and `idemq dead`: dead letters back to the work queue,
//! and a look at them.

use std::sync::{Arc, Mutex};

use clap::Args;
use idemq::error::redact_url;
use idemq::replay::{Action, DeadLetterInfo, Filter, ReplayEnd, peek};
use idemq::{BoxError, Delivery, KeyStrategy, Replay, ReplayReport};
use idemq_rabbitmq::{RabbitConfig, RabbitDeadLetters};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::store::{StoreOpts, millis, open_store, state_name};
use crate::when::{age, parse_time};
use crate::{Outcome, QueueArgs, StoreArgs};

/// `idemq replay`'s options.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    queue: QueueArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Forget each record whatever its state, so even a message that was
    /// handled since is handled again. Without it a done key's dead letter
    /// is removed without a copy, and a key a consumer holds stays.
    #[arg(long)]
    force: bool,
    /// Change nothing: list what would move and why.
    #[arg(long)]
    dry_run: bool,
    /// List each dead letter and what was done with it.
    #[arg(long)]
    list: bool,
    /// Move at most this many.
    #[arg(long)]
    limit: Option<u64>,
    /// Move at most this many a second.
    #[arg(long, value_parser = positive_rate)]
    rate: Option<f64>,
    /// Only dead letters with this reason (max-attempts, permanent,
    /// decode, missing-key, duplicate-of-dead, or the broker's:
    /// delivery_limit, expired, rejected, maxlen). Repeatable.
    #[arg(long = "reason", value_name = "REASON")]
    reasons: Vec<String>,
    /// Only dead letters taken from this work queue. Repeatable.
    #[arg(long = "original-queue", value_name = "QUEUE")]
    original_queues: Vec<String>,
    /// Only dead letters whose header NAME is VALUE. Repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = name_value)]
    headers: Vec<(String, String)>,
    /// Only dead letters with this message id. Repeatable.
    #[arg(long = "message-id", value_name = "ID")]
    message_ids: Vec<String>,
    /// Only dead letters recorded under this key (raw or normalized). Repeatable.
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<String>,
    /// Only dead letters that died at or after this time (2026-12-04T18:00:00Z,
    /// 2026-12-04, 2h for two hours ago, or ms since the epoch).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    dead_after: Option<i64>,
    /// Only dead letters that died before this time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    dead_before: Option<i64>,
    /// For dead letters that do not name their record (the broker's own,
    /// or written before idemq recorded it): the consumer's dedup scope.
    /// Without it they stay in the queue.
    #[arg(long, requires = "key_from")]
    scope: Option<String>,
    /// With --scope: the consumer's key strategy, `message-id`,
    /// `header:NAME` (message id first, then the header, as the engine
    /// does), `body-hash`, or a comma-separated chain of them.
    #[arg(long, requires = "scope", value_parser = key_strategy)]
    key_from: Option<KeyStrategy>,
    /// Store calls and unconfirmed copies in flight at once.
    #[arg(long, default_value_t = idemq::replay::DEFAULT_WINDOW)]
    window: usize,
    /// Writes the report (and the list) as JSON to stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

impl ReplayArgs {
    /// The store the records are in.
    pub fn store(&self) -> &StoreArgs {
        &self.store
    }
}

/// `idemq dead`'s options.
#[derive(Args, Debug)]
pub struct DeadArgs {
    #[command(flatten)]
    queue: QueueArgs,
    /// Dead letters listed at most (the oldest).
    #[arg(long, default_value_t = 100)]
    limit: u64,
    /// Writes the list as JSON to stdout.
    #[arg(long)]
    json: bool,
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("`{s}`: a number of messages per second above 0")),
    }
}

fn name_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .filter(|(n, _)| !n.is_empty())
        .ok_or_else(|| format!("`{s}`: write NAME=VALUE"))
}

fn key_strategy(s: &str) -> Result<KeyStrategy, String> {
    let mut strategy = KeyStrategy::message_id();
    for part in s.split(',') {
        strategy = match part.trim() {
            "message-id" => strategy,
            "body-hash" => strategy.with_body_hash(),
            other => match other.strip_prefix("header:") {
                Some(name) if !name.is_empty() => strategy.with_header(name),
                _ => {
                    return Err(format!(
                        "`{other}`: one of message-id, header:NAME, body-hash"
                    ));
                }
            },
        };
    }
    Ok(strategy)
}

async fn connect(url: &str, config: RabbitConfig) -> Result<RabbitDeadLetters, BoxError> {
    RabbitDeadLetters::connect(config)
        .await
        .map_err(|e| format!("rabbitmq at {}: {e}", redact_url(url)).into())
}

/// What one line of the list says about a dead letter.
fn describe(letter: &Delivery, info: &DeadLetterInfo, action: &Action) -> String {
    let id = letter.message_id.as_deref().unwrap_or("-");
    let what = match action {
        Action::Move { previous } => format!("record {}", previous.map_or("absent", state_name)),
        Action::Force { existed } => {
            format!("record {}", if *existed { "forgotten" } else { "absent" })
        }
        Action::AlreadyDone => "its key is done: no copy".to_owned(),
        Action::LeftLive { retry_after_ms } => {
            format!(
                "a consumer holds its key ({:.1}s left)",
                *retry_after_ms as f64 / 1000.0
            )
        }
        Action::LeftNoKey => "names no record: give --scope and --key-from".to_owned(),
        Action::Skipped => "not selected".to_owned(),
        Action::Unhandled => "not reached".to_owned(),
    };
    format!("{:<13} {id:<24} {:<18} {what}", action.name(), info.reason)
}

fn letter_json(letter: &Delivery, info: &DeadLetterInfo, now_ms: i64) -> Value {
    let mut v = serde_json::to_value(info).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("message_id".into(), json!(letter.message_id));
        map.insert(
            "age_ms".into(),
            json!(info.dead_at_ms.map(|t| now_ms.saturating_sub(t))),
        );
    }
    v
}

fn report_json(report: &ReplayReport, list: Vec<Value>) -> Value {
    let (end, error) = match &report.end {
        ReplayEnd::Finished => ("finished", None),
        ReplayEnd::LimitReached => ("limit-reached", None),
        ReplayEnd::Interrupted => ("interrupted", None),
        ReplayEnd::Failed(e) => ("failed", Some(e.to_string())),
        _ => ("other", None),
    };
    json!({
        "dry_run": report.dry_run,
        "cut_off": report.cut_off,
        "examined": report.examined,
        "moved": report.moved,
        "forced": report.forced,
        "already_done": report.already_done,
        "left_live": report.left_live,
        "left_no_key": report.left_no_key,
        "skipped": report.skipped,
        "unhandled": report.unhandled,
        "by_reason": report.by_reason,
        "elapsed_ms": millis(report.elapsed),
        "moves_per_sec": report.rate(),
        "end": end,
        "error": error,
        "list": list,
    })
}

/// Cancels `token` on Ctrl-C or SIGTERM.
fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("idemq: stopping: settling the dead letters in hand");
        token.cancel();
    });
}

fn progress(len: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("replay [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `idemq replay`.
pub async fn replay(url: &str, conn_store: StoreOpts, a: ReplayArgs) -> Result<Outcome, BoxError> {
    let dlq = connect(url, a.queue.config(url))
        .await?
        .with_read_ahead(u16::try_from(a.window.saturating_mul(2)).unwrap_or(u16::MAX));
    let store = match open_store(&conn_store).await {
        Ok(store) => store,
        Err(e) => {
            dlq.close().await;
            return Err(e);
        }
    };
    let mut filter = Filter::new();
    for r in a.reasons {
        filter = filter.reason(r);
    }
    for q in a.original_queues {
        filter = filter.original_queue(q);
    }
    for (n, v) in a.headers {
        filter = filter.header(n, v);
    }
    for id in a.message_ids {
        filter = filter.message_id(id);
    }
    for k in a.keys {
        filter = filter.key(k);
    }
    if let Some(t) = a.dead_after {
        filter = filter.dead_after_ms(t);
    }
    if let Some(t) = a.dead_before {
        filter = filter.dead_before_ms(t);
    }
    let listing = a.dry_run || a.list;
    let depth = idemq::replay::DeadLetterQueue::depth(&dlq)
        .await
        .unwrap_or(0);
    let bar = progress(depth, a.quiet || a.json);
    let list = Arc::new(Mutex::new(Vec::new()));
    let (as_json, seen, b) = (a.json, list.clone(), bar.clone());
    let now_ms = idemq::message::unix_millis_now();
    let mut replay = Replay::new(&dlq, &*store)
        .force(a.force)
        .dry_run(a.dry_run)
        .filter(filter)
        .window(a.window)
        .on_action(
            move |letter: &Delivery, info: &DeadLetterInfo, action: &Action| {
                b.inc(1);
                if !listing {
                    return;
                }
                if as_json {
                    let mut v = letter_json(letter, info, now_ms);
                    if let (Value::Object(map), Ok(Value::Object(act))) =
                        (&mut v, serde_json::to_value(action))
                    {
                        map.extend(act);
                    }
                    if let Ok(mut l) = seen.lock() {
                        l.push(v);
                    }
                } else {
                    b.suspend(|| println!("{}", describe(letter, info, action)));
                }
            },
        );
    if let Some(n) = a.limit {
        replay = replay.limit(n);
    }
    if let Some(r) = a.rate {
        replay = replay.rate(r);
    }
    if let (Some(scope), Some(strategy)) = (a.scope, a.key_from) {
        idemq::key::check_scope(&scope)?;
        replay = replay.fallback_key(scope, strategy);
    }
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let report = replay.run(&shutdown).await;
    bar.finish_and_clear();
    dlq.close().await;
    if a.json {
        let list = list
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        println!("{}", report_json(&report, list));
    } else {
        println!("{report}");
    }
    Ok(match &report.end {
        ReplayEnd::Finished | ReplayEnd::LimitReached => Outcome::Done,
        ReplayEnd::Interrupted => {
            eprintln!("idemq: replay interrupted after moving {}", report.moved);
            Outcome::PartWay
        }
        ReplayEnd::Failed(e) if report.moved > 0 => {
            eprintln!("idemq: replay failed after moving {}: {e}", report.moved);
            Outcome::PartWay
        }
        ReplayEnd::Failed(e) => {
            eprintln!("idemq: replay failed: {e}");
            Outcome::Failed
        }
        _ => Outcome::Failed,
    })
}

/// `idemq dead`: lists the oldest dead letters and leaves them where they are.
pub async fn dead(url: &str, a: DeadArgs) -> Result<Outcome, BoxError> {
    let dlq = connect(url, a.queue.config(url)).await?;
    let depth = idemq::replay::DeadLetterQueue::depth(&dlq).await;
    let letters = peek(&dlq, a.limit).await;
    dlq.close().await;
    let (depth, letters) = (depth?, letters?);
    let now = idemq::message::unix_millis_now();
    if a.json {
        let list: Vec<Value> = letters
            .iter()
            .map(|l| letter_json(l, &DeadLetterInfo::of(l), now))
            .collect();
        println!("{}", json!({ "depth": depth, "dead_letters": list }));
        return Ok(Outcome::Done);
    }
    println!(
        "{:<24} {:<18} {:<7} {:>8} {:>8}  DETAIL",
        "MESSAGE ID", "REASON", "BY", "ATTEMPTS", "AGE"
    );
    for letter in &letters {
        let info = DeadLetterInfo::of(letter);
        let detail: String = info
            .detail
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        println!(
            "{:<24} {:<18} {:<7} {:>8} {:>8}  {detail}",
            letter.message_id.as_deref().unwrap_or("-"),
            info.reason,
            info.origin.to_string(),
            info.attempts
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            info.dead_at_ms
                .map_or_else(|| "-".to_owned(), |t| age(now - t)),
        );
    }
    if depth > letters.len() as u64 {
        println!("({} of {depth} shown; --limit for more)", letters.len());
    }
    Ok(Outcome::Done)
}
