//! The chaos driver: starts the engines, then for the length of the chaos
//! cuts and black-holes their links at random, crashes one (abort) and
//! restarts it, stops some gracefully (timing the shutdown) and restarts
//! them, and cuts one engine off from its store for a long stretch.
//!
//! One file, past 600 lines: the schedule of faults and the engine slots
//! it acts on change together.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemq::testing::FaultProxy;
use idemq::{Backoff, Engine, Report};
use idemq_rabbitmq::{RabbitBroker, RabbitConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::harness::{Ctx, retry_tiers};
use crate::track::{RecordedStore, TrackedBroker, TrackedHandler};

/// How long closing a crashed or stopped engine's broker may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown is waited for at most (far beyond its
/// bound; past this it is reported as hung and aborted).
const STOP_GIVE_UP: Duration = Duration::from_secs(60);

/// What the driver counts.
#[derive(Debug, Default)]
pub struct Counts {
    /// Links cut.
    pub cuts: AtomicU64,
    /// Links black-holed (the partition not included).
    pub blackholes: AtomicU64,
    /// Engine tasks aborted.
    pub aborts: AtomicU64,
    /// Engines (re)started after the first start.
    pub restarts: AtomicU64,
    /// Graceful stops.
    pub stops: AtomicU64,
    /// Total partition time, in milliseconds.
    pub partition_ms: AtomicU64,
}

/// One graceful stop.
#[derive(Clone, Debug)]
pub struct StopRecord {
    /// Engine slot.
    pub engine: usize,
    /// Incarnation.
    pub inc: u32,
    /// From the cancel to `run` returning.
    pub took: Duration,
    /// `run` had not returned after 60 s, when the driver gave up on it.
    pub hung: bool,
    /// What was going on (a store partition, say).
    pub during: String,
    /// The engine's report, when it returned.
    pub report: Option<Report>,
}

/// What the monitor needs to know of an engine.
#[derive(Clone, Default)]
pub struct View {
    /// The running incarnation and its broker.
    pub broker: Option<(u32, RabbitBroker)>,
    /// Since when the AMQP link passes traffic (`None`: faulted).
    pub amqp_ok_since: Option<Instant>,
    /// A graceful stop or crash is being carried out.
    pub stopping: bool,
    /// Cut off from its store by the partition.
    pub partitioned: bool,
    /// A random fault on its store link.
    pub store_faulted: bool,
}

/// The views of all engines, shared with the monitor.
pub type Views = Arc<Mutex<Vec<View>>>;

/// Describes the views, for failure messages.
pub fn describe(views: &Views) -> String {
    let views = views.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (i, v) in views.iter().enumerate() {
        let _ = write!(out, "e{i}:");
        match &v.broker {
            Some((inc, _)) => {
                let _ = write!(out, " inc {inc}");
            }
            None => out.push_str(" down"),
        }
        if v.stopping {
            out.push_str(" stopping");
        }
        if v.amqp_ok_since.is_none() {
            out.push_str(" amqp-faulted");
        }
        if v.partitioned {
            out.push_str(" STORE-PARTITIONED");
        } else if v.store_faulted {
            out.push_str(" store-faulted");
        }
        out.push_str("; ");
    }
    out.trim_end_matches("; ").to_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Amqp,
    Store,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Restore {
        engine: usize,
        link: Link,
        token: u64,
    },
    Crash {
        engine: usize,
    },
    Stop {
        engine: usize,
    },
    Restart {
        engine: usize,
    },
    PartitionStart {
        engine: usize,
    },
    PartitionEnd {
        engine: usize,
    },
}

struct Running {
    inc: u32,
    broker: RabbitBroker,
    shutdown: CancellationToken,
    handle: JoinHandle<Report>,
}

struct Slot {
    amqp: FaultProxy,
    store: FaultProxy,
    run: Option<Running>,
    /// A crash clean-up or graceful stop under way.
    pending: Option<JoinHandle<()>>,
    amqp_fault: Option<u64>,
    store_fault: Option<u64>,
    amqp_ok_since: Option<Instant>,
    /// No new link fault before then: [`RECOVERY_GAP`] after the end of
    /// the last one.
    quiet_until: Option<Instant>,
    partitioned: Option<Instant>,
    /// Crashed: both links stay cut until the restart.
    down: bool,
}

/// Healthy time an engine gets after each link fault before the next one.
/// Without it faults chain on one engine (a store cut, then a black-holed
/// AMQP link, then another cut, each starting within 2 s of the last one's
/// end), and the deliveries RabbitMQ has handed to that engine's consumer
/// meanwhile stay with it for the whole chain, longer than the hoarding
/// check's bound, which assumes one fault at a time.
const RECOVERY_GAP: Duration = Duration::from_secs(3);

impl Slot {
    fn busy(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.is_finished())
    }
}

