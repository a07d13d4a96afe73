//! The [`DedupStore`] operations.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::AssertSqlSafe;

use idemq::key;
use idemq::{
    Claim, ClaimTtl, DedupStore, Error, Fenced, Lease, LeaseToken, Record, RecordState, Release,
    Revival,
};

use crate::error::backend;

use super::PostgresDedupStore;
use super::sql::*;

impl PostgresDedupStore {
    async fn fenced(
        &self,
        op_name: &'static str,
        sql: &Arc<str>,
        lease: &Lease,
        arg: FencedArg,
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        let q = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(&lease.scope)
            .bind(&lease.key)
            .bind(token_to_sql(lease.token));
        let q = match arg {
            FencedArg::Interval(d) => q.bind(interval(d)),
            FencedArg::Int(i) => q.bind(i),
        };
        let done = self.run(op_name, q.execute(self.ops())).await?;
        Ok(if done.rows_affected() > 0 {
            Fenced::Applied
        } else {
            Fenced::LeaseLost
        })
    }

    /// One round trip for the distinct `keys`; answers per key, `None` for
    /// keys whose row changed under the statement.
    async fn claim_distinct(
        &self,
        scope: &str,
        keys: &[&str],
        ttl: ClaimTtl,
    ) -> Result<HashMap<String, Claim>, Error> {
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::random()).collect();
        let sql_tokens: Vec<i64> = tokens.iter().copied().map(token_to_sql).collect();
        let rows: Vec<(String, bool, String, i32, i64, bool)> = self
            .run(
                "claim_many",
                sqlx::query_as(AssertSqlSafe(self.sql.claim_many.clone()))
                    .bind(scope)
                    .bind(keys)
                    .bind(&sql_tokens)
                    .bind(interval(ttl.lease))
                    .bind(interval(ttl.lease.max(ttl.retain)))
                    .fetch_all(self.ops()),
            )
            .await?;
        let token_of: HashMap<&str, LeaseToken> =
            keys.iter().copied().zip(tokens.iter().copied()).collect();
        let mut out = HashMap::with_capacity(rows.len());
        for (key, won, state, attempts, lease_us, expired) in rows {
            let Some(token) = token_of.get(key.as_str()).copied() else {
                continue;
            };
            let a = answer((won, state, attempts, lease_us, expired), |attempt| Lease {
                scope: scope.to_owned(),
                key: key.clone(),
                token,
                attempt,
            })?;
            if let Answer::Final(c) = a {
                out.insert(key, c);
            }
        }
        Ok(out)
    }
}

enum FencedArg {
    Interval(Duration),
    Int(i32),
}

