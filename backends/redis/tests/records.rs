//! What the store writes into Redis: layout, TTLs, attempts across lapsed
//! leases, script reloading, hostile data, and what errors show.
//!
//! One file, past 600 lines: each test pins one fact about the bytes in
//! Redis, and they share the raw-connection helpers that read them.

mod common;

use std::time::Duration;

use common::{SECOND, pttl, raw, redis_url, store};
use idemq::testing::store::{assert_applied, assert_lease_lost, must_claim};
use idemq::{
    Claim, ClaimTtl, DedupStore, Error, Fenced, Lease, LeaseToken, RecordCounts, RecordState,
    Release,
};
use idemq_redis::redis;
use idemq_redis::{RedisConfig, RedisDedupStore};

fn ttl(lease: Duration, retain: Duration) -> ClaimTtl {
    ClaimTtl { lease, retain }
}

/// A record as stored: `state:token:attempts:slack`, and the key's TTL.
#[derive(Debug)]
struct Stored {
    state: String,
    token: String,
    attempts: String,
    /// How long the record outlives its lease, ms.
    slack: i64,
    /// The key's `PTTL`, ms.
    pttl: i64,
}

impl Stored {
    /// Time left on the lease, ms: the TTL above the slack.
    fn lease_left(&self) -> i64 {
        self.pttl - self.slack
    }
}

