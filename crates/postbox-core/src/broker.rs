//! The broker handle: one trait every adapter implements, so a service's code
//! names no broker and switching broker is changing a URL.
//!
//! A [`Broker`] publishes (it is a [`Publisher`]), subscribes to a destination
//! with one [`SubscribeOptions`] type, operates dead-letter queues (it is a
//! [`DeadLetterOps`]), reports [`Backlog`] and [`Health`], publishes with a
//! durable delay where the broker can, and closes explicitly
//! ([`Broker::close`]). What a broker cannot do is declared in its
//! [`Capabilities`], never faked: the operation fails with
//! [`ErrorKind::Unsupported`].
//!
//! [`AnyBroker`] is the type-erased handle `postbox::connect(url)` returns.
//!
//! ## Destinations and groups
//!
//! A *destination* is what publishers publish to: a Kafka topic, a RabbitMQ
//! queue (or `exchange:<name>`), an SQS queue (or `sns:<topic>`), a memory
//! queue or topic. A subscription's *group* names the consumers that share the
//! work: consumers of one group compete for messages. Whether two groups on one
//! destination each get every message is [`Capabilities::group_fan_out`]: true
//! on Kafka and memory, and on RabbitMQ `exchange:` and SNS `sns:`
//! destinations (a queue per group, declared and bound by the adapter); a plain
//! queue has one set of competing consumers whatever the group.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::delivery::BoxSource;
use crate::dlq::{DeadLetterOps, ReplayFilter, ReplayReport};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind};
use crate::publisher::{BatchReport, PublishError, Publisher};

/// Where a new consumer group starts reading (Kafka: `auto.offset.reset`).
///
/// Queues (RabbitMQ, SQS, memory) hold what was published before anyone
/// subscribed, so a new subscription always starts with what is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartPosition {
    /// From the oldest retained message (the default: nothing published before
    /// the first subscription is skipped).
    #[default]
    Earliest,
    /// From messages published after the group first subscribed.
    Latest,
}

/// How to subscribe: one options type on every broker.
///
/// ```
/// use postbox_core::{StartPosition, SubscribeOptions};
/// let options = SubscribeOptions::group("billing")
///     .start_from(StartPosition::Earliest)
///     .prefetch(64);
/// assert_eq!(options.group_name(), Some("billing"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    group: Option<String>,
    start: StartPosition,
    prefetch: Option<u16>,
    ordered: bool,
    provision: bool,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            group: None,
            start: StartPosition::Earliest,
            prefetch: None,
            ordered: false,
            provision: true,
        }
    }
}

impl SubscribeOptions {
    /// Options without a group (queues only; Kafka requires a group).
    pub fn new() -> Self {
        Self::default()
    }

    /// Options for consumer group `group`.
    pub fn group(group: impl Into<String>) -> Self {
        Self::default().with_group(group)
    }

    /// Sets the consumer group.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Where a new group starts (default [`StartPosition::Earliest`]).
    pub fn start_from(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// How many messages the broker may hand out ahead of processing
    /// (RabbitMQ prefetch, SQS receive batch, ≤ 10). A hint: adapters keep
    /// their own bounded default when unset.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    /// Requires per-key (Kafka: per-partition, SQS: per-group FIFO) order
    /// from the broker; a destination that cannot keep it (a standard SQS
    /// queue) is refused with [`ErrorKind::Unsupported`].
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    /// Whether `subscribe` declares what the subscription needs (queue or
    /// topic, its dead-letter queue, retry tiers) first. Default `true`; turn
    /// it off where the topology is managed elsewhere.
    pub fn provision(mut self, provision: bool) -> Self {
        self.provision = provision;
        self
    }

    /// The consumer group, if set.
    pub fn group_name(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The start position of a new group.
    pub fn start(&self) -> StartPosition {
        self.start
    }

    /// The prefetch hint, if set.
    pub fn prefetch_hint(&self) -> Option<u16> {
        self.prefetch
    }

    /// Whether per-key order is required.
    pub fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// Whether `subscribe` provisions the topology first.
    pub fn provisions(&self) -> bool {
        self.provision
    }

    /// The group, or a [`ErrorKind::Config`] error naming the broker that needs one.
    pub fn require_group(&self, system: &str) -> Result<&str, Error> {
        self.group_name().ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("a {system} subscription needs a consumer group: SubscribeOptions::group(\"name\")"),
            )
        })
    }
}

