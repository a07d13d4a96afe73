//! [`RabbitConfig`]: where to connect, which queues to use, and how to
//! behave when the connection breaks.
//!
//! One file, past 600 lines: every setting and its documented default;
//! most of it is doc comments and the tests of validation.

use std::fmt;
use std::time::Duration;

use idemq::Error;
use idemq::error::redact_url;
use lapin::uri::AMQPUri;

/// The URL used when neither the configuration nor `AMQP_ADDR` gives one.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The environment variable [`RabbitConfig::from_env`] reads the URL from.
pub const URL_ENV: &str = "AMQP_ADDR";

/// How long an ack may be held back to go out with others in one
/// `basic.ack(multiple)`; see [`RabbitConfig::with_ack_batching`].
pub const DEFAULT_ACK_DELAY: Duration = Duration::from_millis(20);

/// The default backoff tiers of the retry queues: 100 ms, 1 s, 5 s, 30 s,
/// 2 min, 10 min. The 100 ms tier matches the engine's first deferral of a
/// duplicate that meets its original in flight: without it that deferral
/// rounds up to a second.
pub const DEFAULT_RETRY_TIERS: [Duration; 6] = [
    Duration::from_millis(100),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// The prefetch of a consumer whose prefetch is not set and that no
/// engine sized (see [`RabbitConfig::with_prefetch`]).
pub const DEFAULT_PREFETCH: u16 = 32;

/// The delivery limit of a quorum work queue unless
/// [`RabbitConfig::with_delivery_limit`] says otherwise: how often the
/// broker hands a message out again (after a nack with requeue, a consumer
/// that died, a lost connection) before it dead-letters it to the
/// dead-letter queue itself (reason `delivery_limit`). Far above what the
/// engine needs (its attempts are counted in the dedup store, and a retry
/// is a new message): with the engine's default failure backoff that is over
/// half an hour of store outage before a message is moved aside, never lost.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 200;

/// The delivery limit of a quorum dead-letter queue: high enough that no
/// number of replay dry runs and inspections (each returns what it read)
/// can reach it. (RabbitMQ 4 gives a quorum queue a limit of 20 when none
/// is set, and drops what exceeds it when the queue has nowhere to
/// dead-letter to; a positive limit means the same on 3.x and 4.x.)
pub const DEAD_LETTER_DELIVERY_LIMIT: u32 = 1_000_000;

/// AMQP short strings (queue names, header names, message ids) hold at most
/// this many bytes.
pub(crate) const MAX_SHORT_STRING: usize = 255;

/// The kind of RabbitMQ queue to declare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueType {
    /// A classic durable queue.
    #[default]
    Classic,
    /// A quorum queue (replicated; counts deliveries in `x-delivery-count`,
    /// exposed as [`idemq::Delivery::delivery_count`]).
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// How the connection is kept alive: a full rebuild (connection, channels,
/// topology, consumer) after every loss, or, when `auto_recover` is set,
/// lapin's automatic recovery first and a rebuild once that gives up.
///
/// Defaults: lapin recovery off; rebuilds from 200 ms to 30 s apart; health
/// check every 500 ms. Should lapin recovery be turned on: 8 attempts from
/// 200 ms to 5 s apart, at most 15 s of it.
///
/// ```
/// use std::time::Duration;
/// use idemq_rabbitmq::RecoveryConfig;
///
/// let recovery = RecoveryConfig {
///     attempts: 20,
///     max_recovery_time: Duration::from_secs(60),
///     ..RecoveryConfig::default()
/// };
/// # let _ = recovery;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// Whether lapin's automatic connection recovery is enabled. Without it
    /// (the default) every connection loss goes straight to a rebuild,
    /// which resumes as fast.
    ///
    /// Off by default because lapin 4.12.3's recovery deadlocks on a
    /// channel that was being opened when the link broke (it cancels the
    /// channel's old `channel.open` reply while holding the channel's
    /// status lock, and dropping that reply's channel takes the same lock):
    /// the connection's I/O thread hangs, publishes wait until their
    /// timeout, and closing the connection later blocks a runtime worker
    /// for good. A publish that needs a new channel while the link breaks
    /// is enough.
    pub auto_recover: bool,
    /// How many reconnection attempts lapin makes before it gives up.
    pub attempts: usize,
    /// lapin's first delay between reconnection attempts.
    pub min_delay: Duration,
    /// lapin's longest delay between reconnection attempts.
    pub max_delay: Duration,
    /// How long lapin may spend recovering a connection before the
    /// supervisor gives up on it and rebuilds, whatever the recovery is
    /// doing (a reconnection attempt to an unresponsive host can hang).
    ///
    /// A recovery that has not started to reconnect twice `min_delay` plus
    /// a second after the loss is given up on at once: lapin 4.12.3 can
    /// stall there for good (when a write fails on the lost socket, its
    /// I/O loop goes on waiting to write). So is a reconnection attempt
    /// still under way after 5 s (some of lapin's hang in the handshake).
    pub max_recovery_time: Duration,
    /// The supervisor's first delay between rebuild attempts.
    pub rebuild_min_delay: Duration,
    /// The supervisor's longest delay between rebuild attempts.
    pub rebuild_max_delay: Duration,
    /// How often the supervisor checks that the connection and the consumer
    /// channel are still alive (a safety net besides lapin's events).
    pub health_check: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            auto_recover: false,
            attempts: 8,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_recovery_time: Duration::from_secs(15),
            rebuild_min_delay: Duration::from_millis(200),
            rebuild_max_delay: Duration::from_secs(30),
            health_check: Duration::from_millis(500),
        }
    }
}

