//! [`PostgresDedupStore`]: the [`DedupStore`] over a sqlx `PgPool`.
//!
//! Split by concern: [`sql`] renders the statements and decodes their
//! rows, [`connect`] makes pools and bounds calls, [`ops`] implements the
//! trait; this file holds the store, its constructors and its admin calls.

mod connect;
mod ops;
mod sql;

pub use connect::CONNECT_TIMEOUT;
pub(crate) use connect::bounded;
pub(crate) use sql::{Statements, interval};

use connect::{connect_pool, describe};
use sql::state_from_sql;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

use idemq::error::{redact_url, url_passwords};
use idemq::key;
use idemq::{Error, RecordCounts, RecordState};

use crate::error::scrub;
use crate::ident::TableName;
use crate::migrate;

/// The operation timeout unless [`PostgresDedupStore::with_op_timeout`]
/// says otherwise.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The table used unless [`PostgresDedupStore::with_table`] says otherwise.
pub const DEFAULT_TABLE: &str = "idemq_dedup";

/// A [`DedupStore`](idemq::DedupStore) in one Postgres table; see the [crate docs](crate).
///
/// Cheap to clone (the pool is shared). Create the table with
/// [`PostgresDedupStore::migrate`] once (any number of processes may call it
/// concurrently); delete expired rows now and then with
/// [`PostgresDedupStore::purge`].
#[derive(Clone)]
pub struct PostgresDedupStore {
    pool: PgPool,
    /// The store's own operations' pool, made on first use (see `ops`).
    ops: Arc<OnceLock<PgPool>>,
    table: TableName,
    sql: Arc<Statements>,
    op_timeout: Option<Duration>,
}

impl fmt::Debug for PostgresDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDedupStore")
            .field("table", &self.table)
            .field("op_timeout", &self.op_timeout)
            .field("server", &describe(&self.pool.connect_options()))
            .field("pool_size", &self.pool.size())
            .field("pool_idle", &self.pool.num_idle())
            .finish()
    }
}

impl PostgresDedupStore {
    /// A store on `pool`, in the table [`DEFAULT_TABLE`] (`idemq_dedup`).
    pub fn new(pool: PgPool) -> PostgresDedupStore {
        let table = TableName::default_table();
        PostgresDedupStore {
            sql: Arc::new(Statements::new(&table)),
            pool,
            ops: Arc::default(),
            table,
            op_timeout: Some(DEFAULT_OP_TIMEOUT),
        }
    }

    /// The same store in another table: `name` or `schema.name`, each part
    /// matching `^[a-z_][a-z0-9_]{0,62}$`. Anything else is
    /// [`Error::InvalidInput`] (`what: "table name"`); the name is never
    /// spliced into SQL unvalidated, and always double-quoted.
    pub fn with_table(self, table: &str) -> Result<PostgresDedupStore, Error> {
        let table = TableName::parse(table)?;
        Ok(PostgresDedupStore {
            sql: Arc::new(Statements::new(&table)),
            pool: self.pool,
            ops: self.ops,
            table,
            op_timeout: self.op_timeout,
        })
    }

