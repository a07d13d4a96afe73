//! The DedupStore conformance suite against a real Postgres: the store on
//! its own, and behind `idemq::Coalescing` (concurrent calls merged into
//! `claim_many` / `complete_many`).

mod common;

idemq::dedup_store_conformance!(common::store, coalesced);
