//! Helpers for postbox's integration tests against real brokers.
//!
//! Addresses come from the variables `scripts/brokers.sh env` prints, with the
//! same loopback defaults. A broker that cannot be reached fails a test when
//! `CI=true` or `POSTBOX_REQUIRE_BROKERS=1` (as `scripts/test.sh` sets);
//! otherwise the test reports `SKIPPED` with the reason, by name, on stderr.

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

pub use postbox_testkit::env::{brokers_required, unique, unreachable, var_or as env_or};
