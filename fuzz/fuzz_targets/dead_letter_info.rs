//! Dead-letter header reading (`DeadLetterInfo::of`, the delivery's header
//! counters) on arbitrary headers and broker deaths, and the round trip of
//! what the engine writes (`DeadLetter::headers_for`, `retry_headers`).

#![no_main]

#[path = "../common/mod.rs"]
mod common;

use arbitrary::Arbitrary;
use idemq::message::retry_headers;
use idemq::replay::{DeadLetterInfo, Origin};
use idemq::{BrokerDeath, DeadLetter, DeadReason, Delivery, HeaderValue, headers, key};
use libfuzzer_sys::fuzz_target;

use common::{Name, Value};

#[derive(Arbitrary, Debug)]
struct Death {
    reason: String,
    queue: String,
    count: u64,
    time_ms: Option<i64>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(Name, Value)>,
    death: Option<Death>,
    reason: u8,
    detail: String,
    attempts: u32,
    record: Option<(String, String)>,
    queue: String,
    retry_attempt: u32,
}

const REASONS: [DeadReason; 5] = [
    DeadReason::MissingKey,
    DeadReason::MaxAttempts,
    DeadReason::Permanent,
    DeadReason::Decode,
    DeadReason::DuplicateOfDead,
];

fn check_record(info: &DeadLetterInfo) {
    if let Some(s) = &info.scope {
        assert!(key::check_scope(s).is_ok(), "{info:?}");
    }
    if let Some(k) = &info.key {
        assert!(
            info.scope.is_some() && key::check_key(k).is_ok(),
            "{info:?}"
        );
    }
}

fuzz_target!(|input: Input| {
    let mut d = Delivery::new(7, "body").with_message_id("m");
    d.headers = common::headers(&input.headers);
    d.broker_death = input.death.as_ref().map(|x| BrokerDeath {
        reason: x.reason.clone(),
        queue: x.queue.clone(),
        count: x.count,
        time_ms: x.time_ms,
    });
    let _ = (d.deferrals(), d.retry_attempt(), format!("{d:?}"));

    // Whatever the headers say: no panic, a record only when a store takes it.
    let info = DeadLetterInfo::of(&d);
    check_record(&info);
    let idemq_reason = matches!(d.header(headers::REASON), Some(HeaderValue::Str(_)));
    let expected = match (idemq_reason, &d.broker_death) {
        (true, _) => Origin::Idemq,
        (false, Some(_)) => Origin::Broker,
        (false, None) => Origin::Unknown,
    };
    assert_eq!(info.origin, expected);
    let json = serde_json::to_string(&info).expect("DeadLetterInfo serializes");
    assert!(json.starts_with('{'));

    // What the engine writes reads back as written.
    let reason = REASONS[usize::from(input.reason) % REASONS.len()];
    let mut letter = DeadLetter::new(reason, input.detail.clone(), input.attempts);
    if let Some((s, k)) = &input.record {
        letter = letter.with_record(s.clone(), k.clone());
    }
    let mut dead = Delivery::new(8, "body");
    dead.headers = letter.headers_for(&d, &input.queue);
    dead.broker_death = d.broker_death.clone();
    let back = DeadLetterInfo::of(&dead);
    check_record(&back);
    assert_eq!(back.origin, Origin::Idemq);
    assert_eq!(back.reason, reason.as_str());
    assert_eq!(back.detail.as_deref(), Some(&*input.detail));
    assert_eq!(back.attempts, Some(input.attempts));
    assert_eq!(back.original_queue.as_deref(), Some(&*input.queue));
    assert!(back.dead_at_ms.is_some());
    let record = input
        .record
        .as_ref()
        .filter(|(s, _)| key::check_scope(s).is_ok());
    assert_eq!(back.scope.as_deref(), record.map(|(s, _)| s.as_str()));
    assert_eq!(
        back.key.as_deref(),
        record
            .map(|(_, k)| k.as_str())
            .filter(|k| key::check_key(k).is_ok())
    );
    assert_eq!(back.replayed, info.replayed);

    // A retried copy carries its attempt number.
    let mut retried = Delivery::new(9, "body");
    retried.headers = retry_headers(&d, input.retry_attempt);
    assert_eq!(retried.retry_attempt(), input.retry_attempt);
    assert_eq!(retried.deferrals(), d.deferrals());
});
