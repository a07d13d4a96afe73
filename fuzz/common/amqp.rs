//! lapin's own generator and parser of content-header properties: what
//! goes on the wire and what a lapin consumer reads back.

use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};

/// The properties as lapin writes them.
pub fn write(props: &BasicProperties) -> Vec<u8> {
    cookie_factory::gen_simple(gen_properties(props), Vec::new()).expect("lapin writes properties")
}

/// The properties as lapin reads them (all bytes used), or `None`.
pub fn read(bytes: &[u8]) -> Option<BasicProperties> {
    match parse_properties(bytes) {
        Ok(([], p)) => Some(p),
        _ => None,
    }
}
