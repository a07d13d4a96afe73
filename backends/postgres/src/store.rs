//! [`PostgresDedupStore`]: the [`DedupStore`] over a sqlx `PgPool`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use idemq::error::{redact_url, url_passwords};
use idemq::key;
use idemq::{
    Claim, ClaimTtl, DedupStore, Error, Fenced, Lease, LeaseToken, Record, RecordCounts,
    RecordState, Release, Revival,
};

use crate::error::{BACKEND, backend, connect_failed, from_sqlx, scrub};
use crate::ident::TableName;
use crate::migrate;

/// The operation timeout unless [`PostgresDedupStore::with_op_timeout`]
/// says otherwise.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The table used unless [`PostgresDedupStore::with_table`] says otherwise.
pub const DEFAULT_TABLE: &str = "idemq_dedup";

/// How often a claim is tried again when its row changed or vanished
/// between the upsert and the read of the current state (a concurrent
/// `forget`, `purge` or `fail`). Each retry is a fresh statement.
const CLAIM_RACE_RETRIES: usize = 16;

/// Longest duration bound into SQL (100 years): longer ones are clamped so
/// that `now() + d` never leaves the timestamp range.
const MAX_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

pub(crate) fn interval(d: Duration) -> PgInterval {
    let micros = i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_MICROS);
    PgInterval {
        months: 0,
        days: 0,
        microseconds: micros,
    }
}

