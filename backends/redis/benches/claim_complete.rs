//! claim + complete per unique key against the Redis at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`), next to the raw pair a hand-rolled
//! dedup would send (`SET key token NX PX lease`, then `SET key done PX
//! keep`), over the same kind of connection (a `ConnectionManager`), in
//! the same run: sequentially and with 64 concurrent tasks. With 64 tasks:
//! the store (every call its own command or script call), the store behind
//! an [`idemq::Coalescing`] with default settings (4 in flight), and the
//! batch path (`claim_many` of 32 fresh keys, then `complete_many` of
//! them).
//!
//! Each variant also prints what a message cost: the CPU time of the
//! Redis server process (`INFO cpu`: commands, network I/O, expiring keys)
//! and of this process (the client: both tokio workers and criterion;
//! sequential runs show it close to the wall time, so there it says
//! little), and the `usec` of the
//! commands alone (`INFO commandstats`: `SET`, which counts the claims and
//! the `SET`s that scripts ran, and `EVALSHA`, which includes the commands
//! its script ran); and for the coalesced variant how the calls went out.
//! Before each variant the bench waits for the keys of the one before to
//! expire (they live 2 s), so none pays for another's expiry.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-redis cargo bench -p idemq-redis --bench claim_complete
//! ```
//!
//! Throughput is in messages (claim + complete pairs) per second.
//!
//! After the criterion groups, a paired run alternates the same variants
//! in short rounds and prints the median per-round ratio of each store
//! variant to the raw pair, and an A/A control that shows how far noise
//! alone moves such a ratio (see [`paired`]; `IDEMQ_BENCH_NO_PAIRED=1`
//! skips it).
//!
//! One file, past 600 lines: every variant runs in the same process and
//! the same rounds, which is what makes their paired ratios fair.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use idemq::coalesce::CoalescingStats;
use idemq::{Claim, ClaimTtl, Coalescing, DedupStore, Fenced, Lease};
use idemq_redis::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use idemq_redis::redis::{self, Value};
use idemq_redis::{RedisConfig, RedisDedupStore};

const SCOPE: &str = "bench";
const STORE: &str = "store claim+complete";
const RAW: &str = "raw SET NX PX + SET PX";
const BATCHED: &str = "store claim_many+complete_many, batches of 32";
const COALESCED: &str = "store claim+complete via Coalescing, 4 in flight";
const FLOOR: &str = "floor: the store's two commands, no store code (IFEQ servers)";
const CONCURRENCY: u64 = 64;
/// Messages per `claim_many` / `complete_many` in the batch variant.
const BATCH: u64 = 32;
/// Short, so the keys a variant leaves behind are gone before the next
/// one starts (it waits for that): expiring them costs Redis CPU, which
/// would otherwise be billed to whichever variant runs next.
const TTL: ClaimTtl = ClaimTtl {
    lease: Duration::from_secs(2),
    retain: Duration::from_secs(2),
};
const KEEP: Duration = Duration::from_secs(2);
/// How long done records live in [`paired`] (ms): short, so a variant's
/// keys are gone soon after it, and the next one starts on an empty
/// database without a long wait.
const PAIRED_KEEP_MS: u64 = 300;
/// The longest wait for the keys of the last variant to expire.
const DRAIN: Duration = Duration::from_secs(30);

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Setup {
    store: RedisDedupStore,
    /// `Coalescing::new(store)`, default settings.
    coalesced: Coalescing<RedisDedupStore>,
    raw: ConnectionManager,
    raw_prefix: String,
    next: AtomicU64,
    /// How long done records live, ms: [`KEEP`], or [`PAIRED_KEEP_MS`].
    keep_ms: AtomicU64,
}

impl Setup {
    fn keep(&self) -> Duration {
        Duration::from_millis(self.keep_ms.load(Ordering::Relaxed))
    }

