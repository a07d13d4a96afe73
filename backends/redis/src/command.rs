//! The plain commands of a message's usual path (the claim of an absent
//! key, the `SET ... IFEQ` completion), written straight into one command
//! buffer of the right size: the record key, the record and the token go
//! in as bytes, with no intermediate strings and no `format!`. The store
//! sends two of these per message, and on a busy client their building
//! showed up as a fifth of its CPU (growing buffers, formatting).

use std::io::Write;

use idemq::{Lease, LeaseToken};
use redis::{Cmd, RedisWrite};

/// `SET <record key> c:<token>:1:<slack> NX PX <life> GET`: writes the
/// claim only when the key is absent, and answers what the key held
/// otherwise (Redis 7.0 and later take `NX` and `GET` together).
pub(crate) fn fresh_claim(
    prefix: &str,
    scope: &str,
    key: &str,
    token: LeaseToken,
    slack: u64,
    life: u64,
) -> Cmd {
    let mut cmd = Cmd::with_capacity(7, 64 + prefix.len() + scope.len() + key.len());
    cmd.arg("SET");
    record_key(&mut cmd, prefix, scope, key);
    write_fresh_record(&mut cmd.writer_for_next_arg(), token, slack);
    cmd.arg("NX").arg("PX").arg(life).arg("GET");
    cmd
}

/// The record [`fresh_claim`] writes, `c:<token>:1:<slack>`, on its own
/// (to take a claim back only while the key still holds it).
pub(crate) fn fresh_record(token: LeaseToken, slack: u64) -> Vec<u8> {
    let mut record = Vec::with_capacity(48);
    write_fresh_record(&mut record, token, slack);
    record
}

fn write_fresh_record(w: &mut impl Write, token: LeaseToken, slack: u64) {
    write_full_record(w, "c", token, 1, slack);
}

/// `SET <record key> <state>:<token>:<attempt>:0 IFEQ <expected> PX <keep>
/// GET`, where `expected` is the lease's claim as the store wrote it,
/// `c:<token>:<attempt>:<slack>`. Also answers `expected`, whose start up
/// to its last `:` is how any claim of this lease starts.
pub(crate) fn settle_if_equal(
    prefix: &str,
    lease: &Lease,
    state: &str,
    slack: u64,
    keep: u64,
) -> (Cmd, Vec<u8>) {
    let mut expected = Vec::with_capacity(48);
    write_full_record(&mut expected, "c", lease.token, lease.attempt, slack);
    let mut cmd = Cmd::with_capacity(
        8,
        96 + prefix.len() + lease.scope.len() + lease.key.len() + expected.len(),
    );
    cmd.arg("SET");
    record_key(&mut cmd, prefix, &lease.scope, &lease.key);
    write_settled_record(&mut cmd.writer_for_next_arg(), state, lease);
    cmd.arg("IFEQ")
        .arg(&expected[..])
        .arg("PX")
        .arg(keep)
        .arg("GET");
    (cmd, expected)
}

/// Appends the two arguments `settle.lua` takes per lease: its claim as
/// the record starts, `c:<token>:<attempt>:`, and the record to write,
/// `<state>:<token>:<attempt>:0`.
pub(crate) fn settle_args(cmd: &mut Cmd, state: &str, lease: &Lease) {
    write_record(
        &mut cmd.writer_for_next_arg(),
        "c",
        lease.token,
        lease.attempt,
    );
    write_settled_record(&mut cmd.writer_for_next_arg(), state, lease);
}

/// Writes the record `complete` (`d`) or `bury` (`x`) leaves:
/// `<state>:<token>:<attempt>:0` (it holds no lease, so no slack).
fn write_settled_record(w: &mut impl Write, state: &str, lease: &Lease) {
    write_full_record(w, state, lease.token, lease.attempt, 0);
}

/// The parts of the Redis key of `(scope, key)`, in order:
/// `<prefix>{<scope>:<key>}` (the `{...}` hash tag keeps a record in one
/// cluster slot).
pub(crate) fn record_key_parts<'a>(prefix: &'a str, scope: &'a str, key: &'a str) -> [&'a str; 6] {
    [prefix, "{", scope, ":", key, "}"]
}

