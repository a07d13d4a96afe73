//! `idemq bench`: publishes one message mix per phase to a fresh RabbitMQ
//! queue and consumes it, with the engine over each store configuration
//! and with the matching hand-written baseline, measuring each phase.
//!
//! One file, past 600 lines: every phase runs the engine and its
//! hand-written baseline the same way, which is what makes the figures
//! comparable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemq::memory::MemoryDedupStore;
use idemq::{BoxError, Coalescing, DedupStore, Engine, Handler, HandlerError, Message};
use idemq_postgres::{PostgresDedupStore, transactional};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig, delete_topology, queue_depths, topology};
use idemq_redis::RedisDedupStore;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use crate::baseline::{self, Work};
use crate::counting::{CountingStore, Meter, TimedBroker};
use crate::report::{BenchReport, PhaseResult};

/// The Postgres table the engine's store uses in the bench.
pub const PG_STORE_TABLE: &str = "idemq_bench";

/// The bench's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Postgres URL.
    pub database_url: String,
    /// Messages published per phase (duplicates included).
    pub messages: u64,
    /// Body size in bytes.
    pub body_size: usize,
    /// Share of the publishes that are duplicates, in percent.
    pub dup_percent: u8,
    /// Share of the unique messages that fail permanently, in percent.
    pub fail_percent: u8,
    /// Engine configurations to run.
    pub configs: Vec<ConfigKind>,
    /// Handlers running at once (the engine's concurrency).
    pub concurrency: u16,
    /// RabbitMQ prefetch of every consumer, baselines and engine alike.
    pub prefetch: u16,
    /// Store calls out at once under [`Coalescing`] (Redis and Postgres
    /// engine phases); `None` sends one call per delivery.
    pub store_in_flight: Option<usize>,
    /// Hide the progress bar.
    pub quiet: bool,
    /// A phase is abandoned when nothing settles for this long.
    pub stall_timeout: Duration,
}

/// An engine configuration of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigKind {
    /// `MemoryDedupStore` with the RabbitMQ broker.
    Memory,
    /// `RedisDedupStore`.
    Redis,
    /// `PostgresDedupStore`, completion by the engine.
    Postgres,
    /// `PostgresDedupStore` with a `transactional` handler.
    PostgresTx,
}