    fn key(&self) -> String {
        format!("m{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    async fn store_pair(&self) {
        self.pair(&self.store).await;
    }

    /// One `claim` of a fresh key, then its `complete`, on `store`.
    async fn pair(&self, store: &impl DedupStore) {
        let key = self.key();
        let lease = match store.claim(SCOPE, &key, TTL).await {
            Ok(Claim::Claimed(lease)) => lease,
            other => panic!("claim of a fresh key: {other:?}"),
        };
        match store.complete(&lease, self.keep()).await {
            Ok(Fenced::Applied) => {}
            other => panic!("complete: {other:?}"),
        }
    }

    /// Claims `n` fresh keys with one `claim_many`, then completes them
    /// with one `complete_many`.
    async fn store_batch(&self, n: u64) {
        let keys: Vec<String> = (0..n).map(|_| self.key()).collect();
        let claims = self
            .store
            .claim_many(SCOPE, &keys, TTL)
            .await
            .expect("claim_many");
        let leases: Vec<Lease> = claims
            .into_iter()
            .map(|claim| match claim {
                Claim::Claimed(lease) => lease,
                other => panic!("claim of a fresh key: {other:?}"),
            })
            .collect();
        let fenced = self
            .store
            .complete_many(&leases, self.keep())
            .await
            .expect("complete_many");
        assert!(fenced.iter().all(|f| *f == Fenced::Applied), "{fenced:?}");
    }

    /// The two commands the store sends for a fresh message on a server
    /// that takes `SET ... IFEQ` (`SET NX PX GET`, then `SET IFEQ PX GET`),
    /// sent as the raw pair is, with no store code around them: the floor
    /// of the store on such a server. What the store costs above it is its
    /// own client work.
    async fn floor_pair(&self) {
        let key = format!("{}{{{SCOPE}:{}}}", self.raw_prefix, self.key());
        let mut conn = self.raw.clone();
        let claimed: Value = redis::cmd("SET")
            .arg(&key)
            .arg("c:0123456789abcdef:1:0")
            .arg("NX")
            .arg("PX")
            .arg(TTL.lease.as_millis() as u64)
            .arg("GET")
            .query_async(&mut conn)
            .await
            .expect("SET NX PX GET");
        assert!(matches!(claimed, Value::Nil), "fresh key: {claimed:?}");
        let done: Value = redis::cmd("SET")
            .arg(&key)
            .arg("d:0123456789abcdef:1:0")
            .arg("IFEQ")
            .arg("c:0123456789abcdef:1:0")
            .arg("PX")
            .arg(self.keep_ms.load(Ordering::Relaxed))
            .arg("GET")
            .query_async(&mut conn)
            .await
            .expect("SET IFEQ");
        assert!(matches!(done, Value::BulkString(_)), "{done:?}");
    }

    async fn raw_pair(&self) {
        let key = format!("{}{{{SCOPE}:{}}}", self.raw_prefix, self.key());
        let mut conn = self.raw.clone();
        let claimed: Value = redis::cmd("SET")
            .arg(&key)
            .arg("0123456789abcdef")
            .arg("NX")
            .arg("PX")
            .arg(TTL.lease.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .expect("SET NX PX");
        assert!(matches!(claimed, Value::Okay), "fresh key: {claimed:?}");
        let done: Value = redis::cmd("SET")
            .arg(&key)
            .arg("done")
            .arg("PX")
            .arg(self.keep_ms.load(Ordering::Relaxed))
            .query_async(&mut conn)
            .await
            .expect("SET PX");
        assert!(matches!(done, Value::Okay), "{done:?}");
    }
}

async fn connect() -> Result<Setup, String> {
    let prefix = format!("idemq-bench-{:08x}:", rand::random::<u32>());
    let store = RedisDedupStore::connect_with(&url(), RedisConfig::new().with_prefix(&prefix))
        .await
        .map_err(|e| e.to_string())?;
    let client = redis::Client::open(url()).map_err(|e| e.to_string())?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(store.config().response_timeout()))
        .set_connection_timeout(Some(store.config().connection_timeout()));
    let raw = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Setup {
        coalesced: Coalescing::new(store.clone()),
        store,
        raw,
        raw_prefix: format!("{prefix}raw:"),
        next: AtomicU64::new(0),
        keep_ms: AtomicU64::new(KEEP.as_millis() as u64),
    })
}