/// Everything [`crate::RabbitBroker`] and [`crate::RabbitPublisher`] need.
///
/// Queue names derive from the work queue name `Q`: the retry queues are
/// `Q.retry.<tier>` (`Q.retry.1s`, `Q.retry.2m`, ...) and the dead-letter
/// queue is `Q.dlq`; both prefixes can be overridden.
///
/// `Debug` shows the URL with its password replaced by `***`.
///
/// ```
/// use std::time::Duration;
/// use idemq_rabbitmq::{QueueType, RabbitConfig};
///
/// let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "orders")
///     .with_queue_type(QueueType::Quorum)
///     .with_retry_tiers([Duration::from_secs(1), Duration::from_secs(30)])
///     .with_prefetch(32);
/// assert_eq!(config.retry_queue(Duration::from_secs(30)), "orders.retry.30s");
/// assert_eq!(config.dead_letter_queue(), "orders.dlq");
/// assert!(!format!("{config:?}").contains("guest:guest"));
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    url: String,
    queue: String,
    queue_type: QueueType,
    retry_queue_type: QueueType,
    retry_tiers: Vec<Duration>,
    retry_prefix: Option<String>,
    dead_letter_queue: Option<String>,
    prefetch: Option<u16>,
    delivery_limit: u32,
    ack_delay: Option<Duration>,
    publish_timeout: Duration,
    connect_timeout: Duration,
    heartbeat: Option<u16>,
    connection_name: Option<String>,
    recovery: RecoveryConfig,
}

