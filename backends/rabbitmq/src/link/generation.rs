//! One generation: a lapin connection with its consumer channel (the
//! topology declared on it), its pool of publisher-confirm channels, its
//! `basic.get` channel and its ack batcher; and building one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use idemq::Error;
use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::acks::AckBatcher;
use crate::errors::{BACKEND, map};
use crate::topology::declare_topology;

use super::Shared;
use super::consumer::ConsumerSlot;
use super::quarantine::{caused_by_parse_error, is_parse_error, parse_failure};

/// Idle publisher channels kept per connection.
const MAX_IDLE_CHANNELS: usize = 32;

/// How long a failed build waits for lapin's error event once the
/// connection is marked errored (it follows at once).
pub(super) const ERROR_EVENT_WAIT: Duration = Duration::from_secs(1);

pub(super) type Events = std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>;

pub(crate) struct Generation {
    pub id: u64,
    pub(super) conn: Connection,
    pub(super) consumer: Option<ConsumerSlot>,
    /// The consumer channel's ack batching, when on.
    pub(super) acks: Option<Arc<AckBatcher>>,
    pub(super) getter: Mutex<Option<Channel>>,
    pub(super) pool: StdMutex<Vec<Channel>>,
    pub(super) broken: CancellationToken,
    pub(super) broken_reason: StdMutex<Option<String>>,
    pub(super) retired: CancellationToken,
    /// lapin failed to parse a frame (a message it cannot read), as seen
    /// by the consumer or the event stream, whichever saw it first.
    pub(super) parse_error: StdMutex<Option<String>>,
    /// The watch took an error event off the stream.
    pub(super) error_event_seen: AtomicBool,
}

impl Generation {
    pub(super) fn note_parse_error(&self, e: &lapin::Error) {
        if let Ok(mut p) = self.parse_error.lock()
            && p.is_none()
        {
            *p = Some(e.to_string());
        }
    }

    pub(super) fn parse_error(&self) -> Option<String> {
        self.parse_error.lock().ok().and_then(|p| p.clone())
    }

    pub(super) fn mark_broken(&self, reason: String) {
        if let Ok(mut r) = self.broken_reason.lock()
            && r.is_none()
        {
            *r = Some(reason);
        }
        self.broken.cancel();
    }

    pub(super) fn conn_dead(&self) -> bool {
        let s = self.conn.status();
        s.errored() || s.closed() || s.closing()
    }

    /// Closed or failed for good: lapin will not bring it back. (A
    /// connection whose `connection.close` went unanswered stays
    /// `Closing`, and lapin recovers it should its socket fail then.)
    pub(super) fn conn_finished(&self) -> bool {
        let s = self.conn.status();
        s.errored() || s.closed()
    }

    /// Neither up nor given up: lapin is reconnecting (its state then
    /// alternates between `Reconnecting` and `Connecting`).
    pub(super) fn recovering(&self) -> bool {
        !self.conn.status().connected() && !self.conn_dead()
    }

    pub(super) fn usable(&self) -> bool {
        self.conn.status().connected() && !self.retired.is_cancelled()
    }

    pub(super) async fn checkout(&self) -> lapin::Result<Channel> {
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

    pub(super) fn checkin(&self, ch: Channel) {
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
    /// recovered is left as it is: the caller hands it to [`reap`](super::supervisor::reap), which
    /// closes it should lapin ever bring it back.
    pub(super) async fn close(&self, wait: Duration) {
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

impl Shared {
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

    /// One attempt at a new generation: connection, topology, consumer.
    pub(super) async fn build(&self) -> Result<(Arc<Generation>, Events), Error> {
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
}

/// The first error event of a connection; `None` when the stream ends.
pub(super) async fn first_error(events: &mut Events) -> Option<lapin::Error> {
    while let Some(event) = events.next().await {
        if let Event::Error(e) = event {
            return Some(e);
        }
    }
    None
}
