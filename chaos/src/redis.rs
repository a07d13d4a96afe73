//! Redis mode: each engine's store is a `RedisDedupStore` whose connection
//! goes through its store proxy; the handler's effect is recorded outside
//! the dedup store (in the test process, which the chaos does not touch),
//! so effects are at least once: duplicates are counted, each with its
//! cause, not failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use idemq::testing::service_unavailable;
use idemq::{DedupStore, Handler, HandlerError, Message};
use idemq_redis::redis;
use idemq_redis::{RedisConfig, RedisDedupStore};

use crate::harness::{Mode, probe};
use crate::net::{Service, redis_url};
use crate::outcome::{Decision, decide};
use crate::settings::Settings;
use crate::track::{Effect, Tracker, id_of};

/// The Redis side of a run.
pub struct RedisMode {
    service: Service,
    prefix: String,
    inspector: RedisDedupStore,
    settings: Settings,
}

impl RedisMode {
    /// Connects straight to Redis (for the clean-up), or answers `None`
    /// (skip) when it is unreachable.
    pub async fn setup(settings: &Settings) -> Option<RedisMode> {
        let service = match Service::resolve(&redis_url(), 6379).await {
            Ok(s) => s,
            Err(e) => return service_unavailable("redis", e),
        };
        if let Err(e) = probe(service.upstream).await {
            return service_unavailable("redis", e);
        }
        let prefix = format!("idemq-chaos-{:08x}:", rand::random::<u32>());
        let config = RedisConfig::new().with_prefix(prefix.clone());
        let inspector = match RedisDedupStore::connect_with(&service.direct(), config).await {
            Ok(s) => s,
            Err(e) => return service_unavailable("redis", e),
        };
        Some(RedisMode {
            service,
            prefix,
            inspector,
            settings: settings.clone(),
        })
    }
}

#[async_trait]
impl Mode for RedisMode {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn exactly_once(&self) -> bool {
        false
    }

    fn store_upstream(&self) -> SocketAddr {
        self.service.upstream
    }

    async fn engine_parts(
        &self,
        via: SocketAddr,
        engine: usize,
        inc: u32,
        tracker: &Arc<Tracker>,
    ) -> Result<(Arc<dyn DedupStore>, Arc<dyn Handler>), String> {
        let config = RedisConfig::new()
            .with_prefix(self.prefix.clone())
            .with_response_timeout(self.settings.store_timeout)
            .with_connection_timeout(self.settings.store_timeout);
        let store = RedisDedupStore::connect_lazy(&self.service.via(via), config)
            .map_err(|e| format!("redis store: {e}"))?;
        let tracker = tracker.clone();
        let handler = move |msg: Message| {
            let tracker = tracker.clone();
            async move {
                let id = id_of(&msg)?;
                match decide(id, msg.attempt()) {
                    Decision::Succeed => {
                        tracker.effect(
                            id,
                            Effect {
                                engine,
                                inc,
                                attempt: msg.attempt(),
                                token: msg.lease().token.0,
                            },
                        );
                        Ok(())
                    }
                    Decision::Retry => Err(HandlerError::retry("transient failure (by design)")),
                    Decision::Permanent => Err(HandlerError::permanent("poison (by design)")),
                }
            }
        };
        Ok((Arc::new(store), Arc::new(handler)))
    }

    async fn effects(&self, tracker: &Tracker) -> Result<HashMap<u32, Vec<Effect>>, String> {
        Ok(tracker.effects())
    }

    async fn cleanup(&self) -> Result<(), String> {
        let mut conn = self.inspector.connection_manager();
        let pattern = format!("{}*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("SCAN {pattern}: {e}"))?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("DEL: {e}"))?;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }
}
