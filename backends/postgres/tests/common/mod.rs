//! Helpers shared by the integration tests: a pool on the test database
//! (`DATABASE_URL`, default postgres://postgres@127.0.0.1:5432/test), or a
//! skip (a failure with IDEMQ_REQUIRE_SERVICES=1) when it is unreachable.

#![allow(dead_code)]

use std::time::Duration;

use idemq_postgres::PostgresDedupStore;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The table the conformance suite and most tests share (each test uses
/// its own scope).
pub const TEST_TABLE: &str = "idemq_test_dedup";

pub fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A small pool on the test database, or `None` (skip).
pub async fn pool() -> Option<PgPool> {
    pool_at(&url()).await
}

pub async fn pool_at(url: &str) -> Option<PgPool> {
    match PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
    {
        Ok(pool) => Some(pool),
        Err(e) => idemq::testing::service_unavailable("postgres", e),
    }
}

/// A migrated store in `table`, or `None` (skip).
pub async fn store_in(table: &str) -> Option<PostgresDedupStore> {
    let store = PostgresDedupStore::new(pool().await?)
        .with_table(table)
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    // Keep the shared tables small across runs (only expired rows go).
    store.purge(10_000).await.expect("purge");
    Some(store)
}

/// A migrated store in the shared test table, or `None` (skip).
pub async fn store() -> Option<PostgresDedupStore> {
    store_in(TEST_TABLE).await
}

/// A fresh table name for a test that needs a table of its own.
pub fn fresh_table(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// Drops a test's own table and its migration record.
pub async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(pool)
        .await
        .expect("drop table");
    let (schema, name) = match table.split_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, table),
    };
    let tracking = match schema {
        Some(s) => format!("{s}.idemq_migrations"),
        None => "idemq_migrations".to_owned(),
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {tracking} WHERE table_name = $1"
    )))
    .bind(name)
    .execute(pool)
    .await
    .expect("forget migrations");
}
