//! One chaos run: set up, publish while the driver wreaks havoc, calm
//! down, drain, stop, then check everything and print one summary line.
//!
//! One file, past 600 lines, because the checks at the end read every
//! figure the run collected; splitting them from the run would pass that
//! state around for nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idemq::replay::DeadLetterQueue;
use idemq::testing::{service_unavailable, unique_scope};
use idemq::{DedupStore, Handler, OutgoingMessage, headers};
use idemq_rabbitmq::{
    RabbitConfig, RabbitDeadLetters, RabbitPublisher, delete_topology, queue_depths,
};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::counters;
use crate::driver::{Driver, StopRecord, Views, describe};
use crate::net::{Service, amqp_url};
use crate::outcome::{Kind, kind, message_id, parse_id};
use crate::settings::Settings;
use crate::track::{COPY_HEADER, Effect, Tracker, copy_of};

/// The retry tiers of the run's queues: retries and deferrals come back
/// within a second.
pub fn retry_tiers() -> [Duration; 2] {
    [Duration::from_millis(200), Duration::from_secs(1)]
}

/// How the dedup store and the effects work in one kind of run.
#[async_trait]
pub trait Mode: Send + Sync + 'static {
    /// Short name, for the summary.
    fn name(&self) -> &'static str;
    /// Whether duplicate effects are a failure (transactional effects) or
    /// only counted.
    fn exactly_once(&self) -> bool;
    /// Where the store listens (the store proxies forward there).
    fn store_upstream(&self) -> SocketAddr;
    /// A store and a handler for one engine incarnation, talking to the
    /// store through `via` (its proxy).
    async fn engine_parts(
        &self,
        via: SocketAddr,
        engine: usize,
        inc: u32,
        tracker: &Arc<Tracker>,
    ) -> Result<(Arc<dyn DedupStore>, Arc<dyn Handler>), String>;
    /// Every effect that took place, per id.
    async fn effects(&self, tracker: &Tracker) -> Result<HashMap<u32, Vec<Effect>>, String>;
    /// Deletes what the run created in the store.
    async fn cleanup(&self) -> Result<(), String>;
}

/// What the driver, the monitor and the checks share.
pub struct Ctx {
    /// Settings.
    pub settings: Settings,
    /// The dedup scope of every engine.
    pub scope: String,
    /// The work queue.
    pub queue: String,
    /// RabbitMQ.
    pub amqp: Service,
    /// The store side.
    pub mode: Arc<dyn Mode>,
    /// Copies, deliveries, runs, effects.
    pub tracker: Arc<Tracker>,
    /// Chaos counters.
    pub counts: crate::driver::Counts,
    /// The start of the run.
    pub epoch: Instant,
    events: Mutex<Vec<String>>,
}

impl Ctx {
    /// Notes an event of the run (printed when a check fails).
    pub fn log(&self, line: impl AsRef<str>) {
        let line = format!(
            "[{:7.2}s] {}",
            self.epoch.elapsed().as_secs_f64(),
            line.as_ref()
        );
        if std::env::var_os("IDEMQ_CHAOS_VERBOSE").is_some() {
            eprintln!("{line}");
        }
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }

    /// A RabbitMQ configuration on the run's queues, straight to the server.
    pub fn direct_config(&self) -> RabbitConfig {
        RabbitConfig::new(self.amqp.direct(), self.queue.clone())
            .with_retry_tiers(retry_tiers())
            .with_connect_timeout(Duration::from_secs(10))
    }
}

/// The RabbitMQ service, or `None` (skip) when it is unreachable.
pub async fn rabbitmq() -> Option<Service> {
    let service = match Service::resolve(&amqp_url(), 5672).await {
        Ok(s) => s,
        Err(e) => return service_unavailable("rabbitmq", e),
    };
    match probe(service.upstream).await {
        Ok(()) => Some(service),
        Err(e) => service_unavailable("rabbitmq", e),
    }
}

/// Whether `addr` takes TCP connections (within 2 s).
pub async fn probe(addr: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("{addr}: no answer within 2 s")),
    }
}

/// What the monitor saw.
#[derive(Debug, Default)]
struct Watch {
    stuck: Vec<String>,
    stuck_copies: usize,
    reconnects: Vec<String>,
    max_reconnect: Duration,
    max_work_depth: u32,
}

