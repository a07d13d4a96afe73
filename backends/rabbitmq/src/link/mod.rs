//! The connection and its supervisor.
//!
//! A [`Link`] owns one *generation* at a time: a lapin connection (with
//! lapin's automatic recovery when `RecoveryConfig::auto_recover` asks for
//! it), the consumer channel (topology declared on
//! it, so lapin's recovery redeclares it too), a pool of publisher-confirm
//! channels and a channel for `basic.get`.
//!
//! With recovery on, lapin recovers a broken connection by itself: it reconnects, reopens
//! the channels, replays `confirm.select`, `basic.qos`, the queue
//! declarations and the consumer, and poisons the ackers of every delivery
//! of the old incarnation (an ack on them reports `Ok(false)`). When lapin
//! gives up (its backoff is exhausted: the connection turns `Error` and an
//! [`lapin::Event::Error`] is emitted), or its recovery stalls or takes
//! longer than `max_recovery_time` (see `RecoveryWatch` in
//! [`supervisor`]), or a channel is closed for good, or recovery is
//! disabled, the supervisor task retires the generation and builds a new
//! one with exponential backoff.
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
//! (an [`Event::Error`](lapin::Event::Error), the consumer's stream, the connection turning
//! `Error`; lapin never recovers from it), and the message goes back to the
//! head of the queue, where it would fail every connection after. When a
//! generation ends that way, or a build fails that way, the supervisor (and
//! [`Link::connect`]) first runs the quarantine of [`crate::raw`] on the
//! work queue: it moves such messages to the dead-letter queue, as copies
//! lapin can read (reason `malformed`), and puts the others back.
//!
//! The pieces, one file each: [`generation`] (one connection and its
//! channels, and building it), [`supervisor`] (watching a generation and
//! replacing it), [`consumer`] (the work queue's consumer), [`operations`]
//! (publish, get, settle) and [`quarantine`] (messages lapin cannot parse).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use idemq::Error;
use lapin::uri::AMQPUri;
use tokio::sync::{Mutex, watch};
use tokio::time::timeout;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{error, info, warn};

use crate::config::RabbitConfig;
use crate::errors::BACKEND;

mod consumer;
mod generation;
mod operations;
mod quarantine;
mod supervisor;

pub(crate) use operations::{DELIVERY_COUNT, Handle, Settlement, confirmed};

use generation::Generation;
use quarantine::{Quarantined, blocked, caused_by_parse_error};
use supervisor::supervise;

/// How often a waiter polls a connection that lapin is recovering.
const POLL: Duration = Duration::from_millis(50);

/// How often [`Link::connect`] quarantines and tries again before it gives
/// up on a work queue whose head lapin cannot parse.
const CONNECT_QUARANTINES: u32 = 5;

/// The longest closing takes: writing the held acks and `connection.close`
/// on a connection that is up. One that is down or being recovered is not
/// waited for.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a [`Link`], its supervisor and its callers share: the
/// configuration, the current generation, and whether the link is closed.
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

    /// The current generation's number, `None` while it is being rebuilt.
    pub fn generation(&self) -> Option<u64> {
        self.current.borrow().as_ref().map(|g| g.id)
    }

    /// True when the current connection is up (not recovering, not rebuilding).
    pub fn is_connected(&self) -> bool {
        self.current.borrow().as_ref().is_some_and(|g| g.usable())
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
