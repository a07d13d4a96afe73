//! The engine's metrics on a Prometheus endpoint: `metrics-exporter-prometheus`
//! installed as the `metrics` recorder, serving `/metrics` over HTTP, and
//! a small mix of messages on the in-memory backends (no services needed).
//!
//! `cargo run -p idemq-e2e --example prometheus -- [ADDR]` (default
//! `127.0.0.1:9464`) runs the mix, prints what a scrape answers, and keeps
//! serving until Ctrl-C (`--once` to stop after the scrape).
//!
//! The mix, consumed one at a time so that it settles the same way every
//! run: three orders handled, a copy of the first (a duplicate), an order
//! whose handler fails once (retried, then handled) and a poison order
//! (dead-lettered as permanent). The names are those of
//! `idemq::metric_names`, as the exporter writes them: dots become
//! underscores, counters end in `_total`, the seconds histograms in
//! `_seconds`.

use std::net::SocketAddr;
use std::time::Duration;

use idemq::memory::{MemoryBroker, MemoryDedupStore};
use idemq::{Backoff, Broker, Engine, HandlerError, Message, OutgoingMessage, Report};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The queue and the dedup scope of the mix.
pub const QUEUE: &str = "orders";

/// Installs the Prometheus recorder, its HTTP listener on `addr` spawned
/// on the current runtime. Before any engine is built: an engine takes
/// its metric handles when it is built.
pub fn install(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .with_recommended_naming(true)
        .install()?;
    Ok(())
}

/// Runs the mix on the in-memory backends until all of it is settled.
pub async fn run_mix() -> Result<Report, idemq::Error> {
    let broker = MemoryBroker::new(QUEUE);
    for (id, body) in [
        ("order-1", "5"),
        ("order-2", "7"),
        ("order-3", "9"),
        ("order-1", "5"),
        ("order-flaky", "11"),
        ("order-poison", "poison"),
    ] {
        broker
            .publish(OutgoingMessage::new(body).with_message_id(id))
            .await?;
    }
    broker.close_when_idle();
    let handler = |msg: Message| async move {
        if msg.body().as_ref() == b"poison" {
            return Err(HandlerError::permanent("not a number"));
        }
        if msg.message_id() == Some("order-flaky") && msg.attempt() == 1 {
            return Err(HandlerError::retry("the payment service timed out"));
        }
        Ok(())
    };
    let engine = Engine::builder(broker, MemoryDedupStore::new(), handler)
        .scope(QUEUE)
        .concurrency(1)
        .retry_backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()?;
    Ok(engine.run(CancellationToken::new()).await)
}

/// What a scrape of `http://addr/metrics` answers (the body).
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("scrape answered {head}")));
    }
    Ok(body.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut addr: SocketAddr = "127.0.0.1:9464".parse()?;
    let mut once = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--once" => once = true,
            a => addr = a.parse().map_err(|e| format!("ADDR {a:?}: {e}"))?,
        }
    }
    install(addr)?;
    let report = run_mix().await?;
    println!("{report:?}\n");
    print!("{}", scrape(addr).await?);
    if !once {
        println!("\nserving http://{addr}/metrics; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
