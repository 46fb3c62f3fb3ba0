//! RabbitMQ-specific helpers of the integration tests (the environment and
//! skip helpers are `postbox_testkit::env`).
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use postbox_rabbitmq::{RabbitBroker, RabbitConfig, DEFAULT_URL};
use postbox_testkit::env;

/// `AMQP_URL`, default the local broker of `scripts/brokers.sh`.
pub fn amqp_url() -> String {
    env::var_or("AMQP_URL", DEFAULT_URL)
}

/// A connected broker handle, or `None` after reporting the skip.
pub async fn broker(test: &str) -> Option<RabbitBroker> {
    broker_with(test, RabbitConfig::new(amqp_url())).await
}

/// A connected broker handle with a configuration, or `None` after
/// reporting the skip.
pub async fn broker_with(test: &str, config: RabbitConfig) -> Option<RabbitBroker> {
    let config = config.connect_timeout(Duration::from_secs(5));
    env::connect_or_skip(test, "RabbitMQ", RabbitBroker::connect(config)).await
}
