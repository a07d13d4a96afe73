//! Service URLs, and the same URLs pointed at a fault proxy.

use std::net::SocketAddr;

use url::Url;

/// The RabbitMQ URL: `AMQP_ADDR` or the local default.
pub fn amqp_url() -> String {
    std::env::var(idemq_rabbitmq::URL_ENV).unwrap_or_else(|_| idemq_rabbitmq::DEFAULT_URL.into())
}

/// The Postgres URL: `DATABASE_URL` or the local test database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The Redis URL: `REDIS_URL` or the local default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A service's URL and the address it listens on.
#[derive(Clone, Debug)]
pub struct Service {
    url: Url,
    /// Where the server listens (what the fault proxies forward to).
    pub upstream: SocketAddr,
}

impl Service {
    /// Parses `raw` and resolves its host (`default_port` when it names
    /// none). The error never shows the URL's password.
    pub async fn resolve(raw: &str, default_port: u16) -> Result<Service, String> {
        let url = Url::parse(raw).map_err(|e| format!("invalid URL: {e}"))?;
        let host = url.host_str().ok_or("the URL names no host")?.to_owned();
        let port = url.port().unwrap_or(default_port);
        let upstream = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}:{port} has no address"))?;
        Ok(Service { url, upstream })
    }

    /// The URL itself.
    pub fn direct(&self) -> String {
        self.url.to_string()
    }

    /// The URL with host and port replaced by `proxy`.
    pub fn via(&self, proxy: SocketAddr) -> String {
        let mut url = self.url.clone();
        // Both succeed on URLs with an authority, which `resolve` checked.
        let _ = url.set_host(Some(&proxy.ip().to_string()));
        let _ = url.set_port(Some(proxy.port()));
        url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn via_swaps_host_and_port_only() {
        let s = Service::resolve("amqp://guest:guest@127.0.0.1:5672/%2f", 5672)
            .await
            .unwrap();
        let proxy: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(s.via(proxy), "amqp://guest:guest@127.0.0.1:40001/%2f");
        let s = Service::resolve("postgres://postgres@127.0.0.1/test", 5432)
            .await
            .unwrap();
        assert_eq!(s.upstream.port(), 5432);
        assert_eq!(s.via(proxy), "postgres://postgres@127.0.0.1:40001/test");
    }
}
