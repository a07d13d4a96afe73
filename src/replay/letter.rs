//! [`DeadLetterInfo`]: what a dead letter says about itself.

use std::fmt;

use serde::Serialize;

use crate::key;
use crate::message::{Delivery, HeaderValue, headers};

/// Who dead-lettered a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// idemq's engine, with its reason headers ([`headers::REASON`], ...).
    Idemq,
    /// The broker itself (RabbitMQ: a delivery limit, an expiry, a
    /// rejection), with the reason of its `x-death` header.
    Broker,
    /// Neither says so: a message published to the dead-letter queue by
    /// something else.
    Unknown,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Idemq => "idemq",
            Origin::Broker => "broker",
            Origin::Unknown => "unknown",
        })
    }
}

/// What a dead letter's headers say: why it died, when, where from, and
/// the dedup record it was claimed under. Every field is read leniently: a
/// header that is missing or malformed is `None`, never an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetterInfo {
    /// Who dead-lettered it.
    pub origin: Origin,
    /// The reason: an idemq code (`max-attempts`, `permanent`, ...), the
    /// broker's (`delivery_limit`, `expired`, `rejected`, `maxlen`), or
    /// `unknown`.
    pub reason: String,
    /// Words that go with the reason (the handler's last error).
    pub detail: Option<String>,
    /// Attempts made before it died.
    pub attempts: Option<u32>,
    /// The work queue it was taken from.
    pub original_queue: Option<String>,
    /// When it first failed, ms since the Unix epoch.
    pub first_failure_ms: Option<i64>,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub dead_at_ms: Option<i64>,
    /// The dedup scope it was claimed in, as recorded by the engine.
    pub scope: Option<String>,
    /// The normalized key it was claimed under, as recorded by the engine.
    pub key: Option<String>,
    /// How often it was replayed before.
    pub replayed: u32,
}

impl DeadLetterInfo {
    /// Reads a dead letter's headers (and, for broker dead letters, its
    /// [`Delivery::broker_death`]).
    pub fn of(letter: &Delivery) -> Self {
        let text = |name| match letter.header(name) {
            Some(HeaderValue::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let int = |name| letter.header(name).and_then(HeaderValue::as_i64);
        let replayed = int(headers::REPLAYED)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        // The record is taken only when it is one a store accepts.
        let (scope, key) = match (text(headers::SCOPE), text(headers::KEY)) {
            (Some(s), k) if key::check_scope(&s).is_ok() => {
                (Some(s), k.filter(|k| key::check_key(k).is_ok()))
            }
            _ => (None, None),
        };
        if let Some(reason) = text(headers::REASON) {
            return DeadLetterInfo {
                origin: Origin::Idemq,
                reason,
                detail: text(headers::DETAIL),
                attempts: int(headers::ATTEMPTS).and_then(|n| u32::try_from(n).ok()),
                original_queue: text(headers::ORIGINAL_QUEUE),
                first_failure_ms: int(headers::FIRST_FAILURE_MS),
                dead_at_ms: int(headers::DEAD_AT_MS),
                scope,
                key,
                replayed,
            };
        }
        let (origin, reason, original_queue, dead_at_ms, detail) = match &letter.broker_death {
            Some(death) => (
                Origin::Broker,
                death.reason.clone(),
                Some(death.queue.clone()).filter(|q| !q.is_empty()),
                death.time_ms,
                Some(format!(
                    "dead-lettered by the broker from {} ({}, {} time(s))",
                    death.queue, death.reason, death.count
                )),
            ),
            None => (Origin::Unknown, "unknown".to_owned(), None, None, None),
        };
        DeadLetterInfo {
            origin,
            reason,
            detail,
            attempts: None,
            original_queue,
            first_failure_ms: int(headers::FIRST_FAILURE_MS),
            dead_at_ms,
            scope,
            key,
            replayed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{BrokerDeath, DeadLetter, DeadReason};

    #[test]
    fn reads_what_the_engine_writes() {
        let d = Delivery::new(1, "b").with_message_id("m");
        let letter = DeadLetter::new(DeadReason::Permanent, "boom", 2).with_record("orders", "m");
        let mut dead = Delivery::new(2, "b").with_message_id("m");
        dead.headers = letter.headers_for(&d, "orders-q");
        let info = DeadLetterInfo::of(&dead);
        assert_eq!(info.origin, Origin::Idemq);
        assert_eq!(info.reason, "permanent");
        assert_eq!(info.detail.as_deref(), Some("boom"));
        assert_eq!(info.attempts, Some(2));
        assert_eq!(info.original_queue.as_deref(), Some("orders-q"));
        assert!(info.dead_at_ms.is_some() && info.first_failure_ms.is_some());
        assert_eq!(
            (info.scope.as_deref(), info.key.as_deref()),
            (Some("orders"), Some("m"))
        );
        assert_eq!(info.replayed, 0);
    }

    #[test]
    fn broker_dead_letters_and_bad_headers() {
        let mut d = Delivery::new(1, "b")
            .with_header(headers::SCOPE, "bad scope")
            .with_header(headers::KEY, "k")
            .with_header(headers::REPLAYED, 3i64);
        d.broker_death = Some(BrokerDeath {
            reason: "delivery_limit".into(),
            queue: "orders".into(),
            count: 1,
            time_ms: Some(5),
        });
        let info = DeadLetterInfo::of(&d);
        assert_eq!(info.origin, Origin::Broker);
        assert_eq!(info.reason, "delivery_limit");
        assert_eq!(info.original_queue.as_deref(), Some("orders"));
        assert_eq!(info.dead_at_ms, Some(5));
        assert_eq!(
            (info.scope, info.key),
            (None, None),
            "an invalid scope is no record"
        );
        assert_eq!(info.replayed, 3);
        let bare = DeadLetterInfo::of(&Delivery::new(1, "b").with_header(headers::KEY, "{x}"));
        assert_eq!(
            (bare.origin, bare.reason.as_str()),
            (Origin::Unknown, "unknown")
        );
        assert_eq!(bare.key, None);
    }
}
