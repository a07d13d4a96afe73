//! `idemq`: replay dead letters, look at queues and dedup records, and
//! bench the engine end to end against RabbitMQ, Redis and Postgres.
//!
//! Exit codes: 0 done, 1 error, 2 usage, 3 stopped part-way (a replay
//! interrupted, or failed after moving some messages: the report says how
//! many).

#![forbid(unsafe_code)]

mod baseline;
mod bench;
mod bench_replay;
mod counting;
mod dead;
mod records;
mod report;
mod stats;
mod store;
mod when;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use idemq::BoxError;
use idemq_rabbitmq::RabbitConfig;

use crate::bench::{ConfigKind, Settings};
use crate::store::{StoreKind, StoreOpts};

/// idemq: idempotent RabbitMQ consumption, from the command line.
#[derive(Parser, Debug)]
#[command(name = "idemq", version, about)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

/// Where the services are. Passwords in these URLs are never printed.
#[derive(Args, Debug)]
pub(crate) struct Conn {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_ADDR",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    amqp_url: String,
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        global = true
    )]
    redis_url: String,
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        hide_env_values = true,
        global = true
    )]
    database_url: String,
}

/// Which store, and its layout.
#[derive(Args, Debug)]
pub(crate) struct StoreArgs {
    /// The dedup store.
    #[arg(long, value_enum)]
    pub store: StoreKind,
    /// Redis key prefix (default: the store's, `idemq:`).
    #[arg(long)]
    pub redis_prefix: Option<String>,
    /// Postgres table (default: the store's, `idemq_dedup`).
    #[arg(long)]
    pub table: Option<String>,
}

/// Which queues: a work queue and the names derived from it.
#[derive(Args, Debug)]
pub(crate) struct QueueArgs {
    /// The work queue (its dead-letter queue is `<queue>.dlq` unless --dlq).
    #[arg(long)]
    queue: String,
    /// The dead-letter queue, when not `<queue>.dlq`.
    #[arg(long)]
    dlq: Option<String>,
    /// The retry queues' name prefix, when not `<queue>.retry`.
    #[arg(long)]
    retry_prefix: Option<String>,
    /// The retry tiers, when not the default ones (100ms,1s,5s,30s,2m,10m).
    #[arg(long, value_delimiter = ',', value_parser = when::parse_duration)]
    retry_tiers: Vec<Duration>,
}

impl QueueArgs {
    /// The queues as a configuration at `url`.
    fn config(&self, url: &str) -> RabbitConfig {
        let mut config = RabbitConfig::new(url, self.queue.clone());
        if let Some(dlq) = &self.dlq {
            config = config.with_dead_letter_queue(dlq.clone());
        }
        if let Some(prefix) = &self.retry_prefix {
            config = config.with_retry_queue_prefix(prefix.clone());
        }
        if !self.retry_tiers.is_empty() {
            config = config.with_retry_tiers(self.retry_tiers.iter().copied());
        }
        config
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Moves dead letters back to the work queue: each key is revived
    /// (never a done one), each copy confirmed before its dead letter goes.
    Replay(Box<dead::ReplayArgs>),
    /// Lists the oldest dead letters (id, reason, attempts, age) and
    /// leaves them where they are.
    Dead(dead::DeadArgs),
    /// Queue depths and consumers, dead letters by reason, dedup records
    /// by state.
    Stats(stats::StatsArgs),
    /// Prints the dedup record of each message id.
    Inspect {
        #[command(flatten)]
        store: StoreArgs,
        /// The dedup scope.
        #[arg(long)]
        scope: String,
        /// The ids are normalized keys already (as in an x-idemq-key
        /// header), not message ids.
        #[arg(long)]
        keys: bool,
        /// Writes JSON to stdout.
        #[arg(long)]
        json: bool,
        /// Message ids, as the producer set them.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Deletes the dedup record of each message id, so it is handled
    /// again. Refuses a live lease unless --force.
    Forget {
        #[command(flatten)]
        store: StoreArgs,
        /// The dedup scope.
        #[arg(long)]
        scope: String,
        /// The ids are normalized keys already, not message ids.
        #[arg(long)]
        keys: bool,
        /// Deletes a record even while a consumer holds its lease.
        #[arg(long)]
        force: bool,
        /// Writes JSON to stdout.
        #[arg(long)]
        json: bool,
        /// Message ids, as the producer set them.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Deletes expired rows of the Postgres store.
    Purge {
        /// Rows deleted per statement.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Postgres table (default: the store's, `idemq_dedup`).
        #[arg(long)]
        table: Option<String>,
    },
    /// Benchmarks the engine against hand-written consumers, end to end.
    Bench(BenchArgs),
    /// Benchmarks replay against a bare get/publish/ack loop, end to end.
    BenchReplay(bench_replay::BenchReplayArgs),
}

/// How a command ended, for the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done (0).
    Done,
    /// Failed, or refused part of the work (1).
    Failed,
    /// Stopped part-way after changing something (3).
    PartWay,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Messages published per configuration (duplicates included).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    body_size: usize,
    /// Duplicate publishes, percent of all messages.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=90))]
    dup_percent: u8,
    /// Unique messages whose handler fails permanently (dead-lettered), percent.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    fail_percent: u8,
    /// Engine configurations, each compared with its baseline.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "memory,redis,postgres,postgres-tx"
    )]
    configs: Vec<ConfigKind>,
    /// Handlers running at once in the engine.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// RabbitMQ prefetch of every consumer (baselines and engine alike).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// Claim and completion calls out at once per store when the engine's
    /// Redis and Postgres stores are wrapped in `idemq::Coalescing`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    store_in_flight: u16,
    /// One store call per delivery: no `Coalescing` wrapper.
    #[arg(long)]
    no_coalesce: bool,
    /// Writes the report as JSON to this file (`-` or no value: stdout).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Writes an SVG bar chart of unique messages per second.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Abandons a phase when nothing settles for this many seconds.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
}

