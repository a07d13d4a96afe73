//! Moving messages lapin cannot parse out of a queue.
//!
//! lapin treats a short string that is not UTF-8 (a `message_id` of
//! `b"\xff\xfe..."`, a header name...) as a protocol error: its I/O loop
//! logs `parse error` and fails the whole connection, and the message goes
//! back to the queue, in front of everything else. [`quarantine`] takes the
//! head of the queue with a client that keeps short strings as bytes,
//! publishes a copy lapin can parse of each such message to the
//! dead-letter queue (reason `malformed`, body intact, the original bytes of
//! every bad field kept in byte-array headers), acks the original once the
//! copy is confirmed, and puts every other message back.

use std::time::Duration;

use idemq::message::{headers as names, unix_millis_now};
use lapin::uri::AMQPUri;
use tracing::{error, warn};

use super::client::{GotMessage, RawClient, RawError};
use super::codec::FRAME_OVERHEAD;
use super::props::{
    Analysis, BadField, RawProperties, RawValue, analyse, escape, hex, is_short_string_ok,
    lapin_rejects, sanitize_short, sanitize_table, truncate,
};

/// The reason code of a quarantined message.
pub(crate) const REASON: &str = "malformed";
/// The header that keeps the original properties when even the lenient
/// parser cannot read them.
const RAW_PROPERTIES: &str = "x-idemq-malformed-properties";
/// The header that keeps the original headers table when it cannot be walked.
const RAW_HEADERS: &str = "x-idemq-malformed-headers";
/// The quorum queue's delivery count belongs to the original.
const DELIVERY_COUNT: &str = "x-delivery-count";
/// The longest `x-idemq-detail`.
const MAX_DETAIL: usize = 4096;

/// Where to look and what to do.
#[derive(Clone, Debug)]
pub(crate) struct Quarantine<'a> {
    pub uri: &'a AMQPUri,
    pub queue: &'a str,
    pub dead_letter_queue: &'a str,
    /// How many messages to take from the head of the queue at most.
    pub max: usize,
    /// The bound of every read and write.
    pub io_timeout: Duration,
    pub connection_name: String,
}

/// One message moved to the dead-letter queue.
#[derive(Clone, Debug)]
pub(crate) struct Moved {
    /// Its position in the queue when it was taken (1: the head).
    pub position: usize,
    pub redelivered: bool,
    /// Its `message_id`, escaped (`\xff\xfeorder-11`).
    pub message_id: Option<String>,
    /// Each bad field and its bytes in hex.
    pub detail: String,
    pub body_len: usize,
}

/// What a quarantine did.
#[derive(Clone, Debug, Default)]
pub(crate) struct Report {
    /// Messages taken from the head of the queue.
    pub scanned: usize,
    /// Those moved to the dead-letter queue.
    pub moved: Vec<Moved>,
    /// Those put back.
    pub requeued: usize,
    /// True when the scan reached the end of the queue.
    pub reached_end: bool,
}

/// Takes up to `q.max` messages from the head of `q.queue`; moves those
/// lapin cannot parse to `q.dead_letter_queue`, puts the others back in
/// their order (ascending delivery tags). Logs every move at ERROR.
pub(crate) async fn quarantine(q: &Quarantine<'_>) -> Result<Report, RawError> {
    let mut client = RawClient::connect(q.uri, &q.connection_name, q.io_timeout).await?;
    let mut report = Report::default();
    let mut held = Vec::new();
    let scanned = scan(&mut client, q, &mut report, &mut held).await;
    // Back in order, also after a failure (closing would do it too, but in
    // no order the broker promises).
    held.sort_unstable();
    let mut put_back = Ok(());
    for tag in &held {
        if let Err(e) = client.nack(*tag, true).await {
            put_back = Err(e);
            break;
        }
        report.requeued += 1;
    }
    let closed = client.close().await;
    scanned?;
    put_back?;
    // The close confirms the server processed the acks and nacks.
    closed?;
    Ok(report)
}

