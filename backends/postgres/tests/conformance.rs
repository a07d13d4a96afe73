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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_go_out_in_batches() {
        let Some(store) = store().await else { return };
        let scope = idemq::testing::unique_scope("coalesced_batches");
        idemq::testing::store::coalesced_calls_go_out_in_batches(&store, &scope).await;
    }
}
