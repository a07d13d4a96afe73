//! The connection and its supervisor.
//!
//! A [`Link`] owns one *generation* at a time: a lapin connection with
//! automatic recovery enabled, the consumer channel (topology declared on
//! it, so lapin's recovery redeclares it too), a pool of publisher-confirm
//! channels and a channel for `basic.get`.
//!
//! lapin recovers a broken connection by itself: it reconnects, reopens
//! the channels, replays `confirm.select`, `basic.qos`, the queue
//! declarations and the consumer, and poisons the ackers of every delivery
//! of the old incarnation (an ack on them reports `Ok(false)`). When lapin
//! gives up (its backoff is exhausted: the connection turns `Error` and an
//! [`lapin::Event::Error`] is emitted), or its recovery stalls or takes
//! longer than `max_recovery_time` (see [`RecoveryWatch`]), or a channel
//! is closed for good, or recovery is disabled, the supervisor task
//! retires the generation and builds a new one with exponential backoff.
//! Deliveries carry their generation number, so a settle on an older one
//! is reported as [`Error::StaleDelivery`].
//!
//! Closing takes at most [`CLOSE_TIMEOUT`]: a connection that is up gets
//! its held acks and `connection.close` within it; one lapin is still
//! recovering is not waited for (it is closed should it come back).
//!
//! A message lapin cannot parse (a short string that is not UTF-8, such as
//! a `message_id` of `b"\xff\xfe..."`) fails the whole connection: lapin's
//! I/O loop logs `parse error`, reports [`lapin::ErrorKind::ParsingError`]
//! (an [`Event::Error`], the consumer's stream, the connection turning
//! `Error`; lapin never recovers from it), and the message goes back to the
//! head of the queue, where it would fail every connection after. When a
//! generation ends that way, or a build fails that way, the supervisor (and
//! [`Link::connect`]) first runs the quarantine of [`crate::raw`] on the
//! work queue: it moves such messages to the dead-letter queue, as copies
//! lapin can read (reason `malformed`), and puts the others back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use idemq::{Delivery, Error};
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    Event,
};
use tokio::sync::{Mutex, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, warn};

use crate::acks::AckBatcher;
use crate::config::{QueueType, RabbitConfig};
use crate::errors::{BACKEND, is_connection_error, map};
use crate::headers::{broker_death, from_field_table, short_string};
use crate::raw::{self, RawError};
use crate::topology::declare_topology;

/// Idle publisher channels kept per connection.
const MAX_IDLE_CHANNELS: usize = 32;
/// How often a waiter polls a connection that lapin is recovering.
const POLL: Duration = Duration::from_millis(50);
/// The quorum queue header counting deliveries.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";
/// Messages a quarantine takes from the head of the work queue beyond the
/// prefetch: a message that failed a connection was among the unacked
/// deliveries of that connection, which go back to the head of the queue.
const QUARANTINE_MARGIN: usize = 64;
/// The longest a quarantine may take (each read and write is bounded by
/// the connect timeout as well).
const QUARANTINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`Link::connect`] quarantines and tries again before it gives
/// up on a work queue whose head lapin cannot parse.
const CONNECT_QUARANTINES: u32 = 5;
/// How long a quarantine that found nothing waits before it looks once
/// more: the broker may not have put the failed connection's messages back
/// yet.
const QUARANTINE_SETTLE: Duration = Duration::from_millis(250);
/// How long a failed build waits for lapin's error event once the
/// connection is marked errored (it follows at once).
const ERROR_EVENT_WAIT: Duration = Duration::from_secs(1);
/// How often the supervisor looks at the connection's state, to see a
/// stalled recovery early (a read of lapin's state: cheap).
const RECOVERY_POLL: Duration = Duration::from_millis(100);
/// Slack beyond lapin's first backoff step before a recovery that has not
/// started to reconnect counts as stalled (scheduling of lapin's thread
/// and tasks on a busy machine).
const STALL_SLACK: Duration = Duration::from_secs(1);
/// How long lapin may stay `Connecting` before the attempt counts as hung:
/// a handshake with a server that answers takes milliseconds, and lapin's
/// can hang until the server's own handshake timeout (10 s for RabbitMQ).
/// Longer only while the server refuses connections, when a rebuild (with
/// its own backoff) does as well.
const ATTEMPT_HANG: Duration = Duration::from_secs(5);
/// The longest closing takes: writing the held acks and `connection.close`
/// on a connection that is up. One that is down or being recovered is not
/// waited for.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

type Events = std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>;

/// How a delivery is settled.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Settlement {
    /// `basic.ack` (batched on the consumer channel).
    Ack,
    /// `basic.nack`, back to the queue or (without `requeue`) to the
    /// queue's dead-letter target, if any.
    Nack { requeue: bool },
}

/// What a delivery carries for its settlement.
#[derive(Debug)]
pub(crate) struct Handle {
    /// The link that delivered it.
    pub link: u64,
    /// The generation (connection incarnation) that delivered it.
    pub generation: u64,
    /// lapin's acker (poisoned by lapin when its channel is lost).
    pub acker: Acker,
    /// The original properties, copied onto retried and dead-lettered copies.
    pub properties: BasicProperties,
    /// Delivered by the consumer channel, whose acks are batched.
    pub batched: bool,
}

struct ConsumerSlot {
    channel: Channel,
    /// The running consumer: `None` until the first `next` (a broker only
    /// used to publish holds no prefetch nobody reads) and while paused.
    consumer: Mutex<Option<Consumer>>,
    /// The prefetch the current consumer was started with.
    prefetch: AtomicU16,
    /// Deliveries a replaced consumer had read ahead: handed out first.
    backlog: StdMutex<VecDeque<LapinDelivery>>,
    /// No consumer runs (not started yet, or paused): `next` starts one.
    paused: AtomicBool,
}

