//! Key normalisation and checks (`idemq::key`), and the engine's key
//! extraction from a delivery (`KeyStrategy::extract`): never a panic, and
//! every key that comes out is one every store accepts.

#![no_main]

#[path = "../common/mod.rs"]
mod common;

use arbitrary::Arbitrary;
use idemq::key::{self, MAX_KEY_LEN, MAX_RAW_KEY_LEN, MAX_SCOPE_LEN};
use idemq::{Delivery, KeyStrategy};
use libfuzzer_sys::fuzz_target;

use common::{Name, Value};

#[derive(Arbitrary, Debug)]
struct Input {
    raw: Vec<u8>,
    scope: String,
    message_id: Option<String>,
    header: Option<String>,
    headers: Vec<(Name, Value)>,
    body: Vec<u8>,
    hash_body: bool,
}

fn safe_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:@/+=".contains(&b)
}

fuzz_target!(|input: Input| {
    // normalize: safe raw keys kept, everything else hashed, all checked.
    let k = key::normalize(&input.raw);
    assert!(key::check_key(&k).is_ok(), "{:?} -> {k:?}", input.raw);
    assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN);
    let safe = !input.raw.is_empty()
        && input.raw.len() <= MAX_RAW_KEY_LEN
        && input.raw.iter().copied().all(safe_key_byte);
    if safe {
        assert_eq!(k.as_bytes(), &input.raw[..]);
        assert_eq!(key::normalize(k.as_bytes()), k);
    } else {
        assert!(k.starts_with("~sha256:") && k.len() == 8 + 64, "{k}");
        // A hashed key is never taken for a raw one.
        assert_ne!(key::normalize(k.as_bytes()), k);
    }
    assert_eq!(key::normalize(&input.raw), k);

    // check_key / check_scope on anything: no panic, and what passes holds
    // none of the characters backends build names with.
    let text = String::from_utf8_lossy(&input.raw);
    if key::check_key(&text).is_ok() {
        let body = text.strip_prefix('~').unwrap_or(&text);
        assert!(text.len() <= MAX_KEY_LEN && body.bytes().all(safe_key_byte));
    }
    let scope_ok = !input.scope.is_empty()
        && input.scope.len() <= MAX_SCOPE_LEN
        && input
            .scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    assert_eq!(key::check_scope(&input.scope).is_ok(), scope_ok);
    assert_eq!(
        key::check(&input.scope, &k).is_ok(),
        scope_ok,
        "check({:?}, {k:?})",
        input.scope
    );

    // KeyStrategy::extract on an arbitrary delivery.
    let mut d = Delivery::new(1, input.body.clone());
    d.message_id = input.message_id.clone();
    d.headers = common::headers(&input.headers);
    let mut strategy = KeyStrategy::message_id();
    if let Some(h) = &input.header {
        strategy = strategy.with_header(h.clone());
    }
    if input.hash_body {
        strategy = strategy.with_body_hash();
    }
    let got = strategy.extract(&d);
    if let Some(k) = &got {
        assert!(key::check_key(k).is_ok(), "extracted {k:?}");
    }
    match input.message_id.as_deref() {
        Some(id) if !id.is_empty() => {
            assert_eq!(got.as_deref(), Some(&*key::normalize(id.as_bytes())));
        }
        _ => {
            if input.hash_body {
                assert!(got.is_some());
            }
            if input.header.is_none() && !input.hash_body {
                assert_eq!(got, None);
            }
        }
    }
});