/// The driver.
pub struct Driver {
    ctx: Arc<Ctx>,
    slots: Vec<Slot>,
    actions: Vec<(Instant, Action)>,
    rng: StdRng,
    tokens: u64,
    incarnations: AtomicU32,
    /// Shared with the monitor.
    pub views: Views,
    /// Graceful stops, filled in by their waiter tasks.
    pub stops: Arc<Mutex<Vec<StopRecord>>>,
    /// Engines that stopped by themselves (`run` returned unasked).
    pub exits: Vec<String>,
}

impl Driver {
    /// Starts the proxies and every engine.
    pub async fn start(ctx: Arc<Ctx>) -> Result<Driver, String> {
        let mut slots = Vec::new();
        for _ in 0..ctx.settings.engines {
            let amqp = FaultProxy::start(ctx.amqp.upstream)
                .await
                .map_err(|e| format!("AMQP proxy: {e}"))?;
            let store = FaultProxy::start(ctx.mode.store_upstream())
                .await
                .map_err(|e| format!("store proxy: {e}"))?;
            slots.push(Slot {
                amqp,
                store,
                run: None,
                pending: None,
                amqp_fault: None,
                store_fault: None,
                amqp_ok_since: Some(Instant::now()),
                quiet_until: None,
                partitioned: None,
                down: false,
            });
        }
        let n = slots.len();
        let mut driver = Driver {
            rng: StdRng::seed_from_u64(ctx.settings.seed),
            ctx,
            slots,
            actions: Vec::new(),
            tokens: 0,
            incarnations: AtomicU32::new(0),
            views: Arc::new(Mutex::new(vec![View::default(); n])),
            stops: Arc::default(),
            exits: Vec::new(),
        };
        for engine in 0..n {
            driver.launch(engine).await?;
        }
        driver.sync_views();
        Ok(driver)
    }

    fn log(&self, line: impl AsRef<str>) {
        self.ctx.log(line);
    }

    /// Plans the crashes, stops and the partition: one cycle for a short
    /// run, one a minute for a long one.
    fn plan(&mut self, epoch: Instant) {
        let chaos = self.ctx.settings.chaos;
        let cycle = if chaos < Duration::from_secs(90) {
            chaos
        } else {
            Duration::from_secs(60)
        };
        let cycles = (chaos.as_secs() / cycle.as_secs()).max(1);
        let partition = self.ctx.settings.partition.min(cycle.mul_f64(0.55));
        let n = self.slots.len();
        for c in 0..cycles {
            let base = epoch + cycle * c as u32;
            let at = |f: f64| base + cycle.mul_f64(f);
            let crashed = c as usize % n;
            let stopped = (c as usize + 1) % n;
            let cut_off = (c as usize + 2) % n;
            self.at(at(0.1), Action::Crash { engine: crashed });
            self.at(
                at(0.1) + Duration::from_secs(1),
                Action::Restart { engine: crashed },
            );
            self.at(at(0.2), Action::Stop { engine: stopped });
            self.at(
                at(0.2) + Duration::from_millis(1500),
                Action::Restart { engine: stopped },
            );
            let p0 = at(0.3);
            self.at(p0, Action::PartitionStart { engine: cut_off });
            // A graceful stop while its store does not answer.
            self.at(
                p0 + partition - Duration::from_secs(3),
                Action::Stop { engine: cut_off },
            );
            self.at(p0 + partition, Action::PartitionEnd { engine: cut_off });
            self.at(
                p0 + partition + Duration::from_secs(1),
                Action::Restart { engine: cut_off },
            );
            self.at(at(0.9), Action::Stop { engine: crashed });
            self.at(
                at(0.9) + Duration::from_millis(1500),
                Action::Restart { engine: crashed },
            );
        }
    }

