//! The [`DedupStore`] operations of [`RedisDedupStore`]: which command or
//! script each sends, and how a batch is split and undone.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use idemq::key;
use idemq::{
    Claim, ClaimTtl, DedupStore, Error, Fenced, Lease, LeaseToken, Record, RecordState, Release,
    Revival,
};
use redis::{Cmd, Value};

use super::reply::{
    expect_len, parse_claims, parse_deleted, parse_fenced, parse_lease_state, parse_record,
    parse_revival, parse_settled, read_fresh_claim, read_settled_if_equal,
};
use super::{MAX_KEYS_PER_CALL, NO_SLACK, RedisDedupStore};
use crate::command;
use crate::error;
use crate::record::{self, DEAD, DONE};
use crate::scripts::{self, Lua};

/// Longest duration handed to Redis, in ms (about 34 years): keeps every
/// deadline exact in Lua's doubles and within `PEXPIRE`'s range.
const MAX_MS: u64 = 1 << 40;

impl RedisDedupStore {
    /// One call of `claim.lua` over `keys` (checked), `tokens[i]` for
    /// `keys[i]`.
    fn claim_cmd<K: AsRef<str>>(
        &self,
        scope: &str,
        keys: &[K],
        tokens: &[LeaseToken],
        ttl: ClaimTtl,
    ) -> Cmd {
        let mut cmd = scripts::CLAIM.evalsha(keys.len());
        for key in keys {
            cmd.arg(self.key_unchecked(scope, key.as_ref()));
        }
        let (life, lease, slack) = claim_ms(ttl);
        cmd.arg(life).arg(lease).arg(slack);
        for token in tokens {
            cmd.arg(token.to_string());
        }
        cmd
    }

    /// Claims `keys` (checked) with `claim.lua`, `tokens[i]` for `keys[i]`:
    /// one script call per [`MAX_KEYS_PER_CALL`] keys, in one pipeline.
    async fn claim_scripted(
        &self,
        op: &'static str,
        scope: &str,
        keys: &[&str],
        tokens: &[LeaseToken],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        let chunks = || {
            keys.chunks(MAX_KEYS_PER_CALL)
                .zip(tokens.chunks(MAX_KEYS_PER_CALL))
        };
        let cmds = chunks()
            .map(|(keys, tokens)| self.claim_cmd(scope, keys, tokens, ttl))
            .collect();
        let replies = self.eval_batch(op, &scripts::CLAIM, cmds).await?;
        let mut claims = Vec::with_capacity(keys.len());
        for (reply, (keys, tokens)) in replies.into_iter().zip(chunks()) {
            let reply = self.server_reply(op, reply)?;
            claims.extend(parse_claims(op, reply, scope, keys, tokens)?);
        }
        Ok(claims)
    }

    /// Deletes the records a `claim_many` created, each only while it
    /// still holds the value written (`lua/unclaim.lua`); for a batch that
    /// failed after its fresh claims went through. Best effort: a failure
    /// is logged, and the claims then lapse with their lease.
    async fn unclaim(&self, fresh: &[(String, Vec<u8>)]) {
        let cmds = fresh
            .chunks(MAX_KEYS_PER_CALL)
            .map(|chunk| {
                let mut cmd = scripts::UNCLAIM.evalsha(chunk.len());
                for (record, _) in chunk {
                    cmd.arg(record);
                }
                for (_, value) in chunk {
                    cmd.arg(value);
                }
                cmd
            })
            .collect();
        let replies = self.eval_batch("claim_many", &scripts::UNCLAIM, cmds).await;
        let failed = match replies {
            Ok(replies) => replies
                .into_iter()
                .find_map(|reply| self.server_reply("claim_many", reply).err()),
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            tracing::warn!(
                target: "idemq_redis",
                redis = %self.inner.target,
                error = %e,
                claims = fresh.len(),
                "could not take back the fresh claims of a failed claim_many; \
                 they lapse with their lease"
            );
        }
    }

    /// One call of `settle.lua` over `leases` (checked): writes `state`.
    /// Each lease goes as the two arguments of [`command::settle_args`].
    fn settle_cmd(&self, state: &str, leases: &[Lease], keep_for: Duration) -> Cmd {
        let mut cmd = scripts::SETTLE.evalsha(leases.len());
        for lease in leases {
            cmd.arg(self.key_unchecked(&lease.scope, &lease.key));
        }
        cmd.arg(ms(keep_for));
        for lease in leases {
            command::settle_args(&mut cmd, state, lease);
        }
        cmd
    }

    /// `complete` (state done) or `bury` (state dead) of one lease. Two
    /// paths, both fenced by the lease's token and attempt:
    ///
    /// 1. [`Self::settle_if_equal`]: on a server that takes `SET ... IFEQ`,
    ///    one plain `SET`. It decides when the key holds the claim as this
    ///    store wrote it, this lease's settled record, nothing, or another
    ///    lease's record: a fresh message's completion;
    /// 2. [`Self::settle_scripted`]: `settle.lua`, on any other server,
    ///    and for what the `SET` cannot decide (the caller's claim with
    ///    another slack, as after a renewal; a value that is not a record;
    ///    a `keep_for` under 1 ms, which deletes).
    async fn settle(
        &self,
        op: &'static str,
        state: &str,
        lease: &Lease,
        keep_for: Duration,
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        if let Some(fenced) = self.settle_if_equal(op, state, lease, keep_for).await? {
            return Ok(fenced);
        }
        self.settle_scripted(op, state, lease, keep_for).await
    }