async fn scan(
    client: &mut RawClient,
    q: &Quarantine<'_>,
    report: &mut Report,
    held: &mut Vec<u64>,
) -> Result<(), RawError> {
    for position in 1..=q.max {
        let Some(msg) = client.basic_get(q.queue.as_bytes()).await? else {
            report.reached_end = true;
            return Ok(());
        };
        report.scanned = position;
        let Some(verdict) = inspect(&msg) else {
            held.push(msg.delivery_tag);
            continue;
        };
        let copy = dead_letter_copy(&msg, &verdict, q.queue, client.frame_max());
        if let Err(e) = client
            .publish_confirmed(b"", q.dead_letter_queue.as_bytes(), &copy, &msg.body)
            .await
        {
            held.push(msg.delivery_tag);
            return Err(e);
        }
        client.ack(msg.delivery_tag).await?;
        let moved = Moved {
            position,
            redelivered: msg.redelivered,
            message_id: verdict
                .properties
                .as_ref()
                .and_then(|p| p.message_id.as_deref())
                .map(escape),
            detail: verdict.detail.clone(),
            body_len: msg.body.len(),
        };
        error!(
            queue = q.queue,
            position = moved.position,
            redelivered = moved.redelivered,
            message_id = moved.message_id.as_deref().unwrap_or("<none>"),
            bad_fields = %moved.detail,
            body_bytes = moved.body_len,
            dead_letter_queue = q.dead_letter_queue,
            "a message whose AMQP properties lapin cannot parse blocked queue `{}` (each \
             connection that received it failed with a parse error): moved it to `{}` \
             with reason `{REASON}`, body intact, each bad field replaced by an escaped \
             copy and its original bytes kept in an `x-idemq-malformed-*` header",
            q.queue,
            q.dead_letter_queue,
        );
        report.moved.push(moved);
        if msg.message_count == 0 {
            report.reached_end = true;
            return Ok(());
        }
    }
    Ok(())
}

/// Why a message is malformed.
#[derive(Clone, Debug)]
pub(crate) struct Verdict {
    /// The lenient reading of its properties (`None`: not even that).
    pub properties: Option<RawProperties>,
    pub analysis: Analysis,
    /// Bad fields, the delivery's routing key and exchange included.
    pub bad: Vec<BadField>,
    /// Each bad field with its bytes in hex, or lapin's parser's error.
    pub detail: String,
}

/// `None` when lapin can parse the message (its properties, and the
/// exchange and routing key of its delivery); else what is wrong.
pub(crate) fn inspect(msg: &GotMessage) -> Option<Verdict> {
    let lapin_error = lapin_rejects(&msg.properties);
    let mut bad = Vec::new();
    for (field, value) in [
        ("exchange", &msg.exchange),
        ("routing-key", &msg.routing_key),
    ] {
        if !is_short_string_ok(value) {
            bad.push(BadField {
                field: field.to_owned(),
                keep_as: format!("x-idemq-malformed-{field}"),
                bytes: value.clone(),
            });
        }
    }
    if lapin_error.is_none() && bad.is_empty() {
        return None;
    }
    let properties = RawProperties::decode(&msg.properties).ok();
    let analysis = properties.as_ref().map(analyse).unwrap_or_default();
    bad.extend(analysis.bad.iter().cloned());
    let mut parts: Vec<String> = bad.iter().map(BadField::describe).collect();
    if let Some(e) = &analysis.table_error {
        parts.push(format!("headers table unreadable ({e})"));
    }
    if properties.is_none() {
        parts.push(format!(
            "properties unreadable: {} (hex)",
            hex(&msg.properties)
        ));
    }
    if parts.is_empty()
        && let Some(e) = lapin_error
    {
        parts.push(format!("lapin's parser: {e}"));
    }
    let detail = truncate(
        format!("not parseable by lapin: {}", parts.join("; ")),
        MAX_DETAIL,
    );
    Some(Verdict {
        properties,
        analysis,
        bad,
        detail,
    })
}

