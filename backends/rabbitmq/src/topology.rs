//! The queues idemq declares, and administration of them.
//!
//! * `Q`: the durable work queue (classic or quorum). It dead-letters to
//!   `Q.dlq` (`x-dead-letter-exchange: ""`, `x-dead-letter-routing-key:
//!   Q.dlq`), so whatever the broker itself gives up on (a rejection, a
//!   quorum queue's delivery limit) lands in the dead-letter queue with the
//!   broker's `x-death` reason instead of vanishing. A quorum `Q` also gets
//!   an explicit delivery limit ([`RabbitConfig::with_delivery_limit`]; RabbitMQ
//!   4 would otherwise apply 20) and at-least-once dead-lettering
//!   (`x-dead-letter-strategy: at-least-once`, with the `x-overflow:
//!   reject-publish` it needs).
//! * `Q.retry.<tier>`: one durable queue per backoff tier, with a
//!   queue-level `x-message-ttl` of the tier and dead-lettering back to `Q`.
//!   All messages of a queue share its TTL, so none waits behind a longer one.
//! * `Q.dlq`: the durable dead-letter queue (same type as `Q`; a quorum one
//!   with a delivery limit no number of replay dry runs reaches).
//!
//! Declarations are idempotent: declaring again with the same arguments is
//! a no-op. A queue declared before with other arguments is handled so
//! that consumers never crash-loop on `PRECONDITION_FAILED`:
//!
//! * when what differs is one of the safety arguments above (a queue made
//!   by an earlier idemq, or by hand), the queue is used as it is, and one
//!   warning names what it lacks and the `rabbitmqctl set_policy` command
//!   that adds it without moving a message;
//! * anything else (another queue type, another retry tier TTL) fails at
//!   start with [`Error::Config`] naming the argument and how to migrate.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use idemq::Error;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::time::timeout;
use tracing::warn;

use crate::config::{DEAD_LETTER_DELIVERY_LIMIT, QueueType, RabbitConfig};
use crate::errors::{BACKEND, map, map_passive};
use crate::headers::short_string;

/// One argument of a queue declaration.
struct Arg {
    name: &'static str,
    value: AMQPValue,
    /// A safety net a queue declared before may lack: the queue is then
    /// used as it is, with a warning, rather than refused.
    safety: bool,
    /// The same setting as a policy key (`rabbitmqctl set_policy`).
    policy: Option<(&'static str, String)>,
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `x-queue-type` for a quorum queue; none for a classic one, so queues
/// made before idemq (or by older tools) stay equivalent.
fn type_arg(queue_type: QueueType) -> Vec<Arg> {
    match queue_type {
        QueueType::Quorum => vec![Arg {
            name: "x-queue-type",
            value: text(queue_type.as_str()),
            safety: false,
            policy: None,
        }],
        _ => Vec::new(),
    }
}

/// The work queue: dead-letters to the dead-letter queue; a quorum one with
/// a delivery limit and at-least-once dead-lettering.
fn work_queue_args(cfg: &RabbitConfig) -> Vec<Arg> {
    let dlq = cfg.dead_letter_queue();
    let mut args = type_arg(cfg.queue_type());
    args.push(Arg {
        name: "x-dead-letter-exchange",
        value: text(""),
        safety: true,
        policy: Some(("dead-letter-exchange", "\"\"".into())),
    });
    args.push(Arg {
        name: "x-dead-letter-routing-key",
        value: text(&dlq),
        safety: true,
        policy: Some(("dead-letter-routing-key", format!("{dlq:?}"))),
    });
    if cfg.queue_type() == QueueType::Quorum {
        let limit = cfg.delivery_limit();
        args.push(Arg {
            name: "x-delivery-limit",
            value: AMQPValue::LongLongInt(i64::from(limit)),
            safety: true,
            policy: Some(("delivery-limit", limit.to_string())),
        });
        args.push(Arg {
            name: "x-dead-letter-strategy",
            value: text("at-least-once"),
            safety: true,
            policy: Some(("dead-letter-strategy", "\"at-least-once\"".into())),
        });
        args.push(Arg {
            name: "x-overflow",
            value: text("reject-publish"),
            safety: true,
            policy: Some(("overflow", "\"reject-publish\"".into())),
        });
    }
    args
}

/// A retry queue: the tier's TTL, then back to the work queue.
fn retry_queue_args(cfg: &RabbitConfig, tier: std::time::Duration) -> Vec<Arg> {
    let mut args = type_arg(cfg.retry_queue_type());
    let ttl = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
    for (name, value) in [
        ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(cfg.queue())),
    ] {
        args.push(Arg {
            name,
            value,
            safety: false,
            policy: None,
        });
    }
    args
}

/// The dead-letter queue: a quorum one with a delivery limit out of reach.
fn dead_letter_queue_args(cfg: &RabbitConfig) -> Vec<Arg> {
    let mut args = type_arg(cfg.queue_type());
    if cfg.queue_type() == QueueType::Quorum {
        args.push(Arg {
            name: "x-delivery-limit",
            value: AMQPValue::LongLongInt(i64::from(DEAD_LETTER_DELIVERY_LIMIT)),
            safety: true,
            policy: Some(("delivery-limit", DEAD_LETTER_DELIVERY_LIMIT.to_string())),
        });
    }
    args
}

/// Declares the work queue, the retry queues and the dead-letter queue,
/// each on a channel of its own (a refused declaration closes its channel).
pub(crate) async fn declare_topology(conn: &Connection, cfg: &RabbitConfig) -> Result<(), Error> {
    declare_queue(conn, cfg.queue(), work_queue_args(cfg)).await?;
    for (tier, name) in cfg.retry_queues() {
        declare_queue(conn, &name, retry_queue_args(cfg, tier)).await?;
    }
    declare_queue(conn, &cfg.dead_letter_queue(), dead_letter_queue_args(cfg)).await
}

/// Declares `queue` with `args`; when the broker says the queue exists with
/// another value of a safety argument, declares it again without that one
/// (the queue is used as it is) and warns once.
async fn declare_queue(conn: &Connection, queue: &str, mut args: Vec<Arg>) -> Result<(), Error> {
    let name = short_string("queue name", queue)?;
    let mut dropped: Vec<Arg> = Vec::new();
    loop {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        let mut table = FieldTable::default();
        for a in &args {
            table.insert(a.name.into(), a.value.clone());
        }
        let declared = channel
            .queue_declare(name.clone(), QueueDeclareOptions::durable(), table)
            .await;
        let differing = match declared {
            Ok(_) => {
                close(&channel).await;
                if !dropped.is_empty() {
                    warn_adopted(queue, &dropped);
                }
                return Ok(());
            }
            Err(e) => match inequivalent_arg(&e) {
                Some(arg) => (arg, e),
                None => return Err(map("declare", e)),
            },
        };
        let (arg, e) = differing;
        match args.iter().position(|a| a.safety && a.name == arg) {
            Some(i) => dropped.push(args.remove(i)),
            None => return Err(refused(queue, &arg, &args, &e)),
        }
    }
}

/// A passive declaration of `queue`, on a channel of its own (a missing
/// queue closes the channel): [`Error::NotFound`] naming a missing queue.
pub(crate) async fn passive(
    conn: &Connection,
    queue: &str,
    op: &'static str,
) -> Result<lapin::Queue, Error> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| map("open channel", e))?;
    let declared = channel
        .queue_declare(
            short_string("queue name", queue)?,
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_passive(queue, op, e));
    close(&channel).await;
    declared
}