/// What a broker can do. Operations outside it fail with
/// [`ErrorKind::Unsupported`]; tests skip by it, printing why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Two groups on one plain destination each get every message (Kafka
    /// consumer groups, memory topics). On RabbitMQ and SQS fan-out is
    /// addressed: `exchange:<name>` and `sns:<topic>` destinations.
    pub group_fan_out: bool,
    /// A single consumer receives a destination's messages in publish order
    /// (per partition on Kafka; on SQS only FIFO queues).
    pub ordered: bool,
    /// Messages a consumer did not settle come back to the next consumer.
    pub redelivery_on_close: bool,
    /// [`Broker::publish_delayed`] is durable on the broker; the longest delay.
    pub scheduled_publish: Option<Duration>,
    /// The largest message body the broker accepts, when it has a limit.
    pub max_message_bytes: Option<usize>,
    /// The most headers/attributes a message may carry, when limited.
    pub max_headers: Option<usize>,
    /// Consumer lag / queue depth is reported by [`Broker::backlog`].
    pub backlog: bool,
}

impl Capabilities {
    /// No capability at all; adapters switch on what they have.
    pub fn none() -> Self {
        Capabilities {
            group_fan_out: false,
            ordered: false,
            redelivery_on_close: false,
            scheduled_publish: None,
            max_message_bytes: None,
            max_headers: None,
            backlog: false,
        }
    }
}

/// Consumer lag of one Kafka partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The high watermark (offset of the next record to be written).
    pub high_watermark: i64,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// High watermark − committed (or − low watermark without a commit).
    pub lag: i64,
}

/// How much a subscription has left to do: queue depth, or consumer lag.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Backlog {
    /// Messages waiting to be delivered: ready messages in the queue, or the
    /// group's lag summed over partitions.
    pub waiting: u64,
    /// Delivered and not settled yet, where the broker reports it.
    pub in_flight: Option<u64>,
    /// Scheduled for later (delayed messages), where the broker reports it.
    pub delayed: Option<u64>,
    /// Consumers attached, where the broker reports it.
    pub consumers: Option<u64>,
    /// Per-partition lag (Kafka); empty elsewhere.
    pub partitions: Vec<PartitionLag>,
}

impl Backlog {
    /// A backlog of `waiting` messages with nothing else known.
    pub fn waiting(waiting: u64) -> Self {
        Backlog {
            waiting,
            ..Backlog::default()
        }
    }

    /// A backlog from per-partition lag (the sum is `waiting`).
    pub fn from_partitions(partitions: Vec<PartitionLag>) -> Self {
        Backlog {
            waiting: partitions.iter().map(|p| p.lag.max(0) as u64).sum(),
            partitions,
            ..Backlog::default()
        }
    }

    /// Everything the destination holds that is not done: waiting, in flight
    /// and delayed.
    pub fn total(&self) -> u64 {
        self.waiting + self.in_flight.unwrap_or(0) + self.delayed.unwrap_or(0)
    }
}

/// What a health check saw: the broker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// `messaging.system` of the broker (`kafka`, `rabbitmq`, `aws_sqs`, `memory`).
    pub system: &'static str,
    /// How long the check took.
    pub latency: Duration,
    /// What the broker reported (cluster size, server version, …), for humans.
    pub detail: String,
}

impl Health {
    /// A health report.
    pub fn new(system: &'static str, latency: Duration, detail: impl Into<String>) -> Self {
        Health {
            system,
            latency,
            detail: detail.into(),
        }
    }
}

