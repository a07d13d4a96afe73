//! claim + complete per unique key against the Redis at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`), next to the raw pair a hand-rolled
//! dedup would send (`SET key token NX PX lease`, then `SET key done PX
//! keep`), over the same kind of connection (a `ConnectionManager`), in
//! the same run: sequentially and with 64 concurrent tasks. With 64 tasks:
//! the store as built by default (its own `claim` and `complete` calls
//! batched, one script call of each kind in flight), the store with
//! batching off (every call its own script call), that one behind an
//! [`idemq::Coalescing`] with default settings (4 in flight), and the batch
//! path (`claim_many` of 32 fresh keys, then `complete_many` of them).
//!
//! Each variant also prints what Redis spent per message: the CPU time of
//! the server process (`INFO cpu`: commands, network I/O, expiring keys),
//! and the `usec` of the commands alone (`INFO commandstats`: `EVALSHA`,
//! which includes the commands its script ran, or `SET` for the raw pair);
//! and for the coalesced variants how the calls went out. Before each
//! variant the bench waits for the keys of the one before to expire
//! (they live 2 s), so none pays for another's expiry.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-redis cargo bench -p idemq-redis --bench claim_complete
//! ```
//!
//! Throughput is in messages (claim + complete pairs) per second.
//!
//! After the criterion groups, a paired run alternates the same variants
//! in short rounds and prints the median per-round ratio of each store
//! variant to the raw pair (see [`paired`]; `IDEMQ_BENCH_NO_PAIRED=1`
//! skips it).

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
const UNBATCHED: &str = "store claim+complete, batching off";
const COALESCED: &str = "store (batching off) claim+complete via Coalescing, 4 in flight";
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
/// The longest wait for the keys of the last variant to expire.
const DRAIN: Duration = Duration::from_secs(30);

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Setup {
    /// Default settings: batches its own concurrent calls.
    store: RedisDedupStore,
    /// The same store with batching off.
    unbatched: RedisDedupStore,
    /// `Coalescing::new(unbatched)`, default settings.
    coalesced: Coalescing<RedisDedupStore>,
    raw: ConnectionManager,
    raw_prefix: String,
    next: AtomicU64,
}

