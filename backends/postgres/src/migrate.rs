//! The schema: embedded migrations, rendered for the configured table and
//! applied by a small versioned runner.
//!
//! The migration files in `migrations/` are embedded with
//! `sqlx::migrate!` (so they are versioned, ordered and checksummed by
//! sqlx), but they are templates: `{{table}}` and `{{expires_index}}` stand
//! for the configured table and its index. sqlx's own runner cannot
//! substitute a name and records versions per database, not per table, so
//! [`crate::PostgresDedupStore::migrate`] applies them itself:
//!
//! 1. one transaction, holding a transaction-level advisory lock so that any
//!    number of processes can call `migrate` at once;
//! 2. `idemq_migrations` (in the table's schema) records
//!    `(table_name, version, checksum)` per dedup table;
//! 3. every embedded migration not yet recorded for this table is rendered
//!    (the validated, quoted identifiers substituted) and run, and
//!    recorded; an applied migration whose checksum changed is an error.
//!
//! DDL is transactional in Postgres, so a failed migration leaves nothing
//! half done.

use sqlx::migrate::{Migration, Migrator};
use sqlx::{AssertSqlSafe, PgPool};

use idemq::Error;

use crate::error::op;
use crate::ident::TableName;

/// The embedded migration templates.
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The advisory lock every idemq-postgres migration holds ("idemq_mg").
const MIGRATION_LOCK: i64 = 0x6964_656d_715f_6d67;

/// Name of the table that records applied migrations, per schema.
pub(crate) const TRACKING_TABLE: &str = "idemq_migrations";

fn up_migrations() -> impl Iterator<Item = &'static Migration> {
    MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
}

/// A migration template rendered for `table`.
pub(crate) fn render(template: &str, table: &TableName) -> String {
    template
        .replace("{{table}}", &table.quoted())
        .replace("{{expires_index}}", &table.expires_index())
}

/// Every up migration, rendered for `table`, in order.
pub(crate) fn rendered(table: &TableName) -> Vec<(i64, String)> {
    up_migrations()
        .map(|m| (m.version, render(m.sql.as_str(), table)))
        .collect()
}

/// Applies what is missing; see the module docs.
pub(crate) async fn run(pool: &PgPool, table: &TableName) -> Result<(), Error> {
    let mut tx = pool.begin().await.map_err(op("migrate"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(op("migrate"))?;

    if let Some(schema) = table.schema() {
        // Checked first: CREATE SCHEMA IF NOT EXISTS needs the CREATE
        // privilege on the database even when the schema exists.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&mut *tx)
                .await
                .map_err(op("migrate"))?;
        if !exists {
            // `schema` passed TableName validation; it is quoted.
            sqlx::query(AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .execute(&mut *tx)
            .await
            .map_err(op("migrate"))?;
        }
    }

    let tracking = table.qualify(TRACKING_TABLE);
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {tracking} (
            table_name  text        NOT NULL,
            version     bigint      NOT NULL,
            description text        NOT NULL,
            checksum    bytea       NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (table_name, version)
        )"
    )))
    .execute(&mut *tx)
    .await
    .map_err(op("migrate"))?;

    let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT version, checksum FROM {tracking} WHERE table_name = $1"
    )))
    .bind(table.name())
    .fetch_all(&mut *tx)
    .await
    .map_err(op("migrate"))?;

    for m in up_migrations() {
        match applied.iter().find(|(v, _)| *v == m.version) {
            Some((_, sum)) if sum.as_slice() == &*m.checksum => continue,
            Some(_) => {
                return Err(Error::Config(format!(
                    "migration {} ({}) of table {table} was changed after it was applied",
                    m.version, m.description
                )));
            }
            None => {}
        }
        // The only dynamic text is the validated, quoted identifiers.
        sqlx::raw_sql(AssertSqlSafe(render(m.sql.as_str(), table)))
            .execute(&mut *tx)
            .await
            .map_err(op("migrate"))?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {tracking} (table_name, version, description, checksum)
             VALUES ($1, $2, $3, $4)"
        )))
        .bind(table.name())
        .bind(m.version)
        .bind(&*m.description)
        .bind(&*m.checksum)
        .execute(&mut *tx)
        .await
        .map_err(op("migrate"))?;
        tracing::info!(table = %table, version = m.version, "applied idemq-postgres migration");
    }
    tx.commit().await.map_err(op("migrate"))
}