    fn at(&mut self, when: Instant, action: Action) {
        self.actions.push((when, action));
    }

    /// Runs the chaos until `epoch + chaos`.
    pub async fn run(&mut self, epoch: Instant) {
        self.plan(epoch);
        let end = epoch + self.ctx.settings.chaos;
        let faults_until = end - Duration::from_secs(1);
        let mut tick = epoch + Duration::from_secs(1);
        loop {
            self.reap_exits().await;
            let next_action = self.actions.iter().map(|(t, _)| *t).min();
            let mut wake = end.min(Instant::now() + Duration::from_millis(250));
            if let Some(t) = next_action {
                wake = wake.min(t);
            }
            if tick < faults_until {
                wake = wake.min(tick);
            }
            sleep_until(wake).await;
            let now = Instant::now();
            if now >= end {
                break;
            }
            if now >= tick && tick < faults_until {
                self.inject(Link::Amqp);
                self.inject(Link::Store);
                tick = now + Duration::from_millis(self.rng.random_range(1500..2500));
            }
            while let Some(i) = self.actions.iter().position(|(t, _)| *t <= now) {
                let (_, action) = self.actions.swap_remove(i);
                self.apply(action).await;
            }
            self.sync_views();
        }
    }

    /// A random fault on one link of a random engine that runs.
    fn inject(&mut self, link: Link) {
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                // The partitioned engine is left alone otherwise: a fault
                // on its broker link would hand back what it holds.
                s.run.is_some()
                    && !s.busy()
                    && !s.down
                    && s.partitioned.is_none()
                    && s.quiet_until.is_none_or(|t| Instant::now() >= t)
                    && match link {
                        Link::Amqp => s.amqp_fault.is_none(),
                        Link::Store => s.store_fault.is_none(),
                    }
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let engine = candidates[self.rng.random_range(0..candidates.len())];
        let cut = self.rng.random_bool(0.7);
        let len = if cut {
            Duration::from_millis(self.rng.random_range(200..1000))
        } else if link == Link::Amqp {
            Duration::from_millis(self.rng.random_range(1000..3000))
        } else {
            Duration::from_millis(self.rng.random_range(1000..2000))
        };
        self.tokens += 1;
        let token = self.tokens;
        let slot = &mut self.slots[engine];
        slot.quiet_until = Some(Instant::now() + len + RECOVERY_GAP);
        let proxy = match link {
            Link::Amqp => {
                slot.amqp_fault = Some(token);
                slot.amqp_ok_since = None;
                &slot.amqp
            }
            Link::Store => {
                slot.store_fault = Some(token);
                &slot.store
            }
        };
        if cut {
            proxy.cut();
            self.ctx.counts.cuts.fetch_add(1, Ordering::Relaxed);
        } else {
            proxy.blackhole();
            self.ctx.counts.blackholes.fetch_add(1, Ordering::Relaxed);
        }
        self.log(format!(
            "{} {link:?} link of e{engine} for {len:?}",
            if cut { "cut" } else { "black-hole" }
        ));
        self.at(
            Instant::now() + len,
            Action::Restore {
                engine,
                link,
                token,
            },
        );
    }

