//! `claim_many` and `complete_many`: one script call per up to
//! `MAX_KEYS_PER_CALL` keys, answering exactly as the single calls made one
//! after the other would (duplicates, mixed states, split batches, lost
//! script cache).

mod common;

use std::time::Duration;

use common::{SECOND, pttl, raw, store};
use idemq::testing::store::{assert_applied, must_claim};
use idemq::{Claim, ClaimTtl, DedupStore, Fenced, Lease, LeaseToken, RecordState, Release};
use idemq_redis::{MAX_KEYS_PER_CALL, redis};

const LONG: ClaimTtl = ClaimTtl {
    lease: Duration::from_secs(60),
    retain: Duration::from_secs(60),
};

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|k| (*k).to_owned()).collect()
}

/// A claim without its token, and with the wait rounded to seconds, for
/// comparing a batch with single calls.
fn shape(claim: &Claim) -> String {
    match claim {
        Claim::Claimed(lease) => format!("claimed {} #{}", lease.key, lease.attempt),
        Claim::Done => "done".into(),
        Claim::Dead => "dead".into(),
        Claim::InProgress { retry_after } => {
            format!("in progress {}s", retry_after.as_millis().div_ceil(1000))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_twice_in_claim_many_is_claimed_then_in_progress() {
    let Some(store) = store().await else { return };
    let names = keys(&["a", "b", "a"]);
    let batch = store
        .claim_many("batch", &names, LONG)
        .await
        .expect("claim_many");
    let mut single = Vec::new();
    for key in &names {
        single.push(store.claim("single", key, LONG).await.expect("claim"));
    }
    let shapes = |claims: &[Claim]| claims.iter().map(shape).collect::<Vec<_>>();
    assert_eq!(
        shapes(&batch),
        ["claimed a #1", "claimed b #1", "in progress 60s"]
    );
    assert_eq!(shapes(&batch), shapes(&single));
    // The first occurrence holds the lease.
    let first = batch[0].clone().into_lease().expect("a new key is won");
    assert_applied(store.complete(&first, 60 * SECOND).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_twice_in_complete_many_answers_like_two_calls() {
    let Some(store) = store().await else { return };
    let lease = must_claim(&store, "s", "k", LONG).await;
    let other = must_claim(&store, "s", "k2", LONG).await;
    let mut forged = other.clone();
    forged.token = LeaseToken(other.token.0 ^ 1);

    // The same lease twice: applied, then applied again (it finds its
    // own done record), the record written once.
    assert_eq!(
        store
            .complete_many(&[lease.clone(), lease.clone()], 60 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied, Fenced::Applied]
    );
    // Another token first changes nothing; the owner's then applies, and
    // its repeat finds it done; another token after it is refused.
    assert_eq!(
        store
            .complete_many(
                &[forged.clone(), other.clone(), other.clone(), forged.clone()],
                60 * SECOND
            )
            .await
            .expect("complete_many"),
        vec![
            Fenced::LeaseLost,
            Fenced::Applied,
            Fenced::Applied,
            Fenced::LeaseLost
        ]
    );
    for key in ["k", "k2"] {
        let record = store.get("s", key).await.expect("get").expect("kept");
        assert_eq!((record.state, record.attempts), (RecordState::Done, 1));
    }
    // The same with single calls, one after the other.
    let single = must_claim(&store, "s", "k3", LONG).await;
    let mut answers = Vec::new();
    for lease in [&single, &single] {
        answers.push(store.complete(lease, 60 * SECOND).await.expect("complete"));
    }
    assert_eq!(answers, vec![Fenced::Applied, Fenced::Applied]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_many_answers_every_state_like_claim() {
    let Some(store) = store().await else { return };
    let mut conn = raw().await;
    let done = must_claim(&store, "s", "done", LONG).await;
    assert_applied(store.complete(&done, 60 * SECOND).await);
    let dead = must_claim(&store, "s", "dead", LONG).await;
    assert_applied(store.bury(&dead, 60 * SECOND).await);
    // Released, with a record life longer than the batch's: kept.
    let released = must_claim(
        &store,
        "s",
        "released",
        ClaimTtl {
            lease: 60 * SECOND,
            retain: 120 * SECOND,
        },
    )
    .await;
    assert_applied(store.fail(&released, Release::CountAttempt).await);
    // Lapsed, with a record life shorter than the batch's: extended.
    must_claim(
        &store,
        "s",
        "lapsed",
        ClaimTtl {
            lease: Duration::from_millis(100),
            retain: 2 * SECOND,
        },
    )
    .await;
    must_claim(&store, "s", "busy", LONG).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let names = keys(&["fresh", "done", "dead", "released", "lapsed", "busy"]);
    let batch = store
        .claim_many("s", &names, LONG)
        .await
        .expect("claim_many");
    assert_eq!(
        batch.iter().map(shape).collect::<Vec<_>>(),
        [
            "claimed fresh #1",
            "done",
            "dead",
            "claimed released #2",
            "claimed lapsed #2",
            "in progress 60s"
        ]
    );
    let life = |key: &str| store.record_key("s", key).expect("key");
    let t = pttl(&mut conn, &life("released")).await;
    assert!((110_000..=120_000).contains(&t), "released PTTL {t}");
    let t = pttl(&mut conn, &life("lapsed")).await;
    assert!((55_000..=60_000).contains(&t), "lapsed PTTL {t}");
    let t = pttl(&mut conn, &life("fresh")).await;
    assert!((55_000..=60_000).contains(&t), "fresh PTTL {t}");

    // complete_many settles what the batch won, each record for keep_for.
    let won: Vec<Lease> = batch
        .iter()
        .filter_map(|c| match c {
            Claim::Claimed(l) => Some(l.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        store
            .complete_many(&won, 5 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied; 3]
    );
    for key in ["fresh", "released", "lapsed"] {
        let t = pttl(&mut conn, &life(key)).await;
        assert!((4_000..=5_000).contains(&t), "{key} PTTL {t}");
    }
    assert_eq!(
        store
            .get("s", "released")
            .await
            .expect("get")
            .map(|r| (r.state, r.attempts)),
        Some((RecordState::Done, 2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_split_and_keep_their_order() {
    let Some(store) = store().await else { return };
    let n = 2 * MAX_KEYS_PER_CALL + 10;
    let mut names: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    // Duplicates: one in the next script call, one in the same call.
    names[MAX_KEYS_PER_CALL] = names[0].clone();
    names[n - 1] = names[n - 2].clone();
    let claims = store
        .claim_many("big", &names, LONG)
        .await
        .expect("claim_many");
    assert_eq!(claims.len(), n);
    let mut won = Vec::new();
    for (i, (claim, key)) in claims.iter().zip(&names).enumerate() {
        if i == MAX_KEYS_PER_CALL || i == n - 1 {
            assert_eq!(shape(claim), "in progress 60s", "#{i}");
        } else {
            let lease = claim.clone().into_lease().expect("a new key is won");
            assert_eq!((&lease.key, lease.attempt), (key, 1), "#{i}");
            won.push(lease);
        }
    }
    // Every lease once, the first one again at the end (in another chunk
    // of the split: it finds its own done record), and a forged one.
    won.push(won[0].clone());
    let mut forged = won[1].clone();
    forged.token = LeaseToken(forged.token.0 ^ 1);
    won.push(forged);
    let fenced = store
        .complete_many(&won, 60 * SECOND)
        .await
        .expect("complete_many");
    let mut expected = vec![Fenced::Applied; won.len() - 1];
    expected.push(Fenced::LeaseLost);
    assert_eq!(fenced, expected);
    let again = store
        .claim_many("big", &names, LONG)
        .await
        .expect("claim_many");
    assert!(again.iter().all(|c| *c == Claim::Done), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_many_spans_scopes_and_deletes_with_zero_keep() {
    let Some(store) = store().await else { return };
    let a = must_claim(&store, "one", "x", LONG).await;
    let b = must_claim(&store, "two", "x", LONG).await;
    assert_eq!(
        store
            .complete_many(&[a, b], Duration::ZERO)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied, Fenced::Applied]
    );
    for scope in ["one", "two"] {
        assert_eq!(store.get(scope, "x").await.expect("get"), None);
    }
    // One key (the script's one-key path) deletes too.
    let c = must_claim(&store, "one", "z", LONG).await;
    assert_applied(store.complete(&c, Duration::ZERO).await);
    assert_eq!(store.get("one", "z").await.expect("get"), None);
    let a = must_claim(&store, "one", "y", LONG).await;
    let b = must_claim(&store, "two", "y", LONG).await;
    assert_eq!(
        store
            .complete_many(&[a, b], 60 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied, Fenced::Applied]
    );
    for scope in ["one", "two"] {
        assert_eq!(
            store.claim(scope, "y", LONG).await.expect("claim"),
            Claim::Done
        );
    }
    assert_eq!(
        store
            .complete_many(&[], 60 * SECOND)
            .await
            .expect("empty batch"),
        vec![]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_batches_survive_a_script_flush() {
    let Some(store) = store().await else { return };
    let conn = raw().await;
    let flush = |mut conn: redis::aio::MultiplexedConnection| async move {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .expect("SCRIPT FLUSH");
    };
    let names: Vec<String> = (0..MAX_KEYS_PER_CALL + 1)
        .map(|i| format!("f{i}"))
        .collect();
    flush(conn.clone()).await;
    let claims = store
        .claim_many("s", &names, LONG)
        .await
        .expect("claim_many");
    let leases: Vec<Lease> = claims
        .into_iter()
        .map(|c| c.into_lease().expect("a new key is won"))
        .collect();
    assert!(leases.iter().all(|l| l.attempt == 1), "each call ran once");
    flush(conn.clone()).await;
    assert_eq!(
        store
            .complete_many(&leases, 60 * SECOND)
            .await
            .expect("complete_many"),
        vec![Fenced::Applied; names.len()]
    );
}