/// Closes a channel before its connection: one that lapin closes by itself
/// (its last handle dropped) while the connection closes logs a spurious
/// "invalid channel state: Closing" error.
async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "idemq: declared".into()).await;
    }
}

/// The argument a `PRECONDITION_FAILED` declaration names: RabbitMQ says
/// "inequivalent arg 'x-queue-type' for queue ...".
fn inequivalent_arg(e: &lapin::Error) -> Option<String> {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let ErrorKind::ProtocolError(p) = e.kind() else {
        return None;
    };
    if !matches!(
        p.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    ) {
        return None;
    }
    let text = p.to_string();
    let start = text.find("inequivalent arg '")? + "inequivalent arg '".len();
    let len = text[start..].find('\'')?;
    Some(text[start..start + len].to_owned())
}

/// The error for a queue that exists with an argument idemq cannot do
/// without.
fn refused(queue: &str, arg: &str, args: &[Arg], e: &lapin::Error) -> Error {
    let ours: Vec<String> = args
        .iter()
        .map(|a| format!("{}={}", a.name, crate::headers::string_form(&a.value)))
        .collect();
    let how = match arg {
        "x-queue-type" => {
            "configure the queue type it has (RabbitConfig::with_queue_type), or move its \
             messages to a new queue (a shovel) and let idemq declare that one"
        }
        "x-message-ttl" => {
            "a retry queue's TTL is its tier: configure the tiers it has \
             (RabbitConfig::with_retry_tiers), or delete the empty retry queue"
        }
        _ => {
            "configure idemq to match it, or move its messages to a new queue (a shovel) \
             and let idemq declare that one"
        }
    };
    Error::Config(format!(
        "queue `{queue}` exists with another `{arg}` than idemq declares ({}); idemq \
         declares it with [{}]. To migrate: {how}",
        error_text(e),
        ours.join(", ")
    ))
}

fn error_text(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.to_string(),
        _ => e.to_string(),
    }
}

/// Warns, once per queue and process, that a queue is used without some
/// of its safety arguments, and how to add them.
fn warn_adopted(queue: &str, dropped: &[Arg]) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let first = WARNED
        .get_or_init(Mutex::default)
        .lock()
        .map(|mut w| w.insert(queue.to_owned()))
        .unwrap_or(true);
    if !first {
        return;
    }
    let names: Vec<&str> = dropped.iter().map(|a| a.name).collect();
    let policy: Vec<String> = dropped
        .iter()
        .filter_map(|a| a.policy.as_ref())
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    let pattern = regex_escape(queue);
    warn!(
        queue,
        missing = %names.join(", "),
        "queue `{queue}` was declared earlier without {}: idemq uses it as it is. Until \
         that is fixed, a message the broker gives up on (a rejection, a quorum queue's \
         delivery limit) is dropped instead of dead-lettered. To fix it without moving a \
         message, apply a policy: rabbitmqctl set_policy idemq-{queue} '^{pattern}$' \
         '{{{}}}' --apply-to queues",
        names.join(", "),
        policy.join(",")
    );
}

