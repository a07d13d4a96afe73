//! `idemq replay`, `dead`, `stats`, `inspect` and `forget` as an operator
//! runs them, against real RabbitMQ, Redis and Postgres: output, JSON and
//! exit codes; and replays killed at random points that still never lose
//! or double a message.

mod common;

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{AMQP, PG, REDIS, command, idemq, reachable, stderr, stdout, url};
use futures::StreamExt;
use idemq::key::normalize;
use idemq::testing::unique_scope;
use idemq::{
    Claim, ClaimTtl, DeadLetter, DeadReason, DedupStore, Engine, Fenced, Message, OutgoingMessage,
    RecordState,
};
use idemq_rabbitmq::{RabbitConfig, RabbitPublisher, delete_topology, queue_depths, topology};
use idemq_redis::RedisDedupStore;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(3600);

fn services() -> bool {
    reachable("rabbitmq", AMQP, 5672) && reachable("redis", REDIS, 6379)
}

async fn redis() -> RedisDedupStore {
    RedisDedupStore::connect(&url(REDIS)).await.expect("redis")
}

/// A fresh topology whose dead-letter queue holds `ids` (oldest first), as
/// the engine dead-letters them: each names its record in `scope`, whose
/// record is dead. Reasons: `max-attempts` for ids ending in 7, else
/// `permanent`.
async fn dead_letters<S: DedupStore>(store: &S, scope: &str, ids: &[String]) -> RabbitConfig {
    let config = RabbitConfig::new(url(AMQP), format!("idemq-cli.{}", unique_scope("replay")));
    topology::declare(&config).await.expect("declare");
    let ttl = ClaimTtl {
        lease: LONG,
        retain: LONG,
    };
    futures::stream::iter(ids)
        .for_each_concurrent(64, |id| async move {
            let key = normalize(id.as_bytes());
            let Claim::Claimed(lease) = store.claim(scope, &key, ttl).await.expect("claim") else {
                panic!("fresh key");
            };
            assert_eq!(
                store.bury(&lease, LONG).await.expect("bury"),
                Fenced::Applied
            );
        })
        .await;
    let publisher = RabbitPublisher::connect(config.clone())
        .await
        .expect("publisher");
    let dlq = config.dead_letter_queue();
    for id in ids {
        let reason = if id.ends_with('7') {
            DeadReason::MaxAttempts
        } else {
            DeadReason::Permanent
        };
        let origin = idemq::Delivery::new(0, "b").with_message_id(id.clone());
        let letter =
            DeadLetter::new(reason, "broken", 1).with_record(scope, normalize(id.as_bytes()));
        let mut msg = OutgoingMessage::new(format!("body of {id}")).with_message_id(id.clone());
        msg.headers = letter.headers_for(&origin, config.queue());
        publisher.publish_to(&dlq, msg).await.expect("publish");
    }
    publisher.close().await;
    config
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

async fn depths(config: &RabbitConfig) -> (u32, u32) {
    let d = queue_depths(config).await.expect("depths");
    (d.work, d.dead)
}

/// Handles what is in the work queue with an engine whose handler counts
/// its runs per key and succeeds; returns once the queue is empty.
async fn consume<S: DedupStore + Clone>(
    config: &RabbitConfig,
    store: &S,
    scope: &str,
    runs: &Arc<Mutex<HashMap<String, u32>>>,
) {
    let broker = idemq_rabbitmq::RabbitBroker::connect(config.clone().with_prefetch(64))
        .await
        .expect("consumer");
    let r = runs.clone();
    let engine = Engine::builder(broker.clone(), store.clone(), move |m: Message| {
        let r = r.clone();
        async move {
            *r.lock().unwrap().entry(m.key().to_owned()).or_default() += 1;
            Ok(())
        }
    })
    .scope(scope)
    .concurrency(32)
    .build()
    .expect("engine");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.run(shutdown.clone()));
    let mut empty_polls = 0;
    while empty_polls < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = queue_depths(config).await.expect("depths");
        let waiting = d.work + d.retry.iter().map(|(_, n)| n).sum::<u32>();
        empty_polls = if waiting == 0 { empty_polls + 1 } else { 0 };
    }
    shutdown.cancel();
    running.await.expect("engine");
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_dry_run_filters_json_and_exit_codes() {
    if !services() {
        return;
    }
    let store = redis().await;
    let scope = unique_scope("cli-replay");
    let config = dead_letters(&store, &scope, &ids("m", 20)).await;
    let q = config.queue().to_owned();

    let out = idemq(&[
        "replay",
        "--queue",
        &q,
        "--store",
        "redis",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["moved"], 20, "{report}");
    assert_eq!(report["list"].as_array().map(Vec::len), Some(20));
    assert_eq!(report["list"][0]["message_id"], "m0");
    assert_eq!(report["list"][0]["action"], "move");
    assert_eq!(report["list"][0]["previous"], "dead");
    assert_eq!(depths(&config).await, (0, 20), "a dry run moves nothing");
    let r = store.get(&scope, "m0").await.unwrap().unwrap();
    assert_eq!(r.state, RecordState::Dead, "a dry run changes no record");

    // The text form lists each dead letter and why.
    let out = idemq(&[
        "replay",
        "--queue",
        &q,
        "--store",
        "redis",
        "--dry-run",
        "--reason",
        "max-attempts",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.contains("move          m7"), "{text}");
    assert!(text.contains("skipped       m0"), "{text}");
    assert!(text.contains("would move"), "{text}");

    let out = idemq(&[
        "replay",
        "--queue",
        &q,
        "--store",
        "redis",
        "--reason",
        "max-attempts",
        "--reason",
        "permanent",
        "--limit",
        "5",
        "--json",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(
        (report["moved"].as_u64(), report["end"].as_str()),
        (Some(5), Some("limit-reached"))
    );
    assert_eq!(depths(&config).await, (5, 15));

    let out = idemq(&[
        "replay",
        "--queue",
        &q,
        "--store",
        "redis",
        "--message-id",
        "m17",
        "--json",
    ]);
    let report = json(&out);
    assert_eq!(report["moved"], 1);
    assert_eq!(report["by_reason"]["max-attempts"]["moved"], 1, "{report}");
    assert_eq!(depths(&config).await, (6, 14));

    // Usage errors exit 2 and change nothing.
    let out = idemq(&["replay", "--queue", &q, "--store", "redis", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = idemq(&[
        "replay",
        "--queue",
        &q,
        "--store",
        "redis",
        "--dead-after",
        "yesterday",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = idemq(&[
        "replay", "--queue", &q, "--store", "redis", "--scope", &scope,
    ]);
    assert_eq!(out.status.code(), Some(2), "--scope needs --key-from");
    assert_eq!(depths(&config).await, (6, 14));
    delete_topology(&config).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_an_error_that_creates_nothing() {
    if !services() {
        return;
    }
    let q = format!("idemq-cli.{}", unique_scope("nowhere"));
    let out = idemq(&["replay", "--queue", &q, "--store", "redis"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("queue `{q}` does not exist")),
        "{err}"
    );
    assert!(!err.contains("guest:guest"), "no password in errors: {err}");
    let out = idemq(&["dead", "--queue", &q]);
    assert_eq!(out.status.code(), Some(1));
    // Stats reports the queues as absent, and creates none of them.
    let out = idemq(&["stats", "--queue", &q, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = json(&out);
    assert!(
        stats["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["exists"] == false),
        "{stats}"
    );
    let out = idemq(&["stats", "--queue", &q, "--json"]);
    assert!(
        json(&out)["queues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["exists"] == false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_stats_show_what_is_there_and_change_nothing() {
    if !(services() && reachable("postgres", PG, 5432)) {
        return;
    }
    let store = idemq_postgres::PostgresDedupStore::connect(&url(PG))
        .await
        .expect("pg");
    store.migrate().await.expect("migrate");
    let scope = unique_scope("cli-stats");
    let config = dead_letters(&store, &scope, &ids("d", 12)).await;
    let q = config.queue().to_owned();

    let out = idemq(&["dead", "--queue", &q, "--limit", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("MESSAGE ID"), "{text}");
    assert!(
        text.contains("d0 ") && text.contains("permanent") && text.contains("idemq"),
        "{text}"
    );
    assert!(!text.contains("d5 "), "{text}");
    assert!(text.contains("(5 of 12 shown"), "{text}");
    let out = idemq(&["dead", "--queue", &q, "--json"]);
    let dead = json(&out);
    assert_eq!(dead["depth"], 12);
    let list = dead["dead_letters"].as_array().unwrap();
    let listed: Vec<&str> = list
        .iter()
        .map(|d| d["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ids("d", 12).iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(list[7]["reason"], "max-attempts");
    assert_eq!(list[0]["scope"], scope.as_str());
    assert!(list[0]["age_ms"].as_i64().is_some());

    let out = idemq(&[
        "stats", "--queue", &q, "--store", "postgres", "--scope", &scope, "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = json(&out);
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2 + idemq_rabbitmq::DEFAULT_RETRY_TIERS.len());
    let dlq = queues.iter().find(|q| q["role"] == "dead letters").unwrap();
    assert_eq!(
        (dlq["exists"].as_bool(), dlq["messages"].as_u64()),
        (Some(true), Some(12))
    );
    assert_eq!(
        stats["dead_letters_by_reason"]["permanent (idemq)"], 11,
        "{stats}"
    );
    assert_eq!(stats["dead_letters_by_reason"]["max-attempts (idemq)"], 1);
    assert_eq!(stats["records"]["counts"]["dead"], 12, "{stats}");
    assert_eq!(stats["records"]["counts"]["done"], 0);
    let text = stdout(&idemq(&["stats", "--queue", &q]));
    assert!(
        text.contains("dead letters by reason (12 read and put back)"),
        "{text}"
    );
    assert_eq!(depths(&config).await, (0, 12), "looking changes nothing");
    // The order too.
    let out = idemq(&["dead", "--queue", &q, "--json"]);
    let again: Vec<String> = json(&out)["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(again, ids("d", 12));
    delete_topology(&config).await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_forget_take_the_ids_operators_know() {
    if !reachable("redis", REDIS, 6379) {
        return;
    }
    let store = redis().await;
    let scope = unique_scope("cli-ids");
    let long = "x".repeat(300);
    let ttl = ClaimTtl {
        lease: LONG,
        retain: LONG,
    };
    for id in ["order #1", long.as_str()] {
        let Claim::Claimed(lease) = store
            .claim(&scope, &normalize(id.as_bytes()), ttl)
            .await
            .unwrap()
        else {
            panic!("claim");
        };
        let _ = store.complete(&lease, LONG).await.unwrap();
    }
    // A live lease: a consumer is handling it now.
    let _live = store.claim(&scope, "busy", ttl).await.unwrap();

    let out = idemq(&[
        "inspect", "--store", "redis", "--scope", &scope, "order #1", &long, "busy",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("order #1 (key ~sha256:"), "{text}");
    assert!(text.contains("): done attempts=1"), "{text}");
    assert!(text.contains("busy: claimed attempts=1"), "{text}");
    let out = idemq(&[
        "inspect", "--store", "redis", "--scope", &scope, "--json", "order #1",
    ]);
    let v = json(&out);
    assert_eq!(v[0]["key"], normalize(b"order #1"));
    assert_eq!(v[0]["state"], "done");

    let out = idemq(&[
        "forget", "--store", "redis", "--scope", &scope, "busy", "order #1",
    ]);
    assert_eq!(out.status.code(), Some(1), "a live lease is refused");
    assert!(
        stderr(&out).contains("busy: a consumer holds a live lease"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("busy: refused: live lease"));
    assert!(
        stdout(&out).contains("order #1 (key ~sha256:"),
        "the others are forgotten"
    );
    assert!(store.get(&scope, "busy").await.unwrap().is_some());
    assert_eq!(
        store.get(&scope, &normalize(b"order #1")).await.unwrap(),
        None
    );
    let out = idemq(&[
        "forget", "--store", "redis", "--scope", &scope, "--force", "--json", "busy",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)[0]["result"], "forgotten");
    let key = normalize(long.as_bytes());
    let out = idemq(&[
        "forget", "--store", "redis", "--scope", &scope, "--keys", &key,
    ]);
    assert!(stdout(&out).contains("forgotten"), "{}", stdout(&out));
}

/// Kills replays at random points (SIGKILL, and once SIGINT), handling
/// what reached the work queue between runs; in the end every message was
/// handled exactly once, none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_replays_never_lose_or_double_a_message() {
    if !services() {
        return;
    }
    const N: usize = 2000;
    let store = redis().await;
    let scope = unique_scope("cli-kill");
    let config = dead_letters(&store, &scope, &ids("k", N)).await;
    let q = config.queue().to_owned();
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut exits = Vec::new();
    let mut left = Vec::new();
    for round in 0..6u64 {
        let mut child: Child = command(&[
            "replay", "--queue", &q, "--store", "redis", "--quiet", "--rate", "4000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
        // Kill once the replay is under way (copies reach the work queue),
        // a random moment later: a fixed delay from the spawn would land
        // before the process even connects on a loaded machine.
        let started = tokio::time::Instant::now();
        while started.elapsed() < Duration::from_secs(30)
            && depths(&config).await.0 == 0
            && matches!(child.try_wait(), Ok(None))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wait = Duration::from_millis(rand::random::<u64>() % 150);
        tokio::time::sleep(wait).await;
        if round == 2 {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        } else {
            let _ = child.kill();
        }
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait");
        exits.push(status.code());
        left.push(depths(&config).await.1);
        consume(&config, &store, &scope, &runs).await;
    }
    eprintln!("exit codes {exits:?}, dead letters left after each kill {left:?}");
    assert!(
        left.iter().any(|n| *n > 0 && (*n as usize) < N),
        "no kill landed in the middle of a replay: {left:?}"
    );
    // SIGINT: the replay settles what it has in hand and says it stopped part-way.
    assert!(matches!(exits[2], Some(3) | Some(0)), "{exits:?}");
    let out = idemq(&[
        "replay", "--queue", &q, "--store", "redis", "--quiet", "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    consume(&config, &store, &scope, &runs).await;
    assert_eq!(depths(&config).await, (0, 0), "nothing left anywhere");
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), N, "every message handled");
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    delete_topology(&config).await.expect("cleanup");
}
