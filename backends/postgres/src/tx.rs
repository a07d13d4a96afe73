//! Transactional handling: the handler's own writes and the done mark
//! commit together or not at all.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres};

use idemq::{Completion, Error, Handler, HandlerError, Message};

use crate::error::retry;
use crate::store::{PostgresDedupStore, Statements};

/// A [`Handler`] that runs a closure inside a Postgres transaction and
/// writes the done mark in that same transaction. Made by
/// [`transactional`] (or [`PostgresDedupStore::transactional`]).
///
/// For every message it:
///
/// 1. begins a transaction on the store's pool;
/// 2. calls the closure with the transaction's connection and the message;
///    the closure does its business writes on that connection;
/// 3. on `Ok`, marks the key done with an `UPDATE` fenced by the message's
///    lease token (and `state = 'claimed'`), in the same transaction:
///    * the update matched the row: commits; the handler returns `Ok`,
///      meaning "effects and done mark are committed";
///    * it matched nothing (the lease was taken over, or the key
///      forgotten): rolls back and returns [`HandlerError::LeaseLost`], so
///      the effects of this run are gone and the new owner's run counts;
/// 4. on `Err`, rolls back and returns the closure's error.
///
/// A failed `BEGIN`, done mark or `COMMIT` is a [`HandlerError::Retry`]. A
/// `COMMIT` whose answer was lost may still have committed: the engine
/// reads the record before it retries ([`idemq::DedupStore::lease_state`])
/// and, finding the key done by this lease, acks it as handled.
///
/// Acquiring the connection, `BEGIN`, the done mark, `ROLLBACK` and
/// `COMMIT` are each bounded by the store's operation timeout
/// ([`PostgresDedupStore::with_op_timeout`]); the closure's own statements
/// are yours to bound. A connection on which one of them timed out or
/// failed is closed, not returned to the pool, so a hung socket never
/// holds a pool slot or serves the next message.
///
/// Its [`Handler::completion`] is [`Completion::InHandler`]: the engine does
/// not call `complete` for it. The lease row is only locked by the final
/// fenced update, so a handler that outlives its lease is taken over
/// normally, and then loses at step 3.
///
/// The transaction runs at the pool's default isolation level (READ
/// COMMITTED unless configured otherwise); the closure may start with
/// `SET TRANSACTION ISOLATION LEVEL ...` to change it. Serialization
/// failures from the closure's own statements are best mapped with
/// [`crate::sql_error`] (they become retries).
pub struct Transactional<F> {
    pool: PgPool,
    sql: Arc<Statements>,
    table: String,
    op_timeout: Option<Duration>,
    f: F,
}

impl<F> fmt::Debug for Transactional<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transactional")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// Wraps `f` into a transactional [`Handler`] over `store`'s pool and
/// table; see [`Transactional`].
///
/// `f` gets the open transaction's connection (`&mut PgConnection`, use it
/// as `&mut *tx` with sqlx) and the [`Message`], and returns a boxed
/// future borrowing the connection: wrap the body in `Box::pin(async move
/// { ... })`.
///
/// ```no_run
/// use idemq::HandlerError;
/// use idemq_postgres::{PostgresDedupStore, sql_error, transactional};
///
/// # fn make(store: &PostgresDedupStore) {
/// let handler = transactional(store, |tx, msg| {
///     Box::pin(async move {
///         sqlx::query("INSERT INTO shipments (message_key, body) VALUES ($1, $2)")
///             .bind(msg.key())
///             .bind(msg.body().to_vec())
///             .execute(&mut *tx)
///             .await
///             .map_err(sql_error)?;
///         Ok::<(), HandlerError>(())
///     })
/// });
/// # let _ = handler; }
/// ```
pub fn transactional<F>(store: &PostgresDedupStore, f: F) -> Transactional<F>
where
    F: for<'c> Fn(&'c mut PgConnection, Message) -> BoxFuture<'c, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    Transactional {
        pool: store.pool().clone(),
        sql: store.statements().clone(),
        table: store.table(),
        op_timeout: store.op_timeout(),
        f,
    }
}

impl PostgresDedupStore {
    /// Method form of [`transactional`].
    pub fn transactional<F>(&self, f: F) -> Transactional<F>
    where
        F: for<'c> Fn(&'c mut PgConnection, Message) -> BoxFuture<'c, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        transactional(self, f)
    }
}

#[async_trait]
impl<F> Handler for Transactional<F>
where
    F: for<'c> Fn(&'c mut PgConnection, Message) -> BoxFuture<'c, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let mut conn = self
            .bounded("begin", self.pool.acquire())
            .await
            .map_err(retry)?;
        let (result, healthy) = self.run(&mut conn, msg).await;
        if !healthy {
            // Closed at once (dropped, not returned): its state is unknown.
            drop(conn.detach());
        }
        result
    }

    fn completion(&self) -> Completion {
        Completion::InHandler
    }
}

impl<F> Transactional<F>
where
    F: for<'c> Fn(&'c mut PgConnection, Message) -> BoxFuture<'c, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    /// `fut` under the store's operation timeout, its error mapped.
    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, Error> {
        crate::store::bounded(self.op_timeout, op, fut).await
    }

    /// The transaction on `conn`; answers the handler's result and whether
    /// the connection is fit to go back to the pool.
    async fn run(
        &self,
        conn: &mut PoolConnection<Postgres>,
        msg: Message,
    ) -> (Result<(), HandlerError>, bool) {
        let lease = msg.lease().clone();
        let keep_for = msg.keep_for();
        let mut tx = match self.bounded("begin", conn.begin()).await {
            Ok(tx) => tx,
            Err(e) => return (Err(retry(e)), false),
        };
        if let Err(e) = (self.f)(&mut tx, msg).await {
            let rolled_back = self.bounded("rollback", tx.rollback()).await;
            if let Err(rb) = &rolled_back {
                tracing::debug!(error = %rb, "rollback after a failed handler failed");
            }
            return (Err(e), rolled_back.is_ok());
        }
        let marked = self
            .bounded(
                "complete",
                sqlx::query(AssertSqlSafe(self.sql.done_in_tx.clone()))
                    .bind(&lease.scope)
                    .bind(&lease.key)
                    .bind(i64::from_ne_bytes(lease.token.0.to_ne_bytes()))
                    .bind(crate::store::interval(keep_for))
                    .execute(&mut *tx),
            )
            .await;
        match marked {
            Err(e) => {
                let _ = self.bounded("rollback", tx.rollback()).await;
                (Err(retry(e)), false)
            }
            Ok(r) if r.rows_affected() == 0 => {
                let rolled_back = self.bounded("rollback", tx.rollback()).await;
                if let Err(rb) = &rolled_back {
                    tracing::debug!(error = %rb, "rollback after a lost lease failed");
                }
                tracing::warn!(
                    scope = %lease.scope,
                    key = %lease.key,
                    token = %lease.token,
                    "lease lost before commit: the handler's writes were rolled back"
                );
                (Err(HandlerError::LeaseLost), rolled_back.is_ok())
            }
            // A failed or timed-out COMMIT has an unknown outcome: the
            // engine reads the record before it retries.
            Ok(_) => match self.bounded("commit", tx.commit()).await {
                Ok(()) => (Ok(()), true),
                Err(e) => (Err(retry(e)), false),
            },
        }
    }
}
