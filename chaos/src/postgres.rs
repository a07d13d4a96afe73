//! Postgres transactional mode: each engine's store is a
//! `PostgresDedupStore` on a pool of its own that goes through its store
//! proxy, and the handler is `transactional`: its effect row and the done
//! mark commit in one transaction. The effects table has no unique key,
//! so a duplicate effect shows as a second row.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idemq::testing::service_unavailable;
use idemq::{DedupStore, Handler, HandlerError, Message};
use idemq_postgres::sqlx::postgres::PgPoolOptions;
use idemq_postgres::sqlx::{self, AssertSqlSafe, PgConnection, PgPool};
use idemq_postgres::{PostgresDedupStore, sql_error};

use crate::harness::{Mode, probe};
use crate::net::{Service, database_url};
use crate::outcome::{Decision, decide};
use crate::settings::Settings;
use crate::track::{Effect, Tracker, id_of};

/// The Postgres side of a run.
pub struct PostgresMode {
    service: Service,
    admin: PgPool,
    dedup_table: String,
    effects_table: String,
    insert: Arc<str>,
    settings: Settings,
}

impl PostgresMode {
    /// Creates the run's dedup and effects tables, or answers `None`
    /// (skip) when Postgres is unreachable.
    pub async fn setup(settings: &Settings) -> Option<PostgresMode> {
        let service = match Service::resolve(&database_url(), 5432).await {
            Ok(s) => s,
            Err(e) => return service_unavailable("postgres", e),
        };
        if let Err(e) = probe(service.upstream).await {
            return service_unavailable("postgres", e);
        }
        let admin = match PostgresDedupStore::connect(&service.direct()).await {
            Ok(store) => store.pool().clone(),
            Err(e) => return service_unavailable("postgres", e),
        };
        let run = format!("{:08x}", rand::random::<u32>());
        let dedup_table = format!("idemq_chaos_dedup_{run}");
        let effects_table = format!("idemq_chaos_effects_{run}");
        PostgresDedupStore::new(admin.clone())
            .with_table(&dedup_table)
            .expect("a valid table name")
            .migrate()
            .await
            .expect("create the dedup table");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {effects_table} (id bigint NOT NULL, engine int NOT NULL, \
             inc int NOT NULL, attempt int NOT NULL, token bigint NOT NULL, \
             at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )))
        .execute(&admin)
        .await
        .expect("create the effects table");
        let insert = format!(
            "INSERT INTO {effects_table} (id, engine, inc, attempt, token) \
             VALUES ($1, $2, $3, $4, $5)"
        )
        .into();
        Some(PostgresMode {
            service,
            admin,
            dedup_table,
            effects_table,
            insert,
            settings: settings.clone(),
        })
    }
}

#[async_trait]
impl Mode for PostgresMode {
    fn name(&self) -> &'static str {
        "postgres-tx"
    }

    fn exactly_once(&self) -> bool {
        true
    }

    fn store_upstream(&self) -> SocketAddr {
        self.service.upstream
    }

    async fn engine_parts(
        &self,
        via: SocketAddr,
        engine: usize,
        inc: u32,
        _tracker: &Arc<Tracker>,
    ) -> Result<(Arc<dyn DedupStore>, Arc<dyn Handler>), String> {
        let s = &self.settings;
        // Each engine its own pool, as separate processes would have; more
        // connections than handlers, since a stalled handler holds one in
        // its open transaction while claims need others.
        let pool = PgPoolOptions::new()
            .max_connections(s.concurrency as u32 * 2 + 2)
            .acquire_timeout(s.store_timeout)
            .connect_lazy(&self.service.via(via))
            .map_err(|e| format!("postgres pool: {e}"))?;
        let store = PostgresDedupStore::new(pool)
            .with_table(&self.dedup_table)
            .map_err(|e| e.to_string())?
            .with_op_timeout(s.store_timeout);
        let insert = self.insert.clone();
        let handler = store.transactional(move |tx: &mut PgConnection, msg: Message| {
            let insert = insert.clone();
            Box::pin(async move {
                let id = id_of(&msg)?;
                // Written first, whatever the outcome: a failed run's row
                // must roll back with it.
                sqlx::query(AssertSqlSafe(insert))
                    .bind(i64::from(id))
                    .bind(engine as i32)
                    .bind(inc as i32)
                    .bind(msg.attempt() as i32)
                    .bind(i64::from_ne_bytes(msg.lease().token.0.to_ne_bytes()))
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_error)?;
                match decide(id, msg.attempt()) {
                    Decision::Succeed => Ok(()),
                    Decision::Retry => Err(HandlerError::retry("transient failure (by design)")),
                    Decision::Permanent => Err(HandlerError::permanent("poison (by design)")),
                }
            })
        });
        Ok((Arc::new(store), Arc::new(handler)))
    }

    async fn effects(&self, _tracker: &Tracker) -> Result<HashMap<u32, Vec<Effect>>, String> {
        let rows: Vec<(i64, i32, i32, i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, engine, inc, attempt, token FROM {} ORDER BY at",
            self.effects_table
        )))
        .fetch_all(&self.admin)
        .await
        .map_err(|e| format!("reading {}: {e}", self.effects_table))?;
        let mut out: HashMap<u32, Vec<Effect>> = HashMap::new();
        for (id, engine, inc, attempt, token) in rows {
            out.entry(id as u32).or_default().push(Effect {
                engine: engine as usize,
                inc: inc as u32,
                attempt: attempt as u32,
                token: u64::from_ne_bytes(token.to_ne_bytes()),
            });
        }
        Ok(out)
    }

    async fn cleanup(&self) -> Result<(), String> {
        let steps = [
            format!("DROP TABLE IF EXISTS {}", self.effects_table),
            format!("DROP TABLE IF EXISTS {}", self.dedup_table),
        ];
        for sql in steps {
            sqlx::query(AssertSqlSafe(sql.clone()))
                .execute(&self.admin)
                .await
                .map_err(|e| format!("{sql}: {e}"))?;
        }
        sqlx::query("DELETE FROM idemq_migrations WHERE table_name = $1")
            .bind(&self.dedup_table)
            .execute(&self.admin)
            .await
            .map_err(|e| format!("forgetting the migrations of {}: {e}", self.dedup_table))?;
        tokio::time::timeout(Duration::from_secs(5), self.admin.close())
            .await
            .ok();
        Ok(())
    }
}
