//! The DedupStore conformance suite against a real Postgres.

mod common;

idemq::dedup_store_conformance!(common::store);
