//! [`RedisDedupStore::scan_states`]: the records of a store counted by
//! state, for an operator's `idemq stats`, with a bounded `SCAN`.

use idemq::{Error, RecordCounts, key};
use redis::Value;

use super::RedisDedupStore;
use super::reply::expect_len;
use crate::error;
use crate::{command, record};

/// The operation name in errors.
const OP: &str = "scan_states";

/// The `COUNT` of every `SCAN` call: about how many keys one call looks
/// at, and so how many records one pipelined read covers.
const SCAN_COUNT: u64 = 250;

/// What [`RedisDedupStore::scan_states`] found: the records it counted
/// by state, how many keys it looked at, and whether that was all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordScan {
    /// The records counted, by state. When the scan is not
    /// [`complete`](RecordScan::complete), these are the records among the
    /// keys scanned only: a sample of the store, not its totals.
    pub counts: RecordCounts,
    /// How many keys the scan met under the store's prefix (and the scope,
    /// when one was given): the records counted, and the keys skipped
    /// (values that are not records, keys that expired before they were
    /// read).
    pub scanned: u64,
    /// True when the scan went through the whole key space (the `SCAN`
    /// cursor came back to 0); false when it stopped at `max_keys` first,
    /// and [`counts`](RecordScan::counts) are then an estimate.
    pub complete: bool,
}

impl RedisDedupStore {
    /// Counts the store's records by state, for an operator's `idemq
    /// stats`: of one `scope`, or of every scope when `None`.
    ///
    /// Walks the keys under the store's prefix with `SCAN <cursor> MATCH
    /// <prefix>{<scope>:*} COUNT 250` (`<prefix>{*:*}` for every scope; the
    /// prefix's glob characters escaped), and reads each batch of keys it
    /// answers with one pipeline of `GET` and `PTTL` per key: two round
    /// trips per batch, each bounded by [`RedisConfig::response_timeout`]
    /// (a transient [`Error`] past it). A record counts as the scripts read
    /// it: a claim whose TTL is above its slack is
    /// [`claimed`](RecordCounts::claimed), any other claim
    /// [`lapsed`](RecordCounts::lapsed); `r` is released, `d` done, `x`
    /// dead. A key whose value is not a record (another type, a string of
    /// another form) is skipped: it counts in
    /// [`scanned`](RecordScan::scanned) only, and is no error.
    ///
    /// The scan stops once it has met `max_keys` keys (after the batch that
    /// reached it, so [`scanned`](RecordScan::scanned) may pass `max_keys`
    /// by up to a batch) or when the cursor comes back to 0, whichever
    /// comes first; [`RecordScan::complete`] says which. **An incomplete
    /// scan's counts are an estimate**: the records among the keys scanned,
    /// in `SCAN`'s order (by hash bucket, so in effect a random sample of
    /// a large key space), at most the store's totals. `max_keys` bounds the keys
    /// under the prefix, not the work: `SCAN` looks at the database's
    /// other keys too, about 250 per call, so a database holding many keys
    /// besides the store's takes many calls.
    ///
    /// Even a complete scan is no snapshot: `SCAN` answers every key that
    /// exists throughout the scan, but a key written or deleted meanwhile
    /// may or may not count, a record that changes state between its batch
    /// and the end counts in the state it had when read, and a key may be
    /// answered (and counted) twice when Redis resizes its hash table
    /// during the scan. On Redis Cluster a scan sees the keys of the node
    /// it talks to only. For exact counts use a store that counts in one
    /// statement (the Postgres one).
    ///
    /// An invalid `scope` is [`Error::InvalidInput`], as is a `max_keys`
    /// of 0.
    ///
    /// [`RedisConfig::response_timeout`]: crate::RedisConfig::response_timeout
    pub async fn scan_states(
        &self,
        scope: Option<&str>,
        max_keys: u64,
    ) -> Result<RecordScan, Error> {
        if let Some(scope) = scope {
            key::check_scope(scope)?;
        }
        if max_keys == 0 {
            return Err(Error::invalid("max_keys", "must be at least 1"));
        }
        let pattern = command::record_pattern(self.inner.config.prefix(), scope);
        let mut found = RecordScan::default();
        let mut cursor = b"0".to_vec();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(&cursor[..])
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let reply = self.send(OP, cmd).await?;
            let (next, keys) = parse_scan(self.server_reply(OP, reply)?)?;
            found.scanned += keys.len() as u64;
            if !keys.is_empty() {
                self.count_batch(keys, &mut found.counts).await?;
            }
            if next == b"0" {
                found.complete = true;
                return Ok(found);
            }
            if found.scanned >= max_keys {
                return Ok(found);
            }
            cursor = next;
        }
    }

    /// Reads `keys` (one pipeline of `GET` and `PTTL` per key, one round
    /// trip) and adds their records to `counts`.
    async fn count_batch(
        &self,
        keys: Vec<Vec<u8>>,
        counts: &mut RecordCounts,
    ) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("GET").arg(&key[..]);
            pipe.cmd("PTTL").arg(&key[..]);
        }
        let n = pipe.len();
        let mut conn = self.conn();
        let replies = self
            .deadline(
                OP,
                async move { conn.send_packed_commands(&pipe, 0, n).await },
            )
            .await?;
        expect_len(OP, &replies, n)?;
        let mut replies = replies.into_iter();
        while let (Some(value), Some(pttl)) = (replies.next(), replies.next()) {
            let value = match value {
                // Another type: no record.
                Value::ServerError(e) if e.code() == "WRONGTYPE" => continue,
                other => self.server_reply(OP, other)?,
            };
            let pttl = match self.server_reply(OP, pttl)? {
                Value::Int(n) => n,
                other => {
                    return Err(error::unexpected(OP, format!("PTTL answered {other:?}")));
                }
            };
            // Nil: expired or deleted since the SCAN.
            if let Value::BulkString(value) = value {
                tally(counts, &value, pttl);
            }
        }
        Ok(())
    }
}

