//! Exactly-once effects with transactional handlers: several engines share
//! one broker and the Postgres store; duplicates are published, some
//! leases lapse mid-handler and are taken over, handlers fail at random
//! (after writing!). Afterwards every id has exactly one business row, or
//! was dead-lettered with none.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idemq::memory::MemoryBroker;
use idemq::testing::unique_scope;
use idemq::{
    Backoff, Broker, Claim, ClaimTtl, DedupStore, Engine, Error, Fenced, HandlerError, Lease,
    OutgoingMessage, Record, RecordState, Release, Report, Revival,
};
use idemq_postgres::{PostgresDedupStore, sql_error};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;

/// Ids whose first attempt stalls: the store refuses to renew their lease
/// (as during a partition between that consumer and Postgres) while the
/// handler takes several leases long, so another consumer takes over.
fn is_slow(key: &str) -> bool {
    key.ends_with('7')
}

/// Ids whose handler always fails permanently (after writing).
fn is_poison(key: &str) -> bool {
    key.ends_with("13")
}

/// The Postgres store, except that renewing the first attempt of a slow id
/// fails, so its lease lapses while its handler still runs.
#[derive(Clone)]
struct LapsingStore(PostgresDedupStore);

#[async_trait]
impl DedupStore for LapsingStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        self.0.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        if is_slow(&lease.key) && lease.attempt == 1 {
            return Err(Error::Timeout {
                backend: "postgres",
                op: "renew",
                after: Duration::from_millis(1),
            });
        }
        self.0.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.0.complete(lease, keep_for).await
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.0.fail(lease, release).await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.0.bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.0.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.0.lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.0.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.0.revive(scope, key).await
    }
}

const IDS: usize = 120;
const ENGINES: usize = 3;
const LEASE: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_handlers_have_exactly_once_effects() {
    let Some(base) = common::store().await else {
        return;
    };
    let scope = unique_scope("exactly_once");
    let effects = common::fresh_table("idemq_test_eo_effects");
    // No unique constraint: nothing but the fenced done mark stops doubles.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {effects} (id text NOT NULL, engine int NOT NULL, attempt int NOT NULL)"
    )))
    .execute(base.pool())
    .await
    .expect("create effects table");

    let broker = MemoryBroker::new("eo");
    let ids: Vec<String> = (0..IDS).map(|i| format!("id-{i}")).collect();
    // Every id once, a third of them (and every slow one) twice more.
    let mut published = 0;
    for round in 0..3 {
        for (i, id) in ids.iter().enumerate() {
            if round == 0 || i % 3 == 0 || is_slow(id) {
                broker
                    .publish(OutgoingMessage::new(id.clone()).with_message_id(id.clone()))
                    .await
                    .expect("publish");
                published += 1;
            }
        }
    }

    let insert: Arc<str> =
        format!("INSERT INTO {effects} (id, engine, attempt) VALUES ($1, $2, $3)").into();
    let mut runs = Vec::new();
    for engine_no in 0..ENGINES {
        // Each engine has its own pool, as separate processes would.
        // More connections than handlers in flight: a stalled attempt holds
        // one inside its open transaction, and claims must still get one.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(12)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&common::url())
            .await
            .expect("pool");
        let store = PostgresDedupStore::new(pool)
            .with_table(common::TEST_TABLE)
            .expect("table");
        let insert = insert.clone();
        let (copies, watcher, scope_w) = (broker.clone(), base.clone(), scope.clone());
        let handler = store.transactional(move |tx, msg| {
            let insert = insert.clone();
            let (copies, watcher, scope_w) = (copies.clone(), watcher.clone(), scope_w.clone());
            Box::pin(async move {
                let key = msg.key().to_owned();
                sqlx::query(AssertSqlSafe(insert))
                    .bind(&key)
                    .bind(engine_no as i32)
                    .bind(msg.attempt() as i32)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
                if is_slow(&key) && msg.attempt() == 1 {
                    // A copy arrives while this attempt stalls with no renewal
                    // getting through; hold the transaction open until another
                    // consumer has taken the key over (bounded), so the fenced
                    // done mark below must refuse.
                    copies
                        .publish(OutgoingMessage::new(key.clone()).with_message_id(key.clone()))
                        .await
                        .map_err(HandlerError::retry)?;
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(LEASE / 6).await;
                        if let Ok(Some(r)) = watcher.get(&scope_w, &key).await
                            && r.attempts >= 2
                        {
                            break;
                        }
                    }
                }
                if is_poison(&key) {
                    return Err(HandlerError::permanent("poison"));
                }
                if rand::random_bool(0.25) {
                    return Err(HandlerError::retry("random failure"));
                }
                Ok(())
            })
        });
        let engine = Engine::builder(broker.clone(), LapsingStore(store), handler)
            .scope(&scope)
            .concurrency(8)
            .lease(LEASE)
            .keep_for(Duration::from_secs(600))
            .max_attempts(6)
            .retry_backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(100),
            ))
            .defer_bounds(Duration::from_millis(50), Duration::from_millis(500))
            .build()
            .expect("engine");
        runs.push(tokio::spawn(engine.run(CancellationToken::new())));
    }
    broker.close_when_idle();

    let mut total = Report::default();
    let all = async {
        for run in runs {
            total.merge(&run.await.expect("engine task"));
        }
    };
    tokio::time::timeout(Duration::from_secs(90), all)
        .await
        .expect("the engines settle everything");

    let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, count(*) FROM {effects} GROUP BY id"
    )))
    .fetch_all(base.pool())
    .await
    .expect("effects");
    let rows: HashMap<String, i64> = rows.into_iter().collect();
    let dead: HashSet<String> = broker
        .dead_letters()
        .into_iter()
        .filter_map(|d| d.message_id)
        .collect();
    eprintln!(
        "published {published}, {} ids: {} with an effect, {} dead-lettered; {total:?}",
        ids.len(),
        rows.len(),
        dead.len()
    );

    for id in &ids {
        let n = rows.get(id).copied().unwrap_or(0);
        assert!(n <= 1, "{id} took effect {n} times");
        if n == 1 {
            assert!(!dead.contains(id), "{id} took effect and was dead-lettered");
            assert_eq!(
                base.claim(
                    &scope,
                    id,
                    ClaimTtl {
                        lease: LEASE,
                        retain: LEASE
                    }
                )
                .await
                .expect("claim"),
                Claim::Done,
                "{id} took effect but is not done"
            );
        } else {
            assert!(
                dead.contains(id),
                "{id} neither took effect nor was dead-lettered"
            );
        }
        if is_poison(id) {
            assert!(dead.contains(id), "{id} is poison");
        }
    }
    assert_eq!(total.handled as usize, rows.len(), "one commit per effect");
    assert!(
        total.lease_lost > 0,
        "no lease lapsed mid-handler: the test did not test"
    );
    assert!(
        total.retried > 0,
        "no handler failed: the test did not test"
    );
    assert!(total.duplicates > 0, "no duplicate was met");
    let stats = broker.stats();
    assert_eq!(
        (stats.ready, stats.delayed, stats.unacked),
        (0, 0, 0),
        "{stats:?}"
    );

    sqlx::query(AssertSqlSafe(format!("DROP TABLE {effects}")))
        .execute(base.pool())
        .await
        .expect("drop");
}