    async fn apply(&mut self, action: Action) {
        match action {
            Action::Restore {
                engine,
                link,
                token,
            } => {
                let slot = &mut self.slots[engine];
                match link {
                    Link::Amqp if slot.amqp_fault == Some(token) && !slot.down => {
                        slot.amqp.restore();
                        slot.amqp_fault = None;
                        slot.amqp_ok_since = Some(Instant::now());
                    }
                    Link::Store
                        if slot.store_fault == Some(token)
                            && slot.partitioned.is_none()
                            && !slot.down =>
                    {
                        slot.store.restore();
                        slot.store_fault = None;
                    }
                    _ => {}
                }
            }
            Action::Crash { engine } => self.crash(engine).await,
            Action::Stop { engine } => self.stop(engine),
            Action::Restart { engine } => self.restart(engine).await,
            Action::PartitionStart { engine } => {
                let slot = &mut self.slots[engine];
                slot.store_fault = None;
                slot.store.blackhole();
                slot.partitioned = Some(Instant::now());
                self.log(format!(
                    "PARTITION: e{engine} cut off from its store (black hole)"
                ));
            }
            Action::PartitionEnd { engine } => self.end_partition(engine),
        }
    }

    fn end_partition(&mut self, engine: usize) {
        let slot = &mut self.slots[engine];
        if let Some(since) = slot.partitioned.take() {
            slot.store.restore();
            let ms = since.elapsed().as_millis() as u64;
            self.ctx
                .counts
                .partition_ms
                .fetch_add(ms, Ordering::Relaxed);
            self.log(format!("partition of e{engine} over after {ms} ms"));
        }
    }

    async fn crash(&mut self, engine: usize) {
        let slot = &mut self.slots[engine];
        if slot.busy() || slot.partitioned.is_some() {
            self.log(format!("crash of e{engine} skipped (busy or partitioned)"));
            return;
        }
        let Some(run) = slot.run.take() else {
            return;
        };
        run.handle.abort();
        let _ = timeout(Duration::from_secs(1), run.handle).await;
        // The process is gone: so are its connections (the broker requeues
        // what it held, Postgres rolls back its open transactions).
        slot.amqp.cut();
        slot.store.cut();
        slot.amqp_fault = None;
        slot.store_fault = None;
        slot.amqp_ok_since = None;
        slot.down = true;
        self.ctx.tracker.aborted(run.inc);
        self.ctx.counts.aborts.fetch_add(1, Ordering::Relaxed);
        let broker = run.broker;
        let ctx = self.ctx.clone();
        slot.pending = Some(tokio::spawn(async move {
            // Stops the dead engine's connection supervisor.
            if timeout(CLOSE_TIMEOUT, broker.close()).await.is_err() {
                ctx.log(format!(
                    "closing crashed e{engine}'s broker took over {CLOSE_TIMEOUT:?}"
                ));
            }
        }));
        self.log(format!(
            "CRASH: e{engine} (incarnation {}) aborted",
            run.inc
        ));
    }

    fn stop(&mut self, engine: usize) {
        let slot = &mut self.slots[engine];
        if slot.busy() || slot.run.is_none() {
            self.log(format!("stop of e{engine} skipped (not running)"));
            return;
        }
        if slot.amqp_fault.is_some() {
            // Stops are timed against a reachable broker: wait for the link
            // (a random fault lasts 3 s at most).
            let when = Instant::now() + Duration::from_millis(300);
            self.at(when, Action::Stop { engine });
            return;
        }
        let Some(run) = slot.run.take() else { return };
        let store = if slot.partitioned.is_some() {
            "its store partitioned"
        } else if slot.store_fault.is_some() {
            "a fault on its store link"
        } else {
            "store link healthy"
        };
        let amqp = match slot.amqp_ok_since {
            Some(t) => format!("AMQP link up for {:.1}s", t.elapsed().as_secs_f64()),
            None => "AMQP link faulted".to_owned(),
        };
        let during = format!(
            "{store}, {amqp}, broker {} (generation {:?})",
            if run.broker.is_connected() {
                "connected"
            } else {
                "NOT connected"
            },
            run.broker.generation()
        );
        self.ctx.counts.stops.fetch_add(1, Ordering::Relaxed);
        self.ctx.log(format!(
            "STOP: e{engine} (incarnation {}) asked to shut down ({during})",
            run.inc
        ));
        slot.pending = Some(tokio::spawn(stop_engine(
            self.ctx.clone(),
            engine,
            run,
            during,
            self.stops.clone(),
        )));
    }

