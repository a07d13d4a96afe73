//! Postgres-specific behaviour: table names, migrations, purge, batches,
//! typed errors, password redaction, and the transactional handler.
//!
//! One file, past 600 lines: the Postgres-only behaviour, sharing one
//! set-up; what every store does is in the conformance suite instead.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use idemq::testing::store::{assert_applied, must_claim};
use idemq::testing::unique_scope;
use idemq::{
    Claim, ClaimTtl, Completion, DedupStore, Delivery, Error, Fenced, Handler, HandlerError, Lease,
    Message, RecordCounts, RecordState, Release,
};
use idemq_postgres::{PostgresDedupStore, sql_error, transactional};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

const LONG: Duration = Duration::from_secs(60);

fn ttl(lease: Duration, retain: Duration) -> ClaimTtl {
    ClaimTtl { lease, retain }
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .expect("count")
}

// ---------------------------------------------------------------- table names

#[tokio::test]
async fn hostile_table_names_are_rejected() {
    // A lazy pool never connects: rejection happens before any SQL.
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("lazy pool");
    for bad in [
        "",
        "x; DROP TABLE users; --",
        "dedup\"; DROP TABLE users; --",
        "Dedup",
        "a.b.c",
        "1dedup",
        "de-dup",
        "de dup",
        "public.",
        "ünïcode",
        &"x".repeat(64),
    ] {
        match PostgresDedupStore::new(pool.clone()).with_table(bad) {
            Err(Error::InvalidInput {
                what: "table name", ..
            }) => {}
            other => panic!("{bad:?} must be InvalidInput, got {other:?}"),
        }
    }
    for good in ["dedup", "_x", "app.orders_dedup", "select", &"x".repeat(63)] {
        PostgresDedupStore::new(pool.clone())
            .with_table(good)
            .unwrap_or_else(|e| panic!("{good:?} must be accepted: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_word_and_schema_qualified_tables_work() {
    let Some(pool) = common::pool().await else {
        return;
    };
    // A schema of its own (created by migrate), so concurrent runs never meet.
    let schema = common::fresh_table("idemq_test_schema");
    for name in ["select", "dedup"] {
        let table = format!("{schema}.{name}");
        let store = PostgresDedupStore::new(pool.clone())
            .with_table(&table)
            .expect("valid");
        store.migrate().await.expect("migrate");
        assert_eq!(store.table(), table);
        let lease = must_claim(&store, "s", "k", ttl(LONG, LONG)).await;
        assert_applied(store.complete(&lease, LONG).await);
        assert_eq!(
            store.claim("s", "k", ttl(LONG, LONG)).await.expect("claim"),
            Claim::Done
        );
    }
    let tracked: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT table_name FROM {schema}.idemq_migrations ORDER BY table_name"
    )))
    .fetch_all(&pool)
    .await
    .expect("the tracking table lives in the table's schema");
    assert_eq!(tracked, vec!["dedup".to_owned(), "select".to_owned()]);
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await
        .expect("drop schema");
}

// ---------------------------------------------------------------- migrations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe_and_idempotent() {
    let Some(pool_a) = common::pool().await else {
        return;
    };
    let Some(pool_b) = common::pool().await else {
        return;
    };
    let table = common::fresh_table("idemq_test_mig");
    let stores: Vec<PostgresDedupStore> = (0..8)
        .map(|i| {
            let pool = if i % 2 == 0 { &pool_a } else { &pool_b };
            PostgresDedupStore::new(pool.clone())
                .with_table(&table)
                .expect("valid")
        })
        .collect();
    let results = join_all(stores.iter().map(|s| s.migrate())).await;
    for r in results {
        r.expect("concurrent migrate");
    }
    let versions = stores[0].migration_sql().len() as i64;
    assert!(versions >= 1);
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idemq_migrations WHERE table_name = $1")
            .bind(&table)
            .fetch_one(&pool_a)
            .await
            .expect("tracking");
    assert_eq!(
        recorded, versions,
        "each migration applied and recorded once"
    );
    stores[0].migrate().await.expect("again: nothing to do");
    let lease = must_claim(&stores[1], "s", "k", ttl(LONG, LONG)).await;
    assert_eq!(lease.attempt, 1);

    // A recorded migration whose text changed is refused, not re-run.
    sqlx::query("UPDATE idemq_migrations SET checksum = '\\x00' WHERE table_name = $1")
        .bind(&table)
        .execute(&pool_a)
        .await
        .expect("tamper");
    match stores[0].migrate().await {
        Err(Error::Config(msg)) => assert!(msg.contains("changed"), "{msg}"),
        other => panic!("a changed migration must be refused, got {other:?}"),
    }
    common::drop_table(&pool_a, &table).await;
}