fn micros_to_duration(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn token_to_sql(t: LeaseToken) -> i64 {
    i64::from_ne_bytes(t.0.to_ne_bytes())
}

fn attempts_from_sql(a: i32) -> u32 {
    u32::try_from(a).unwrap_or(0)
}

fn state_from_sql(op: &'static str, s: &str) -> Result<RecordState, Error> {
    match s {
        "claimed" => Ok(RecordState::Claimed),
        "released" => Ok(RecordState::Released),
        "done" => Ok(RecordState::Done),
        "dead" => Ok(RecordState::Dead),
        other => Err(backend(
            op,
            false,
            format!("unknown record state {other:?} in the dedup table"),
        )),
    }
}

/// A revive statement's answer for one row: removed (with the state it
/// had, `None` when expired), or left alone (done, or a live lease; or a
/// row a concurrent claim made live before the DELETE could remove it,
/// which the statement's snapshot may still show as dead, released or
/// lapsed: left alone either way, the safe answer).
fn revival(removed: bool, state: Option<String>, lease_us: i64) -> Result<Revival, Error> {
    let state = match state {
        Some(s) => Some(state_from_sql("revive", &s)?),
        None => None,
    };
    Ok(match (removed, state) {
        (true, previous) => Revival::Revived { previous },
        (false, Some(RecordState::Done)) => Revival::Done,
        (false, _) => Revival::InProgress {
            retry_after: micros_to_duration(lease_us),
        },
    })
}

/// The SQL text of every statement, rendered once for the table.
#[derive(Debug)]
pub(crate) struct Statements {
    claim: Arc<str>,
    claim_many: Arc<str>,
    renew: Arc<str>,
    complete: Arc<str>,
    complete_many: Arc<str>,
    fail: Arc<str>,
    bury: Arc<str>,
    get: Arc<str>,
    lease_state: Arc<str>,
    forget: Arc<str>,
    revive: Arc<str>,
    revive_many: Arc<str>,
    purge: Arc<str>,
    /// The live records of every scope, counted by state.
    count_states: Arc<str>,
    /// The live records of one scope, counted by state.
    count_states_in_scope: Arc<str>,
    /// The done mark written inside a handler's transaction (clock_timestamp,
    /// as `now()` is the transaction's start there).
    pub(crate) done_in_tx: Arc<str>,
}

/// The shared `ON CONFLICT` arm of both claim statements: take over an
/// expired record (attempts start again at 1), a released one or a lapsed
/// lease (attempts + 1); leave everything else alone, so the upsert returns
/// no row for it.
const CLAIM_CONFLICT: &str = "
    ON CONFLICT (scope, key) DO UPDATE SET
        state = 'claimed',
        token = excluded.token,
        attempts = CASE WHEN d.expires_at <= now() THEN 1 ELSE d.attempts + 1 END,
        lease_until = excluded.lease_until,
        expires_at = CASE WHEN d.expires_at <= now() THEN excluded.expires_at
                          ELSE greatest(d.expires_at, excluded.expires_at) END
    WHERE d.expires_at <= now()
       OR d.state = 'released'
       OR (d.state = 'claimed' AND d.lease_until <= now())";

/// Microseconds from now (database clock) until `col`.
fn micros_until(col: &str) -> String {
    format!("(extract(epoch FROM {col} - now()) * 1000000)::bigint")
}

impl Statements {
    fn new(table: &TableName) -> Statements {
        let t = table.quoted();
        let lease_us = micros_until("d.lease_until");
        let expires_us = micros_until("d.expires_at");
        // The unexpired rows (of scope $1 when `scope` says so) counted per
        // state, claims split into live and lapsed leases. Answers
        // (state, lapsed, count) rows. Two texts rather than one with
        // `$1 IS NULL OR ...`, whose generic plan could not use the
        // primary key to find one scope's rows.
        let count = |scope: &str| -> Arc<str> {
            format!(
                "SELECT d.state, d.state = 'claimed' AND d.lease_until <= now(), count(*)
                 FROM {t} AS d
                 WHERE d.expires_at > now(){scope}
                 GROUP BY 1, 2"
            )
            .into()
        };
        // A fenced update of the caller's claim; `settled` is the state a
        // settlement leaves, which the same lease finds when it retries
        // (the answer of the first call lost): the row then matches again,
        // and the `CASE`s in `set` leave it as it is.
        let fenced = |set: &str, settled: &str| -> Arc<str> {
            format!(
                "UPDATE {t} AS d SET {set}
                 WHERE d.scope = $1 AND d.key = $2 AND d.token = $3
                   AND d.state IN ('claimed'{settled}) AND d.expires_at > now()"
            )
            .into()
        };
        let keep =
            "expires_at = CASE WHEN d.state = 'claimed' THEN now() + $4 ELSE d.expires_at END";
        Statements {
            // $1 scope, $2 key, $3 token, $4 lease, $5 record lifetime.
            // Answers one row: (won, state, attempts, lease µs left, expired).
            // The second branch reads the row the upsert left alone; it uses
            // the statement's snapshot, so a row committed concurrently may
            // be missing there: the caller then runs the statement again.
            claim: format!(
                "WITH ins AS (
                    INSERT INTO {t} AS d (scope, key, state, token, attempts, lease_until, expires_at)
                    VALUES ($1, $2, 'claimed', $3, 1, now() + $4, now() + $5)
                    {CLAIM_CONFLICT}
                    RETURNING d.attempts
                 )
                 SELECT true, 'claimed'::text, ins.attempts, 0::bigint, false FROM ins
                 UNION ALL
                 SELECT false, d.state, d.attempts, {lease_us}, d.expires_at <= now()
                 FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND NOT EXISTS (SELECT 1 FROM ins)"
            )
            .into(),
            // $1 scope, $2 keys (distinct), $3 tokens, $4 lease, $5 lifetime.
            // Rows are inserted in key order, so concurrent batches lock in
            // the same order. Answers (key, won, state, attempts, lease µs, expired).
            // The read of the rows left alone is skipped when all were taken;
            // it takes the scope from the input rows, not from `$1`, so the
            // plan is always one primary-key probe per key, whatever the
            // statistics say about the scope (a custom plan for a scope the
            // statistics have not seen yet could otherwise scan all of it).
            claim_many: format!(
                "WITH input AS MATERIALIZED (
                    SELECT $1::text AS scope, k.key, k.token
                    FROM unnest($2::text[], $3::bigint[]) AS k(key, token)
                 ), ins AS (
                    INSERT INTO {t} AS d (scope, key, state, token, attempts, lease_until, expires_at)
                    SELECT $1, i.key, 'claimed', i.token, 1, now() + $4, now() + $5
                    FROM input AS i ORDER BY i.key
                    {CLAIM_CONFLICT}
                    RETURNING d.key, d.attempts
                 )
                 SELECT ins.key, true, 'claimed'::text, ins.attempts, 0::bigint, false FROM ins
                 UNION ALL
                 SELECT d.key, false, d.state, d.attempts, {lease_us}, d.expires_at <= now()
                 FROM input AS i JOIN {t} AS d ON d.scope = i.scope AND d.key = i.key
                 WHERE (SELECT count(*) FROM ins) < cardinality($2::text[])
                   AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.key = i.key)"
            )
            .into(),
            // $4: the new lease.
            renew: fenced(
                "lease_until = now() + $4, expires_at = greatest(d.expires_at, now() + $4)",
                "",
            ),
            // $4: keep_for.
            complete: fenced(&format!("state = 'done', {keep}"), ", 'done'"),
            // $4: 1 to refund the attempt, 0 to keep it.
            fail: fenced(
                "state = 'released',
                 lease_until = CASE WHEN d.state = 'claimed' THEN now() ELSE d.lease_until END,
                 attempts = CASE WHEN d.state = 'claimed' THEN greatest(d.attempts - $4, 0)
                            ELSE d.attempts END",
                ", 'released'",
            ),
            // $4: keep_for.
            bury: fenced(&format!("state = 'dead', {keep}"), ", 'dead'"),
            // $1 scopes, $2 keys, $3 tokens, $4 keep_for. Answers the applied
            // ones (those already done by the same lease included), and
            // whether each row is still live after it (keep_for zero
            // expires a row it completes at once). The rows are locked in
            // (scope, key) order first, the order claim_many inserts in:
            // an UPDATE locks in whatever order its join yields, which
            // deadlocks against a concurrent claim_many of the same keys.
            complete_many: format!(
                "WITH l AS MATERIALIZED (
                    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
                        AS l(scope, key, token)
                 ), locked AS (
                    SELECT d.scope, d.key, d.token
                    FROM {t} AS d JOIN l
                        ON d.scope = l.scope AND d.key = l.key AND d.token = l.token
                    WHERE d.state IN ('claimed', 'done') AND d.expires_at > now()
                    ORDER BY d.scope, d.key
                    FOR UPDATE OF d
                 )
                 UPDATE {t} AS d SET state = 'done', {keep}
                 FROM locked AS l
                 WHERE d.scope = l.scope AND d.key = l.key AND d.token = l.token
                   AND d.state IN ('claimed', 'done') AND d.expires_at > now()
                 RETURNING d.scope, d.key, d.token, d.expires_at > now()"
            )
            .into(),
            // $1 scope, $2 key, $3 token: the state of the row while it
            // carries that token.
            lease_state: format!(
                "SELECT d.state FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND d.token = $3 AND d.expires_at > now()"
            )
            .into(),
            get: format!(
                "SELECT d.state, d.attempts, {lease_us}, {expires_us}
                 FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND d.expires_at > now()"
            )
            .into(),
            forget: format!(
                "DELETE FROM {t} AS d WHERE d.scope = $1 AND d.key = $2
                 RETURNING d.expires_at > now()"
            )
            .into(),
            // $1 scopes, $2 keys (distinct pairs): `revive` for many rows in
            // one statement. Answers (scope, key, removed, state, lease µs)
            // for each row there was.
            revive_many: format!(
                "WITH input AS MATERIALIZED (
                    SELECT i.scope, i.key FROM unnest($1::text[], $2::text[]) AS i(scope, key)
                 ), gone AS (
                    DELETE FROM {t} AS d USING input AS i
                    WHERE d.scope = i.scope AND d.key = i.key
                      AND (d.expires_at <= now()
                           OR d.state IN ('dead', 'released')
                           OR (d.state = 'claimed' AND d.lease_until <= now()))
                    RETURNING d.scope, d.key,
                        CASE WHEN d.expires_at <= now() THEN NULL ELSE d.state END AS previous
                 )
                 SELECT gone.scope, gone.key, true, gone.previous, 0::bigint FROM gone
                 UNION ALL
                 SELECT d.scope, d.key, false, d.state, {lease_us}
                 FROM input AS i JOIN {t} AS d ON d.scope = i.scope AND d.key = i.key
                 WHERE d.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM gone AS g WHERE g.scope = i.scope AND g.key = i.key)"
            )
            .into(),
            // $1 scope, $2 key. Deletes a dead, released, lapsed or expired
            // row; a done row and a live lease are left alone. Answers no
            // row when there was none, else (removed, state, lease µs):
            // the deleted row's state (NULL when it had expired), or the
            // state of the row left alone. The DELETE re-checks its
            // condition on the newest version of a row changed
            // concurrently, so a row that became done or live meanwhile is
            // never deleted; the second branch then reads the statement's
            // snapshot, which may still show the older state.
            revive: format!(
                "WITH gone AS (
                    DELETE FROM {t} AS d
                    WHERE d.scope = $1 AND d.key = $2
                      AND (d.expires_at <= now()
                           OR d.state IN ('dead', 'released')
                           OR (d.state = 'claimed' AND d.lease_until <= now()))
                    RETURNING CASE WHEN d.expires_at <= now() THEN NULL ELSE d.state END AS previous
                 )
                 SELECT true, gone.previous, 0::bigint FROM gone
                 UNION ALL
                 SELECT false, d.state, {lease_us}
                 FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND d.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM gone)"
            )
            .into(),
            // $1: batch size. The oldest expired rows are picked through the
            // expires_at index (ORDER BY makes the LIMIT stop the index scan
            // early) and deleted by ctid (a TID scan); rows locked by a
            // concurrent claim are skipped, the expiry is checked again.
            purge: format!(
                "DELETE FROM {t} AS d
                 WHERE d.ctid = ANY(ARRAY(
                        SELECT e.ctid FROM {t} AS e
                        WHERE e.expires_at <= now()
                        ORDER BY e.expires_at
                        LIMIT $1
                        FOR UPDATE SKIP LOCKED))
                   AND d.expires_at <= now()"
            )
            .into(),
            count_states: count(""),
            // $1: the scope.
            count_states_in_scope: count(" AND d.scope = $1"),
            done_in_tx: format!(
                "UPDATE {t} AS d SET state = 'done', expires_at = clock_timestamp() + $4
                 WHERE d.scope = $1 AND d.key = $2 AND d.token = $3
                   AND d.state = 'claimed' AND d.expires_at > clock_timestamp()"
            )
            .into(),
        }
    }
}