/// Polls the queues and the engines' connections while the run goes on:
/// copies held hostage outside every engine's hands while the work queue
/// is empty, and brokers slow to reconnect after their link came back.
async fn monitor(ctx: Arc<Ctx>, views: Views, stop: CancellationToken) -> Watch {
    let s = &ctx.settings;
    let config = ctx.direct_config();
    let mut watch = Watch::default();
    let mut empty_since: Option<Instant> = None;
    let mut consumers = 0;
    let mut retrying = 0u32;
    // Per engine: (incarnation, down since) of an ongoing disconnection.
    let mut down: Vec<Option<(u32, Instant, bool)>> = vec![None; s.engines];
    // A copy whose settlement failed against the store may wait out the
    // engines' (default) failure backoff before the next try, plus the
    // store's own operation timeout.
    let store_grace = idemq::EngineConfig::default().failure_backoff().max + s.store_timeout;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep(Duration::from_millis(500)) => {}
        }
        let now = Instant::now();
        let stats = idemq_rabbitmq::queue_stats(&config).await.ok();
        if let Some(stats) = &stats {
            retrying = stats
                .iter()
                .filter(|q| matches!(q.role, idemq_rabbitmq::QueueRole::Retry(_)))
                .map(|q| q.messages)
                .sum();
        }
        let work = stats.and_then(|stats| {
            stats
                .into_iter()
                .find(|q| q.role == idemq_rabbitmq::QueueRole::Work)
        });
        if let Some(work) = work {
            consumers = work.consumers;
            watch.max_work_depth = watch.max_work_depth.max(work.messages);
            if work.messages == 0 {
                empty_since.get_or_insert(now);
            } else {
                empty_since = None;
            }
        } else {
            empty_since = None;
        }
        if std::env::var_os("IDEMQ_CHAOS_VERBOSE").is_some() {
            ctx.log(format!(
                "monitor: work queue empty for {:?}, oldest idle copy {:?}; {}",
                empty_since.map(|t| now - t),
                ctx.tracker.oldest_idle(),
                describe(&views)
            ));
        }
        // Empty at two polls in a row: a copy idle for long is not waiting
        // in the work queue behind others, it is held by a consumer.
        if empty_since.is_some_and(|t| now - t >= Duration::from_millis(400)) {
            let stuck = ctx.tracker.newly_stuck(s.stuck_after, store_grace);
            if !stuck.is_empty() {
                watch.stuck_copies += stuck.len();
                let sample: Vec<String> = stuck
                    .iter()
                    .take(4)
                    .map(|c| {
                        format!(
                            "copy {} of id {} ({:.1}s idle: {})",
                            c.copy,
                            c.id,
                            c.untouched.as_secs_f64(),
                            c.history
                        )
                    })
                    .collect();
                let line = format!(
                    "at {:.1}s, {} message copies sat unsettled, untouched for over {:?} and in no \
                     handler while the work queue was empty: held back by a consumer (in its \
                     prefetch, or taken and kept while it backs off from its store) while \
                     others could have handled them, or lost, or (if the retry queues hold \
                     any) kept in a retry queue far past its 1 s TTL; e.g. {}; engines \
                     then: {}; consumers on the work queue: {consumers} (one per running \
                     engine expected); messages in the retry queues: {retrying}",
                    ctx.epoch.elapsed().as_secs_f64(),
                    stuck.len(),
                    s.stuck_after,
                    sample.join(", "),
                    describe(&views)
                );
                ctx.log(&line);
                watch.stuck.push(line);
            }
        }
        let snapshot = views.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (engine, view) in snapshot.iter().enumerate() {
            let (Some((inc, broker)), Some(ok_since), false) =
                (&view.broker, view.amqp_ok_since, view.stopping)
            else {
                down[engine] = None;
                continue;
            };
            let connected = broker.is_connected();
            match (&mut down[engine], connected) {
                (Some((i, since, _)), true) if i == inc => {
                    let took = now.saturating_duration_since((*since).max(ok_since));
                    watch.max_reconnect = watch.max_reconnect.max(took);
                    down[engine] = None;
                }
                (Some((i, since, reported)), false) if i == inc => {
                    let took = now.saturating_duration_since((*since).max(ok_since));
                    if took > s.reconnect_bound && !*reported {
                        *reported = true;
                        let line = format!(
                            "e{engine} (incarnation {inc}) still not reconnected to RabbitMQ {:.1}s \
                             after its link was restored (bound {:?}; generation {:?}) at {:.1}s",
                            took.as_secs_f64(),
                            s.reconnect_bound,
                            broker.generation(),
                            ctx.epoch.elapsed().as_secs_f64()
                        );
                        ctx.log(&line);
                        watch.reconnects.push(line);
                    }
                }
                (_, false) => down[engine] = Some((*inc, now, false)),
                (_, true) => down[engine] = None,
            }
        }
    }
    for (engine, d) in down.iter().enumerate() {
        if let Some((inc, since, false)) = d {
            let took = since.elapsed();
            watch.max_reconnect = watch.max_reconnect.max(took);
            if took > s.reconnect_bound {
                watch.reconnects.push(format!(
                    "e{engine} (incarnation {inc}) never reconnected to RabbitMQ ({:.1}s)",
                    took.as_secs_f64()
                ));
            }
        }
    }
    watch
}

