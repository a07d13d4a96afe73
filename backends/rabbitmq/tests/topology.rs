//! The topology's backstops on a real RabbitMQ (3.10 and 4.0): whatever
//! the broker gives up on lands in the dead-letter queue, a quorum queue's
//! delivery limit is explicit (RabbitMQ 4 would drop a message after 20
//! returns), and queues declared before with other arguments are adopted
//! with one warning, or refused with an error that says how to migrate.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idemq::memory::MemoryDedupStore;
use idemq::replay::peek;
use idemq::{
    Backoff, Broker, Claim, ClaimTtl, DedupStore, Engine, Error, Fenced, Lease, Message,
    OutgoingMessage, Record, RecordState, Release, Revival,
};
use idemq_rabbitmq::{QueueType, RabbitBroker, RabbitDeadLetters, topology};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

async fn raw() -> Option<Connection> {
    match Connection::connect(&common::url(), ConnectionProperties::default()).await {
        Ok(c) => Some(c),
        Err(e) => idemq::testing::service_unavailable("rabbitmq", e),
    }
}

/// Declares `queue` by hand, as an earlier deployment did.
async fn declare_by_hand(conn: &Connection, queue: &str, quorum: bool) {
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("declare by hand");
}

/// Queues made before idemq had the safety arguments (classic and quorum)
/// are used as they are; one warning names what they lack and the policy
/// that adds it.
#[tokio::test]
async fn queues_declared_without_the_safety_arguments_are_adopted_with_a_warning() {
    let Some(conn) = raw().await else { return };
    let logs = idemq::testing::LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let config = common::config("adopt").with_queue_type(queue_type);
        let quorum = queue_type == QueueType::Quorum;
        declare_by_hand(&conn, config.queue(), quorum).await;
        declare_by_hand(&conn, &config.dead_letter_queue(), quorum).await;
        let broker = common::connect(config.clone()).await.expect("adopted");
        broker
            .publish(OutgoingMessage::new("x").with_message_id("a"))
            .await
            .expect("publish");
        let d = broker.next().await.expect("next").expect("delivery");
        broker.ack(&d).await.expect("ack");
        // A second consumer (a rebuild, a restart) does not fail either.
        let again = common::connect(config.clone())
            .await
            .expect("adopted again");
        again.close().await;
        common::cleanup(broker).await;
        let text = logs.text();
        let q = config.queue();
        assert!(
            text.contains(&format!(
                "queue `{q}` was declared earlier without x-dead-letter-exchange"
            )),
            "{text}"
        );
        assert!(text.contains("rabbitmqctl set_policy"), "{text}");
        if quorum {
            assert!(text.contains("x-delivery-limit"), "{text}");
            assert!(text.contains("\"delivery-limit\":200"), "{text}");
        }
        assert_eq!(
            text.matches(&format!("queue `{q}` was declared earlier"))
                .count(),
            1,
            "one warning per queue: {text}"
        );
    }
}

/// A queue of another type cannot be adopted: connect fails at once with
/// an error naming the argument and how to migrate (no crash loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_another_type_is_refused_with_a_way_to_migrate() {
    let Some(conn) = raw().await else { return };
    let config = common::config("other-type").with_queue_type(QueueType::Quorum);
    declare_by_hand(&conn, config.queue(), false).await;
    let started = Instant::now();
    let err = RabbitBroker::connect(config.clone())
        .await
        .expect_err("a classic queue is not a quorum one");
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{text}");
    assert!(
        text.contains(&format!("queue `{}`", config.queue())),
        "{text}"
    );
    assert!(text.contains("x-queue-type"), "{text}");
    assert!(text.contains("To migrate"), "{text}");
    topology::delete_topology(&config).await.expect("cleanup");
}

/// What the broker gives up on lands in the dead-letter queue: a quorum
/// queue's delivery limit dead-letters (reason `delivery_limit`) instead
/// of dropping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_limit_dead_letters_instead_of_dropping() {
    let config = common::config("limit")
        .with_queue_type(QueueType::Quorum)
        .with_delivery_limit(3);
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    broker
        .publish(OutgoingMessage::new("poison").with_message_id("p"))
        .await
        .expect("publish");
    let mut deliveries = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout(Duration::from_millis(500), broker.next()).await {
            Ok(d) => {
                let d = d.expect("next").expect("delivery");
                deliveries += 1;
                broker.nack(&d, true).await.expect("nack");
            }
            Err(_) => break, // nothing more to deliver
        }
        assert!(Instant::now() < deadline);
    }
    assert_eq!(deliveries, 4, "the first delivery and three returns");
    let dead = broker
        .next_dead_letter()
        .await
        .expect("dlq")
        .expect("in the dead-letter queue, not dropped");
    assert_eq!(dead.message_id.as_deref(), Some("p"));
    assert_eq!(&dead.body[..], b"poison");
    let death = dead.broker_death.clone().expect("x-death");
    assert_eq!(
        (death.reason.as_str(), death.queue.as_str()),
        ("delivery_limit", config.queue())
    );
    broker.ack(&dead).await.expect("ack");
    common::cleanup(broker).await;
}

