//! The queues idemq declares, and administration of them.
//!
//! * `Q`: the durable work queue (classic or quorum).
//! * `Q.retry.<tier>`: one durable queue per backoff tier, with a
//!   queue-level `x-message-ttl` of the tier and dead-lettering back to `Q`
//!   (`x-dead-letter-exchange: ""`, `x-dead-letter-routing-key: Q`). All
//!   messages of a queue share its TTL, so none waits behind a longer one.
//! * `Q.dlq`: the durable dead-letter queue (same type as `Q`).
//!
//! Declarations are idempotent: declaring again with the same arguments is
//! a no-op. A queue that exists with other arguments is reported as
//! [`Error::Config`].

use idemq::Error;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::timeout;

use crate::config::{QueueType, RabbitConfig};
use crate::errors::{BACKEND, map, map_declare};
use crate::headers::short_string;

/// The arguments of the work queue and the dead-letter queue.
fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    // A classic queue is declared without `x-queue-type`, so queues made
    // before idemq (or by older tools) stay equivalent.
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(queue_type.as_str())),
        );
    }
    args
}

/// Declares the work queue, the retry queues and the dead-letter queue.
pub(crate) async fn declare_topology(channel: &Channel, cfg: &RabbitConfig) -> Result<(), Error> {
    declare_queue(channel, cfg.queue(), queue_arguments(cfg.queue_type())).await?;
    for (tier, name) in cfg.retry_queues() {
        let mut args = queue_arguments(cfg.retry_queue_type());
        let ttl = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(cfg.queue())),
        );
        declare_queue(channel, &name, args).await?;
    }
    declare_queue(
        channel,
        &cfg.dead_letter_queue(),
        queue_arguments(cfg.queue_type()),
    )
    .await
}

async fn declare_queue(channel: &Channel, queue: &str, args: FieldTable) -> Result<(), Error> {
    channel
        .queue_declare(
            short_string("queue name", queue)?,
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .map(drop)
        .map_err(|e| map_declare(queue, e))
}

/// How many ready messages each queue of a topology holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// The work queue.
    pub work: u32,
    /// Each retry queue, with its tier, shortest first.
    pub retry: Vec<(std::time::Duration, u32)>,
    /// The dead-letter queue.
    pub dead: u32,
}

/// Opens a short-lived connection without recovery, runs `f`, closes it.
async fn with_channel<T>(
    cfg: &RabbitConfig,
    op: &'static str,
    f: impl AsyncFnOnce(&Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    let uri = cfg.validate()?;
    let after = cfg.connect_timeout();
    let conn = timeout(
        after,
        Connection::connect_uri(
            uri,
            ConnectionProperties::default().with_connection_name("idemq-admin".into()),
        ),
    )
    .await
    .map_err(|_| Error::Timeout {
        backend: BACKEND,
        op,
        after,
    })?
    .map_err(|e| map(op, e))?;
    let result = timeout(after, f(&conn))
        .await
        .unwrap_or(Err(Error::Timeout {
            backend: BACKEND,
            op,
            after,
        }));
    if conn.status().connected() {
        let _ = timeout(after, conn.close(200, "idemq: done".into())).await;
    }
    result
}

/// Declares the topology of `cfg` (idempotent), on a short-lived connection.
/// [`crate::RabbitBroker::connect`] does this by itself; producers that
/// start before any consumer can call it so their first messages are
/// routable.
pub async fn declare(cfg: &RabbitConfig) -> Result<(), Error> {
    with_channel(cfg, "declare", async |conn| {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        declare_topology(&channel, cfg).await
    })
    .await
}

/// Deletes every queue of `cfg`'s topology (work, retry and dead-letter
/// queues) with the messages they hold, on a short-lived connection.
/// Missing queues are not an error. Close the broker consuming them first,
/// or its supervisor declares them again.
pub async fn delete_topology(cfg: &RabbitConfig) -> Result<(), Error> {
    with_channel(cfg, "delete", async |conn| {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        for queue in cfg.all_queues() {
            channel
                .queue_delete(
                    short_string("queue name", &queue)?,
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(|e| map("delete", e))?;
        }
        Ok(())
    })
    .await
}

/// Counts the ready messages of each queue of `cfg`'s topology (passive
/// declarations on a short-lived connection). A missing queue is an error.
pub async fn queue_depths(cfg: &RabbitConfig) -> Result<QueueDepths, Error> {
    with_channel(cfg, "queue depths", async |conn| {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        let count = async |name: &str| -> Result<u32, Error> {
            channel
                .queue_declare(
                    short_string("queue name", name)?,
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await
                .map(|q| q.message_count())
                .map_err(|e| map("queue depths", e))
        };
        let work = count(cfg.queue()).await?;
        let mut retry = Vec::new();
        for (tier, name) in cfg.retry_queues() {
            retry.push((tier, count(&name).await?));
        }
        let dead = count(&cfg.dead_letter_queue()).await?;
        Ok(QueueDepths { work, retry, dead })
    })
    .await
}
