//! [`RabbitDeadLetters`]: a topology's dead-letter queue, for
//! [`idemq::Replay`] and inspection.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use idemq::replay::{Confirm, DeadLetterQueue};
use idemq::{Delivery, Error, Headers};
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::Mutex;
use tokio::time::timeout;
use tracing::debug;

use crate::broker::copy_properties;
use crate::config::RabbitConfig;
use crate::errors::{BACKEND, map};
use crate::headers::{broker_death, from_field_table, short_string};
use crate::link::CLOSE_TIMEOUT;

/// Dead letters read ahead by default (see [`RabbitDeadLetters::with_read_ahead`]).
pub const DEFAULT_READ_AHEAD: u16 = 512;

/// How long [`DeadLetterQueue::put_back`] waits at most for the broker to
/// count what it returned as ready again.
const SETTLE: Duration = Duration::from_secs(2);

/// How long [`DeadLetterQueue::take`] waits for a delivery before it asks
/// the broker whether the queue is empty.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// The dead-letter queue of a topology, read by a consumer of its own and
/// written back to the work queue with publisher confirms: the
/// [`DeadLetterQueue`] of RabbitMQ.
///
/// It declares nothing and never consumes the work queue: [`Self::connect`]
/// checks with passive declarations that the work queue and the
/// dead-letter queue exist, and fails with [`Error::NotFound`] naming the
/// one that does not. Classic and quorum queues alike.
///
/// Dead letters are read ahead (a consumer with a prefetch) and stay
/// unacked until they are removed or put back; the consumer is renewed
/// whenever all it may hold is held, so a replay can leave any number of
/// dead letters in place. Copies are published on one confirm channel, in
/// the order of the calls. No automatic recovery: a connection lost
/// mid-replay fails the replay, and the broker returns every unsettled dead
/// letter to its queue.
///
/// ```no_run
/// # async fn demo() -> Result<(), idemq::Error> {
/// use idemq::Replay;
/// use idemq_rabbitmq::{RabbitConfig, RabbitDeadLetters};
/// # let store = idemq::memory::MemoryDedupStore::new();
///
/// let dlq = RabbitDeadLetters::connect(RabbitConfig::from_env("orders")).await?;
/// let report = Replay::new(&dlq, &store).run(&Default::default()).await;
/// println!("{report}");
/// dlq.close().await;
/// # Ok(()) }
/// ```
pub struct RabbitDeadLetters {
    cfg: RabbitConfig,
    dlq: String,
    conn: Connection,
    reader: Mutex<Reader>,
    publisher: Channel,
    /// Open (taken, unsettled) deliveries per consumer generation.
    open: StdMutex<HashMap<u64, u32>>,
    read_ahead: u16,
}

struct Reader {
    channel: Channel,
    consumer: Option<Consumer>,
    generation: u64,
    /// Read ahead from consumers that were cancelled, not handed out yet.
    backlog: Vec<LapinDelivery>,
}

/// What a dead letter carries for its settlement.
struct Handle {
    acker: Acker,
    properties: BasicProperties,
    generation: u64,
}