    /// Bounds every store operation (acquiring a connection included):
    /// one that takes longer fails with [`Error::Timeout`] (transient), so
    /// a hung network makes the engine fail closed and back off instead of
    /// waiting on TCP timeouts. Default [`DEFAULT_OP_TIMEOUT`]; `None`
    /// waits as long as the pool and the server let it. An operation that
    /// timed out may still have taken effect; the fencing tokens keep that
    /// harmless (a claim whose answer was lost lapses with its lease).
    pub fn with_op_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.op_timeout = timeout.into();
        self
    }

    /// The pool the store's own operations (claims, renewals, settlements,
    /// reads) run on: a second pool with the connect options and the size
    /// of [`PostgresDedupStore::pool`], opened lazily. Transactional
    /// handlers hold connections of the main pool for as long as they run;
    /// on a pool of its own, a lease renewal never waits behind them.
    fn ops(&self) -> &PgPool {
        self.ops.get_or_init(|| {
            let main = self.pool.options();
            PgPoolOptions::new()
                .max_connections(main.get_max_connections())
                .acquire_timeout(main.get_acquire_timeout())
                .connect_lazy_with((*self.pool.connect_options()).clone())
        })
    }

    /// Runs one statement under the operation timeout, mapping its error.
    async fn run<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, Error> {
        bounded(self.op_timeout, op, fut).await
    }

    /// Connects a pool to `url` (`postgres://user:password@host:port/db`)
    /// with a [`CONNECT_TIMEOUT`] acquire timeout, in the default table.
    /// For other pool settings build the pool yourself and use
    /// [`PostgresDedupStore::new`].
    ///
    /// The first connection is one attempt, not retried (the pool would
    /// retry a refused one until its acquire timeout, and then say only
    /// that it timed out), so a mistake shows at once, with its cause and
    /// the URL with its password masked:
    ///
    /// - a refused port: [`Error::Unavailable`] (transient), saying
    ///   `connection refused`;
    /// - no connection within [`CONNECT_TIMEOUT`]: [`Error::Timeout`];
    /// - a login the server refuses (a database or role that does not
    ///   exist, a wrong password): [`Error::Backend`] with the server's
    ///   words and SQLSTATE, such as `database "x" does not exist (SQLSTATE
    ///   3D000)`;
    /// - `sslmode=require` (or `verify-ca`, `verify-full`) when sqlx was
    ///   built without TLS: [`Error::Config`] naming this crate's
    ///   `tls-rustls` feature;
    /// - an invalid URL: [`Error::InvalidInput`].
    ///
    /// Errors, their sources and `Debug` output never show the password.
    pub async fn connect(url: &str) -> Result<PostgresDedupStore, Error> {
        let target = redact_url(url);
        let pool = connect_pool(url, &target)
            .await
            .map_err(|e| scrub(e, &url_passwords(url)))
            .inspect_err(|e| {
                tracing::debug!(url = %target, error = %e, "postgres connect failed");
            })?;
        Ok(PostgresDedupStore::new(pool))
    }

    /// The operation timeout ([`PostgresDedupStore::with_op_timeout`]).
    pub fn op_timeout(&self) -> Option<Duration> {
        self.op_timeout
    }

    /// The pool (for your own queries, or a [`crate::transactional`]
    /// handler). The store's own operations run on a second pool of the
    /// same options and size, so that handlers holding this one's
    /// connections never hold up a lease renewal.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table name, as configured (`name` or `schema.name`).
    pub fn table(&self) -> String {
        self.table.to_string()
    }

    pub(crate) fn statements(&self) -> &Arc<Statements> {
        &self.sql
    }

    /// Creates or upgrades the table: applies the embedded migrations this
    /// table has not seen yet, recorded per table in `idemq_migrations`
    /// (in the table's schema, created when missing). Safe to call from
    /// many processes at once (they serialize on an advisory lock), and
    /// cheap when there is nothing to do. See the
    /// [crate docs](crate#schema-and-migrations).
    pub async fn migrate(&self) -> Result<(), Error> {
        migrate::run(self.ops(), &self.table).await
    }

    /// The DDL [`PostgresDedupStore::migrate`] runs for this table, as
    /// `(version, sql)` in order: for teams that apply schema changes with
    /// their own migration tool instead.
    pub fn migration_sql(&self) -> Vec<(i64, String)> {
        migrate::rendered(&self.table)
    }

    /// Deletes at most `limit` expired rows in one statement; answers how
    /// many it deleted. Rows a concurrent claim is taking over are skipped.
    /// `limit` 0 is [`Error::InvalidInput`].
    pub async fn purge_batch(&self, limit: usize) -> Result<u64, Error> {
        if limit == 0 {
            return Err(Error::invalid("purge batch", "must be at least 1"));
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let done = self
            .run(
                "purge",
                sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
                    .bind(limit)
                    .execute(self.ops()),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes every expired row, `batch` rows per statement (each its own
    /// short transaction, so purging never holds many locks or one long
    /// transaction); answers how many it deleted in all. Stops when a batch
    /// comes back short. Expired rows already behave as absent: purging
    /// only reclaims space.
    pub async fn purge(&self, batch: usize) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let n = self.purge_batch(batch).await?;
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Counts the records by state, for an operator's `idemq stats`: of
    /// one `scope`, or of every scope when `None`.
    ///
    /// Exact: one `SELECT ... GROUP BY state` over the unexpired rows
    /// (`expires_at > now()`; expired rows that [`PostgresDedupStore::purge`]
    /// has not deleted yet are absent, as they are to every operation),
    /// consistent as of the statement's snapshot and timed by the database
    /// clock. A claim counts as [`claimed`](RecordCounts::claimed) while
    /// its lease holds and as [`lapsed`](RecordCounts::lapsed) from
    /// `lease_until <= now()` on, the moment a claim may take it over.
    ///
    /// One scope is read through the primary key; every scope means
    /// reading the whole table. Either is one statement under the
    /// operation timeout ([`PostgresDedupStore::with_op_timeout`]): on a
    /// table too large to count within it, the answer is a transient
    /// [`Error::Timeout`], and a store with a longer timeout is the way to
    /// count it. An invalid `scope` is [`Error::InvalidInput`].
    pub async fn count_states(&self, scope: Option<&str>) -> Result<RecordCounts, Error> {
        const OP: &str = "count_states";
        let rows: Vec<(String, bool, i64)> = match scope {
            Some(scope) => {
                key::check_scope(scope)?;
                self.run(
                    OP,
                    sqlx::query_as(AssertSqlSafe(self.sql.count_states_in_scope.clone()))
                        .bind(scope)
                        .fetch_all(self.ops()),
                )
                .await?
            }
            None => {
                self.run(
                    OP,
                    sqlx::query_as(AssertSqlSafe(self.sql.count_states.clone()))
                        .fetch_all(self.ops()),
                )
                .await?
            }
        };
        let mut counts = RecordCounts::default();
        for (state, lapsed, n) in rows {
            let slot = match (state_from_sql(OP, &state)?, lapsed) {
                (RecordState::Claimed, false) => &mut counts.claimed,
                (RecordState::Claimed, true) => &mut counts.lapsed,
                (RecordState::Released, _) => &mut counts.released,
                (RecordState::Done, _) => &mut counts.done,
                (RecordState::Dead, _) => &mut counts.dead,
            };
            *slot += u64::try_from(n).unwrap_or(0);
        }
        Ok(counts)
    }
}
