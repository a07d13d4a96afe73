//! Mapping between idemq [`Headers`] and AMQP field tables.
//!
//! AMQP has more value types than [`HeaderValue`]: integers of every width
//! become `Int`, strings `Str` (or `Bytes` when they are not UTF-8), byte
//! arrays `Bytes`, floats `Float`, timestamps `Int`; decimals, arrays,
//! nested tables and void become a string form. Nothing panics.
//!
//! Going back, `Str` becomes a long string, `Int` a signed 64-bit integer,
//! `Bool` a boolean, `Float` a double and `Bytes` a byte array. When a copy
//! of a delivery is published, headers that are unchanged since delivery
//! keep their original AMQP value (so `x-death` stays an array).

use idemq::message::BrokerDeath;
use idemq::{Error, HeaderValue, Headers};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::config::MAX_SHORT_STRING;

/// Converts an AMQP field table into idemq headers.
pub fn from_field_table(table: &FieldTable) -> Headers {
    table
        .inner()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), from_amqp(value)))
        .collect()
}

/// The most recent time RabbitMQ dead-lettered a message, from its
/// `x-death` header: an array of tables, one per (queue, reason), the most
/// recent first. `None` when the header is missing or has no usable entry.
pub fn broker_death(table: &FieldTable) -> Option<BrokerDeath> {
    let AMQPValue::FieldArray(deaths) = table.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(entry) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |name: &str| match entry.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    let count = entry
        .inner()
        .get("count")
        .and_then(|v| from_amqp(v).as_i64())
        .and_then(|c| u64::try_from(c).ok())
        .unwrap_or(1);
    let time_ms = match entry.inner().get("time") {
        // AMQP timestamps are seconds.
        Some(AMQPValue::Timestamp(t)) => i64::try_from(*t).ok().map(|s| s.saturating_mul(1000)),
        _ => None,
    };
    Some(BrokerDeath {
        reason: text("reason")?,
        queue: text("queue").unwrap_or_default(),
        count,
        time_ms,
    })
}

/// Converts one AMQP value into a header value (never fails).
pub fn from_amqp(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(t) => match i64::try_from(*t) {
            Ok(t) => HeaderValue::Int(t),
            Err(_) => HeaderValue::Str(t.to_string()),
        },
        AMQPValue::Float(f) => HeaderValue::Float(f64::from(*f)),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => HeaderValue::Str(s.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        other => HeaderValue::Str(string_form(other)),
    }
}

/// A readable string form of any AMQP value, for the types idemq headers
/// do not have (decimals, arrays, tables, void).
pub fn string_form(value: &AMQPValue) -> String {
    match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::DecimalValue(d) => {
            let digits = d.value.to_string();
            let scale = usize::from(d.scale);
            if scale == 0 {
                digits
            } else if digits.len() > scale {
                let (int, frac) = digits.split_at(digits.len() - scale);
                format!("{int}.{frac}")
            } else {
                format!("0.{}{digits}", "0".repeat(scale - digits.len()))
            }
        }
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(b) => format!("{:?}", b.as_slice()),
        AMQPValue::FieldArray(a) => {
            let items: Vec<String> = a.as_slice().iter().map(string_form).collect();
            format!("[{}]", items.join(", "))
        }
        AMQPValue::FieldTable(t) => {
            let items: Vec<String> = t
                .inner()
                .iter()
                .map(|(k, v)| format!("{:?}: {}", k.as_str(), string_form(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        AMQPValue::Void => "void".to_owned(),
    }
}

/// Converts one header value into an AMQP value.
pub fn to_amqp(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(b.clone().into()),
    }
}

/// Converts idemq headers into an AMQP field table. Header names longer
/// than an AMQP short string (255 bytes) are rejected.
pub fn to_field_table(headers: &Headers) -> Result<FieldTable, Error> {
    to_field_table_keeping(headers, None)
}

/// Like [`to_field_table`], but a header whose value still equals the
/// conversion of its value in `original` keeps the original AMQP value
/// (exact type, arrays and tables included).
pub fn to_field_table_keeping(
    headers: &Headers,
    original: Option<&FieldTable>,
) -> Result<FieldTable, Error> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        let key = short_string("header name", name)?;
        let kept = original
            .and_then(|o| o.inner().get(name.as_str()))
            .filter(|orig| unchanged(&from_amqp(orig), value))
            .cloned();
        table.insert(key, kept.unwrap_or_else(|| to_amqp(value)));
    }
    Ok(table)
}

/// Whether a header still has the value it was delivered with: floats
/// compared bit for bit, so that a NaN is unchanged (and -0.0 is not 0.0).
fn unchanged(delivered: &HeaderValue, now: &HeaderValue) -> bool {
    match (delivered, now) {
        (HeaderValue::Float(a), HeaderValue::Float(b)) => a.to_bits() == b.to_bits(),
        _ => delivered == now,
    }
}

