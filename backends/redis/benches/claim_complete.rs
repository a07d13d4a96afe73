//! claim + complete per unique key against the Redis at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`), next to the raw pair a hand-rolled
//! dedup would send (`SET key token NX PX lease`, then `SET key done PX
//! keep`), over the same kind of connection (a `ConnectionManager`), in
//! the same run: sequentially and with 64 concurrent tasks; and, with 64
//! tasks, the batch path (`claim_many` of 32 fresh keys, then
//! `complete_many` of them), and single `claim` + `complete` calls through
//! [`idemq::Coalescing`] (default settings, and one call in flight), which
//! is how an engine with concurrency 64 reaches the store.
//!
//! Each variant also prints what Redis spent per message, from `INFO
//! commandstats` (`usec` of `EVALSHA`, which includes the commands its
//! script ran, or of `SET` for the raw pair), and for the coalesced
//! variants how the calls went out.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-redis cargo bench -p idemq-redis --bench claim_complete
//! ```
//!
//! Throughput is in messages (claim + complete pairs) per second.

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
const COALESCED: &str = "store claim+complete via Coalescing";
const COALESCED_ONE: &str = "store claim+complete via Coalescing, in-flight 1";
const CONCURRENCY: u64 = 64;
/// Messages per `claim_many` / `complete_many` in the batch variant.
const BATCH: u64 = 32;
/// Short, so the keys a run leaves behind are gone seconds later.
const TTL: ClaimTtl = ClaimTtl {
    lease: Duration::from_secs(10),
    retain: Duration::from_secs(10),
};
const KEEP: Duration = Duration::from_secs(10);

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Setup {
    store: RedisDedupStore,
    /// `Coalescing::new(store)`, default settings.
    coalesced: Coalescing<RedisDedupStore>,
    /// The same with one call of each kind in flight.
    coalesced_one: Coalescing<RedisDedupStore>,
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
    Ok(Setup {
        coalesced: Coalescing::new(store.clone()),
        coalesced_one: Coalescing::new(store.clone()).with_max_in_flight(1),
        store,
        raw,
        raw_prefix: format!("{prefix}raw:"),
        next: AtomicU64::new(0),
    })
}

/// `INFO commandstats` as `command -> (calls, usec)`.
async fn command_stats(conn: &mut ConnectionManager) -> HashMap<String, (u64, u64)> {
    let info: String = match redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
    {
        Ok(info) => info,
        Err(_) => return HashMap::new(),
    };
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
        .collect()
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
    let calls = c1.saturating_sub(c0);
    if messages > 0 {
        let per = (u1.saturating_sub(u0)) as f64 / messages as f64;
        eprintln!(
            "{what}: Redis spent {per:.2} µs per message ({messages} messages, {calls} {command} calls)"
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
    Raw,
    Batched,
    Coalesced,
    CoalescedOne,
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
                    Mode::Store | Mode::Raw | Mode::Coalesced | Mode::CoalescedOne => 1,
                };
                while let Ok(had) = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    n.checked_sub(take.min(n)).filter(|_| n > 0)
                }) {
                    match mode {
                        Mode::Store => setup.store_pair().await,
                        Mode::Raw => setup.raw_pair().await,
                        Mode::Batched => setup.store_batch(take.min(had)).await,
                        Mode::Coalesced => setup.pair(&setup.coalesced).await,
                        Mode::CoalescedOne => setup.pair(&setup.coalesced_one).await,
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
    let mut measure = |group: &str, name: &str, command: &str, run: &mut dyn FnMut()| {
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
    measure("concurrent-64", STORE, "evalsha", &mut || {
        par.bench_function(STORE, |b| {
            b.to_async(&rt)
                .iter_custom(|iters| concurrently(&setup, iters, Mode::Store))
        });
    });
    measure("concurrent-64", BATCHED, "evalsha", &mut || {
        par.bench_function(BATCHED, |b| {
            b.to_async(&rt)
                .iter_custom(|iters| concurrently(&setup, iters, Mode::Batched))
        });
    });
    for (name, mode, coalescing) in [
        (COALESCED, Mode::Coalesced, &setup.coalesced),
        (COALESCED_ONE, Mode::CoalescedOne, &setup.coalesced_one),
    ] {
        let before = coalescing.stats();
        measure("concurrent-64", name, "evalsha", &mut || {
            par.bench_function(name, |b| {
                b.to_async(&rt)
                    .iter_custom(|iters| concurrently(&setup, iters, mode))
            });
        });
        print_coalescing(&format!("concurrent-64/{name}"), before, coalescing.stats());
    }
    measure("concurrent-64", RAW, "set", &mut || {
        par.bench_function(RAW, |b| {
            b.to_async(&rt)
                .iter_custom(|iters| concurrently(&setup, iters, Mode::Raw))
        });
    });
    par.finish();
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