impl ConsumerSlot {
    /// Restarts the consumer with a larger prefetch (RabbitMQ applies a
    /// `basic.qos` to consumers started after it): the old one is
    /// cancelled, what it had read ahead stays ours and is handed out
    /// first, in order. A stopped consumer only gets the new `basic.qos`.
    /// Answers the cancelled consumer, to be watched ([`watch_cancelled`]).
    async fn grow(&self, queue: &str, prefetch: u16) -> Result<Option<Consumer>, Error> {
        let mut consumer = self.consumer.lock().await;
        if self.prefetch.load(Ordering::SeqCst) >= prefetch {
            return Ok(None);
        }
        let mut cancelled = None;
        if let Some(old) = consumer.as_mut() {
            let read = self.cancel_and_drain(old).await?;
            // Stopped until the new one runs: should starting it fail,
            // `next` starts one.
            cancelled = consumer.take();
            self.paused.store(true, Ordering::SeqCst);
            if let Ok(mut backlog) = self.backlog.lock() {
                backlog.extend(read);
            }
        }
        self.channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| map("basic.qos", e))?;
        self.prefetch.store(prefetch, Ordering::SeqCst);
        if cancelled.is_some() {
            *consumer = Some(self.consume(queue).await?);
            self.paused.store(false, Ordering::SeqCst);
        }
        Ok(cancelled)
    }

    /// Cancels the consumer and answers what it had read ahead: after
    /// cancel-ok the stream ends once what was read is handed out. On an
    /// error the caller keeps the consumer: lapin's recovery may restart
    /// it, and its deliveries must still be read.
    async fn cancel_and_drain(&self, consumer: &mut Consumer) -> Result<Vec<LapinDelivery>, Error> {
        self.channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| map("basic.cancel", e))?;
        let mut read = Vec::new();
        while let Ok(Some(Ok(d))) = timeout(POLL * 4, consumer.next()).await {
            read.push(d);
        }
        Ok(read)
    }

    async fn consume(&self, queue: &str) -> Result<Consumer, Error> {
        self.channel
            .basic_consume(
                short_string("queue name", queue)?,
                consumer_tag(queue),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map("basic.consume", e))
    }

    /// Cancels the consumer and requeues what it (and the backlog) held
    /// ahead, so that other consumers take it; answers how many. A second
    /// call before `resume` does nothing.
    ///
    /// Each delivery given back is noted open in `acks` until its nack is
    /// written, so no multiple ack covers it first. Answers also the
    /// cancelled consumer, to be watched ([`watch_cancelled`]).
    async fn pause(
        &self,
        acks: Option<&Arc<AckBatcher>>,
    ) -> Result<(usize, Option<Consumer>), Error> {
        let mut consumer = self.consumer.lock().await;
        if self.paused.load(Ordering::SeqCst) {
            return Ok((0, None));
        }
        let mut held = Vec::new();
        if let Some(running) = consumer.as_mut() {
            // On an error nothing changed: the consumer and the backlog
            // stay, and `next` goes on handing them out.
            held = self.cancel_and_drain(running).await?;
        }
        let cancelled = consumer.take();
        self.paused.store(true, Ordering::SeqCst);
        if let Ok(mut backlog) = self.backlog.lock() {
            held.splice(0..0, backlog.drain(..));
        }
        let mut given_back = 0;
        for d in held {
            if d.acker.poisoned() {
                continue; // of a lost channel: the broker has it back already
            }
            if let Some(acks) = acks {
                acks.opened(d.delivery_tag);
            }
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            match d.acker.nack(requeue).await {
                Ok(_) => given_back += 1,
                // Unsettled, it returns to the queue when the channel closes.
                Err(e) => {
                    debug!(error = %e, tag = d.delivery_tag, "could not give a delivery back")
                }
            }
            if let Some(acks) = acks {
                acks.closed(d.delivery_tag).await;
            }
        }
        Ok((given_back, cancelled))
    }

    /// Starts the consumer (the first time, or after `pause`).
    async fn resume(&self, queue: &str) -> Result<(), Error> {
        let mut consumer = self.consumer.lock().await;
        if !self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        *consumer = Some(self.consume(queue).await?);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Watches a consumer cancelled with `basic.cancel`, for `within`. lapin's
/// recovery restarts the consumers it knew when the connection was lost,
/// so one whose cancel-ok arrived while that recovery ran comes back to
/// life, delivering to a handle nobody reads: its messages would sit
/// unacked until the channel closes. A delivery on it marks the generation
/// broken; the rebuild closes the channel and the broker hands those
/// messages to live consumers.
fn watch_cancelled(generation: &Arc<Generation>, mut consumer: Consumer, within: Duration) {
    let generation = generation.clone();
    tokio::spawn(async move {
        let until = tokio::time::sleep(within);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = generation.retired.cancelled() => return,
                _ = &mut until => return,
                item = consumer.next() => {
                    // The end of its stream, an error, or a delivery of a
                    // lost channel: nothing to do.
                    if let Some(Ok(d)) = item && !d.acker.poisoned() {
                        warn!(generation = generation.id, tag = d.delivery_tag,
                            consumer = consumer.tag().as_str(),
                            "a cancelled consumer was restarted by lapin's recovery; rebuilding");
                        generation.mark_broken(
                            "a cancelled consumer was restarted by lapin's recovery".to_owned(),
                        );
                        return;
                    }
                }
            }
        }
    });
}

/// Runs a change of the consumer (start, pause, new prefetch) in a task of
/// its own, so that it completes even when the caller stops waiting: a
/// cancelled `next` must not leave a consumer started at the broker but
/// not recorded here (its deliveries would sit unread, and a multiple ack
/// could cover them), nor deliveries taken from the backlog and not given
/// back.
async fn detached<T: Send + 'static>(
    change: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    match tokio::spawn(change).await {
        Ok(result) => result,
        Err(e) => Err(Error::Backend {
            backend: BACKEND,
            op: "consumer change",
            transient: true,
            source: Box::new(e),
        }),
    }
}

pub(crate) struct Generation {
    pub id: u64,
    conn: Connection,
    consumer: Option<ConsumerSlot>,
    /// The consumer channel's ack batching, when on.
    acks: Option<Arc<AckBatcher>>,
    getter: Mutex<Option<Channel>>,
    pool: StdMutex<Vec<Channel>>,
    broken: CancellationToken,
    broken_reason: StdMutex<Option<String>>,
    retired: CancellationToken,
    /// lapin failed to parse a frame (a message it cannot read), as seen
    /// by the consumer or the event stream, whichever saw it first.
    parse_error: StdMutex<Option<String>>,
    /// The watch took an error event off the stream.
    error_event_seen: AtomicBool,
}

impl Generation {
    fn note_parse_error(&self, e: &lapin::Error) {
        if let Ok(mut p) = self.parse_error.lock()
            && p.is_none()
        {
            *p = Some(e.to_string());
        }
    }

    fn parse_error(&self) -> Option<String> {
        self.parse_error.lock().ok().and_then(|p| p.clone())
    }

    fn mark_broken(&self, reason: String) {
        if let Ok(mut r) = self.broken_reason.lock()
            && r.is_none()
        {
            *r = Some(reason);
        }
        self.broken.cancel();
    }

    fn conn_dead(&self) -> bool {
        let s = self.conn.status();
        s.errored() || s.closed() || s.closing()
    }

    /// Closed or failed for good: lapin will not bring it back. (A
    /// connection whose `connection.close` went unanswered stays
    /// `Closing`, and lapin recovers it should its socket fail then.)
    fn conn_finished(&self) -> bool {
        let s = self.conn.status();
        s.errored() || s.closed()
    }

    /// Neither up nor given up: lapin is reconnecting (its state then
    /// alternates between `Reconnecting` and `Connecting`).
    fn recovering(&self) -> bool {
        !self.conn.status().connected() && !self.conn_dead()
    }

    fn usable(&self) -> bool {
        self.conn.status().connected() && !self.retired.is_cancelled()
    }

    async fn checkout(&self) -> lapin::Result<Channel> {
        loop {
            let idle = self.pool.lock().ok().and_then(|mut p| p.pop());
            match idle {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => break,
            }
        }
        let ch = self.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    fn checkin(&self, ch: Channel) {
        if ch.status().connected()
            && let Ok(mut pool) = self.pool.lock()
            && pool.len() < MAX_IDLE_CHANNELS
        {
            pool.push(ch);
        }
    }

    /// Closes the connection if it is up, within `wait`: the acks held for
    /// batching first (closing would send their messages back to the
    /// queue), then `connection.close`. A connection that is down or being
    /// recovered is left as it is: the caller hands it to [`reap`], which
    /// closes it should lapin ever bring it back.
    async fn close(&self, wait: Duration) {
        if !self.conn.status().connected() {
            return;
        }
        let deadline = Instant::now() + wait;
        if let Some(acks) = &self.acks
            && timeout_at(deadline, acks.drain(deadline)).await.is_err()
        {
            debug!("writing the held acks timed out; the broker redelivers their messages");
        }
        match timeout_at(deadline, self.conn.close(200, "idemq: closing".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "closing the RabbitMQ connection failed"),
            Err(_) => debug!("closing the RabbitMQ connection timed out"),
        }
    }
}

pub(crate) struct Shared {
    pub cfg: RabbitConfig,
    uri: AMQPUri,
    consume: bool,
    pub link_id: u64,
    current: watch::Sender<Option<Arc<Generation>>>,
    closed: CancellationToken,
    next_generation: AtomicU64,
    /// The prefetch consumers start with: the configured one, or the one
    /// the engine asked for ([`Shared::size_prefetch`]).
    prefetch: AtomicU16,
    /// Quarantine failures are logged at ERROR once, then at WARN.
    quarantine_failed_before: AtomicBool,
}

/// What a quarantine run came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quarantined {
    /// Moved this many messages to the dead-letter queue.
    Moved(usize),
    /// Found nothing lapin cannot parse.
    Nothing,
    /// Could not run (TLS, the server unreachable, ...); logged.
    Failed,
}

/// A supervised connection; see the module docs.
pub(crate) struct Link {
    pub shared: Arc<Shared>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    _close_on_drop: DropGuard,
}