/// `INFO commandstats` as `command -> (calls, usec)`, `INFO cpu` as
/// `"cpu" -> (0, usec)` (user + system time of the server), and this
/// process' CPU time as `"client" -> (0, usec)`.
async fn command_stats(conn: &mut ConnectionManager) -> HashMap<String, (u64, u64)> {
    let info: String = match redis::cmd("INFO")
        .arg("commandstats")
        .arg("cpu")
        .query_async(conn)
        .await
    {
        Ok(info) => info,
        Err(_) => return HashMap::new(),
    };
    let cpu: f64 = info
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            matches!(name, "used_cpu_user" | "used_cpu_sys")
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum();
    let cpu = ("cpu".to_owned(), (0, (cpu * 1e6) as u64));
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key))?
                    .parse()
                    .ok()
            };
            Some((name.to_owned(), (field("calls=")?, field("usec=")?)))
        })
        .chain([cpu, ("client".to_owned(), (0, client_cpu_usec()))])
        .collect()
}

/// Waits (at most [`DRAIN`]) until the database holds no more keys than
/// `floor` + 100: the keys of the variant before have expired.
async fn drained(conn: &mut ConnectionManager, floor: u64, poll: Duration) {
    let started = Instant::now();
    while started.elapsed() < DRAIN {
        let keys: u64 = match redis::cmd("DBSIZE").query_async(conn).await {
            Ok(keys) => keys,
            Err(_) => return,
        };
        if keys <= floor + 100 {
            return;
        }
        tokio::time::sleep(poll).await;
    }
    eprintln!(
        "claim_complete: keys still expiring after {DRAIN:?}; the next variant pays for some"
    );
}

/// Prints what a message cost during a benchmark, between two snapshots,
/// over the messages handled between them (one fresh key each): the CPU
/// time of the Redis server and of this process (the client), and the
/// `usec` Redis counted for each of `commands` (joined by `+`). An
/// `EVALSHA` includes the commands its script ran, and those count under
/// their own names too.
fn print_server_cost(
    what: &str,
    commands: &str,
    messages: u64,
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
) {
    if messages == 0 {
        return;
    }
    let delta = |name: &str| {
        let (c0, u0) = before.get(name).copied().unwrap_or_default();
        let (c1, u1) = after.get(name).copied().unwrap_or_default();
        (c1.saturating_sub(c0), u1.saturating_sub(u0))
    };
    let per = |usec: u64| usec as f64 / messages as f64;
    let counted: Vec<String> = commands
        .split('+')
        .map(|name| {
            let (calls, usec) = delta(name);
            format!("{name} {:.2} µs ({calls} calls)", per(usec))
        })
        .collect();
    eprintln!(
        "{what}: per message ({messages}): Redis CPU {:.2} µs, client CPU {:.2} µs; \
         in commands: {}",
        per(delta("cpu").1),
        per(delta("client").1),
        counted.join(", "),
    );
}

/// The CPU time (user + system) of this process so far, µs, from
/// `/proc/self/stat` (clock ticks, assumed 100 per second); 0 where there
/// is none.
fn client_cpu_usec() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    // The fields after the command name, which is in parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks * 10_000
}

/// Prints how the calls of a coalesced variant went out between two
/// snapshots of its stats.
fn print_coalescing(what: &str, before: CoalescingStats, after: CoalescingStats) {
    let batches = after.claim_batches - before.claim_batches;
    let batched = after.batched_claims - before.batched_claims;
    let direct = after.direct_claims - before.direct_claims;
    let completes = after.complete_batches - before.complete_batches;
    let batched_completes = after.batched_completes - before.batched_completes;
    let direct_completes = after.direct_completes - before.direct_completes;
    let mean = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    eprintln!(
        "{what}: claims {direct} direct + {batched} in {batches} batches (mean {:.1}), \
         completes {direct_completes} direct + {batched_completes} in {completes} batches (mean {:.1})",
        mean(batched, batches),
        mean(batched_completes, completes),
    );
}

#[derive(Clone, Copy)]
enum Mode {
    Store,
    Raw,
    Batched,
    Coalesced,
    /// [`Setup::floor_pair`]; only on a server that takes `IFEQ`.
    Floor,
}