/// The copy published to the dead-letter queue: every property lapin can
/// parse, bad short strings escaped, persistent, without `expiration` and
/// `user-id` (the broker would check them against this connection), with
/// idemq's dead-letter headers and the original bytes of every bad field.
pub(crate) fn dead_letter_copy(
    msg: &GotMessage,
    verdict: &Verdict,
    original_queue: &str,
    frame_max: usize,
) -> RawProperties {
    let now = unix_millis_now();
    let mut table: Vec<(Vec<u8>, RawValue)> = Vec::new();
    let mut copy = RawProperties {
        delivery_mode: Some(2),
        ..RawProperties::default()
    };
    if let Some(p) = &verdict.properties {
        let s = |v: &Option<Vec<u8>>| v.as_deref().map(sanitize_short);
        copy.content_type = s(&p.content_type);
        copy.content_encoding = s(&p.content_encoding);
        copy.priority = p.priority;
        copy.correlation_id = s(&p.correlation_id);
        copy.reply_to = s(&p.reply_to);
        copy.message_id = s(&p.message_id);
        copy.timestamp = p.timestamp;
        copy.kind = s(&p.kind);
        copy.app_id = s(&p.app_id);
        copy.cluster_id = s(&p.cluster_id);
        match (&verdict.analysis.table, &p.headers) {
            (Some(original), _) => table = sanitize_table(original),
            (None, Some(raw)) => table.push((RAW_HEADERS.into(), RawValue::Bytes(raw.clone()))),
            (None, None) => {}
        }
    } else {
        table.push((
            RAW_PROPERTIES.into(),
            RawValue::Bytes(msg.properties.clone()),
        ));
    }
    let first_failure = table
        .iter()
        .find(|(k, _)| k.as_slice() == names::FIRST_FAILURE_MS.as_bytes())
        .map(|(_, v)| v.clone());
    let ours = |k: &[u8]| {
        k == DELIVERY_COUNT.as_bytes()
            || k == names::SCOPE.as_bytes()
            || k == names::KEY.as_bytes()
            || names::ALL.iter().any(|n| k == n.as_bytes())
    };
    table.retain(|(k, _)| !ours(k));
    let kept: Vec<(Vec<u8>, RawValue)> = verdict
        .bad
        .iter()
        .map(|b| {
            (
                b.keep_as.clone().into_bytes(),
                RawValue::Bytes(b.bytes.clone()),
            )
        })
        .collect();
    table.retain(|(k, _)| !kept.iter().any(|(n, _)| n == k));
    let failure_table = |detail: &str, first_failure: RawValue| -> Vec<(Vec<u8>, RawValue)> {
        [
            (names::REASON, RawValue::text(REASON)),
            (names::DETAIL, RawValue::text(detail)),
            (names::ATTEMPTS, RawValue::long_long(0)),
            (names::ORIGINAL_QUEUE, RawValue::text(original_queue)),
            (names::FIRST_FAILURE_MS, first_failure),
            (names::DEAD_AT_MS, RawValue::long_long(now)),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v))
        .collect()
    };
    let failure = failure_table(
        &verdict.detail,
        first_failure
            .clone()
            .unwrap_or_else(|| RawValue::long_long(now)),
    );

    let mut full = table;
    full.extend(kept.iter().cloned());
    full.extend(failure.iter().cloned());
    copy.headers = RawValue::encode_table(&full).ok();
    if fits(&copy, frame_max) {
        return copy;
    }
    // Too large for one frame with the original headers (or, impossibly,
    // not parseable): idemq's headers and the bad fields' bytes only.
    copy.headers = RawValue::encode_table(&[kept, failure].concat()).ok();
    if fits(&copy, frame_max) {
        return copy;
    }
    // Still too large: idemq's headers alone, the first-failure time kept
    // only when it is a plain value (the original's could be as large as
    // its frame), and the detail (up to MAX_DETAIL bytes) cut to what the
    // frame has room for. Frames are at least 4096 bytes: the rest fits.
    let first_failure = first_failure
        .filter(|v| matches!(v, RawValue::Scalar { .. }))
        .unwrap_or_else(|| RawValue::long_long(now));
    let bare = |detail: &str| RawProperties {
        delivery_mode: Some(2),
        headers: RawValue::encode_table(&failure_table(detail, first_failure.clone())).ok(),
        ..RawProperties::default()
    };
    let copy = bare(&verdict.detail);
    if fits(&copy, frame_max) {
        return copy;
    }
    let room = frame_max.saturating_sub(header_size(&bare("")).unwrap_or(frame_max));
    bare(&truncate(verdict.detail.clone(), room))
}

/// The size of a content-header frame with these properties.
fn header_size(p: &RawProperties) -> Option<usize> {
    p.encode()
        .ok()
        .map(|bytes| bytes.len() + 12 + FRAME_OVERHEAD)
}