impl RabbitDeadLetters {
    /// Connects (one attempt, bounded by the connect timeout) and checks
    /// that the work queue and the dead-letter queue of `config` exist.
    pub async fn connect(config: RabbitConfig) -> Result<RabbitDeadLetters, Error> {
        let uri = config.validate()?;
        let after = config.connect_timeout();
        let props = ConnectionProperties::default()
            .with_connection_name(format!("idemq-replay:{}", config.queue()).into());
        let conn = timeout(after, Connection::connect_uri(uri, props))
            .await
            .map_err(|_| Error::Timeout {
                backend: BACKEND,
                op: "connect",
                after,
            })?
            .map_err(|e| map("connect", e))?;
        let dlq = config.dead_letter_queue();
        let opened = async {
            for queue in [config.queue(), dlq.as_str()] {
                depth_of(&conn, queue).await?;
            }
            let publisher = conn
                .create_channel()
                .await
                .map_err(|e| map("open channel", e))?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| map("confirm.select", e))?;
            let reader = conn
                .create_channel()
                .await
                .map_err(|e| map("open channel", e))?;
            Ok::<_, Error>((publisher, reader))
        };
        let (publisher, reader) = match timeout(after, opened).await {
            Ok(Ok(channels)) => channels,
            failed => {
                let _ = timeout(after, conn.close(200, "idemq: done".into())).await;
                return Err(failed
                    .unwrap_or(Err(Error::Timeout {
                        backend: BACKEND,
                        op: "connect",
                        after,
                    }))
                    .err()
                    .unwrap_or(Error::Closed { backend: BACKEND }));
            }
        };
        Ok(RabbitDeadLetters {
            cfg: config,
            dlq,
            conn,
            reader: Mutex::new(Reader {
                channel: reader,
                consumer: None,
                generation: 0,
                backlog: Vec::new(),
            }),
            publisher,
            open: StdMutex::new(HashMap::new()),
            read_ahead: DEFAULT_READ_AHEAD,
        })
    }

    /// How many dead letters the consumer may hold unsettled before more
    /// are read (the prefetch of the dead-letter queue's consumer; default
    /// [`DEFAULT_READ_AHEAD`]). More keeps the pipeline of a replay full;
    /// at the end, what was read ahead and not handed out goes back.
    pub fn with_read_ahead(mut self, n: u16) -> Self {
        self.read_ahead = n.max(1);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.cfg
    }

    /// The dead-letter queue's name.
    pub fn queue_name(&self) -> &str {
        &self.dlq
    }

    /// Closes the connection; unsettled dead letters go back to the queue.
    /// Returns within about 2 seconds, answered or not (a hung network).
    pub async fn close(&self) {
        let closing = async {
            // Closed before the connection: a channel lapin closes by itself
            // while the connection closes logs a spurious error.
            let reader = self.reader.lock().await.channel.clone();
            for channel in [&self.publisher, &reader] {
                if channel.status().connected() {
                    let _ = channel.close(200, "idemq: done".into()).await;
                }
            }
            if self.conn.status().connected() {
                let _ = self.conn.close(200, "idemq: done".into()).await;
            }
        };
        if timeout(CLOSE_TIMEOUT, closing).await.is_err() {
            debug!("closing the dead-letter connection timed out");
        }
    }

    fn note_open(&self, generation: u64, delta: i64) {
        if let Ok(mut open) = self.open.lock() {
            let n = open.entry(generation).or_default();
            *n = u32::try_from(i64::from(*n) + delta).unwrap_or(0);
        }
    }

    fn open_of(&self, generation: u64) -> u32 {
        self.open
            .lock()
            .ok()
            .and_then(|o| o.get(&generation).copied())
            .unwrap_or(0)
    }

    fn handle<'d>(&self, letter: &'d Delivery) -> Result<&'d Handle, Error> {
        letter.handle::<Handle>().ok_or_else(|| {
            Error::invalid(
                "dead letter",
                "it was not taken from this RabbitDeadLetters",
            )
        })
    }

    /// Starts a consumer on the dead-letter queue (a new generation), after
    /// cancelling the one before (its unsettled deliveries stay ours).
    async fn renew_consumer(&self, reader: &mut Reader) -> Result<(), Error> {
        if let Some(old) = reader.consumer.take() {
            reader
                .channel
                .basic_cancel(old.tag(), BasicCancelOptions::default())
                .await
                .map_err(|e| map("basic.cancel", e))?;
            // What it had read ahead is still ours: keep it, in order.
            reader.backlog.extend(drain(old).await);
        }
        reader
            .channel
            .basic_qos(self.read_ahead, BasicQosOptions { global: false })
            .await
            .map_err(|e| map("basic.qos", e))?;
        reader.generation += 1;
        let tag = format!("idemq-replay-{:016x}", rand::random::<u64>());
        let consumer = reader
            .channel
            .basic_consume(
                short_string("queue name", &self.dlq)?,
                ShortString::try_new(tag).unwrap_or_default(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map("basic.consume", e))?;
        reader.consumer = Some(consumer);
        Ok(())
    }

    fn to_delivery(&self, d: LapinDelivery, generation: u64) -> Delivery {
        let properties = d.properties;
        let mut delivery = Delivery::new(d.delivery_tag, Bytes::from(d.data));
        if let Some(table) = properties.headers().as_ref() {
            delivery.headers = from_field_table(table);
            delivery.broker_death = broker_death(table);
        }
        delivery.message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        delivery.redelivered = d.redelivered;
        self.note_open(generation, 1);
        delivery.with_handle(Handle {
            acker: d.acker,
            properties,
            generation,
        })
    }
}

/// The deliveries a cancelled consumer still holds.
async fn drain(mut consumer: Consumer) -> Vec<LapinDelivery> {
    let mut out = Vec::new();
    // After cancel-ok the stream ends once what was read is handed out.
    while let Ok(Some(Ok(d))) = timeout(IDLE_CHECK, consumer.next()).await {
        out.push(d);
    }
    out
}

