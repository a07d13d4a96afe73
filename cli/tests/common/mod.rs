//! Helpers shared by the tests of the `idemq` binary.
#![allow(dead_code)]

use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Output};
use std::time::Duration;

use idemq::testing::service_unavailable;

pub const AMQP: (&str, &str) = ("AMQP_ADDR", "amqp://guest:guest@127.0.0.1:5672/%2f");
pub const REDIS: (&str, &str) = ("REDIS_URL", "redis://127.0.0.1:6379");
pub const PG: (&str, &str) = ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");

pub fn url((env, default): (&str, &str)) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_owned())
}

/// True when the host:port of `service`'s URL accepts a TCP connection;
/// otherwise reports it through `service_unavailable`.
pub fn reachable(name: &str, service: (&str, &str), default_port: u16) -> bool {
    let u = url(service);
    let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let ok = hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if !ok {
        let _: Option<()> = service_unavailable(name, format!("cannot connect to {hostport}"));
    }
    ok
}

/// The `idemq` binary, ready to run.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idemq"));
    cmd.args(args);
    cmd
}

/// Runs `idemq` with `args`; its stderr goes to the test's output.
pub fn idemq(args: &[&str]) -> Output {
    let out = command(args).output().expect("run idemq");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