/// Publishes every id once, and a tenth of them a second time a little
/// later, spread over `window`; every copy numbered in [`COPY_HEADER`].
/// Answers (copies published, failures).
async fn publish(ctx: Arc<Ctx>, window: Duration) -> (u64, Vec<String>) {
    let ids = ctx.settings.ids;
    let mut plan: Vec<u32> = Vec::with_capacity(ids as usize * 11 / 10);
    let mut later: Vec<(u32, u32)> = Vec::new();
    for id in 0..ids {
        plan.push(id);
        if id % 10 == 3 {
            later.push((id + 40, id));
        }
        while later.first().is_some_and(|(due, _)| *due <= id) {
            plan.push(later.remove(0).1);
        }
    }
    plan.extend(later.into_iter().map(|(_, id)| id));
    let publisher = match RabbitPublisher::connect(ctx.direct_config()).await {
        Ok(p) => p,
        Err(e) => return (0, vec![format!("publisher could not connect: {e}")]),
    };
    let start = Instant::now();
    let per_copy = window.div_f64(plan.len() as f64);
    let mut failures = Vec::new();
    let mut published = 0;
    for (n, id) in plan.iter().enumerate() {
        let due = start + per_copy.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        let copy = n as u64;
        ctx.tracker.published(copy, *id);
        let msg = OutgoingMessage::new(id.to_string())
            .with_message_id(message_id(*id))
            .with_header(COPY_HEADER, copy as i64);
        let mut tries = 0;
        loop {
            tries += 1;
            match publisher.publish(msg.clone()).await {
                Ok(()) => {
                    published += 1;
                    break;
                }
                Err(e) if tries < 5 => {
                    ctx.log(format!("publish of copy {copy} failed ({e}); again"));
                    sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    failures.push(format!("publishing copy {copy} (id {id}) failed: {e}"));
                    break;
                }
            }
        }
    }
    publisher.close().await;
    (published, failures)
}

/// One dead letter, as read from the dead-letter queue.
#[derive(Clone, Debug)]
struct Dead {
    copy: Option<u64>,
    reason: Option<String>,
    attempts: Option<i64>,
    detail: String,
}

/// Reads (and removes) every dead letter; answers them per id, and
/// dead letters that carry no id of this run.
async fn read_dead_letters(ctx: &Ctx) -> Result<(HashMap<u32, Vec<Dead>>, usize), String> {
    let dlq = RabbitDeadLetters::connect(ctx.direct_config())
        .await
        .map_err(|e| format!("dead-letter queue: {e}"))?;
    let mut out: HashMap<u32, Vec<Dead>> = HashMap::new();
    let mut strays = 0;
    let read = async {
        while let Some(d) = dlq.take().await.map_err(|e| format!("take: {e}"))? {
            let dead = Dead {
                copy: copy_of(&d),
                reason: d
                    .header(headers::REASON)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
                attempts: d.header(headers::ATTEMPTS).and_then(|v| v.as_i64()),
                detail: d
                    .header(headers::DETAIL)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned(),
            };
            match d.message_id.as_deref().and_then(parse_id) {
                Some(id) => out.entry(id).or_default().push(dead),
                None => strays += 1,
            }
            dlq.remove(&d).await.map_err(|e| format!("remove: {e}"))?;
        }
        Ok::<_, String>(())
    };
    let r = read.await;
    dlq.put_back(Vec::new()).await.ok();
    dlq.close().await;
    r.map(|()| (out, strays))
}

