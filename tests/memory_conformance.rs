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
