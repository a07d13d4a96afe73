//! idemq headers -> AMQP field table -> the wire (lapin's generator and
//! parser) -> idemq headers: the same headers come back, and only names
//! too long for AMQP are refused.

#![no_main]

#[path = "../common/amqp.rs"]
mod amqp;
#[path = "../common/mod.rs"]
mod common;

use arbitrary::Arbitrary;
use idemq_rabbitmq::headers::{from_field_table, to_field_table, to_field_table_keeping};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;

use common::{Name, Value, same_headers};

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(Name, Value)>,
    changed: Vec<(Name, Value)>,
}

fuzz_target!(|input: Input| {
    let h = common::headers(&input.headers);
    let table = match to_field_table(&h) {
        Ok(t) => t,
        Err(_) => {
            assert!(h.keys().any(|k| k.len() > 255), "refused {h:?}");
            return;
        }
    };
    assert!(same_headers(&from_field_table(&table), &h), "{h:?}");

    let bytes = amqp::write(&BasicProperties::default().with_headers(table.clone()));
    let parsed = amqp::read(&bytes).expect("lapin reads what it wrote");
    let wire = from_field_table(parsed.headers().as_ref().expect("headers"));
    assert!(same_headers(&wire, &h), "{h:?} came back as {wire:?}");

    // Changed headers over the original table: the changed ones win.
    let mut changed = h.clone();
    changed.extend(common::headers(&input.changed));
    if let Ok(t) = to_field_table_keeping(&changed, Some(&table)) {
        assert!(same_headers(&from_field_table(&t), &changed));
    } else {
        assert!(changed.keys().any(|k| k.len() > 255));
    }
});
