//! `idemq`: inspect and maintain idemq dedup stores, replay dead letters,
//! and bench the engine end to end against RabbitMQ, Redis and Postgres.

#![forbid(unsafe_code)]

mod baseline;
mod bench;
mod commands;
mod counting;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use idemq::BoxError;

use crate::bench::{ConfigKind, Settings};
use crate::commands::{StoreKind, StoreOpts};

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
struct Conn {
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
struct StoreArgs {
    /// The dedup store.
    #[arg(long, value_enum)]
    store: StoreKind,
    /// Redis key prefix (default: the store's, `idemq:`).
    #[arg(long)]
    redis_prefix: Option<String>,
    /// Postgres table (default: the store's, `idemq_dedup`).
    #[arg(long)]
    table: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prints the dedup record of each key.
    Inspect {
        #[command(flatten)]
        store: StoreArgs,
        /// The dedup scope.
        #[arg(long)]
        scope: String,
        /// Message keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Deletes the dedup record of each key, so it is handled again.
    Forget {
        #[command(flatten)]
        store: StoreArgs,
        /// The dedup scope.
        #[arg(long)]
        scope: String,
        /// Message keys.
        #[arg(required = true)]
        keys: Vec<String>,
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
    /// Moves dead letters back to the work queue, forgetting their records.
    Replay {
        /// The work queue (its dead-letter queue is `<queue>.dlq`).
        #[arg(long)]
        queue: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Dead letters replayed at most.
        #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
        max: usize,
    },
    /// Benchmarks the engine against hand-written consumers, end to end.
    Bench(BenchArgs),
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

fn store_opts(conn: &Conn, s: &StoreArgs) -> StoreOpts {
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

async fn run(cli: Cli) -> Result<bool, BoxError> {
    let conn = &cli.conn;
    match cli.command {
        Command::Inspect { store, scope, keys } => {
            commands::inspect(&store_opts(conn, &store), &scope, &keys).await?;
        }
        Command::Forget { store, scope, keys } => {
            commands::forget(&store_opts(conn, &store), &scope, &keys).await?;
        }
        Command::Purge { batch, table } => {
            let opts = StoreOpts {
                kind: StoreKind::Postgres,
                redis_url: conn.redis_url.clone(),
                database_url: conn.database_url.clone(),
                redis_prefix: None,
                table,
            };
            commands::purge(&opts, batch).await?;
        }
        Command::Replay { queue, store, max } => {
            commands::replay(&conn.amqp_url, &queue, &store_opts(conn, &store), max).await?;
        }
        Command::Bench(args) => return bench(conn, args).await,
    }
    Ok(true)
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("idemq: correctness check failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("idemq: {e}");
            ExitCode::FAILURE
        }
    }
}
