//! The SQL text of every statement, and the decoding of their rows.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::types::PgInterval;

use idemq::{Claim, Error, Lease, LeaseToken, RecordState, Revival};

use crate::error::backend;
use crate::ident::TableName;

/// How often a claim is tried again when its row changed or vanished
/// between the upsert and the read of the current state (a concurrent
/// `forget`, `purge` or `fail`). Each retry is a fresh statement.
pub(super) const CLAIM_RACE_RETRIES: usize = 16;

/// Longest duration bound into SQL (100 years): longer ones are clamped so
/// that `now() + d` never leaves the timestamp range.
pub(super) const MAX_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

pub(crate) fn interval(d: Duration) -> PgInterval {
    let micros = i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_MICROS);
    PgInterval {
        months: 0,
        days: 0,
        microseconds: micros,
    }
}

pub(super) fn micros_to_duration(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

pub(super) fn token_to_sql(t: LeaseToken) -> i64 {
    i64::from_ne_bytes(t.0.to_ne_bytes())
}

pub(super) fn attempts_from_sql(a: i32) -> u32 {
    u32::try_from(a).unwrap_or(0)
}

pub(super) fn state_from_sql(op: &'static str, s: &str) -> Result<RecordState, Error> {
    match s {
        "claimed" => Ok(RecordState::Claimed),
        "released" => Ok(RecordState::Released),
        "done" => Ok(RecordState::Done),
        "dead" => Ok(RecordState::Dead),
        other => Err(backend(
            op,
            false,
            format!("unknown record state {other:?} in the dedup table"),
        )),
    }
}

/// A revive statement's answer for one row: removed (with the state it
/// had, `None` when expired), or left alone (done, or a live lease; or a
/// row a concurrent claim made live before the DELETE could remove it,
/// which the statement's snapshot may still show as dead, released or
/// lapsed: left alone either way, the safe answer).
pub(super) fn revival(
    removed: bool,
    state: Option<String>,
    lease_us: i64,
) -> Result<Revival, Error> {
    let state = match state {
        Some(s) => Some(state_from_sql("revive", &s)?),
        None => None,
    };
    Ok(match (removed, state) {
        (true, previous) => Revival::Revived { previous },
        (false, Some(RecordState::Done)) => Revival::Done,
        (false, _) => Revival::InProgress {
            retry_after: micros_to_duration(lease_us),
        },
    })
}

/// The SQL text of every statement, rendered once for the table.
#[derive(Debug)]
pub(crate) struct Statements {
    pub(super) claim: Arc<str>,
    pub(super) claim_many: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) complete_many: Arc<str>,
    pub(super) fail: Arc<str>,
    pub(super) bury: Arc<str>,
    pub(super) get: Arc<str>,
    pub(super) lease_state: Arc<str>,
    pub(super) forget: Arc<str>,
    pub(super) revive: Arc<str>,
    pub(super) revive_many: Arc<str>,
    pub(super) purge: Arc<str>,
    /// The live records of every scope, counted by state.
    pub(super) count_states: Arc<str>,
    /// The live records of one scope, counted by state.
    pub(super) count_states_in_scope: Arc<str>,
    /// The done mark written inside a handler's transaction (clock_timestamp,
    /// as `now()` is the transaction's start there).
    pub(crate) done_in_tx: Arc<str>,
}

/// The shared `ON CONFLICT` arm of both claim statements: take over an
/// expired record (attempts start again at 1), a released one or a lapsed
/// lease (attempts + 1); leave everything else alone, so the upsert returns
/// no row for it.
const CLAIM_CONFLICT: &str = "
    ON CONFLICT (scope, key) DO UPDATE SET
        state = 'claimed',
        token = excluded.token,
        attempts = CASE WHEN d.expires_at <= now() THEN 1 ELSE d.attempts + 1 END,
        lease_until = excluded.lease_until,
        expires_at = CASE WHEN d.expires_at <= now() THEN excluded.expires_at
                          ELSE greatest(d.expires_at, excluded.expires_at) END
    WHERE d.expires_at <= now()
       OR d.state = 'released'
       OR (d.state = 'claimed' AND d.lease_until <= now())";

/// Microseconds from now (database clock) until `col`.
fn micros_until(col: &str) -> String {
    format!("(extract(epoch FROM {col} - now()) * 1000000)::bigint")
}

