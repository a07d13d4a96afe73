//! Content-header properties, parsed leniently: every short string is kept
//! as bytes, the headers table as its encoded bytes, with a walk of the
//! table that finds short strings (keys, at any depth) that are not UTF-8.
//!
//! lapin (amq-protocol) refuses a short string that is not UTF-8 as a
//! protocol error and drops the connection; RabbitMQ accepts and stores
//! such messages. This module says which fields are at fault and builds a
//! copy of the properties that lapin can parse.
//!
//! One file, past 600 lines: the parser, the walk and the repair share
//! one cursor type, and the tests (a third) feed them hostile headers.

use std::fmt::Write as _;

use super::codec::{CodecError, Cursor, put_long_str, put_short_str};

/// The longest short string.
pub(crate) const MAX_SHORT: usize = 255;
/// Tables and arrays nested deeper than this are not walked.
const MAX_DEPTH: usize = 64;

/// The basic-class properties of a message, short strings as bytes.
///
/// `headers` is the encoded body of the headers table (without its length
/// prefix), as it came; [`RawValue::decode_table`] walks it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawProperties {
    /// `content-type`.
    pub content_type: Option<Vec<u8>>,
    /// `content-encoding`.
    pub content_encoding: Option<Vec<u8>>,
    /// The headers table, encoded (see [`RawValue::encode_table`]).
    pub headers: Option<Vec<u8>>,
    /// `delivery-mode` (2: persistent).
    pub delivery_mode: Option<u8>,
    /// `priority`.
    pub priority: Option<u8>,
    /// `correlation-id`.
    pub correlation_id: Option<Vec<u8>>,
    /// `reply-to`.
    pub reply_to: Option<Vec<u8>>,
    /// `expiration`.
    pub expiration: Option<Vec<u8>>,
    /// `message-id`.
    pub message_id: Option<Vec<u8>>,
    /// `timestamp` (seconds).
    pub timestamp: Option<u64>,
    /// `type`.
    pub kind: Option<Vec<u8>>,
    /// `user-id`.
    pub user_id: Option<Vec<u8>>,
    /// `app-id`.
    pub app_id: Option<Vec<u8>>,
    /// `cluster-id`.
    pub cluster_id: Option<Vec<u8>>,
}

/// One field-table or field-array value, strings as bytes. Scalars keep
/// their type tag and exact bytes, so a table re-encodes as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawValue {
    /// A fixed-size value: its type tag (`t b B s U u I i L l f d D T`)
    /// and its big-endian bytes.
    Scalar {
        /// The type tag.
        tag: u8,
        /// The value's bytes.
        bytes: Vec<u8>,
    },
    /// `S`: a long string (not required to be UTF-8 by lapin either).
    LongString(Vec<u8>),
    /// `x`: a byte array.
    Bytes(Vec<u8>),
    /// `A`: an array.
    Array(Vec<RawValue>),
    /// `F`: a nested table.
    Table(Vec<(Vec<u8>, RawValue)>),
    /// `V`: no value.
    Void,
}

/// The width of a fixed-size value, by tag, as lapin reads them
/// (RabbitMQ's reading: `s` is a signed 16-bit integer, not a string).
fn scalar_width(tag: u8) -> Option<usize> {
    match tag {
        b't' | b'b' | b'B' => Some(1),
        b's' | b'U' | b'u' => Some(2),
        b'I' | b'i' | b'f' => Some(4),
        b'L' | b'l' | b'd' | b'T' => Some(8),
        b'D' => Some(5),
        _ => None,
    }
}

impl RawValue {
    /// A signed 64-bit integer (`l`).
    pub fn long_long(v: i64) -> RawValue {
        RawValue::Scalar {
            tag: b'l',
            bytes: v.to_be_bytes().to_vec(),
        }
    }

    /// A long string (`S`).
    pub fn text(s: impl Into<String>) -> RawValue {
        RawValue::LongString(s.into().into_bytes())
    }

    /// Decodes a table body (without its length prefix).
    pub fn decode_table(body: &[u8]) -> Result<Vec<(Vec<u8>, RawValue)>, CodecError> {
        decode_table_at(body, 0)
    }