/// Whether lapin parses `p` and its content header fits in one frame.
fn fits(p: &RawProperties, frame_max: usize) -> bool {
    match p.encode() {
        Ok(bytes) => {
            lapin_rejects(&bytes).is_none() && bytes.len() + 12 + FRAME_OVERHEAD <= frame_max
        }
        Err(_) => false,
    }
}

/// What [`quarantine`] found, in one line for a warning.
pub(crate) fn summary(report: &Report) -> String {
    format!(
        "took {} message(s) from the head, moved {}, put back {}{}",
        report.scanned,
        report.moved.len(),
        report.requeued,
        if report.reached_end {
            " (reached the end of the queue)"
        } else {
            ""
        }
    )
}

/// Logs that nothing was found (at WARN): the parse error came from
/// something the quarantine does not see.
pub(crate) fn warn_nothing_found(queue: &str, report: &Report) {
    warn!(
        queue,
        "lapin failed to parse a frame from RabbitMQ, but none of the first {} message(s) \
         of `{queue}` has properties it cannot parse ({}); the message may sit further \
         back in the queue (a quorum queue of RabbitMQ 3.x requeues at the tail), or be \
         in another queue this connection read",
        report.scanned,
        summary(report)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(props: &RawProperties) -> GotMessage {
        GotMessage {
            delivery_tag: 1,
            redelivered: false,
            exchange: vec![],
            routing_key: b"q".to_vec(),
            message_count: 0,
            properties: props.encode().expect("encode"),
            body: b"body".to_vec(),
        }
    }

    fn header(p: &RawProperties, name: &str) -> Option<RawValue> {
        let table = RawValue::decode_table(p.headers.as_deref()?).ok()?;
        table
            .into_iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v)
    }

    #[test]
    fn good_messages_pass() {
        let p = RawProperties {
            message_id: Some(b"ok".to_vec()),
            ..RawProperties::default()
        };
        assert!(inspect(&got(&p)).is_none());
    }

    #[test]
    fn a_bad_message_id_makes_a_parseable_copy() {
        let inner = RawValue::encode_table(&[
            (b"x-delivery-count".to_vec(), RawValue::long_long(3)),
            (b"tenant".to_vec(), RawValue::text("t1")),
            (b"k\xff".to_vec(), RawValue::Void),
        ])
        .expect("table");
        let p = RawProperties {
            message_id: Some(b"\xff\xfeorder-11".to_vec()),
            content_type: Some(b"application/json".to_vec()),
            expiration: Some(b"60000".to_vec()),
            user_id: Some(b"\xffuser".to_vec()),
            headers: Some(inner),
            ..RawProperties::default()
        };
        let msg = got(&p);
        let verdict = inspect(&msg).expect("malformed");
        assert!(verdict.detail.contains("message-id = fffe6f726465722d3131"));
        assert!(verdict.detail.contains("user-id = ff75736572"));
        let copy = dead_letter_copy(&msg, &verdict, "q", 131_072);
        let bytes = copy.encode().expect("encode");
        assert_eq!(lapin_rejects(&bytes), None);
        assert_eq!(copy.message_id.as_deref(), Some(&b"\\xff\\xfeorder-11"[..]));
        assert_eq!(copy.content_type.as_deref(), Some(&b"application/json"[..]));
        assert_eq!(copy.delivery_mode, Some(2));
        assert!(copy.expiration.is_none() && copy.user_id.is_none());
        assert_eq!(
            header(&copy, "x-idemq-reason"),
            Some(RawValue::text("malformed"))
        );
        assert_eq!(
            header(&copy, "x-idemq-original-queue"),
            Some(RawValue::text("q"))
        );
        assert_eq!(
            header(&copy, "x-idemq-malformed-message-id"),
            Some(RawValue::Bytes(b"\xff\xfeorder-11".to_vec()))
        );
        assert_eq!(
            header(&copy, "x-idemq-malformed-header-key-1"),
            Some(RawValue::Bytes(b"k\xff".to_vec()))
        );
        assert_eq!(header(&copy, "tenant"), Some(RawValue::text("t1")));
        assert_eq!(header(&copy, "k\\xff"), Some(RawValue::Void));
        assert_eq!(header(&copy, "x-delivery-count"), None);
        assert!(header(&copy, "x-idemq-dead-at-ms").is_some());
    }

    #[test]
    fn unreadable_properties_are_kept_as_bytes() {
        // The headers flag with a table length past the end.
        let msg = GotMessage {
            properties: vec![0x20, 0x00, 0, 0, 0, 9, 1],
            ..got(&RawProperties::default())
        };
        let verdict = inspect(&msg).expect("malformed");
        assert!(verdict.properties.is_none());
        let copy = dead_letter_copy(&msg, &verdict, "q", 131_072);
        assert_eq!(lapin_rejects(&copy.encode().expect("encode")), None);
        assert_eq!(
            header(&copy, RAW_PROPERTIES),
            Some(RawValue::Bytes(msg.properties.clone()))
        );
    }

    #[test]
    fn a_bad_routing_key_is_malformed_too() {
        let msg = GotMessage {
            routing_key: b"\xffq".to_vec(),
            ..got(&RawProperties::default())
        };
        let verdict = inspect(&msg).expect("malformed");
        assert!(verdict.detail.contains("routing-key = ff71"));
    }

    #[test]
    fn oversized_copies_fall_back_to_idemq_headers() {
        let big = RawValue::encode_table(&[(b"big".to_vec(), RawValue::Bytes(vec![7; 5000]))])
            .expect("table");
        let p = RawProperties {
            message_id: Some(vec![0xff]),
            headers: Some(big),
            ..RawProperties::default()
        };
        let msg = got(&p);
        let verdict = inspect(&msg).expect("malformed");
        let copy = dead_letter_copy(&msg, &verdict, "q", 4096);
        assert!(header(&copy, "big").is_none());
        assert_eq!(
            header(&copy, "x-idemq-reason"),
            Some(RawValue::text("malformed"))
        );
        assert!(header(&copy, "x-idemq-malformed-message-id").is_some());
    }

    /// Whether lapin reads the copy and its content header fits the frame.
    fn assert_fits(copy: &RawProperties, frame_max: usize) {
        let bytes = copy.encode().expect("encode");
        assert_eq!(lapin_rejects(&bytes), None);
        let size = bytes.len() + 12 + FRAME_OVERHEAD;
        assert!(size <= frame_max, "a content header of {size} bytes");
        assert_eq!(
            header(copy, "x-idemq-reason"),
            Some(RawValue::text("malformed"))
        );
    }

    #[test]
    fn the_last_resort_copy_fits_the_smallest_frame() {
        // Found by fuzzing (fuzz/, target raw_properties): bad short
        // strings enough for a detail of MAX_DETAIL bytes, with a frame of
        // 4096 bytes (the least AMQP allows): idemq's headers alone took
        // more, so the copy could never be published.
        let bad = Some(vec![0xff; 255]);
        let p = RawProperties {
            content_type: bad.clone(),
            content_encoding: bad.clone(),
            correlation_id: bad.clone(),
            reply_to: bad.clone(),
            message_id: bad.clone(),
            kind: bad.clone(),
            app_id: bad.clone(),
            cluster_id: bad,
            ..RawProperties::default()
        };
        let msg = got(&p);
        let verdict = inspect(&msg).expect("malformed");
        assert_eq!(verdict.detail.len(), MAX_DETAIL);
        let copy = dead_letter_copy(&msg, &verdict, "q", 4096);
        assert_fits(&copy, 4096);
        let detail = header(&copy, names::DETAIL).expect("detail");
        assert!(matches!(detail, RawValue::LongString(d) if d.starts_with(b"not parseable")));
    }

    #[test]
    fn a_huge_first_failure_header_is_not_kept_past_the_frame() {
        // A first-failure "time" of almost a frame: the last resort kept
        // it, and overflowed the frame with idemq's headers.
        let table = RawValue::encode_table(&[(
            names::FIRST_FAILURE_MS.as_bytes().to_vec(),
            RawValue::LongString(vec![b'1'; 130_800]),
        )])
        .expect("table");
        let p = RawProperties {
            message_id: Some(vec![0xff]),
            headers: Some(table),
            ..RawProperties::default()
        };
        let msg = got(&p);
        assert!(msg.properties.len() + 12 + FRAME_OVERHEAD <= 131_072);
        let verdict = inspect(&msg).expect("malformed");
        let copy = dead_letter_copy(&msg, &verdict, "q", 131_072);
        assert_fits(&copy, 131_072);
        assert!(matches!(
            header(&copy, names::FIRST_FAILURE_MS),
            Some(RawValue::Scalar { tag: b'l', .. })
        ));
    }
}
