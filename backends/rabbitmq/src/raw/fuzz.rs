//! Entry points for the fuzz targets in `fuzz/` (feature `testing`): the
//! raw client's parsers take bytes from the network, and the quarantine
//! turns whatever they read into a copy lapin must be able to parse.
//! Each function returns `Err` with the broken invariant; a panic inside
//! is a bug of its own. Not an API.

use idemq::replay::{DeadLetterInfo, Origin};
use idemq::{Delivery, headers as names};

use super::client::GotMessage;
use super::codec::{
    ContentHeader, FRAME_HEADER, FRAME_METHOD, FRAME_OVERHEAD, Method, decode_frame, encode_frame,
};
use super::props::{RawProperties, RawValue, lapin_rejects};
use super::quarantine::{REASON, dead_letter_copy, inspect};

/// Reads `data` as the raw client reads its socket buffer (frames of at
/// most `max` bytes), decodes every method and content header, and checks
/// that each re-encodes to what decodes the same.
pub fn frames(data: &[u8], max: usize) -> Result<(), String> {
    let mut buf = data;
    loop {
        let (frame, used) = match decode_frame(buf, max) {
            Ok(Some(f)) => f,
            Ok(None) => {
                if buf.len() >= max.max(7) {
                    return Err(format!("{} bytes but no frame of at most {max}", buf.len()));
                }
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        if used > max || used > buf.len() || used != frame.payload.len() + FRAME_OVERHEAD {
            return Err(format!(
                "frame took {used} of {} bytes, max {max}",
                buf.len()
            ));
        }
        let mut again = Vec::new();
        encode_frame(frame.kind, frame.channel, &frame.payload, &mut again)
            .map_err(|e| format!("re-encoding a frame: {e}"))?;
        if again != buf[..used] {
            return Err("a frame re-encodes to other bytes".into());
        }
        match frame.kind {
            FRAME_METHOD => {
                if let Ok(m) = Method::decode(&frame.payload) {
                    let _ = m.name();
                    let bytes = m.encode().map_err(|e| format!("encoding {m:?}: {e}"))?;
                    let back = Method::decode(&bytes).map_err(|e| format!("{m:?}: {e}"))?;
                    if back != m {
                        return Err(format!("{m:?} decodes back as {back:?}"));
                    }
                }
            }
            FRAME_HEADER => {
                if let Ok(h) = ContentHeader::decode(&frame.payload) {
                    let back = ContentHeader::decode(&h.encode())
                        .map_err(|e| format!("content header: {e}"))?;
                    if back != h {
                        return Err(format!("{h:?} decodes back as {back:?}"));
                    }
                    properties(&h.properties)?;
                }
            }
            _ => {}
        }
        buf = &buf[used..];
    }
}

/// Reads content-header properties leniently, as the quarantine does, and
/// checks them against lapin's parser and against re-encoding.
pub fn properties(bytes: &[u8]) -> Result<(), String> {
    let lapin = match lapin::protocol::basic::parse_properties(bytes) {
        Ok(([], p)) => Some(p),
        _ => None,
    };
    let raw = match RawProperties::decode(bytes) {
        Ok(p) => p,
        Err(e) if lapin.is_some() => {
            return Err(format!(
                "lapin parses properties the raw parser refuses: {e}"
            ));
        }
        Err(_) => return Ok(()),
    };
    let encoded = raw
        .encode()
        .map_err(|e| format!("re-encoding {raw:?}: {e}"))?;
    let back = RawProperties::decode(&encoded).map_err(|e| format!("{raw:?}: {e}"))?;
    if back != raw {
        return Err(format!("{raw:?} decodes back as {back:?}"));
    }
    if let Some(lp) = &lapin {
        let id = lp.message_id().as_ref().map(|s| s.as_str().as_bytes());
        if id != raw.message_id.as_deref() {
            return Err(format!(
                "message id: lapin {id:?}, raw {:?}",
                raw.message_id
            ));
        }
    }
    if let Some(h) = &raw.headers {
        table(h)?;
    }
    Ok(())
}

/// Decodes a field-table body leniently and checks it re-encodes to the
/// same bytes.
pub fn table(body: &[u8]) -> Result<(), String> {
    if let Ok(t) = RawValue::decode_table(body) {
        let again = RawValue::encode_table(&t).map_err(|e| format!("re-encoding a table: {e}"))?;
        if again != body {
            return Err("a table re-encodes to other bytes".into());
        }
    }
    Ok(())
}

/// Runs the quarantine's verdict on a message got with these properties,
/// exchange and routing key; for one lapin cannot read, checks that the
/// dead-letter copy is one lapin reads, fits in a frame of `frame_max`
/// bytes, and reads as an idemq dead letter of reason `malformed`.
pub fn quarantine_copy(
    properties: &[u8],
    exchange: &[u8],
    routing_key: &[u8],
    frame_max: usize,
) -> Result<(), String> {
    let msg = GotMessage {
        delivery_tag: 1,
        redelivered: false,
        exchange: exchange.to_vec(),
        routing_key: routing_key.to_vec(),
        message_count: 0,
        properties: properties.to_vec(),
        body: b"body".to_vec(),
    };
    let lapin_reads = lapin_rejects(properties).is_none()
        && std::str::from_utf8(exchange).is_ok()
        && std::str::from_utf8(routing_key).is_ok();
    let Some(verdict) = inspect(&msg) else {
        return if lapin_reads {
            Ok(())
        } else {
            Err("a message lapin cannot read passed the inspection".into())
        };
    };
    if lapin_reads {
        return Err(format!(
            "a message lapin reads was judged malformed: {}",
            verdict.detail
        ));
    }
    let copy = dead_letter_copy(&msg, &verdict, "q", frame_max);
    let bytes = copy
        .encode()
        .map_err(|e| format!("encoding the copy: {e}"))?;
    let header = ContentHeader {
        class_id: 60,
        body_size: 4,
        properties: bytes.clone(),
    }
    .encode();
    if header.len() + FRAME_OVERHEAD > frame_max {
        return Err(format!(
            "the copy's content header is {} bytes, more than a frame of {frame_max}",
            header.len() + FRAME_OVERHEAD
        ));
    }
    let parsed = match lapin::protocol::basic::parse_properties(&bytes[..]) {
        Ok(([], p)) => p,
        other => return Err(format!("lapin cannot read the copy: {other:?}")),
    };
    let mut letter = Delivery::new(1, "body");
    if let Some(t) = parsed.headers() {
        letter.headers = crate::headers::from_field_table(t);
        letter.broker_death = crate::headers::broker_death(t);
    }
    let info = DeadLetterInfo::of(&letter);
    if info.origin != Origin::Idemq || info.reason != REASON {
        return Err(format!("the copy reads as {info:?}"));
    }
    if letter
        .header(names::ORIGINAL_QUEUE)
        .and_then(|v| v.as_str())
        != Some("q")
    {
        return Err("the copy lost its original queue".into());
    }
    Ok(())
}