/// The `SCAN ... MATCH` pattern of the record keys under `prefix`: of one
/// scope, `<prefix>{<scope>:*}`, or of every scope, `<prefix>{*:*}`. Built
/// from [`record_key_parts`], with the glob characters of the prefix and
/// the scope (`* ? [ ] \`) escaped, so they match only themselves. No
/// other store's keys match: a prefix holds no `{`, a scope no `:`.
pub(crate) fn record_pattern(prefix: &str, scope: Option<&str>) -> String {
    let (prefix, scope) = (glob_escape(prefix), scope.map(glob_escape));
    record_key_parts(&prefix, scope.as_deref().unwrap_or("*"), "*").concat()
}

/// `s` with the characters Redis' glob patterns treat specially
/// (`* ? [ ] \`) escaped by a backslash.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Appends the record key of `(scope, key)` as the next argument.
fn record_key(cmd: &mut Cmd, prefix: &str, scope: &str, key: &str) {
    let mut w = cmd.writer_for_next_arg();
    for part in record_key_parts(prefix, scope, key) {
        write_all(&mut w, part.as_bytes());
    }
}

/// Writes `<state>:<16 hex digits of token>:<attempt>:`, the start every
/// record has (the slack follows).
fn write_record(w: &mut impl Write, state: &str, token: LeaseToken, attempt: u32) {
    write_all(w, state.as_bytes());
    write_all(w, b":");
    write_all(w, &hex16(token.0));
    write_all(w, b":");
    write_all(w, Decimal::new(u64::from(attempt)).as_bytes());
    write_all(w, b":");
}

/// Writes a whole record, `<state>:<token>:<attempt>:<slack>`.
fn write_full_record(w: &mut impl Write, state: &str, token: LeaseToken, attempt: u32, slack: u64) {
    write_record(w, state, token, attempt);
    write_all(w, Decimal::new(slack).as_bytes());
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

    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<not a plain argument>".to_owned(),
            })
            .collect()
    }

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
    fn the_fresh_claim_is_the_command_the_store_documents() {
        let cmd = fresh_claim("p:", "orders", "o-1", LeaseToken(0xab), 30_000, 330_000);
        assert_eq!(
            args(&cmd),
            [
                "SET",
                "p:{orders:o-1}",
                "c:00000000000000ab:1:30000",
                "NX",
                "PX",
                "330000",
                "GET"
            ]
        );
    }

    #[test]
    fn scan_patterns_follow_the_key_layout_and_escape_globs() {
        assert_eq!(record_pattern("idemq:", Some("orders")), "idemq:{orders:*}");
        assert_eq!(record_pattern("idemq:", None), "idemq:{*:*}");
        assert_eq!(
            record_pattern(r"a*b?c[d]e\f:", Some("s")),
            r"a\*b\?c\[d\]e\\f:{s:*}"
        );
    }

    #[test]
    fn the_completion_compares_the_whole_claim() {
        let lease = Lease {
            scope: "s".into(),
            key: "k".into(),
            token: LeaseToken(0x5f0e_1d2c_3b4a_5968),
            attempt: 12,
        };
        let (cmd, expected) = settle_if_equal("idemq:", &lease, "d", 540_000, 86_400_000);
        assert_eq!(expected, b"c:5f0e1d2c3b4a5968:12:540000");
        assert_eq!(
            args(&cmd),
            [
                "SET",
                "idemq:{s:k}",
                "d:5f0e1d2c3b4a5968:12:0",
                "IFEQ",
                "c:5f0e1d2c3b4a5968:12:540000",
                "PX",
                "86400000",
                "GET"
            ]
        );
        let mut script = Cmd::new();
        settle_args(&mut script, "x", &lease);
        assert_eq!(
            args(&script),
            ["c:5f0e1d2c3b4a5968:12:", "x:5f0e1d2c3b4a5968:12:0"]
        );
    }
}
