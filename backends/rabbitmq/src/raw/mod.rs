//! A minimal, lenient AMQP 0-9-1 client, and the quarantine built on it.
//!
//! lapin's protocol crate refuses a short string that is not UTF-8 (a
//! `message_id` of `b"\xff\xfe..."`, a header name) as a protocol error and
//! drops the connection, while RabbitMQ accepts and stores such messages:
//! one of them at the head of a queue would block it for every lapin
//! consumer. This client keeps short strings as bytes, so it can take such
//! a message off the queue; [`quarantine`] moves it to the dead-letter
//! queue as a copy lapin can read.
//!
//! Plain TCP only (no TLS), PLAIN authentication, one channel.

pub(crate) mod client;
pub(crate) mod codec;
#[cfg(feature = "testing")]
pub mod fuzz;
pub(crate) mod props;
pub(crate) mod quarantine;
#[cfg(feature = "testing")]
pub mod testing;

pub(crate) use client::RawError;
pub(crate) use quarantine::{Quarantine, quarantine, summary, warn_nothing_found};