impl RabbitConfig {
    /// A configuration for the work queue `queue` on the broker at `url`
    /// (`amqp://` or `amqps://`), with the defaults: classic queues, the
    /// [`DEFAULT_RETRY_TIERS`], a prefetch sized by the engine (see
    /// [`RabbitConfig::with_prefetch`]), 30 s publish timeout.
    pub fn new(url: impl Into<String>, queue: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            queue: queue.into(),
            queue_type: QueueType::Classic,
            retry_queue_type: QueueType::Classic,
            retry_tiers: DEFAULT_RETRY_TIERS.to_vec(),
            retry_prefix: None,
            dead_letter_queue: None,
            prefetch: None,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            ack_delay: Some(DEFAULT_ACK_DELAY),
            publish_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
            heartbeat: Some(15),
            connection_name: None,
            recovery: RecoveryConfig::default(),
        }
    }

    /// Like [`RabbitConfig::new`] with the URL taken from `AMQP_ADDR`, or
    /// [`DEFAULT_URL`] when it is not set.
    pub fn from_env(queue: impl Into<String>) -> Self {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned());
        RabbitConfig::new(url, queue)
    }

    /// The type of the work queue and of the dead-letter queue (default
    /// classic).
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// The type of the retry queues (default classic, whose dead-lettering
    /// back to the work queue works on every RabbitMQ version).
    pub fn with_retry_queue_type(mut self, queue_type: QueueType) -> Self {
        self.retry_queue_type = queue_type;
        self
    }

    /// The backoff tiers: one retry queue per tier, whose queue-level TTL
    /// is the tier. Sorted and deduplicated; must not be empty.
    pub fn with_retry_tiers(mut self, tiers: impl IntoIterator<Item = Duration>) -> Self {
        let mut tiers: Vec<Duration> = tiers.into_iter().collect();
        tiers.sort();
        tiers.dedup_by_key(|d| d.as_millis());
        self.retry_tiers = tiers;
        self
    }

    /// The prefix of the retry queues' names (default `Q.retry`): a tier
    /// of 5 s then lives in `<prefix>.5s`.
    pub fn with_retry_queue_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.retry_prefix = Some(prefix.into());
        self
    }

    /// The dead-letter queue's name (default `Q.dlq`).
    pub fn with_dead_letter_queue(mut self, name: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(name.into());
        self
    }

    /// How many unacknowledged deliveries the consumer may hold (AMQP
    /// `basic.qos` prefetch).
    ///
    /// Unset (the default), the engine sizes it: before its first delivery
    /// it asks for twice its concurrency ([`idemq::Broker::prepare`]), so
    /// every handler is kept busy while acks are held for batching (a held
    /// ack still counts against the prefetch); used without the engine it
    /// is [`DEFAULT_PREFETCH`]. Set explicitly, it is kept, and an engine
    /// whose concurrency is higher runs at most this many handlers at once
    /// and says so at start.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// The delivery limit of a quorum work queue (`x-delivery-limit`,
    /// default [`DEFAULT_DELIVERY_LIMIT`]): a message handed out this many
    /// times more without being settled is dead-lettered by the broker
    /// into the dead-letter queue (reason `delivery_limit`, replayable).
    /// Classic queues have no delivery limit.
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit;
        self
    }

    /// Batches the consumer's acks (default: on, [`DEFAULT_ACK_DELAY`]).
    ///
    /// Acks that complete the run of settled deliveries from the oldest
    /// unsettled one go out together as one `basic.ack(multiple)`; an ack
    /// that overtakes an unsettled delivery is held until that one is
    /// settled, for at most `delay` (or until a quarter of the prefetch is
    /// held), then sent alone. Nacks and rejects are never held. This
    /// cuts the ack frames lapin writes and RabbitMQ parses by an order of
    /// magnitude when deliveries are settled nearly in order.
    ///
    /// The cost: an ack is confirmed to the caller when it is held, so a
    /// connection lost within `delay` redelivers those messages, and the
    /// dedup store answers the copies as duplicates. `None` sends every ack
    /// alone, at once.
    pub fn with_ack_batching(mut self, delay: Option<Duration>) -> Self {
        self.ack_delay = delay.filter(|d| !d.is_zero());
        self
    }

    /// How long a publish (including `retry_later` and `dead_letter`
    /// copies) may take, waiting for a connection and the broker's confirm.
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long one connection attempt (connect, topology, consumer) may take.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The heartbeat asked of the server, in seconds, unless the URL sets
    /// `?heartbeat=`. `None` leaves it to the server. Default 15 s.
    pub fn with_heartbeat(mut self, seconds: Option<u16>) -> Self {
        self.heartbeat = seconds;
        self
    }

    /// The connection name shown in the management UI (default
    /// `idemq:<queue>`).
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// How connection loss is handled.
    pub fn with_recovery(mut self, recovery: RecoveryConfig) -> Self {
        self.recovery = recovery;
        self
    }

    /// The URL with its password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The work queue `Q`.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The type of the work queue and the dead-letter queue.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// The type of the retry queues.
    pub fn retry_queue_type(&self) -> QueueType {
        self.retry_queue_type
    }

    /// The backoff tiers, shortest first.
    pub fn retry_tiers(&self) -> &[Duration] {
        &self.retry_tiers
    }

    /// The prefetch the consumer starts with: the one set, else
    /// [`DEFAULT_PREFETCH`] (until the engine sizes it).
    pub fn prefetch(&self) -> u16 {
        self.prefetch.unwrap_or(DEFAULT_PREFETCH)
    }

    /// The prefetch set with [`RabbitConfig::with_prefetch`], if any.
    pub fn explicit_prefetch(&self) -> Option<u16> {
        self.prefetch
    }

    /// The delivery limit of a quorum work queue.
    pub fn delivery_limit(&self) -> u32 {
        self.delivery_limit
    }

    /// How long an ack may be held for batching; `None`: not batched.
    pub fn ack_delay(&self) -> Option<Duration> {
        self.ack_delay
    }

    /// The publish timeout.
    pub fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The recovery settings.
    pub fn recovery(&self) -> &RecoveryConfig {
        &self.recovery
    }

    /// The dead-letter queue's name.
    pub fn dead_letter_queue(&self) -> String {
        self.dead_letter_queue
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.queue))
    }

    /// The tier a delay goes to: the smallest tier at least as long as
    /// `delay`, or the longest tier when `delay` exceeds them all.
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.retry_tiers
            .iter()
            .copied()
            .find(|tier| *tier >= delay)
            .or_else(|| self.retry_tiers.last().copied())
            .unwrap_or(delay)
    }

    /// The name of the retry queue serving `delay` (see
    /// [`RabbitConfig::tier_for`]).
    pub fn retry_queue(&self, delay: Duration) -> String {
        self.retry_queue_for_tier(self.tier_for(delay))
    }

    /// Every retry queue, with its tier, shortest first.
    pub fn retry_queues(&self) -> Vec<(Duration, String)> {
        self.retry_tiers
            .iter()
            .map(|tier| (*tier, self.retry_queue_for_tier(*tier)))
            .collect()
    }

    /// Every queue of the topology: work queue, retry queues, dead-letter queue.
    pub fn all_queues(&self) -> Vec<String> {
        let mut all = vec![self.queue.clone()];
        all.extend(self.retry_queues().into_iter().map(|(_, name)| name));
        all.push(self.dead_letter_queue());
        all
    }

    fn retry_queue_for_tier(&self, tier: Duration) -> String {
        let prefix = self
            .retry_prefix
            .clone()
            .unwrap_or_else(|| format!("{}.retry", self.queue));
        format!("{prefix}.{}", tier_name(tier))
    }

    pub(crate) fn connection_name(&self) -> String {
        self.connection_name
            .clone()
            .unwrap_or_else(|| format!("idemq:{}", self.queue))
    }

    /// Checks names, tiers and numbers; parses the URL.
    pub(crate) fn validate(&self) -> Result<AMQPUri, Error> {
        let mut uri = parse_url(&self.url)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = self.heartbeat;
        }
        for name in self.all_queues() {
            if name.is_empty() {
                return Err(Error::invalid("queue name", "must not be empty"));
            }
            if name.len() > MAX_SHORT_STRING {
                return Err(Error::invalid(
                    "queue name",
                    format!("`{name}` is longer than {MAX_SHORT_STRING} bytes"),
                ));
            }
            if name.starts_with("amq.") {
                return Err(Error::invalid(
                    "queue name",
                    format!("`{name}`: the `amq.` prefix is reserved by RabbitMQ"),
                ));
            }
        }
        let mut names = self.all_queues();
        names.sort();
        names.dedup();
        if names.len() != self.all_queues().len() {
            return Err(Error::Config(
                "the work, retry and dead-letter queue names must all differ".into(),
            ));
        }
        if self.retry_tiers.is_empty() {
            return Err(Error::Config("at least one retry tier is needed".into()));
        }
        for tier in &self.retry_tiers {
            let ms = tier.as_millis();
            if ms == 0 || ms > u128::from(u32::MAX) {
                return Err(Error::Config(format!(
                    "retry tier {tier:?} must be between 1 ms and {} ms",
                    u32::MAX
                )));
            }
        }
        if self.prefetch == Some(0) {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if self.delivery_limit == 0 {
            return Err(Error::Config(
                "the delivery limit must be at least 1 (0 would dead-letter every message at its first return)".into(),
            ));
        }
        for (what, d) in [
            ("publish timeout", self.publish_timeout),
            ("connect timeout", self.connect_timeout),
            ("health check interval", self.recovery.health_check),
            ("rebuild delay", self.recovery.rebuild_min_delay),
            ("max recovery time", self.recovery.max_recovery_time),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("{what} must not be zero")));
            }
        }
        if self.recovery.min_delay > self.recovery.max_delay
            || self.recovery.rebuild_min_delay > self.recovery.rebuild_max_delay
        {
            return Err(Error::Config(
                "recovery delays: min must not exceed max".into(),
            ));
        }
        Ok(uri)
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("retry_queue_type", &self.retry_queue_type)
            .field("retry_tiers", &self.retry_tiers)
            .field("dead_letter_queue", &self.dead_letter_queue())
            .field("prefetch", &self.prefetch)
            .field("delivery_limit", &self.delivery_limit)
            .field("ack_delay", &self.ack_delay)
            .field("publish_timeout", &self.publish_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("recovery", &self.recovery)
            .finish()
    }
}

