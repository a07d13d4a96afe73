//! `RedisDedupStore` behind `idemq::Coalescing`: concurrent claims and
//! completions go out as `claim_many` / `complete_many` scripts, and mean
//! the same as the plain calls (the conformance suite again). Also the
//! store's own batching (`RedisConfig::with_batching`), which is such a
//! `Coalescing` inside the store.

mod common;

use idemq::{Claim, ClaimTtl, Coalescing, DedupStore, Fenced};
use idemq_redis::{RedisConfig, RedisDedupStore};

async fn store() -> Option<Coalescing<RedisDedupStore>> {
    // One call out at a time, so the suite's concurrent calls queue up and
    // go out in batches; over a store that does not batch by itself.
    let inner = common::store_with(RedisConfig::new().with_batching(None)).await?;
    Some(Coalescing::new(inner).with_max_in_flight(1))
}

idemq::dedup_store_conformance!(store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_go_out_in_batches() {
    let Some(store) = store().await else { return };
    let scope = idemq::testing::unique_scope("coalesced_batches");
    idemq::testing::store::coalesced_calls_go_out_in_batches(&store, &scope).await;
}

/// 200 tasks calling the store's own `claim` and `complete` at once: the
/// calls go out as a handful of batches, each key is won once, and every
/// record ends done. Without batching, or on a server that takes `SET ...
/// IFEQ`, each call goes out alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_batches_its_own_concurrent_calls() {
    let ttl = ClaimTtl {
        lease: std::time::Duration::from_secs(30),
        retain: std::time::Duration::from_secs(30),
    };
    for batching in [Some(1), None] {
        let config = RedisConfig::new().with_batching(batching);
        let Some(store) = common::store_with(config).await else {
            return;
        };
        let scope = idemq::testing::unique_scope("own_batches");
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
        assert_eq!(wins, 150, "one winner per key ({batching:?})");
        for i in 0..150 {
            let rec = store
                .get(&scope, &format!("k{i}"))
                .await
                .expect("get")
                .expect("record");
            assert_eq!(rec.state, idemq::RecordState::Done);
        }
        match (batching, store.batching_stats()) {
            (Some(_), Some(stats)) => {
                let claim_calls = stats.direct_claims + stats.claim_batches;
                let complete_calls = stats.direct_completes + stats.complete_batches;
                let claims = stats.direct_claims + stats.batched_claims;
                let completes = stats.direct_completes + stats.batched_completes;
                if store.uses_set_ifeq() {
                    // Plain commands, one per call: nothing batched.
                    assert_eq!((claims, completes), (0, 0), "{stats:?}");
                } else {
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
            }
            (None, None) => {}
            (b, stats) => panic!("batching {b:?} but stats {stats:?}"),
        }
    }
}
