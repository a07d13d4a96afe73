//! claim + complete against a local Postgres (`DATABASE_URL`, default
//! postgres://postgres@127.0.0.1:5432/test): sequential, 64 concurrent
//! tasks, and batched (`claim_many` + `complete_many`), each next to a
//! hand-written two-statement baseline (INSERT ... ON CONFLICT DO NOTHING,
//! then UPDATE) in the same run. Every message is a fresh key.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-postgres cargo bench -p idemq-postgres --bench claim_complete
//! ```
//!
//! Exits with a message when Postgres is unreachable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use idemq::{Claim, ClaimTtl, DedupStore, Lease};
use idemq_postgres::PostgresDedupStore;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::runtime::Runtime;

const TABLE: &str = "idemq_bench_dedup";
const TTL: ClaimTtl = ClaimTtl {
    lease: Duration::from_secs(300),
    retain: Duration::from_secs(3600),
};
const KEEP: Duration = Duration::from_secs(3600);
const CONCURRENCY: usize = 64;

struct Ctx {
    store: PostgresDedupStore,
    pool: PgPool,
    scope: String,
    next: AtomicU64,
    baseline_claim: String,
    baseline_complete: String,
    baseline_claim_many: String,
    baseline_complete_many: String,
}

impl Ctx {
    fn key(&self) -> String {
        format!("m{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn keys(&self, n: usize) -> Vec<String> {
        let first = self.next.fetch_add(n as u64, Ordering::Relaxed);
        (first..first + n as u64).map(|i| format!("m{i}")).collect()
    }

    async fn claim_complete(&self) {
        let key = self.key();
        let Ok(Claim::Claimed(lease)) = self.store.claim(&self.scope, &key, TTL).await else {
            panic!("fresh key not claimed");
        };
        let done = self.store.complete(&lease, KEEP).await;
        assert!(matches!(done, Ok(idemq::Fenced::Applied)));
    }

    async fn batched(&self, n: usize) {
        let keys = self.keys(n);
        let claims = self
            .store
            .claim_many(&self.scope, &keys, TTL)
            .await
            .expect("claim_many");
        let leases: Vec<Lease> = claims
            .into_iter()
            .map(|c| match c {
                Claim::Claimed(l) => l,
                other => panic!("fresh key not claimed: {other:?}"),
            })
            .collect();
        let done = self
            .store
            .complete_many(&leases, KEEP)
            .await
            .expect("complete_many");
        assert_eq!(done.len(), n);
    }

    /// The naive two-statement version: insert-if-absent, then mark done.
    /// (It cannot take over lapsed leases or count attempts; it is the
    /// floor of what any dedup costs.)
    async fn baseline(&self) {
        let key = self.key();
        let token: i64 = rand::random();
        let inserted = sqlx::query(AssertSqlSafe(self.baseline_claim.clone()))
            .bind(&self.scope)
            .bind(&key)
            .bind(token)
            .execute(&self.pool)
            .await
            .expect("baseline insert");
        assert_eq!(inserted.rows_affected(), 1);
        let updated = sqlx::query(AssertSqlSafe(self.baseline_complete.clone()))
            .bind(&self.scope)
            .bind(&key)
            .bind(token)
            .execute(&self.pool)
            .await
            .expect("baseline update");
        assert_eq!(updated.rows_affected(), 1);
    }

    async fn baseline_batched(&self, n: usize) {
        let keys = self.keys(n);
        let tokens: Vec<i64> = keys.iter().map(|_| rand::random()).collect();
        let inserted = sqlx::query(AssertSqlSafe(self.baseline_claim_many.clone()))
            .bind(&self.scope)
            .bind(&keys)
            .bind(&tokens)
            .execute(&self.pool)
            .await
            .expect("baseline insert");
        assert_eq!(inserted.rows_affected(), n as u64);
        let updated = sqlx::query(AssertSqlSafe(self.baseline_complete_many.clone()))
            .bind(&self.scope)
            .bind(&keys)
            .bind(&tokens)
            .execute(&self.pool)
            .await
            .expect("baseline update");
        assert_eq!(updated.rows_affected(), n as u64);
    }
}

async fn setup() -> Result<Ctx, String> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .map_err(|e| format!("{} ({e})", idemq::error::redact_url(&url)))?;
    let store = PostgresDedupStore::new(pool.clone())
        .with_table(TABLE)
        .map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    // A table with history (200k done rows of another scope) and fresh
    // statistics, as in production: plans then do not depend on when
    // autovacuum happens to analyze a table that grows from empty.
    for sql in [
        format!("TRUNCATE {TABLE}"),
        format!(
            "INSERT INTO {TABLE} SELECT 'history', 'h' || g, 'done', g, 1, now(), now() + interval '1 h'
             FROM generate_series(1, 200000) AS g"
        ),
        format!("ANALYZE {TABLE}"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .map_err(|e| e.to_string())?;
    }
    let cols = "(scope, key, state, token, attempts, lease_until, expires_at)";
    Ok(Ctx {
        store,
        pool,
        scope: format!("bench-{:08x}", rand::random::<u32>()),
        next: AtomicU64::new(0),
        baseline_claim: format!(
            "INSERT INTO {TABLE} {cols}
             VALUES ($1, $2, 'claimed', $3, 1, now() + interval '300 s', now() + interval '1 h')
             ON CONFLICT (scope, key) DO NOTHING"
        ),
        baseline_complete: format!(
            "UPDATE {TABLE} SET state = 'done', expires_at = now() + interval '1 h'
             WHERE scope = $1 AND key = $2 AND token = $3 AND state = 'claimed'"
        ),
        baseline_claim_many: format!(
            "INSERT INTO {TABLE} {cols}
             SELECT $1, k.key, 'claimed', k.token, 1, now() + interval '300 s', now() + interval '1 h'
             FROM unnest($2::text[], $3::bigint[]) AS k(key, token)
             ON CONFLICT (scope, key) DO NOTHING"
        ),
        // The scope comes from the (unflattened) input rows, as in
        // `complete_many`: with `d.scope = $1` a custom plan for a scope the
        // statistics have not seen yet may scan the whole scope per batch,
        // and the comparison would measure that instead.
        baseline_complete_many: format!(
            "UPDATE {TABLE} AS d SET state = 'done', expires_at = now() + interval '1 h'
             FROM (SELECT $1::text AS scope, u.key, u.token
                   FROM unnest($2::text[], $3::bigint[]) AS u(key, token) OFFSET 0) AS l
             WHERE d.scope = l.scope AND d.key = l.key AND d.token = l.token
               AND d.state = 'claimed'"
        ),
    })
}

fn benches(c: &mut Criterion, rt: &Runtime, ctx: &Ctx) {
    let mut g = c.benchmark_group("claim_complete");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    g.throughput(Throughput::Elements(1));
    g.bench_function("idemq/sequential", |b| {
        b.to_async(rt).iter(|| ctx.claim_complete())
    });
    g.bench_function("baseline/sequential", |b| {
        b.to_async(rt).iter(|| ctx.baseline())
    });

    g.throughput(Throughput::Elements(CONCURRENCY as u64));
    g.bench_function(format!("idemq/concurrent_{CONCURRENCY}"), |b| {
        b.to_async(rt)
            .iter(|| join_all((0..CONCURRENCY).map(|_| ctx.claim_complete())))
    });
    g.bench_function(format!("baseline/concurrent_{CONCURRENCY}"), |b| {
        b.to_async(rt)
            .iter(|| join_all((0..CONCURRENCY).map(|_| ctx.baseline())))
    });

    for n in [100usize, 500] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("idemq/batched", n), &n, |b, &n| {
            b.to_async(rt).iter(|| ctx.batched(n))
        });
        g.bench_with_input(BenchmarkId::new("baseline/batched", n), &n, |b, &n| {
            b.to_async(rt).iter(|| ctx.baseline_batched(n))
        });
    }
    // Batches from several tasks at once (as several consumers would).
    let n = 500;
    g.throughput(Throughput::Elements((4 * n) as u64));
    g.bench_function(format!("idemq/batched_{n}_x4"), |b| {
        b.to_async(rt)
            .iter(|| join_all((0..4).map(|_| ctx.batched(n))))
    });
    g.finish();
}

fn main() {
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
    let ctx = match rt.block_on(setup()) {
        Ok(ctx) => ctx,
        Err(why) => {
            eprintln!("claim_complete: Postgres is unreachable, not benchmarking: {why}");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &rt, &ctx);
    c.final_summary();
    // Leave nothing behind.
    let _ = rt.block_on(sqlx::query(AssertSqlSafe(format!("TRUNCATE {TABLE}"))).execute(&ctx.pool));
}
