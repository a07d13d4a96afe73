//! Test helpers over the raw AMQP client (feature `testing`): publish what
//! lapin cannot publish (short strings that are not UTF-8), read what
//! lapin cannot read, and run the quarantine by hand. Not for production.

use std::time::Duration;

use idemq::{Error, SharedError};
use lapin::uri::AMQPUri;

use super::client::RawClient;
pub use super::client::RawError;
/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub use super::fuzz;
pub use super::props::{RawProperties, RawValue};
use crate::errors::BACKEND;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A message read with the raw client.
#[derive(Clone, Debug)]
pub struct RawMessage {
    /// Its properties, short strings as bytes.
    pub properties: RawProperties,
    /// Its body.
    pub body: Vec<u8>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
}

fn uri(url: &str) -> Result<AMQPUri, Error> {
    url.parse::<AMQPUri>()
        .map_err(|e| Error::invalid("AMQP URL", e))
}

fn failed(op: &'static str) -> impl FnOnce(RawError) -> Error {
    move |e| Error::Backend {
        backend: BACKEND,
        op,
        transient: false,
        source: SharedError::new(e),
    }
}

/// Publishes one message to `queue` (default exchange, mandatory) with
/// publisher confirms, properties as given, bytes and all.
pub async fn publish_raw(
    url: &str,
    queue: &str,
    properties: &RawProperties,
    body: &[u8],
) -> Result<(), Error> {
    publish_raw_many(url, queue, &[(properties.clone(), body.to_vec())]).await
}

/// Publishes messages in order on one connection, each confirmed before
/// the next.
pub async fn publish_raw_many(
    url: &str,
    queue: &str,
    messages: &[(RawProperties, Vec<u8>)],
) -> Result<(), Error> {
    const OP: &str = "raw publish";
    let mut client = RawClient::connect(&uri(url)?, "idemq-test-raw", IO_TIMEOUT)
        .await
        .map_err(failed(OP))?;
    for (properties, body) in messages {
        client
            .publish_confirmed(b"", queue.as_bytes(), properties, body)
            .await
            .map_err(failed(OP))?;
    }
    client.close().await.map_err(failed(OP))
}

/// Takes the head message of `queue` and acks it (`ack`) or puts it back.
pub async fn get_raw(url: &str, queue: &str, ack: bool) -> Result<Option<RawMessage>, Error> {
    const OP: &str = "raw get";
    let mut client = RawClient::connect(&uri(url)?, "idemq-test-raw", IO_TIMEOUT)
        .await
        .map_err(failed(OP))?;
    let got = client
        .basic_get(queue.as_bytes())
        .await
        .map_err(failed(OP))?;
    let out = match got {
        None => None,
        Some(m) => {
            if ack {
                client.ack(m.delivery_tag).await.map_err(failed(OP))?;
            } else {
                client
                    .nack(m.delivery_tag, true)
                    .await
                    .map_err(failed(OP))?;
            }
            let properties =
                RawProperties::decode(&m.properties).map_err(|e| failed(OP)(RawError::Codec(e)))?;
            Some(RawMessage {
                properties,
                body: m.body,
                redelivered: m.redelivered,
            })
        }
    };
    client.close().await.map_err(failed(OP))?;
    Ok(out)
}

/// Runs the quarantine on `queue` by hand; returns how many messages it
/// moved to `dead_letter_queue`.
pub async fn quarantine(
    url: &str,
    queue: &str,
    dead_letter_queue: &str,
    max: usize,
) -> Result<usize, Error> {
    let uri = uri(url)?;
    let q = super::Quarantine {
        uri: &uri,
        queue,
        dead_letter_queue,
        max,
        io_timeout: IO_TIMEOUT,
        connection_name: format!("idemq-quarantine:{queue}"),
    };
    super::quarantine(&q)
        .await
        .map(|r| r.moved.len())
        .map_err(failed("quarantine"))
}