impl ConfigKind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ConfigKind::Memory => "memory",
            ConfigKind::Redis => "redis",
            ConfigKind::Postgres => "postgres",
            ConfigKind::PostgresTx => "postgres-tx",
        }
    }

    fn baseline(self) -> BaselineKind {
        match self {
            ConfigKind::Memory => BaselineKind::Bare,
            ConfigKind::Redis => BaselineKind::Redis,
            ConfigKind::Postgres | ConfigKind::PostgresTx => BaselineKind::Postgres,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BaselineKind {
    Bare,
    Redis,
    Postgres,
}

impl BaselineKind {
    fn name(self) -> &'static str {
        match self {
            BaselineKind::Bare => "baseline-bare",
            BaselineKind::Redis => "baseline-redis",
            BaselineKind::Postgres => "baseline-postgres",
        }
    }
}

/// The message mix every phase gets: ids in publish order.
struct Mix {
    ids: Vec<String>,
    unique: u64,
    failing_unique: u64,
}

impl Mix {
    fn new(messages: u64, dup_percent: u8, fail_percent: u8) -> Mix {
        let dups = messages * u64::from(dup_percent.min(100)) / 100;
        let mut unique = messages - dups;
        if unique == 0 && messages > 0 {
            unique = 1;
        }
        let dups = messages - unique;
        let failing_unique = unique * u64::from(fail_percent.min(100)) / 100;
        let run: u32 = rand::rng().random();
        let id = |i: u64| {
            if i < failing_unique {
                format!("fail-{run:08x}-{i}")
            } else {
                format!("m-{run:08x}-{i}")
            }
        };
        let mut rng = rand::rng();
        let mut ids: Vec<String> = (0..unique).map(id).collect();
        for _ in 0..dups {
            ids.push(id(rng.random_range(0..unique)));
        }
        ids.shuffle(&mut rng);
        Mix {
            ids,
            unique,
            failing_unique,
        }
    }
}

/// Runs the bench and returns its report (with `ok == false` in a phase
/// whose correctness check failed).
pub async fn run(s: &Settings) -> Result<BenchReport, BoxError> {
    let mix = Mix::new(s.messages, s.dup_percent, s.fail_percent);
    let body = vec![b'x'; s.body_size];
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let rss_reset = reset_peak_rss();

    let publisher = Connection::connect(&s.amqp_url, ConnectionProperties::default()).await?;
    let pub_channel = publisher.create_channel().await?;
    pub_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let needs_redis = s.configs.contains(&ConfigKind::Redis);
    let needs_pg = s
        .configs
        .iter()
        .any(|c| matches!(c, ConfigKind::Postgres | ConfigKind::PostgresTx));
    let redis = if needs_redis {
        // Batching is the bench's to choose (--store-in-flight,
        // --no-coalesce) and to count.
        Some(RedisDedupStore::connect(&s.redis_url).await?)
    } else {
        None
    };
    let pg = if needs_pg {
        let store = PostgresDedupStore::connect(&s.database_url)
            .await?
            .with_table(PG_STORE_TABLE)?;
        store.migrate().await?;
        baseline::prepare_postgres(store.pool()).await?;
        Some(store)
    } else {
        None
    };

    let mut results: Vec<PhaseResult> = Vec::new();
    let phase_ctx = PhaseCtx {
        s,
        mix: &mix,
        body: &body,
        channel: &pub_channel,
        run_id: &run_id,
        rss_reset,
    };
    for &config in &s.configs {
        let bk = config.baseline();
        if !results.iter().any(|r| r.name == bk.name()) {
            let work = match bk {
                BaselineKind::Bare => Work::Bare,
                BaselineKind::Redis => Work::Redis {
                    conn: redis
                        .as_ref()
                        .ok_or("redis store missing")?
                        .connection_manager(),
                    prefix: format!("idemq-bench:{run_id}:"),
                },
                BaselineKind::Postgres => Work::Postgres {
                    pool: PostgresDedupStore::connect(&s.database_url)
                        .await?
                        .pool()
                        .clone(),
                    prefix: format!("{run_id}:"),
                },
            };
            let r = phase_ctx.baseline(bk, work.clone()).await?;
            if let Work::Postgres { pool, prefix } = &work {
                baseline::cleanup_postgres(pool, prefix).await?;
                pool.close().await;
            }
            results.push(r);
        }
        let scope = format!("bench-{run_id}-{}", config.name());
        let calls = Arc::new(AtomicU64::new(0));
        let r = match config {
            ConfigKind::Memory => {
                let store = CountingStore::new(MemoryDedupStore::new(), calls.clone());
                phase_ctx
                    .engine(config, store, bench_handler, &scope, calls)
                    .await?
            }
            ConfigKind::Redis => {
                let inner = redis.clone().ok_or("redis store missing")?;
                let store = CountingStore::new(inner, calls.clone());
                phase_ctx
                    .engine_on(config, store, bench_handler, &scope, calls)
                    .await?
            }
            ConfigKind::Postgres => {
                let inner = pg.clone().ok_or("postgres store missing")?;
                let store = CountingStore::new(inner, calls.clone());
                phase_ctx
                    .engine_on(config, store, bench_handler, &scope, calls)
                    .await?
            }
            ConfigKind::PostgresTx => {
                let inner = pg.clone().ok_or("postgres store missing")?;
                let tx_calls = calls.clone();
                // BEGIN, the fenced done-mark UPDATE and COMMIT (or BEGIN
                // and ROLLBACK on failure) are round trips the store
                // wrapper cannot see; the handler counts them.
                let handler = transactional(&inner, move |_tx, msg| {
                    let tx_calls = tx_calls.clone();
                    Box::pin(async move {
                        let r = bench_outcome(&msg);
                        tx_calls.fetch_add(if r.is_ok() { 3 } else { 2 }, Ordering::Relaxed);
                        r
                    })
                });
                let store = CountingStore::new(inner, calls.clone());
                phase_ctx
                    .engine_on(config, store, handler, &scope, calls)
                    .await?
            }
        };
        results.push(r);
    }
    let _ = pub_channel.close(200, "bench done".into()).await;
    let _ = publisher.close(200, "bench done".into()).await;
    if let Some(pg) = &pg {
        pg.pool().close().await;
    }

    for i in 0..results.len() {
        if let Some(b) = results[i].baseline.clone()
            && let Some(base) = results.iter().find(|r| r.name == b)
            && base.unique_per_sec > 0.0
        {
            results[i].ratio_to_baseline = Some(results[i].unique_per_sec / base.unique_per_sec);
        }
    }
    Ok(BenchReport {
        messages: s.messages,
        unique: mix.unique,
        failing_unique: mix.failing_unique,
        body_size: s.body_size,
        dup_percent: s.dup_percent,
        fail_percent: s.fail_percent,
        concurrency: s.concurrency,
        prefetch: s.prefetch,
        store_in_flight: s.store_in_flight,
        peak_rss_per_phase: rss_reset,
        results,
    })
}

/// Wraps a counting store in [`Coalescing`]: the counter inside sees the
/// batch calls that really go to the store.
fn coalesce<S: DedupStore + 'static>(store: S, in_flight: usize) -> Coalescing<S> {
    Coalescing::new(store).with_max_in_flight(in_flight)
}