    async fn restart(&mut self, engine: usize) {
        let slot = &mut self.slots[engine];
        if slot.run.is_some() {
            return;
        }
        if slot.busy() || slot.partitioned.is_some() {
            let when = Instant::now() + Duration::from_millis(250);
            self.at(when, Action::Restart { engine });
            return;
        }
        if slot.down {
            slot.amqp.restore();
            slot.store.restore();
            slot.down = false;
            slot.amqp_ok_since = Some(Instant::now());
        }
        if slot.amqp_fault.is_some() {
            let when = Instant::now() + Duration::from_millis(300);
            self.at(when, Action::Restart { engine });
            return;
        }
        match self.launch(engine).await {
            Ok(()) => {
                self.ctx.counts.restarts.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.log(format!("restart of e{engine} failed ({e}); again in 1 s"));
                let when = Instant::now() + Duration::from_secs(1);
                self.at(when, Action::Restart { engine });
            }
        }
    }

    /// Builds and spawns a new incarnation of engine `engine`.
    async fn launch(&mut self, engine: usize) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let s = &ctx.settings;
        let inc = self.incarnations.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = &mut self.slots[engine];
        let config = RabbitConfig::new(ctx.amqp.via(slot.amqp.addr()), ctx.queue.clone())
            .with_retry_tiers(retry_tiers())
            .with_publish_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(5))
            .with_connection_name(format!("idemq-chaos e{engine} i{inc}"));
        let broker = match timeout(Duration::from_secs(10), RabbitBroker::connect(config)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err("connect: no answer within 10 s".into()),
        };
        let (store, handler) = match ctx
            .mode
            .engine_parts(slot.store.addr(), engine, inc, &ctx.tracker)
            .await
        {
            Ok(parts) => parts,
            Err(e) => {
                broker.close().await;
                return Err(e);
            }
        };
        let built = Engine::builder(
            TrackedBroker {
                inner: broker.clone(),
                tracker: ctx.tracker.clone(),
                inc,
            },
            RecordedStore {
                inner: store,
                tracker: ctx.tracker.clone(),
            },
            TrackedHandler {
                inner: handler,
                tracker: ctx.tracker.clone(),
                engine,
                inc,
            },
        )
        .scope(ctx.scope.clone())
        .concurrency(s.concurrency)
        .lease(s.lease)
        .keep_for(Duration::from_secs(3600))
        .max_attempts(s.max_attempts)
        .retry_backoff(Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(1),
        ))
        // The failure backoff is the engine's default (100 ms doubling to
        // 10 s): what users run.
        .defer_bounds(Duration::from_millis(200), Duration::from_secs(1))
        .shutdown_grace(s.shutdown_grace)
        .build();
        let built = match built {
            Ok(e) => e,
            Err(e) => {
                broker.close().await;
                return Err(format!("engine: {e}"));
            }
        };
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(built.run(shutdown.clone()));
        slot.run = Some(Running {
            inc,
            broker,
            shutdown,
            handle,
        });
        self.log(format!("START: e{engine} incarnation {inc}"));
        Ok(())
    }

    /// Engines whose `run` returned without being asked to.
    async fn reap_exits(&mut self) {
        for engine in 0..self.slots.len() {
            let slot = &mut self.slots[engine];
            if !slot.run.as_ref().is_some_and(|r| r.handle.is_finished()) {
                continue;
            }
            let Some(run) = slot.run.take() else { continue };
            let stopped = match run.handle.await {
                Ok(report) => report.stopped.to_string(),
                Err(e) => format!("task failed: {e}"),
            };
            let _ = timeout(CLOSE_TIMEOUT, run.broker.close()).await;
            self.ctx.tracker.stopped(run.inc);
            let line = format!(
                "e{engine} incarnation {} stopped by itself ({stopped}) at {:.1}s",
                run.inc,
                self.ctx.epoch.elapsed().as_secs_f64()
            );
            self.log(&line);
            self.exits.push(line);
            self.at(
                Instant::now() + Duration::from_secs(1),
                Action::Restart { engine },
            );
        }
    }

    /// Ends the chaos: restores every link, waits for stops and crash
    /// clean-ups under way, and (re)starts every engine that is down.
    pub async fn calm(&mut self) -> Result<(), String> {
        self.actions.clear();
        for engine in 0..self.slots.len() {
            self.end_partition(engine);
            let slot = &mut self.slots[engine];
            slot.amqp.restore();
            slot.store.restore();
            slot.amqp_fault = None;
            slot.store_fault = None;
            slot.down = false;
            if slot.amqp_ok_since.is_none() {
                slot.amqp_ok_since = Some(Instant::now());
            }
            if let Some(p) = slot.pending.take() {
                let _ = p.await;
            }
        }
        self.log("CALM: every link restored");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.reap_exits().await;
            self.actions.clear();
            let mut missing = Vec::new();
            for engine in 0..self.slots.len() {
                if self.slots[engine].run.is_none()
                    && let Err(e) = self.launch(engine).await
                {
                    missing.push(format!("e{engine}: {e}"));
                }
            }
            self.sync_views();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "engines could not be restarted within 60 s after the chaos: {}",
                    missing.join("; ")
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops every engine gracefully (timed like the others) and waits.
    pub async fn stop_all(&mut self) {
        for engine in 0..self.slots.len() {
            self.stop(engine);
        }
        for slot in &mut self.slots {
            if let Some(p) = slot.pending.take() {
                let _ = p.await;
            }
        }
        self.sync_views();
    }

    /// Publishes the engines' state for the monitor.
    pub fn sync_views(&self) {
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        for (view, slot) in views.iter_mut().zip(&self.slots) {
            *view = View {
                broker: slot.run.as_ref().map(|r| (r.inc, r.broker.clone())),
                amqp_ok_since: slot.amqp_ok_since,
                stopping: slot.busy(),
                partitioned: slot.partitioned.is_some(),
                store_faulted: slot.store_fault.is_some(),
            };
        }
    }
}

