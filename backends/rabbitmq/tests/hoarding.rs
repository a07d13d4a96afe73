//! Fail closed without hoarding: a consumer cut off from its dedup store
//! gives back what it prefetched, so the consumers that reach the store
//! handle everything while the outage lasts.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idemq::memory::MemoryDedupStore;
use idemq::{
    Broker, Claim, ClaimTtl, DedupStore, Engine, Error, Fenced, Lease, Message, OutgoingMessage,
    Record, RecordState, Release, Revival,
};
use idemq_rabbitmq::queue_depths;
use tokio_util::sync::CancellationToken;

/// A store that cannot be reached: every call fails, transiently.
#[derive(Default)]
struct Unreachable {
    claims: AtomicU32,
}

fn down() -> Error {
    Error::Unavailable {
        backend: "test",
        op: "claim",
        source: "partitioned from the store".into(),
    }
}

#[async_trait]
impl DedupStore for Unreachable {
    async fn claim(&self, _: &str, _: &str, _: ClaimTtl) -> Result<Claim, Error> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        Err(down())
    }
    async fn renew(&self, _: &Lease, _: Duration) -> Result<Fenced, Error> {
        Err(down())
    }
    async fn complete(&self, _: &Lease, _: Duration) -> Result<Fenced, Error> {
        Err(down())
    }
    async fn fail(&self, _: &Lease, _: Release) -> Result<Fenced, Error> {
        Err(down())
    }
    async fn bury(&self, _: &Lease, _: Duration) -> Result<Fenced, Error> {
        Err(down())
    }
    async fn get(&self, _: &str, _: &str) -> Result<Option<Record>, Error> {
        Err(down())
    }
    async fn lease_state(&self, _: &Lease) -> Result<Option<RecordState>, Error> {
        Err(down())
    }
    async fn forget(&self, _: &str, _: &str) -> Result<bool, Error> {
        Err(down())
    }
    async fn revive(&self, _: &str, _: &str) -> Result<Revival, Error> {
        Err(down())
    }
}

/// Consumer A, partitioned from its store for the whole test, starts
/// first and fills its prefetch; consumer B reaches the store. B handles
/// all 200 messages while A's outage goes on: A holds none back (before,
/// A kept its prefetched deliveries for the whole outage, returning one
/// per backoff round of up to 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_cut_off_from_its_store_gives_its_deliveries_back() {
    const N: usize = 200;
    // A prefetch of 16: twice each engine's concurrency.
    let config = common::config("hoarding");
    let Some(a_broker) = common::connect(config.clone()).await else {
        return;
    };
    for i in 0..N {
        a_broker
            .publish(OutgoingMessage::new("order").with_message_id(format!("o-{i}")))
            .await
            .expect("publish");
    }
    let unreachable = Arc::new(Unreachable::default());
    let a_stop = CancellationToken::new();
    let a = Engine::builder(a_broker.clone(), unreachable.clone(), |_m: Message| async {
        panic!("no handler runs without the store")
    })
    .scope("hoarding")
    .concurrency(8)
    .build()
    .expect("engine A");
    let a_run = tokio::spawn(a.run(a_stop.clone()));
    common::wait_until("A to meet its outage", Duration::from_secs(20), || {
        unreachable.claims.load(Ordering::SeqCst) > 0
    })
    .await;

    let b_broker = common::connect(config.clone())
        .await
        .expect("second consumer");
    let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen = handled.clone();
    let b_stop = CancellationToken::new();
    let b = Engine::builder(
        b_broker.clone(),
        MemoryDedupStore::new(),
        move |m: Message| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().insert(m.key().to_owned());
                Ok(())
            }
        },
    )
    .scope("hoarding")
    .concurrency(8)
    .build()
    .expect("engine B");
    let b_run = tokio::spawn(b.run(b_stop.clone()));

    common::wait_until(
        "B to handle every message while A is cut off",
        Duration::from_secs(30),
        || handled.lock().unwrap().len() == N,
    )
    .await;
    assert!(
        !a_run.is_finished(),
        "A is still running, cut off from its store"
    );
    a_stop.cancel();
    b_stop.cancel();
    let (a_report, b_report) = (a_run.await.unwrap(), b_run.await.unwrap());
    assert_eq!(a_report.handled, 0);
    assert_eq!(b_report.handled, N as u64, "{b_report:?}");
    let depths = queue_depths(&config).await.expect("depths");
    assert_eq!((depths.work, depths.dead), (0, 0));
    b_broker.close().await;
    common::cleanup(a_broker).await;
}
