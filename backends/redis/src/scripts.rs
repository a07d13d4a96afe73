//! The Lua scripts, each hashed once per process: claim (one or many
//! keys, for what a plain `SET NX PX GET` cannot answer alone), unclaim
//! (takes back the fresh claims of a batch that failed), settle (complete
//! and bury, one or many keys), renew, fail, get, revive;
//! each begins with `lua/record.lua`, the record pattern and helpers
//! (settle with `lua/settle_one.lua` in front of that). The record
//! layout: [`crate::record`].

use std::sync::LazyLock;

use redis::{Cmd, Script};

/// A script's source and its `EVALSHA` hash.
pub(crate) struct Lua {
    source: &'static str,
    script: Script,
}

impl Lua {
    fn new(source: &'static str) -> Self {
        Lua {
            source,
            script: Script::new(source),
        }
    }

    /// `EVALSHA <sha1> <numkeys>`; the caller appends the keys, then the
    /// arguments.
    pub(crate) fn evalsha(&self, numkeys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(numkeys);
        cmd
    }

    /// The same call as `evalsha` built, as `EVAL <source> ...`: for when
    /// Redis answered `NOSCRIPT` (the call did not run). Runs and caches the
    /// script in one command, so no `SCRIPT FLUSH` can come in between.
    pub(crate) fn as_eval(&self, evalsha: &Cmd) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(self.source);
        for arg in evalsha.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = arg {
                cmd.arg(bytes);
            }
        }
        cmd
    }

    /// `SCRIPT LOAD <source>`.
    pub(crate) fn load(&self) -> Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.source);
        cmd
    }
}

/// A script of `lua/`, with `lua/record.lua` (the record pattern and the
/// helpers every script uses) in front of it, and in front of that, for a
/// script with a `head`, the fast path that head takes before the helpers
/// are defined.
macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Lua::new(concat!(
                include_str!("../lua/record.lua"),
                include_str!(concat!("../lua/", $file))
            ))
        })
    };
    ($file:literal, head = $head:literal) => {
        LazyLock::new(|| {
            Lua::new(concat!(
                include_str!(concat!("../lua/", $head)),
                include_str!("../lua/record.lua"),
                include_str!(concat!("../lua/", $file))
            ))
        })
    };
}

/// claim and claim_many: see `lua/claim.lua`.
pub(crate) static CLAIM: LazyLock<Lua> = script!("claim.lua");
/// claim_many's way back: see `lua/unclaim.lua`.
pub(crate) static UNCLAIM: LazyLock<Lua> = script!("unclaim.lua");
/// complete, complete_many and bury: see `lua/settle_one.lua` (one key,
/// the usual case) and `lua/settle.lua`.
pub(crate) static SETTLE: LazyLock<Lua> = script!("settle.lua", head = "settle_one.lua");
/// renew: see `lua/renew.lua`.
pub(crate) static RENEW: LazyLock<Lua> = script!("renew.lua");
/// fail: see `lua/fail.lua`.
pub(crate) static FAIL: LazyLock<Lua> = script!("fail.lua");
/// get: see `lua/get.lua`.
pub(crate) static GET: LazyLock<Lua> = script!("get.lua");
/// revive: see `lua/revive.lua`.
pub(crate) static REVIVE: LazyLock<Lua> = script!("revive.lua");

/// Every script, for loading them all at once.
pub(crate) fn all() -> [&'static Lua; 7] {
    [&CLAIM, &UNCLAIM, &SETTLE, &RENEW, &FAIL, &GET, &REVIVE]
}
