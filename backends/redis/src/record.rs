//! The dedup record: where [`crate::RedisDedupStore`] keeps what it knows
//! of one message key, and in what form (for operators who look at the
//! keys, and for whoever changes the store). This is the one description
//! of the layout: the commands (`src/command.rs`), the store and the Lua
//! scripts (`lua/record.lua` holds its pattern, `RECORD`) refer to it.
//!
//! # Where
//!
//! The record of `(scope, key)` lives at the Redis key
//! `<prefix>{<scope>:<key>}`: the `{...}` hash tag keeps a
//! record in one Redis Cluster slot. A prefix holds no `{` and a scope no
//! `:`, so the keys of two scopes, or of two prefixes, never collide.
//!
//! # What
//!
//! One string, `<state>:<token>:<attempts>:<slack>`, for instance
//! `c:5f0e1d2c3b4a5968:1:30000`:
//!
//! - `state`, one letter: `c` claimed, `r` released, `d` done, `x` dead
//!   (buried);
//! - `token`, the fencing token of the last claim: hex digits (the store
//!   writes 16, as [`LeaseToken`] displays);
//! - `attempts`, how many claims were won: decimal, at most 10 digits (an
//!   attempt count is a `u32`);
//! - `slack`, how long the record outlives its lease, ms, decimal: the
//!   lease holds while the key's TTL is above it; `0` in a done or dead
//!   record, which holds no lease.
//!
//! Every field after the state is digits, so `:` never appears inside one,
//! and the start `c:<token>:<attempts>:` tells a claim
//! held by one lease (its token and attempt) without reading the slack.
//!
//! # Life
//!
//! The key's own TTL is the record's life. A claim sets it to the longer
//! of the lease and the claim's `retain` (and never shortens it), so a
//! lapsed lease keeps its attempt count; `complete` and `bury` set it to
//! their `keep_for` (under 1 ms deletes the record). The lease is measured
//! against that TTL, `PTTL > slack`: nothing reads the clock, and a claim
//! of an absent key is one plain `SET NX PX GET`.
//!
//! # Not a record
//!
//! A key holding anything else (another type, or a string of another
//! form) is not a record: every operation but `forget` refuses it with a
//! permanent `WRONGTYPE` error naming the key, and leaves it as it is.

use std::io::Write;

use idemq::{LeaseToken, RecordState};

/// The state letter of a claimed record.
pub(crate) const CLAIMED: &str = "c";
/// The state letter of a released record (`fail`).
pub(crate) const RELEASED: &str = "r";
/// The state letter of a done record (`complete`).
pub(crate) const DONE: &str = "d";
/// The state letter of a dead record (`bury`).
pub(crate) const DEAD: &str = "x";

/// The parts of the Redis key of `(scope, key)`, in order:
/// `<prefix>{<scope>:<key>}`.
pub(crate) fn key_parts<'a>(prefix: &'a str, scope: &'a str, key: &'a str) -> [&'a str; 6] {
    [prefix, "{", scope, ":", key, "}"]
}

/// The record of a fresh claim, attempt 1: `c:<token>:1:<slack>`.
pub(crate) fn fresh_claim(token: LeaseToken, slack: u64) -> Vec<u8> {
    let mut record = Vec::with_capacity(48);
    write(&mut record, CLAIMED, token, 1, slack);
    record
}

/// Writes a whole record, `<state>:<token>:<attempt>:<slack>`.
pub(crate) fn write(w: &mut impl Write, state: &str, token: LeaseToken, attempt: u32, slack: u64) {
    write_start(w, state, token, attempt);
    write_all(w, Decimal::new(slack).as_bytes());
}

/// Writes the start of a record, `<state>:<token>:<attempt>:`: every
/// record of that state, token and attempt starts so, whatever its slack.
pub(crate) fn write_start(w: &mut impl Write, state: &str, token: LeaseToken, attempt: u32) {
    write_all(w, state.as_bytes());
    write_all(w, b":");
    write_all(w, &hex16(token.0));
    write_all(w, b":");
    write_all(w, Decimal::new(u64::from(attempt)).as_bytes());
    write_all(w, b":");
}

/// The state letter, the token and the slack (ms) of `old` when it is a
/// record (what `RECORD` in `lua/record.lua` matches). A slack too large
/// for a `u64` reads as `u64::MAX`: a lease that never holds, as in the
/// scripts (where it is a float above any TTL).
pub(crate) fn fields(old: &[u8]) -> Option<(&str, &str, u64)> {
    let old = std::str::from_utf8(old).ok()?;
    let mut fields = old.split(':');
    let (state, token, attempts, slack) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let digits = |f: &str| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit());
    let well_formed = fields.next().is_none()
        && matches!(state, CLAIMED | RELEASED | DONE | DEAD)
        && !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_hexdigit())
        && digits(attempts)
        && attempts.len() <= 10
        && digits(slack);
    well_formed.then(|| (state, token, slack.parse().unwrap_or(u64::MAX)))
}

/// The state letter of `old` when it is a record (see [`fields`]).
pub(crate) fn state_letter(old: &[u8]) -> Option<&str> {
    fields(old).map(|(state, _, _)| state)
}

/// The state a record's state letter stands for.
pub(crate) fn state(letter: &[u8]) -> Option<RecordState> {
    match letter {
        b"c" => Some(RecordState::Claimed),
        b"r" => Some(RecordState::Released),
        b"d" => Some(RecordState::Done),
        b"x" => Some(RecordState::Dead),
        _ => None,
    }
}

/// Writing to a `Vec` (or a command's argument buffer) cannot fail.
fn write_all(w: &mut impl Write, bytes: &[u8]) {
    let _ = w.write_all(bytes);
}

/// `n` as 16 lower-case hex digits, as [`LeaseToken`] displays.
fn hex16(n: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// A `u64` in decimal, on the stack.
struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    fn new(mut n: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Decimal { buf, start }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_tokens_are_written_as_format_would() {
        for n in [0, 1, 9, 10, 99, 100, 4_294_967_295, u64::MAX] {
            assert_eq!(Decimal::new(n).as_bytes(), n.to_string().as_bytes());
        }
        for t in [0, 7, 0x5f0e_1d2c_3b4a_5968, u64::MAX] {
            assert_eq!(hex16(t).as_slice(), LeaseToken(t).to_string().as_bytes());
        }
    }

    #[test]
    fn records_are_written_and_read_back() {
        let token = LeaseToken(0x5f0e_1d2c_3b4a_5968);
        assert_eq!(fresh_claim(token, 30_000), b"c:5f0e1d2c3b4a5968:1:30000");
        let mut done = Vec::new();
        write(&mut done, DONE, token, 12, 0);
        assert_eq!(done, b"d:5f0e1d2c3b4a5968:12:0");
        assert_eq!(fields(&done), Some((DONE, "5f0e1d2c3b4a5968", 0)));
        assert_eq!(state_letter(b"x:00ff:9:0"), Some(DEAD));
        for letter in [CLAIMED, RELEASED, DONE, DEAD] {
            assert!(state(letter.as_bytes()).is_some(), "{letter}");
        }
        assert_eq!(state(b"q"), None);
    }
}