    /// Path 2 of [`Self::settle`]: one call of `settle.lua` (with
    /// `lua/settle_one.lua`, its one-key fast path, in front) for one lease
    /// (checked).
    async fn settle_scripted(
        &self,
        op: &'static str,
        state: &str,
        lease: &Lease,
        keep_for: Duration,
    ) -> Result<Fenced, Error> {
        let cmd = self.settle_cmd(state, std::slice::from_ref(lease), keep_for);
        let reply = self.eval(op, &scripts::SETTLE, cmd).await?;
        parse_fenced(op, reply)
    }

    /// Path 1 of [`Self::settle`], for one lease (checked): on a server
    /// that takes `SET ... IFEQ`, the plain command of
    /// [`command::settle_if_equal`]. Answers `None`, and path 2 decides,
    /// when the server has no `IFEQ`, the record is to be deleted, no claim
    /// was sent yet (so no slack to expect), or the reply is the caller's
    /// claim with another slack, or not a record.
    async fn settle_if_equal(
        &self,
        op: &'static str,
        state: &str,
        lease: &Lease,
        keep_for: Duration,
    ) -> Result<Option<Fenced>, Error> {
        let slack = self.inner.last_slack.load(Ordering::Relaxed);
        let keep = ms(keep_for);
        if !self.inner.compare_and_set.load(Ordering::Relaxed) || slack == NO_SLACK || keep < 1 {
            return Ok(None);
        }
        let prefix = self.inner.config.prefix();
        let (cmd, expected) = command::settle_if_equal(prefix, lease, state, slack, keep);
        let reply = self.send(op, cmd).await?;
        Ok(read_settled_if_equal(&reply, &expected, state))
    }

