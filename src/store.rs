//! The [`DedupStore`] trait: one record per message key, claimed under a
//! fenced lease.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;

/// A fencing token: the store hands a fresh one out with every won claim,
/// and acts on `renew`, `complete`, `fail` and `bury` only when the caller
/// presents the token the record currently holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(pub u64);

impl LeaseToken {
    /// A random token.
    pub fn random() -> Self {
        LeaseToken(rand::random())
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({:016x})", self.0)
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Proof of a won claim: which record, which token, and which attempt this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The scope the key was claimed in.
    pub scope: String,
    /// The (normalized) message key.
    pub key: String,
    /// The fencing token.
    pub token: LeaseToken,
    /// The attempt this claim is: 1 for the first claim of a key, counted
    /// up by every later claim (after `fail`, or a takeover of a lapsed
    /// lease) in the same atomic step that grants it.
    pub attempt: u32,
}

/// The answer to [`DedupStore::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the key until the lease lapses.
    Claimed(Lease),
    /// The key was completed within its dedup window: a duplicate.
    Done,
    /// Another consumer holds a live lease; it lapses in `retry_after`.
    InProgress {
        /// Time left on the other consumer's lease.
        retry_after: Duration,
    },
    /// The key was buried (attempts exhausted, or a permanent failure).
    Dead,
}

impl Claim {
    /// The lease of a won claim; any other answer is handed back as the
    /// error, unchanged, so the caller can still tell a duplicate from a
    /// busy key.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idemq::memory::MemoryDedupStore;
    /// use idemq::{Claim, ClaimTtl, DedupStore};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idemq::Error> {
    /// let store = MemoryDedupStore::new();
    /// let ttl = ClaimTtl { lease: Duration::from_secs(30), retain: Duration::from_secs(60) };
    ///
    /// let lease = store.claim("orders", "o-1", ttl).await?.into_lease().expect("a new key");
    /// assert_eq!((lease.key.as_str(), lease.attempt), ("o-1", 1));
    ///
    /// // Claimed again while the lease is live: no lease, the answer says why.
    /// let busy = store.claim("orders", "o-1", ttl).await?.into_lease();
    /// assert!(matches!(busy, Err(Claim::InProgress { .. })));
    /// # Ok(()) }
    /// ```
    pub fn into_lease(self) -> Result<Lease, Claim> {
        match self {
            Claim::Claimed(lease) => Ok(lease),
            other => Err(other),
        }
    }
}

/// The answer of a fenced operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a lost lease means another consumer owns the record now"]
pub enum Fenced {
    /// The caller still owned the record; the operation took effect.
    Applied,
    /// The record is no longer the caller's (taken over after the lease
    /// lapsed, forgotten, expired, or already settled); nothing was changed.
    LeaseLost,
}

/// How [`DedupStore::fail`] treats the attempt the claim counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The attempt happened and failed: keep it counted.
    CountAttempt,
    /// The attempt never really ran (shutdown before the handler finished):
    /// give it back.
    RefundAttempt,
}

/// The state of a dedup record, as [`DedupStore::get`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// A consumer claimed it; its lease may or may not have lapsed.
    Claimed,
    /// Released by `fail`: claimable, attempts kept.
    Released,
    /// Completed: duplicates are acked until it expires.
    Done,
    /// Buried: attempts exhausted or failed permanently.
    Dead,
}

/// A dedup record, for inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the record stands.
    pub state: RecordState,
    /// Attempts counted so far.
    pub attempts: u32,
    /// For a claimed record, time left on its lease (zero once lapsed).
    pub lease_remaining: Option<Duration>,
    /// Time until the record expires and the key is forgotten.
    pub expires_in: Duration,
}

/// The answer to [`DedupStore::revive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a key that was not revived must not be replayed"]
pub enum Revival {
    /// The key is claimable again with its attempt count reset: its record
    /// was dead, released, a lapsed claim, expired or absent (`previous`
    /// says which; `None` for absent or expired) and is gone now.
    Revived {
        /// The state of the record that was removed.
        previous: Option<RecordState>,
    },
    /// The key was completed within its dedup window: untouched. A copy of
    /// it is a duplicate and must not be handled again.
    Done,
    /// A consumer holds a live lease on the key: untouched.
    InProgress {
        /// Time left on that lease.
        retry_after: Duration,
    },
}

/// How many records are in each state: what an operator's `idemq stats`
/// shows. Backends count them their own way (see their docs: an exact
/// count, or an estimate from a bounded scan).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordCounts {
    /// Claimed, with a live lease: being handled now.
    pub claimed: u64,
    /// Claimed, lease lapsed: the consumer died or is slower than its lease.
    pub lapsed: u64,
    /// Released after a failed attempt, awaiting the retry.
    pub released: u64,
    /// Done: duplicates are acked.
    pub done: u64,
    /// Dead: attempts exhausted or failed permanently.
    pub dead: u64,
}

impl RecordCounts {
    /// All records counted.
    pub fn total(&self) -> u64 {
        self.claimed + self.lapsed + self.released + self.done + self.dead
    }
}

/// The durations a claim works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimTtl {
    /// How long the claim is exclusive.
    pub lease: Duration,
    /// How long the record (and so its attempt count) is kept at least,
    /// even when the lease lapses. The record lives for the longer of the
    /// two.
    pub retain: Duration,
}

