//! What users write: a [`Handler`] that processes one [`Message`] and says
//! how it went.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::message::Message;

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

/// Marks any error as retryable or permanent, so a handler can use `?` on
/// whatever its calls return:
///
/// ```
/// use idemq::{HandlerError, HandlerResultExt, Message};
/// async fn charge(_cents: u64) -> Result<(), std::io::Error> { Ok(()) }
/// async fn handle(msg: Message) -> Result<(), HandlerError> {
///     let cents: u64 = std::str::from_utf8(msg.body()).permanent()?.parse().permanent()?;
///     charge(cents).await.retryable()?; // a network error: try again later
///     Ok(())
/// }
/// ```
pub trait HandlerResultExt<T> {
    /// On error, [`HandlerError::Retry`]: released, retried with backoff.
    fn retryable(self) -> Result<T, HandlerError>;
    /// On error, [`HandlerError::Permanent`]: dead-lettered at once.
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> HandlerResultExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retry)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
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
