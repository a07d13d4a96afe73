//! [`MemoryDedupStore`]: a complete dedup store in process memory.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

use foldhash::fast::RandomState;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::Error;
use crate::key;
use crate::store::{
    Claim, ClaimTtl, DedupStore, Fenced, Lease, LeaseToken, Record, RecordState, Release, Revival,
};

const SHARDS: usize = 16;
/// A shard is swept once it has grown this much since its last sweep.
const SWEEP_MIN: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Entry {
    state: RecordState,
    token: LeaseToken,
    attempts: u32,
    lease_deadline: Instant,
    expires: Instant,
}

#[derive(Default)]
struct Shard {
    scopes: HashMap<String, HashMap<String, Entry, RandomState>, RandomState>,
    len: usize,
    sweep_at: usize,
}

impl Shard {
    fn live(&mut self, scope: &str, key: &str, now: Instant) -> Option<&mut Entry> {
        let entry = self.scopes.get_mut(scope)?.get_mut(key)?;
        (entry.expires > now).then_some(entry)
    }

    fn sweep_if_grown(&mut self, now: Instant) {
        if self.len < self.sweep_at {
            return;
        }
        self.scopes.retain(|_, keys| {
            keys.retain(|_, e| e.expires > now);
            !keys.is_empty()
        });
        self.len = self.scopes.values().map(|keys| keys.len()).sum();
        self.sweep_at = (self.len * 2).max(SWEEP_MIN);
    }
}

/// A dedup store in process memory, for tests and single-process use.
///
/// As honest as the networked stores: leases and done records really
/// expire (on the tokio clock, so tests can `tokio::time::pause()`),
/// tokens fence every operation, attempts are counted atomically with the
/// claim, and expired records are swept so memory stays bounded by the
/// number of live records. Cheap to clone; clones share the records. It
/// passes the same conformance suite as every other store.
#[derive(Clone)]
pub struct MemoryDedupStore {
    shards: Arc<[Mutex<Shard>; SHARDS]>,
    hasher: RandomState,
}

impl Default for MemoryDedupStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryDedupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDedupStore")
            .field("records", &self.len())
            .finish()
    }
}