/// Asks an engine to shut down, times how long `run` takes to return,
/// then closes its broker.
async fn stop_engine(
    ctx: Arc<Ctx>,
    engine: usize,
    run: Running,
    during: String,
    stops: Arc<Mutex<Vec<StopRecord>>>,
) {
    let asked = Instant::now();
    run.shutdown.cancel();
    let mut handle = run.handle;
    let (report, hung) = match timeout(STOP_GIVE_UP, &mut handle).await {
        Ok(Ok(report)) => (Some(report), false),
        Ok(Err(_)) => (None, false),
        Err(_) => {
            handle.abort();
            (None, true)
        }
    };
    let took = asked.elapsed();
    ctx.log(format!(
        "STOPPED: e{engine} (incarnation {}) returned after {:.2}s{}",
        run.inc,
        took.as_secs_f64(),
        if hung { " (HUNG, aborted)" } else { "" }
    ));
    if timeout(CLOSE_TIMEOUT, run.broker.close()).await.is_err() {
        ctx.log(format!(
            "closing e{engine}'s broker took over {CLOSE_TIMEOUT:?}"
        ));
    }
    let left = ctx.tracker.stopped(run.inc);
    if left > 0 {
        ctx.log(format!(
            "e{engine} (incarnation {}) returned with {left} deliveries unsettled",
            run.inc
        ));
    }
    stops
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(StopRecord {
            engine,
            inc: run.inc,
            took,
            hung,
            during,
            report,
        });
}
