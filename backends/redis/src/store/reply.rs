//! Reading what Redis and the scripts answer, strictly: anything but the
//! documented replies is a permanent error (the server runs something
//! else than our scripts, or the data under a key is not ours).

use std::time::Duration;

use idemq::{Claim, Error, Fenced, Lease, LeaseToken, Record, RecordState, Revival};
use redis::Value;

use crate::error;
use crate::record::{self, DEAD, DONE};

/// Reads what the `SET NX PX GET` of [`command::fresh_claim`] answered when
/// that decides the claim: nil (the key was absent: claimed, attempt 1), or
/// a done or dead record. `None` for anything else, which `claim.lua`
/// decides: a claimed or released record (its lease may have lapsed), or
/// something that is not a record (which it refuses with a clear error).
pub(super) fn read_fresh_claim(
    reply: &Value,
    scope: &str,
    key: &str,
    token: LeaseToken,
) -> Option<Claim> {
    match reply {
        Value::Nil => Some(Claim::Claimed(Lease {
            scope: scope.to_owned(),
            key: key.to_owned(),
            token,
            attempt: 1,
        })),
        Value::BulkString(old) => match record::state_letter(old)? {
            DONE => Some(Claim::Done),
            DEAD => Some(Claim::Dead),
            _ => None,
        },
        _ => None,
    }
}

/// What the `SET ... IFEQ <expected> GET` of [`crate::command::settle_if_equal`]
/// decides from its reply: applied when the key held `expected` (the
/// caller's claim as the store wrote it), or held the record this
/// settlement writes (the same lease settled it before and the answer was
/// lost); lease lost when it held nothing, or a record that is not the
/// caller's claim (every claim of this lease starts as `expected` does, up
/// to its last `:`; see [`crate::record`]). `None` (the script decides)
/// for the caller's claim with another slack, and for anything that is
/// not a record, or not a string.
pub(super) fn read_settled_if_equal(reply: &Value, expected: &[u8], state: &str) -> Option<Fenced> {
    let mine = expected
        .iter()
        .rposition(|&b| b == b':')
        .map_or(expected, |colon| &expected[..=colon]);
    // `<state>:<token>:<attempt>:0`, compared piece by piece.
    let settled = |old: &[u8]| {
        mine.len() > 1
            && old.len() == state.len() + mine.len()
            && old.starts_with(state.as_bytes())
            && old[state.len()..].starts_with(&mine[1..])
            && old.ends_with(b"0")
    };
    match reply {
        Value::Nil => Some(Fenced::LeaseLost),
        Value::BulkString(old) if old == expected => Some(Fenced::Applied),
        Value::BulkString(old) if old.starts_with(mine) => None,
        Value::BulkString(old) if settled(old) => Some(Fenced::Applied),
        Value::BulkString(old) => record::state_letter(old).map(|_| Fenced::LeaseLost),
        _ => None,
    }
}

pub(super) fn expect_len(op: &'static str, replies: &[Value], n: usize) -> Result<(), Error> {
    if replies.len() == n {
        Ok(())
    } else {
        Err(error::unexpected(
            op,
            format!("{} replies to {n} commands", replies.len()),
        ))
    }
}

fn int(op: &'static str, v: &Value) -> Result<i64, Error> {
    match v {
        Value::Int(n) => Ok(*n),
        other => Err(error::unexpected(
            op,
            format!("expected an integer, got {other:?}"),
        )),
    }
}

fn ms_duration(n: i64) -> Duration {
    Duration::from_millis(u64::try_from(n).unwrap_or(0))
}

/// Reads a reply of `claim.lua` over `keys`: an array of one integer per
/// key, in order, or for one key the integer alone. Anything else is an
/// error.
pub(super) fn parse_claims<K: AsRef<str>>(
    op: &'static str,
    reply: Value,
    scope: &str,
    keys: &[K],
    tokens: &[LeaseToken],
) -> Result<Vec<Claim>, Error> {
    let items = match reply {
        Value::Int(_) if keys.len() == 1 && tokens.len() == 1 => vec![reply],
        Value::Array(items)
            if items.len() == keys.len() && tokens.len() == keys.len() && keys.len() != 1 =>
        {
            items
        }
        other => {
            return Err(error::unexpected(
                op,
                format!("claim of {} keys answered {other:?}", keys.len()),
            ));
        }
    };
    items
        .iter()
        .zip(keys.iter().zip(tokens))
        .map(|(item, (key, &token))| parse_claim(op, item, scope, key.as_ref(), token))
        .collect()
}