impl Link {
    /// Connects (one attempt, bounded by the connect timeout), then hands
    /// the connection to a supervisor task. With `consume`, the topology is
    /// declared and a consumer started on the work queue. An attempt that
    /// fails on a message lapin cannot parse is followed by a quarantine
    /// and another attempt (at most [`CONNECT_QUARANTINES`] times); when
    /// the quarantine cannot run, the error says the queue is blocked.
    pub async fn connect(cfg: RabbitConfig, consume: bool) -> Result<Link, Error> {
        let uri = cfg.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "idemq-rabbitmq must run inside a tokio runtime".into(),
            ));
        }
        reachable(&uri, &cfg).await?;
        let closed = CancellationToken::new();
        let (current, _) = watch::channel(None);
        let cfg_prefetch = cfg.prefetch();
        let shared = Arc::new(Shared {
            cfg,
            uri,
            consume,
            link_id: rand::random(),
            current,
            closed: closed.clone(),
            next_generation: AtomicU64::new(0),
            prefetch: AtomicU16::new(cfg_prefetch),
            quarantine_failed_before: AtomicBool::new(false),
        });
        let mut quarantines = 0;
        let (generation, events) = loop {
            match shared.build().await {
                Ok(built) => break built,
                Err(e) if caused_by_parse_error(&e) && shared.consume => {
                    quarantines += 1;
                    warn!(url = %shared.cfg.redacted_url(), queue = shared.cfg.queue(),
                        error = %e, attempt = quarantines,
                        "connecting failed: lapin could not parse a message of the work queue; \
                         moving such messages to the dead-letter queue");
                    let outcome = shared.quarantine().await;
                    if outcome == Quarantined::Failed || quarantines >= CONNECT_QUARANTINES {
                        return Err(blocked(&shared.cfg, e));
                    }
                }
                Err(e) => return Err(e),
            }
        };
        info!(url = %shared.cfg.redacted_url(), queue = shared.cfg.queue(),
            generation = generation.id, "connected to RabbitMQ");
        shared.current.send_replace(Some(generation.clone()));
        let supervisor = tokio::spawn(supervise(shared.clone(), generation, events));
        Ok(Link {
            shared,
            supervisor: Mutex::new(Some(supervisor)),
            _close_on_drop: closed.drop_guard(),
        })
    }

    /// Stops the supervisor and closes the connection, within
    /// [`CLOSE_TIMEOUT`] (see [`Generation::close`]). Idempotent.
    pub async fn close(&self) {
        self.shared.closed.cancel();
        let handle = self.supervisor.lock().await.take();
        if let Some(handle) = handle
            && let Err(e) = handle.await
        {
            error!(error = %e, "the RabbitMQ supervisor task failed");
        }
    }
}

impl Shared {
    /// The prefetch consumers start with.
    fn prefetch(&self) -> u16 {
        self.prefetch.load(Ordering::SeqCst)
    }

    /// Sizes the prefetch for an engine of `concurrency` (twice it), unless
    /// the configuration sets one; answers the prefetch in force. The
    /// current consumer is restarted with it when it had less; later
    /// generations start with it.
    pub async fn size_prefetch(&self, concurrency: usize) -> u16 {
        if let Some(explicit) = self.cfg.explicit_prefetch() {
            return explicit;
        }
        let want = u16::try_from(concurrency.saturating_mul(2))
            .unwrap_or(u16::MAX)
            .max(1);
        let before = self.prefetch.fetch_max(want, Ordering::SeqCst);
        if want <= before {
            return before;
        }
        let current = self.current.borrow().clone();
        if let Some(generation) = current.filter(|g| g.consumer.is_some())
            && let Err(e) = detached({
                let (queue, watch) = (self.cfg.queue().to_owned(), self.cancelled_watch());
                async move {
                    if let Some(slot) = &generation.consumer
                        && let Some(cancelled) = slot.grow(&queue, want).await?
                    {
                        watch_cancelled(&generation, cancelled, watch);
                    }
                    Ok(())
                }
            })
            .await
        {
            // The next generation starts with it anyway.
            warn!(error = %e, prefetch = want, "could not raise the consumer's prefetch now");
        }
        want
    }

    /// How long a cancelled consumer is watched for a restart by lapin's
    /// recovery: a recovery under way when it was cancelled ends within
    /// `max_recovery_time` (or the generation is rebuilt), twice that
    /// leaves room for restoring the channel's consumers.
    fn cancelled_watch(&self) -> Duration {
        self.cfg.recovery().max_recovery_time * 2 + Duration::from_secs(5)
    }

    /// The current generation's number, `None` while it is being rebuilt.
    pub fn generation(&self) -> Option<u64> {
        self.current.borrow().as_ref().map(|g| g.id)
    }

    /// True when the current connection is up (not recovering, not rebuilding).
    pub fn is_connected(&self) -> bool {
        self.current.borrow().as_ref().is_some_and(|g| g.usable())
    }

    fn properties(&self) -> ConnectionProperties {
        let rec = self.cfg.recovery().clone();
        let mut props =
            ConnectionProperties::default().with_connection_name(self.cfg.connection_name().into());
        if rec.auto_recover {
            props = props.enable_auto_recover().configure_backoff(move |b| {
                b.with_min_delay(rec.min_delay)
                    .with_max_delay(rec.max_delay)
                    .with_max_times(rec.attempts)
                    .with_jitter()
            });
        }
        props
    }

    /// Runs the quarantine on the work queue (see [`crate::raw`]) and logs
    /// what came of it: every moved message at ERROR (by the quarantine),
    /// a failure at ERROR the first time and at WARN after.
    async fn quarantine(&self) -> Quarantined {
        let queue = self.cfg.queue();
        let dlq = self.cfg.dead_letter_queue();
        let q = raw::Quarantine {
            uri: &self.uri,
            queue,
            dead_letter_queue: &dlq,
            max: usize::from(self.prefetch()) + QUARANTINE_MARGIN,
            io_timeout: self.cfg.connect_timeout(),
            connection_name: format!("idemq-quarantine:{queue}"),
        };
        let started = Instant::now();
        let mut looked_again = false;
        loop {
            let run = tokio::select! {
                _ = self.closed.cancelled() => return Quarantined::Failed,
                run = timeout(QUARANTINE_TIMEOUT, raw::quarantine(&q)) => run,
            };
            let error = match run {
                Ok(Ok(report)) if !report.moved.is_empty() => {
                    info!(queue, dead_letter_queue = %dlq, elapsed = ?started.elapsed(),
                        "quarantine done: {}", raw::summary(&report));
                    return Quarantined::Moved(report.moved.len());
                }
                Ok(Ok(report)) if !looked_again => {
                    // The broker may not have put the failed connection's
                    // messages back yet.
                    debug!(queue, "quarantine found nothing: {}", raw::summary(&report));
                    looked_again = true;
                    tokio::select! {
                        _ = self.closed.cancelled() => return Quarantined::Failed,
                        _ = sleep(QUARANTINE_SETTLE) => {}
                    }
                    continue;
                }
                Ok(Ok(report)) => {
                    raw::warn_nothing_found(queue, &report);
                    return Quarantined::Nothing;
                }
                Ok(Err(e)) => e,
                Err(_) => RawError::Timeout {
                    during: "quarantining",
                    after: QUARANTINE_TIMEOUT,
                },
            };
            self.log_quarantine_failure(&dlq, &error);
            return Quarantined::Failed;
        }
    }

    fn log_quarantine_failure(&self, dlq: &str, error: &RawError) {
        let queue = self.cfg.queue();
        let url = self.cfg.redacted_url();
        if self.quarantine_failed_before.swap(true, Ordering::SeqCst) {
            warn!(%url, queue, %error,
                "the work queue is still blocked by a message lapin cannot parse; \
                 moving it failed again");
            return;
        }
        let remedy = format!(
            "remove it by hand: `{queue}` dead-letters rejected messages to `{dlq}`, so \
             `rabbitmqadmin get queue={queue} count=1 ackmode=reject_requeue_false` (or the \
             management UI's Get messages with \"Reject requeue false\") moves its head \
             message there (look first with ackmode=reject_requeue_true; that copy keeps the \
             bad bytes, so idemq cannot replay it), or move it with a shovel; idemq keeps \
             retrying with backoff meanwhile"
        );
        match error {
            RawError::Unsupported(what) => error!(%url, queue, dead_letter_queue = dlq,
                "queue `{queue}` is blocked: a message there has AMQP properties lapin \
                 cannot parse (a short string that is not UTF-8: message_id, correlation_id, \
                 a header name...), so every connection that consumes it fails, and idemq \
                 cannot move it because its raw AMQP client does not support {what}; {remedy}"),
            other => error!(%url, queue, dead_letter_queue = dlq, error = %other,
                "queue `{queue}` is blocked: a message there has AMQP properties lapin \
                 cannot parse (a short string that is not UTF-8: message_id, correlation_id, \
                 a header name...), so every connection that consumes it fails, and moving \
                 it to `{dlq}` failed: {other}; if this persists, {remedy}"),
        }
    }

