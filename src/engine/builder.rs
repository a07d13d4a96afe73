//! [`EngineBuilder`]: the engine's settings, with the defaults of the design.

use std::time::Duration;

use crate::engine::Engine;
use crate::error::Error;
use crate::key::{KeyStrategy, check_scope};
use crate::policy::{Backoff, OnDead};
use crate::{Broker, DedupStore, Handler};

/// The engine's settings. Built with [`Engine::builder`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub(crate) scope: String,
    pub(crate) concurrency: usize,
    pub(crate) lease: Duration,
    pub(crate) keep_for: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) retry_backoff: Backoff,
    pub(crate) failure_backoff: Backoff,
    pub(crate) min_defer: Duration,
    pub(crate) max_defer: Duration,
    pub(crate) on_dead: OnDead,
    pub(crate) key: KeyStrategy,
    pub(crate) shutdown_grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            scope: "default".into(),
            concurrency: 16,
            lease: Duration::from_secs(300),
            keep_for: Duration::from_secs(24 * 3600),
            max_attempts: 5,
            retry_backoff: Backoff::default(),
            failure_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            min_defer: Duration::from_millis(100),
            max_defer: Duration::from_secs(60),
            on_dead: OnDead::Ack,
            key: KeyStrategy::default(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl EngineConfig {
    /// The dedup scope (one per logical consumer).
    pub fn scope(&self) -> &str {
        &self.scope
    }
    /// Deliveries in flight at most.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }
    /// The claim lease.
    pub fn lease(&self) -> Duration {
        self.lease
    }
    /// How long done (and dead) records are kept.
    pub fn keep_for(&self) -> Duration {
        self.keep_for
    }
    /// Handler runs allowed per key.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
    /// The pause after the store or the broker failed
    /// ([`EngineBuilder::failure_backoff`]).
    pub fn failure_backoff(&self) -> Backoff {
        self.failure_backoff
    }
}

/// Builds an [`Engine`]. Every setting has the design's default.
#[derive(Debug)]
pub struct EngineBuilder<B, S, H> {
    broker: B,
    store: S,
    handler: H,
    config: EngineConfig,
}

impl<B: Broker, S: DedupStore, H: Handler> EngineBuilder<B, S, H> {
    pub(crate) fn new(broker: B, store: S, handler: H) -> Self {
        EngineBuilder {
            broker,
            store,
            handler,
            config: EngineConfig::default(),
        }
    }

    /// The dedup scope: keys of one scope never meet keys of another. Give
    /// each logical consumer (queue + handler) its own. 1 to 64 bytes of
    /// `A-Z a-z 0-9 - _ .`. Default `"default"`.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.config.scope = scope.into();
        self
    }

    /// Deliveries in flight at once. Default 16. Before its first delivery
    /// the engine tells the broker ([`Broker::prepare`]); a broker whose
    /// limit was not set explicitly sizes it (RabbitMQ: a prefetch of twice
    /// this), and one set lower is warned about at start.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// How long a claim is exclusive; renewed every third of it while the
    /// handler runs. Default 300 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// The dedup window: how long a done record (and a dead one, and the
    /// attempt count of a lapsed claim) is kept. Default 24 h.
    pub fn keep_for(mut self, keep_for: Duration) -> Self {
        self.config.keep_for = keep_for;
        self
    }

    /// Handler runs allowed per key before the message is dead-lettered
    /// (reason `max-attempts`). Default 5.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.max_attempts = n;
        self
    }

    /// Delay before retrying a failed attempt. Default 1 s doubling to
    /// 5 min, with jitter.
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.config.retry_backoff = backoff;
        self
    }

    /// Pause after the dedup store or the broker failed transiently: while
    /// the store is unreachable no delivery is taken and none is handled;
    /// a failed receive, dead-lettering or retry scheduling waits as long
    /// before its next try. Default 100 ms doubling to 10 s, with jitter.
    pub fn failure_backoff(mut self, backoff: Backoff) -> Self {
        self.config.failure_backoff = backoff;
        self
    }

    /// Bounds on the delay of a delivery deferred because another consumer
    /// holds its key: `min` the first time, doubling with each deferral,
    /// never past the other lease's lapse, never above `max`. Default
    /// 100 ms to 60 s.
    pub fn defer_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.config.min_defer = min;
        self.config.max_defer = max;
        self
    }

    /// What to do with copies of dead messages. Default [`OnDead::Ack`].
    pub fn on_dead(mut self, on_dead: OnDead) -> Self {
        self.config.on_dead = on_dead;
        self
    }

    /// Where keys come from. Default: the `message_id` property only.
    pub fn key_strategy(mut self, key: KeyStrategy) -> Self {
        self.config.key = key;
        self
    }

    /// How long in-flight handlers (and their settlements) may run on after
    /// shutdown is asked for; the claims of those still running then are
    /// released, within [`crate::engine::RELEASE_BOUND`] more. So
    /// [`Engine::run`] returns at most this plus that bound after shutdown,
    /// whatever the store and the broker do. Default 30 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Checks the settings and builds the engine.
    pub fn build(self) -> Result<Engine<B, S, H>, Error> {
        let c = &self.config;
        check_scope(&c.scope)?;
        if c.concurrency == 0 {
            return Err(Error::Config("concurrency must be at least 1".into()));
        }
        if c.lease < Duration::from_millis(30) {
            return Err(Error::Config(format!(
                "lease {:?} is too short (at least 30 ms)",
                c.lease
            )));
        }
        if c.keep_for.is_zero() {
            return Err(Error::Config("keep_for must be more than zero".into()));
        }
        if c.max_attempts == 0 {
            return Err(Error::Config("max_attempts must be at least 1".into()));
        }
        if c.min_defer > c.max_defer {
            return Err(Error::Config("defer_bounds: min is above max".into()));
        }
        warn_on_risky_settings(c);
        Ok(Engine::from_parts(
            self.broker,
            self.store,
            self.handler,
            self.config,
        ))
    }
}

