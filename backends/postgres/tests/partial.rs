//! Partial failures against the real server: a commit whose answer was
//! lost, renewals while handlers hold every pool connection, and a
//! transaction whose link hangs after the handler's writes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idemq::memory::MemoryBroker;
use idemq::testing::store::{assert_applied, must_claim};
use idemq::testing::{FaultProxy, unique_scope};
use idemq::{
    Backoff, Broker, ClaimTtl, Completion, DedupStore, Engine, Handler, HandlerError, Message,
    OutgoingMessage, RecordState,
};
use idemq_postgres::{PostgresDedupStore, sql_error};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

/// Runs the transactional handler it wraps; on its first run, after that
/// handler returned, reports what a lost `COMMIT` answer looks like (when
/// `lose_answer`), and notes how long that run took.
struct FirstRun<H> {
    inner: H,
    lose_answer: bool,
    runs: AtomicU32,
    first_took: Mutex<Option<Duration>>,
}

#[async_trait]
impl<H: Handler> Handler for FirstRun<H> {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let first = self.runs.fetch_add(1, Ordering::SeqCst) == 0;
        let started = Instant::now();
        let result = self.inner.handle(msg).await;
        if first {
            *self.first_took.lock().unwrap() = Some(started.elapsed());
            if self.lose_answer {
                result?;
                return Err(HandlerError::retry("commit: connection reset by peer"));
            }
        }
        result
    }
    fn completion(&self) -> Completion {
        self.inner.completion()
    }
}

async fn effects_table(store: &PostgresDedupStore) -> String {
    let table = common::fresh_table("partial_effects");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id text NOT NULL)"
    )))
    .execute(store.pool())
    .await
    .expect("create effects");
    table
}

async fn effects_of(store: &PostgresDedupStore, table: &str, id: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(store.pool())
    .await
    .expect("count effects")
}

/// A transactional handler inserting one effect row per run, then calling
/// `after_insert` (inside the transaction, before the done mark).
fn inserting(
    store: &PostgresDedupStore,
    table: &str,
    after_insert: Arc<dyn Fn() + Send + Sync>,
) -> impl Handler + use<> {
    let insert = format!("INSERT INTO {table} (id) VALUES ($1)");
    store.transactional(move |tx, msg| {
        let insert = insert.clone();
        let after_insert = after_insert.clone();
        let id = msg.message_id().unwrap_or_default().to_owned();
        Box::pin(async move {
            sqlx::query(sqlx::AssertSqlSafe(insert))
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            after_insert();
            Ok(())
        })
    })
}

async fn run_one<S: DedupStore, H: Handler>(
    store: S,
    scope: &str,
    handler: H,
    lease: Duration,
) -> idemq::Report {
    let broker = MemoryBroker::new("partial");
    broker
        .publish(OutgoingMessage::new("{}").with_message_id("order-1"))
        .await
        .expect("publish");
    broker.close_when_idle();
    let report = Engine::builder(broker.clone(), store, handler)
        .scope(scope)
        .lease(lease)
        .retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(50),
        ))
        .failure_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
        .build()
        .expect("engine")
        .run(CancellationToken::new())
        .await;
    let stats = broker.stats();
    assert_eq!((stats.ready, stats.unacked), (0, 0), "nothing left behind");
    report
}

/// The COMMIT landed, its answer did not: the engine reads the record,
/// finds the key done by this lease, and acks. One effect, one run, no
/// retry, no lost lease (before, the engine released the claim, was
/// fenced out, and logged LEASE LOST).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_handled_once() {
    let Some(store) = common::store().await else {
        return;
    };
    let store = store.clone();
    let table = effects_table(&store).await;
    let handler = Arc::new(FirstRun {
        inner: inserting(&store, &table, Arc::new(|| {})),
        lose_answer: true,
        runs: AtomicU32::new(0),
        first_took: Mutex::new(None),
    });
    let scope = unique_scope("lost_commit");
    let report = run_one(
        store.clone(),
        &scope,
        handler.clone(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (report.handled, report.retried, report.lease_lost),
        (1, 0, 0),
        "{report:?}"
    );
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    assert_eq!(effects_of(&store, &table, "order-1").await, 1);
    let record = store.get(&scope, "order-1").await.unwrap().unwrap();
    assert_eq!(record.state, RecordState::Done);
    common::drop_table(store.pool(), &table).await;
}

/// Every connection of the main pool is held (as by transactional
/// handlers): claims and renewals still go through, on the store's own
/// pool, instead of timing out on the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_go_through_while_handlers_hold_every_connection() {
    let Some(shared) = common::store().await else {
        return;
    };
    drop(shared);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&common::url())
        .await
        .expect("pool");
    let store = PostgresDedupStore::new(pool.clone())
        .with_table(common::TEST_TABLE)
        .expect("table");
    let held = (
        pool.acquire().await.expect("first"),
        pool.acquire().await.expect("second"),
    );
    let scope = unique_scope("held_pool");
    let ttl = ClaimTtl {
        lease: Duration::from_secs(30),
        retain: Duration::from_secs(60),
    };
    let lease = must_claim(&store, &scope, "k", ttl).await;
    for _ in 0..3 {
        assert_applied(store.renew(&lease, Duration::from_secs(30)).await);
    }
    assert_applied(store.complete(&lease, Duration::from_secs(60)).await);
    drop(held);
}

/// The link hangs right after the handler's writes: the done mark is cut
/// at the store's operation timeout (not TCP's), the connection is not
/// reused, and once the link is back the message is handled with exactly
/// one effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_link_hangs_is_bounded() {
    let Some(direct) = common::store().await else {
        return;
    };
    let url = common::url();
    let (head, rest) = url.split_once('@').expect("url with user");
    let (hostport, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream: SocketAddr = tokio::net::lookup_host(hostport)
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let proxy = Arc::new(FaultProxy::start(upstream).await.expect("proxy"));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(500))
        .connect(&format!("{head}@{}/{tail}", proxy.addr()))
        .await
        .expect("pool through the proxy");
    let store = PostgresDedupStore::new(pool)
        .with_table(common::TEST_TABLE)
        .expect("table")
        .with_op_timeout(Duration::from_millis(700));
    let table = effects_table(&direct).await;
    // The first run black-holes the link after its insert, for 5 s: far
    // longer than the operation timeout.
    let blackholed = Arc::new(AtomicU32::new(0));
    let (p, b) = (proxy.clone(), blackholed.clone());
    let hang_once = move || {
        if b.fetch_add(1, Ordering::SeqCst) == 0 {
            p.blackhole();
            let p = p.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                p.restore();
            });
        }
    };
    let handler = Arc::new(FirstRun {
        inner: inserting(&store, &table, Arc::new(hang_once)),
        lose_answer: false,
        runs: AtomicU32::new(0),
        first_took: Mutex::new(None),
    });
    let scope = unique_scope("hung_tx");
    let report = run_one(
        store.clone(),
        &scope,
        handler.clone(),
        Duration::from_secs(2),
    )
    .await;
    let first = handler.first_took.lock().unwrap().expect("a first run");
    // The done mark, rollback and acquire each bounded by 700 ms: well
    // under the 5 s the link hung (before, the run waited it out).
    assert!(first < Duration::from_secs(3), "first run took {first:?}");
    assert_eq!((report.handled, report.lease_lost), (1, 0), "{report:?}");
    assert_eq!(effects_of(&direct, &table, "order-1").await, 1);
    common::drop_table(direct.pool(), &table).await;
}