/// Reads a `SCAN` reply: `[next cursor, [key, ...]]`.
fn parse_scan(reply: Value) -> Result<(Vec<u8>, Vec<Vec<u8>>), Error> {
    let bad = |what: &Value| error::unexpected(OP, format!("SCAN answered {what:?}"));
    let Value::Array(items) = &reply else {
        return Err(bad(&reply));
    };
    let [Value::BulkString(cursor), Value::Array(keys)] = items.as_slice() else {
        return Err(bad(&reply));
    };
    let keys = keys
        .iter()
        .map(|key| match key {
            Value::BulkString(key) => Ok(key.clone()),
            _ => Err(bad(&reply)),
        })
        .collect::<Result<_, _>>()?;
    Ok((cursor.clone(), keys))
}

/// Counts the record `value`, whose key's `PTTL` is `pttl`, in its state,
/// as the scripts read it (see [`crate::record`]): a claim holds its lease
/// while the TTL is above its slack. Answers false, counting nothing, for
/// a value that is not a record, or a key gone by the time of its `PTTL`.
fn tally(counts: &mut RecordCounts, value: &[u8], pttl: i64) -> bool {
    let Some((state, _, slack)) = record::fields(value) else {
        return false;
    };
    if pttl == -2 {
        return false;
    }
    let slot = match state {
        // A record without a TTL (-1; never written by the store) holds no
        // lease, as in the scripts.
        record::CLAIMED if i128::from(pttl) > i128::from(slack) => &mut counts.claimed,
        record::CLAIMED => &mut counts.lapsed,
        record::RELEASED => &mut counts.released,
        record::DONE => &mut counts.done,
        record::DEAD => &mut counts.dead,
        _ => return false,
    };
    *slot += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_count_as_the_scripts_read_them() {
        let mut counts = RecordCounts::default();
        let token = "5f0e1d2c3b4a5968";
        for (value, pttl, counted) in [
            (format!("c:{token}:1:30000"), 30_001, true), // live
            (format!("c:{token}:1:30000"), 30_000, true), // lapsed, just
            (format!("c:{token}:2:0"), -1, true),         // no TTL: lapsed
            (format!("c:{token}:2:99999999999999999999"), 5_000, true), // lapsed
            (format!("r:{token}:1:0"), 1_000, true),
            (format!("d:{token}:1:0"), 1_000, true),
            (format!("x:{token}:3:0"), 1_000, true),
            (format!("d:{token}:1:0"), -2, false), // gone
            (format!("q:{token}:1:0"), 1_000, false),
            (format!("c:{token}:12345678901:0"), 1_000, false),
            (format!("c:{token}:1:0:0"), 1_000, false),
            ("c:xyz:1:0".to_owned(), 1_000, false),
            ("hello".to_owned(), 1_000, false),
        ] {
            assert_eq!(
                tally(&mut counts, value.as_bytes(), pttl),
                counted,
                "{value}"
            );
        }
        assert_eq!(
            counts,
            RecordCounts {
                claimed: 1,
                lapsed: 3,
                released: 1,
                done: 1,
                dead: 1,
            }
        );
    }

    #[test]
    fn scan_replies_are_read_strictly() {
        let (cursor, keys) = parse_scan(Value::Array(vec![
            Value::BulkString(b"17".to_vec()),
            Value::Array(vec![Value::BulkString(b"p:{s:k}".to_vec())]),
        ]))
        .expect("a scan reply");
        assert_eq!((cursor, keys), (b"17".to_vec(), vec![b"p:{s:k}".to_vec()]));
        for bad in [
            Value::Nil,
            Value::Array(vec![Value::BulkString(b"0".to_vec())]),
            Value::Array(vec![Value::Int(0), Value::Array(vec![])]),
            Value::Array(vec![
                Value::BulkString(b"0".to_vec()),
                Value::Array(vec![Value::Int(1)]),
            ]),
        ] {
            assert!(parse_scan(bad).is_err());
        }
    }
}
