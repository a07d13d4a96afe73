//! # idemq: idempotent, replayable message consumption
//!
//! (crate docs are filled in below, see README)

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod engine;
pub mod error;
pub mod handler;
pub mod key;
pub mod memory;
pub mod message;
pub mod policy;
pub mod replay;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use broker::Broker;
pub use engine::{Config, Engine, EngineBuilder, Report, Stopped};
pub use error::{BoxError, Error};
pub use handler::{Completion, Handler, HandlerError, JsonHandler, Message, json};
pub use key::KeyStrategy;
pub use message::{
    DeadLetter, DeadReason, Delivery, HeaderValue, Headers, OutgoingMessage, headers,
};
pub use policy::{Backoff, OnDead};
pub use replay::{ReplayReport, replay_dead_letters};
pub use store::{
    Claim, ClaimTtl, DedupStore, Fenced, Lease, LeaseToken, Record, RecordState, Release,
};

#[cfg(feature = "mock")]
pub use broker::MockBroker;
#[cfg(feature = "mock")]
pub use store::MockDedupStore;