    /// Encodes a table body (without its length prefix).
    pub fn encode_table(table: &[(Vec<u8>, RawValue)]) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        for (key, value) in table {
            put_short_str(&mut out, "header name", key)?;
            value.encode(&mut out)?;
        }
        Ok(out)
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            RawValue::Scalar { tag, bytes } => {
                if scalar_width(*tag) != Some(bytes.len()) {
                    return Err(CodecError::TooLong {
                        what: "fixed-size field value",
                        len: bytes.len(),
                    });
                }
                out.push(*tag);
                out.extend_from_slice(bytes);
            }
            RawValue::LongString(s) => {
                out.push(b'S');
                put_long_str(out, "long string", s)?;
            }
            RawValue::Bytes(b) => {
                out.push(b'x');
                put_long_str(out, "byte array", b)?;
            }
            RawValue::Array(items) => {
                let mut body = Vec::new();
                for item in items {
                    item.encode(&mut body)?;
                }
                out.push(b'A');
                put_long_str(out, "field array", &body)?;
            }
            RawValue::Table(table) => {
                out.push(b'F');
                put_long_str(out, "field table", &RawValue::encode_table(table)?)?;
            }
            RawValue::Void => out.push(b'V'),
        }
        Ok(())
    }

    fn decode(c: &mut Cursor<'_>, depth: usize) -> Result<RawValue, CodecError> {
        let tag = c.u8("field value type")?;
        if let Some(width) = scalar_width(tag) {
            return Ok(RawValue::Scalar {
                tag,
                bytes: c.take(width, "field value")?.to_vec(),
            });
        }
        Ok(match tag {
            b'S' => RawValue::LongString(c.long_str("long string")?.to_vec()),
            b'x' => RawValue::Bytes(c.long_str("byte array")?.to_vec()),
            b'V' => RawValue::Void,
            b'A' | b'F' if depth >= MAX_DEPTH => {
                return Err(CodecError::TooLong {
                    what: "nesting of tables and arrays",
                    len: depth,
                });
            }
            b'A' => {
                let body = c.long_str("field array")?;
                let mut inner = Cursor::new(body);
                let mut items = Vec::new();
                while !inner.is_empty() {
                    items.push(RawValue::decode(&mut inner, depth + 1)?);
                }
                RawValue::Array(items)
            }
            b'F' => RawValue::Table(decode_table_at(c.long_str("field table")?, depth + 1)?),
            other => return Err(CodecError::UnknownFieldType(other)),
        })
    }
}

fn decode_table_at(body: &[u8], depth: usize) -> Result<Vec<(Vec<u8>, RawValue)>, CodecError> {
    let mut c = Cursor::new(body);
    let mut table = Vec::new();
    while !c.is_empty() {
        let key = c.short_str("header name")?.to_vec();
        let value = RawValue::decode(&mut c, depth)?;
        table.push((key, value));
    }
    Ok(table)
}

/// The property names, in flag order (bit 15 first).
const NAMES: [&str; 14] = [
    "content-type",
    "content-encoding",
    "headers",
    "delivery-mode",
    "priority",
    "correlation-id",
    "reply-to",
    "expiration",
    "message-id",
    "timestamp",
    "type",
    "user-id",
    "app-id",
    "cluster-id",
];