/// RabbitMQ's default delivery acknowledgement timeout (`consumer_timeout`):
/// a delivery unacked for longer makes the broker close the channel.
pub const BROKER_ACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long after its first delivery a message may still come back: every
/// retry delay up to the attempt limit (at their longest, without jitter)
/// plus a lapsed lease per attempt (a consumer that died mid-handler).
/// Brokers with delay tiers round each delay up to a tier, which this does
/// not see.
pub(crate) fn redelivery_horizon(c: &EngineConfig) -> Duration {
    let exact = c.retry_backoff.without_jitter();
    (1..c.max_attempts)
        .map(|n| exact.delay(n))
        .fold(Duration::ZERO, Duration::saturating_add)
        .saturating_add(c.lease.saturating_mul(c.max_attempts))
}

/// Warns (once, at build) about settings that work but defeat what the
/// engine promises.
fn warn_on_risky_settings(c: &EngineConfig) {
    let horizon = redelivery_horizon(c);
    if c.keep_for < horizon {
        tracing::warn!(
            keep_for = ?c.keep_for,
            redelivery_horizon = ?horizon,
            "the dedup window (keep_for) is shorter than the longest a message can take to come \
             back (retry delays up to max_attempts plus a lapsed lease per attempt): a duplicate \
             arriving after the window is handled again; raise keep_for"
        );
    }
    if c.lease > BROKER_ACK_TIMEOUT {
        tracing::warn!(
            lease = ?c.lease,
            broker_ack_timeout = ?BROKER_ACK_TIMEOUT,
            "the lease is longer than RabbitMQ's default delivery acknowledgement timeout: a \
             handler that runs that long has its channel closed and its message redelivered \
             while it still holds the lease; shorten the lease or raise consumer_timeout"
        );
    }
}