impl MemoryDedupStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryDedupStore {
            shards: Arc::new(std::array::from_fn(|_| Mutex::new(Shard::default()))),
            hasher: RandomState::default(),
        }
    }

    fn shard(&self, scope: &str, key: &str) -> MutexGuard<'_, Shard> {
        let mut h = self.hasher.build_hasher();
        scope.hash(&mut h);
        key.hash(&mut h);
        let i = (h.finish() as usize) % SHARDS;
        // A poisoned shard only means another thread panicked mid-update of
        // plain data; the map itself is still consistent.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len)
            .sum()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every expired record now; answers how many were dropped.
    pub fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len;
            shard.sweep_at = 0;
            shard.sweep_if_grown(now);
            dropped += before - shard.len;
        }
        dropped
    }

    /// Runs `op` on the record when `lease` holds it; answers applied,
    /// without running `op` again, when the record already shows this
    /// lease's `settled` state (a settlement retried).
    fn fenced(
        &self,
        lease: &Lease,
        settled: Option<RecordState>,
        op: impl FnOnce(&mut Entry, Instant),
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        let now = Instant::now();
        let mut shard = self.shard(&lease.scope, &lease.key);
        match shard.live(&lease.scope, &lease.key, now) {
            Some(e) if e.token != lease.token => Ok(Fenced::LeaseLost),
            Some(e) if e.state == RecordState::Claimed => {
                op(e, now);
                Ok(Fenced::Applied)
            }
            Some(e) if Some(e.state) == settled => Ok(Fenced::Applied),
            _ => Ok(Fenced::LeaseLost),
        }
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        key::check(scope, key)?;
        let now = Instant::now();
        let token = LeaseToken::random();
        let lease_deadline = now + ttl.lease;
        let keep_until = now + ttl.lease.max(ttl.retain);
        let mut shard = self.shard(scope, key);
        shard.sweep_if_grown(now);
        let fresh = |attempts, expires| Entry {
            state: RecordState::Claimed,
            token,
            attempts,
            lease_deadline,
            expires,
        };
        let attempts = match shard.live(scope, key, now) {
            Some(e) => match e.state {
                RecordState::Done => return Ok(Claim::Done),
                RecordState::Dead => return Ok(Claim::Dead),
                RecordState::Claimed if e.lease_deadline > now => {
                    return Ok(Claim::InProgress {
                        retry_after: e.lease_deadline - now,
                    });
                }
                // A released claim, or a lapsed lease: take it over, counted.
                RecordState::Claimed | RecordState::Released => {
                    *e = fresh(e.attempts.saturating_add(1), e.expires.max(keep_until));
                    e.attempts
                }
            },
            None => {
                let entry = fresh(1, keep_until);
                let keys = match shard.scopes.get_mut(scope) {
                    Some(keys) => keys,
                    None => shard.scopes.entry(scope.to_owned()).or_default(),
                };
                if keys.insert(key.to_owned(), entry).is_none() {
                    shard.len += 1;
                }
                1
            }
        };
        Ok(Claim::Claimed(Lease {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token,
            attempt: attempts,
        }))
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.fenced(lease, None, |e, now| {
            e.lease_deadline = now + extend;
            e.expires = e.expires.max(e.lease_deadline);
        })
    }

    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.fenced(lease, Some(RecordState::Done), |e, now| {
            e.state = RecordState::Done;
            e.expires = now + keep_for;
        })
    }

    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        self.fenced(lease, Some(RecordState::Released), |e, now| {
            e.state = RecordState::Released;
            e.lease_deadline = now;
            if release == Release::RefundAttempt {
                e.attempts = e.attempts.saturating_sub(1);
            }
        })
    }

    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.fenced(lease, Some(RecordState::Dead), |e, now| {
            e.state = RecordState::Dead;
            e.expires = now + keep_for;
        })
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        key::check(scope, key)?;
        let now = Instant::now();
        let mut shard = self.shard(scope, key);
        Ok(shard.live(scope, key, now).map(|e| Record {
            state: e.state,
            attempts: e.attempts,
            lease_remaining: (e.state == RecordState::Claimed)
                .then(|| e.lease_deadline.saturating_duration_since(now)),
            expires_in: e.expires - now,
        }))
    }

    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        key::check(&lease.scope, &lease.key)?;
        let now = Instant::now();
        let mut shard = self.shard(&lease.scope, &lease.key);
        Ok(shard
            .live(&lease.scope, &lease.key, now)
            .filter(|e| e.token == lease.token)
            .map(|e| e.state))
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        key::check(scope, key)?;
        let now = Instant::now();
        let mut shard = self.shard(scope, key);
        let Some(keys) = shard.scopes.get_mut(scope) else {
            return Ok(false);
        };
        let removed = keys.remove(key);
        if keys.is_empty() {
            shard.scopes.remove(scope);
        }
        if removed.is_some() {
            shard.len -= 1;
        }
        Ok(removed.is_some_and(|e| e.expires > now))
    }

    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        key::check(scope, key)?;
        let now = Instant::now();
        let mut shard = self.shard(scope, key);
        let previous = match shard.live(scope, key, now) {
            None => None,
            Some(e) => match e.state {
                RecordState::Done => return Ok(Revival::Done),
                RecordState::Claimed if e.lease_deadline > now => {
                    return Ok(Revival::InProgress {
                        retry_after: e.lease_deadline - now,
                    });
                }
                state => Some(state),
            },
        };
        if let Some(keys) = shard.scopes.get_mut(scope)
            && keys.remove(key).is_some()
        {
            if keys.is_empty() {
                shard.scopes.remove(scope);
            }
            shard.len -= 1;
        }
        Ok(Revival::Revived { previous })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expired_records_are_swept() {
        let store = MemoryDedupStore::new();
        let ttl = ClaimTtl {
            lease: Duration::from_secs(1),
            retain: Duration::from_secs(1),
        };
        for i in 0..20_000 {
            let Claim::Claimed(lease) = store.claim("s", &format!("k{i}"), ttl).await.unwrap()
            else {
                panic!("fresh key must be claimed");
            };
            assert_eq!(
                store
                    .complete(&lease, Duration::from_secs(1))
                    .await
                    .unwrap(),
                Fenced::Applied
            );
        }
        assert_eq!(store.len(), 20_000);
        tokio::time::advance(Duration::from_secs(2)).await;
        // New traffic sweeps what expired: memory stays bounded by live records.
        for i in 0..20_000 {
            store.claim("s", &format!("n{i}"), ttl).await.unwrap();
        }
        assert!(
            store.len() < 25_000,
            "expired records were not swept: {}",
            store.len()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.purge_expired() > 0);
        assert!(store.is_empty());
    }
}
