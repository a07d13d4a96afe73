//! `RedisDedupStore` behind `idemq::Coalescing`: concurrent claims and
//! completions go out as `claim_many` / `complete_many` scripts, and mean
//! the same as the plain calls (the conformance suite again).

mod common;

use idemq::Coalescing;
use idemq_redis::RedisDedupStore;

async fn store() -> Option<Coalescing<RedisDedupStore>> {
    // One call out at a time, so the suite's concurrent calls queue up and
    // go out in batches.
    Some(Coalescing::new(common::store().await?).with_max_in_flight(1))
}

idemq::dedup_store_conformance!(store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_go_out_in_batches() {
    let Some(store) = store().await else { return };
    let scope = idemq::testing::unique_scope("coalesced_batches");
    idemq::testing::store::coalesced_calls_go_out_in_batches(&store, &scope).await;
}