    /// One attempt at a new generation: connection, topology, consumer.
    async fn build(&self) -> Result<(Arc<Generation>, Events), Error> {
        let id = self.next_generation.fetch_add(1, Ordering::SeqCst) + 1;
        let after = self.cfg.connect_timeout();
        let attempt = async {
            let conn = Connection::connect_uri(self.uri.clone(), self.properties())
                .await
                .map_err(|e| map("connect", e))?;
            let mut events: Events = Box::pin(conn.events_listener());
            let setup = async {
                let consumer = self.start_consumer(&conn).await?;
                let publisher = conn
                    .create_channel()
                    .await
                    .map_err(|e| map("open channel", e))?;
                publisher
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| map("confirm.select", e))?;
                Ok::<_, Error>((consumer, publisher))
            };
            // A message lapin cannot parse may arrive as soon as the
            // consumer is started: watch the events meanwhile, so that its
            // parse error ends the attempt at once (the setup's own futures
            // may never resolve on the failed connection).
            let mut parse_error: Option<lapin::Error> = None;
            let mut error_seen = false;
            let mut events_open = true;
            let result = {
                tokio::pin!(setup);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut setup => break r,
                        event = events.next(), if events_open => match event {
                            Some(Event::Error(e)) if is_parse_error(&e) => {
                                parse_error = Some(e.clone());
                                break Err(parse_failure(e));
                            }
                            Some(event) => {
                                error_seen |= matches!(event, Event::Error(_));
                                debug!(?event, "RabbitMQ event during setup");
                            }
                            None => events_open = false,
                        },
                    }
                }
            };
            // lapin may or may not have queued the `Connected` event of this
            // first connection (it races our listener; it is sent before
            // any later frame is read, so it is in by now): drop it so it
            // is not taken for a recovery. A parse error among what is
            // queued spoils the attempt.
            while let Some(Some(event)) = events.next().now_or_never() {
                match event {
                    Event::Error(e) if is_parse_error(&e) => {
                        parse_error.get_or_insert(e);
                    }
                    event => {
                        error_seen |= matches!(event, Event::Error(_));
                        debug!(?event, "RabbitMQ event during setup");
                    }
                }
            }
            // lapin marks the connection errored before it emits the error
            // event: a setup step may fail on the state (`InvalidConnectionState`)
            // before the event that says why is out. Wait for it, briefly.
            if parse_error.is_none()
                && !error_seen
                && result.is_err()
                && conn.status().errored()
                && let Ok(Some(e)) = timeout(ERROR_EVENT_WAIT, first_error(&mut events)).await
                && is_parse_error(&e)
            {
                parse_error = Some(e);
            }
            let result = match (result, parse_error) {
                (Err(e), _) if caused_by_parse_error(&e) => Err(e),
                (_, Some(e)) => Err(parse_failure(e)),
                (result, None) => result,
            };
            match result {
                Ok((consumer, publisher)) => Ok((
                    Arc::new(Generation {
                        id,
                        conn,
                        acks: consumer.as_ref().and_then(|_| {
                            let delay = self.cfg.ack_delay()?;
                            let limit = usize::from(self.prefetch()).div_ceil(4);
                            Some(AckBatcher::new(delay, limit))
                        }),
                        consumer,
                        getter: Mutex::new(None),
                        pool: StdMutex::new(vec![publisher]),
                        broken: CancellationToken::new(),
                        broken_reason: StdMutex::new(None),
                        retired: CancellationToken::new(),
                        parse_error: StdMutex::new(None),
                        error_event_seen: AtomicBool::new(false),
                    }),
                    events,
                )),
                Err(e) => {
                    if conn.status().connected() {
                        let _ = timeout(after, conn.close(200, "idemq: setup failed".into())).await;
                    }
                    Err(e)
                }
            }
        };
        match timeout(after, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                backend: BACKEND,
                op: "connect",
                after,
            }),
        }
    }

    async fn start_consumer(&self, conn: &Connection) -> Result<Option<ConsumerSlot>, Error> {
        if !self.consume {
            return Ok(None);
        }
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        declare_topology(conn, &self.cfg).await?;
        let prefetch = self.prefetch();
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| map("basic.qos", e))?;
        // The consumer itself starts at the first `next`.
        Ok(Some(ConsumerSlot {
            channel,
            consumer: Mutex::new(None),
            prefetch: AtomicU16::new(prefetch),
            backlog: StdMutex::new(VecDeque::new()),
            paused: AtomicBool::new(true),
        }))
    }

    /// The current generation; waits while it is being rebuilt. `Ok(None)`
    /// once closed; `Timeout` when `deadline` passes first.
    async fn wait_generation(
        &self,
        deadline: Option<Instant>,
        op: &'static str,
    ) -> Result<Option<Arc<Generation>>, Error> {
        let mut rx = self.current.subscribe();
        loop {
            if self.closed.is_cancelled() {
                return Ok(None);
            }
            if let Some(g) = rx.borrow_and_update().clone()
                && !g.retired.is_cancelled()
            {
                return Ok(Some(g));
            }
            let until = deadline.unwrap_or_else(far_future);
            tokio::select! {
                _ = self.closed.cancelled() => return Ok(None),
                changed = rx.changed() => if changed.is_err() { return Ok(None) },
                _ = sleep_until(until) => return Err(self.timeout(op)),
            }
        }
    }

    fn timeout(&self, op: &'static str) -> Error {
        Error::Timeout {
            backend: BACKEND,
            op,
            after: self.cfg.publish_timeout(),
        }
    }

    /// After a connection-level error: waits until lapin has recovered the
    /// connection, or the supervisor has replaced the generation, then
    /// returns so the caller tries again. Fails at `deadline`.
    async fn pause_after(
        &self,
        generation: &Generation,
        channel: Option<Channel>,
        cause: lapin::Error,
        deadline: Instant,
        op: &'static str,
    ) -> Result<(), Error> {
        debug!(op, error = %cause, generation = generation.id,
            "RabbitMQ operation hit a broken connection; waiting for it to come back");
        let recovered = async {
            if let Some(ch) = channel
                && ch.wait_for_recovery(cause.clone()).await.is_ok()
            {
                return;
            }
            // Nothing to wait on in lapin: poll until the connection is
            // usable again or the supervisor retires this generation.
            loop {
                if generation.conn.status().connected() {
                    sleep(POLL).await; // no tight loop on a dead channel
                    return;
                }
                if generation.conn_dead() {
                    generation.mark_broken(format!("{op} failed: {cause}"));
                    generation.retired.cancelled().await;
                    return;
                }
                sleep(POLL).await;
            }
        };
        tokio::select! {
            _ = self.closed.cancelled() => Err(Error::Closed { backend: BACKEND }),
            _ = generation.retired.cancelled() => Ok(()),
            _ = recovered => Ok(()),
            _ = sleep_until(deadline) => Err(Error::Unavailable {
                backend: BACKEND,
                op,
                source: Box::new(cause.clone()),
            }),
        }
    }

    /// Publishes to the default exchange with routing key `queue`,
    /// mandatory, on a confirm channel, and waits for the confirm. Retries
    /// (until the publish timeout) across connection recovery: a copy may
    /// then be published twice, which the dedup record absorbs.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        op: &'static str,
    ) -> Result<(), Error> {
        let routing_key = short_string("queue name", queue)?;
        let deadline = Instant::now() + self.cfg.publish_timeout();
        loop {
            let Some(generation) = self.wait_generation(Some(deadline), op).await? else {
                return Err(Error::Closed { backend: BACKEND });
            };
            let checkout = tokio::select! {
                r = timeout_at(deadline, generation.checkout()) => r,
                _ = generation.retired.cancelled() => continue,
            };
            let channel = match checkout {
                Err(_) => return Err(self.timeout(op)),
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) if is_connection_error(&e) => {
                    self.pause_after(&generation, None, e, deadline, op).await?;
                    continue;
                }
                Ok(Err(e)) => return Err(map(op, e)),
            };
            let send = timeout_at(deadline, async {
                channel
                    .basic_publish(
                        ShortString::default(),
                        routing_key.clone(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        body,
                        properties.clone(),
                    )
                    .await?
                    .await
            });
            let sent = tokio::select! {
                sent = send => sent,
                // Replaced meanwhile: publish again on the new connection.
                _ = generation.retired.cancelled() => continue,
            };
            match sent {
                // The channel is dropped (closed): its confirm is still due.
                Err(_) => return Err(self.timeout(op)),
                Ok(Ok(confirmation)) => {
                    generation.checkin(channel);
                    return confirmed(confirmation, queue);
                }
                Ok(Err(e)) if is_connection_error(&e) => {
                    self.pause_after(&generation, Some(channel), e, deadline, op)
                        .await?;
                }
                Ok(Err(e)) => return Err(map(op, e)),
            }
        }
    }

    /// Pauses the current consumer (see [`ConsumerSlot::pause`]); answers
    /// whether there was one to pause.
    pub async fn pause(&self) -> Result<bool, Error> {
        let current = self.current.borrow().clone();
        let Some(generation) = current.filter(|g| g.consumer.is_some()) else {
            return Ok(false);
        };
        let watch = self.cancelled_watch();
        let given_back = detached(async move {
            let Some(slot) = &generation.consumer else {
                return Ok(0);
            };
            let (given_back, cancelled) = slot.pause(generation.acks.as_ref()).await?;
            if let Some(cancelled) = cancelled {
                watch_cancelled(&generation, cancelled, watch);
            }
            Ok(given_back)
        })
        .await?;
        info!(
            queue = self.cfg.queue(),
            given_back, "consumer paused; deliveries held ahead given back"
        );
        Ok(true)
    }

    /// The next delivery of the consumer; waits across recovery and
    /// rebuilds. Cancel safe: lapin keeps a delivery until it is returned.
    pub async fn next(&self) -> Result<Option<Delivery>, Error> {
        loop {
            let Some(generation) = self.wait_generation(None, "next").await? else {
                return Ok(None);
            };
            let Some(slot) = generation.consumer.as_ref() else {
                return Err(Error::Unsupported {
                    backend: BACKEND,
                    op: "next on a publisher",
                });
            };
            if slot.paused.load(Ordering::SeqCst) {
                let (g, queue) = (generation.clone(), self.cfg.queue().to_owned());
                let started = tokio::select! {
                    _ = self.closed.cancelled() => return Ok(None),
                    _ = generation.retired.cancelled() => continue,
                    started = detached(async move {
                        match &g.consumer {
                            Some(slot) => slot.resume(&queue).await,
                            None => Ok(()),
                        }
                    }) => started,
                };
                match started {
                    Ok(()) => {}
                    // Closed or replaced while it started.
                    Err(_) if self.closed.is_cancelled() => return Ok(None),
                    Err(_) if generation.retired.is_cancelled() => continue,
                    Err(e) => return Err(e),
                }
                debug!(queue = self.cfg.queue(), "consumer started");
            }
            let mut consumer = tokio::select! {
                _ = self.closed.cancelled() => return Ok(None),
                _ = generation.retired.cancelled() => continue,
                c = slot.consumer.lock() => c,
            };
            let read_ahead = slot.backlog.lock().ok().and_then(|mut b| b.pop_front());
            let item = match (read_ahead, consumer.as_mut()) {
                (Some(d), _) => Some(Ok(d)),
                // Paused again since it was started: start it again.
                (None, None) => continue,
                (None, Some(running)) => tokio::select! {
                    _ = self.closed.cancelled() => return Ok(None),
                    _ = generation.retired.cancelled() => continue,
                    item = running.next() => item,
                },
            };
            drop(consumer);
            let reason = match item {
                Some(Ok(d)) => {
                    if d.acker.poisoned() {
                        // Prefetched on a channel that was lost since: it
                        // cannot be settled and comes back from the broker.
                        debug!(
                            tag = d.delivery_tag,
                            "skipping a delivery of a lost channel"
                        );
                        continue;
                    }
                    if let Some(acks) = &generation.acks
                        && let Some(skipped) = acks.opened(d.delivery_tag)
                    {
                        // Delivered to this channel and never handed out: a
                        // consumer nobody reads. Multiple acks stop short of
                        // them, and the rebuild gives them back.
                        warn!(generation = generation.id, tags = ?skipped,
                            "deliveries of the consumer channel were never handed out; rebuilding");
                        generation.mark_broken(format!(
                            "deliveries {skipped:?} of the consumer channel were never handed out"
                        ));
                    }
                    let batched = generation.acks.is_some();
                    return Ok(Some(self.to_delivery(d, generation.id, batched)));
                }
                Some(Err(e)) => {
                    if is_parse_error(&e) {
                        generation.note_parse_error(&e);
                    }
                    format!("the consumer failed: {e}")
                }
                None => "the broker cancelled the consumer (queue deleted?)".to_owned(),
            };
            warn!(generation = generation.id, queue = self.cfg.queue(), %reason,
                "RabbitMQ consumer stopped; rebuilding");
            generation.mark_broken(reason);
            tokio::select! {
                _ = self.closed.cancelled() => return Ok(None),
                _ = generation.retired.cancelled() => {}
            }
        }
    }

    /// Takes one message of `queue` with `basic.get`, unacked.
    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, Error> {
        const OP: &str = "next_dead_letter";
        let queue_name = short_string("queue name", queue)?;
        let deadline = Instant::now() + self.cfg.publish_timeout();
        loop {
            let Some(generation) = self.wait_generation(Some(deadline), OP).await? else {
                return Err(Error::Closed { backend: BACKEND });
            };
            let mut getter = generation.getter.lock().await;
            let channel = match getter.as_ref() {
                Some(ch) if ch.status().connected() || ch.status().reconnecting() => ch.clone(),
                _ => match tokio::select! {
                    r = timeout_at(deadline, generation.conn.create_channel()) => r,
                    _ = generation.retired.cancelled() => continue,
                } {
                    Err(_) => return Err(self.timeout(OP)),
                    Ok(Ok(ch)) => {
                        *getter = Some(ch.clone());
                        ch
                    }
                    Ok(Err(e)) if is_connection_error(&e) => {
                        drop(getter);
                        self.pause_after(&generation, None, e, deadline, OP).await?;
                        continue;
                    }
                    Ok(Err(e)) => return Err(map(OP, e)),
                },
            };
            let got = tokio::select! {
                got = timeout_at(
                    deadline,
                    channel.basic_get(queue_name.clone(), BasicGetOptions { no_ack: false }),
                ) => got,
                _ = generation.retired.cancelled() => continue,
            };
            match got {
                Err(_) => return Err(self.timeout(OP)),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(message))) => {
                    return Ok(Some(self.to_delivery(
                        message.delivery,
                        generation.id,
                        false,
                    )));
                }
                Ok(Err(e)) => {
                    *getter = None;
                    drop(getter);
                    if !is_connection_error(&e) {
                        return Err(map(OP, e));
                    }
                    self.pause_after(&generation, Some(channel), e, deadline, OP)
                        .await?;
                }
            }
        }
    }

    fn to_delivery(&self, d: LapinDelivery, generation: u64, batched: bool) -> Delivery {
        let properties = d.properties;
        let headers = properties
            .headers()
            .as_ref()
            .map(from_field_table)
            .unwrap_or_default();
        let broker_death = properties.headers().as_ref().and_then(broker_death);
        let delivery_count = match self.cfg.queue_type() {
            QueueType::Quorum => Some(
                headers
                    .get(DELIVERY_COUNT)
                    .and_then(idemq::HeaderValue::as_i64)
                    .and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(0),
            ),
            QueueType::Classic => None,
        };
        let mut delivery = Delivery::new(d.delivery_tag, Bytes::from(d.data));
        delivery.message_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        delivery.headers = headers;
        delivery.redelivered = d.redelivered;
        delivery.delivery_count = delivery_count;
        delivery.broker_death = broker_death;
        delivery.with_handle(Handle {
            link: self.link_id,
            generation,
            acker: d.acker,
            properties,
            batched,
        })
    }

    /// The delivery's handle, checked to come from this link and the
    /// current generation.
    pub fn handle<'d>(&self, delivery: &'d Delivery) -> Result<&'d Handle, Error> {
        self.handle_and_generation(delivery).map(|(h, _)| h)
    }

    fn handle_and_generation<'d>(
        &self,
        delivery: &'d Delivery,
    ) -> Result<(&'d Handle, Arc<Generation>), Error> {
        let Some(handle) = delivery.handle::<Handle>() else {
            return Err(Error::invalid(
                "delivery",
                "it was not delivered by a RabbitMQ broker",
            ));
        };
        if handle.link != self.link_id {
            return Err(Error::invalid(
                "delivery",
                "it was delivered by another RabbitMQ broker instance",
            ));
        }
        let current = self.current.borrow().clone();
        match current {
            Some(g) if g.id == handle.generation && handle.acker.usable() => Ok((handle, g)),
            current => {
                debug!(
                    tag = delivery.tag,
                    generation = handle.generation,
                    current = ?current.map(|g| g.id),
                    "settling a stale delivery"
                );
                Err(stale(delivery))
            }
        }
    }

    /// Acks or nacks through lapin's acker.
    pub async fn settle(
        &self,
        delivery: &Delivery,
        how: Settlement,
        op: &'static str,
    ) -> Result<(), Error> {
        let (handle, generation) = self.handle_and_generation(delivery)?;
        let batcher = generation.acks.as_ref().filter(|_| handle.batched);
        let send = async {
            match (how, batcher) {
                (Settlement::Ack, Some(acks)) => {
                    // Held, or sent with others; see `acks`.
                    acks.ack(delivery.tag, handle.acker.clone()).await
                }
                (Settlement::Ack, None) => handle.acker.ack(BasicAckOptions::default()).await,
                (Settlement::Nack { .. }, Some(acks)) if !acks.is_open(delivery.tag) => Ok(false),
                (Settlement::Nack { requeue }, _) => {
                    let sent = handle
                        .acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue,
                        })
                        .await;
                    // Only now may a multiple ack pass this tag.
                    if let Some(acks) = batcher {
                        acks.closed(delivery.tag).await;
                    }
                    sent
                }
            }
        };
        // lapin resolves an ack once its frame is written; on a connection
        // that is being replaced (or whose I/O loop stalled) that may be
        // never, so the wait is bounded.
        let result = tokio::select! {
            r = timeout(self.cfg.publish_timeout(), send) => match r {
                Ok(r) => r,
                Err(_) if generation.usable() => return Err(self.timeout(op)),
                Err(_) => return Err(stale(delivery)),
            },
            _ = generation.retired.cancelled() => return Err(stale(delivery)),
        };
        match result {
            Ok(true) => Ok(()),
            // Used already, or poisoned by a channel loss (lapin recovery).
            Ok(false) => Err(stale(delivery)),
            Err(e) if handle.acker.poisoned() || is_connection_error(&e) => Err(stale(delivery)),
            Err(e) => Err(map(op, e)),
        }
    }
}

