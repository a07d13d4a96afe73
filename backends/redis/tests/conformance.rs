//! The shared `DedupStore` conformance suite, against a real Redis. The
//! same suite over `idemq::Coalescing` (concurrent calls merged into
//! batches) is in `coalesced.rs`.

mod common;

idemq::dedup_store_conformance!(common::store);