pub(crate) fn store_opts(conn: &Conn, s: &StoreArgs) -> StoreOpts {
    StoreOpts {
        kind: s.store,
        redis_url: conn.redis_url.clone(),
        database_url: conn.database_url.clone(),
        redis_prefix: s.redis_prefix.clone(),
        table: s.table.clone(),
    }
}

async fn bench(conn: &Conn, a: BenchArgs) -> Result<bool, BoxError> {
    let settings = Settings {
        amqp_url: conn.amqp_url.clone(),
        redis_url: conn.redis_url.clone(),
        database_url: conn.database_url.clone(),
        messages: a.messages,
        body_size: a.body_size,
        dup_percent: a.dup_percent,
        fail_percent: a.fail_percent,
        configs: a.configs,
        concurrency: a.concurrency,
        prefetch: a.prefetch,
        store_in_flight: (!a.no_coalesce).then_some(usize::from(a.store_in_flight)),
        quiet: a.quiet,
        stall_timeout: Duration::from_secs(a.stall_secs),
    };
    let report = bench::run(&settings).await?;
    let json_to_stdout = a.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    let table = report.table();
    if json_to_stdout {
        // Keep stdout machine-readable.
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report)?;
        if json_to_stdout {
            println!("{json}");
        } else {
            std::fs::write(path, json + "\n")?;
        }
    }
    if let Some(path) = &a.plot {
        report.plot(path)?;
    }
    // Also on stderr, next to the final error line, where logs and test
    // harnesses look.
    for line in report.failures() {
        eprintln!("idemq: {line}");
    }
    Ok(report.ok())
}

async fn run(cli: Cli) -> Result<Outcome, BoxError> {
    let conn = &cli.conn;
    match cli.command {
        Command::Replay(args) => {
            let opts = store_opts(conn, args.store());
            dead::replay(&conn.amqp_url, opts, *args).await
        }
        Command::Dead(args) => dead::dead(&conn.amqp_url, args).await,
        Command::Stats(args) => stats::stats(conn, args).await,
        Command::Inspect {
            store,
            scope,
            keys,
            json,
            ids,
        } => records::inspect(&store_opts(conn, &store), &scope, &ids, keys, json).await,
        Command::Forget {
            store,
            scope,
            keys,
            force,
            json,
            ids,
        } => records::forget(&store_opts(conn, &store), &scope, &ids, keys, force, json).await,
        Command::Purge { batch, table } => {
            let opts = StoreOpts {
                kind: StoreKind::Postgres,
                redis_url: conn.redis_url.clone(),
                database_url: conn.database_url.clone(),
                redis_prefix: None,
                table,
            };
            records::purge(&opts, batch).await
        }
        Command::BenchReplay(args) => bench_replay::run(conn, args).await,
        Command::Bench(args) => Ok(if bench(conn, args).await? {
            Outcome::Done
        } else {
            eprintln!("idemq: correctness check failed (see above)");
            Outcome::Failed
        }),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Warnings and errors of the engine and backends go to stderr;
    // RUST_LOG=idemq=debug (or any filter) shows more. lapin logs an error
    // for every channel it closes on purpose; those are left out.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin::channels=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        Ok(Outcome::PartWay) => ExitCode::from(3),
        Err(e) => {
            eprintln!("idemq: {e}");
            ExitCode::FAILURE
        }
    }
}