/// Whether the server's port takes a TCP connection, before lapin tries:
/// lapin retries a refused first connection with its recovery backoff (in
/// a thread of its own that outlives an abandoned attempt), so a refused
/// port would otherwise be a connect timeout, not "connection refused".
async fn reachable(uri: &AMQPUri, cfg: &RabbitConfig) -> Result<(), Error> {
    let host = uri.authority.host.as_str();
    let port = uri.authority.port;
    let after = cfg.connect_timeout();
    match timeout(after, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_probe)) => Ok(()),
        Ok(Err(e)) => Err(Error::Unavailable {
            backend: BACKEND,
            op: "connect",
            source: format!("{}: {e}", cfg.redacted_url()).into(),
        }),
        Err(_) => Err(Error::Timeout {
            backend: BACKEND,
            op: "connect",
            after,
        }),
    }
}

fn stale(delivery: &Delivery) -> Error {
    Error::StaleDelivery {
        backend: BACKEND,
        tag: delivery.tag,
    }
}

pub(crate) fn confirmed(confirmation: Confirmation, queue: &str) -> Result<(), Error> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(Error::Unroutable {
            backend: BACKEND,
            target: queue.to_owned(),
        }),
        // NotRequested cannot happen on a confirm channel; never call it success.
        Confirmation::Nack(None) | Confirmation::NotRequested => Err(Error::NotConfirmed {
            backend: BACKEND,
            target: queue.to_owned(),
        }),
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

