//! Message keys: where they come from ([`KeyStrategy`]) and the shape every
//! store can rely on ([`normalize`], [`check_scope`], [`check_key`]).
//!
//! A raw key (message id, header value) is used as it is when it is short
//! and made of safe characters; anything else is replaced by
//! `~sha256:<hex>` of it. `~` is not a safe character, so a hashed key can
//! never equal a raw one, and no key can contain the `{`, `}` or
//! separators a backend uses to build its own names: `scope` + key never
//! collide across scopes.

use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::message::{Delivery, HeaderValue};

/// Longest raw key kept as it is, in bytes. Longer keys are hashed.
pub const MAX_RAW_KEY_LEN: usize = 128;
/// Longest key a store must accept, in bytes (raw or hashed).
pub const MAX_KEY_LEN: usize = MAX_RAW_KEY_LEN;
/// Longest scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 64;

const HASH_PREFIX: &str = "~sha256:";
const BODY_HASH_PREFIX: &str = "~body-sha256:";

fn is_safe_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@' | b'/' | b'+' | b'=')
}

fn is_safe_scope_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Turns a raw key into one every store accepts: unchanged when it is
/// 1..=[`MAX_RAW_KEY_LEN`] safe bytes (`A-Z a-z 0-9 - _ . : @ / + =`),
/// else `~sha256:` + the hex SHA-256 of the raw bytes.
pub fn normalize(raw: &[u8]) -> String {
    if !raw.is_empty() && raw.len() <= MAX_RAW_KEY_LEN && raw.iter().copied().all(is_safe_key_byte)
    {
        // All bytes are ASCII, so this is valid UTF-8.
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!("{HASH_PREFIX}{}", hex(&Sha256::digest(raw)))
}

/// Checks a scope: 1..=[`MAX_SCOPE_LEN`] bytes of `A-Z a-z 0-9 - _ .`.
pub fn check_scope(scope: &str) -> Result<(), Error> {
    if scope.is_empty() || scope.len() > MAX_SCOPE_LEN {
        return Err(Error::invalid(
            "scope",
            format!("must be 1 to {MAX_SCOPE_LEN} bytes, got {}", scope.len()),
        ));
    }
    if !scope.bytes().all(is_safe_scope_byte) {
        return Err(Error::invalid(
            "scope",
            "may only contain ASCII letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// Checks a key as [`normalize`] produces them: a safe raw key, or a
/// `~`-prefixed hash.
pub fn check_key(key: &str) -> Result<(), Error> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key
            .strip_prefix('~')
            .unwrap_or(key)
            .bytes()
            .all(is_safe_key_byte);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "key",
            "not a normalized key (use idemq::key::normalize)",
        ))
    }
}

/// Checks both; what every store does first.
pub fn check(scope: &str, key: &str) -> Result<(), Error> {
    check_scope(scope)?;
    check_key(key)
}

/// Where the engine finds a message's key, in order: the `message_id`
/// property; else the configured header; else, only when opted in, the
/// SHA-256 of the body. The default uses the `message_id` only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyStrategy {
    header: Option<String>,
    hash_body: bool,
}

impl KeyStrategy {
    /// The `message_id` property only.
    pub fn message_id() -> Self {
        KeyStrategy::default()
    }

    /// Falls back to this header when there is no `message_id`.
    pub fn with_header(mut self, name: impl Into<String>) -> Self {
        self.header = Some(name.into());
        self
    }

    /// Falls back to the SHA-256 of the body when nothing else gives a key.
    /// Opt in only when equal bodies really mean the same message.
    pub fn with_body_hash(mut self) -> Self {
        self.hash_body = true;
        self
    }

    /// The normalized key of a delivery, or `None` when it has none (the
    /// engine then dead-letters it with reason `missing-key`).
    pub fn extract(&self, delivery: &Delivery) -> Option<String> {
        if let Some(id) = delivery.message_id.as_deref().filter(|id| !id.is_empty()) {
            return Some(normalize(id.as_bytes()));
        }
        if let Some(name) = &self.header {
            let raw: Option<Vec<u8>> = match delivery.header(name) {
                Some(HeaderValue::Str(s)) if !s.is_empty() => Some(s.as_bytes().to_vec()),
                Some(HeaderValue::Bytes(b)) if !b.is_empty() => Some(b.clone()),
                Some(HeaderValue::Int(i)) => Some(i.to_string().into_bytes()),
                _ => None,
            };
            if let Some(raw) = raw {
                return Some(normalize(&raw));
            }
        }
        if self.hash_body {
            return Some(format!(
                "{BODY_HASH_PREFIX}{}",
                hex(&Sha256::digest(&delivery.body))
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_keys_stay_hostile_keys_hash() {
        assert_eq!(normalize(b"order-42"), "order-42");
        let long = vec![b'a'; MAX_RAW_KEY_LEN + 1];
        for raw in [
            &b"a}b"[..],
            b"{x:y}",
            b"with space",
            b"\0",
            b"",
            &long,
            "é".as_bytes(),
        ] {
            let k = normalize(raw);
            assert!(k.starts_with(HASH_PREFIX), "{raw:?} -> {k}");
            check_key(&k).unwrap();
        }
        // A raw key can never look like a hashed one.
        let hashed = normalize(b"a}b");
        assert_ne!(normalize(hashed.as_bytes()), hashed);
    }

    #[test]
    fn scopes_are_checked() {
        check_scope("orders.v1").unwrap();
        for bad in ["", "a:b", "a{b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(
                    check_scope(bad),
                    Err(Error::InvalidInput { what: "scope", .. })
                ),
                "{bad}"
            );
        }
        assert!(check_key("{a}").is_err());
        assert!(check_key("").is_err());
    }

    #[test]
    fn extraction_order() {
        let d = Delivery::new(1, "body").with_header("x-key", "hk");
        assert_eq!(KeyStrategy::message_id().extract(&d), None);
        assert_eq!(
            KeyStrategy::message_id()
                .with_header("x-key")
                .extract(&d)
                .as_deref(),
            Some("hk")
        );
        let with_id = d.clone().with_message_id("mid");
        assert_eq!(
            KeyStrategy::message_id()
                .with_header("x-key")
                .extract(&with_id)
                .as_deref(),
            Some("mid")
        );
        let empty_id = Delivery::new(1, "body").with_message_id("");
        let k = KeyStrategy::message_id()
            .with_body_hash()
            .extract(&empty_id)
            .unwrap();
        assert!(k.starts_with(BODY_HASH_PREFIX));
        check_key(&k).unwrap();
    }
}