/// The bench's handler: does nothing, or fails permanently for `fail-` ids.
async fn bench_handler(msg: Message) -> Result<(), HandlerError> {
    bench_outcome(&msg)
}

fn bench_outcome(msg: &Message) -> Result<(), HandlerError> {
    if msg.key().starts_with("fail-") {
        Err(HandlerError::permanent("bench: planned failure"))
    } else {
        Ok(())
    }
}

struct PhaseCtx<'a> {
    s: &'a Settings,
    mix: &'a Mix,
    body: &'a [u8],
    channel: &'a lapin::Channel,
    run_id: &'a str,
    rss_reset: bool,
}

impl PhaseCtx<'_> {
    fn rabbit_config(&self, phase: &str) -> RabbitConfig {
        RabbitConfig::new(
            &self.s.amqp_url,
            format!("idemq-bench-{}-{phase}", self.run_id),
        )
        .with_prefetch(self.s.prefetch)
        .with_connection_name(format!("idemq-bench-{phase}"))
    }

    /// Declares the phase's topology and publishes the mix to it.
    async fn prepare(&self, cfg: &RabbitConfig) -> Result<(), BoxError> {
        topology::declare(cfg).await?;
        let bar = self.progress(
            self.mix.ids.len() as u64,
            &format!("publish {}", cfg.queue()),
        );
        for chunk in self.mix.ids.chunks(2000) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for id in chunk {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(id.as_str().into());
                confirms.push(
                    self.channel
                        .basic_publish(
                            "".into(),
                            cfg.queue().into(),
                            BasicPublishOptions::default(),
                            self.body,
                            props,
                        )
                        .await?,
                );
            }
            for c in confirms {
                match c.await? {
                    Confirmation::Ack(_) => {}
                    other => return Err(format!("publish not confirmed: {other:?}").into()),
                }
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }

    fn progress(&self, len: u64, what: &str) -> ProgressBar {
        if self.s.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:32} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_owned());
        bar
    }

    /// Watches `meter`: updates a progress bar, and cancels `stop` once
    /// every delivery is settled or nothing settled for the stall timeout.
    fn watch(&self, meter: Arc<Meter>, stop: CancellationToken, what: &str) -> ProgressBar {
        let bar = self.progress(meter.target, what);
        let b = bar.clone();
        let stall = self.s.stall_timeout;
        tokio::spawn(async move {
            let mut last = (0, Instant::now());
            loop {
                tokio::select! {
                    _ = meter.done.cancelled() => break,
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                let n = meter.settled();
                b.set_position(n);
                if n != last.0 {
                    last = (n, Instant::now());
                } else if last.1.elapsed() > stall {
                    break;
                }
            }
            b.set_position(meter.settled());
            stop.cancel();
        });
        bar
    }

    /// Checks that the phase's queues are empty, then deletes them.
    async fn drain_check(&self, cfg: &RabbitConfig, dead: u64, problems: &mut Vec<String>) {
        match queue_depths(cfg).await {
            Ok(d) => {
                if d.work != 0 {
                    problems.push(format!("{} messages left in the work queue", d.work));
                }
                for (tier, n) in d.retry {
                    if n != 0 {
                        problems.push(format!("{n} messages left in the {tier:?} retry queue"));
                    }
                }
                if u64::from(d.dead) != dead {
                    problems.push(format!("{} dead letters, expected {dead}", d.dead));
                }
            }
            Err(e) => problems.push(format!("queue depths: {e}")),
        }
        if let Err(e) = delete_topology(cfg).await {
            eprintln!("warning: could not delete {}: {e}", cfg.queue());
        }
    }

    async fn baseline(&self, kind: BaselineKind, work: Work) -> Result<PhaseResult, BoxError> {
        let cfg = self.rabbit_config(kind.name());
        self.prepare(&cfg).await?;
        let meter = Meter::new(self.mix.ids.len() as u64);
        let stop = CancellationToken::new();
        reset_peak_rss();
        let bar = self.watch(meter.clone(), stop.clone(), kind.name());
        let source = baseline::Source {
            amqp_url: &self.s.amqp_url,
            queue: cfg.queue(),
            prefetch: self.s.prefetch,
            lease: LEASE,
            keep: KEEP,
        };
        let counts = baseline::run(source, work, meter.clone(), stop.clone()).await;
        stop.cancel();
        bar.finish_and_clear();
        let counts = match counts {
            Ok(c) => c,
            Err(e) => {
                let _ = delete_topology(&cfg).await;
                return Err(e);
            }
        };
        let elapsed = meter.elapsed();
        let mut problems = Vec::new();
        let handled = counts.handled.load(Ordering::Relaxed);
        let expect = if kind == BaselineKind::Bare {
            self.mix.ids.len() as u64
                - self
                    .mix
                    .ids
                    .iter()
                    .filter(|i| i.starts_with("fail-"))
                    .count() as u64
        } else {
            self.mix.unique - self.mix.failing_unique
        };
        if handled != expect {
            problems.push(format!("handled {handled}, expected {expect}"));
        }
        self.check_settled(&meter, &mut problems);
        // The work queue dead-letters what a baseline rejects.
        let rejected = counts.rejected.load(Ordering::Relaxed);
        self.drain_check(&cfg, rejected, &mut problems).await;
        Ok(self.result(
            kind.name(),
            None,
            &meter,
            elapsed,
            handled,
            counts.duplicates.load(Ordering::Relaxed),
            counts.rejected.load(Ordering::Relaxed),
            counts.round_trips.load(Ordering::Relaxed),
            problems,
        ))
    }

    /// [`PhaseCtx::engine`] on `store` behind [`Coalescing`], unless the
    /// bench runs without it.
    async fn engine_on<S: DedupStore + 'static, H: Handler>(
        &self,
        config: ConfigKind,
        store: S,
        handler: H,
        scope: &str,
        calls: Arc<AtomicU64>,
    ) -> Result<PhaseResult, BoxError> {
        match self.s.store_in_flight {
            Some(n) => {
                self.engine(config, coalesce(store, n), handler, scope, calls)
                    .await
            }
            None => self.engine(config, store, handler, scope, calls).await,
        }
    }

    async fn engine<S: DedupStore, H: Handler>(
        &self,
        config: ConfigKind,
        store: S,
        handler: H,
        scope: &str,
        calls: Arc<AtomicU64>,
    ) -> Result<PhaseResult, BoxError> {
        let cfg = self.rabbit_config(config.name());
        self.prepare(&cfg).await?;
        let meter = Meter::new(self.mix.ids.len() as u64);
        reset_peak_rss();
        let broker = match RabbitBroker::connect(cfg.clone()).await {
            Ok(b) => b,
            Err(e) => {
                let _ = delete_topology(&cfg).await;
                return Err(e.into());
            }
        };
        let engine = Engine::builder(
            TimedBroker::new(broker.clone(), meter.clone()),
            store,
            handler,
        )
        .scope(scope)
        .concurrency(usize::from(self.s.concurrency))
        .lease(LEASE)
        .keep_for(KEEP)
        .max_attempts(1)
        .shutdown_grace(Duration::from_secs(5))
        .build()?;
        let stop = CancellationToken::new();
        let bar = self.watch(meter.clone(), stop.clone(), config.name());
        let report = engine.run(stop.clone()).await;
        stop.cancel();
        bar.finish_and_clear();
        let elapsed = meter.elapsed();
        broker.close().await;
        let mut problems = Vec::new();
        let expect = self.mix.unique - self.mix.failing_unique;
        if report.handled != expect {
            problems.push(format!(
                "handled {} unique messages, published {expect} unique (not failing) ids",
                report.handled
            ));
        }
        if report.dead_lettered != self.mix.failing_unique {
            problems.push(format!(
                "dead-lettered {}, expected {}",
                report.dead_lettered, self.mix.failing_unique
            ));
        }
        self.check_settled(&meter, &mut problems);
        self.drain_check(&cfg, self.mix.failing_unique, &mut problems)
            .await;
        Ok(self.result(
            config.name(),
            Some(config.baseline().name()),
            &meter,
            elapsed,
            report.handled,
            report.duplicates + report.dead_duplicates,
            report.dead_lettered,
            calls.load(Ordering::Relaxed),
            problems,
        ))
    }

    fn check_settled(&self, meter: &Meter, problems: &mut Vec<String>) {
        if meter.settled() != meter.target {
            problems.push(format!(
                "settled {} deliveries of {} published (stalled for {:?}?)",
                meter.settled(),
                meter.target,
                self.s.stall_timeout
            ));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        name: &str,
        baseline: Option<&str>,
        meter: &Meter,
        elapsed: Duration,
        handled: u64,
        duplicates: u64,
        failed: u64,
        round_trips: u64,
        problems: Vec<String>,
    ) -> PhaseResult {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let (p50, p99) = meter.percentiles();
        PhaseResult {
            name: name.to_owned(),
            baseline: baseline.map(str::to_owned),
            messages: meter.settled(),
            handled,
            duplicates,
            failed,
            seconds: secs,
            unique_per_sec: self.mix.unique as f64 / secs,
            msgs_per_sec: meter.settled() as f64 / secs,
            p50_ms: p50,
            p99_ms: p99,
            peak_rss_mib: peak_rss_kib().map(|k| k as f64 / 1024.0),
            round_trips_per_unique: round_trips as f64 / self.mix.unique.max(1) as f64,
            ratio_to_baseline: None,
            ok: problems.is_empty(),
            problems,
            rss_is_per_phase: self.rss_reset,
        }
    }
}

/// The engine's lease and the baselines' claim TTL.
const LEASE: Duration = Duration::from_secs(60);
/// The dedup window of both.
const KEEP: Duration = Duration::from_secs(600);

/// Resets the kernel's peak-RSS mark of this process (`VmHWM`), so the
/// next reading is the peak of the next phase. False where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident set size (`VmHWM`) in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