/// Ready messages of `queue`.
async fn depth_of(conn: &Connection, queue: &str) -> Result<u64, Error> {
    let declared = crate::topology::passive(conn, queue, "queue depth").await?;
    Ok(u64::from(declared.message_count()))
}

impl fmt::Debug for RabbitDeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitDeadLetters")
            .field("config", &self.cfg)
            .field("read_ahead", &self.read_ahead)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl DeadLetterQueue for RabbitDeadLetters {
    async fn depth(&self) -> Result<u64, Error> {
        depth_of(&self.conn, &self.dlq).await
    }

    async fn take(&self) -> Result<Option<Delivery>, Error> {
        let mut reader = self.reader.lock().await;
        loop {
            if !reader.backlog.is_empty() {
                let d = reader.backlog.remove(0);
                let generation = reader.generation - 1;
                return Ok(Some(self.to_delivery(d, generation)));
            }
            // A consumer that holds all it may gets nothing more: start
            // another (its own prefetch), keeping what this one holds.
            let full = self.open_of(reader.generation) >= u32::from(self.read_ahead);
            if reader.consumer.is_none() || full {
                self.renew_consumer(&mut reader).await?;
                continue;
            }
            let generation = reader.generation;
            let Some(consumer) = reader.consumer.as_mut() else {
                continue;
            };
            match timeout(IDLE_CHECK, consumer.next()).await {
                Ok(Some(Ok(d))) => return Ok(Some(self.to_delivery(d, generation))),
                Ok(Some(Err(e))) => return Err(map("take", e)),
                Ok(None) => {
                    return Err(Error::Unavailable {
                        backend: BACKEND,
                        op: "take",
                        source: format!("the consumer of `{}` was cancelled", self.dlq).into(),
                    });
                }
                Err(_) => {
                    if self.depth().await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn republish(&self, letter: &Delivery, headers: Headers) -> Result<Confirm, Error> {
        let handle = self.handle(letter)?;
        let props = copy_properties(&handle.properties, headers)?;
        let queue = self.cfg.queue().to_owned();
        let pending = self
            .publisher
            .basic_publish(
                ShortString::default(),
                short_string("queue name", &queue)?,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &letter.body,
                props,
            )
            .await
            .map_err(|e| map("replay publish", e))?;
        let after = self.cfg.publish_timeout();
        Ok(Box::pin(async move {
            match timeout(after, pending).await {
                Err(_) => Err(Error::Timeout {
                    backend: BACKEND,
                    op: "replay publish",
                    after,
                }),
                Ok(Err(e)) => Err(map("replay publish", e)),
                Ok(Ok(confirmation)) => crate::link::confirmed(confirmation, &queue),
            }
        }))
    }

    async fn remove(&self, letter: &Delivery) -> Result<(), Error> {
        let handle = self.handle(letter)?;
        let acked = handle
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| map("remove dead letter", e))?;
        if !acked {
            return Err(Error::StaleDelivery {
                backend: BACKEND,
                tag: letter.tag,
            });
        }
        self.note_open(handle.generation, -1);
        Ok(())
    }

    async fn put_back(&self, letters: Vec<Delivery>) -> Result<(), Error> {
        let mut reader = self.reader.lock().await;
        if let Some(consumer) = reader.consumer.take() {
            reader
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(|e| map("basic.cancel", e))?;
            let rest = drain(consumer).await;
            reader.backlog.extend(rest);
        }
        // Back in delivery order: where the broker keeps places (classic
        // queues) they return to them; quorum queues deliver returned
        // messages first, in the order returned.
        let mut ackers: Vec<(u64, &Acker)> = letters
            .iter()
            .filter_map(|l| l.handle::<Handle>().map(|h| (l.tag, &h.acker)))
            .collect();
        ackers.extend(reader.backlog.iter().map(|d| (d.delivery_tag, &d.acker)));
        ackers.sort_by_key(|(tag, _)| *tag);
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let ready_before = self.depth().await?;
        let returned = ackers.len() as u64;
        for (_, acker) in ackers {
            acker
                .nack(requeue)
                .await
                .map_err(|e| map("put back dead letters", e))?;
        }
        reader.backlog.clear();
        // A quorum queue counts a returned message as ready a moment after
        // the return (it goes through the queue's log): wait for that,
        // briefly, so the next look at the queue (a depth, a replay's
        // cut-off) sees what this one left.
        let until = tokio::time::Instant::now() + SETTLE;
        while self.depth().await? < ready_before + returned && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}