/// A dedup store: an atomic, fenced claim per `(scope, key)`.
///
/// Semantics every implementation shares (checked by
/// `idemq::testing::store` when the `testing` feature is on):
///
/// * `claim` on an absent or expired record creates it with `attempts = 1`;
///   on a `Released` record, or a `Claimed` one whose lease lapsed, it takes
///   it over with `attempts + 1` and a new token; on a live lease it answers
///   `InProgress`; on `Done`/`Dead` it answers so. All in one atomic step,
///   timed by the store's own clock.
/// * `renew`, `complete`, `fail` and `bury` act only when the record is
///   `Claimed` with the caller's token (even if the lease lapsed, as long as
///   nobody took over), and answer [`Fenced::LeaseLost`] otherwise.
/// * Settlements are idempotent: `complete`, `fail` or `bury` called again
///   with the same lease, when the record already shows that settlement
///   (the caller's token, in `Done`, `Released` or `Dead`), answer
///   [`Fenced::Applied`] and change nothing. So a settlement whose answer
///   was lost (a timeout, a cut connection) is retried safely, and only a
///   record that another claim owns is a lost lease.
/// * [`DedupStore::lease_state`] reads where a lease stands, for the
///   settlements that cannot be retried (a transaction's `COMMIT` whose
///   answer was lost).
/// * A record outlives a lapsed lease by `retain`, so attempts are not lost.
/// * Scopes never see each other's keys.
///
/// Scopes and keys are checked with [`crate::key::check_scope`] and
/// [`crate::key::check_key`]; a store rejects others with
/// [`Error::InvalidInput`].
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Tries to take exclusive ownership of `key` in `scope`.
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error>;

    /// Extends the lease to `extend` from now (store clock).
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error>;

    /// Marks the key done; the record is kept for `keep_for`, during which
    /// claims answer [`Claim::Done`].
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error>;

    /// Releases the claim after a failed attempt; the key becomes claimable
    /// at once, with its attempt count kept (or refunded, see [`Release`]).
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error>;

    /// Marks the key dead; the record is kept for `keep_for`, during which
    /// claims answer [`Claim::Dead`].
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error>;

    /// Reads a record without changing it; `None` when absent or expired.
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error>;

    /// Reads the record of `lease`'s key as that lease sees it: its state
    /// while it still carries the lease's token (`Claimed` by it, or
    /// settled by it: `Released`, `Done`, `Dead`); `None` when the record
    /// is absent, expired, or another claim's. A fenced read: what the
    /// engine asks after a settlement with an unknown outcome (a
    /// transactional handler's `COMMIT` whose answer was lost) before it
    /// acks, retries or releases.
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error>;

    /// Deletes a record whatever its state, so the key can be handled again
    /// (forced replay). Answers whether a live record was there. A consumer
    /// holding a lease on it will find it lost.
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error>;

    /// Makes a key claimable again for a replay, in one atomic, conditional
    /// step: a record that is `Dead`, `Released`, a `Claimed` one whose
    /// lease lapsed, or none at all, is removed (so the next claim is
    /// attempt 1) and the answer is [`Revival::Revived`]; a `Done` record
    /// ([`Revival::Done`]) and a live lease ([`Revival::InProgress`]) are
    /// left exactly as they are. This is what makes a replay safe to
    /// interrupt and repeat: it never turns a done key into a claimable
    /// one (use [`DedupStore::forget`] for that).
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error>;

    /// Claims many keys; answers in the order of `keys`. The default loops
    /// over [`DedupStore::claim`]; backends override it with one round trip.
    ///
    /// A key named more than once answers exactly as the same claims made
    /// one after another would: the first occurrence that can take the key
    /// wins it (one attempt counted), and the repeats after it meet that
    /// live lease ([`Claim::InProgress`]); a done or dead key answers so
    /// every time.
    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.claim(scope, key, ttl).await?);
        }
        Ok(out)
    }

    /// Revives many records, `(scope, key)` each ([`DedupStore::revive`]);
    /// answers in the order of `records`. A record named twice answers like
    /// two calls in a row. The default makes the calls concurrently;
    /// backends override it with one round trip.
    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        futures::future::try_join_all(records.iter().map(|(scope, key)| self.revive(scope, key)))
            .await
    }

    /// Completes many leases; answers in the order of `leases`. The default
    /// loops over [`DedupStore::complete`]; backends override it with one
    /// round trip.
    ///
    /// A lease named more than once answers exactly as the same
    /// completions made one after another would: the first completes the
    /// record, and a repeat finds the done record it left
    /// ([`Fenced::Applied`], nothing changed), or, when `keep_for` is zero
    /// and the record was dropped at once, finds none
    /// ([`Fenced::LeaseLost`]). Two leases on one key (another token, an
    /// older claim) never both apply.
    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            out.push(self.complete(lease, keep_for).await?);
        }
        Ok(out)
    }
}

#[async_trait]
impl<T: DedupStore + ?Sized> DedupStore for Arc<T> {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        (**self).claim(scope, key, ttl).await
    }
    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        (**self).renew(lease, extend).await
    }
    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        (**self).complete(lease, keep_for).await
    }
    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        (**self).fail(lease, release).await
    }
    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        (**self).bury(lease, keep_for).await
    }
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        (**self).get(scope, key).await
    }
    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        (**self).lease_state(lease).await
    }
    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        (**self).forget(scope, key).await
    }
    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        (**self).revive(scope, key).await
    }
    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        (**self).revive_many(records).await
    }
    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        (**self).claim_many(scope, keys, ttl).await
    }
    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        (**self).complete_many(leases, keep_for).await
    }
}
