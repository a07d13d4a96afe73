//! What the server is: its version (the store refuses one older than
//! Redis 7.0) and whether it takes `SET ... IFEQ`, both read off `INFO
//! server`; and loading the scripts into its cache.

use std::sync::atomic::Ordering;

use idemq::Error;
use redis::Value;

use super::RedisDedupStore;
use crate::scripts;

impl RedisDedupStore {
    /// True when the server takes `SET ... IFEQ` (Valkey 8.1 and later,
    /// Redis 8.4 and later): `complete` and `bury` are then one plain `SET`
    /// each (still fenced by the owner token and attempt), the script only
    /// deciding what that `SET` could not. Read off `INFO server` by
    /// `connect`, `connect_with` and [`RedisDedupStore::load_scripts`]; a
    /// store from
    /// `connect_lazy` or `from_manager` uses the scripts until
    /// `load_scripts` is called.
    pub fn uses_set_ifeq(&self) -> bool {
        self.inner.compare_and_set.load(Ordering::Relaxed)
    }

    /// Loads every script into Redis' script cache in one round trip, and
    /// reads the server's version: refuses one older than Redis 7.0, and
    /// notes whether it takes `SET ... IFEQ`
    /// ([`RedisDedupStore::uses_set_ifeq`]). Optional for the scripts: an
    /// operation whose script is missing sends its source instead (which
    /// caches it too).
    pub async fn load_scripts(&self) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        pipe.add_command(redis::cmd("INFO").arg("server").to_owned());
        for script in scripts::all() {
            pipe.add_command(script.load());
        }
        let mut conn = self.conn();
        let n = pipe.len();
        let mut replies = self
            .deadline("load_scripts", async move {
                conn.send_packed_commands(&pipe, 0, n).await
            })
            .await?
            .into_iter();
        // A server that does not answer INFO (a proxy, an ACL) is let be:
        // only a version known to be too old is refused.
        let info = match replies.next() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Value::VerbatimString { text, .. }) => text,
            _ => String::new(),
        };
        check_version(&info)?;
        self.inner
            .compare_and_set
            .store(has_set_ifeq(&info), Ordering::Relaxed);
        for reply in replies {
            self.server_reply("load_scripts", reply)?;
        }
        Ok(())
    }
}

/// The oldest Redis the store runs on: `SET` took `NX` and `GET` together
/// from 7.0 on (and `PEXPIRETIME` came with it).
const MIN_REDIS: (u32, u32) = (7, 0);

/// Refuses a server whose `INFO server` names a version older than
/// [`MIN_REDIS`]; lets anything it cannot read pass.
fn check_version(info: &str) -> Result<(), Error> {
    let Some(version) = info_field(info, "redis_version:") else {
        return Ok(());
    };
    if major_minor(version).is_some_and(|v| v < MIN_REDIS) {
        return Err(Error::Config(format!(
            "Redis {version} is too old: idemq-redis needs Redis {}.{} or later (SET ... NX GET)",
            MIN_REDIS.0, MIN_REDIS.1
        )));
    }
    Ok(())
}

/// Whether the server of this `INFO server` takes `SET ... IFEQ`: Valkey
/// 8.1 and later, Redis 8.4 and later. Valkey names itself in
/// `server_name` and `valkey_version` (its `redis_version` stays 7.2.4).
fn has_set_ifeq(info: &str) -> bool {
    let at_least = |name: &str, want: (u32, u32)| {
        info_field(info, name)
            .and_then(major_minor)
            .is_some_and(|v| v >= want)
    };
    if info_field(info, "valkey_version:").is_some() {
        return at_least("valkey_version:", (8, 1));
    }
    info_field(info, "server_name:").is_none_or(|name| name == "redis")
        && at_least("redis_version:", (8, 4))
}

/// The value of the `name` line (`redis_version:`, say) of an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
}

/// The major and minor number of a version such as `7.0.15`.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_7_0_are_refused() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        for old in ["6.2.14", "6.0.20", "5.0.14"] {
            let err = check_version(&info(old)).expect_err(old);
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains(old), "{err}");
            assert!(err.to_string().contains("7.0"), "{err}");
        }
        for fine in ["7.0.0", "7.0.15", "7.4.2", "10.0.0"] {
            assert!(check_version(&info(fine)).is_ok(), "{fine}");
        }
        // What it cannot read is let be.
        for unknown in ["", "# Server\r\n", &info("unstable"), &info("7")] {
            assert!(check_version(unknown).is_ok(), "{unknown:?}");
        }
    }

    #[test]
    fn set_ifeq_is_read_off_the_server_name_and_version() {
        let redis = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        let valkey = |v: &str| {
            format!(
                "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:{v}\r\n"
            )
        };
        for yes in [
            redis("8.4.0"),
            redis("9.0.1"),
            valkey("8.1.0"),
            valkey("9.1.2"),
        ] {
            assert!(has_set_ifeq(&yes), "{yes:?}");
        }
        let no = [
            redis("7.0.15"),
            redis("8.2.3"),
            redis("unstable"),
            valkey("8.0.4"),
            valkey("7.2.11"),
            String::new(),
            // Another server that says it is Redis 8.4: its SET may not know IFEQ.
            "# Server\r\nredis_version:8.4.0\r\nserver_name:dragonfly\r\n".to_owned(),
        ];
        for no in no {
            assert!(!has_set_ifeq(&no), "{no:?}");
        }
    }
}
