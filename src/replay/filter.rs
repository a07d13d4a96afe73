//! [`Filter`]: which dead letters a replay moves.

use crate::key;
use crate::message::{Delivery, HeaderValue};

use super::DeadLetterInfo;

/// Selects dead letters. Each kind of condition that is set must hold; a
/// kind set more than once holds when any of its values matches. The empty
/// filter selects everything.
///
/// ```
/// use idemq::replay::Filter;
///
/// // Dead for max-attempts or permanent failures, from `orders`, after noon.
/// let filter = Filter::new()
///     .reason("max-attempts")
///     .reason("permanent")
///     .original_queue("orders")
///     .dead_after_ms(1_767_268_800_000);
/// # let _ = filter;
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    reasons: Vec<String>,
    original_queues: Vec<String>,
    headers: Vec<(String, String)>,
    message_ids: Vec<String>,
    keys: Vec<String>,
    dead_after_ms: Option<i64>,
    dead_before_ms: Option<i64>,
}

impl Filter {
    /// Selects everything.
    pub fn new() -> Self {
        Filter::default()
    }

    /// Dead letters with this reason ([`DeadLetterInfo::reason`]).
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reasons.push(reason.into());
        self
    }

    /// Dead letters taken from this work queue.
    pub fn original_queue(mut self, queue: impl Into<String>) -> Self {
        self.original_queues.push(queue.into());
        self
    }

    /// Dead letters whose header `name` has this value (compared as text:
    /// `7`, `true` and `abc` match integers, booleans and strings).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Dead letters with this `message_id`, as the producer set it.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_ids.push(id.into());
        self
    }

    /// Dead letters recorded under this key: a raw key (normalized the way
    /// the engine does it) or a normalized one.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Dead letters dead-lettered at or after this time (ms since the Unix
    /// epoch). Dead letters that do not say when never match.
    pub fn dead_after_ms(mut self, ms: i64) -> Self {
        self.dead_after_ms = Some(ms);
        self
    }

    /// Dead letters dead-lettered before this time (ms since the Unix
    /// epoch). Dead letters that do not say when never match.
    pub fn dead_before_ms(mut self, ms: i64) -> Self {
        self.dead_before_ms = Some(ms);
        self
    }

    /// True when the filter selects everything.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Whether `letter` (read as `info`) is selected.
    pub fn matches(&self, letter: &Delivery, info: &DeadLetterInfo) -> bool {
        let any = |values: &[String], found: Option<&str>| {
            values.is_empty() || found.is_some_and(|f| values.iter().any(|v| v == f))
        };
        let dead_at = info.dead_at_ms;
        any(&self.reasons, Some(&info.reason))
            && any(&self.original_queues, info.original_queue.as_deref())
            && any(&self.message_ids, letter.message_id.as_deref())
            && (self.keys.is_empty()
                || info.key.as_deref().is_some_and(|k| {
                    self.keys
                        .iter()
                        .any(|want| want == k || key::normalize(want.as_bytes()) == k)
                }))
            && self.headers.iter().all(|(name, want)| {
                letter
                    .header(name)
                    .is_some_and(|v| header_text(v).as_deref() == Some(want.as_str()))
            })
            && self
                .dead_after_ms
                .is_none_or(|t| dead_at.is_some_and(|d| d >= t))
            && self
                .dead_before_ms
                .is_none_or(|t| dead_at.is_some_and(|d| d < t))
    }
}

fn header_text(v: &HeaderValue) -> Option<String> {
    match v {
        HeaderValue::Str(s) => Some(s.clone()),
        HeaderValue::Int(i) => Some(i.to_string()),
        HeaderValue::Bool(b) => Some(b.to_string()),
        HeaderValue::Float(f) => Some(f.to_string()),
        HeaderValue::Bytes(b) => String::from_utf8(b.clone()).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeadLetter, DeadReason, headers};

    fn letter(id: &str, reason: DeadReason, dead_at: i64) -> Delivery {
        let d = Delivery::new(1, "b")
            .with_message_id(id)
            .with_header("tenant", "acme")
            .with_header("n", 7i64);
        let mut dead = d.clone();
        dead.headers = DeadLetter::new(reason, "x", 1)
            .with_record("s", key::normalize(id.as_bytes()))
            .headers_for(&d, "orders");
        dead.headers
            .insert(headers::DEAD_AT_MS.into(), HeaderValue::Int(dead_at));
        dead
    }

    fn sel(f: &Filter, d: &Delivery) -> bool {
        f.matches(d, &DeadLetterInfo::of(d))
    }

    #[test]
    fn kinds_and_and_values_or() {
        let a = letter("a", DeadReason::Permanent, 100);
        let b = letter("order #2", DeadReason::MaxAttempts, 200);
        assert!(sel(&Filter::new(), &a) && Filter::new().is_empty());
        let f = Filter::new().reason("permanent").reason("decode");
        assert!(sel(&f, &a) && !sel(&f, &b));
        let f = Filter::new()
            .reason("max-attempts")
            .original_queue("orders");
        assert!(!sel(&f, &a) && sel(&f, &b));
        assert!(!sel(&Filter::new().original_queue("other"), &a));
        assert!(sel(
            &Filter::new().header("tenant", "acme").header("n", "7"),
            &a
        ));
        assert!(!sel(&Filter::new().header("tenant", "other"), &a));
        assert!(!sel(&Filter::new().header("missing", "x"), &a));
        assert!(sel(&Filter::new().message_id("order #2"), &b));
        // A raw key is normalized as the engine does; a normalized one is taken as it is.
        assert!(sel(&Filter::new().key("order #2"), &b));
        assert!(sel(&Filter::new().key(key::normalize(b"order #2")), &b));
        assert!(!sel(&Filter::new().key("a"), &b));
        let f = Filter::new().dead_after_ms(150);
        assert!(!sel(&f, &a) && sel(&f, &b));
        let f = Filter::new().dead_before_ms(200);
        assert!(sel(&f, &a) && !sel(&f, &b));
        let undated = Delivery::new(1, "b");
        assert!(!sel(&Filter::new().dead_after_ms(0), &undated));
    }
}
