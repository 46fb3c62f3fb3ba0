//! SQS-specific test helpers: the local emulator's configuration, and a
//! broker on it (skipped by name, or failed, when it is unreachable: see
//! `postbox_testkit::env`).
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use postbox_core::Broker;
use postbox_sqs::{SqsBroker, SqsConfig};
use postbox_testkit::env::{connect_or_skip, var_or};

/// `AWS_ENDPOINT_URL`, default `http://127.0.0.1:4566`.
pub fn endpoint() -> String {
    var_or("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
}

/// The emulator at `endpoint` through an `sqs://` URL, with static test
/// credentials (the emulator accepts any) and short time-outs.
pub fn config_at(endpoint: &str) -> SqsConfig {
    let url = format!(
        "sqs://?endpoint={endpoint}&region={}",
        var_or("AWS_REGION", "us-east-1")
    );
    SqsConfig::from_url(&url)
        .unwrap()
        .credentials(
            var_or("AWS_ACCESS_KEY_ID", "test"),
            var_or("AWS_SECRET_ACCESS_KEY", "test"),
        )
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(40))
}

/// The emulator's configuration.
pub fn config() -> SqsConfig {
    config_at(&endpoint())
}

/// A broker on `config`, checked to answer; `None` (after reporting) when
/// the emulator is unreachable.
pub async fn broker_with(test: &str, config: SqsConfig) -> Option<SqsBroker> {
    let broker = format!("SQS/SNS at {}", endpoint());
    connect_or_skip(test, &broker, async {
        let broker = SqsBroker::connect(config).await?;
        broker.health().await?;
        Ok::<_, postbox_core::Error>(broker)
    })
    .await
}

/// A broker on the emulator with the default settings.
pub async fn broker(test: &str) -> Option<SqsBroker> {
    broker_with(test, config()).await
}

/// The emulator's configuration with short (1 s) long polls, for tests.
pub fn quick() -> SqsConfig {
    config().wait_time(Duration::from_secs(1))
}

/// A broker on the emulator with short long polls (or `$config`), or a skip
/// (the test returns).
#[allow(unused_macros)]
macro_rules! broker_or_skip {
    ($test:expr) => {
        broker_or_skip!($test, common::quick())
    };
    ($test:expr, $config:expr) => {
        match common::broker_with($test, $config).await {
            Some(b) => b,
            None => return,
        }
    };
}
