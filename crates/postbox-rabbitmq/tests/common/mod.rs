//! Shared helpers of the RabbitMQ integration tests.
#![allow(dead_code, unreachable_pub)]

use std::io::Write as _;
use std::time::Duration;

use postbox_rabbitmq::{RabbitConfig, RabbitMq};

/// `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Whether an unreachable broker must fail the run.
pub fn brokers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("POSTBOX_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Fails the test (brokers required) or reports a skip by name.
pub fn unreachable(test: &str, why: impl std::fmt::Display) {
    if brokers_required() {
        panic!("{test}: RabbitMQ is unreachable: {why} (start it with `scripts/brokers.sh up`)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED (RabbitMQ unreachable: {why}; run `scripts/brokers.sh up`)"
    );
}

/// A connected client, or `None` after reporting the skip.
pub async fn client(test: &str) -> Option<RabbitMq> {
    client_with(test, RabbitConfig::new(amqp_url())).await
}

/// A connected client with a configuration, or `None` after reporting the skip.
pub async fn client_with(test: &str, config: RabbitConfig) -> Option<RabbitMq> {
    let config = config.connect_timeout(Duration::from_secs(5));
    match RabbitMq::connect(config).await {
        Ok(c) => Some(c),
        Err(e) => {
            unreachable(test, e);
            None
        }
    }
}

/// A name no other run uses.
pub fn unique(prefix: &str) -> String {
    format!("pb-{prefix}-{}", uuid::Uuid::now_v7().simple())
}