/// The broker handle: everything an application and an operator need, on any
/// broker. Implemented by `MemoryBroker`, `KafkaBroker`, `RabbitBroker` and
/// `SqsBroker`; [`AnyBroker`] erases which.
///
/// ```
/// use postbox_core::{Broker, Envelope, SubscribeOptions};
/// async fn service(broker: &dyn Broker) -> Result<(), postbox_core::Error> {
///     broker.provision("orders", &SubscribeOptions::group("billing")).await?;
///     broker.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await?;
///     let _source = broker.subscribe("orders", SubscribeOptions::group("billing")).await?;
///     let backlog = broker.backlog("orders", Some("billing")).await?;
///     println!("{} waiting", backlog.waiting);
///     broker.close().await
/// }
/// ```
#[async_trait]
pub trait Broker: Publisher + DeadLetterOps + Send + Sync + 'static {
    /// `messaging.system`: `kafka`, `rabbitmq`, `aws_sqs` or `memory`.
    fn system(&self) -> &'static str;

    /// What this broker can do.
    fn capabilities(&self) -> Capabilities;

    /// Declares what a subscription of `options`' group on `destination`
    /// needs (queue or topic, its dead-letter queue, retry tiers), so that
    /// messages published from now on are kept for it before anyone
    /// subscribes. Idempotent.
    async fn provision(&self, destination: &str, options: &SubscribeOptions) -> Result<(), Error>;

    /// Subscribes to `destination` (provisioned first unless
    /// [`SubscribeOptions::provision`] is off). Run the source with a
    /// [`Consumer`](crate::Consumer).
    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error>;

    /// What is left to do on `destination` (for `group` where the broker has
    /// groups: Kafka requires one).
    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error>;

    /// Checks that the broker answers.
    async fn health(&self) -> Result<Health, Error>;

    /// Publishes `envelope` to be delivered after `delay`, held durably by the
    /// broker. Brokers without [`Capabilities::scheduled_publish`] refuse with
    /// [`ErrorKind::Unsupported`] and hand the envelope back.
    async fn publish_delayed(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Duration,
    ) -> Result<(), PublishError> {
        let _ = (destination, delay);
        Err(PublishError::new(
            unsupported(self.system(), "scheduled (delayed) publishing"),
            envelope,
        ))
    }

    /// Closes the handle: flushes what producers still hold and closes the
    /// connections. Publishing afterwards fails with [`ErrorKind::Closed`].
    /// Dropping without closing is a safety net that warns, not a plan.
    async fn close(&self) -> Result<(), Error>;
}

/// The [`ErrorKind::Unsupported`] error for `what` on `system`.
pub fn unsupported(system: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("{system} does not support {what}"),
    )
}

/// Any broker, type-erased: what `postbox::connect(url)` returns. Cheap to
/// clone (shared); every clone is the same handle.
///
/// It is a [`Publisher`] and a [`DeadLetterOps`], so it goes wherever those
/// do: `DeadLetterRouter::new(broker.clone())`.
#[derive(Clone)]
pub struct AnyBroker {
    inner: Arc<dyn Broker>,
}

impl fmt::Debug for AnyBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyBroker")
            .field("system", &self.inner.system())
            .finish_non_exhaustive()
    }
}

impl AnyBroker {
    /// Erases a concrete broker handle.
    pub fn new<B: Broker>(broker: B) -> Self {
        AnyBroker {
            inner: Arc::new(broker),
        }
    }
}

#[async_trait]
impl Publisher for AnyBroker {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.inner.publish(destination, envelope).await
    }
    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        self.inner.publish_batch(destination, envelopes).await
    }
}

#[async_trait]
impl DeadLetterOps for AnyBroker {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        self.inner.count(dlq).await
    }
    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        self.inner.peek(dlq, limit).await
    }
    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        self.inner.replay(dlq, filter, limit).await
    }
    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        self.inner.purge(dlq).await
    }
}

#[async_trait]
impl Broker for AnyBroker {
    fn system(&self) -> &'static str {
        self.inner.system()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn provision(&self, destination: &str, options: &SubscribeOptions) -> Result<(), Error> {
        self.inner.provision(destination, options).await
    }
    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error> {
        self.inner.subscribe(destination, options).await
    }
    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error> {
        self.inner.backlog(destination, group).await
    }
    async fn health(&self) -> Result<Health, Error> {
        self.inner.health().await
    }
    async fn publish_delayed(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Duration,
    ) -> Result<(), PublishError> {
        self.inner
            .publish_delayed(destination, envelope, delay)
            .await
    }
    async fn close(&self) -> Result<(), Error> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_default_to_earliest_and_provisioning() {
        let o = SubscribeOptions::new();
        assert_eq!(o.group_name(), None);
        assert_eq!(o.start(), StartPosition::Earliest);
        assert!(o.provisions());
        assert!(!o.is_ordered());
        let err = o.require_group("kafka").unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.message().contains("consumer group"), "{err}");
    }

    #[test]
    fn prefetch_is_at_least_one() {
        assert_eq!(SubscribeOptions::new().prefetch(0).prefetch_hint(), Some(1));
    }

    #[test]
    fn backlog_sums_partition_lag() {
        let lag = |partition, lag| PartitionLag {
            partition,
            high_watermark: 10,
            committed: None,
            lag,
        };
        let b = Backlog::from_partitions(vec![lag(0, 3), lag(1, 4)]);
        assert_eq!(b.waiting, 7);
        assert_eq!(b.total(), 7);
    }

    #[test]
    fn unsupported_names_the_operation() {
        let e = unsupported("kafka", "scheduled (delayed) publishing");
        assert_eq!(e.kind(), &ErrorKind::Unsupported);
        assert!(!e.is_retryable());
        assert!(e.is_permanent());
    }
}