impl Statements {
    pub(super) fn new(table: &TableName) -> Statements {
        let t = table.quoted();
        let lease_us = micros_until("d.lease_until");
        let expires_us = micros_until("d.expires_at");
        // The unexpired rows (of scope $1 when `scope` says so) counted per
        // state, claims split into live and lapsed leases. Answers
        // (state, lapsed, count) rows. Two texts rather than one with
        // `$1 IS NULL OR ...`, whose generic plan could not use the
        // primary key to find one scope's rows.
        let count = |scope: &str| -> Arc<str> {
            format!(
                "SELECT d.state, d.state = 'claimed' AND d.lease_until <= now(), count(*)
                 FROM {t} AS d
                 WHERE d.expires_at > now(){scope}
                 GROUP BY 1, 2"
            )
            .into()
        };
        // A fenced update of the caller's claim; `settled` is the state a
        // settlement leaves, which the same lease finds when it retries
        // (the answer of the first call lost): the row then matches again,
        // and the `CASE`s in `set` leave it as it is.
        let fenced = |set: &str, settled: &str| -> Arc<str> {
            format!(
                "UPDATE {t} AS d SET {set}
                 WHERE d.scope = $1 AND d.key = $2 AND d.token = $3
                   AND d.state IN ('claimed'{settled}) AND d.expires_at > now()"
            )
            .into()
        };
        let keep =
            "expires_at = CASE WHEN d.state = 'claimed' THEN now() + $4 ELSE d.expires_at END";
        Statements {
            // $1 scope, $2 key, $3 token, $4 lease, $5 record lifetime.
            // Answers one row: (won, state, attempts, lease µs left, expired).
            // The second branch reads the row the upsert left alone; it uses
            // the statement's snapshot, so a row committed concurrently may
            // be missing there: the caller then runs the statement again.
            claim: format!(
                "WITH ins AS (
                    INSERT INTO {t} AS d (scope, key, state, token, attempts, lease_until, expires_at)
                    VALUES ($1, $2, 'claimed', $3, 1, now() + $4, now() + $5)
                    {CLAIM_CONFLICT}
                    RETURNING d.attempts
                 )
                 SELECT true, 'claimed'::text, ins.attempts, 0::bigint, false FROM ins
                 UNION ALL
                 SELECT false, d.state, d.attempts, {lease_us}, d.expires_at <= now()
                 FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND NOT EXISTS (SELECT 1 FROM ins)"
            )
            .into(),
            // $1 scope, $2 keys (distinct), $3 tokens, $4 lease, $5 lifetime.
            // Rows are inserted in key order, so concurrent batches lock in
            // the same order. Answers (key, won, state, attempts, lease µs, expired).
            // The read of the rows left alone is skipped when all were taken;
            // it takes the scope from the input rows, not from `$1`, so the
            // plan is always one primary-key probe per key, whatever the
            // statistics say about the scope (a custom plan for a scope the
            // statistics have not seen yet could otherwise scan all of it).
            claim_many: format!(
                "WITH input AS MATERIALIZED (
                    SELECT $1::text AS scope, k.key, k.token
                    FROM unnest($2::text[], $3::bigint[]) AS k(key, token)
                 ), ins AS (
                    INSERT INTO {t} AS d (scope, key, state, token, attempts, lease_until, expires_at)
                    SELECT $1, i.key, 'claimed', i.token, 1, now() + $4, now() + $5
                    FROM input AS i ORDER BY i.key
                    {CLAIM_CONFLICT}
                    RETURNING d.key, d.attempts
                 )
                 SELECT ins.key, true, 'claimed'::text, ins.attempts, 0::bigint, false FROM ins
                 UNION ALL
                 SELECT d.key, false, d.state, d.attempts, {lease_us}, d.expires_at <= now()
                 FROM input AS i JOIN {t} AS d ON d.scope = i.scope AND d.key = i.key
                 WHERE (SELECT count(*) FROM ins) < cardinality($2::text[])
                   AND NOT EXISTS (SELECT 1 FROM ins WHERE ins.key = i.key)"
            )
            .into(),
            // $4: the new lease.
            renew: fenced(
                "lease_until = now() + $4, expires_at = greatest(d.expires_at, now() + $4)",
                "",
            ),
            // $4: keep_for.
            complete: fenced(&format!("state = 'done', {keep}"), ", 'done'"),
            // $4: 1 to refund the attempt, 0 to keep it.
            fail: fenced(
                "state = 'released',
                 lease_until = CASE WHEN d.state = 'claimed' THEN now() ELSE d.lease_until END,
                 attempts = CASE WHEN d.state = 'claimed' THEN greatest(d.attempts - $4, 0)
                            ELSE d.attempts END",
                ", 'released'",
            ),
            // $4: keep_for.
            bury: fenced(&format!("state = 'dead', {keep}"), ", 'dead'"),
            // $1 scopes, $2 keys, $3 tokens, $4 keep_for. Answers the applied
            // ones (those already done by the same lease included), and
            // whether each row is still live after it (keep_for zero
            // expires a row it completes at once). The rows are locked in
            // (scope, key) order first, the order claim_many inserts in:
            // an UPDATE locks in whatever order its join yields, which
            // deadlocks against a concurrent claim_many of the same keys.
            complete_many: format!(
                "WITH l AS MATERIALIZED (
                    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
                        AS l(scope, key, token)
                 ), locked AS (
                    SELECT d.scope, d.key, d.token
                    FROM {t} AS d JOIN l
                        ON d.scope = l.scope AND d.key = l.key AND d.token = l.token
                    WHERE d.state IN ('claimed', 'done') AND d.expires_at > now()
                    ORDER BY d.scope, d.key
                    FOR UPDATE OF d
                 )
                 UPDATE {t} AS d SET state = 'done', {keep}
                 FROM locked AS l
                 WHERE d.scope = l.scope AND d.key = l.key AND d.token = l.token
                   AND d.state IN ('claimed', 'done') AND d.expires_at > now()
                 RETURNING d.scope, d.key, d.token, d.expires_at > now()"
            )
            .into(),
            // $1 scope, $2 key, $3 token: the state of the row while it
            // carries that token.
            lease_state: format!(
                "SELECT d.state FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND d.token = $3 AND d.expires_at > now()"
            )
            .into(),
            get: format!(
                "SELECT d.state, d.attempts, {lease_us}, {expires_us}
                 FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND d.expires_at > now()"
            )
            .into(),
            forget: format!(
                "DELETE FROM {t} AS d WHERE d.scope = $1 AND d.key = $2
                 RETURNING d.expires_at > now()"
            )
            .into(),
            // $1 scopes, $2 keys (distinct pairs): `revive` for many rows in
            // one statement. Answers (scope, key, removed, state, lease µs)
            // for each row there was. The rows to delete are locked in
            // (scope, key) order first, the order claim_many takes them in:
            // a DELETE joined to its input locks in whatever order the join
            // yields, which deadlocks against a concurrent claim_many. The
            // lock re-checks the condition on a row changed meanwhile, so a
            // row that became done or live is not locked, and not deleted.
            revive_many: format!(
                "WITH input AS MATERIALIZED (
                    SELECT i.scope, i.key FROM unnest($1::text[], $2::text[]) AS i(scope, key)
                 ), locked AS (
                    SELECT d.scope, d.key
                    FROM {t} AS d JOIN input AS i ON d.scope = i.scope AND d.key = i.key
                    WHERE d.expires_at <= now()
                       OR d.state IN ('dead', 'released')
                       OR (d.state = 'claimed' AND d.lease_until <= now())
                    ORDER BY d.scope, d.key
                    FOR UPDATE OF d
                 ), gone AS (
                    DELETE FROM {t} AS d USING locked AS i
                    WHERE d.scope = i.scope AND d.key = i.key
                      AND (d.expires_at <= now()
                           OR d.state IN ('dead', 'released')
                           OR (d.state = 'claimed' AND d.lease_until <= now()))
                    RETURNING d.scope, d.key,
                        CASE WHEN d.expires_at <= now() THEN NULL ELSE d.state END AS previous
                 )
                 SELECT gone.scope, gone.key, true, gone.previous, 0::bigint FROM gone
                 UNION ALL
                 SELECT d.scope, d.key, false, d.state, {lease_us}
                 FROM input AS i JOIN {t} AS d ON d.scope = i.scope AND d.key = i.key
                 WHERE d.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM gone AS g WHERE g.scope = i.scope AND g.key = i.key)"
            )
            .into(),
            // $1 scope, $2 key. Deletes a dead, released, lapsed or expired
            // row; a done row and a live lease are left alone. Answers no
            // row when there was none, else (removed, state, lease µs):
            // the deleted row's state (NULL when it had expired), or the
            // state of the row left alone. The DELETE re-checks its
            // condition on the newest version of a row changed
            // concurrently, so a row that became done or live meanwhile is
            // never deleted; the second branch then reads the statement's
            // snapshot, which may still show the older state.
            revive: format!(
                "WITH gone AS (
                    DELETE FROM {t} AS d
                    WHERE d.scope = $1 AND d.key = $2
                      AND (d.expires_at <= now()
                           OR d.state IN ('dead', 'released')
                           OR (d.state = 'claimed' AND d.lease_until <= now()))
                    RETURNING CASE WHEN d.expires_at <= now() THEN NULL ELSE d.state END AS previous
                 )
                 SELECT true, gone.previous, 0::bigint FROM gone
                 UNION ALL
                 SELECT false, d.state, {lease_us}
                 FROM {t} AS d
                 WHERE d.scope = $1 AND d.key = $2 AND d.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM gone)"
            )
            .into(),
            // $1: batch size. The oldest expired rows are picked through the
            // expires_at index (ORDER BY makes the LIMIT stop the index scan
            // early) and deleted by ctid (a TID scan); rows locked by a
            // concurrent claim are skipped, the expiry is checked again.
            purge: format!(
                "DELETE FROM {t} AS d
                 WHERE d.ctid = ANY(ARRAY(
                        SELECT e.ctid FROM {t} AS e
                        WHERE e.expires_at <= now()
                        ORDER BY e.expires_at
                        LIMIT $1
                        FOR UPDATE SKIP LOCKED))
                   AND d.expires_at <= now()"
            )
            .into(),
            count_states: count(""),
            // $1: the scope.
            count_states_in_scope: count(" AND d.scope = $1"),
            done_in_tx: format!(
                "UPDATE {t} AS d SET state = 'done', expires_at = clock_timestamp() + $4
                 WHERE d.scope = $1 AND d.key = $2 AND d.token = $3
                   AND d.state = 'claimed' AND d.expires_at > clock_timestamp()"
            )
            .into(),
        }
    }
}

