//! What a broker hands out ([`Delivery`]), what a handler sees of it
//! ([`Message`]) and what goes to a broker ([`OutgoingMessage`]), with the
//! header names idemq writes.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::handler::HandlerError;
use crate::store::Lease;

/// One message handed to a handler: the delivery plus what the engine knows
/// about it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Message {
    delivery: Arc<Delivery>,
    lease: Arc<Lease>,
    keep_for: Duration,
}

impl Message {
    /// Put together by the engine (and by tests calling a handler directly).
    pub fn new(delivery: Arc<Delivery>, lease: Arc<Lease>, keep_for: Duration) -> Self {
        Message {
            delivery,
            lease,
            keep_for,
        }
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.delivery.body
    }
    /// The body decoded as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.delivery.body).map_err(|e| HandlerError::Decode(e.into()))
    }
    /// The normalized dedup key.
    pub fn key(&self) -> &str {
        &self.lease.key
    }
    /// The `message_id` property.
    pub fn message_id(&self) -> Option<&str> {
        self.delivery.message_id.as_deref()
    }
    /// All headers.
    pub fn headers(&self) -> &Headers {
        &self.delivery.headers
    }
    /// One header.
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.delivery.header(name)
    }
    /// Which attempt this is (1 for the first), as counted by the store.
    pub fn attempt(&self) -> u32 {
        self.lease.attempt
    }
    /// Whether the broker delivered it before.
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }
    /// The lease the engine holds; transactional handlers fence their done
    /// mark with it.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
    /// How long the done mark must be kept (the engine's `keep_for`).
    pub fn keep_for(&self) -> Duration {
        self.keep_for
    }
    /// The underlying delivery.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }
}

/// One header value. AMQP field tables hold more types; backends map the
/// ones they meet onto these (and everything else onto [`HeaderValue::Str`]).
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderValue {
    /// A UTF-8 string.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A floating point number.
    Float(f64),
    /// Raw bytes.
    Bytes(Vec<u8>),
}

impl HeaderValue {
    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an integer: an `Int`, or a `Str` holding digits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            HeaderValue::Str(s) => s.parse().ok(),
            _ => None,
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::Str(s.to_owned())
    }
}
impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::Str(s)
    }
}
impl From<i64> for HeaderValue {
    fn from(i: i64) -> Self {
        HeaderValue::Int(i)
    }
}
impl From<u32> for HeaderValue {
    fn from(i: u32) -> Self {
        HeaderValue::Int(i64::from(i))
    }
}
impl From<bool> for HeaderValue {
    fn from(b: bool) -> Self {
        HeaderValue::Bool(b)
    }
}

/// Message headers, ordered by name.
pub type Headers = BTreeMap<String, HeaderValue>;

/// Names of the headers idemq writes on retried and dead-lettered copies.
pub mod headers {
    /// The attempt number of a retried copy (1 for the first retry's copy
    /// of a message whose first attempt failed). Informational: the
    /// authoritative count lives in the dedup record.
    pub const ATTEMPT: &str = "x-idemq-attempt";
    /// Why a message was dead-lettered: a [`crate::DeadReason`] code.
    pub const REASON: &str = "x-idemq-reason";
    /// Free text that goes with the reason (the handler's error, say).
    pub const DETAIL: &str = "x-idemq-detail";
    /// How many attempts had been made when the message was dead-lettered.
    pub const ATTEMPTS: &str = "x-idemq-attempts";
    /// The work queue the message was taken from.
    pub const ORIGINAL_QUEUE: &str = "x-idemq-original-queue";
    /// When the message first failed, in milliseconds since the Unix epoch.
    pub const FIRST_FAILURE_MS: &str = "x-idemq-first-failure-ms";
    /// When the message was dead-lettered, in milliseconds since the Unix epoch.
    pub const DEAD_AT_MS: &str = "x-idemq-dead-at-ms";
    /// How often the message was deferred because another consumer held
    /// its key (each deferral waits twice as long as the one before).
    pub const DEFERRALS: &str = "x-idemq-deferrals";
    /// The dedup scope the dead-lettering consumer claimed the key in.
    pub const SCOPE: &str = "x-idemq-scope";
    /// The normalized key the message was claimed under (absent for a
    /// message dead-lettered for having no key).
    pub const KEY: &str = "x-idemq-key";
    /// How often the message was replayed from the dead-letter queue. Kept
    /// (and counted up) on replay, unlike the headers of [`ALL`].
    pub const REPLAYED: &str = "x-idemq-replayed";

