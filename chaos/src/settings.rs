//! The knobs of a chaos run: short by default (what `cargo test
//! --workspace` runs), long through environment variables.

use std::time::Duration;

/// How many distinct ids a run publishes (about a tenth more messages
/// with the duplicates). Default 1,400.
pub const MESSAGES_ENV: &str = "IDEMQ_CHAOS_MESSAGES";
/// How long the chaos lasts, in seconds (publishing spans the first 80 %
/// of it). Default 30.
pub const SECS_ENV: &str = "IDEMQ_CHAOS_SECS";
/// The seed of the chaos schedule and of the random faults. Default random
/// (printed in the summary, so a run can be repeated).
pub const SEED_ENV: &str = "IDEMQ_CHAOS_SEED";
/// How long one engine is cut off from its store, in seconds. Default 15,
/// or 20 when the chaos lasts 90 s or more.
pub const PARTITION_ENV: &str = "IDEMQ_CHAOS_PARTITION_SECS";

/// One run's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Distinct message ids published.
    pub ids: u32,
    /// How long the chaos driver runs.
    pub chaos: Duration,
    /// How long the partitioned engine is cut off from its store.
    pub partition: Duration,
    /// The claim lease: twice the partition, so that the partition alone
    /// never lets a lease lapse (a lease lost then would be a false one).
    pub lease: Duration,
    /// Seed of the schedule and of the random faults.
    pub seed: u64,
    /// Engines consuming the queue.
    pub engines: usize,
    /// Each engine's concurrency.
    pub concurrency: usize,
    /// Handler runs allowed per id.
    pub max_attempts: u32,
    /// Each engine's shutdown grace.
    pub shutdown_grace: Duration,
    /// What a graceful shutdown may take beyond the grace: one store
    /// operation timeout plus the settlements.
    pub shutdown_slack: Duration,
    /// Store operation timeout (Postgres) / response timeout (Redis).
    pub store_timeout: Duration,
    /// A live message copy whose handler is not running, left untouched
    /// this long (not taken, handled or settled) while the work queue is
    /// empty, is held hostage: in a consumer's prefetch, or taken and held
    /// while its engine backs off from a store that does not answer, while
    /// other engines sit idle. Longer than any single link fault the driver
    /// injects (3 s at most; an engine gets 3 s of healthy links after each
    /// before its next) plus a store timeout, shorter than the partition.
    pub stuck_after: Duration,
    /// How long a broker may stay disconnected once its link is restored:
    /// the recovery bound of the RabbitMQ backend (`max_recovery_time`,
    /// 15 s) plus 5 s.
    pub reconnect_bound: Duration,
    /// How long the end of the run waits for the queues to drain.
    pub drain_timeout: Duration,
}

fn env_u64(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    match raw.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={raw:?} is not a whole number"),
    }
}

impl Settings {
    /// The short run, with whatever the environment overrides.
    pub fn from_env() -> Settings {
        let ids = env_u64(MESSAGES_ENV).unwrap_or(1_400).max(50) as u32;
        let chaos = Duration::from_secs(env_u64(SECS_ENV).unwrap_or(30).max(20));
        let default_partition = if chaos >= Duration::from_secs(90) {
            20
        } else {
            15
        };
        let partition = Duration::from_secs(
            env_u64(PARTITION_ENV)
                .unwrap_or(default_partition)
                .clamp(10, 60),
        );
        let seed = env_u64(SEED_ENV).unwrap_or_else(rand::random);
        Settings {
            ids,
            chaos,
            partition,
            lease: partition * 2,
            seed,
            engines: 3,
            concurrency: 8,
            max_attempts: 4,
            shutdown_grace: Duration::from_secs(3),
            shutdown_slack: Duration::from_secs(5),
            store_timeout: Duration::from_secs(2),
            stuck_after: Duration::from_secs(8),
            reconnect_bound: Duration::from_secs(20),
            drain_timeout: partition * 2 + Duration::from_secs(60),
        }
    }
}