/// Runs one chaos test with `mode`'s store; panics with every failed
/// check, after cleaning up.
pub async fn run(mode: Arc<dyn Mode>, amqp: Service, settings: Settings) {
    counters::install();
    let epoch = Instant::now();
    let scope = unique_scope(&format!("chaos-{}", mode.name()));
    let ctx = Arc::new(Ctx {
        queue: format!("idemq-chaos.{scope}"),
        scope,
        amqp,
        mode: mode.clone(),
        tracker: Tracker::new(settings.max_attempts, epoch),
        counts: Default::default(),
        epoch,
        events: Mutex::default(),
        settings,
    });
    let s = ctx.settings.clone();
    ctx.log(format!(
        "run {} on queue {}: {} ids, chaos {:?}, partition {:?}, lease {:?}, seed {}",
        mode.name(),
        ctx.queue,
        s.ids,
        s.chaos,
        s.partition,
        s.lease,
        s.seed
    ));
    let mut failures: Vec<String> = Vec::new();
    let outcome = exercise(&ctx, &mut failures).await;
    // Clean up before judging, so a failed run leaves nothing behind.
    if let Err(e) = delete_topology(&ctx.direct_config()).await {
        failures.push(format!("cleanup: deleting the queues failed: {e}"));
    }
    if let Err(e) = mode.cleanup().await {
        failures.push(format!("cleanup: {e}"));
    }
    if let Some(summary) = outcome {
        println!("{summary}");
    }
    if !failures.is_empty() {
        let events = ctx.events.lock().unwrap_or_else(|p| p.into_inner());
        let mut msg = format!(
            "chaos run ({}) failed {} check(s):\n",
            mode.name(),
            failures.len()
        );
        for f in &failures {
            let _ = writeln!(msg, "  - {f}");
        }
        let _ = writeln!(msg, "chaos events (seed {}):", s.seed);
        for e in events.iter() {
            let _ = writeln!(msg, "    {e}");
        }
        panic!("{msg}");
    }
}

