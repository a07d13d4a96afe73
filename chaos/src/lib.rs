//! # idemq-chaos: the chaos suite of idemq
//!
//! Several engines consume one RabbitMQ queue, each with its own broker
//! connection and its own store connection, each of them through its own
//! [`idemq::testing::FaultProxy`]. While ids are published (a tenth of
//! them twice) and handled (most succeed, some fail transiently once or
//! twice, a few are poison, a few fail until their attempts run out), a
//! driver cuts and black-holes links at random, crashes an engine (its task
//! aborted, its connections cut) and restarts it, stops engines gracefully
//! (timing the shutdown) and restarts them, and cuts one engine off from
//! its store for a long stretch while the others run. Then it calms down,
//! waits for the queues to drain, stops the engines, and checks: nothing
//! lost, no duplicate effect where effects are transactional, dead letters
//! with their reasons and attempts within bounds, empty queues, no false
//! lease-lost, shutdowns within their grace, no delivery held hostage in a
//! consumer's prefetch, brokers that reconnect once their link is back.
//!
//! The tests are in `tests/chaos.rs`; this library is their harness. Short
//! by default; see [`settings`] for the long run's variables:
//!
//! ```text
//! IDEMQ_CHAOS_MESSAGES=20000 IDEMQ_CHAOS_SECS=300 cargo test -p idemq-chaos --release -- --nocapture
//! ```

#![forbid(unsafe_code)]

pub mod counters;
pub mod driver;
pub mod harness;
pub mod net;
pub mod outcome;
pub mod postgres;
pub mod redis;
pub mod settings;
pub mod track;

pub use harness::{Mode, run};
pub use settings::Settings;