#[async_trait]
impl DedupStore for PostgresDedupStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        key::check(scope, key)?;
        for _ in 0..CLAIM_RACE_RETRIES {
            let token = LeaseToken::random();
            let row: Option<ClaimRow> = self
                .run(
                    "claim",
                    sqlx::query_as(AssertSqlSafe(self.sql.claim.clone()))
                        .bind(scope)
                        .bind(key)
                        .bind(token_to_sql(token))
                        .bind(interval(ttl.lease))
                        .bind(interval(ttl.lease.max(ttl.retain)))
                        .fetch_optional(self.ops()),
                )
                .await?;
            let Some(row) = row else {
                tracing::debug!(scope, key, "claim raced with a concurrent change; again");
                continue;
            };
            let a = answer(row, |attempt| Lease {
                scope: scope.to_owned(),
                key: key.to_owned(),
                token,
                attempt,
            })?;
            if let Answer::Final(claim) = a {
                return Ok(claim);
            }
        }
        Err(backend(
            "claim",
            true,
            format!("the record kept changing under {CLAIM_RACE_RETRIES} claims in a row"),
        ))
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.fenced("renew", &self.sql.renew, lease, FencedArg::Interval(extend))
            .await
    }

    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.fenced(
            "complete",
            &self.sql.complete,
            lease,
            FencedArg::Interval(keep_for),
        )
        .await
    }

    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        let refund = match release {
            Release::CountAttempt => 0,
            Release::RefundAttempt => 1,
        };
        self.fenced("fail", &self.sql.fail, lease, FencedArg::Int(refund))
            .await
    }

    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.fenced("bury", &self.sql.bury, lease, FencedArg::Interval(keep_for))
            .await
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        key::check(scope, key)?;
        let row: Option<(String, i32, i64, i64)> = self
            .run(
                "get",
                sqlx::query_as(AssertSqlSafe(self.sql.get.clone()))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(self.ops()),
            )
            .await?;
        let Some((state, attempts, lease_us, expires_us)) = row else {
            return Ok(None);
        };
        let state = state_from_sql("get", &state)?;
        Ok(Some(Record {
            state,
            attempts: attempts_from_sql(attempts),
            lease_remaining: (state == RecordState::Claimed).then(|| micros_to_duration(lease_us)),
            expires_in: micros_to_duration(expires_us),
        }))
    }

    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        key::check(&lease.scope, &lease.key)?;
        let state: Option<String> = self
            .run(
                "lease_state",
                sqlx::query_scalar(AssertSqlSafe(self.sql.lease_state.clone()))
                    .bind(&lease.scope)
                    .bind(&lease.key)
                    .bind(token_to_sql(lease.token))
                    .fetch_optional(self.ops()),
            )
            .await?;
        state
            .map(|state| state_from_sql("lease_state", &state))
            .transpose()
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        key::check(scope, key)?;
        let live: Option<bool> = self
            .run(
                "forget",
                sqlx::query_scalar(AssertSqlSafe(self.sql.forget.clone()))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(self.ops()),
            )
            .await?;
        Ok(live.unwrap_or(false))
    }

    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        key::check(scope, key)?;
        let row: Option<(bool, Option<String>, i64)> = self
            .run(
                "revive",
                sqlx::query_as(AssertSqlSafe(self.sql.revive.clone()))
                    .bind(scope)
                    .bind(key)
                    .fetch_optional(self.ops()),
            )
            .await?;
        match row {
            None => Ok(Revival::Revived { previous: None }),
            Some((removed, state, lease_us)) => revival(removed, state, lease_us),
        }
    }

    async fn revive_many(&self, records: &[(String, String)]) -> Result<Vec<Revival>, Error> {
        for (scope, key) in records {
            key::check(scope, key)?;
        }
        // Each distinct record once; a repeat answers as a second call would.
        let mut first: HashMap<(&str, &str), usize> = HashMap::new();
        let (mut scopes, mut keys) = (Vec::new(), Vec::new());
        for (i, (scope, key)) in records.iter().enumerate() {
            if first.insert((scope.as_str(), key.as_str()), i).is_none() {
                scopes.push(scope.as_str());
                keys.push(key.as_str());
            }
        }
        if scopes.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String, bool, Option<String>, i64)> = self
            .run(
                "revive_many",
                sqlx::query_as(AssertSqlSafe(self.sql.revive_many.clone()))
                    .bind(&scopes)
                    .bind(&keys)
                    .fetch_all(self.ops()),
            )
            .await?;
        let mut answers: HashMap<(String, String), Revival> = HashMap::new();
        for (scope, key, removed, state, lease_us) in rows {
            answers.insert((scope, key), revival(removed, state, lease_us)?);
        }
        let mut seen = HashSet::new();
        Ok(records
            .iter()
            .map(|(scope, key)| {
                let answer = answers
                    .get(&(scope.clone(), key.clone()))
                    .copied()
                    .unwrap_or(Revival::Revived { previous: None });
                match (seen.insert((scope, key)), answer) {
                    (false, Revival::Revived { .. }) => Revival::Revived { previous: None },
                    (_, answer) => answer,
                }
            })
            .collect())
    }

    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        key::check_scope(scope)?;
        for k in keys {
            key::check_key(k)?;
        }
        // ON CONFLICT cannot touch one row twice in a statement: claim each
        // distinct key once; a repeat inside the batch then meets the claim
        // its first occurrence made, as it would one call after another.
        let mut distinct: Vec<&str> = keys.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut answers: HashMap<String, Claim> = HashMap::with_capacity(distinct.len());
        let mut pending = distinct;
        for _ in 0..CLAIM_RACE_RETRIES {
            if pending.is_empty() {
                break;
            }
            let got = self.claim_distinct(scope, &pending, ttl).await?;
            pending.retain(|k| !got.contains_key(*k));
            answers.extend(got);
        }
        if !pending.is_empty() {
            return Err(backend(
                "claim_many",
                true,
                format!(
                    "{} records kept changing under {CLAIM_RACE_RETRIES} claims in a row",
                    pending.len()
                ),
            ));
        }
        let mut seen: HashSet<&str> = HashSet::with_capacity(keys.len());
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let first = seen.insert(k.as_str());
            let claim = answers
                .get(k.as_str())
                .cloned()
                .ok_or_else(|| backend("claim_many", true, "a key got no answer"))?;
            out.push(match claim {
                Claim::Claimed(_) if !first => Claim::InProgress {
                    retry_after: ttl.lease,
                },
                other => other,
            });
        }
        Ok(out)
    }

    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        for l in leases {
            key::check(&l.scope, &l.key)?;
        }
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let scopes: Vec<&str> = leases.iter().map(|l| l.scope.as_str()).collect();
        let keys: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| token_to_sql(l.token)).collect();
        let rows: Vec<(String, String, i64, bool)> = self
            .run(
                "complete_many",
                sqlx::query_as(AssertSqlSafe(self.sql.complete_many.clone()))
                    .bind(&scopes)
                    .bind(&keys)
                    .bind(&tokens)
                    .bind(interval(keep_for))
                    .fetch_all(self.ops()),
            )
            .await?;
        let applied: HashMap<(String, String, i64), bool> = rows
            .into_iter()
            .map(|(scope, key, token, live)| ((scope, key, token), live))
            .collect();
        // A lease repeated in the batch is applied once; its repeats find
        // what one call after another would: their own done record
        // (applied), or none when it expired at once (lost).
        let mut seen = HashSet::with_capacity(leases.len());
        Ok(leases
            .iter()
            .map(|l| {
                let id = (l.scope.clone(), l.key.clone(), token_to_sql(l.token));
                match applied.get(&id) {
                    Some(&live) if live || seen.insert(id) => Fenced::Applied,
                    _ => Fenced::LeaseLost,
                }
            })
            .collect())
    }
}
