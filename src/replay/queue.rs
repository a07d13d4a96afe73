//! [`DeadLetterQueue`]: what a replay needs of a broker.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use crate::error::Error;
use crate::message::{Delivery, Headers};

/// A pending publisher confirm: resolves once the broker has taken
/// responsibility for a republished copy.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'static>>;

/// A dead-letter queue seen by a replay: dead letters are taken in queue
/// order and stay unsettled until the replay removes them (once their copy
/// is confirmed) or puts them back.
///
/// A replay must not consume the work queue nor declare anything: an
/// implementation only reads the dead-letter queue and publishes to the
/// work queue.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// Dead letters ready in the queue now (taken, unsettled ones not
    /// counted). A replay reads it once, at its start, and takes no more
    /// than that: it never replays its own output.
    async fn depth(&self) -> Result<u64, Error>;

    /// Takes the oldest dead letter not taken yet; `Ok(None)` when none is
    /// ready. It stays in the queue, unsettled, until [`Self::remove`] or
    /// [`Self::put_back`].
    async fn take(&self) -> Result<Option<Delivery>, Error>;

    /// Publishes a persistent copy of `letter` to the work queue: its body,
    /// message id and every other property, with `headers` in place of its
    /// headers. Returns once the copy is on its way, so copies leave in the
    /// order of the calls; the returned [`Confirm`] resolves when the broker
    /// confirms it.
    async fn republish(&self, letter: &Delivery, headers: Headers) -> Result<Confirm, Error>;

    /// Removes a taken dead letter for good.
    async fn remove(&self, letter: &Delivery) -> Result<(), Error>;

    /// Ends taking: returns `letters` (taken and neither removed nor put
    /// back, oldest first) to the queue, at their places where the broker
    /// keeps them, along with whatever the implementation read ahead and
    /// never handed out. Called once, at the end of a run.
    async fn put_back(&self, letters: Vec<Delivery>) -> Result<(), Error>;
}