/// Everything between setup and cleanup; answers the summary line.
async fn exercise(ctx: &Arc<Ctx>, failures: &mut Vec<String>) -> Option<String> {
    let s = ctx.settings.clone();
    if let Err(e) = idemq_rabbitmq::topology::declare(&ctx.direct_config()).await {
        failures.push(format!("declaring the queues failed: {e}"));
        return None;
    }
    let mut driver = match Driver::start(ctx.clone()).await {
        Ok(d) => d,
        Err(e) => {
            failures.push(format!("starting the engines failed: {e}"));
            return None;
        }
    };
    let stop_monitor = CancellationToken::new();
    let watcher = tokio::spawn(monitor(
        ctx.clone(),
        driver.views.clone(),
        stop_monitor.clone(),
    ));
    let publisher = tokio::spawn(publish(ctx.clone(), s.chaos.mul_f64(0.8)));

    // The chaos.
    driver.run(ctx.epoch).await;
    let (published, publish_failures) = match publisher.await {
        Ok(r) => r,
        Err(e) => (0, vec![format!("publisher task failed: {e}")]),
    };
    failures.extend(publish_failures);
    if let Err(e) = driver.calm().await {
        failures.push(e);
    }

    // Drain: every copy settled for good, nothing held, the work and retry
    // queues empty, twice in a row.
    let config = ctx.direct_config();
    let drain_start = Instant::now();
    let mut quiet = 0;
    loop {
        sleep(Duration::from_millis(500)).await;
        let depths = queue_depths(&config).await;
        let (live, held) = ctx.tracker.pending();
        let queued = depths
            .as_ref()
            .map(|d| d.work + d.retry.iter().map(|(_, n)| n).sum::<u32>());
        if matches!(queued, Ok(0)) && live.is_empty() && held == 0 {
            quiet += 1;
            if quiet >= 2 {
                break;
            }
            continue;
        }
        quiet = 0;
        if drain_start.elapsed() > s.drain_timeout {
            let sample: Vec<String> = live
                .iter()
                .take(10)
                .map(|(copy, id)| format!("copy {copy} (id {id}, {:?})", kind(*id)))
                .collect();
            let consumers = idemq_rabbitmq::queue_stats(&config)
                .await
                .ok()
                .and_then(|stats| {
                    stats
                        .into_iter()
                        .find(|q| q.role == idemq_rabbitmq::QueueRole::Work)
                })
                .map(|q| q.consumers);
            failures.push(format!(
                "not drained {:?} after the chaos ended: queues {depths:?}, {} copies not \
                 settled for good (e.g. {}), {held} deliveries in engines' hands; engines: {}; \
                 consumers on the work queue: {consumers:?} ({} engines)",
                s.drain_timeout,
                live.len(),
                sample.join(", "),
                describe(&driver.views),
                s.engines
            ));
            break;
        }
    }
    let drained_after = drain_start.elapsed();
    ctx.log(format!("drained after {drained_after:.1?}"));
    driver.stop_all().await;
    stop_monitor.cancel();
    let watch = watcher.await.unwrap_or_default();
    failures.extend(driver.exits.iter().map(|e| format!("engine exited: {e}")));

    // Judge. Every engine is stopped and its broker closed: no consumer
    // may be left on the work queue (a connection the backend abandoned
    // but did not close would hold deliveries for good).
    let mut leftover = None;
    for _ in 0..10 {
        leftover = idemq_rabbitmq::queue_stats(&config)
            .await
            .ok()
            .and_then(|stats| {
                stats
                    .into_iter()
                    .find(|q| q.role == idemq_rabbitmq::QueueRole::Work)
            })
            .map(|q| q.consumers);
        if leftover == Some(0) {
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    if let Some(n @ 1..) = leftover {
        failures.push(format!(
            "ZOMBIE CONSUMER: {n} consumer(s) still on the work queue 5 s after every engine \
             was stopped and its broker closed: a broker connection the backend abandoned \
             (lapin recovered it after a rebuild, say) kept consuming, holding its deliveries"
        ));
    }
    let final_depths = queue_depths(&config).await;
    match &final_depths {
        Ok(d) if d.work == 0 && d.retry.iter().all(|(_, n)| *n == 0) => {}
        other => failures.push(format!(
            "queues not empty at the end (engines stopped): {other:?}"
        )),
    }
    let (dead, strays) = match read_dead_letters(ctx).await {
        Ok(d) => d,
        Err(e) => {
            failures.push(format!("reading the dead-letter queue failed: {e}"));
            (HashMap::new(), 0)
        }
    };
    if strays > 0 {
        failures.push(format!(
            "{strays} dead letters carry no message id of this run"
        ));
    }
    let effects = match ctx.mode.effects(&ctx.tracker).await {
        Ok(e) => e,
        Err(e) => {
            failures.push(format!("reading the effects failed: {e}"));
            HashMap::new()
        }
    };
    let stops = driver
        .stops
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let verdict = judge(ctx, &effects, &dead, &stops, &watch, failures);

    let total = |event: &str| counters::total(&ctx.scope, event);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for d in dead.values().flatten() {
        *reasons
            .entry(d.reason.clone().unwrap_or_else(|| "none".into()))
            .or_default() += 1;
    }
    let max_shutdown = stops.iter().map(|r| r.took).max().unwrap_or_default();
    let reasons = reasons
        .iter()
        .map(|(r, n)| format!("{r}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    Some(format!(
        "CHAOS SUMMARY mode={} seed={} published={published} unique={} handled={} effects={} \
         duplicate_effects={}{} dead_lettered={{{reasons}}} burned={} max_attempt={} \
         lease_lost={} cuts={} blackholes={} aborts={} restarts={} stops={} \
         partition_secs={:.1} max_shutdown={:.2}s max_reconnect={:.1}s stuck_copies={} \
         store_errors={} broker_errors={} requeued={} released={} deferred={} retried={} \
         duplicates={} dead_duplicates={} drain={:.1}s elapsed={:.1}s",
        ctx.mode.name(),
        s.seed,
        s.ids,
        total("handled"),
        verdict.effect_ids,
        verdict.duplicate_effects,
        verdict.causes,
        verdict.burned,
        verdict.max_attempt,
        total("lease_lost"),
        ctx.counts.cuts.load(std::sync::atomic::Ordering::Relaxed),
        ctx.counts
            .blackholes
            .load(std::sync::atomic::Ordering::Relaxed),
        ctx.counts.aborts.load(std::sync::atomic::Ordering::Relaxed),
        ctx.counts
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed),
        ctx.counts.stops.load(std::sync::atomic::Ordering::Relaxed),
        ctx.counts
            .partition_ms
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1000.0,
        max_shutdown.as_secs_f64(),
        watch.max_reconnect.as_secs_f64(),
        watch.stuck_copies,
        total("store_errors"),
        total("broker_errors"),
        total("requeued"),
        total("released"),
        total("deferred"),
        total("retried"),
        total("duplicates"),
        total("dead_duplicates"),
        drained_after.as_secs_f64(),
        ctx.epoch.elapsed().as_secs_f64(),
    ))
}

struct Verdict {
    effect_ids: usize,
    duplicate_effects: usize,
    causes: String,
    burned: usize,
    max_attempt: u32,
}

/// Why the earlier of two effects of one id did not stop the later one.
fn duplicate_cause(ctx: &Ctx, first: &Effect) -> &'static str {
    let c = ctx.tracker.completions(first.token);
    if c.applied > 0 {
        "completed-yet-handled-again"
    } else if c.lease_lost > 0 {
        "lease-lost"
    } else if c.errors > 0 {
        "complete-failed"
    } else if ctx.tracker.was_aborted(first.inc) {
        "crash-before-complete"
    } else {
        "unknown"
    }
}

