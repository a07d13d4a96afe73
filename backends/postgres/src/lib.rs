//! # idemq-postgres: the idemq dedup store in Postgres
//!
//! [`PostgresDedupStore`] implements [`idemq::DedupStore`] in one table
//! over a sqlx [`PgPool`](sqlx::PgPool), and [`transactional`] turns a
//! closure into an [`idemq::Handler`] whose business writes and done mark
//! commit in one transaction: exactly-once effects for everything the
//! handler writes to the same database.
//!
//! ```no_run
//! use std::time::Duration;
//! use idemq::{Claim, ClaimTtl, DedupStore};
//! use idemq_postgres::PostgresDedupStore;
//!
//! # async fn demo() -> Result<(), idemq::Error> {
//! let store = PostgresDedupStore::connect("postgres://app:secret@127.0.0.1/app").await?
//!     .with_table("orders_dedup")?;   // optional; default `idemq_dedup`
//! store.migrate().await?;             // creates/upgrades the table
//!
//! let ttl = ClaimTtl { lease: Duration::from_secs(300), retain: Duration::from_secs(86_400) };
//! if let Claim::Claimed(lease) = store.claim("orders", "order-42", ttl).await? {
//!     // ... handle the message ...
//!     let _ = store.complete(&lease, Duration::from_secs(86_400)).await?;
//! }
//! // Now and then (a cron job, or `idemq purge`):
//! store.purge(10_000).await?;
//! # Ok(()) }
//! ```
//!
//! ## How it works
//!
//! One row per `(scope, key)` (the primary key) with `state`
//! (`claimed`/`released`/`done`/`dead`), the owner's fencing `token`,
//! `attempts`, `lease_until` and `expires_at`. Every time comparison uses
//! the database clock (`now()`), never the consumer's; durations are bound
//! as intervals.
//!
//! * **claim** is a single `INSERT ... ON CONFLICT (scope, key) DO UPDATE
//!   ... WHERE <expired OR released OR lease lapsed> RETURNING`: a new or
//!   expired key is created with `attempts = 1`, a released key or a lapsed
//!   lease is taken over with `attempts + 1` and a new token, in the same
//!   atomic step. When the upsert leaves the row alone, the same statement
//!   reads it (a CTE) and answers `Done`, `Dead` or `InProgress` with the
//!   time left on the lease. That read sees the statement's snapshot; if
//!   the row was committed or changed concurrently (so the snapshot does not
//!   show it, or shows it claimable), the claim runs again as a fresh
//!   statement, so no answer is ever made up.
//! * **renew / complete / fail / bury** are one `UPDATE ... WHERE token = $t
//!   AND state = 'claimed'` each: a stale owner changes nothing and gets
//!   `LeaseLost`, and no fenced operation ever creates a row.
//! * **claim_many / complete_many** do a whole batch in one statement
//!   (`unnest` of arrays) and answer in input order.
//! * **purge** deletes expired rows in bounded batches through the
//!   `expires_at` index (`DELETE ... WHERE ctid = ANY(ARRAY(SELECT ctid ...
//!   LIMIT n FOR UPDATE SKIP LOCKED))`). Expired rows already count as
//!   absent, so purging only reclaims space.
//! * **count_states** (for an operator's `idemq stats`) counts the
//!   unexpired rows of one scope or all by state in one `GROUP BY`,
//!   exactly ([`PostgresDedupStore::count_states`]).
//!
//! ## Schema and migrations
//!
//! The schema lives in `migrations/*.sql`, embedded with
//! `sqlx::migrate!`, and is applied only when you call
//! [`PostgresDedupStore::migrate`]. Because the table name is configurable
//! and sqlx migrations are static SQL, the files are templates
//! (`{{table}}`, `{{expires_index}}`) and `migrate` runs them itself:
//! within one transaction holding an advisory lock (so concurrent callers
//! are safe), it records applied versions per table in `idemq_migrations`
//! (in the table's schema), renders each missing migration with the
//! validated, double-quoted identifiers, runs it and records it. A table
//! name must be `name` or `schema.name` with each part matching
//! `^[a-z_][a-z0-9_]{0,62}$`; anything else is
//! [`idemq::Error::InvalidInput`]. [`PostgresDedupStore::migration_sql`]
//! gives the rendered DDL for teams with their own migration tooling.
//!
//! ## Errors
//!
//! sqlx errors become [`idemq::Error`]s with `backend: "postgres"`: I/O,
//! TLS, protocol, pool timeouts and SQLSTATE class 08 / server shutdown are
//! [`idemq::Error::Unavailable`]; serialization failures, deadlocks, lock
//! and statement timeouts and resource exhaustion are transient
//! [`idemq::Error::Backend`]s; the rest are permanent. Connection strings
//! never appear with their password, in errors or in `Debug` output.
//!
//! [`PostgresDedupStore::connect`] tries its first connection once, so a
//! mistake shows at once and says what it is: `connection refused`, the
//! server's words for a database or role that does not exist (with the
//! SQLSTATE), or, for `sslmode=require` in a build without TLS, the
//! feature to enable.
//!
//! Every operation is bounded by an operation timeout (default
//! [`DEFAULT_OP_TIMEOUT`], see [`PostgresDedupStore::with_op_timeout`]), so a
//! hung network gives transient [`idemq::Error::Timeout`]s instead of
//! waiting for TCP to notice.
//!
//! ## Features
//!
//! * `tls-rustls` (off by default): TLS to Postgres through rustls (ring,
//!   webpki roots); ask for it with `sslmode=require` (or `verify-full`)
//!   in the URL. Without it, such a URL fails to connect with an
//!   [`idemq::Error::Config`] that names this feature.
//!
//! ## Transactional handling
//!
//! See [`transactional`]. The engine recognizes such a handler by
//! [`idemq::Completion::InHandler`] and does not write the done mark
//! itself.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod ident;
mod migrate;
mod store;
mod tx;

pub use error::sql_error;
pub use store::{CONNECT_TIMEOUT, DEFAULT_OP_TIMEOUT, DEFAULT_TABLE, PostgresDedupStore};
pub use tx::{Transactional, transactional};

/// The sqlx version this crate is built on, re-exported so that users
/// write their transactional handlers against the same types.
pub use sqlx;
