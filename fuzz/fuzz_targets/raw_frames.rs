//! The raw client's frame decoder on a socket buffer: frames, methods and
//! content headers from the network. The first byte picks the negotiated
//! frame size; the rest is the buffer.

#![no_main]

use idemq_rabbitmq::testing::fuzz;
use libfuzzer_sys::fuzz_target;

const FRAME_MAX: [usize; 4] = [8, 64, 4096, 131_072];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, buf)) = data.split_first() else {
        return;
    };
    if let Err(e) = fuzz::frames(buf, FRAME_MAX[usize::from(pick) & 3]) {
        panic!("frames: {e}");
    }
});