/// What a claim row says, before it becomes a [`Claim`].
enum Answer {
    Final(Claim),
    /// The row changed under the statement (or vanished): claim again.
    Again,
}

type ClaimRow = (bool, String, i32, i64, bool);

fn answer(row: ClaimRow, lease: impl FnOnce(u32) -> Lease) -> Result<Answer, Error> {
    let (won, state, attempts, lease_us, expired) = row;
    if won {
        return Ok(Answer::Final(Claim::Claimed(lease(attempts_from_sql(
            attempts,
        )))));
    }
    if expired {
        return Ok(Answer::Again);
    }
    Ok(match state_from_sql("claim", &state)? {
        RecordState::Done => Answer::Final(Claim::Done),
        RecordState::Dead => Answer::Final(Claim::Dead),
        RecordState::Claimed if lease_us > 0 => Answer::Final(Claim::InProgress {
            retry_after: micros_to_duration(lease_us),
        }),
        // Claimable, yet the upsert did not take it: it changed meanwhile.
        RecordState::Claimed | RecordState::Released => Answer::Again,
    })
}

/// A [`DedupStore`] in one Postgres table; see the [crate docs](crate).
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

/// `fut` within `limit` (when there is one), its error mapped: a
/// timeout is [`Error::Timeout`] (transient).
pub(crate) async fn bounded<T>(
    limit: Option<Duration>,
    op: &'static str,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, Error> {
    match limit {
        None => fut.await.map_err(|e| from_sqlx(op, e)),
        Some(after) => match tokio::time::timeout(after, fut).await {
            Ok(r) => r.map_err(|e| from_sqlx(op, e)),
            Err(_) => Err(Error::Timeout {
                backend: BACKEND,
                op,
                after,
            }),
        },
    }
}