/// `queue` with the characters a regular expression gives a meaning to escaped.
fn regex_escape(queue: &str) -> String {
    let mut out = String::with_capacity(queue.len());
    for c in queue.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How many ready messages each queue of a topology holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// The work queue.
    pub work: u32,
    /// Each retry queue, with its tier, shortest first.
    pub retry: Vec<(std::time::Duration, u32)>,
    /// The dead-letter queue.
    pub dead: u32,
}

/// Opens a short-lived connection without recovery, runs `f`, closes it.
async fn with_channel<T>(
    cfg: &RabbitConfig,
    op: &'static str,
    f: impl AsyncFnOnce(&Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    let uri = cfg.validate()?;
    let after = cfg.connect_timeout();
    let conn = timeout(
        after,
        Connection::connect_uri(
            uri,
            ConnectionProperties::default().with_connection_name("idemq-admin".into()),
        ),
    )
    .await
    .map_err(|_| Error::Timeout {
        backend: BACKEND,
        op,
        after,
    })?
    .map_err(|e| map(op, e))?;
    let result = timeout(after, f(&conn))
        .await
        .unwrap_or(Err(Error::Timeout {
            backend: BACKEND,
            op,
            after,
        }));
    if conn.status().connected() {
        let _ = timeout(after, conn.close(200, "idemq: done".into())).await;
    }
    result
}

/// Declares the topology of `cfg` (idempotent), on a short-lived connection.
/// [`crate::RabbitBroker::connect`] does this by itself; producers that
/// start before any consumer can call it so their first messages are
/// routable.
pub async fn declare(cfg: &RabbitConfig) -> Result<(), Error> {
    with_channel(cfg, "declare", async |conn| {
        declare_topology(conn, cfg).await
    })
    .await
}

/// Deletes every queue of `cfg`'s topology (work, retry and dead-letter
/// queues) with the messages they hold, on a short-lived connection.
/// Missing queues are not an error. Close the broker consuming them first,
/// or its supervisor declares them again.
pub async fn delete_topology(cfg: &RabbitConfig) -> Result<(), Error> {
    with_channel(cfg, "delete", async |conn| {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        for queue in cfg.all_queues() {
            channel
                .queue_delete(
                    short_string("queue name", &queue)?,
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(|e| map("delete", e))?;
        }
        close(&channel).await;
        Ok(())
    })
    .await
}

/// Counts the ready messages of each queue of `cfg`'s topology (passive
/// declarations on a short-lived connection). A missing queue is an error.
pub async fn queue_depths(cfg: &RabbitConfig) -> Result<QueueDepths, Error> {
    with_channel(cfg, "queue depths", async |conn| {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| map("open channel", e))?;
        let count = async |name: &str| -> Result<u32, Error> {
            channel
                .queue_declare(
                    short_string("queue name", name)?,
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await
                .map(|q| q.message_count())
                .map_err(|e| map("queue depths", e))
        };
        let work = count(cfg.queue()).await?;
        let mut retry = Vec::new();
        for (tier, name) in cfg.retry_queues() {
            retry.push((tier, count(&name).await?));
        }
        let dead = count(&cfg.dead_letter_queue()).await?;
        close(&channel).await;
        Ok(QueueDepths { work, retry, dead })
    })
    .await
}

/// What a queue of a topology is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// The work queue.
    Work,
    /// A retry queue, with its tier.
    Retry(std::time::Duration),
    /// The dead-letter queue.
    Dead,
}

/// One queue of a topology as the broker sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStat {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub role: QueueRole,
    /// False when the broker has no such queue (then the counts are 0).
    pub exists: bool,
    /// Messages ready (not counting those delivered and unacked).
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// The ready messages and consumers of every queue of `cfg`'s topology,
/// from passive declarations on a short-lived connection: nothing is
/// declared, a missing queue is reported as such, not created.
pub async fn queue_stats(cfg: &RabbitConfig) -> Result<Vec<QueueStat>, Error> {
    let mut queues = vec![(cfg.queue().to_owned(), QueueRole::Work)];
    for (tier, name) in cfg.retry_queues() {
        queues.push((name, QueueRole::Retry(tier)));
    }
    queues.push((cfg.dead_letter_queue(), QueueRole::Dead));
    with_channel(cfg, "queue stats", async |conn| {
        let mut out = Vec::with_capacity(queues.len());
        for (name, role) in queues {
            let (exists, messages, consumers) = match passive(conn, &name, "queue stats").await {
                Ok(q) => (true, q.message_count(), q.consumer_count()),
                Err(Error::NotFound { .. }) => (false, 0, 0),
                Err(e) => return Err(e),
            };
            out.push(QueueStat {
                name,
                role,
                exists,
                messages,
                consumers,
            });
        }
        Ok(out)
    })
    .await
}
