//! `RedisDedupStore` behind `idemq::Coalescing`, the way to batch the
//! calls of concurrent tasks: concurrent claims and completions go out as
//! `claim_many` / `complete_many`, and mean the same as the plain calls
//! (the conformance suite again).

mod common;

use idemq::{Claim, ClaimTtl, Coalescing, DedupStore, Fenced};
use idemq_redis::RedisDedupStore;

async fn store() -> Option<Coalescing<RedisDedupStore>> {
    // One call out at a time, so the suite's concurrent calls queue up and
    // go out in batches.
    let inner = common::store().await?;
    Some(Coalescing::new(inner).with_max_in_flight(1))
}

idemq::dedup_store_conformance!(store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_go_out_in_batches() {
    let Some(store) = store().await else { return };
    let scope = idemq::testing::unique_scope("coalesced_batches");
    idemq::testing::store::coalesced_calls_go_out_in_batches(&store, &scope).await;
}

/// 200 tasks calling `claim` and `complete` through `Coalescing` at once,
/// 50 keys claimed by two tasks each: the calls go out as a handful of
/// batches (where a key may come twice), each key is won once, and every
/// record ends done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_a_key_win_it_once() {
    let ttl = ClaimTtl {
        lease: std::time::Duration::from_secs(30),
        retain: std::time::Duration::from_secs(30),
    };
    let Some(store) = store().await else { return };
    let scope = idemq::testing::unique_scope("coalesced_wins");
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (store, scope) = (store.clone(), scope.clone());
            tokio::spawn(async move {
                match store.claim(&scope, &format!("k{}", i % 150), ttl).await {
                    Ok(Claim::Claimed(lease)) => {
                        let done = store.complete(&lease, ttl.retain).await;
                        assert_eq!(done.expect("complete"), Fenced::Applied);
                        1
                    }
                    Ok(Claim::InProgress { .. } | Claim::Done) => 0,
                    other => panic!("claim: {other:?}"),
                }
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += t.await.expect("claimer");
    }
    assert_eq!(wins, 150, "one winner per key");
    for i in 0..150 {
        let rec = store
            .get(&scope, &format!("k{i}"))
            .await
            .expect("get")
            .expect("record");
        assert_eq!(rec.state, idemq::RecordState::Done);
    }
    let stats = store.stats();
    let claim_calls = stats.direct_claims + stats.claim_batches;
    let complete_calls = stats.direct_completes + stats.complete_batches;
    let claims = stats.direct_claims + stats.batched_claims;
    let completes = stats.direct_completes + stats.batched_completes;
    assert_eq!((claims, completes), (200, 150), "{stats:?}");
    assert!(
        claim_calls < 50,
        "200 claims took {claim_calls} calls: {stats:?}"
    );
    assert!(
        complete_calls < 50,
        "150 completes took {complete_calls} calls: {stats:?}"
    );
}
