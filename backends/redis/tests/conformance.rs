//! The shared `DedupStore` conformance suite, against a real Redis: with
//! the store's own batching of `claim` and `complete` (the default), and
//! without it (every call its own script call).

mod common;

idemq::dedup_store_conformance!(common::store);

mod unbatched {
    use super::common;
    use idemq_redis::{RedisConfig, RedisDedupStore};

    async fn store() -> Option<RedisDedupStore> {
        common::store_with(RedisConfig::new().with_batching(None)).await
    }

    idemq::dedup_store_conformance!(store);
}
