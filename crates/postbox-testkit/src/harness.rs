//! What an adapter provides to run the conformance suite.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{BoxSource, DeadLetterOps, Error, Publisher};

/// What an adapter can do; tests that need a missing capability are skipped
/// with a printed reason, never silently.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// A single consumer receives a destination's messages in publish order.
    pub ordered: bool,
    /// Several consumer groups on one topic each get every message.
    pub fan_out: bool,
    /// Consumers of one group/queue split the messages.
    pub competing_consumers: bool,
    /// Unsettled messages survive a consumer closing and come back to the next.
    pub redelivery_on_close: bool,
    /// The broker enforces a header/attribute budget (the number of headers it rejects at).
    pub header_limit: Option<usize>,
    /// The broker enforces a message size limit (bytes).
    pub size_limit: Option<usize>,
    /// Retry delays are honoured by the broker; the test tolerance for them.
    pub delay_tolerance: Duration,
}

impl Capabilities {
    /// Everything an ideal broker can do, with the given delay tolerance.
    pub fn all(delay_tolerance: Duration) -> Self {
        Capabilities {
            ordered: true,
            fan_out: true,
            competing_consumers: true,
            redelivery_on_close: true,
            header_limit: None,
            size_limit: None,
            delay_tolerance,
        }
    }
}

/// An adapter under test: a factory for publishers and sources on a real broker.
///
/// Topology: a *topic* is what publishers publish to; a *group* is a
/// subscription on it (Kafka consumer group, RabbitMQ queue bound to an
/// exchange, SQS queue subscribed to an SNS topic, memory group queue).
/// Sources of one group compete; each group gets every message.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Adapter name for reports.
    fn name(&self) -> &'static str;

    /// What the adapter supports.
    fn capabilities(&self) -> Capabilities;

    /// A publisher.
    fn publisher(&self) -> Arc<dyn Publisher>;

    /// Dead-letter operations (count / peek / replay / purge).
    fn dead_letters(&self) -> Arc<dyn DeadLetterOps>;

    /// Declares `topic` with `groups` so that messages published from now on
    /// are kept for those groups even before anyone subscribes.
    async fn provision(&self, topic: &str, groups: &[&str]) -> Result<(), Error>;

    /// A source for `group` on `topic` (provisioned if needed).
    async fn subscribe(&self, topic: &str, group: &str) -> Result<BoxSource, Error>;

    /// A fresh, unique topic name for a test.
    fn topic(&self, test: &str) -> String {
        format!("{test}-{}", uuid::Uuid::now_v7().simple())
    }
}
