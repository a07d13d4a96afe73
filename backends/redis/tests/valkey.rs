//! The store on a server that takes `SET ... IFEQ` (Valkey 8.1 and later,
//! Redis 8.4 and later), at `VALKEY_URL` (default
//! `redis://127.0.0.1:6390`; `.ci/run` starts one): `complete` and `bury`
//! are one plain `SET` each when the record is the claim as the store
//! wrote it, and the script decides the rest. The conformance suite again,
//! and the commands each case costs, counted by the server.

mod common;

use std::time::Duration;

use common::{SECOND, valkey_raw, valkey_store_with, valkey_url};
use idemq::testing::store::{assert_applied, assert_lease_lost, must_claim};
use idemq::{ClaimTtl, DedupStore, Lease, LeaseToken};
use idemq_redis::redis::{self, aio::ConnectionManager};
use idemq_redis::{RedisConfig, RedisDedupStore};

async fn store() -> Option<RedisDedupStore> {
    valkey_store_with(RedisConfig::new()).await
}

idemq::dedup_store_conformance!(store);

fn ttl(lease: Duration, retain: Duration) -> ClaimTtl {
    ClaimTtl { lease, retain }
}

#[tokio::test]
async fn the_server_takes_set_ifeq() {
    let Some(store) = store().await else { return };
    assert!(
        store.uses_set_ifeq(),
        "the server at {} should take SET ... IFEQ (Valkey 8.1+, Redis 8.4+)",
        valkey_url()
    );
}

/// A store on its own connection, and a way to read how many commands
/// the server has run for that connection (`tot-cmds` of `CLIENT LIST`).
struct Counted {
    store: RedisDedupStore,
    id: i64,
    watcher: redis::aio::MultiplexedConnection,
    seen: i64,
}

