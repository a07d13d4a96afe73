//! The plain commands of a message's usual path (the claim of an absent
//! key, the `SET ... IFEQ` completion), written straight into one command
//! buffer of the right size: the record key, the record and the token go
//! in as bytes, with no intermediate strings and no `format!` (the store
//! sends two of these per message). Also the `SCAN` pattern of the record
//! keys. What the keys and records look like: [`crate::record`].

use std::io::Write;

use idemq::{Lease, LeaseToken};
use redis::{Cmd, RedisWrite};

use crate::record;

/// `SET <record key> <fresh claim> NX PX <life> GET`, the fresh claim
/// being [`record::fresh_claim`]: writes the claim only when the key is
/// absent, and answers what the key held otherwise (Redis 7.0 and later
/// take `NX` and `GET` together).
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
    record::write(
        &mut cmd.writer_for_next_arg(),
        record::CLAIMED,
        token,
        1,
        slack,
    );
    cmd.arg("NX").arg("PX").arg(life).arg("GET");
    cmd
}

/// `SET <record key> <settled record> IFEQ <expected> PX <keep> GET`: the
/// settled record is the lease's record in `state` with no slack, and
/// `expected` the lease's claim as the store wrote it, with `slack`. Also
/// answers `expected`.
pub(crate) fn settle_if_equal(
    prefix: &str,
    lease: &Lease,
    state: &str,
    slack: u64,
    keep: u64,
) -> (Cmd, Vec<u8>) {
    let mut expected = Vec::with_capacity(48);
    record::write(
        &mut expected,
        record::CLAIMED,
        lease.token,
        lease.attempt,
        slack,
    );
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

/// Appends the two arguments `settle.lua` takes per lease: the start of
/// its claim ([`record::write_start`]), and the record to write in its
/// place.
pub(crate) fn settle_args(cmd: &mut Cmd, state: &str, lease: &Lease) {
    record::write_start(
        &mut cmd.writer_for_next_arg(),
        record::CLAIMED,
        lease.token,
        lease.attempt,
    );
    write_settled_record(&mut cmd.writer_for_next_arg(), state, lease);
}

/// Writes the record `complete` (done) or `bury` (dead) leaves: the
/// lease's token and attempt, no slack (it holds no lease).
fn write_settled_record(w: &mut impl Write, state: &str, lease: &Lease) {
    record::write(w, state, lease.token, lease.attempt, 0);
}

/// The `SCAN ... MATCH` pattern of the record keys under `prefix`: of one
/// scope, `<prefix>{<scope>:*}`, or of every scope, `<prefix>{*:*}`. Built
/// from [`record::key_parts`], with the glob characters of the prefix and
/// the scope (`* ? [ ] \`) escaped, so they match only themselves. No
/// other store's keys match: a prefix holds no `{`, a scope no `:`.
pub(crate) fn record_pattern(prefix: &str, scope: Option<&str>) -> String {
    let (prefix, scope) = (glob_escape(prefix), scope.map(glob_escape));
    record::key_parts(&prefix, scope.as_deref().unwrap_or("*"), "*").concat()
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
    for part in record::key_parts(prefix, scope, key) {
        // Writing to a command's argument buffer cannot fail.
        let _ = w.write_all(part.as_bytes());
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

    #[test]
    fn a_failed_claim_many_takes_back_exactly_what_its_claims_wrote() {
        let token = LeaseToken(0x5f0e_1d2c_3b4a_5968);
        let cmd = fresh_claim("p:", "s", "k", token, 30_000, 60_000);
        let written = cmd.args_iter().nth(2).map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes.to_vec(),
            _ => Vec::new(),
        });
        assert_eq!(
            written.as_deref(),
            Some(record::fresh_claim(token, 30_000).as_slice())
        );
    }
}