/// `postgres://user@host:port/db`, built from the options: no password.
fn describe(o: &PgConnectOptions) -> String {
    let db = o.get_database().unwrap_or("");
    match o.get_socket() {
        Some(socket) => format!("postgres://{}@{}/{db}", o.get_username(), socket.display()),
        None => format!(
            "postgres://{}@{}:{}/{db}",
            o.get_username(),
            o.get_host(),
            o.get_port()
        ),
    }
}

/// How long [`PostgresDedupStore::connect`] waits for its first
/// connection; also the acquire timeout of the pool it builds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pool of [`PostgresDedupStore::connect`], after one plain connection
/// that stood (its errors mapped by [`connect_failed`]).
async fn connect_pool(url: &str, target: &str) -> Result<PgPool, Error> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::invalid("postgres url", format!("{target}: {e}")))?;
    let ssl_mode = ssl_mode_name(options.get_ssl_mode());
    let first = async {
        let conn = PgConnection::connect_with(&options).await?;
        // Only a courtesy to the server: the connection stood.
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, first).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(connect_failed(target, ssl_mode, e)),
        Err(_) => {
            return Err(Error::Timeout {
                backend: BACKEND,
                op: "connect",
                after: CONNECT_TIMEOUT,
            });
        }
    }
    PgPoolOptions::new()
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| connect_failed(target, ssl_mode, e))
}