/// An AMQP short string, or `InvalidInput` when `s` is longer than 255 bytes.
pub(crate) fn short_string(what: &'static str, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|_| {
        Error::invalid(
            what,
            format!(
                "{} bytes, longer than the {MAX_SHORT_STRING} AMQP allows",
                s.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{DecimalValue, FieldArray};

    #[test]
    fn round_trips_every_header_value() {
        let mut h = Headers::new();
        h.insert("s".into(), HeaderValue::Str("text".into()));
        h.insert("i".into(), HeaderValue::Int(-7));
        h.insert("b".into(), HeaderValue::Bool(true));
        h.insert("f".into(), HeaderValue::Float(1.5));
        h.insert("x".into(), HeaderValue::Bytes(vec![0, 255, 1]));
        let table = to_field_table(&h).expect("table");
        assert_eq!(from_field_table(&table), h);
    }

    #[test]
    fn maps_other_amqp_types_without_panicking() {
        let mut t = FieldTable::default();
        t.insert("u8".into(), AMQPValue::ShortShortUInt(200));
        t.insert("u32".into(), AMQPValue::LongUInt(u32::MAX));
        t.insert("ts".into(), AMQPValue::Timestamp(u64::MAX));
        t.insert("f32".into(), AMQPValue::Float(0.5));
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 3,
                value: 12,
            }),
        );
        t.insert("void".into(), AMQPValue::Void);
        t.insert("bin".into(), AMQPValue::LongString(vec![0xff, 0xfe].into()));
        t.insert("short".into(), AMQPValue::ShortString("sh".into()));
        let mut inner = FieldTable::default();
        inner.insert("count".into(), AMQPValue::LongLongInt(2));
        inner.insert("queue".into(), AMQPValue::LongString("q.retry.1s".into()));
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(inner)])),
        );
        let h = from_field_table(&t);
        assert_eq!(h["u8"], HeaderValue::Int(200));
        assert_eq!(h["u32"], HeaderValue::Int(i64::from(u32::MAX)));
        assert_eq!(h["ts"], HeaderValue::Str(u64::MAX.to_string()));
        assert_eq!(h["f32"], HeaderValue::Float(0.5));
        assert_eq!(h["dec"], HeaderValue::Str("0.012".into()));
        assert_eq!(h["void"], HeaderValue::Str("void".into()));
        assert_eq!(h["bin"], HeaderValue::Bytes(vec![0xff, 0xfe]));
        assert_eq!(h["short"], HeaderValue::Str("sh".into()));
        assert_eq!(
            h["x-death"],
            HeaderValue::Str(r#"[{"count": 2, "queue": "q.retry.1s"}]"#.into())
        );

        // Unchanged headers keep their AMQP type on the way back.
        let mut changed = h.clone();
        changed.insert("u8".into(), HeaderValue::Int(1));
        let back = to_field_table_keeping(&changed, Some(&t)).expect("table");
        assert_eq!(back.inner()["x-death"], t.inner()["x-death"]);
        assert_eq!(back.inner()["dec"], t.inner()["dec"]);
        assert_eq!(back.inner()["u8"], AMQPValue::LongLongInt(1));
    }

    #[test]
    fn broker_death_is_the_first_x_death_entry() {
        let entry = |queue: &str, reason: &str, count: i64| {
            let mut t = FieldTable::default();
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("count".into(), AMQPValue::LongLongInt(count));
            t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
            AMQPValue::FieldTable(t)
        };
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                entry("orders", "delivery_limit", 1),
                entry("orders.retry.1s", "expired", 3),
            ])),
        );
        let death = broker_death(&t).expect("death");
        assert_eq!(
            death,
            BrokerDeath {
                reason: "delivery_limit".into(),
                queue: "orders".into(),
                count: 1,
                time_ms: Some(1_700_000_000_000),
            }
        );
        assert_eq!(broker_death(&FieldTable::default()), None);
        let mut odd = FieldTable::default();
        odd.insert("x-death".into(), AMQPValue::LongString("nonsense".into()));
        assert_eq!(broker_death(&odd), None);
    }

    #[test]
    fn decimal_string_forms() {
        let d = |scale, value| string_form(&AMQPValue::DecimalValue(DecimalValue { scale, value }));
        assert_eq!(d(0, 42), "42");
        assert_eq!(d(2, 12345), "123.45");
        assert_eq!(d(2, 5), "0.05");
    }

    #[test]
    fn rejects_overlong_header_names() {
        let mut h = Headers::new();
        h.insert("n".repeat(256), HeaderValue::Int(1));
        assert!(to_field_table(&h).is_err());
    }

    #[test]
    fn unchanged_nan_and_signed_zero_headers_keep_their_amqp_value() {
        // Found by fuzzing (fuzz/, target amqp_properties): the properties
        // of a message with one header, "A", a 32-bit float NaN. Unchanged,
        // it went back as a 64-bit double, since NaN != NaN.
        let bytes = [0x20, 0x00, 0, 0, 0, 7, 1, b'A', b'f', 0x7f, 0xc0, 0, 0];
        let (rest, props) = lapin::protocol::basic::parse_properties(&bytes[..]).expect("parse");
        assert!(rest.is_empty());
        let original = props.headers().clone().expect("headers");
        let headers = from_field_table(&original);
        let back = to_field_table_keeping(&headers, Some(&original)).expect("table");
        assert!(matches!(back.inner()["A"], AMQPValue::Float(f) if f.is_nan()));

        // -0.0 changed to 0.0 is a change.
        let mut original = FieldTable::default();
        original.insert("z".into(), AMQPValue::Float(-0.0));
        let mut headers = from_field_table(&original);
        headers.insert("z".into(), HeaderValue::Float(0.0));
        let back = to_field_table_keeping(&headers, Some(&original)).expect("table");
        assert!(matches!(back.inner()["z"], AMQPValue::Double(f) if f.to_bits() == 0));
    }
}