#[tokio::test]
async fn migration_sql_is_rendered_for_the_table() {
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("lazy pool");
    let store = PostgresDedupStore::new(pool)
        .with_table("app.orders")
        .expect("valid");
    let sql = store.migration_sql();
    assert_eq!(sql[0].0, 1);
    assert!(
        sql[0]
            .1
            .contains("CREATE TABLE IF NOT EXISTS \"app\".\"orders\"")
    );
    assert!(
        sql[0]
            .1
            .contains("\"orders_expires_at_idx\" ON \"app\".\"orders\" (expires_at)")
    );
    assert!(!sql.iter().any(|(_, s)| s.contains("{{")));
}

// ---------------------------------------------------------------- purge

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_only_expired_rows_in_bounded_batches() {
    let table = common::fresh_table("idemq_test_purge");
    let Some(store) = common::store_in(&table).await else {
        return;
    };
    let short = Duration::from_millis(300);
    // 10 done records that expire soon, 2 dead ones that expire soon.
    for i in 0..12 {
        let lease = must_claim(&store, "s", &format!("old{i}"), ttl(short, short)).await;
        let f = if i < 10 {
            store.complete(&lease, short).await
        } else {
            store.bury(&lease, short).await
        };
        assert_applied(f);
    }
    // Live ones: done for long, dead for long, a lapsed lease that still
    // retains its attempts, a released one.
    let done = must_claim(&store, "s", "live-done", ttl(short, LONG)).await;
    assert_applied(store.complete(&done, LONG).await);
    let dead = must_claim(&store, "s", "live-dead", ttl(short, LONG)).await;
    assert_applied(store.bury(&dead, LONG).await);
    let _lapsing = must_claim(&store, "s", "live-lapsed", ttl(short, LONG)).await;
    let released = must_claim(&store, "s", "live-released", ttl(short, LONG)).await;
    assert_applied(store.fail(&released, Release::CountAttempt).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count(store.pool(), &table).await, 16);

    assert!(matches!(
        store.purge_batch(0).await,
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(
        store.purge_batch(3).await.expect("purge"),
        3,
        "bounded by the batch"
    );
    assert_eq!(count(store.pool(), &table).await, 13);
    // 9 left: batches of 4, 4, 1.
    assert_eq!(store.purge(4).await.expect("purge"), 9);
    assert_eq!(store.purge(4).await.expect("purge"), 0);
    assert_eq!(count(store.pool(), &table).await, 4);
    let mut kept = Vec::new();
    for k in ["live-done", "live-dead", "live-lapsed", "live-released"] {
        kept.push((k, store.get("s", k).await.expect("get").map(|r| r.state)));
    }
    assert_eq!(
        kept,
        vec![
            ("live-done", Some(RecordState::Done)),
            ("live-dead", Some(RecordState::Dead)),
            ("live-lapsed", Some(RecordState::Claimed)),
            ("live-released", Some(RecordState::Released)),
        ]
    );
    // The lapsed lease kept its attempt count through the purge.
    assert_eq!(
        must_claim(&store, "s", "live-lapsed", ttl(LONG, LONG))
            .await
            .attempt,
        2
    );
    common::drop_table(store.pool(), &table).await;
}

// ---------------------------------------------------------------- counts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_states_counts_live_records_by_state_per_scope() {
    // A table of its own: no other test's rows (nor purge) in the counts.
    let table = common::fresh_table("idemq_test_counts");
    let Some(store) = common::store_in(&table).await else {
        return;
    };
    let (a, b) = (unique_scope("counts_a"), unique_scope("counts_b"));
    let short = Duration::from_millis(100);
    // Scope a: one record in every state, and an expired done one.
    let _live = must_claim(&store, &a, "live", ttl(LONG, LONG)).await;
    let _lapsing = must_claim(&store, &a, "lapsed", ttl(short, LONG)).await;
    let released = must_claim(&store, &a, "released", ttl(LONG, LONG)).await;
    assert_applied(store.fail(&released, Release::CountAttempt).await);
    let done = must_claim(&store, &a, "done", ttl(LONG, LONG)).await;
    assert_applied(store.complete(&done, LONG).await);
    let dead = must_claim(&store, &a, "dead", ttl(LONG, LONG)).await;
    assert_applied(store.bury(&dead, LONG).await);
    let expiring = must_claim(&store, &a, "expired", ttl(LONG, LONG)).await;
    assert_applied(store.complete(&expiring, short).await);
    // Scope b: two done records and a live claim.
    for k in ["x", "y"] {
        let lease = must_claim(&store, &b, k, ttl(LONG, LONG)).await;
        assert_applied(store.complete(&lease, LONG).await);
    }
    let _b_live = must_claim(&store, &b, "z", ttl(LONG, LONG)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The expired row is still in the table (nothing purged it): the count
    // must leave it out by itself.
    assert_eq!(count(store.pool(), &table).await, 9);

    let in_a = store.count_states(Some(&a)).await.expect("count a");
    assert_eq!(
        in_a,
        RecordCounts {
            claimed: 1,
            lapsed: 1,
            released: 1,
            done: 1,
            dead: 1,
        }
    );
    assert_eq!(in_a.total(), 5);
    let in_b = store.count_states(Some(&b)).await.expect("count b");
    assert_eq!(
        in_b,
        RecordCounts {
            claimed: 1,
            done: 2,
            ..RecordCounts::default()
        }
    );
    let all = store.count_states(None).await.expect("count all");
    assert_eq!(
        all,
        RecordCounts {
            claimed: 2,
            lapsed: 1,
            released: 1,
            done: 3,
            dead: 1,
        }
    );
    assert_eq!(
        store
            .count_states(Some(&unique_scope("counts_none")))
            .await
            .expect("count an empty scope"),
        RecordCounts::default()
    );
    for bad in ["", "a b", "x'; DROP TABLE t; --"] {
        assert!(
            matches!(
                store.count_states(Some(bad)).await,
                Err(Error::InvalidInput { what: "scope", .. })
            ),
            "{bad:?}"
        );
    }
    common::drop_table(store.pool(), &table).await;
}

// ---------------------------------------------------------------- semantics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_record_starts_over_at_attempt_one() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("expired_restart");
    let short = Duration::from_millis(300);
    let first = must_claim(&store, &scope, "k", ttl(short, short)).await;
    assert_applied(store.fail(&first, Release::CountAttempt).await);
    assert_eq!(
        must_claim(&store, &scope, "k", ttl(short, short))
            .await
            .attempt,
        2
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.get(&scope, "k").await.expect("get"), None);
    let again = must_claim(&store, &scope, "k", ttl(LONG, LONG)).await;
    assert_eq!(again.attempt, 1, "an expired record is a new key");
    let record = store.get(&scope, "k").await.expect("get").expect("record");
    assert!(record.expires_in > Duration::from_secs(50), "{record:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_handle_repeats_and_mixed_scopes() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("batch_repeats");
    let keys: Vec<String> = ["a", "a", "b"].map(String::from).to_vec();
    let claims = store
        .claim_many(&scope, &keys, ttl(LONG, LONG))
        .await
        .expect("claim_many");
    assert!(matches!(claims[1], Claim::InProgress { .. }), "{claims:?}");
    let [a, b] = [&claims[0], &claims[2]].map(|c| c.clone().into_lease().expect("a new key"));
    let other_scope = format!("{scope}.x");
    let c = must_claim(&store, &other_scope, "a", ttl(LONG, LONG)).await;
    let fenced = store
        .complete_many(&[a.clone(), c.clone(), a.clone(), b.clone()], LONG)
        .await
        .expect("complete_many");
    // The repeat of `a` finds its own done record: applied, as a call
    // after the first would answer.
    assert_eq!(
        fenced,
        vec![
            Fenced::Applied,
            Fenced::Applied,
            Fenced::Applied,
            Fenced::Applied
        ]
    );
    assert_eq!(
        store
            .claim(&other_scope, "a", ttl(LONG, LONG))
            .await
            .expect("claim"),
        Claim::Done
    );

    // A big batch: one statement, answers in order.
    let many: Vec<String> = (0..500).rev().map(|i| format!("m{i}")).collect();
    let claims = store
        .claim_many(&scope, &many, ttl(LONG, LONG))
        .await
        .expect("claim_many");
    let leases: Vec<Lease> = claims
        .into_iter()
        .map(|c| c.into_lease().expect("a new key is won"))
        .collect();
    assert!(leases.iter().zip(&many).all(|(l, k)| &l.key == k));
    let fenced = store
        .complete_many(&leases, LONG)
        .await
        .expect("complete_many");
    assert!(fenced.iter().all(|f| *f == Fenced::Applied));
    let again = store
        .claim_many(&scope, &many, ttl(LONG, LONG))
        .await
        .expect("claim_many");
    assert!(again.iter().all(|c| *c == Claim::Done));
    let bad = vec!["ok".to_owned(), "{bad}".to_owned()];
    assert!(matches!(
        store.claim_many(&scope, &bad, ttl(LONG, LONG)).await,
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_over_overlapping_keys_have_one_winner_per_key() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("batch_race");
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let runs = join_all((0..6).map(|i| {
        let mut mine = keys.clone();
        if i % 2 == 1 {
            mine.reverse();
        }
        let store = store.clone();
        let scope = scope.clone();
        async move { store.claim_many(&scope, &mine, ttl(LONG, LONG)).await }
    }))
    .await;
    let mut winners = std::collections::HashMap::<String, usize>::new();
    for run in runs {
        for c in run.expect("claim_many") {
            match c {
                Claim::Claimed(l) => *winners.entry(l.key).or_default() += 1,
                Claim::InProgress { .. } => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(winners.len(), keys.len());
    assert!(winners.values().all(|n| *n == 1), "{winners:?}");
}

/// `complete_many` and `claim_many` over the same rows at once (a batch
/// of completions while a batch of duplicates is being claimed, as
/// `idemq::Coalescing` sends them) lock the rows in one order, so they
/// wait for each other instead of deadlocking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claim_and_complete_batches_do_not_deadlock() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("batch_deadlock");
    for round in 0..10 {
        let keys: Vec<String> = (0..200).map(|i| format!("r{round}-{i:03}")).collect();
        let mut leases: Vec<Lease> = store
            .claim_many(&scope, &keys, ttl(LONG, LONG))
            .await
            .expect("claim_many")
            .into_iter()
            .map(|c| c.into_lease().expect("a new key is won"))
            .collect();
        // Completed in the opposite order from the one claims lock in.
        leases.reverse();
        let (claims, done) = tokio::join!(
            store.claim_many(&scope, &keys, ttl(LONG, LONG)),
            store.complete_many(&leases, LONG),
        );
        claims.expect("claim_many");
        assert_eq!(done.expect("complete_many"), vec![Fenced::Applied; 200]);
    }
}

/// Like the test above, for replay's batch revival against consumers'
/// batch claims of the same keys: each statement must lock its rows in the
/// same order, or Postgres aborts one of them as a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claim_and_revive_batches_do_not_deadlock() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("revive_deadlock");
    for round in 0..10 {
        let keys: Vec<String> = (0..200).map(|i| format!("r{round}-{i:03}")).collect();
        // Claims whose lease lapses at once: revivable.
        store
            .claim_many(&scope, &keys, ttl(Duration::from_millis(1), LONG))
            .await
            .expect("claim_many");
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Revived in the opposite order from the one claims lock in.
        let records: Vec<(String, String)> = keys
            .iter()
            .rev()
            .map(|k| (scope.clone(), k.clone()))
            .collect();
        let (claims, revived) = tokio::join!(
            store.claim_many(&scope, &keys, ttl(LONG, LONG)),
            store.revive_many(&records),
        );
        claims.expect("claim_many");
        assert_eq!(revived.expect("revive_many").len(), 200);
    }
}

// ---------------------------------------------------------------- errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_are_typed_and_permanent() {
    let Some(pool) = common::pool().await else {
        return;
    };
    let store = PostgresDedupStore::new(pool)
        .with_table(&common::fresh_table("idemq_never_created"))
        .expect("valid");
    match store.claim("s", "k", ttl(LONG, LONG)).await {
        Err(
            e @ Error::Backend {
                backend: "postgres",
                op: "claim",
                transient: false,
                ..
            },
        ) => assert!(!e.is_transient()),
        other => panic!("a missing table is a permanent backend error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_transient() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("lazy pool");
    let store = PostgresDedupStore::new(pool);
    let e = store
        .claim("s", "k", ttl(LONG, LONG))
        .await
        .expect_err("nothing listens on port 1");
    assert!(e.is_transient(), "{e:?}");
    assert!(
        matches!(
            e,
            Error::Unavailable {
                backend: "postgres",
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show() {
    const SECRET: &str = "Sup3r-S3cret-pw";
    // Nothing listens on port 1 (a connection error), or a bad option.
    for url in [
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test"),
        format!("postgres://postgres@127.0.0.1:5432/test?password={SECRET}&sslmode=bogus"),
        format!("postgres://postgres:{SECRET}@127.0.0.1:notaport/test"),
        format!("postgres://postgres:{SECRET}@[::1/test"),
    ] {
        let e = PostgresDedupStore::connect(&url)
            .await
            .expect_err("must not connect");
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            assert!(!format!("{s} {s:?}").contains(SECRET));
            source = s.source();
        }
    }
    // A live server with trust auth accepts any password.
    let base = common::url();
    let Some(rest) = base.strip_prefix("postgres://") else {
        return;
    };
    let with_pw = match rest.split_once('@') {
        Some((user, host)) => format!(
            "postgres://{}:{SECRET}@{host}",
            user.split(':').next().unwrap_or(user)
        ),
        None => return,
    };
    let store = match PostgresDedupStore::connect(&with_pw).await {
        Ok(s) => s,
        Err(e) => {
            let _ = idemq::testing::service_unavailable::<()>("postgres", e);
            return;
        }
    };
    let debug = format!("{store:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("postgres://"), "{debug}");
    let store = store
        .with_table(&common::fresh_table("idemq_never_created"))
        .expect("valid");
    let e = store.get("s", "k").await.expect_err("no such table");
    assert!(!format!("{e} {e:?}").contains(SECRET));
}

// ---------------------------------------------------------------- transactional

async fn effects_table(pool: &PgPool) -> String {
    let table = common::fresh_table("idemq_test_effects");
    // No unique constraint: only the done mark prevents duplicates.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (key text NOT NULL, token bigint NOT NULL)"
    )))
    .execute(pool)
    .await
    .expect("create effects table");
    table
}

fn message(lease: &Lease) -> Message {
    let delivery = Delivery::new(1, "body").with_message_id(lease.key.clone());
    Message::new(Arc::new(delivery), Arc::new(lease.clone()), LONG)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_handler_commits_effect_and_done_mark_together() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("tx_commit");
    let effects = effects_table(store.pool()).await;
    let sql: Arc<str> = format!("INSERT INTO {effects} (key, token) VALUES ($1, $2)").into();
    let fail_on = "bad";
    let handler = transactional(&store, move |tx, msg| {
        let sql = sql.clone();
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(sql))
                .bind(msg.key())
                .bind(i64::from_ne_bytes(msg.lease().token.0.to_ne_bytes()))
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            if msg.key() == fail_on {
                return Err(HandlerError::retry("business rule says later"));
            }
            Ok(())
        })
    });
    assert_eq!(handler.completion(), Completion::InHandler);
    assert!(format!("{handler:?}").contains("Transactional"));

    // Success: the effect and the done mark are both there.
    let lease = must_claim(&store, &scope, "good", ttl(LONG, LONG)).await;
    handler.handle(message(&lease)).await.expect("handled");
    assert_eq!(
        store
            .claim(&scope, "good", ttl(LONG, LONG))
            .await
            .expect("claim"),
        Claim::Done
    );
    assert_eq!(count(store.pool(), &effects).await, 1);
    // Running it again with the spent lease: lease lost, nothing written.
    assert!(matches!(
        handler.handle(message(&lease)).await,
        Err(HandlerError::LeaseLost)
    ));
    assert_eq!(count(store.pool(), &effects).await, 1);

    // Failure: rolled back, the claim untouched.
    let lease = must_claim(&store, &scope, "bad", ttl(LONG, LONG)).await;
    assert!(matches!(
        handler.handle(message(&lease)).await,
        Err(HandlerError::Retry(_))
    ));
    assert_eq!(count(store.pool(), &effects).await, 1, "rolled back");
    let record = store
        .get(&scope, "bad")
        .await
        .expect("get")
        .expect("record");
    assert_eq!((record.state, record.attempts), (RecordState::Claimed, 1));

    // A lease taken over after lapsing: rolled back, LeaseLost; the new
    // owner's run commits.
    let short = Duration::from_millis(300);
    let old = must_claim(&store, &scope, "slow", ttl(short, LONG)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = must_claim(&store, &scope, "slow", ttl(LONG, LONG)).await;
    assert_eq!(new.attempt, 2);
    assert!(matches!(
        handler.handle(message(&old)).await,
        Err(HandlerError::LeaseLost)
    ));
    assert_eq!(count(store.pool(), &effects).await, 1);
    handler.handle(message(&new)).await.expect("new owner");
    assert_eq!(count(store.pool(), &effects).await, 2);
    let tokens: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT token FROM {effects} WHERE key = 'slow'"
    )))
    .fetch_all(store.pool())
    .await
    .expect("tokens");
    assert_eq!(tokens, vec![i64::from_ne_bytes(new.token.0.to_ne_bytes())]);

    sqlx::query(AssertSqlSafe(format!("DROP TABLE {effects}")))
        .execute(store.pool())
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_during_a_transactional_handler_rolls_it_back() {
    let Some(store) = common::store().await else {
        return;
    };
    let scope = unique_scope("tx_takeover");
    let effects = effects_table(store.pool()).await;
    let sql: Arc<str> = format!("INSERT INTO {effects} (key, token) VALUES ($1, 0)").into();
    let handler = store.transactional(move |tx, msg| {
        let sql = sql.clone();
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(sql))
                .bind(msg.key())
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            // Slow: the lease lapses and is taken over meanwhile.
            tokio::time::sleep(Duration::from_millis(800)).await;
            Ok(())
        })
    });
    let old = must_claim(&store, &scope, "k", ttl(Duration::from_millis(300), LONG)).await;
    let running = tokio::spawn({
        let msg = message(&old);
        async move { handler.handle(msg).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = must_claim(&store, &scope, "k", ttl(LONG, LONG)).await;
    assert!(matches!(
        running.await.expect("join"),
        Err(HandlerError::LeaseLost)
    ));
    assert_eq!(
        count(store.pool(), &effects).await,
        0,
        "the old run's write is gone"
    );
    let record = store.get(&scope, "k").await.expect("get").expect("record");
    assert_eq!((record.state, record.attempts), (RecordState::Claimed, 2));
    assert_applied(store.complete(&new, LONG).await);
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {effects}")))
        .execute(store.pool())
        .await
        .expect("drop");
}

// ---------------------------------------------------------------- TLS

/// `cargo test -p idemq-postgres --features tls-rustls`: the store works
/// over TLS (`sslmode=require`; the test server's certificate is
/// self-signed, so it is not verified).
#[cfg(feature = "tls-rustls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_over_tls() {
    let url = common::url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let Some(pool) = common::pool_at(&format!("{url}{sep}sslmode=require")).await else {
        return;
    };
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("pg_stat_ssl");
    assert!(encrypted, "the connection must be encrypted");
    let store = PostgresDedupStore::new(pool)
        .with_table(common::TEST_TABLE)
        .expect("valid");
    let scope = unique_scope("tls");
    let lease = must_claim(&store, &scope, "k", ttl(LONG, LONG)).await;
    assert_applied(store.complete(&lease, LONG).await);
}