    /// The headers of one failure: stripped from a dead letter when it is
    /// replayed, so the copy starts afresh.
    pub const ALL: [&str; 10] = [
        ATTEMPT,
        REASON,
        DETAIL,
        ATTEMPTS,
        ORIGINAL_QUEUE,
        FIRST_FAILURE_MS,
        DEAD_AT_MS,
        DEFERRALS,
        SCOPE,
        KEY,
    ];
}

/// Milliseconds since the Unix epoch, by the wall clock (for headers only;
/// leases and expiry never use the consumer's wall clock).
pub fn unix_millis_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// One message as a broker delivered it, not yet settled.
///
/// Settle it with exactly one of [`crate::Broker::ack`], `nack`,
/// `retry_later` or `dead_letter`. A delivery that is never settled comes
/// back from the broker when the consumer's connection goes away.
#[derive(Clone)]
pub struct Delivery {
    /// The message body.
    pub body: Bytes,
    /// The `message_id` property, when the producer set one.
    pub message_id: Option<String>,
    /// The message headers.
    pub headers: Headers,
    /// True when the broker delivered this message before (to this or
    /// another consumer) without it being acked.
    pub redelivered: bool,
    /// The broker's own delivery count, where it keeps one (RabbitMQ quorum
    /// queues: `x-delivery-count`, 0 on the first delivery).
    pub delivery_count: Option<u32>,
    /// The broker's delivery tag.
    pub tag: u64,
    /// When the broker itself dead-lettered this message before (RabbitMQ:
    /// the most recent `x-death` entry): why, and from which queue.
    pub broker_death: Option<BrokerDeath>,
    handle: Option<Arc<dyn Any + Send + Sync>>,
}

/// The broker's own record of dead-lettering a message (RabbitMQ: an entry
/// of the `x-death` header): a delivery limit, an expiry, a rejection or
/// an overflow, as opposed to idemq's dead letters, which carry
/// [`headers::REASON`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerDeath {
    /// The broker's reason (RabbitMQ: `delivery_limit`, `expired`,
    /// `rejected`, `maxlen`).
    pub reason: String,
    /// The queue the message was dead-lettered from.
    pub queue: String,
    /// How often it was dead-lettered from that queue for that reason.
    pub count: u64,
    /// When, in milliseconds since the Unix epoch, if the broker said.
    pub time_ms: Option<i64>,
}

impl Delivery {
    /// A delivery with the given broker tag and body and nothing else set.
    pub fn new(tag: u64, body: impl Into<Bytes>) -> Self {
        Delivery {
            body: body.into(),
            message_id: None,
            headers: Headers::new(),
            redelivered: false,
            delivery_count: None,
            tag,
            broker_death: None,
            handle: None,
        }
    }

    /// Sets the `message_id` property.
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Attaches backend-private data (a channel handle, say) that the
    /// backend's settle operations read back with [`Delivery::handle`].
    pub fn with_handle<T: Any + Send + Sync>(mut self, handle: T) -> Self {
        self.handle = Some(Arc::new(handle));
        self
    }

    /// The backend-private data attached with [`Delivery::with_handle`], if
    /// it is of type `T`.
    pub fn handle<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.handle.as_deref()?.downcast_ref()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.headers.get(name)
    }

    /// How often this message was deferred ([`headers::DEFERRALS`]).
    pub fn deferrals(&self) -> u32 {
        self.count_header(headers::DEFERRALS)
    }

    /// The attempt number a retried copy carries ([`headers::ATTEMPT`]),
    /// 0 for a message that was never retried.
    pub fn retry_attempt(&self) -> u32 {
        self.count_header(headers::ATTEMPT)
    }

    /// A count idemq keeps in a header: 0 when absent or not a `u32`.
    fn count_header(&self, name: &str) -> u32 {
        self.header(name)
            .and_then(HeaderValue::as_i64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("tag", &self.tag)
            .field("message_id", &self.message_id)
            .field("body_len", &self.body.len())
            .field("headers", &self.headers)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("broker_death", &self.broker_death)
            .finish_non_exhaustive()
    }
}