async fn stored(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Stored {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(conn)
        .await
        .expect("TYPE");
    assert_eq!(kind, "string", "{key}");
    let value: String = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET");
    let fields: Vec<&str> = value.split(':').collect();
    let [state, token, attempts, slack] = fields.as_slice() else {
        panic!("four fields: {value:?}");
    };
    Stored {
        state: (*state).to_owned(),
        token: (*token).to_owned(),
        attempts: (*attempts).to_owned(),
        slack: slack.parse().expect("slack in ms"),
        pttl: pttl(conn, key).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_is_one_string_under_a_hash_tag() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let lease = must_claim(&store, "orders", "abc", ttl(60 * SECOND, 90 * SECOND)).await;
    let key = store.record_key("orders", "abc").expect("valid");
    assert_eq!(key, format!("{}{{orders:abc}}", store.config().prefix()));
    let f = stored(&mut conn, &key).await;
    assert_eq!(f.state, "c");
    assert_eq!(f.token, lease.token.to_string());
    assert_eq!(f.token.len(), 16, "{f:?}");
    assert_eq!(f.attempts, "1");
    // lease 60 s, retain 90 s: the record lives 90 s, 30 s past its lease.
    assert_eq!(f.slack, 30_000, "{f:?}");
    assert!(f.pttl > 85_000 && f.pttl <= 90_000, "{f:?}");
    assert!(f.lease_left() > 55_000, "{f:?}");

    // renew moves the deadline only.
    assert_applied(store.renew(&lease, 120 * SECOND).await);
    let renewed = stored(&mut conn, &key).await;
    assert_eq!(
        (
            renewed.state.as_str(),
            &renewed.token,
            renewed.attempts.as_str()
        ),
        ("c", &f.token, "1")
    );
    // A lease of 120 s outlasts the record's 90 s: the record now lives
    // exactly as long as the lease.
    assert_eq!(renewed.slack, 0, "{renewed:?}");
    assert!(renewed.lease_left() > 115_000, "{renewed:?}");

    // complete and bury write their state, keep token and attempts, drop
    // the lease, and live keep_for from now.
    assert_applied(store.complete(&lease, 30 * SECOND).await);
    let done = stored(&mut conn, &key).await;
    assert_eq!(done.state, "d");
    assert_eq!(done.token, lease.token.to_string());
    assert_eq!((done.slack, done.attempts.as_str()), (0, "1"));
    assert!(done.pttl > 25_000 && done.pttl <= 30_000, "{done:?}");
    let buried = must_claim(&store, "orders", "dead", ttl(60 * SECOND, 60 * SECOND)).await;
    assert_applied(store.bury(&buried, 60 * SECOND).await);
    let dead = stored(&mut conn, &store.record_key("orders", "dead").expect("key")).await;
    assert_eq!((dead.state.as_str(), dead.attempts.as_str()), ("x", "1"));
    assert_eq!(dead.token, buried.token.to_string());

    // fail releases (r), with or without giving the attempt back; the next
    // claim counts on from there.
    let released = must_claim(&store, "orders", "again", ttl(60 * SECOND, 60 * SECOND)).await;
    let again = store.record_key("orders", "again").expect("key");
    assert_applied(store.fail(&released, Release::CountAttempt).await);
    let r = stored(&mut conn, &again).await;
    assert_eq!((r.state.as_str(), r.attempts.as_str()), ("r", "1"));
    assert_eq!(r.token, released.token.to_string());
    let second = must_claim(&store, "orders", "again", ttl(60 * SECOND, 60 * SECOND)).await;
    assert_eq!(second.attempt, 2);
    let c = stored(&mut conn, &again).await;
    assert_eq!((c.state.as_str(), c.attempts.as_str()), ("c", "2"));
    assert_eq!(c.token, second.token.to_string());
    assert_applied(store.fail(&second, Release::RefundAttempt).await);
    let refunded = stored(&mut conn, &again).await;
    assert_eq!(
        (refunded.state.as_str(), refunded.attempts.as_str()),
        ("r", "1")
    );
    assert!(store.record_key("a:b", "k").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_covers_the_longer_of_lease_and_retain() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let short = Duration::from_millis(300);

    // retain longer than the lease: the record outlives the lease.
    must_claim(&store, "s", "retain-wins", ttl(short, 5 * SECOND)).await;
    let t = pttl(
        &mut conn,
        &store.record_key("s", "retain-wins").expect("key"),
    )
    .await;
    assert!((4_000..=5_000).contains(&t), "PTTL {t}");

    // lease longer than retain: the record lives as long as the lease.
    must_claim(&store, "s", "lease-wins", ttl(5 * SECOND, short)).await;
    let t = pttl(
        &mut conn,
        &store.record_key("s", "lease-wins").expect("key"),
    )
    .await;
    assert!((4_000..=5_000).contains(&t), "PTTL {t}");
    let record = store
        .get("s", "lease-wins")
        .await
        .expect("get")
        .expect("there");
    assert!(record.expires_in > 4 * SECOND && record.expires_in <= 5 * SECOND);
    assert!(record.lease_remaining.is_some_and(|r| r > 4 * SECOND));

    // Both short: the record is gone soon after, and the key starts over.
    must_claim(&store, "s", "both-short", ttl(short, short)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.get("s", "both-short").await.expect("get"), None);
    assert_eq!(
        must_claim(&store, "s", "both-short", ttl(short, short))
            .await
            .attempt,
        1
    );

    // A renewal past the record's life extends the record too.
    let lease = must_claim(&store, "s", "renewed", ttl(short, short)).await;
    assert_applied(store.renew(&lease, 5 * SECOND).await);
    let t = pttl(&mut conn, &store.record_key("s", "renewed").expect("key")).await;
    assert!((4_000..=5_000).contains(&t), "PTTL {t}");

    // complete and bury set the life to keep_for.
    assert_applied(store.complete(&lease, 2 * SECOND).await);
    let t = pttl(&mut conn, &store.record_key("s", "renewed").expect("key")).await;
    assert!((1_000..=2_000).contains(&t), "PTTL {t}");
    let doomed = must_claim(&store, "s", "buried", ttl(short, 60 * SECOND)).await;
    assert_applied(store.bury(&doomed, 3 * SECOND).await);
    let t = pttl(&mut conn, &store.record_key("s", "buried").expect("key")).await;
    assert!((2_000..=3_000).contains(&t), "PTTL {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_lease_keeps_attempts_until_retain_ends() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let lease_ms = Duration::from_millis(200);
    let t = ttl(lease_ms, 5 * SECOND);
    for expected in 1..=3 {
        let lease = must_claim(&store, "s", "crashy", t).await;
        assert_eq!(lease.attempt, expected);
        // The consumer "crashes": nobody completes or fails the claim.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let record = store.get("s", "crashy").await.expect("get").expect("kept");
        assert_eq!(
            (record.state, record.attempts, record.lease_remaining),
            (RecordState::Claimed, expected, Some(Duration::ZERO))
        );
        let left = pttl(&mut conn, &store.record_key("s", "crashy").expect("key")).await;
        assert!(left > 3_500, "record must outlive the lease: PTTL {left}");
    }
    // A release keeps the count too, and the next claim goes on from it.
    let lease = must_claim(&store, "s", "crashy", t).await;
    assert_eq!(lease.attempt, 4);
    assert_applied(store.fail(&lease, Release::CountAttempt).await);
    assert_eq!(must_claim(&store, "s", "crashy", t).await.attempt, 5);
}

/// The value and the expiry (`PEXPIRETIME`) of a key, exactly.
async fn snapshot(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (String, i64) {
    let value: String = redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET");
    let at: i64 = redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(conn)
        .await
        .expect("PEXPIRETIME");
    (value, at)
}

/// A `complete` or `bury` writes first and checks the record it replaced
/// after (one command when it applies); when that record was not the
/// caller's claim it must be back exactly as it was, value and expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_that_misses_leaves_the_record_exactly_as_it_was() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let key = store.record_key("s", "contested").expect("key");
    let first = must_claim(&store, "s", "contested", ttl(SECOND / 5, 60 * SECOND)).await;
    tokio::time::sleep(SECOND / 2).await;
    let second = must_claim(&store, "s", "contested", ttl(30 * SECOND, 45 * SECOND)).await;
    assert_eq!(second.attempt, 2);

    // The lapsed lease: complete, bury and the batch form all miss.
    let held = snapshot(&mut conn, &key).await;
    assert!(held.0.starts_with("c:"), "{held:?}");
    assert_lease_lost(store.complete(&first, 5 * SECOND).await);
    assert_lease_lost(store.bury(&first, 5 * SECOND).await);
    assert_eq!(
        store
            .complete_many(std::slice::from_ref(&first), 5 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::LeaseLost]
    );
    // The right token with another attempt is not the claim either.
    let forged = Lease {
        attempt: 1,
        ..second.clone()
    };
    assert_lease_lost(store.complete(&forged, 5 * SECOND).await);
    assert_eq!(snapshot(&mut conn, &key).await, held);

    // A done record stays done, with its own expiry, when completed again:
    // the same lease's retry is applied and changes nothing.
    assert_applied(store.complete(&second, 20 * SECOND).await);
    let done = snapshot(&mut conn, &key).await;
    assert!(done.0.starts_with("d:"), "{done:?}");
    assert_ne!(done.1, held.1, "complete sets keep_for");
    assert_applied(store.complete(&second, 5 * SECOND).await);
    assert_lease_lost(store.bury(&second, 5 * SECOND).await);
    assert_eq!(snapshot(&mut conn, &key).await, done);

    // In a batch, the retried one changes nothing and the new one applies;
    // the stale lease misses.
    let other = must_claim(&store, "s", "other", ttl(30 * SECOND, 30 * SECOND)).await;
    assert_eq!(
        store
            .complete_many(&[second.clone(), first.clone(), other.clone()], 5 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied, Fenced::LeaseLost, Fenced::Applied]
    );
    assert_eq!(snapshot(&mut conn, &key).await, done);
    let record = store.get("s", "other").await.expect("get").expect("kept");
    assert_eq!(record.state, RecordState::Done);
}

/// A batch with a key that holds no record fails as a whole and changes
/// nothing, so the calls `Coalescing` then makes one by one get the
/// answers they would have had alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_changes_nothing() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let key = |k: &str| store.record_key("s", k).expect("key");
    let () = redis::cmd("SET")
        .arg(key("squatter"))
        .arg("not a record")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET");
    // A lapsed lease (a takeover in the batch), and one that is held.
    let _lapsed = must_claim(&store, "s", "lapsed", ttl(SECOND / 5, 60 * SECOND)).await;
    let held = must_claim(&store, "s", "held", ttl(60 * SECOND, 60 * SECOND)).await;
    tokio::time::sleep(SECOND / 2).await;
    let before_lapsed = snapshot(&mut conn, &key("lapsed")).await;
    let before_held = snapshot(&mut conn, &key("held")).await;

    // claim_many: a fresh key (twice), the takeover, then the squatter.
    let keys: Vec<String> = ["fresh", "lapsed", "fresh", "squatter", "late"]
        .map(String::from)
        .to_vec();
    let err = store
        .claim_many("s", &keys, ttl(30 * SECOND, 30 * SECOND))
        .await
        .expect_err("the squatter fails the batch");
    assert!(!err.is_transient(), "{err:?}");
    for absent in ["fresh", "late"] {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(key(absent))
            .query_async(&mut conn)
            .await
            .expect("EXISTS");
        assert_eq!(exists, 0, "{absent} was put back to absent");
    }
    assert_eq!(snapshot(&mut conn, &key("lapsed")).await, before_lapsed);

    // complete_many: the held claim, then the squatter.
    let squatter = Lease {
        scope: "s".into(),
        key: "squatter".into(),
        token: LeaseToken(9),
        attempt: 1,
    };
    let err = store
        .complete_many(&[held.clone(), squatter.clone()], 30 * SECOND)
        .await
        .expect_err("the squatter fails the batch");
    assert!(!err.is_transient(), "{err:?}");
    assert_eq!(snapshot(&mut conn, &key("held")).await, before_held);

    // Behind Coalescing, each call gets its own answer: the held lease
    // completes, the lapsed one is taken over (attempt 2), the squatter
    // fails alone.
    let coalesced = idemq::Coalescing::new(store.clone()).with_max_in_flight(1);
    let blocker = must_claim(&store, "s", "blocker", ttl(60 * SECOND, 60 * SECOND)).await;
    let (first, held_done, squat_done) = tokio::join!(
        coalesced.complete(&blocker, 30 * SECOND),
        coalesced.complete(&held, 30 * SECOND),
        coalesced.complete(&squatter, 30 * SECOND),
    );
    assert_applied(first);
    assert_applied(held_done);
    assert!(squat_done.is_err(), "{squat_done:?}");
    let taken = coalesced
        .claim("s", "lapsed", ttl(30 * SECOND, 30 * SECOND))
        .await
        .expect("claim");
    assert!(
        matches!(taken, Claim::Claimed(ref l) if l.attempt == 2),
        "{taken:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_operations_never_create_records() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let ghost = Lease {
        scope: "s".into(),
        key: "ghost".into(),
        token: LeaseToken(42),
        attempt: 1,
    };
    assert_lease_lost(store.renew(&ghost, SECOND).await);
    assert_lease_lost(store.complete(&ghost, SECOND).await);
    assert_lease_lost(store.fail(&ghost, Release::RefundAttempt).await);
    assert_lease_lost(store.bury(&ghost, SECOND).await);
    assert_eq!(
        store
            .complete_many(std::slice::from_ref(&ghost), SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::LeaseLost]
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg(store.record_key("s", "ghost").expect("key"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0);
    assert!(!store.forget("s", "ghost").await.expect("forget"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_a_flush() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let long = ttl(60 * SECOND, 60 * SECOND);
    let flush = |mut conn: redis::aio::MultiplexedConnection| async move {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .expect("SCRIPT FLUSH");
    };
    flush(conn.clone()).await;
    let lease = must_claim(&store, "s", "one", long).await;
    flush(conn.clone()).await;
    assert_applied(store.renew(&lease, 60 * SECOND).await);
    // A claim of a released record is decided by the claim script (a
    // fresh key needs none).
    assert_applied(store.fail(&lease, Release::CountAttempt).await);
    flush(conn.clone()).await;
    let again = must_claim(&store, "s", "one", long).await;
    assert_eq!(again.attempt, 2, "the claim script ran once");
    flush(conn.clone()).await;
    let keys: Vec<String> = (0..5).map(|i| format!("batch-{i}")).collect();
    let claims = store
        .claim_many("s", &keys, long)
        .await
        .expect("claim_many");
    let leases: Vec<Lease> = claims
        .into_iter()
        .map(|c| c.into_lease().expect("a new key is won"))
        .collect();
    assert!(
        leases.iter().all(|l| l.attempt == 1),
        "each batch claim ran once"
    );
    flush(conn.clone()).await;
    assert_eq!(
        store
            .complete_many(&leases, 60 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied; 5]
    );
    flush(conn.clone()).await;
    let record = store
        .get("s", "batch-0")
        .await
        .expect("get")
        .expect("there");
    assert_eq!((record.state, record.attempts), (RecordState::Done, 1));
    let _: i64 = redis::cmd("DEL")
        .arg(store.record_key("s", "one").expect("key"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_data_under_a_record_key_is_a_permanent_error() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let key = store.record_key("s", "squatted").expect("key");
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("not a record")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET");
    let permanent = common::is_permanent;
    let err = store
        .claim("s", "squatted", ttl(SECOND, SECOND))
        .await
        .expect_err("a string is not a record");
    assert!(permanent(&err), "{err:?}");
    assert!(err.to_string().contains(&key), "names the key: {err}");
    let err = store
        .claim_many(
            "s",
            &["fine".to_owned(), "squatted".to_owned()],
            ttl(SECOND, SECOND),
        )
        .await
        .expect_err("a batch with it fails as a whole");
    assert!(permanent(&err), "{err:?}");
    let ghost = Lease {
        scope: "s".into(),
        key: "squatted".into(),
        token: LeaseToken(7),
        attempt: 1,
    };
    let err = store
        .complete_many(std::slice::from_ref(&ghost), 60 * SECOND)
        .await
        .expect_err("complete_many");
    assert!(permanent(&err), "{err:?}");
    let err = store.bury(&ghost, 60 * SECOND).await.expect_err("bury");
    assert!(permanent(&err), "{err:?}");
    let err = store.get("s", "squatted").await.expect_err("get");
    assert!(!err.is_transient(), "{err:?}");
    // Untouched, and forget clears it.
    let kept: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(kept, "not a record");
    assert!(store.forget("s", "squatted").await.expect("forget"));

    // Strings that look almost like records are refused too, by every
    // operation that reads them.
    for almost in [
        "c:0000000000000007:1:1:1",
        "c:0000000000000007:1",
        "c:zz:1:1",
        "q:0000000000000007:1:1",
        "c:0000000000000007:-1:1",
        // An attempt count of more than 10 digits.
        "c:0000000000000007:1795558172956:1",
        "",
    ] {
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(almost)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .expect("SET");
        let before = snapshot(&mut conn, &key).await;
        let other = Lease {
            token: LeaseToken(8),
            ..ghost.clone()
        };
        let errs = [
            store
                .claim("s", "squatted", ttl(SECOND, SECOND))
                .await
                .map(drop),
            store.get("s", "squatted").await.map(drop),
            store.complete(&other, 60 * SECOND).await.map(drop),
            store.renew(&other, SECOND).await.map(drop),
            store.fail(&other, Release::CountAttempt).await.map(drop),
        ];
        for err in errs {
            let err = err.expect_err(almost);
            assert!(permanent(&err), "{almost:?}: {err:?}");
        }
        // Value and expiry both as they were.
        assert_eq!(snapshot(&mut conn, &key).await, before, "{almost:?}");
    }
    assert!(store.forget("s", "squatted").await.expect("forget"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_under_a_record_key_is_a_permanent_error() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let token = LeaseToken(0x5f0e_1d2c_3b4a_5968);
    let key = store.record_key("s", "old").expect("key");
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("state")
        .arg("claimed")
        .arg("token")
        .arg(token.to_string())
        .arg("lease")
        .arg("99999999999999")
        .arg("attempts")
        .arg("1")
        .query_async(&mut conn)
        .await
        .map(|_: i64| ())
        .expect("HSET");
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("PEXPIRE");
    let lease = Lease {
        scope: "s".into(),
        key: "old".into(),
        token,
        attempt: 1,
    };
    let t = ttl(SECOND, SECOND);
    // A live claim in the same batch as the hash (many keys are read
    // with one MGET, which answers nil for a hash: the script must still
    // tell it from an absent key).
    let live = must_claim(&store, "s", "live", ttl(60 * SECOND, 60 * SECOND)).await;
    let errs = [
        store.claim("s", "old", t).await.map(drop),
        store
            .claim_many("s", &["new".to_owned(), "old".to_owned()], t)
            .await
            .map(drop),
        store.get("s", "old").await.map(drop),
        store.renew(&lease, SECOND).await.map(drop),
        store.complete(&lease, SECOND).await.map(drop),
        store
            .complete_many(std::slice::from_ref(&lease), SECOND)
            .await
            .map(drop),
        store
            .complete_many(&[live.clone(), lease.clone()], SECOND)
            .await
            .map(drop),
        store.fail(&lease, Release::RefundAttempt).await.map(drop),
        store.bury(&lease, SECOND).await.map(drop),
    ];
    for err in errs {
        let err = err.expect_err("a hash is not a record");
        assert!(common::is_permanent(&err), "{err:?}");
        let text = err.to_string();
        for part in ["WRONGTYPE", key.as_str()] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
    }
    // Left as it was; forget removes it.
    let state: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("state")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert_eq!(state.as_deref(), Some("claimed"));
    assert!(store.forget("s", "old").await.expect("forget"));
    // The failed batch left the live claim alone.
    assert_applied(store.complete(&live, SECOND).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_states_counts_records_by_state_per_scope() {
    // A fresh key prefix (common::store): no other test's keys in the counts.
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let long = ttl(60 * SECOND, 60 * SECOND);
    // Scope a: one record in every state.
    let _live = must_claim(&store, "a", "live", long).await;
    let _lapsing = must_claim(
        &store,
        "a",
        "lapsed",
        ttl(Duration::from_millis(50), 60 * SECOND),
    )
    .await;
    let released = must_claim(&store, "a", "released", long).await;
    assert_applied(store.fail(&released, Release::CountAttempt).await);
    let done = must_claim(&store, "a", "done", long).await;
    assert_applied(store.complete(&done, 60 * SECOND).await);
    let dead = must_claim(&store, "a", "dead", long).await;
    assert_applied(store.bury(&dead, 60 * SECOND).await);
    // Scope b: two done records and a live claim.
    for k in ["x", "y"] {
        let lease = must_claim(&store, "b", k, long).await;
        assert_applied(store.complete(&lease, 60 * SECOND).await);
    }
    let _b_live = must_claim(&store, "b", "z", long).await;
    // Under the prefix, and in scope a's key space, values that are not
    // records: skipped, not counted, no error.
    let junk = store.record_key("a", "junk").expect("key");
    let _: () = redis::cmd("SET")
        .arg(&junk)
        .arg("not a record")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET junk");
    let hash = store.record_key("a", "hash").expect("key");
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&hash)
        .arg("state")
        .arg("done")
        .ignore()
        .cmd("PEXPIRE")
        .arg(&hash)
        .arg(60_000)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("HSET hash");
    // Under the prefix but outside the record layout: not even scanned.
    let stray = format!("{}stray", store.config().prefix());
    let _: () = redis::cmd("SET")
        .arg(&stray)
        .arg("c:00000000000000ab:1:0")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("SET stray");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let in_a = store.scan_states(Some("a"), 1000).await.expect("scan a");
    assert_eq!(
        in_a.counts,
        RecordCounts {
            claimed: 1,
            lapsed: 1,
            released: 1,
            done: 1,
            dead: 1,
        }
    );
    assert!(in_a.complete, "{in_a:?}");
    assert_eq!(in_a.scanned, 7, "five records and two foreign values");
    let in_b = store.scan_states(Some("b"), 1000).await.expect("scan b");
    assert_eq!(
        in_b.counts,
        RecordCounts {
            claimed: 1,
            done: 2,
            ..RecordCounts::default()
        }
    );
    assert_eq!((in_b.scanned, in_b.complete), (3, true));
    let all = store.scan_states(None, 1000).await.expect("scan all");
    assert_eq!(
        all.counts,
        RecordCounts {
            claimed: 2,
            lapsed: 1,
            released: 1,
            done: 3,
            dead: 1,
        }
    );
    assert_eq!((all.scanned, all.complete), (10, true));
    let none = store.scan_states(Some("c"), 1000).await.expect("scan c");
    assert_eq!((none.counts, none.scanned), (RecordCounts::default(), 0));
    assert!(none.complete);
    // Another prefix on the same server sees none of it.
    let other = RedisDedupStore::connect_with(
        &redis_url(),
        RedisConfig::new().with_prefix(common::fresh_prefix()),
    )
    .await
    .expect("connect");
    let elsewhere = other.scan_states(None, 1000).await.expect("scan elsewhere");
    assert_eq!((elsewhere.scanned, elsewhere.counts.total()), (0, 0));

    for bad in ["", "a b", "a*", "x:y"] {
        assert!(
            matches!(
                store.scan_states(Some(bad), 1000).await,
                Err(Error::InvalidInput { what: "scope", .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        store.scan_states(None, 0).await,
        Err(Error::InvalidInput { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_states_stops_at_max_keys() {
    let Some(store) = store().await else { return };
    // More keys than one SCAN call answers (its COUNT is a few hundred),
    // so the cursor cannot come back to 0 in the first call.
    let keys: Vec<String> = (0..700).map(|i| format!("k{i}")).collect();
    let claims = store
        .claim_many("many", &keys, ttl(60 * SECOND, 60 * SECOND))
        .await
        .expect("claim_many");
    assert!(claims.iter().all(|c| matches!(c, Claim::Claimed(_))));

    let part = store
        .scan_states(Some("many"), 10)
        .await
        .expect("scan part");
    assert!(!part.complete, "{part:?}");
    assert!(part.scanned >= 10 && part.scanned < 700, "{part:?}");
    assert_eq!(part.counts.claimed, part.scanned, "{part:?}");
    assert_eq!(part.counts.total(), part.counts.claimed);

    let whole = store.scan_states(Some("many"), 10_000).await.expect("scan");
    assert!(whole.complete, "{whole:?}");
    assert_eq!(whole.scanned, 700);
    assert_eq!(
        whole.counts,
        RecordCounts {
            claimed: 700,
            ..RecordCounts::default()
        }
    );
    // A bound the key space just fits in: all of it, so complete.
    let exact = store.scan_states(None, 700).await.expect("scan all");
    assert_eq!((exact.scanned, exact.counts.claimed), (700, 700));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_manager_shares_an_existing_connection() {
    if common::store().await.is_none() {
        return;
    }
    let client = redis::Client::open(redis_url()).expect("url");
    let manager = redis::aio::ConnectionManager::new(client)
        .await
        .expect("manager");
    let store = RedisDedupStore::from_manager(
        manager,
        RedisConfig::new().with_prefix(common::fresh_prefix()),
    )
    .expect("valid config");
    assert!(format!("{store:?}").contains("<ConnectionManager>"));
    let lease = must_claim(&store, "s", "k", ttl(SECOND, SECOND)).await;
    assert_applied(store.complete(&lease, SECOND).await);
    store.ping().await.expect("ping");
    let bad = RedisDedupStore::from_manager(
        store.connection_manager(),
        RedisConfig::new().with_prefix("has space"),
    );
    assert!(matches!(bad, Err(Error::InvalidInput { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_show() {
    if common::store().await.is_none() {
        return;
    }
    let addr = common::redis_addr().await;
    // The default user has no password here, so AUTH with any password
    // succeeds: a store that works, built from a URL with a secret in it.
    let url = format!("redis://default:secret@{addr}/0");
    let store = RedisDedupStore::connect(&url).await.expect("connect");
    let shown = format!("{store:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("default:***@"), "{shown}");

    // Errors from unreachable servers, bad URLs and refused logins.
    let quick = RedisConfig::new()
        .with_connection_timeout(Duration::from_millis(300))
        .with_response_timeout(Duration::from_millis(300));
    for url in [
        "redis://user:secret@127.0.0.1:1/0".to_owned(),
        "redis://user:secret@[::1:bad/0".to_owned(),
        "redis://user:secret@127.0.0.1:6379/notadb".to_owned(),
        format!("redis://no-such-user:secret@{addr}/0"),
    ] {
        let err = RedisDedupStore::connect_with(&url, quick.clone())
            .await
            .expect_err("must fail");
        let mut text = format!("{err} / {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(&format!(" / {s} / {s:?}"));
            source = s.source();
        }
        assert!(!text.contains("secret"), "{url}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_transient_error() {
    let quick = RedisConfig::new()
        .with_connection_timeout(Duration::from_millis(200))
        .with_response_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = RedisDedupStore::connect_with("redis://127.0.0.1:1", quick)
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err:?}");
    assert!(started.elapsed() < 2 * SECOND, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_urls_get_a_crypto_provider() {
    if common::store().await.is_none() {
        return;
    }
    // A plain Redis cannot speak TLS: the handshake fails, as an error,
    // not a panic for want of a rustls crypto provider.
    let addr = common::redis_addr().await;
    let quick = RedisConfig::new()
        .with_connection_timeout(Duration::from_millis(500))
        .with_response_timeout(Duration::from_millis(500));
    let err = RedisDedupStore::connect_with(&format!("rediss://{addr}"), quick)
        .await
        .expect_err("plain redis cannot do TLS");
    assert!(
        format!("{err}").starts_with("redis"),
        "errors name the backend: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_store_connects_on_first_use() {
    let quick = RedisConfig::new()
        .with_connection_timeout(Duration::from_millis(200))
        .with_response_timeout(Duration::from_millis(300));
    // Nothing listens there: building works, operations fail transiently.
    let down = RedisDedupStore::connect_lazy("redis://u:secret@127.0.0.1:1", quick.clone())
        .expect("no I/O at construction");
    let err = down
        .claim("s", "k", ttl(SECOND, SECOND))
        .await
        .expect_err("unreachable");
    assert!(err.is_transient(), "{err:?}");
    assert!(!format!("{err} {err:?} {down:?}").contains("secret"));
    assert!(matches!(
        RedisDedupStore::connect_lazy("nonsense", quick.clone()),
        Err(Error::InvalidInput { .. })
    ));

    if common::store().await.is_none() {
        return;
    }
    let store =
        RedisDedupStore::connect_lazy(&redis_url(), quick.with_prefix(common::fresh_prefix()))
            .expect("lazy");
    let lease = must_claim(&store, "s", "k", ttl(SECOND, SECOND)).await;
    assert_applied(store.complete(&lease, SECOND).await);
}

#[test]
fn lazy_store_outside_a_runtime_is_an_error_not_a_panic() {
    let built = RedisDedupStore::connect_lazy("redis://127.0.0.1:6379", RedisConfig::new());
    assert!(matches!(built, Err(Error::Config(_))), "{built:?}");
}
