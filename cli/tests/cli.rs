//! End-to-end tests of the `idemq` binary against the real services.
//! Each skips (or fails under `IDEMQ_REQUIRE_SERVICES=1`) when a service
//! is unreachable.

mod common;

use std::time::Duration;

use common::{AMQP, PG, REDIS, idemq, reachable, stdout, url};
use idemq::testing::unique_scope;
use idemq::{Claim, ClaimTtl, DedupStore};

#[test]
fn bench_small_run_is_correct_for_every_config() {
    if !(reachable("rabbitmq", AMQP, 5672)
        && reachable("redis", REDIS, 6379)
        && reachable("postgres", PG, 5432))
    {
        return;
    }
    let dir = std::env::temp_dir().join(unique_scope("idemq-cli-bench"));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let out = idemq(&[
        "bench",
        "--messages",
        "500",
        "--fail-percent",
        "4",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    print!("{}", stdout(&out));
    assert!(out.status.success(), "bench failed: {out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let unique = report["unique"].as_u64().unwrap();
    let failing = report["failing_unique"].as_u64().unwrap();
    assert_eq!(unique, 450);
    assert_eq!(failing, 18);
    let results = report["results"].as_array().unwrap();
    for config in ["memory", "redis", "postgres", "postgres-tx"] {
        let r = results
            .iter()
            .find(|r| r["name"] == config)
            .unwrap_or_else(|| panic!("{config} missing from {report}"));
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["handled"].as_u64(), Some(unique - failing), "{r}");
        assert_eq!(r["failed"].as_u64(), Some(failing), "{r}");
        assert_eq!(r["messages"].as_u64(), Some(500), "{r}");
        assert!(r["unique_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ratio_to_baseline"].as_f64().unwrap() > 0.0, "{r}");
    }
    for baseline in ["baseline-bare", "baseline-redis", "baseline-postgres"] {
        let r = results.iter().find(|r| r["name"] == baseline).unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("postgres-tx"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a done record for `key` through `store`, then checks that
/// `inspect` shows it, `forget` deletes it and `inspect` then finds nothing.
async fn inspect_then_forget<S: DedupStore>(store: &S, kind: &str, extra: &[&str]) {
    let scope = unique_scope("cli");
    let ttl = ClaimTtl {
        lease: Duration::from_secs(60),
        retain: Duration::from_secs(600),
    };
    let Claim::Claimed(lease) = store.claim(&scope, "order-1", ttl).await.unwrap() else {
        panic!("fresh key not claimed");
    };
    let _ = store
        .complete(&lease, Duration::from_secs(600))
        .await
        .unwrap();
    let args = |cmd: &'static str| {
        let mut a = vec![cmd, "--store", kind, "--scope", scope.as_str()];
        a.extend_from_slice(extra);
        a.extend(["order-1", "order-2"]);
        a
    };
    let out = idemq(&args("inspect"));
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("order-1: done attempts=1"), "{text}");
    assert!(text.contains("order-2: absent"), "{text}");

    let out = idemq(&args("forget"));
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("order-1: forgotten"), "{text}");
    assert!(text.contains("order-2: was not there"), "{text}");

    let out = idemq(&args("inspect"));
    assert!(stdout(&out).contains("order-1: absent"));
    assert_eq!(store.get(&scope, "order-1").await.unwrap(), None);
}

#[tokio::test]
async fn inspect_and_forget_on_redis() {
    if !reachable("redis", REDIS, 6379) {
        return;
    }
    let store = idemq_redis::RedisDedupStore::connect(&url(REDIS))
        .await
        .unwrap();
    inspect_then_forget(&store, "redis", &[]).await;
}

#[tokio::test]
async fn inspect_forget_and_purge_on_postgres() {
    if !reachable("postgres", PG, 5432) {
        return;
    }
    let store = idemq_postgres::PostgresDedupStore::connect(&url(PG))
        .await
        .unwrap()
        .with_table("idemq_cli_test")
        .unwrap();
    store.migrate().await.unwrap();
    inspect_then_forget(&store, "postgres", &["--table", "idemq_cli_test"]).await;
    let out = idemq(&["purge", "--table", "idemq_cli_test", "--batch", "100"]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("purged "), "{}", stdout(&out));
}

#[test]
fn rejects_bad_arguments() {
    let out = idemq(&["bench", "--configs", "nope"]);
    assert!(!out.status.success());
    let out = idemq(&["inspect", "--store", "redis", "--scope", "s"]);
    assert!(!out.status.success());
}