fn consumer_tag(queue: &str) -> ShortString {
    let mut short = String::new();
    for c in queue.chars() {
        if short.len() + c.len_utf8() > 200 {
            break;
        }
        short.push(c);
    }
    let tag = format!("idemq-{short}-{:016x}", rand::random::<u64>());
    ShortString::try_new(tag).unwrap_or_default()
}

/// True for lapin's error for bytes it cannot parse (a message with a
/// short string that is not UTF-8, say). lapin never recovers from it.
fn is_parse_error(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ParsingError(_))
}

/// True when `e` was caused by lapin's [`is_parse_error`].
fn caused_by_parse_error(e: &Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<lapin::Error>()
            .is_some_and(is_parse_error)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// The first error event of a connection; `None` when the stream ends.
async fn first_error(events: &mut Events) -> Option<lapin::Error> {
    while let Some(event) = events.next().await {
        if let Event::Error(e) = event {
            return Some(e);
        }
    }
    None
}

/// A build that failed on lapin's parse error.
fn parse_failure(e: lapin::Error) -> Error {
    Error::Backend {
        backend: BACKEND,
        op: "consume",
        transient: true,
        source: Box::new(e),
    }
}

/// Why [`Link::connect`] gave up on a work queue whose messages lapin
/// cannot parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "queue `{queue}` holds a message whose AMQP properties lapin cannot parse, and idemq \
     could not move it to `{dead_letter_queue}` (see the ERROR logged before): {cause}"
)]
struct Blocked {
    queue: String,
    dead_letter_queue: String,
    #[source]
    cause: Error,
}

fn blocked(cfg: &RabbitConfig, cause: Error) -> Error {
    Error::Backend {
        backend: BACKEND,
        op: "connect",
        transient: true,
        source: Box::new(Blocked {
            queue: cfg.queue().to_owned(),
            dead_letter_queue: cfg.dead_letter_queue(),
            cause,
        }),
    }
}

enum Ending {
    Closing,
    Lost(String),
}

/// Where lapin's recovery of a connection stands, as the supervisor polls
/// it ([`RecoveryWatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    Up,
    /// Lost; lapin waits out a backoff step before it reconnects.
    Reconnecting,
    /// lapin is making a reconnection attempt.
    Connecting,
    /// Closing, closed or failed: not lapin's recovery any more.
    Other,
}

impl ConnState {
    fn of(conn: &Connection) -> ConnState {
        let s = conn.status();
        if s.connected() {
            ConnState::Up
        } else if s.reconnecting() {
            ConnState::Reconnecting
        } else if s.connecting() {
            ConnState::Connecting
        } else {
            ConnState::Other
        }
    }
}

/// What [`RecoveryWatch::observe`] concludes.
#[derive(Debug, PartialEq, Eq)]
enum RecoveryVerdict {
    /// Up, or not lapin's recovery (closing, failed: seen elsewhere).
    Quiet,
    /// The connection was just found lost; lapin is recovering it.
    Lost,
    /// lapin is recovering it, within bounds.
    Recovering,
    /// lapin's recovery will not finish: rebuild (the reason).
    GiveUp(String),
}

/// Tells a lapin recovery under way from one that will never finish.
///
/// lapin 4.12.3 can stall at the very start of a recovery: when a write
/// fails (a broken pipe, a reset) after frames were serialized, its I/O
/// loop goes on waiting to write them to the dead socket. It only clears
/// them once that loop ends, and the loop does not end while they are
/// there (`IoLoop::should_continue` in its `io_loop.rs`), so it never
/// reconnects: the connection stays `Reconnecting` for good, with no error
/// event. (The same happens when a command it waits for is dropped without
/// waking it: `InternalRPC::run` skips its wake-up for a channel already
/// lost.) A recovery that is on its way leaves `Reconnecting` after
/// lapin's first backoff step, at most twice `min_delay` with its jitter;
/// still `Reconnecting` after that (plus [`STALL_SLACK`]), without having
/// made an attempt, it has stalled.
///
/// A reconnection attempt can hang too: some of lapin's hang in the AMQP
/// handshake until the server gives up on it (RabbitMQ, after 10 s), and
/// its TCP connect has no timeout. One still `Connecting` after
/// [`ATTEMPT_HANG`] is given up on. Every recovery is also bounded by
/// `max_recovery_time`, whatever its state.
#[derive(Debug)]
struct RecoveryWatch {
    /// When lapin must have made its first attempt.
    first_attempt_within: Duration,
    max_recovery: Duration,
    /// When the connection was found lost.
    lost_at: Option<Instant>,
    /// lapin made a reconnection attempt since.
    attempted: bool,
    /// Since when lapin is `Connecting`, without a break seen.
    connecting_since: Option<Instant>,
}