/// Runs `iters` messages split over [`CONCURRENCY`] tasks; answers the time.
async fn concurrently(setup: &Arc<Setup>, iters: u64, mode: Mode) -> Duration {
    let left = Arc::new(AtomicU64::new(iters));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (setup, left) = (setup.clone(), left.clone());
            tokio::spawn(async move {
                let take = match mode {
                    Mode::Batched => BATCH,
                    Mode::Store | Mode::Raw | Mode::Coalesced | Mode::Floor => 1,
                };
                while let Ok(had) = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    n.checked_sub(take.min(n)).filter(|_| n > 0)
                }) {
                    match mode {
                        Mode::Store => setup.store_pair().await,
                        Mode::Raw => setup.raw_pair().await,
                        Mode::Floor => setup.floor_pair().await,
                        Mode::Batched => setup.store_batch(take.min(had)).await,
                        Mode::Coalesced => setup.pair(&setup.coalesced).await,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("bench task");
    }
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("claim_complete: cannot start a tokio runtime: {e}");
            return;
        }
    };
    let setup = match rt.block_on(connect()) {
        Ok(setup) => Arc::new(setup),
        Err(e) => {
            eprintln!(
                "claim_complete: SKIPPED, redis at {} is unreachable: {e}",
                url()
            );
            return;
        }
    };

    let mut stats_conn = setup.raw.clone();
    let counter = setup.clone();
    let floor: u64 = rt
        .block_on(redis::cmd("DBSIZE").query_async(&mut stats_conn))
        .unwrap_or(0);
    let mut measure = |group: &str, name: &str, command: &str, run: &mut dyn FnMut()| {
        rt.block_on(drained(&mut stats_conn, floor, Duration::from_millis(200)));
        let before = rt.block_on(command_stats(&mut stats_conn));
        let first = counter.next.load(Ordering::Relaxed);
        run();
        let messages = counter.next.load(Ordering::Relaxed) - first;
        let after = rt.block_on(command_stats(&mut stats_conn));
        print_server_cost(
            &format!("{group}/{name}"),
            command,
            messages,
            &before,
            &after,
        );
    };

    let mut seq = c.benchmark_group("sequential");
    seq.throughput(Throughput::Elements(1));
    measure("sequential", STORE, "set+evalsha", &mut || {
        seq.bench_function(STORE, |b| b.to_async(&rt).iter(|| setup.store_pair()));
    });
    measure("sequential", RAW, "set", &mut || {
        seq.bench_function(RAW, |b| b.to_async(&rt).iter(|| setup.raw_pair()));
    });
    seq.finish();

    let mut par = c.benchmark_group("concurrent-64");
    par.throughput(Throughput::Elements(1));
    // How the calls of the coalesced variant went out, for the print.
    let stats = |mode: Mode| match mode {
        Mode::Coalesced => Some(setup.coalesced.stats()),
        Mode::Store | Mode::Batched | Mode::Raw | Mode::Floor => None,
    };
    let floor_variant = setup
        .store
        .uses_set_ifeq()
        .then_some((FLOOR, Mode::Floor, "set"));
    for (name, mode, command) in [
        (STORE, Mode::Store, "set+evalsha"),
        (COALESCED, Mode::Coalesced, "set+evalsha"),
        (BATCHED, Mode::Batched, "set+evalsha"),
        (RAW, Mode::Raw, "set"),
    ]
    .into_iter()
    .chain(floor_variant)
    {
        let before = stats(mode);
        measure("concurrent-64", name, command, &mut || {
            par.bench_function(name, |b| {
                b.to_async(&rt)
                    .iter_custom(|iters| concurrently(&setup, iters, mode))
            });
        });
        if let (Some(before), Some(after)) = (before, stats(mode)) {
            print_coalescing(&format!("concurrent-64/{name}"), before, after);
        }
    }
    par.finish();

    if std::env::var_os("IDEMQ_BENCH_NO_PAIRED").is_none() {
        rt.block_on(paired(&setup, floor));
    }
}

/// Messages per round of [`paired`]: sequential, concurrent.
const PAIRED_MESSAGES: (u64, u64) = (1_000, 20_000);
/// Rounds of [`paired`].
const PAIRED_ROUNDS: usize = 25;

