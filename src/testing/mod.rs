//! Conformance suites every backend must pass, a loopback fault proxy,
//! crash points ([`crash`]), and helpers for tests against real services. Enabled by the `testing` feature.
//!
//! The suites are plain `pub async fn`s, one per behaviour, so a backend's
//! tests call them one by one, or stamp them all out with
//! [`crate::dedup_store_conformance!`] / [`crate::broker_conformance!`].

pub mod broker;
pub mod crash;
mod fault_proxy;
pub mod store;

pub use fault_proxy::FaultProxy;

/// A fresh scope (or queue-name suffix) for one test: `name` (shortened)
/// plus random hex, so tests can share one server and run in parallel.
pub fn unique_scope(name: &str) -> String {
    let short: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(40)
        .collect();
    format!("{short}-{:08x}", rand::random::<u32>())
}

/// An in-memory log sink shared by its clones, for tests that check what
/// was logged: give `move || logs.clone()` to a `tracing_subscriber`
/// writer, read it back with [`LogBuffer::text`].
#[derive(Clone, Debug, Default)]
pub struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything written so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Forgets what was written.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// True when `IDEMQ_REQUIRE_SERVICES=1`: an unreachable service must then
/// fail the test run instead of skipping.
pub fn services_required() -> bool {
    std::env::var("IDEMQ_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Call when a test's service cannot be reached: prints the reason and
/// returns `None` (skip), or panics when [`services_required`].
pub fn service_unavailable<T>(service: &str, why: impl std::fmt::Display) -> Option<T> {
    if services_required() {
        panic!("{service} is unreachable and IDEMQ_REQUIRE_SERVICES=1: {why}");
    }
    eprintln!(
        "SKIPPED: {service} is unreachable ({why}); set IDEMQ_REQUIRE_SERVICES=1 to make this a failure"
    );
    None
}

/// Stamps out one `#[tokio::test]` per [`store`] suite function.
///
/// `setup` is an async fn (or closure) returning `Option<S>`, `None`
/// meaning "service unreachable, skipped" (see [`service_unavailable`]);
/// every test gets its own [`unique_scope`]. The calling crate needs
/// `tokio` with the `macros` and `rt-multi-thread` features.
///
/// ```
/// # use idemq::memory::MemoryDedupStore as MyStore;
/// async fn store() -> Option<MyStore> {
///     Some(MyStore::new()) // or connect, or `service_unavailable(..)` to skip
/// }
/// idemq::dedup_store_conformance!(store);
/// # fn main() {}
/// ```
///
/// With `coalesced`, the suite runs a second time, in a module
/// `coalesced`, on the store behind [`crate::Coalescing`] (see
/// [`store::coalesced`]), plus [`store::coalesced_calls_go_out_in_batches`].
/// That is for stores whose calls take a round trip (an in-process store
/// answers before a batch can form). `setup` is then named from inside
/// that module, which sees the caller's items through `use super::*`.
///
/// ```
/// # use idemq::memory::MemoryDedupStore as MyStore;
/// # async fn store() -> Option<MyStore> { Some(MyStore::new()) }
/// idemq::dedup_store_conformance!(store, coalesced);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! dedup_store_conformance {
    ($setup:expr, coalesced) => {
        $crate::dedup_store_conformance!(@suite $setup;);

        /// The suite again, through `idemq::Coalescing`.
        mod coalesced {
            #[allow(unused_imports)]
            use super::*;

            $crate::dedup_store_conformance!(
                @suite || $crate::testing::store::coalesced($setup);
                coalesced_calls_go_out_in_batches
            );
        }
    };
    ($setup:expr) => {
        $crate::dedup_store_conformance!(@suite $setup;);
    };
    (@suite $setup:expr; $($extra:ident),*) => {
        $crate::dedup_store_conformance!(@tests $setup;
            first_claim_wins, concurrent_claims_have_one_winner, complete_makes_duplicates_done,
            non_owner_is_fenced, lapsed_lease_is_taken_over, fail_releases_and_counts_attempts,
            refund_gives_the_attempt_back, bury_makes_dead, scopes_are_isolated,
            done_expires_after_keep_for, forget_makes_key_claimable, revive_touches_only_what_is_safe,
            revive_races_claims_safely, revive_many_answers_in_order, renew_extends_lease,
            batch_forms_answer_in_order, batch_repeats_answer_like_calls_in_a_row,
            fenced_ops_on_an_absent_key_create_nothing, rejects_bad_scope_and_key,
            settlements_retried_find_their_own, $($extra),*);
    };
    (@tests $setup:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(store) = ($setup)().await else { return };
                let scope = $crate::testing::unique_scope(stringify!($name));
                $crate::testing::store::$name(&store, &scope).await;
            }
        )*
    };
}

/// Stamps out one `#[tokio::test]` per [`broker`] suite function.
///
/// `setup` is an async fn (or closure) taking the test's name and returning
/// `Option<B>`: a broker on fresh, empty queues (or `None` to skip).
/// `caps` is a [`broker::BrokerCaps`] expression. An optional
/// `teardown = f` is awaited with the broker afterwards (delete queues).
#[macro_export]
macro_rules! broker_conformance {
    ($setup:expr, $caps:expr) => {
        $crate::broker_conformance!($setup, $caps, teardown = |_b| async {});
    };
    ($setup:expr, $caps:expr, teardown = $teardown:expr) => {
        $crate::broker_conformance!(@tests $setup, $caps, $teardown;
            delivers_what_was_published, ack_removes, nack_requeue_redelivers,
            nack_without_requeue_dead_letters, retry_later_comes_back_after_delay,
            dead_letter_keeps_body_id_and_reason, settles_each_delivery_on_its_own);
    };
    (@tests $setup:expr, $caps:expr, $teardown:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(broker) = ($setup)(stringify!($name)).await else { return };
                $crate::testing::broker::$name(&broker, &$caps).await;
                ($teardown)(broker).await;
            }
        )*
    };
}