/// `sslmode` as a URL writes it.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
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

    async fn fenced(
        &self,
        op_name: &'static str,
        sql: &Arc<str>,
        lease: &Lease,
        arg: FencedArg,
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        let q = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(&lease.scope)
            .bind(&lease.key)
            .bind(token_to_sql(lease.token));
        let q = match arg {
            FencedArg::Interval(d) => q.bind(interval(d)),
            FencedArg::Int(i) => q.bind(i),
        };
        let done = self.run(op_name, q.execute(self.ops())).await?;
        Ok(if done.rows_affected() > 0 {
            Fenced::Applied
        } else {
            Fenced::LeaseLost
        })
    }

    /// One round trip for the distinct `keys`; answers per key, `None` for
    /// keys whose row changed under the statement.
    async fn claim_distinct(
        &self,
        scope: &str,
        keys: &[&str],
        ttl: ClaimTtl,
    ) -> Result<HashMap<String, Claim>, Error> {
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::random()).collect();
        let sql_tokens: Vec<i64> = tokens.iter().copied().map(token_to_sql).collect();
        let rows: Vec<(String, bool, String, i32, i64, bool)> = self
            .run(
                "claim_many",
                sqlx::query_as(AssertSqlSafe(self.sql.claim_many.clone()))
                    .bind(scope)
                    .bind(keys)
                    .bind(&sql_tokens)
                    .bind(interval(ttl.lease))
                    .bind(interval(ttl.lease.max(ttl.retain)))
                    .fetch_all(self.ops()),
            )
            .await?;
        let token_of: HashMap<&str, LeaseToken> =
            keys.iter().copied().zip(tokens.iter().copied()).collect();
        let mut out = HashMap::with_capacity(rows.len());
        for (key, won, state, attempts, lease_us, expired) in rows {
            let Some(token) = token_of.get(key.as_str()).copied() else {
                continue;
            };
            let a = answer((won, state, attempts, lease_us, expired), |attempt| Lease {
                scope: scope.to_owned(),
                key: key.clone(),
                token,
                attempt,
            })?;
            if let Answer::Final(c) = a {
                out.insert(key, c);
            }
        }
        Ok(out)
    }
}

enum FencedArg {
    Interval(Duration),
    Int(i32),
}

