//! Shared test helpers: clients for the local emulator, the skip/fail rule.
#![allow(dead_code, unreachable_pub)]

use std::io::Write as _;
use std::time::Duration;

use postbox_sqs::aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use postbox_sqs::SqsBroker;

/// A variable, or `default` when unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// `AWS_ENDPOINT_URL`, default `http://127.0.0.1:4566`.
pub fn endpoint() -> String {
    env_or("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
}

/// Whether an unreachable broker must fail the run.
pub fn brokers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("POSTBOX_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Fails the test (brokers required) or reports a skip by name.
pub fn unreachable(test: &str, why: impl std::fmt::Display) {
    let broker = format!("SQS/SNS at {}", endpoint());
    if brokers_required() {
        panic!("{test}: {broker} is unreachable: {why} (start it with `scripts/brokers.sh up`)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED ({broker} unreachable: {why}; run `scripts/brokers.sh up`, or `scripts/test.sh`)"
    );
}

fn creds() -> Credentials {
    Credentials::new(
        env_or("AWS_ACCESS_KEY_ID", "test"),
        env_or("AWS_SECRET_ACCESS_KEY", "test"),
        None,
        None,
        "postbox-sqs-tests",
    )
}

/// SQS and SNS clients on the local emulator, with short time-outs.
pub fn clients() -> (
    postbox_sqs::aws_sdk_sqs::Client,
    postbox_sqs::aws_sdk_sns::Client,
) {
    let region = Region::new(env_or("AWS_REGION", "us-east-1"));
    let timeouts = postbox_sqs::aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(40))
        .build();
    let sqs = postbox_sqs::aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(region.clone())
        .endpoint_url(endpoint())
        .credentials_provider(creds())
        .timeout_config(timeouts.clone())
        .build();
    let sns = postbox_sqs::aws_sdk_sns::Config::builder()
        .behavior_version(postbox_sqs::aws_sdk_sns::config::BehaviorVersion::latest())
        .region(postbox_sqs::aws_sdk_sns::config::Region::new(env_or(
            "AWS_REGION",
            "us-east-1",
        )))
        .endpoint_url(endpoint())
        .credentials_provider(creds())
        .timeout_config(timeouts)
        .build();
    (
        postbox_sqs::aws_sdk_sqs::Client::from_conf(sqs),
        postbox_sqs::aws_sdk_sns::Client::from_conf(sns),
    )
}

/// A broker on the emulator, or `None` (after reporting) when it is unreachable.
pub async fn broker(test: &str) -> Option<SqsBroker> {
    let (sqs, sns) = clients();
    let broker = SqsBroker::new(sqs, sns);
    match broker.health().await {
        Ok(()) => Some(broker),
        Err(e) => {
            unreachable(test, e);
            None
        }
    }
}

/// A fresh name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}