impl RecoveryWatch {
    fn new(min_delay: Duration, max_recovery: Duration) -> RecoveryWatch {
        RecoveryWatch {
            first_attempt_within: min_delay.saturating_mul(2).saturating_add(STALL_SLACK),
            max_recovery,
            lost_at: None,
            attempted: false,
            connecting_since: None,
        }
    }

    /// lapin reported the connection up again (its `Connected` event): a
    /// later loss is a new recovery, even when no poll saw it up.
    fn connected(&mut self) {
        self.lost_at = None;
        self.attempted = false;
        self.connecting_since = None;
    }

    fn observe(&mut self, state: ConnState, now: Instant) -> RecoveryVerdict {
        match state {
            ConnState::Up | ConnState::Other => {
                self.connected();
                return RecoveryVerdict::Quiet;
            }
            ConnState::Connecting => {
                self.attempted = true;
                let since = *self.connecting_since.get_or_insert(now);
                let hung = now.saturating_duration_since(since);
                if hung > ATTEMPT_HANG {
                    return RecoveryVerdict::GiveUp(format!(
                        "a reconnection attempt of lapin's hung for {hung:?}"
                    ));
                }
            }
            ConnState::Reconnecting => self.connecting_since = None,
        }
        let Some(lost_at) = self.lost_at else {
            self.lost_at = Some(now);
            return RecoveryVerdict::Lost;
        };
        let spent = now.saturating_duration_since(lost_at);
        if !self.attempted && spent > self.first_attempt_within {
            return RecoveryVerdict::GiveUp(format!(
                "lapin's recovery stalled: no reconnection attempt after {spent:?}"
            ));
        }
        if spent > self.max_recovery {
            return RecoveryVerdict::GiveUp(format!(
                "lapin's recovery did not finish within {:?}",
                self.max_recovery
            ));
        }
        RecoveryVerdict::Recovering
    }
}

/// Watches the current generation until it must be replaced.
async fn watch_generation(shared: &Shared, generation: &Generation, events: &mut Events) -> Ending {
    let url = shared.cfg.redacted_url();
    let rec = shared.cfg.recovery();
    let mut tick = tokio::time::interval(rec.health_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(RECOVERY_POLL.min(rec.health_check));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut recovery = RecoveryWatch::new(rec.min_delay, rec.max_recovery_time);
    // The consumer failed (see `Shared::next`): rebuild once lapin's
    // recovery under way, if any, has finished or given up.
    let mut broken = false;
    loop {
        tokio::select! {
            _ = shared.closed.cancelled() => return Ending::Closing,
            _ = generation.broken.cancelled(), if !broken => broken = true,
            event = events.next() => match event {
                Some(Event::Connected) => {
                    recovery.connected();
                    info!(%url, generation = generation.id, "RabbitMQ connection recovered by lapin");
                }
                Some(Event::Error(e)) => {
                    generation.error_event_seen.store(true, Ordering::SeqCst);
                    if is_parse_error(&e) {
                        generation.note_parse_error(&e);
                        return Ending::Lost(format!("lapin could not parse a frame from RabbitMQ: {e}"));
                    }
                    if generation.conn_dead() {
                        return Ending::Lost(format!("lapin recovery gave up: {e}"));
                    }
                    warn!(%url, generation = generation.id, error = %e, "RabbitMQ reported an error");
                }
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(%url, %reason, "RabbitMQ blocked the connection (resource alarm)");
                }
                Some(Event::ConnectionUnblocked) => info!(%url, "RabbitMQ unblocked the connection"),
                Some(_) => {}
                None => return Ending::Lost("lapin's event stream ended".into()),
            },
            _ = poll.tick() => {
                match recovery.observe(ConnState::of(&generation.conn), Instant::now()) {
                    RecoveryVerdict::Lost => {
                        warn!(%url, generation = generation.id, "RabbitMQ connection lost; lapin is recovering it");
                    }
                    RecoveryVerdict::GiveUp(reason) => return Ending::Lost(reason),
                    RecoveryVerdict::Quiet | RecoveryVerdict::Recovering => {}
                }
                if broken && !generation.recovering() {
                    let reason = generation
                        .broken_reason
                        .lock()
                        .ok()
                        .and_then(|r| r.clone())
                        .unwrap_or_default();
                    return Ending::Lost(reason);
                }
            }
            _ = tick.tick() => {
                if generation.conn_dead() {
                    return Ending::Lost("the connection is closed".into());
                }
                if generation.conn.status().connected()
                    && let Some(slot) = generation.consumer.as_ref()
                {
                    let s = slot.channel.status();
                    if !(s.connected() || s.initializing()) {
                        return Ending::Lost("the consumer channel is closed".into());
                    }
                }
            }
        }
    }
}