/// Reads one key's answer of `claim.lua`: `4 * attempts` claimed, `1`
/// done, `2` dead, `4 * remaining lease ms + 3` in progress.
fn parse_claim(
    op: &'static str,
    item: &Value,
    scope: &str,
    key: &str,
    token: LeaseToken,
) -> Result<Claim, Error> {
    let n = int(op, item)?;
    match (n, n % 4) {
        (1, _) => Ok(Claim::Done),
        (2, _) => Ok(Claim::Dead),
        (4.., 0) => {
            let attempt = u32::try_from(n / 4).map_err(|_| {
                error::unexpected(op, format!("attempt count out of range: {}", n / 4))
            })?;
            Ok(Claim::Claimed(Lease {
                scope: scope.to_owned(),
                key: key.to_owned(),
                token,
                attempt,
            }))
        }
        (3.., 3) => Ok(Claim::InProgress {
            retry_after: ms_duration(n / 4),
        }),
        _ => Err(error::unexpected(op, format!("claim answered {n}"))),
    }
}

/// Reads a reply of `settle.lua` over `n` keys: an array of one integer
/// per key, or for one key the integer alone.
pub(super) fn parse_settled(
    op: &'static str,
    reply: Value,
    n: usize,
) -> Result<Vec<Fenced>, Error> {
    match reply {
        Value::Int(_) if n == 1 => Ok(vec![parse_fenced(op, reply)?]),
        Value::Array(items) if items.len() == n && n != 1 => items
            .into_iter()
            .map(|item| parse_fenced(op, item))
            .collect(),
        other => Err(error::unexpected(
            op,
            format!("{op} of {n} keys answered {other:?}"),
        )),
    }
}

pub(super) fn parse_fenced(op: &'static str, reply: Value) -> Result<Fenced, Error> {
    match reply {
        Value::Int(1) => Ok(Fenced::Applied),
        Value::Int(0) => Ok(Fenced::LeaseLost),
        other => Err(error::unexpected(op, format!("{op} answered {other:?}"))),
    }
}

/// The state a script answered as a record's state letter.
fn state_letter(op: &'static str, letter: &Value) -> Result<RecordState, Error> {
    match letter {
        Value::BulkString(s) => record::state(s).ok_or_else(|| {
            error::unexpected(
                op,
                format!("unknown record state {:?}", String::from_utf8_lossy(s)),
            )
        }),
        other => Err(error::unexpected(op, format!("record state {other:?}"))),
    }
}

/// `lua/revive.lua`'s reply: `{state, removed, lease ms left}`.
pub(super) fn parse_revival(reply: Value) -> Result<Revival, Error> {
    const OP: &str = "revive";
    let Value::Array(items) = reply else {
        return Err(error::unexpected(OP, format!("revive answered {reply:?}")));
    };
    let [state, removed, left] = items.as_slice() else {
        return Err(error::unexpected(OP, format!("revive answered {items:?}")));
    };
    let previous = match state {
        Value::BulkString(s) if s.as_slice() == b"-" => None,
        letter => Some(state_letter(OP, letter)?),
    };
    Ok(match (previous, int(OP, removed)?) {
        (previous, 1) => Revival::Revived { previous },
        (Some(RecordState::Done), _) => Revival::Done,
        (Some(RecordState::Claimed), _) => Revival::InProgress {
            retry_after: ms_duration(int(OP, left)?),
        },
        (other, _) => {
            return Err(error::unexpected(
                OP,
                format!("revive left a {other:?} record in place"),
            ));
        }
    })
}

/// Reads a reply of `get.lua`: nil, or `[state letter, attempts, lease ms
/// left, PTTL]`.
pub(super) fn parse_record(op: &'static str, reply: Value) -> Result<Option<Record>, Error> {
    let items = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) => items,
        other => return Err(error::unexpected(op, format!("get answered {other:?}"))),
    };
    let [state, attempts, lease_left, pttl] = items.as_slice() else {
        return Err(error::unexpected(op, format!("get answered {items:?}")));
    };
    let state = state_letter(op, state)?;
    let attempts = u32::try_from(int(op, attempts)?)
        .map_err(|_| error::unexpected(op, format!("attempt count out of range: {attempts:?}")))?;
    let lease_left = int(op, lease_left)?;
    let pttl = int(op, pttl)?;
    Ok(Some(Record {
        state,
        attempts,
        lease_remaining: (state == RecordState::Claimed).then(|| ms_duration(lease_left)),
        // A record without expiry is never written by this store; say "never".
        expires_in: if pttl < 0 {
            Duration::MAX
        } else {
            ms_duration(pttl)
        },
    }))
}