/// What a claim row says, before it becomes a [`Claim`].
pub(super) enum Answer {
    Final(Claim),
    /// The row changed under the statement (or vanished): claim again.
    Again,
}

pub(super) type ClaimRow = (bool, String, i32, i64, bool);

pub(super) fn answer(row: ClaimRow, lease: impl FnOnce(u32) -> Lease) -> Result<Answer, Error> {
    let (won, state, attempts, lease_us, expired) = row;
    if won {
        return Ok(Answer::Final(Claim::Claimed(lease(attempts_from_sql(
            attempts,
        )))));
    }
    if expired {
        return Ok(Answer::Again);
    }
    Ok(match state_from_sql("claim", &state)? {
        RecordState::Done => Answer::Final(Claim::Done),
        RecordState::Dead => Answer::Final(Claim::Dead),
        RecordState::Claimed if lease_us > 0 => Answer::Final(Claim::InProgress {
            retry_after: micros_to_duration(lease_us),
        }),
        // Claimable, yet the upsert did not take it: it changed meanwhile.
        RecordState::Claimed | RecordState::Released => Answer::Again,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped() {
        assert_eq!(interval(Duration::MAX).microseconds, MAX_MICROS);
        assert_eq!(interval(Duration::from_millis(5)).microseconds, 5000);
        assert_eq!(micros_to_duration(-5), Duration::ZERO);
    }

    #[test]
    fn statements_quote_the_table() {
        let t = TableName::parse("app.x").unwrap();
        let s = Statements::new(&t);
        assert!(s.claim.contains("INSERT INTO \"app\".\"x\" AS d"));
        assert!(s.purge.contains("FOR UPDATE SKIP LOCKED"));
        assert!(s.count_states.contains("FROM \"app\".\"x\" AS d"));
        assert!(!s.count_states.contains("$1"));
        assert!(s.count_states_in_scope.contains("d.scope = $1"));
    }
}