/// A message to publish (persistent, with publisher confirms).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutgoingMessage {
    /// The body.
    pub body: Bytes,
    /// The `message_id` property: the key idemq deduplicates on.
    pub message_id: Option<String>,
    /// Headers.
    pub headers: Headers,
}

impl OutgoingMessage {
    /// A message with this body and no id or headers.
    pub fn new(body: impl Into<Bytes>) -> Self {
        OutgoingMessage {
            body: body.into(),
            ..Default::default()
        }
    }

    /// Sets the `message_id` property.
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// Why a message went to the dead-letter queue. Its [`DeadReason::as_str`]
/// code is written in the [`headers::REASON`] header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeadReason {
    /// No message id, no configured header, and body hashing not enabled.
    MissingKey,
    /// The attempt limit was reached.
    MaxAttempts,
    /// The handler said the message can never succeed.
    Permanent,
    /// The body could not be decoded (typed handlers).
    Decode,
    /// A copy of a message whose key is already dead, dead-lettered too
    /// because the engine was set to [`crate::OnDead::DeadLetter`].
    DuplicateOfDead,
}

impl DeadReason {
    /// The code written in the reason header.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MissingKey => "missing-key",
            DeadReason::MaxAttempts => "max-attempts",
            DeadReason::Permanent => "permanent",
            DeadReason::Decode => "decode",
            DeadReason::DuplicateOfDead => "duplicate-of-dead",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`crate::Broker::dead_letter`] records with the copy.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The reason code.
    pub reason: DeadReason,
    /// Words that go with it (the handler's last error, say).
    pub detail: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The dedup scope and normalized key the message was claimed under,
    /// when it had a key: replay finds its record with them.
    pub record: Option<(String, String)>,
}

impl DeadLetter {
    /// A dead letter for no particular record (see [`DeadLetter::with_record`]).
    pub fn new(reason: DeadReason, detail: impl Into<String>, attempts: u32) -> Self {
        DeadLetter {
            reason,
            detail: detail.into(),
            attempts,
            record: None,
        }
    }

    /// Names the dedup record the message was claimed under.
    pub fn with_record(mut self, scope: impl Into<String>, key: impl Into<String>) -> Self {
        self.record = Some((scope.into(), key.into()));
        self
    }

    /// The headers a dead-lettered copy carries: the delivery's own headers
    /// plus reason, detail, attempts, original queue, first-failure time
    /// (kept from an earlier retry, else now), dead-at time, and the scope
    /// and key of its record (when it has one). Backends use this so that
    /// every broker writes the same headers.
    pub fn headers_for(&self, delivery: &Delivery, original_queue: &str) -> Headers {
        let now = unix_millis_now();
        let mut h = delivery.headers.clone();
        h.insert(headers::REASON.into(), self.reason.as_str().into());
        h.insert(headers::DETAIL.into(), self.detail.clone().into());
        h.insert(headers::ATTEMPTS.into(), self.attempts.into());
        h.insert(headers::ORIGINAL_QUEUE.into(), original_queue.into());
        h.entry(headers::FIRST_FAILURE_MS.into())
            .or_insert(HeaderValue::Int(now));
        h.insert(headers::DEAD_AT_MS.into(), HeaderValue::Int(now));
        // A copy of an earlier dead letter must not keep that one's record.
        h.remove(headers::SCOPE);
        h.remove(headers::KEY);
        if let Some((scope, key)) = &self.record {
            h.insert(headers::SCOPE.into(), scope.as_str().into());
            h.insert(headers::KEY.into(), key.as_str().into());
        }
        h
    }
}

/// The headers a retried copy carries: the delivery's own headers, the new
/// attempt number, and the first-failure time (kept, else now). Backends use
/// this so that every broker writes the same headers.
pub fn retry_headers(delivery: &Delivery, attempt: u32) -> Headers {
    let mut h = delivery.headers.clone();
    h.insert(headers::ATTEMPT.into(), attempt.into());
    h.entry(headers::FIRST_FAILURE_MS.into())
        .or_insert(HeaderValue::Int(unix_millis_now()));
    h
}
