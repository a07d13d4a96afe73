//! The raw client's lenient reading of content-header properties and
//! header tables, and the quarantine's dead-letter copy of a message lapin
//! cannot read. The first byte picks the delivery's exchange and routing
//! key (UTF-8 or not) and the frame size; the rest are the properties.

#![no_main]

use idemq_rabbitmq::testing::fuzz;
use libfuzzer_sys::fuzz_target;

const FRAME_MAX: [usize; 4] = [4096, 8192, 131_072, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, properties)) = data.split_first() else {
        return;
    };
    let routing_key: &[u8] = if pick & 1 != 0 { b"\xffq" } else { b"q" };
    let exchange: &[u8] = if pick & 2 != 0 { b"\xfe" } else { b"" };
    let frame_max = FRAME_MAX[usize::from(pick >> 2) & 3];
    if let Err(e) = fuzz::properties(properties) {
        panic!("properties: {e}");
    }
    if let Err(e) = fuzz::table(properties) {
        panic!("table: {e}");
    }
    if let Err(e) = fuzz::quarantine_copy(properties, exchange, routing_key, frame_max) {
        panic!("quarantine copy: {e}");
    }
});
