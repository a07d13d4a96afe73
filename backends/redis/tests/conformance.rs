//! The shared `DedupStore` conformance suite, against a real Redis.

mod common;

idemq::dedup_store_conformance!(common::store);