impl Counted {
    async fn new() -> Option<Counted> {
        // Reachable at all? (Skips, or fails under IDEMQ_REQUIRE_SERVICES.)
        store().await?;
        let client = redis::Client::open(valkey_url()).expect("VALKEY_URL parses");
        let mut manager = ConnectionManager::new(client)
            .await
            .expect("connection manager");
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut manager)
            .await
            .expect("CLIENT ID");
        let config = RedisConfig::new().with_prefix(common::fresh_prefix());
        let store = RedisDedupStore::from_manager(manager, config).expect("store");
        store.load_scripts().await.expect("load scripts");
        assert!(store.uses_set_ifeq());
        let mut counted = Counted {
            store,
            id,
            watcher: valkey_raw().await,
            seen: 0,
        };
        counted.seen = counted.total().await;
        Some(counted)
    }

    async fn total(&mut self) -> i64 {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("ID")
            .arg(self.id)
            .query_async(&mut self.watcher)
            .await
            .expect("CLIENT LIST");
        list.split_whitespace()
            .find_map(|f| f.strip_prefix("tot-cmds="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no tot-cmds in {list:?}"))
    }

    /// Commands the store sent since the last call.
    async fn sent(&mut self) -> i64 {
        let now = self.total().await;
        let n = now - self.seen;
        self.seen = now;
        n
    }

    async fn value(&mut self, key: &str) -> Option<String> {
        let record = self.store.record_key("s", key).expect("key");
        redis::cmd("GET")
            .arg(record)
            .query_async(&mut self.watcher)
            .await
            .expect("GET")
    }
}

/// What the server counts for one settle script call: the `EVALSHA`, and
/// the `GET` and the `SET` (or `DEL`) it runs.
const SETTLE_SCRIPT: i64 = 3;
/// And for a renewal: the `EVALSHA`, `GET`, `PTTL` and `SET`.
const RENEW_SCRIPT: i64 = 4;

#[tokio::test]
async fn completions_are_one_plain_command_and_the_script_decides_the_rest() {
    let Some(mut c) = Counted::new().await else {
        return;
    };
    let usual = ttl(60 * SECOND, 600 * SECOND);
    let keep = 600 * SECOND;

    // A claim and its completion: two plain SETs.
    let lease = must_claim(&c.store, "s", "plain", usual).await;
    assert_applied(c.store.complete(&lease, keep).await);
    assert_eq!(c.sent().await, 2, "SET NX GET, SET IFEQ");
    let done = format!("d:{}:1:0", lease.token);
    assert_eq!(c.value("plain").await.as_deref(), Some(done.as_str()));

    // bury too.
    let lease = must_claim(&c.store, "s", "buried", usual).await;
    assert_applied(c.store.bury(&lease, keep).await);
    assert_eq!(c.sent().await, 2);
    let dead = format!("x:{}:1:0", lease.token);
    assert_eq!(c.value("buried").await.as_deref(), Some(dead.as_str()));

    // A renewed lease holds another slack: the SET misses, the script
    // completes it.
    let lease = must_claim(&c.store, "s", "renewed", usual).await;
    assert_applied(c.store.renew(&lease, 120 * SECOND).await);
    assert_applied(c.store.complete(&lease, keep).await);
    assert_eq!(
        c.sent().await,
        1 + RENEW_SCRIPT + 1 + SETTLE_SCRIPT,
        "claim, renew, SET IFEQ, the script"
    );
    let done = format!("d:{}:1:0", lease.token);
    assert_eq!(c.value("renewed").await.as_deref(), Some(done.as_str()));

    // A claim with other TTLs than the store's last one: the same.
    let other = must_claim(&c.store, "s", "other-ttl", ttl(SECOND, 30 * SECOND)).await;
    let usual_lease = must_claim(&c.store, "s", "usual-ttl", usual).await;
    assert_applied(c.store.complete(&other, keep).await);
    assert_applied(c.store.complete(&usual_lease, keep).await);
    assert_eq!(
        c.sent().await,
        2 + 1 + SETTLE_SCRIPT + 1,
        "2 claims, a miss and its script, a hit"
    );

    // A lease lost to nothing, or to another record: one command, and
    // nothing changed.
    let ghost = Lease {
        scope: "s".into(),
        key: "absent".into(),
        token: LeaseToken(7),
        attempt: 1,
    };
    assert_lease_lost(c.store.complete(&ghost, keep).await);
    assert_eq!(c.value("absent").await, None, "IFEQ never creates a key");
    let stale = Lease {
        key: "plain".into(),
        ..ghost.clone()
    };
    let before = c.value("plain").await;
    assert_lease_lost(c.store.complete(&stale, keep).await);
    assert_lease_lost(c.store.bury(&stale, keep).await);
    assert_eq!(c.value("plain").await, before);
    assert_eq!(c.sent().await, 3);

    // Keeping nothing deletes the record: the script.
    let lease = must_claim(&c.store, "s", "dropped", usual).await;
    assert_applied(c.store.complete(&lease, Duration::ZERO).await);
    assert_eq!(c.sent().await, 1 + SETTLE_SCRIPT);
    assert_eq!(c.value("dropped").await, None);
}

#[tokio::test]
async fn what_is_not_a_record_is_refused_and_left_alone() {
    let Some(store) = store().await else { return };
    let mut conn = valkey_raw().await;
    let string_key = store.record_key("s", "squatted").expect("key");
    let hash_key = store.record_key("s", "hashed").expect("key");
    let () = redis::cmd("SET")
        .arg(&string_key)
        .arg("not a record")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let _: i64 = redis::cmd("HSET")
        .arg(&hash_key)
        .arg("state")
        .arg("c")
        .query_async(&mut conn)
        .await
        .expect("HSET");
    // The store's last claim slack is known, so IFEQ is tried first.
    let _ = must_claim(&store, "s", "warm", ttl(60 * SECOND, 600 * SECOND)).await;
    for (key, record) in [("squatted", &string_key), ("hashed", &hash_key)] {
        let ghost = Lease {
            scope: "s".into(),
            key: key.into(),
            token: LeaseToken(7),
            attempt: 1,
        };
        for settled in [
            store.complete(&ghost, 600 * SECOND).await,
            store.bury(&ghost, 600 * SECOND).await,
        ] {
            let err = settled.expect_err("not a record");
            assert!(common::is_permanent(&err), "{err:?}");
            assert!(
                err.to_string().contains(record.as_str()),
                "names the key: {err}"
            );
        }
    }
    let kept: String = redis::cmd("GET")
        .arg(&string_key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(kept, "not a record");
    let kind: String = redis::cmd("TYPE")
        .arg(&hash_key)
        .query_async(&mut conn)
        .await
        .expect("TYPE");
    assert_eq!(kind, "hash");
    let _: i64 = redis::cmd("DEL")
        .arg(&string_key)
        .arg(&hash_key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
}
