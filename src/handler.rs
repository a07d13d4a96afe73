//! What users write: a [`Handler`] that processes one [`Message`] and says
//! how it went.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::message::{Delivery, HeaderValue, Headers};
use crate::store::Lease;

/// Why a handler did not succeed; decides what the engine does next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Worth trying again later: the engine releases the claim and retries
    /// with backoff until the attempt limit, then dead-letters.
    #[error("retryable: {0}")]
    Retry(#[source] BoxError),
    /// Will never succeed: the engine buries the key and dead-letters the
    /// message at once (reason `permanent`).
    #[error("permanent: {0}")]
    Permanent(#[source] BoxError),
    /// The body could not be decoded: dead-lettered at once (reason `decode`).
    #[error("decode: {0}")]
    Decode(#[source] BoxError),
    /// The handler found its lease taken over while completing (a
    /// transactional handler whose fenced done mark matched no row): its
    /// effects were rolled back; the new owner handles the message.
    #[error("lease lost: another consumer owns this key now")]
    LeaseLost,
}

impl HandlerError {
    /// A retryable failure.
    pub fn retry(e: impl Into<BoxError>) -> Self {
        HandlerError::Retry(e.into())
    }
    /// A permanent failure.
    pub fn permanent(e: impl Into<BoxError>) -> Self {
        HandlerError::Permanent(e.into())
    }
}

/// Who writes the done mark after a handler succeeds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Completion {
    /// The engine calls [`crate::DedupStore::complete`] (default).
    #[default]
    ByEngine,
    /// The handler wrote the done mark itself, fenced by
    /// [`Message::lease`], in the same transaction as its effects
    /// (transactional stores). `Ok` then means "committed";
    /// [`HandlerError::LeaseLost`] means "rolled back, not ours".
    InHandler,
}

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

/// Processes one message. Implemented for every
/// `Fn(Message) -> impl Future<Output = Result<(), HandlerError>>`, so an
/// async closure is a handler:
///
/// ```
/// use idemq::{HandlerError, Message};
/// let handler = |msg: Message| async move {
///     if msg.body().is_empty() {
///         return Err(HandlerError::permanent("empty body"));
///     }
///     Ok(())
/// };
/// # fn is_handler<H: idemq::Handler>(_: &H) {}
/// # is_handler(&handler);
/// ```
///
/// A handler may run more than once for one key only when a lease lapses
/// while it runs (the engine renews the lease every lease/3 to prevent
/// that) or when it fails and is retried; make side effects either
/// idempotent or transactional with the done mark.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    async fn handle(&self, msg: Message) -> Result<(), HandlerError>;

    /// Who writes the done mark. Default: the engine.
    fn completion(&self) -> Completion {
        Completion::ByEngine
    }
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        (self)(msg).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        (**self).handle(msg).await
    }
    fn completion(&self) -> Completion {
        (**self).completion()
    }
}

/// A handler that decodes the body as JSON into `T` first; a body that does
/// not decode is dead-lettered with reason `decode`, never retried. Made by
/// [`json`].
pub struct JsonHandler<T, F> {
    f: F,
    _t: PhantomData<fn() -> T>,
}

impl<T, F> fmt::Debug for JsonHandler<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonHandler")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

/// Wraps `f(value, message)` into a [`Handler`] that decodes JSON first.
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
/// let handler = idemq::json(|order: Order, _msg| async move {
///     let _ = order.id;
///     Ok(())
/// });
/// # fn is_handler<H: idemq::Handler>(_: &H) {}
/// # is_handler(&handler);
/// ```
pub fn json<T, F, Fut>(f: F) -> JsonHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    JsonHandler { f, _t: PhantomData }
}

#[async_trait]
impl<T, F, Fut> Handler for JsonHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, msg: Message) -> Result<(), HandlerError> {
        let value: T = msg.json()?;
        (self.f)(value, msg).await
    }
}
