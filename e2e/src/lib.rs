//! idemq end to end (not published): the examples that run the engine on
//! RabbitMQ with Redis or Postgres dedup, the tests that do the same, and
//! the engine benchmark. They live in their own package so that the core
//! crate's quickstart builds none of the backends' client libraries.
//!
//! ```text
//! cargo run -p idemq-e2e --example rabbitmq_redis
//! cargo run -p idemq-e2e --example rabbitmq_postgres
//! cargo run -p idemq-e2e --example producer -- 1000
//! cargo run -p idemq-e2e --example prometheus   # metrics on http://127.0.0.1:9464/metrics
//! cargo bench -p idemq-e2e --bench engine
//! ```