impl RawProperties {
    /// Decodes the properties part of a content header (flags first).
    /// Lenient: short strings may hold any bytes, and bytes after the last
    /// property are ignored. Fails only when a length runs past the end.
    pub fn decode(bytes: &[u8]) -> Result<RawProperties, CodecError> {
        let mut c = Cursor::new(bytes);
        // Bits 1 and 0 (0 is the spec's continuation flag) are ignored, as
        // RabbitMQ and lapin ignore them: basic has 14 properties, and
        // neither reads a second flag word. Reading one would take the
        // first property's bytes for flags.
        let flags = c.u16("property flags")?;
        let has = |i: usize| flags & (1 << (15 - i)) != 0;
        let mut p = RawProperties::default();
        let short = |c: &mut Cursor<'_>, i: usize| -> Result<Option<Vec<u8>>, CodecError> {
            if has(i) {
                Ok(Some(c.short_str(NAMES[i])?.to_vec()))
            } else {
                Ok(None)
            }
        };
        p.content_type = short(&mut c, 0)?;
        p.content_encoding = short(&mut c, 1)?;
        if has(2) {
            p.headers = Some(c.long_str("headers")?.to_vec());
        }
        if has(3) {
            p.delivery_mode = Some(c.u8("delivery-mode")?);
        }
        if has(4) {
            p.priority = Some(c.u8("priority")?);
        }
        p.correlation_id = short(&mut c, 5)?;
        p.reply_to = short(&mut c, 6)?;
        p.expiration = short(&mut c, 7)?;
        p.message_id = short(&mut c, 8)?;
        if has(9) {
            p.timestamp = Some(c.u64("timestamp")?);
        }
        p.kind = short(&mut c, 10)?;
        p.user_id = short(&mut c, 11)?;
        p.app_id = short(&mut c, 12)?;
        p.cluster_id = short(&mut c, 13)?;
        Ok(p)
    }

    /// Encodes the properties (flags first).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let present = [
            self.content_type.is_some(),
            self.content_encoding.is_some(),
            self.headers.is_some(),
            self.delivery_mode.is_some(),
            self.priority.is_some(),
            self.correlation_id.is_some(),
            self.reply_to.is_some(),
            self.expiration.is_some(),
            self.message_id.is_some(),
            self.timestamp.is_some(),
            self.kind.is_some(),
            self.user_id.is_some(),
            self.app_id.is_some(),
            self.cluster_id.is_some(),
        ];
        let flags = present
            .iter()
            .enumerate()
            .filter(|(_, p)| **p)
            .fold(0u16, |f, (i, _)| f | (1 << (15 - i)));
        let mut out = flags.to_be_bytes().to_vec();
        let short = |out: &mut Vec<u8>, i: usize, v: &Option<Vec<u8>>| match v {
            Some(v) => put_short_str(out, NAMES[i], v),
            None => Ok(()),
        };
        short(&mut out, 0, &self.content_type)?;
        short(&mut out, 1, &self.content_encoding)?;
        if let Some(h) = &self.headers {
            put_long_str(&mut out, "headers", h)?;
        }
        if let Some(v) = self.delivery_mode {
            out.push(v);
        }
        if let Some(v) = self.priority {
            out.push(v);
        }
        short(&mut out, 5, &self.correlation_id)?;
        short(&mut out, 6, &self.reply_to)?;
        short(&mut out, 7, &self.expiration)?;
        short(&mut out, 8, &self.message_id)?;
        if let Some(v) = self.timestamp {
            out.extend_from_slice(&v.to_be_bytes());
        }
        short(&mut out, 10, &self.kind)?;
        short(&mut out, 11, &self.user_id)?;
        short(&mut out, 12, &self.app_id)?;
        short(&mut out, 13, &self.cluster_id)?;
        Ok(out)
    }

    /// Every short-string property with its name.
    pub(crate) fn short_strings(&self) -> [(&'static str, Option<&[u8]>); 10] {
        [
            (NAMES[0], self.content_type.as_deref()),
            (NAMES[1], self.content_encoding.as_deref()),
            (NAMES[5], self.correlation_id.as_deref()),
            (NAMES[6], self.reply_to.as_deref()),
            (NAMES[7], self.expiration.as_deref()),
            (NAMES[8], self.message_id.as_deref()),
            (NAMES[10], self.kind.as_deref()),
            (NAMES[11], self.user_id.as_deref()),
            (NAMES[12], self.app_id.as_deref()),
            (NAMES[13], self.cluster_id.as_deref()),
        ]
    }
}

/// Whether lapin can parse a content header with these properties: `None`
/// when it can, else its parser's error. This is lapin's own parser
/// (amq-protocol's `parse_properties`, as lapin runs it: all bytes consumed).
pub(crate) fn lapin_rejects(properties: &[u8]) -> Option<String> {
    match lapin::protocol::basic::parse_properties(properties) {
        Ok(([], _)) => None,
        Ok((rest, _)) => Some(format!("{} bytes after the properties", rest.len())),
        Err(e) => Some(format!("{e:?}")),
    }
}

/// Whether lapin can parse a short string (delivery exchange, routing key).
pub(crate) fn is_short_string_ok(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
}

/// A short string lapin cannot parse: where it is and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BadField {
    /// The property (`message-id`) or the path of a header key
    /// (`headers["outer"]["\xff"]`).
    pub field: String,
    /// The header that keeps the original bytes on the copy.
    pub keep_as: String,
    /// The original bytes.
    pub bytes: Vec<u8>,
}

