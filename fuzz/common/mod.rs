//! What the fuzz targets share: arbitrary header values and an equality
//! that treats a NaN as equal to itself (bit for bit).

#![allow(dead_code)]

use arbitrary::Arbitrary;
use idemq::{HeaderValue, Headers};

/// A [`HeaderValue`], arbitrary.
#[derive(Arbitrary, Clone, Debug)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
    Bytes(Vec<u8>),
}

impl From<Value> for HeaderValue {
    fn from(v: Value) -> Self {
        match v {
            Value::Str(s) => HeaderValue::Str(s),
            Value::Int(i) => HeaderValue::Int(i),
            Value::Bool(b) => HeaderValue::Bool(b),
            Value::Float(f) => HeaderValue::Float(f),
            Value::Bytes(b) => HeaderValue::Bytes(b),
        }
    }
}

/// A header name: one idemq writes (or RabbitMQ's), or anything.
#[derive(Arbitrary, Clone, Debug)]
pub enum Name {
    Known(u8),
    Other(String),
}

pub const KNOWN: [&str; 14] = [
    idemq::headers::ATTEMPT,
    idemq::headers::REASON,
    idemq::headers::DETAIL,
    idemq::headers::ATTEMPTS,
    idemq::headers::ORIGINAL_QUEUE,
    idemq::headers::FIRST_FAILURE_MS,
    idemq::headers::DEAD_AT_MS,
    idemq::headers::DEFERRALS,
    idemq::headers::SCOPE,
    idemq::headers::KEY,
    idemq::headers::REPLAYED,
    "x-death",
    "x-delivery-count",
    "x-key",
];

impl Name {
    pub fn as_str(&self) -> &str {
        match self {
            Name::Known(i) => KNOWN[usize::from(*i) % KNOWN.len()],
            Name::Other(s) => s,
        }
    }
}

/// Headers from arbitrary (name, value) pairs.
pub fn headers(pairs: &[(Name, Value)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.clone().into()))
        .collect()
}

/// Equal, floats compared bit for bit (NaN == NaN, 0.0 != -0.0).
pub fn same_value(a: &HeaderValue, b: &HeaderValue) -> bool {
    match (a, b) {
        (HeaderValue::Float(x), HeaderValue::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// [`same_value`] for every header, and the same names.
pub fn same_headers(a: &Headers, b: &Headers) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && same_value(va, vb))
}