/// More than 20 returns (RabbitMQ 4's default delivery limit) lose nothing
/// on a quorum work queue, and as many dry runs lose nothing of a quorum
/// dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_returns_lose_nothing_on_quorum_queues() {
    let config = common::config("returns").with_queue_type(QueueType::Quorum);
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    broker.close().await;
    let publisher = idemq_rabbitmq::RabbitPublisher::connect(config.clone())
        .await
        .expect("publisher");
    publisher
        .publish(OutgoingMessage::new("kept").with_message_id("k"))
        .await
        .expect("publish");
    publisher
        .publish_to(
            &config.dead_letter_queue(),
            OutgoingMessage::new("dead").with_message_id("d"),
        )
        .await
        .expect("publish");
    publisher.close().await;
    // 25 consumers that take the message and die without settling it.
    for _ in 0..25 {
        let broker = RabbitBroker::connect(config.clone())
            .await
            .expect("connect");
        let d = broker.next().await.expect("next").expect("delivery");
        assert_eq!(d.message_id.as_deref(), Some("k"));
        broker.close().await;
    }
    let broker = RabbitBroker::connect(config.clone())
        .await
        .expect("connect");
    let d = broker.next().await.expect("next").expect("still there");
    assert_eq!(d.delivery_count, Some(25));
    broker.ack(&d).await.expect("ack");
    broker.close().await;
    // 25 looks at the dead-letter queue, each putting it back.
    let dlq = RabbitDeadLetters::connect(config.clone())
        .await
        .expect("dlq");
    for round in 0..25 {
        // A returned message is counted as ready again a moment after the
        // return (quorum queues apply it through their log): wait for it,
        // bounded, so every look sees it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while topology::queue_depths(&config).await.expect("depths").dead != 1 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the dead letter is gone"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = peek(&dlq, 10).await.expect("peek");
        assert_eq!(
            seen.len(),
            1,
            "round {round}: the dead letter is still there"
        );
    }
    dlq.close().await;
    topology::delete_topology(&config).await.expect("cleanup");
}

/// A store that fails its first `fail_first` claims, then works.
struct Outage {
    inner: MemoryDedupStore,
    fail_first: Mutex<u32>,
}

#[async_trait]
impl DedupStore for Outage {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        {
            let mut left = self.fail_first.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(Error::Unavailable {
                    backend: "test",
                    op: "claim",
                    source: "store down".into(),
                });
            }
        }
        self.inner.claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.inner.renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.inner.complete(lease, keep_for).await
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.inner.fail(lease, release).await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.inner.bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        self.inner.get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        self.inner.lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        self.inner.forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        self.inner.revive(scope, key).await
    }
}

/// The engine fails closed while its store is down: it requeues the
/// delivery every backoff round. 30 rounds, more than RabbitMQ 4's default
/// limit of 20, lose nothing: the message is handled once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_twenty_requeue_rounds_loses_nothing() {
    let config = common::config("outage").with_queue_type(QueueType::Quorum);
    let Some(broker) = common::connect(config.clone()).await else {
        return;
    };
    broker
        .publish(OutgoingMessage::new("order").with_message_id("o-1"))
        .await
        .expect("publish");
    let store = Arc::new(Outage {
        inner: MemoryDedupStore::new(),
        fail_first: Mutex::new(30),
    });
    let handled = Arc::new(Mutex::new(0u32));
    let h = handled.clone();
    let engine = Engine::builder(broker.clone(), store.clone(), move |_m: Message| {
        let h = h.clone();
        async move {
            *h.lock().unwrap() += 1;
            Ok(())
        }
    })
    .scope("outage")
    .failure_backoff(
        Backoff::new(Duration::from_millis(5), Duration::from_millis(20)).without_jitter(),
    )
    .build()
    .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    common::wait_until("handled after the outage", Duration::from_secs(30), || {
        *handled.lock().unwrap() == 1
    })
    .await;
    shutdown.cancel();
    let report = running.await.expect("engine");
    assert_eq!(report.requeued, 30, "{report:?}");
    assert_eq!((report.handled, report.dead_lettered), (1, 0), "{report:?}");
    let depths = topology::queue_depths(&config).await.expect("depths");
    assert_eq!((depths.work, depths.dead), (0, 0));
    common::cleanup(broker).await;
}