/// The checks; failures are appended with what they saw.
fn judge(
    ctx: &Ctx,
    effects: &HashMap<u32, Vec<Effect>>,
    dead: &HashMap<u32, Vec<Dead>>,
    stops: &[StopRecord],
    watch: &Watch,
    failures: &mut Vec<String>,
) -> Verdict {
    let s = &ctx.settings;
    let max = s.max_attempts;
    let mut lost = Vec::new();
    let mut duplicates = Vec::new();
    let mut duplicate_effects = 0;
    let mut causes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut bad_poison = Vec::new();
    let mut bad_exhaust = Vec::new();
    let mut wrong_reason = Vec::new();
    let mut burned = 0;
    let mut max_attempt = ctx.tracker.max_attempt();
    for id in 0..s.ids {
        let eff = effects.get(&id).map_or(&[][..], Vec::as_slice);
        let letters = dead.get(&id).map_or(&[][..], Vec::as_slice);
        let k = kind(id);
        if eff.is_empty() && letters.is_empty() {
            let runs = ctx.tracker.runs(id);
            lost.push(format!("{id} ({k:?}, {} handler runs)", runs.len()));
        }
        if eff.len() > 1 {
            duplicate_effects += eff.len() - 1;
            for e in &eff[..eff.len() - 1] {
                *causes.entry(duplicate_cause(ctx, e)).or_default() += 1;
            }
            let runs: Vec<String> = eff
                .iter()
                .map(|e| format!("e{}/i{}/attempt {}", e.engine, e.inc, e.attempt))
                .collect();
            duplicates.push(format!("{id}: {}", runs.join(" + ")));
        }
        if !eff.is_empty() && !k.succeeds() {
            unexpected.push(format!("{id} ({k:?}): {} effects", eff.len()));
        }
        let has = |reason: &str| letters.iter().any(|d| d.reason.as_deref() == Some(reason));
        match k {
            Kind::Poison if !(has("permanent") || has("max-attempts")) => {
                bad_poison.push(format!("{id}: {letters:?}"));
            }
            Kind::Exhaust if !has("max-attempts") => {
                bad_exhaust.push(format!("{id}: {letters:?}"));
            }
            _ if k.succeeds() && !letters.is_empty() => {
                // Chaos can use up a succeeding id's attempts (claims whose
                // answer was lost, crashes): then only `max-attempts` fits.
                if letters
                    .iter()
                    .all(|d| d.reason.as_deref() == Some("max-attempts"))
                {
                    burned += 1;
                } else {
                    wrong_reason.push(format!("{id} ({k:?}): {letters:?}"));
                }
            }
            _ => {}
        }
        for d in letters {
            match d.attempts {
                Some(n) if n >= 0 && n as u64 <= u64::from(max) => {
                    max_attempt = max_attempt.max(n as u32);
                }
                _ => wrong_reason.push(format!(
                    "{id}: dead letter (copy {:?}, reason {:?}, detail {:?}) has attempts \
                     header {:?}, expected 0..={max}",
                    d.copy, d.reason, d.detail, d.attempts
                )),
            }
            if d.reason.is_none() {
                wrong_reason.push(format!("{id}: dead letter without a reason header: {d:?}"));
            }
        }
    }
    let list = |v: &[String]| {
        let mut out = v.iter().take(12).cloned().collect::<Vec<_>>().join("; ");
        if v.len() > 12 {
            let _ = write!(out, "; ... ({} in all)", v.len());
        }
        out
    };
    if !lost.is_empty() {
        failures.push(format!(
            "LOST: {} ids have neither an effect nor a dead letter: {}",
            lost.len(),
            list(&lost)
        ));
    }
    if ctx.mode.exactly_once() && !duplicates.is_empty() {
        failures.push(format!(
            "DUPLICATE EFFECTS in transactional mode: {} ids took effect more than once \
             (engine/incarnation/attempt of each effect): {}",
            duplicates.len(),
            list(&duplicates)
        ));
    }
    if !unexpected.is_empty() {
        failures.push(format!(
            "effects of ids whose handler never succeeds (rolled-back writes that stayed): {}",
            list(&unexpected)
        ));
    }
    if !bad_poison.is_empty() {
        failures.push(format!(
            "poison ids not in the dead-letter queue with reason permanent (or max-attempts): {}",
            list(&bad_poison)
        ));
    }
    if !bad_exhaust.is_empty() {
        failures.push(format!(
            "always-failing ids not in the dead-letter queue with reason max-attempts: {}",
            list(&bad_exhaust)
        ));
    }
    if !wrong_reason.is_empty() {
        failures.push(format!("bad dead letters: {}", list(&wrong_reason)));
    }
    let over = ctx.tracker.over_limit();
    if !over.is_empty() {
        failures.push(format!(
            "handler ran past max_attempts {max}: {}",
            list(&over)
        ));
    }
    if ctx.tracker.foreign() > 0 {
        failures.push(format!(
            "{} deliveries without the {COPY_HEADER} header reached the engines",
            ctx.tracker.foreign()
        ));
    }
    let lease_lost = counters::total(&ctx.scope, "lease_lost");
    if lease_lost != 0 {
        failures.push(format!(
            "FALSE LEASE LOST: the engines counted lease_lost = {lease_lost}, but no lease can \
             lapse in this run (lease {:?}, more than twice the partition of {:?}, handlers \
             take milliseconds), so there was no genuine takeover: a settlement whose answer \
             was lost (or a rolled-back transactional commit) was taken for a lost lease",
            s.lease, s.partition
        ));
    }
    let bound = s.shutdown_grace + s.shutdown_slack;
    for r in stops {
        if r.hung || r.took > bound {
            failures.push(format!(
                "SHUTDOWN UNBOUNDED: e{} (incarnation {}) took {:.2}s{} to return from a graceful \
                 shutdown ({}), above shutdown_grace {:?} + {:?}; report {:?}",
                r.engine,
                r.inc,
                r.took.as_secs_f64(),
                if r.hung { " and was aborted" } else { "" },
                r.during,
                s.shutdown_grace,
                s.shutdown_slack,
                r.report
            ));
        }
        if let Some(report) = &r.report
            && !matches!(report.stopped, idemq::Stopped::Shutdown)
        {
            failures.push(format!(
                "e{} (incarnation {}) was asked to shut down but stopped: {}",
                r.engine, r.inc, report.stopped
            ));
        }
    }
    for line in &watch.stuck {
        failures.push(format!("HOARDED: {line}"));
    }
    for line in &watch.reconnects {
        failures.push(format!("RECONNECT STALLED: {line}"));
    }
    let causes = if ctx.mode.exactly_once() || causes.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = causes.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        format!(" duplicate_causes={{{}}}", parts.join(","))
    };
    Verdict {
        effect_ids: effects.values().filter(|e| !e.is_empty()).count(),
        duplicate_effects,
        causes,
        burned,
        max_attempt,
    }
}
