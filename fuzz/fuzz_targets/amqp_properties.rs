//! Untrusted content-header properties, as lapin parses them off the
//! wire, through the RabbitMQ backend's header mapping: headers and
//! `x-death` read without a panic; the retried and dead-lettered copies
//! keep every unchanged header's AMQP value, and lapin reads them back as
//! the same headers.

#![no_main]

#[path = "../common/amqp.rs"]
mod amqp;
#[path = "../common/mod.rs"]
mod common;

use idemq::message::retry_headers;
use idemq::replay::DeadLetterInfo;
use idemq::{DeadLetter, DeadReason, Delivery, KeyStrategy, key};
use idemq_rabbitmq::headers::{broker_death, from_amqp, from_field_table, to_field_table_keeping};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;

use common::{same_headers, same_value};

fuzz_target!(|data: &[u8]| {
    let Ok((_, props)) = lapin::protocol::basic::parse_properties(data) else {
        return;
    };
    let table = props.headers().clone().unwrap_or_default();
    let mut d = Delivery::new(1, data.to_vec());
    d.message_id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
    d.headers = from_field_table(&table);
    d.broker_death = broker_death(&table);
    let _ = (d.deferrals(), d.retry_attempt(), DeadLetterInfo::of(&d));
    let strategy = KeyStrategy::message_id().with_header("x-key");
    if let Some(k) = strategy.extract(&d) {
        assert!(key::check_key(&k).is_ok(), "{k:?}");
    }

    let letter = DeadLetter::new(DeadReason::MaxAttempts, "boom", 3).with_record("s", "k");
    for mut copy in [retry_headers(&d, 2), letter.headers_for(&d, "q")] {
        copy.remove("x-delivery-count");
        let t = to_field_table_keeping(&copy, Some(&table)).expect("AMQP names fit AMQP");
        assert!(same_headers(&from_field_table(&t), &copy));
        for (name, orig) in table.inner() {
            if copy
                .get(name.as_str())
                .is_some_and(|v| same_value(v, &from_amqp(orig)))
            {
                let kept = t.inner().get(name).expect("kept");
                assert_eq!(format!("{kept:?}"), format!("{orig:?}"), "{name:?}");
            }
        }
        if copy.get("x-death") == d.headers.get("x-death") {
            assert_eq!(broker_death(&t), d.broker_death);
        }
        let bytes = amqp::write(&BasicProperties::default().with_headers(t));
        let parsed = amqp::read(&bytes).expect("lapin reads the copy");
        let back = from_field_table(parsed.headers().as_ref().expect("headers"));
        assert!(same_headers(&back, &copy), "{copy:?} came back as {back:?}");
    }
});
