//! Helpers for postbox's integration tests against real brokers.
//!
//! Addresses come from the variables `scripts/brokers.sh env` prints, with the
//! same loopback defaults. A broker that cannot be reached fails a test when
//! `CI=true` or `POSTBOX_REQUIRE_BROKERS=1` (as `scripts/test.sh` sets);
//! otherwise the test reports `SKIPPED` with the reason, by name, on stderr.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// `KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`.
pub fn kafka_bootstrap() -> String {
    env_or("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
}

/// `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn amqp_url() -> String {
    env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// `AWS_ENDPOINT_URL`, default `http://127.0.0.1:4566`.
pub fn aws_endpoint() -> String {
    env_or("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
}

/// `DATABASE_URL`, default `postgres://postgres:postgres@127.0.0.1:5432/postbox`.
pub fn database_url() -> String {
    env_or(
        "DATABASE_URL",
        "postgres://postgres:postgres@127.0.0.1:5432/postbox",
    )
}

/// A variable, or `default` when unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Whether an unreachable broker must fail the run (`CI=true` or
/// `POSTBOX_REQUIRE_BROKERS=1`).
pub fn brokers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("POSTBOX_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Fails the test (brokers required) or reports a skip by name (brokers optional).
pub fn unreachable(test: &str, broker: &str, why: impl std::fmt::Display) {
    if brokers_required() {
        panic!("{test}: {broker} is unreachable: {why} (start it with `scripts/brokers.sh up`)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED ({broker} unreachable: {why}; run `scripts/brokers.sh up`, or `scripts/test.sh`)"
    );
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{prefix}-{nanos}-{}", std::process::id())
}
