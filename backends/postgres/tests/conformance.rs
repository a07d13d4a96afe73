//! The DedupStore conformance suite against a real Postgres: the store on
//! its own, and behind `idemq::Coalescing` (concurrent calls merged into
//! `claim_many` / `complete_many`).

mod common;

idemq::dedup_store_conformance!(common::store);

mod coalesced {
    use idemq::Coalescing;
    use idemq_postgres::PostgresDedupStore;

    async fn store() -> Option<Coalescing<PostgresDedupStore>> {
        // One call out at a time, so the suite's concurrent calls queue up
        // and go out in batches.
        Some(Coalescing::new(super::common::store().await?).with_max_in_flight(1))
    }

    idemq::dedup_store_conformance!(store);

    /// 500 tasks claim and complete 400 distinct keys (100 of them twice):
    /// the calls go out in batches, every key has one winner, and every
    /// record ends done after exactly one attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_and_completions_go_out_in_batches() {
        use idemq::{Claim, ClaimTtl, DedupStore, Fenced, RecordState};
        use std::time::Duration;

        let Some(store) = store().await else { return };
        let store = store.with_max_in_flight(2);
        let scope = idemq::testing::unique_scope("coalesced_batches");
        let ttl = ClaimTtl {
            lease: Duration::from_secs(30),
            retain: Duration::from_secs(60),
        };
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let (store, scope) = (store.clone(), scope.clone());
                tokio::spawn(async move {
                    match store.claim(&scope, &format!("k{}", i % 400), ttl).await {
                        Ok(Claim::Claimed(lease)) => {
                            assert_eq!(lease.attempt, 1);
                            let done = store.complete(&lease, Duration::from_secs(60)).await;
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
        assert_eq!(wins, 400);
        let stats = store.stats();
        assert!(
            stats.claim_batches > 0 && stats.complete_batches > 0,
            "{stats:?}"
        );
        assert!(
            stats.claim_batches + stats.direct_claims < 250,
            "500 claims took {} calls: {stats:?}",
            stats.claim_batches + stats.direct_claims
        );
        for i in 0..400 {
            let rec = store
                .get(&scope, &format!("k{i}"))
                .await
                .expect("get")
                .expect("record");
            assert_eq!((rec.state, rec.attempts), (RecordState::Done, 1), "k{i}");
        }
    }
}