impl BadField {
    /// `message-id = ff fe 6f ...` for logs and `x-idemq-detail`.
    pub fn describe(&self) -> String {
        format!("{} = {} (hex)", self.field, hex(&self.bytes))
    }
}

/// Lower-case hex, no separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A readable, injective text form of bytes that may not be UTF-8: valid
/// UTF-8 as is, `\` as `\\`, every other byte as `\xNN`.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch == '\\' {
                s.push_str("\\\\");
            } else {
                s.push(ch);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s
}

/// A short string lapin can parse in place of `bytes`: `bytes` itself when
/// it is UTF-8, else its [`escape`]d form cut to 255 bytes.
pub(crate) fn sanitize_short(bytes: &[u8]) -> Vec<u8> {
    if std::str::from_utf8(bytes).is_ok() && bytes.len() <= MAX_SHORT {
        return bytes.to_vec();
    }
    truncate(escape(bytes), MAX_SHORT).into_bytes()
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// What is wrong with a message's properties, for lapin.
#[derive(Clone, Debug, Default)]
pub(crate) struct Analysis {
    /// The short strings that are not UTF-8.
    pub bad: Vec<BadField>,
    /// The headers table, walked (`None`: absent or not walkable).
    pub table: Option<Vec<(Vec<u8>, RawValue)>>,
    /// Why the headers table could not be walked.
    pub table_error: Option<CodecError>,
}

/// Finds every short string of `props` that is not UTF-8: the short-string
/// properties and the header keys at any depth (lapin reads no other
/// short strings in a table: `s` is a 16-bit integer to it and RabbitMQ).
pub(crate) fn analyse(props: &RawProperties) -> Analysis {
    let mut a = Analysis::default();
    for (name, value) in props.short_strings() {
        if let Some(v) = value
            && !is_short_string_ok(v)
        {
            a.bad.push(BadField {
                field: name.to_owned(),
                keep_as: format!("x-idemq-malformed-{name}"),
                bytes: v.to_vec(),
            });
        }
    }
    if let Some(h) = &props.headers {
        match RawValue::decode_table(h) {
            Ok(table) => {
                let mut keys = 0;
                walk_table(&table, "headers", &mut keys, &mut a.bad);
                a.table = Some(table);
            }
            Err(e) => a.table_error = Some(e),
        }
    }
    a
}

fn walk_table(
    table: &[(Vec<u8>, RawValue)],
    path: &str,
    keys: &mut usize,
    bad: &mut Vec<BadField>,
) {
    for (key, value) in table {
        let here = format!("{path}[\"{}\"]", escape(key));
        if !is_short_string_ok(key) {
            *keys += 1;
            bad.push(BadField {
                field: format!("header key {here}"),
                keep_as: format!("x-idemq-malformed-header-key-{keys}"),
                bytes: key.clone(),
            });
        }
        walk_value(value, &here, keys, bad);
    }
}

fn walk_value(value: &RawValue, path: &str, keys: &mut usize, bad: &mut Vec<BadField>) {
    match value {
        RawValue::Table(t) => walk_table(t, path, keys, bad),
        RawValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk_value(item, &format!("{path}[{i}]"), keys, bad);
            }
        }
        _ => {}
    }
}

/// The table with every key lapin cannot parse replaced by its sanitized
/// form, at any depth.
pub(crate) fn sanitize_table(table: &[(Vec<u8>, RawValue)]) -> Vec<(Vec<u8>, RawValue)> {
    table
        .iter()
        .map(|(k, v)| (sanitize_short(k), sanitize_value(v)))
        .collect()
}