    async fn fenced(
        &self,
        op: &'static str,
        script: &Lua,
        lease: &Lease,
        arg: impl redis::ToRedisArgs,
    ) -> Result<Fenced, Error> {
        key::check(&lease.scope, &lease.key)?;
        let mut cmd = script.evalsha(1);
        cmd.arg(self.key_unchecked(&lease.scope, &lease.key))
            .arg(lease.token.to_string())
            .arg(arg);
        let reply = self.eval(op, script, cmd).await?;
        parse_fenced(op, reply)
    }
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, scope: &str, key: &str, ttl: ClaimTtl) -> Result<Claim, Error> {
        key::check(scope, key)?;
        let token = LeaseToken::random();
        let (life, _, slack) = claim_ms(ttl);
        self.note_slack(slack);
        let prefix = self.inner.config.prefix();
        let cmd = command::fresh_claim(prefix, scope, key, token, slack, life);
        let reply = self.send("claim", cmd).await?;
        if let Some(claim) = read_fresh_claim(&reply, scope, key, token) {
            return Ok(claim);
        }
        // A redelivery, a retry or a takeover: boxed, so the future of the
        // usual path (boxed and copied on every call) stays small.
        Box::pin(self.claim_scripted("claim", scope, &[key], &[token], ttl))
            .await?
            .pop()
            .ok_or_else(|| error::unexpected("claim", "no answer".into()))
    }

    async fn renew(&self, lease: &Lease, extend: Duration) -> Result<Fenced, Error> {
        self.fenced("renew", &scripts::RENEW, lease, ms(extend))
            .await
    }

    async fn complete(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        // A plain `SET ... IFEQ` or `settle.lua`: see `settle`.
        self.settle("complete", DONE, lease, keep_for).await
    }

    async fn fail(&self, lease: &Lease, release: Release) -> Result<Fenced, Error> {
        let refund = match release {
            Release::CountAttempt => "0",
            Release::RefundAttempt => "1",
        };
        self.fenced("fail", &scripts::FAIL, lease, refund).await
    }

    async fn bury(&self, lease: &Lease, keep_for: Duration) -> Result<Fenced, Error> {
        self.settle("bury", DEAD, lease, keep_for).await
    }

    async fn get(&self, scope: &str, key: &str) -> Result<Option<Record>, Error> {
        key::check(scope, key)?;
        let mut cmd = scripts::GET.evalsha(1);
        cmd.arg(self.key_unchecked(scope, key));
        let reply = self.eval("get", &scripts::GET, cmd).await?;
        parse_record("get", reply)
    }

    async fn lease_state(&self, lease: &Lease) -> Result<Option<RecordState>, Error> {
        key::check(&lease.scope, &lease.key)?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key_unchecked(&lease.scope, &lease.key));
        let reply = self.send("lease_state", cmd).await?;
        parse_lease_state(self.server_reply("lease_state", reply)?, lease.token)
    }

    async fn forget(&self, scope: &str, key: &str) -> Result<bool, Error> {
        key::check(scope, key)?;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key_unchecked(scope, key));
        let reply = self.send("forget", cmd).await?;
        parse_deleted("forget", self.server_reply("forget", reply)?)
    }

    async fn revive(&self, scope: &str, key: &str) -> Result<Revival, Error> {
        key::check(scope, key)?;
        let mut cmd = scripts::REVIVE.evalsha(1);
        cmd.arg(self.key_unchecked(scope, key));
        let reply = self.eval("revive", &scripts::REVIVE, cmd).await?;
        parse_revival(reply)
    }

    async fn claim_many(
        &self,
        scope: &str,
        keys: &[String],
        ttl: ClaimTtl,
    ) -> Result<Vec<Claim>, Error> {
        for key in keys {
            key::check(scope, key)?;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::random()).collect();
        let (life, _, slack) = claim_ms(ttl);
        self.note_slack(slack);
        let prefix = self.inner.config.prefix();
        let mut pipe = redis::pipe();
        for (key, &token) in keys.iter().zip(&tokens) {
            pipe.add_command(command::fresh_claim(prefix, scope, key, token, slack, life));
        }
        let mut conn = self.conn();
        let n = keys.len();
        let replies = self
            .deadline("claim_many", async move {
                conn.send_packed_commands(&pipe, 0, n).await
            })
            .await?;
        expect_len("claim_many", &replies, n)?;
        let mut claims = Vec::with_capacity(n);
        let mut rest = Vec::new();
        for (i, (reply, (key, &token))) in replies.iter().zip(keys.iter().zip(&tokens)).enumerate()
        {
            let claim = read_fresh_claim(reply, scope, key, token);
            if claim.is_none() {
                rest.push(i);
            }
            claims.push(claim);
        }
        if !rest.is_empty() {
            let rest_keys: Vec<&str> = rest.iter().map(|&i| keys[i].as_str()).collect();
            let rest_tokens: Vec<LeaseToken> = rest.iter().map(|&i| tokens[i]).collect();
            match self
                .claim_scripted("claim_many", scope, &rest_keys, &rest_tokens, ttl)
                .await
            {
                Ok(answers) => {
                    for (&i, answer) in rest.iter().zip(answers) {
                        claims[i] = Some(answer);
                    }
                }
                Err(e) => {
                    // Redis answered: the script changed nothing, so the
                    // batch changes nothing once its fresh claims go.
                    if matches!(e, Error::Backend { .. }) {
                        // What the pipeline wrote for the keys it found
                        // absent: record key and value.
                        let fresh: Vec<(String, Vec<u8>)> = replies
                            .iter()
                            .zip(keys.iter().zip(&tokens))
                            .filter(|(reply, _)| matches!(reply, Value::Nil))
                            .map(|(_, (key, &token))| {
                                (
                                    self.key_unchecked(scope, key),
                                    record::fresh_claim(token, slack),
                                )
                            })
                            .collect();
                        self.unclaim(&fresh).await;
                    }
                    return Err(e);
                }
            }
        }
        claims
            .into_iter()
            .collect::<Option<Vec<Claim>>>()
            .ok_or_else(|| error::unexpected("claim_many", "a key without an answer".into()))
    }

    async fn complete_many(
        &self,
        leases: &[Lease],
        keep_for: Duration,
    ) -> Result<Vec<Fenced>, Error> {
        for lease in leases {
            key::check(&lease.scope, &lease.key)?;
        }
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = leases
            .chunks(MAX_KEYS_PER_CALL)
            .map(|chunk| self.settle_cmd(DONE, chunk, keep_for))
            .collect();
        let replies = self
            .eval_batch("complete_many", &scripts::SETTLE, cmds)
            .await?;
        let mut fenced = Vec::with_capacity(leases.len());
        for (reply, chunk) in replies.into_iter().zip(leases.chunks(MAX_KEYS_PER_CALL)) {
            let reply = self.server_reply("complete_many", reply)?;
            fenced.extend(parse_settled("complete_many", reply, chunk.len())?);
        }
        Ok(fenced)
    }
}

/// Milliseconds for Redis: rounded up, so a short lease never becomes 0,
/// and capped at [`MAX_MS`].
fn ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(MAX_MS).min(MAX_MS)
}

/// Life, lease and slack of a claim, ms, as `claim.lua` takes them: the
/// record lives `max(lease, retain, 1)` and outlives its lease by the
/// slack.
fn claim_ms(ttl: ClaimTtl) -> (u64, u64, u64) {
    let lease = ms(ttl.lease);
    let life = lease.max(ms(ttl.retain)).max(1);
    (life, lease, life - lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_up_and_cap() {
        assert_eq!(ms(Duration::ZERO), 0);
        assert_eq!(ms(Duration::from_micros(1)), 1);
        assert_eq!(ms(Duration::from_millis(400)), 400);
        assert_eq!(ms(Duration::from_micros(400_001)), 401);
        assert_eq!(ms(Duration::MAX), MAX_MS);
    }
}