/// Reads the `GET` of `lease_state`: the state of the record when it is
/// `token`'s (any claim, settlement or release of that lease), `None`
/// when the key is absent or holds another token's record.
pub(super) fn parse_lease_state(
    reply: Value,
    token: LeaseToken,
) -> Result<Option<RecordState>, Error> {
    const OP: &str = "lease_state";
    match reply {
        Value::Nil => Ok(None),
        Value::BulkString(old) => {
            let Some((state, owner, _)) = record::fields(&old) else {
                return Err(error::unexpected(
                    OP,
                    "the key holds a string that is not a dedup record".into(),
                ));
            };
            if owner != token.to_string() {
                return Ok(None);
            }
            Ok(record::state(state.as_bytes()))
        }
        other => Err(error::unexpected(OP, format!("GET answered {other:?}"))),
    }
}

/// Reads the reply of a `DEL` of one key: whether it deleted it.
pub(super) fn parse_deleted(op: &'static str, reply: Value) -> Result<bool, Error> {
    match reply {
        Value::Int(n) => Ok(n > 0),
        other => Err(error::unexpected(op, format!("DEL answered {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_claim_decides_only_what_it_can() {
        let token = LeaseToken(7);
        let read = |v: Value| read_fresh_claim(&v, "s", "k", token);
        assert_eq!(
            read(Value::Nil),
            Some(Claim::Claimed(Lease {
                scope: "s".into(),
                key: "k".into(),
                token,
                attempt: 1
            }))
        );
        let old = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(read(old("d:00ff:3:0")), Some(Claim::Done));
        assert_eq!(read(old("x:00ff:9:0")), Some(Claim::Dead));
        // Left to claim.lua: live or lapsed claims, released records, and
        // anything that is not a record (it refuses them).
        for other in [
            old("c:00ff:1:30000"),
            old("r:00ff:2:30000"),
            old("d:00ff:1700000000000:3"),
            old("d:00ff:3"),
            old("d:00ff:3:0:1"),
            old("d:xyz:3:0"),
            old("d::3:0"),
            old("d:00ff:-3:0"),
            old("done"),
            Value::BulkString(vec![0xff, b':']),
            Value::Okay,
            Value::Int(1),
            Value::Array(vec![]),
        ] {
            assert_eq!(read(other.clone()), None, "{other:?}");
        }
    }

    #[test]
    fn a_set_ifeq_decides_only_what_it_can() {
        let expected = "c:0000000000000007:2:540000";
        let read = |v: Value| read_settled_if_equal(&v, expected.as_bytes(), "d");
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(read(bulk(expected)), Some(Fenced::Applied));
        // This lease's own done record: a completion retried.
        assert_eq!(read(bulk("d:0000000000000007:2:0")), Some(Fenced::Applied));
        assert_eq!(read(Value::Nil), Some(Fenced::LeaseLost));
        for other in [
            "c:0000000000000008:3:540000",
            "c:0000000000000007:1:540000",
            "r:0000000000000007:2:540000",
            "d:0000000000000007:1:0",
            "d:0000000000000007:2:00",
            "d:0000000000000008:2:0",
            "x:0000000000000007:2:0",
            "x:0000000000000009:5:0",
        ] {
            assert_eq!(read(bulk(other)), Some(Fenced::LeaseLost), "{other}");
        }
        // The caller's claim with another slack (a renewed lease), or not
        // a record: the script decides (and refuses what is no record).
        for undecided in [
            bulk("c:0000000000000007:2:1000"),
            bulk("c:0000000000000007:2:"),
            bulk("not a record"),
            bulk("d:7:2:0:extra"),
            Value::Int(1),
            Value::Okay,
        ] {
            assert_eq!(read(undecided.clone()), None, "{undecided:?}");
        }
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let token = LeaseToken(7);
        let claim = |n| {
            let mut claims = parse_claims("claim", Value::Int(n), "s", &["k"], &[token])?;
            assert_eq!(claims.len(), 1);
            Ok::<_, Error>(claims.remove(0))
        };
        assert_eq!(
            claim(4 * 3).expect("claimed"),
            Claim::Claimed(Lease {
                scope: "s".into(),
                key: "k".into(),
                token,
                attempt: 3
            })
        );
        assert_eq!(claim(1).expect("done"), Claim::Done);
        assert_eq!(claim(2).expect("dead"), Claim::Dead);
        assert_eq!(
            claim(4 * 1500 + 3).expect("busy"),
            Claim::InProgress {
                retry_after: Duration::from_millis(1500)
            }
        );
        for n in [0, 5, 6, 9, 10, -1, -3, -4, 4 * (1 << 33)] {
            let e = claim(n).expect_err("must be rejected");
            assert!(!e.is_transient());
        }
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(4)]),
            Value::BulkString(b"4".to_vec()),
            Value::Array(vec![Value::Int(4), Value::Int(1)]),
        ] {
            let e = parse_claims("claim", bad, "s", &["k"], &[token]).expect_err("rejected");
            assert!(!e.is_transient());
        }
        for bad in [
            Value::Int(4),
            Value::Array(vec![Value::Int(4)]),
            Value::Array(vec![Value::Int(4), Value::Nil]),
            Value::Array(vec![Value::Int(4), Value::Int(4), Value::Int(4)]),
        ] {
            let e = parse_claims("claim", bad, "s", &["k", "l"], &[token, token])
                .expect_err("rejected");
            assert!(!e.is_transient());
        }
        // Many keys: one answer each, in order.
        let many = parse_claims(
            "claim_many",
            Value::Array(vec![Value::Int(4), Value::Int(4 * 20 + 3), Value::Int(1)]),
            "s",
            &["a", "b", "c"],
            &[LeaseToken(1), LeaseToken(2), LeaseToken(3)],
        )
        .expect("three answers");
        assert_eq!(
            many,
            vec![
                Claim::Claimed(Lease {
                    scope: "s".into(),
                    key: "a".into(),
                    token: LeaseToken(1),
                    attempt: 1
                }),
                Claim::InProgress {
                    retry_after: Duration::from_millis(20)
                },
                Claim::Done,
            ]
        );
        assert_eq!(
            parse_settled(
                "complete_many",
                Value::Array(vec![Value::Int(1), Value::Int(0)]),
                2
            )
            .expect("two answers"),
            vec![Fenced::Applied, Fenced::LeaseLost]
        );
        assert_eq!(
            parse_settled("complete", Value::Int(0), 1).expect("one answer"),
            vec![Fenced::LeaseLost]
        );
        for (bad, n) in [
            (Value::Int(1), 2),
            (Value::Array(vec![Value::Int(1)]), 1),
            (Value::Array(vec![Value::Int(1)]), 2),
            (Value::Array(vec![Value::Int(1), Value::Int(2)]), 2),
        ] {
            assert!(parse_settled("complete", bad, n).is_err());
        }
        assert_eq!(
            parse_fenced("renew", Value::Int(1)).expect("ok"),
            Fenced::Applied
        );
        assert_eq!(
            parse_fenced("renew", Value::Int(0)).expect("ok"),
            Fenced::LeaseLost
        );
        assert!(parse_fenced("renew", Value::Int(2)).is_err());
        assert_eq!(parse_record("get", Value::Nil).expect("absent"), None);
        let record = parse_record(
            "get",
            Value::Array(vec![
                Value::BulkString(b"c".to_vec()),
                Value::Int(2),
                Value::Int(-5),
                Value::Int(1000),
            ]),
        )
        .expect("record")
        .expect("present");
        assert_eq!(
            record,
            Record {
                state: RecordState::Claimed,
                attempts: 2,
                lease_remaining: Some(Duration::ZERO),
                expires_in: Duration::from_secs(1),
            }
        );
        assert!(
            parse_record(
                "get",
                Value::Array(vec![
                    Value::BulkString(b"claimed".to_vec()),
                    Value::Int(2),
                    Value::Int(0),
                    Value::Int(0),
                ]),
            )
            .is_err()
        );
    }
}