/// The supervisor: replaces lost generations until the link is closed.
async fn supervise(shared: Arc<Shared>, mut generation: Arc<Generation>, mut events: Events) {
    let url = shared.cfg.redacted_url();
    let rec = shared.cfg.recovery().clone();
    loop {
        let ending = watch_generation(&shared, &generation, &mut events).await;
        shared.current.send_replace(None);
        generation.retired.cancel();
        match ending {
            Ending::Closing => {
                // A connection lapin is recovering is not waited for: the
                // reaper closes it should it come back.
                generation.close(CLOSE_TIMEOUT).await;
                reap(generation.clone());
                info!(%url, generation = generation.id, "RabbitMQ connection closed");
                return;
            }
            Ending::Lost(reason) => {
                warn!(%url, generation = generation.id, %reason,
                    "RabbitMQ connection lost for good; rebuilding connection, topology and consumer");
                generation.close(CLOSE_TIMEOUT).await;
                reap(generation.clone());
            }
        }
        // A parse error the watch did not see may still be queued, or
        // about to be (lapin marks the connection errored first).
        let mut error_seen = generation.error_event_seen.load(Ordering::SeqCst);
        while let Some(Some(event)) = events.next().now_or_never() {
            if let Event::Error(e) = &event {
                error_seen = true;
                if is_parse_error(e) {
                    generation.note_parse_error(e);
                }
            }
        }
        if !error_seen && generation.parse_error().is_none() && generation.conn.status().errored() {
            let waited = tokio::select! {
                _ = shared.closed.cancelled() => return,
                waited = timeout(ERROR_EVENT_WAIT, first_error(&mut events)) => waited,
            };
            if let Ok(Some(e)) = waited
                && is_parse_error(&e)
            {
                generation.note_parse_error(&e);
            }
        }
        let mut malformed = generation.parse_error();
        let mut failures: u32 = 0;
        loop {
            if let Some(cause) = malformed.take() {
                warn!(%url, queue = shared.cfg.queue(), %cause,
                    "lapin could not parse a message from RabbitMQ; moving the work queue's \
                     unparseable messages to the dead-letter queue before rebuilding");
                if let Quarantined::Moved(_) = shared.quarantine().await {
                    // Build again at once.
                    failures = 0;
                } else {
                    failures = failures.saturating_add(1);
                    let delay = idemq::Backoff::new(rec.rebuild_min_delay, rec.rebuild_max_delay)
                        .delay(failures);
                    tokio::select! {
                        _ = shared.closed.cancelled() => return,
                        _ = sleep(delay) => {}
                    }
                }
            }
            let built = tokio::select! {
                _ = shared.closed.cancelled() => return,
                built = shared.build() => built,
            };
            match built {
                Ok((next, next_events)) => {
                    info!(%url, generation = next.id, "RabbitMQ connection rebuilt");
                    generation = next;
                    events = next_events;
                    shared.current.send_replace(Some(generation.clone()));
                    break;
                }
                Err(e) => {
                    if caused_by_parse_error(&e) && shared.consume {
                        // Quarantine first; it decides on the delay.
                        malformed = Some(e.to_string());
                        continue;
                    }
                    failures = failures.saturating_add(1);
                    let delay = idemq::Backoff::new(rec.rebuild_min_delay, rec.rebuild_max_delay)
                        .delay(failures);
                    warn!(%url, error = %e, attempt = failures, ?delay,
                        "rebuilding the RabbitMQ connection failed; retrying");
                    tokio::select! {
                        _ = shared.closed.cancelled() => return,
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Watches an abandoned connection that lapin may still recover: should
/// the recovery ever complete, it would bring back a consumer nobody reads
/// (holding prefetched messages), so it is closed as soon as it is up.
/// Nothing to watch when it is closed or failed for good.
fn reap(generation: Arc<Generation>) {
    const REAP_FOR: Duration = Duration::from_secs(3600);
    if generation.conn_finished() {
        return;
    }
    debug!(
        generation = generation.id,
        "watching an abandoned RabbitMQ connection"
    );
    tokio::spawn(async move {
        let until = Instant::now() + REAP_FOR;
        while Instant::now() < until && !generation.conn_finished() {
            if generation.conn.status().connected() {
                warn!(
                    generation = generation.id,
                    "an abandoned RabbitMQ connection was recovered by lapin; closing it"
                );
                generation.close(CLOSE_TIMEOUT).await;
                if generation.conn_finished() {
                    return;
                }
            }
            sleep(Duration::from_secs(1)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_tags_are_short_strings() {
        let tag = consumer_tag(&"é".repeat(300));
        assert!(tag.as_str().starts_with("idemq-"));
        assert!(tag.as_str().len() <= 255);
    }

    /// A consumer on the consumer channel that nobody reads (as lapin's
    /// recovery can leave one) takes every other delivery: its messages
    /// must come back, not sit unacked until the connection ends. The
    /// skipped tags mark the generation broken, and the rebuild returns
    /// them to the queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_to_a_consumer_nobody_reads_come_back() {
        use idemq::{Broker, OutgoingMessage};
        const N: usize = 40;
        let url = std::env::var(crate::URL_ENV).unwrap_or_else(|_| crate::DEFAULT_URL.to_owned());
        let queue = format!("idemq-test.{}", idemq::testing::unique_scope("orphan"));
        let cfg = RabbitConfig::new(url, queue.clone()).with_prefetch(4);
        let broker = match crate::RabbitBroker::connect(cfg.clone()).await {
            Ok(b) => b,
            Err(e) => return idemq::testing::service_unavailable("rabbitmq", e).unwrap_or(()),
        };
        for i in 0..N {
            broker
                .publish(OutgoingMessage::new("m").with_message_id(format!("m-{i}")))
                .await
                .expect("publish");
        }
        let first = broker.next().await.expect("next").expect("open");
        let mut handed_out = std::collections::HashSet::from([first.message_id.clone()]);
        broker.ack(&first).await.expect("ack");
        let generation = broker
            .link()
            .shared
            .current
            .borrow()
            .clone()
            .expect("generation");
        let channel = &generation.consumer.as_ref().expect("consumer").channel;
        let _unread = channel
            .basic_consume(
                short_string("queue", &queue).expect("queue"),
                "nobody-reads".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("a second consumer");
        let deadline = Instant::now() + Duration::from_secs(30);
        while handed_out.len() < N && Instant::now() < deadline {
            let Ok(next) = timeout_at(deadline, broker.next()).await else {
                break;
            };
            let d = next.expect("next").expect("open");
            handed_out.insert(d.message_id.clone());
            // A delivery of the replaced generation is stale: it comes back.
            let _ = broker.ack(&d).await;
        }
        assert_eq!(handed_out.len(), N, "messages held by the unread consumer");
        assert!(
            generation.retired.is_cancelled(),
            "the generation was replaced"
        );
        broker.close().await;
        crate::delete_topology(&cfg).await.expect("delete");
    }

    #[tokio::test]
    async fn quarantine_over_tls_fails_fast_and_says_so_once() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let cfg = RabbitConfig::new("amqps://guest:guest@127.0.0.1:1/%2f", "q");
        let uri = cfg.validate().expect("uri");
        let shared = Shared {
            cfg,
            uri,
            consume: true,
            link_id: 1,
            current: watch::channel(None).0,
            closed: CancellationToken::new(),
            next_generation: AtomicU64::new(0),
            prefetch: AtomicU16::new(1),
            quarantine_failed_before: AtomicBool::new(false),
        };
        let started = Instant::now();
        assert_eq!(shared.quarantine().await, Quarantined::Failed);
        assert!(shared.quarantine_failed_before.load(Ordering::SeqCst));
        assert_eq!(shared.quarantine().await, Quarantined::Failed);
        assert!(started.elapsed() < Duration::from_secs(1));
        let e = blocked(&shared.cfg, Error::Closed { backend: BACKEND });
        assert!(!caused_by_parse_error(&e));
        let text = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(text.contains("`q`") && text.contains("`q.dlq`"), "{text}");
    }

    fn watch() -> (RecoveryWatch, Instant) {
        // First attempt due within 2 x 200 ms + STALL_SLACK = 1.4 s.
        let w = RecoveryWatch::new(Duration::from_millis(200), Duration::from_secs(15));
        (w, Instant::now())
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_recovery_stuck_before_its_first_attempt_is_given_up_early() {
        let (mut w, t0) = watch();
        assert_eq!(w.observe(ConnState::Up, t0), RecoveryVerdict::Quiet);
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 100)),
            RecoveryVerdict::Lost
        );
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 1400)),
            RecoveryVerdict::Recovering
        );
        assert!(matches!(
            w.observe(ConnState::Reconnecting, at(t0, 1600)),
            RecoveryVerdict::GiveUp(r) if r.contains("stalled")
        ));
    }

    #[test]
    fn a_recovery_that_attempts_is_bounded_by_max_recovery_time() {
        let (mut w, t0) = watch();
        assert_eq!(
            w.observe(ConnState::Reconnecting, t0),
            RecoveryVerdict::Lost
        );
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 300)),
            RecoveryVerdict::Recovering
        );
        // Longer backoff steps between later attempts are lapin's right.
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 9_000)),
            RecoveryVerdict::Recovering
        );
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 11_000)),
            RecoveryVerdict::Recovering
        );
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 14_000)),
            RecoveryVerdict::Recovering
        );
        assert!(matches!(
            w.observe(ConnState::Connecting, at(t0, 15_100)),
            RecoveryVerdict::GiveUp(r) if r.contains("within 15s")
        ));
    }

    #[test]
    fn a_reconnection_attempt_that_hangs_is_given_up() {
        let (mut w, t0) = watch();
        assert_eq!(w.observe(ConnState::Connecting, t0), RecoveryVerdict::Lost);
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 5_000)),
            RecoveryVerdict::Recovering
        );
        assert!(matches!(
            w.observe(ConnState::Connecting, at(t0, 5_100)),
            RecoveryVerdict::GiveUp(r) if r.contains("hung")
        ));
    }

    #[test]
    fn every_loss_is_a_new_recovery() {
        let (mut w, t0) = watch();
        w.observe(ConnState::Reconnecting, t0);
        w.observe(ConnState::Connecting, at(t0, 300));
        // Back up (seen, or only reported by lapin's event), then lost again.
        w.connected();
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 10_000)),
            RecoveryVerdict::Lost
        );
        assert!(matches!(
            w.observe(ConnState::Reconnecting, at(t0, 11_500)),
            RecoveryVerdict::GiveUp(_)
        ));
        assert_eq!(
            w.observe(ConnState::Up, at(t0, 12_000)),
            RecoveryVerdict::Quiet
        );
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 20_000)),
            RecoveryVerdict::Lost
        );
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 25_000)),
            RecoveryVerdict::Recovering
        );
        assert_eq!(
            w.observe(ConnState::Other, at(t0, 40_000)),
            RecoveryVerdict::Quiet
        );
    }

    #[test]
    fn confirmations_map_to_errors() {
        assert!(confirmed(Confirmation::Ack(None), "q").is_ok());
        assert!(matches!(
            confirmed(Confirmation::Nack(None), "q"),
            Err(Error::NotConfirmed { .. })
        ));
        assert!(matches!(
            confirmed(Confirmation::NotRequested, "q"),
            Err(Error::NotConfirmed { .. })
        ));
    }
}