#[async_trait]
impl DedupStore for PostgresDedupStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        key::check(scope, key)?;
        for _ in 0..CLAIM_RACE_RETRIES {
            let token = LeaseToken::random();
            let row: Option<ClaimRow> = self
                .run(
                    "claim",
                    sqlx::query_as(AssertSqlSafe(self.sql.claim.clone()))
                        .bind(scope)
                        .bind(key)
                        .bind(token_to_sql(token))
                        .bind(interval(ttl.lease))
                        .bind(interval(ttl.lease.max(ttl.retain)))
                        .fetch_optional(self.ops()),
                )
                .await?;
            let Some(row) = row else {
                tracing::debug!(scope, key, "claim raced with a concurrent change; again");
                continue;
            };
            let a = answer(row, |attempt| Lease {
                scope: scope.to_owned(),
                key: key.to_owned(),
                token,
                attempt,
            })?;
            if let Answer::Final(claim) = a {
                return Ok(claim);
            }
        }
        Err(backend(
            "claim",
            true,
            format!("the record kept changing under {CLAIM_RACE_RETRIES} claims in a row"),
        ))
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.fenced("renew", &self.sql.renew, lease, FencedArg::Interval(extend))
            .await
    }

    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.fenced(
            "complete",
            &self.sql.complete,
            lease,
            FencedArg::Interval(keep_for),
        )
        .await
    }

    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        let refund = match release {
            Release::CountAttempt => 0,
            Release::RefundAttempt => 1,
        };
        self.fenced("fail", &self.sql.fail, lease, FencedArg::Int(refund))
            .await
    }

    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.fenced("bury", &self.sql.bury, lease, FencedArg::Interval(keep_for))
            .await
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        key::check(scope, key)?;
        let row: Option<(String, i32, i64, i64)> = self
            .run(
                "get",
                sqlx::query_as(AssertSqlSafe(self.sql.get.clone()))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(self.ops()),
            )
            .await?;
        let Some((state, attempts, lease_us, expires_us)) = row else {
            return Ok(None);
        };
        let state = state_from_sql("get", &state)?;
        Ok(Some(Record {
            state,
            attempts: attempts_from_sql(attempts),
            lease_remaining: (state == RecordState::Claimed).then(|| micros_to_duration(lease_us)),
            expires_in: micros_to_duration(expires_us),
        }))
    }

    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        key::check(&lease.scope, &lease.key)?;
        let state: Option<String> = self
            .run(
                "lease_state",
                sqlx::query_scalar(AssertSqlSafe(self.sql.lease_state.clone()))
                    .bind(&lease.scope)
                    .bind(&lease.key)
                    .bind(token_to_sql(lease.token))
                    .fetch_optional(self.ops()),
            )
            .await?;
        state
            .map(|state| state_from_sql("lease_state", &state))
            .transpose()
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        key::check(scope, key)?;
        let live: Option<bool> = self
            .run(
                "forget",
                sqlx::query_scalar(AssertSqlSafe(self.sql.forget.clone()))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(self.ops()),
            )
            .await?;
        Ok(live.unwrap_or(false))
    }

    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        key::check(scope, key)?;
        let row: Option<(bool, Option<String>, i64)> = self
            .run(
                "revive",
                sqlx::query_as(AssertSqlSafe(self.sql.revive.clone()))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(self.ops()),
            )
            .await?;
        match row {
            None => Ok(Revival::Revived { previous: None }),
            Some((removed, state, lease_us)) => revival(removed, state, lease_us),
        }
    }

    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        for (scope, key) in records {
            key::check(scope, key)?;
        }
        // Each distinct record once; a repeat answers as a second call would.
        let mut first: HashMap<(&str, &str), usize> = HashMap::new();
        let (mut scopes, mut keys) = (Vec::new(), Vec::new());
        for (i, (scope, key)) in records.iter().enumerate() {
            if first.insert((scope.as_str(), key.as_str()), i).is_none() {
                scopes.push(scope.as_str());
                keys.push(key.as_str());
            }
        }
        if scopes.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String, bool, Option<String>, i64)> = self
            .run(
                "revive_many",
                sqlx::query_as(AssertSqlSafe(self.sql.revive_many.clone()))
                    .bind(&scopes)
                    .bind(&keys)
                    .fetch_all(self.ops()),
            )
            .await?;
        let mut answers: HashMap<(String, String), Revival> = HashMap::new();
        for (scope, key, removed, state, lease_us) in rows {
            answers.insert((scope, key), revival(removed, state, lease_us)?);
        }
        let mut seen = HashSet::new();
        Ok(records
            .iter()
            .map(|(scope, key)| {
                let answer = answers
                    .get(&(scope.clone(), key.clone()))
                    .copied()
                    .unwrap_or(Revival::Revived { previous: None });
                match (seen.insert((scope, key)), answer) {
                    (false, Revival::Revived { .. }) => Revival::Revived { previous: None },
                    (_, answer) => answer,
                }
            })
            .collect())
    }

    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        key::check_scope(scope)?;
        for k in keys {
            key::check_key(k)?;
        }
        // ON CONFLICT cannot touch one row twice in a statement: claim each
        // distinct key once; a repeat inside the batch then meets the claim
        // its first occurrence made, as it would one call after another.
        let mut distinct: Vec<&str> = keys.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut answers: HashMap<String, Claim> = HashMap::with_capacity(distinct.len());
        let mut pending = distinct;
        for _ in 0..CLAIM_RACE_RETRIES {
            if pending.is_empty() {
                break;
            }
            let got = self.claim_distinct(scope, &pending, ttl).await?;
            pending.retain(|k| !got.contains_key(*k));
            answers.extend(got);
        }
        if !pending.is_empty() {
            return Err(backend(
                "claim_many",
                true,
                format!(
                    "{} records kept changing under {CLAIM_RACE_RETRIES} claims in a row",
                    pending.len()
                ),
            ));
        }
        let mut seen: HashSet<&str> = HashSet::with_capacity(keys.len());
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let first = seen.insert(k.as_str());
            let claim = answers
                .get(k.as_str())
                .cloned()
                .ok_or_else(|| backend("claim_many", true, "a key got no answer"))?;
            out.push(match claim {
                Claim::Claimed(_) if !first => Claim::InProgress {
                    retry_after: ttl.lease,
                },
                other => other,
            });
        }
        Ok(out)
    }

    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        for l in leases {
            key::check(&l.scope, &l.key)?;
        }
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let scopes: Vec<&str> = leases.iter().map(|l| l.scope.as_str()).collect();
        let keys: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| token_to_sql(l.token)).collect();
        let rows: Vec<(String, String, i64, bool)> = self
            .run(
                "complete_many",
                sqlx::query_as(AssertSqlSafe(self.sql.complete_many.clone()))
                    .bind(&scopes)
                    .bind(&keys)
                    .bind(&tokens)
                    .bind(interval(keep_for))
                    .fetch_all(self.ops()),
            )
            .await?;
        let applied: HashMap<(String, String, i64), bool> = rows
            .into_iter()
            .map(|(scope, key, token, live)| ((scope, key, token), live))
            .collect();
        // A lease repeated in the batch is applied once; its repeats find
        // what one call after another would: their own done record
        // (applied), or none when it expired at once (lost).
        let mut seen = HashSet::with_capacity(leases.len());
        Ok(leases
            .iter()
            .map(|l| {
                let id = (l.scope.clone(), l.key.clone(), token_to_sql(l.token));
                match applied.get(&id) {
                    Some(&live) if live || seen.insert(id) => Fenced::Applied,
                    _ => Fenced::LeaseLost,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped() {
        assert_eq!(interval(Duration::MAX).microseconds, MAX_MICROS);
        assert_eq!(interval(Duration::from_millis(5)).microseconds, 5000);
        assert_eq!(micros_to_duration(-5), Duration::ZERO);
    }

    #[test]
    fn statements_quote_the_table() {
        let t = TableName::parse("app.x").unwrap();
        let s = Statements::new(&t);
        assert!(s.claim.contains("INSERT INTO \"app\".\"x\" AS d"));
        assert!(s.purge.contains("FOR UPDATE SKIP LOCKED"));
        assert!(s.count_states.contains("FROM \"app\".\"x\" AS d"));
        assert!(!s.count_states.contains("$1"));
        assert!(s.count_states_in_scope.contains("d.scope = $1"));
    }
}
