//! `idemq inspect`, `forget` and `purge`: the dedup records of message ids.

use idemq::key::normalize;
use idemq::{BoxError, Record, RecordState};
use serde_json::{Value, json};

use crate::Outcome;
use crate::store::{StoreOpts, millis, open_postgres, open_store, secs, state_name};

/// A message id as the user gave it, and the key the engine claims it
/// under (see [`idemq::key::normalize`]), unless `as_keys` says the ids
/// are keys already.
fn keys_of(ids: &[String], as_keys: bool) -> Vec<(String, String)> {
    ids.iter()
        .map(|id| {
            let key = if as_keys {
                id.clone()
            } else {
                normalize(id.as_bytes())
            };
            (id.clone(), key)
        })
        .collect()
}

/// `order #1 (key ~sha256:…)` when the key differs from the id.
fn label(id: &str, key: &str) -> String {
    if id == key {
        id.to_owned()
    } else {
        format!("{id} (key {key})")
    }
}

/// One line describing `record` (or its absence).
fn describe(record: Option<&Record>) -> String {
    match record {
        None => "absent".to_owned(),
        Some(r) => format!(
            "{} attempts={} lease_remaining={} expires_in={}",
            state_name(r.state),
            r.attempts,
            r.lease_remaining.map_or_else(|| "-".to_owned(), secs),
            secs(r.expires_in)
        ),
    }
}

fn record_json(id: &str, key: &str, record: Option<&Record>) -> Value {
    match record {
        None => json!({ "id": id, "key": key, "state": "absent" }),
        Some(r) => json!({
            "id": id,
            "key": key,
            "state": state_name(r.state),
            "attempts": r.attempts,
            "lease_remaining_ms": r.lease_remaining.map(millis),
            "expires_in_ms": millis(r.expires_in),
        }),
    }
}

/// True for a claim whose lease has not lapsed: a consumer is at work.
fn live(record: Option<&Record>) -> bool {
    record.is_some_and(|r| {
        r.state == RecordState::Claimed && r.lease_remaining.is_some_and(|l| !l.is_zero())
    })
}

/// `idemq inspect`: prints each id's record.
pub async fn inspect(
    opts: &StoreOpts,
    scope: &str,
    ids: &[String],
    as_keys: bool,
    as_json: bool,
) -> Result<Outcome, BoxError> {
    let store = open_store(opts).await?;
    let mut out = Vec::new();
    for (id, key) in keys_of(ids, as_keys) {
        let record = store.get(scope, &key).await?;
        if as_json {
            out.push(record_json(&id, &key, record.as_ref()));
        } else {
            println!("{}: {}", label(&id, &key), describe(record.as_ref()));
        }
    }
    if as_json {
        println!("{}", Value::Array(out));
    }
    Ok(Outcome::Done)
}

/// `idemq forget`: deletes each id's record, so the message is handled
/// again; refuses a live lease (a consumer is handling the message now)
/// unless `force`.
pub async fn forget(
    opts: &StoreOpts,
    scope: &str,
    ids: &[String],
    as_keys: bool,
    force: bool,
    as_json: bool,
) -> Result<Outcome, BoxError> {
    let store = open_store(opts).await?;
    let mut out = Vec::new();
    let mut refused = 0;
    for (id, key) in keys_of(ids, as_keys) {
        let record = store.get(scope, &key).await?;
        let result = if live(record.as_ref()) && !force {
            refused += 1;
            let left = record
                .as_ref()
                .and_then(|r| r.lease_remaining)
                .map_or_else(String::new, |l| format!(", {} left", secs(l)));
            eprintln!(
                "idemq: {}: a consumer holds a live lease on it{left}; not forgotten (--force to delete it anyway)",
                label(&id, &key)
            );
            "refused-live-lease"
        } else if store.forget(scope, &key).await? {
            "forgotten"
        } else {
            "absent"
        };
        if as_json {
            out.push(json!({ "id": id, "key": key, "result": result }));
        } else {
            let text = match result {
                "forgotten" => "forgotten",
                "absent" => "was not there",
                _ => "refused: live lease",
            };
            println!("{}: {text}", label(&id, &key));
        }
    }
    if as_json {
        println!("{}", Value::Array(out));
    }
    Ok(if refused > 0 {
        Outcome::Failed
    } else {
        Outcome::Done
    })
}

/// `idemq purge`: deletes expired Postgres rows in batches.
pub async fn purge(opts: &StoreOpts, batch: usize) -> Result<Outcome, BoxError> {
    let store = open_postgres(opts).await?;
    let n = store.purge(batch).await?;
    println!("purged {n} expired rows from {}", store.table());
    store.pool().close().await;
    Ok(Outcome::Done)
}
