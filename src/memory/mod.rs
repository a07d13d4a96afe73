//! In-memory backends: what users unit-test their handlers against.
//! They pass the same conformance suites as the networked backends.

mod broker;
mod store;

pub use broker::{MemoryBroker, MemoryBrokerStats};
pub use store::MemoryDedupStore;