fn sanitize_value(value: &RawValue) -> RawValue {
    match value {
        RawValue::Table(t) => RawValue::Table(sanitize_table(t)),
        RawValue::Array(items) => RawValue::Array(items.iter().map(sanitize_value).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_table() -> Vec<(Vec<u8>, RawValue)> {
        vec![
            (b"s".to_vec(), RawValue::text("text")),
            (b"i".to_vec(), RawValue::long_long(-7)),
            (
                b"short".to_vec(),
                RawValue::Scalar {
                    tag: b's',
                    bytes: vec![0xff, 0xfe],
                },
            ),
            (
                b"dec".to_vec(),
                RawValue::Scalar {
                    tag: b'D',
                    bytes: vec![2, 0, 0, 0, 5],
                },
            ),
            (b"bin".to_vec(), RawValue::Bytes(vec![0, 0xff])),
            (b"void".to_vec(), RawValue::Void),
            (
                b"x-death".to_vec(),
                RawValue::Array(vec![RawValue::Table(vec![
                    (b"count".to_vec(), RawValue::long_long(2)),
                    (b"queue".to_vec(), RawValue::text("q")),
                ])]),
            ),
        ]
    }

    fn sample_props() -> RawProperties {
        RawProperties {
            content_type: Some(b"application/json".to_vec()),
            content_encoding: Some(b"gzip".to_vec()),
            headers: Some(RawValue::encode_table(&sample_table()).expect("table")),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some(b"c".to_vec()),
            reply_to: Some(b"r".to_vec()),
            expiration: Some(b"60000".to_vec()),
            message_id: Some(b"m-1".to_vec()),
            timestamp: Some(1_700_000_000),
            kind: Some(b"t".to_vec()),
            user_id: Some(b"guest".to_vec()),
            app_id: Some(b"a".to_vec()),
            cluster_id: Some(b"cl".to_vec()),
        }
    }

    #[test]
    fn properties_round_trip_and_agree_with_lapin() {
        for props in [RawProperties::default(), sample_props()] {
            let bytes = props.encode().expect("encode");
            assert_eq!(RawProperties::decode(&bytes).expect("decode"), props);
            assert_eq!(lapin_rejects(&bytes), None);
            let (_, parsed) =
                lapin::protocol::basic::parse_properties(&bytes[..]).expect("lapin parses");
            assert_eq!(
                parsed.message_id().as_ref().map(|s| s.as_str().to_owned()),
                props
                    .message_id
                    .as_ref()
                    .map(|m| String::from_utf8_lossy(m).into_owned())
            );
        }
    }

    #[test]
    fn tables_round_trip() {
        let table = sample_table();
        let bytes = RawValue::encode_table(&table).expect("encode");
        assert_eq!(RawValue::decode_table(&bytes).expect("decode"), table);
    }

    #[test]
    fn truncated_properties_and_tables_are_errors() {
        let bytes = sample_props().encode().expect("encode");
        for cut in 0..bytes.len() {
            // Every cut loses at least the cluster id's bytes.
            assert!(RawProperties::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let table = RawValue::encode_table(&sample_table()).expect("encode");
        let entries = sample_table();
        for cut in 1..table.len() {
            // A cut between entries is a shorter table; any other, an error.
            if let Ok(t) = RawValue::decode_table(&table[..cut]) {
                assert_eq!(t[..], entries[..t.len()], "cut {cut}");
                assert_eq!(RawValue::encode_table(&t).expect("encode").len(), cut);
            }
        }
    }

    #[test]
    fn unknown_types_and_deep_nesting_are_errors() {
        assert_eq!(
            RawValue::decode_table(&[1, b'k', b'c', 0]),
            Err(CodecError::UnknownFieldType(b'c'))
        );
        let mut v = RawValue::Void;
        for _ in 0..(MAX_DEPTH + 2) {
            v = RawValue::Array(vec![v]);
        }
        let bytes = RawValue::encode_table(&[(b"deep".to_vec(), v)]).expect("encode");
        assert!(RawValue::decode_table(&bytes).is_err());
    }

    #[test]
    fn finds_every_bad_short_string() {
        let mut props = sample_props();
        props.message_id = Some(b"\xff\xfeorder-11".to_vec());
        props.correlation_id = Some(b"\xc3(".to_vec());
        let mut table = sample_table();
        table.push((b"bad\xffkey".to_vec(), RawValue::text("v")));
        table.push((
            b"nested".to_vec(),
            RawValue::Array(vec![RawValue::Table(vec![(
                b"\xfe".to_vec(),
                RawValue::Void,
            )])]),
        ));
        props.headers = Some(RawValue::encode_table(&table).expect("table"));
        let bytes = props.encode().expect("encode");
        assert!(lapin_rejects(&bytes).is_some());

        let a = analyse(&RawProperties::decode(&bytes).expect("lenient decode"));
        let found: Vec<(&str, &[u8])> = a
            .bad
            .iter()
            .map(|b| (b.field.as_str(), b.bytes.as_slice()))
            .collect();
        assert_eq!(
            found,
            [
                ("correlation-id", &b"\xc3("[..]),
                ("message-id", &b"\xff\xfeorder-11"[..]),
                ("header key headers[\"bad\\xffkey\"]", &b"bad\xffkey"[..]),
                ("header key headers[\"nested\"][0][\"\\xfe\"]", &b"\xfe"[..]),
            ]
        );
        assert_eq!(a.bad[1].keep_as, "x-idemq-malformed-message-id");
        assert_eq!(a.bad[3].keep_as, "x-idemq-malformed-header-key-2");
        assert_eq!(
            a.bad[1].describe(),
            "message-id = fffe6f726465722d3131 (hex)"
        );

        // Sanitized, lapin parses it.
        let mut fixed = props.clone();
        fixed.message_id = fixed.message_id.as_deref().map(sanitize_short);
        fixed.correlation_id = fixed.correlation_id.as_deref().map(sanitize_short);
        fixed.headers =
            Some(RawValue::encode_table(&sanitize_table(&a.table.expect("walked"))).expect("t"));
        assert_eq!(lapin_rejects(&fixed.encode().expect("encode")), None);
        assert_eq!(
            fixed.message_id.as_deref(),
            Some(&b"\\xff\\xfeorder-11"[..])
        );
    }

    #[test]
    fn lapin_rejects_what_it_cannot_parse() {
        let mut props = sample_props();
        props.app_id = Some(vec![0x80]);
        assert!(lapin_rejects(&props.encode().expect("encode")).is_some());
        // Trailing bytes, truncation, an unknown table type.
        let mut bytes = sample_props().encode().expect("encode");
        bytes.push(0);
        assert!(lapin_rejects(&bytes).is_some());
        assert!(lapin_rejects(&bytes[..3]).is_some());
        let odd = RawProperties {
            headers: Some(vec![1, b'k', b'c', 0]),
            ..RawProperties::default()
        };
        let bytes = odd.encode().expect("encode");
        assert!(lapin_rejects(&bytes).is_some());
        let a = analyse(&RawProperties::decode(&bytes).expect("lenient"));
        assert!(a.bad.is_empty() && a.table.is_none() && a.table_error.is_some());
    }

    #[test]
    fn escaping_is_readable_injective_and_bounded() {
        assert_eq!(escape(b"plain"), "plain");
        assert_eq!(escape(b"a\\b"), "a\\\\b");
        assert_eq!(escape(b"\xff\\xff"), "\\xff\\\\xff");
        assert_ne!(escape(b"\xff"), escape(b"\\xff"));
        assert_eq!(escape("é\u{1F600}".as_bytes()), "é\u{1F600}");
        let long = sanitize_short(&[0xff; 255]);
        assert!(long.len() <= MAX_SHORT && std::str::from_utf8(&long).is_ok());
        let cut = truncate("ééé".to_owned(), 5);
        assert_eq!(cut, "éé");
        assert_eq!(sanitize_short(b"ok"), b"ok");
    }

    #[test]
    fn flag_bits_0_and_1_are_ignored_as_rabbitmq_and_lapin_do() {
        // Found by fuzzing (fuzz/, target raw_properties): correlation-id
        // and expiration, both empty, with the continuation bit set. lapin
        // reads them; reading a continuation word made this `Truncated`.
        let bytes = [0x05, 0x01, 0x00, 0x00];
        assert_eq!(lapin_rejects(&bytes), None);
        let p = RawProperties::decode(&bytes).expect("decode");
        assert_eq!(p.correlation_id.as_deref(), Some(&b""[..]));
        assert_eq!(p.expiration.as_deref(), Some(&b""[..]));
        // The continuation bit and a message id: the id follows the one
        // flag word, as RabbitMQ and lapin read it.
        let mut bytes = vec![0x00, 0x83];
        put_short_str(&mut bytes, "m", b"\xffid").expect("short");
        let p = RawProperties::decode(&bytes).expect("decode");
        assert_eq!(p.message_id.as_deref(), Some(&b"\xffid"[..]));
    }
}
