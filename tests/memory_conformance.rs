//! The memory backends pass the same conformance suites as every backend.

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::testing::broker::BrokerCaps;

mod store {
    use super::*;

    async fn setup() -> Option<MemoryDedupStore> {
        Some(MemoryDedupStore::new())
    }

    idemq::dedup_store_conformance!(setup);
}

mod broker {
    use super::*;

    async fn setup(name: &str) -> Option<MemoryBroker> {
        Some(MemoryBroker::new(name))
    }

    idemq::broker_conformance!(setup, BrokerCaps::default());
}

/// The suites also hold on a paused clock (time jumps instead of passing).
mod paused {
    use super::*;
    use idemq::testing::{broker as b, store as s};

    #[tokio::test(start_paused = true)]
    async fn store_lease_and_expiry_on_paused_clock() {
        let store = MemoryDedupStore::new();
        s::lapsed_lease_is_taken_over(&store, "p1").await;
        s::done_expires_after_keep_for(&store, "p2").await;
        s::renew_extends_lease(&store, "p3").await;
    }

    #[tokio::test(start_paused = true)]
    async fn broker_retry_delay_on_paused_clock() {
        let broker = MemoryBroker::new("paused");
        let caps = BrokerCaps {
            retry_delay: std::time::Duration::from_secs(600),
            ..BrokerCaps::default()
        };
        b::retry_later_comes_back_after_delay(&broker, &caps).await;
    }
}

/// Many threads racing for the same keys: one winner per key per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_race_across_threads_with_one_winner() {
    use idemq::{Claim, ClaimTtl, DedupStore};
    use std::time::Duration;
    let store = MemoryDedupStore::new();
    let ttl = ClaimTtl {
        lease: Duration::from_secs(60),
        retain: Duration::from_secs(60),
    };
    for round in 0..200 {
        let key = format!("race-{round}");
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { store.claim("race", &key, ttl).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            if let Claim::Claimed(_) = t.await.expect("task").expect("claim") {
                won += 1;
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
}