/// Parses an `amqp://` / `amqps://` URL; the error never shows the password.
pub(crate) fn parse_url(url: &str) -> Result<AMQPUri, Error> {
    let scheme_ok = url.starts_with("amqp://") || url.starts_with("amqps://");
    if !scheme_ok {
        return Err(Error::invalid(
            "url",
            format!(
                "`{}`: the scheme must be amqp:// or amqps://",
                redact_url(url)
            ),
        ));
    }
    url.parse::<AMQPUri>().map_err(|why| {
        Error::invalid(
            "url",
            format!(
                "`{}`: {}",
                redact_url(url),
                why.replace(url, &redact_url(url))
            ),
        )
    })
}

/// `1s`, `2m`, `1h`, `500ms`: the suffix of a retry queue's name.
pub(crate) fn tier_name(tier: Duration) -> String {
    let ms = tier.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn names_derive_from_the_work_queue() {
        let c = RabbitConfig::new(DEFAULT_URL, "jobs");
        assert_eq!(c.dead_letter_queue(), "jobs.dlq");
        let names: Vec<String> = c.retry_queues().into_iter().map(|(_, n)| n).collect();
        assert_eq!(
            names,
            [
                "jobs.retry.100ms",
                "jobs.retry.1s",
                "jobs.retry.5s",
                "jobs.retry.30s",
                "jobs.retry.2m",
                "jobs.retry.10m"
            ]
        );
        let c = c
            .with_retry_queue_prefix("delay.jobs")
            .with_dead_letter_queue("dead.jobs")
            .with_retry_tiers([Duration::from_millis(500), secs(3600)]);
        assert_eq!(
            c.all_queues(),
            ["jobs", "delay.jobs.500ms", "delay.jobs.1h", "dead.jobs"]
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn tiers_round_up_and_cap() {
        let c = RabbitConfig::new(DEFAULT_URL, "q").with_retry_tiers([secs(30), secs(1), secs(5)]);
        assert_eq!(c.retry_tiers(), [secs(1), secs(5), secs(30)]);
        assert_eq!(c.tier_for(Duration::ZERO), secs(1));
        assert_eq!(c.tier_for(secs(1)), secs(1));
        assert_eq!(c.tier_for(Duration::from_millis(1001)), secs(5));
        assert_eq!(c.tier_for(secs(29)), secs(30));
        assert_eq!(c.tier_for(secs(3600)), secs(30));
        assert_eq!(c.retry_queue(secs(2)), "q.retry.5s");
    }

    #[test]
    fn rejects_bad_configuration() {
        let ok = RabbitConfig::new(DEFAULT_URL, "q");
        assert!(ok.validate().is_ok());
        assert!(ok.clone().with_prefetch(0).validate().is_err());
        assert!(ok.clone().with_retry_tiers([]).validate().is_err());
        assert!(
            ok.clone()
                .with_retry_tiers([Duration::ZERO])
                .validate()
                .is_err()
        );
        assert!(RabbitConfig::new(DEFAULT_URL, "").validate().is_err());
        assert!(
            RabbitConfig::new(DEFAULT_URL, "x".repeat(300))
                .validate()
                .is_err()
        );
        assert!(
            RabbitConfig::new(DEFAULT_URL, "amq.gen")
                .validate()
                .is_err()
        );
        assert!(ok.clone().with_dead_letter_queue("q").validate().is_err());
    }

    #[test]
    fn url_errors_and_debug_hide_the_password() {
        let err = parse_url("http://user:s3cret@host/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        let err = parse_url("amqp://user:s3cret@host:notaport/")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        let c = RabbitConfig::new("amqps://user:s3cret@host/vh", "q");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("s3cret") && dbg.contains("user:***@host"),
            "{dbg}"
        );
        assert!(parse_url("amqps://user:s3cret@host/vh").is_ok());
    }

    #[test]
    fn heartbeat_default_applies_unless_the_url_sets_one() {
        let c = RabbitConfig::new("amqp://h/%2f", "q");
        assert_eq!(c.validate().map(|u| u.query.heartbeat).ok(), Some(Some(15)));
        let c = RabbitConfig::new("amqp://h/%2f?heartbeat=5", "q");
        assert_eq!(c.validate().map(|u| u.query.heartbeat).ok(), Some(Some(5)));
    }
}