/// The same comparisons again, in short rounds that alternate the store
/// and the raw pair: the machine's speed drifts over the seconds a
/// criterion group takes (a shared VM more than most), and a ratio taken
/// within one round is not fooled by that. Done records live
/// [`PAIRED_KEEP_MS`], and every variant waits until the keys of the one
/// before it have expired, so none pays for another's expiry; odd rounds
/// run the variants in the reverse order, so none always runs first or
/// after the same one. The store runs twice per round, both
/// sequentially and concurrently: the ratio of its two runs (an A/A
/// control) shows how far this machine's noise
/// moves a ratio. Prints the median time per message of each variant, and
/// the median and the middle half of the per-round ratios to the raw pair.
/// `IDEMQ_BENCH_NO_PAIRED=1` skips it.
async fn paired(setup: &Arc<Setup>, floor: u64) {
    /// What one slot of a round runs.
    #[derive(Clone, Copy)]
    enum Run {
        Sequential { raw: bool },
        Concurrent(Mode),
    }
    let runs = [
        Run::Sequential { raw: false },
        Run::Sequential { raw: true },
        Run::Concurrent(Mode::Store),
        Run::Concurrent(Mode::Coalesced),
        Run::Concurrent(Mode::Batched),
        Run::Concurrent(Mode::Raw),
        Run::Sequential { raw: false },
        Run::Concurrent(Mode::Store),
        Run::Concurrent(Mode::Floor),
    ];
    // The floor only where the server takes IFEQ.
    let runs = &runs[..runs.len() - usize::from(!setup.store.uses_set_ifeq())];
    let (seq_n, par_n) = PAIRED_MESSAGES;
    setup.keep_ms.store(PAIRED_KEEP_MS, Ordering::Relaxed);
    let mut conn = setup.raw.clone();
    let mut took: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let per_msg = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
    for round in 0..PAIRED_ROUNDS {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            drained(&mut conn, floor, Duration::from_millis(20)).await;
            // A tenth untimed first: the wait leaves caches and CPUs cold,
            // which would bill the first messages of every slot.
            let mut us = 0.0;
            for (n, timed) in [(seq_n / 10, false), (seq_n, true)] {
                let took = match runs[i] {
                    Run::Sequential { raw } => {
                        let started = Instant::now();
                        for _ in 0..n {
                            if raw {
                                setup.raw_pair().await;
                            } else {
                                setup.store_pair().await;
                            }
                        }
                        per_msg(started.elapsed(), n)
                    }
                    Run::Concurrent(mode) => {
                        let n = n * par_n / seq_n;
                        per_msg(concurrently(setup, n, mode).await, n)
                    }
                };
                if timed {
                    us = took;
                }
            }
            took[i].push(us);
        }
    }
    setup
        .keep_ms
        .store(KEEP.as_millis() as u64, Ordering::Relaxed);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    // The per-round ratios of `a` to `b`: median, and the middle half.
    let ratio = |a: usize, b: usize| {
        let mut r: Vec<f64> = took[a].iter().zip(&took[b]).map(|(a, b)| a / b).collect();
        r.sort_by(f64::total_cmp);
        let at = |q: usize| r.get(r.len() * q / 4).copied().unwrap_or(f64::NAN);
        format!("{:.3} (middle half {:.3}..{:.3})", at(2), at(1), at(3))
    };
    let row = |what: &str, name: &str, a: usize, b: usize| {
        eprintln!(
            "  {what} {name}: {:.2}, {RAW}: {:.2}, ratio {}",
            median(took[a].clone()),
            median(took[b].clone()),
            ratio(a, b),
        );
    };
    eprintln!(
        "paired ({PAIRED_ROUNDS} rounds; µs per message, median; \
         store / raw pair, median of the rounds' ratios):"
    );
    row("sequential   ", STORE, 0, 1);
    row("concurrent-64", STORE, 2, 5);
    row("concurrent-64", COALESCED, 3, 5);
    row("concurrent-64", BATCHED, 4, 5);
    if runs.len() > 8 {
        row("concurrent-64", FLOOR, 8, 5);
    }
    eprintln!(
        "  concurrent-64 {STORE}, plain / via Coalescing (throughput of \
         Coalescing over the plain store): {}",
        ratio(2, 3),
    );
    eprintln!(
        "  control (A/A): {STORE}, its second run of each round / its first: \
         sequential {}, concurrent-64 {}",
        ratio(6, 0),
        ratio(7, 2),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = bench
}

criterion_main!(benches);