impl Setup {
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
        match store.complete(&lease, KEEP).await {
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
            .complete_many(&leases, KEEP)
            .await
            .expect("complete_many");
        assert!(fenced.iter().all(|f| *f == Fenced::Applied), "{fenced:?}");
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
            .arg(KEEP.as_millis() as u64)
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
    let unbatched = RedisDedupStore::connect_with(
        &url(),
        RedisConfig::new().with_prefix(&prefix).with_batching(None),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(Setup {
        coalesced: Coalescing::new(unbatched.clone()),
        unbatched,
        store,
        raw,
        raw_prefix: format!("{prefix}raw:"),
        next: AtomicU64::new(0),
    })
}

/// `INFO commandstats` as `command -> (calls, usec)`, and `INFO cpu` as
/// `"cpu" -> (0, usec)` (user + system time of the server).
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
        .chain([cpu])
        .collect()
}

/// Waits (at most [`DRAIN`]) until the database holds no more keys than
/// `floor` + 100: the keys of the variant before have expired.
async fn drained(conn: &mut ConnectionManager, floor: u64) {
    let started = Instant::now();
    while started.elapsed() < DRAIN {
        let keys: u64 = match redis::cmd("DBSIZE").query_async(conn).await {
            Ok(keys) => keys,
            Err(_) => return,
        };
        if keys <= floor + 100 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "claim_complete: keys still expiring after {DRAIN:?}; the next variant pays for some"
    );
}

/// Prints the server time a message cost during a benchmark: the `usec`
/// Redis counted for `command` (an `EVALSHA` includes the commands its
/// script ran) between two snapshots, over the messages handled between
/// them (one fresh key each).
fn print_server_cost(
    what: &str,
    command: &str,
    messages: u64,
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
) {
    let (c0, u0) = before.get(command).copied().unwrap_or_default();
    let (c1, u1) = after.get(command).copied().unwrap_or_default();
    let (_, cpu0) = before.get("cpu").copied().unwrap_or_default();
    let (_, cpu1) = after.get("cpu").copied().unwrap_or_default();
    let calls = c1.saturating_sub(c0);
    if messages > 0 {
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / messages as f64;
        eprintln!(
            "{what}: Redis CPU {:.2} µs per message, {:.2} µs in commands \
             ({messages} messages, {calls} {command} calls)",
            per(cpu0, cpu1),
            per(u0, u1),
        );
    }
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
    Unbatched,
    Raw,
    Batched,
    Coalesced,
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
                    Mode::Store | Mode::Unbatched | Mode::Raw | Mode::Coalesced => 1,
                };
                while let Ok(had) = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    n.checked_sub(take.min(n)).filter(|_| n > 0)
                }) {
                    match mode {
                        Mode::Store => setup.store_pair().await,
                        Mode::Raw => setup.raw_pair().await,
                        Mode::Batched => setup.store_batch(take.min(had)).await,
                        Mode::Unbatched => setup.pair(&setup.unbatched).await,
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
        rt.block_on(drained(&mut stats_conn, floor));
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
    measure("sequential", STORE, "evalsha", &mut || {
        seq.bench_function(STORE, |b| b.to_async(&rt).iter(|| setup.store_pair()));
    });
    measure("sequential", RAW, "set", &mut || {
        seq.bench_function(RAW, |b| b.to_async(&rt).iter(|| setup.raw_pair()));
    });
    seq.finish();

    let mut par = c.benchmark_group("concurrent-64");
    par.throughput(Throughput::Elements(1));
    // How the calls of a batching variant went out, for the print.
    let stats = |mode: Mode| match mode {
        Mode::Store => setup.store.batching_stats(),
        Mode::Coalesced => Some(setup.coalesced.stats()),
        Mode::Unbatched | Mode::Batched | Mode::Raw => None,
    };
    for (name, mode, command) in [
        (STORE, Mode::Store, "evalsha"),
        (UNBATCHED, Mode::Unbatched, "evalsha"),
        (COALESCED, Mode::Coalesced, "evalsha"),
        (BATCHED, Mode::Batched, "evalsha"),
        (RAW, Mode::Raw, "set"),
    ] {
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
        rt.block_on(paired(&setup));
    }
}

/// Messages per round of [`paired`]: sequential, concurrent.
const PAIRED_MESSAGES: (u64, u64) = (1_000, 20_000);
/// Rounds of [`paired`].
const PAIRED_ROUNDS: usize = 15;

/// The same comparisons again, in short rounds that alternate the store
/// and the raw pair: the machine's speed drifts over the seconds a
/// criterion group takes (a shared VM more than most), and a ratio taken
/// within one round is not fooled by that. Prints the median time per
/// message of each variant and the median of the per-round ratios to the
/// raw pair. `IDEMQ_BENCH_NO_PAIRED=1` skips it.
async fn paired(setup: &Arc<Setup>) {
    let (seq_n, par_n) = PAIRED_MESSAGES;
    let sequential = |n: u64, raw: bool| {
        let setup = setup.clone();
        async move {
            let started = Instant::now();
            for _ in 0..n {
                if raw {
                    setup.raw_pair().await;
                } else {
                    setup.store_pair().await;
                }
            }
            started.elapsed()
        }
    };
    let mut seq: [Vec<f64>; 2] = Default::default();
    let mut par: [Vec<f64>; 4] = Default::default();
    let per_msg = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
    for _ in 0..PAIRED_ROUNDS {
        seq[0].push(per_msg(sequential(seq_n, false).await, seq_n));
        seq[1].push(per_msg(sequential(seq_n, true).await, seq_n));
        for (i, mode) in [Mode::Store, Mode::Coalesced, Mode::Batched, Mode::Raw]
            .into_iter()
            .enumerate()
        {
            par[i].push(per_msg(concurrently(setup, par_n, mode).await, par_n));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let ratios = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(a, b)| a / b).collect());
    eprintln!(
        "paired ({PAIRED_ROUNDS} alternating rounds; µs per message, median; \
         store / raw pair, median of the rounds' ratios):"
    );
    eprintln!(
        "  sequential    {STORE}: {:.2}, {RAW}: {:.2}, ratio {:.3}",
        median(seq[0].clone()),
        median(seq[1].clone()),
        ratios(&seq[0], &seq[1]),
    );
    for (i, name) in [STORE, COALESCED, BATCHED].into_iter().enumerate() {
        eprintln!(
            "  concurrent-64 {name}: {:.2}, {RAW}: {:.2}, ratio {:.3}",
            median(par[i].clone()),
            median(par[3].clone()),
            ratios(&par[i], &par[3]),
        );
    }
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
