//! The broker handle: one cheap-to-clone value holding the configuration,
//! the producer, the DLQ/lag/health operations and the admin client.

use std::sync::Arc;

use async_trait::async_trait;
use postbox_core::dlq::{DeadLetterOps, ReplayFilter, ReplayReport};
use postbox_core::{
    Backlog, BatchReport, BoxSource, Broker, Capabilities, Envelope, Error, ErrorKind, Health,
    PublishError, Publisher, SubscribeOptions,
};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaConfig;
use crate::consumer::KafkaSource;
use crate::ops::KafkaOps;
use crate::publisher::{KafkaPublisher, SYSTEM};
use crate::topology::Admin;

/// A Kafka cluster: publishes, subscribes consumer groups, provisions
/// topics, operates dead-letter topics, reports lag and health. Cheap to
/// clone: every clone shares one producer, one operations consumer and one
/// admin client.
///
/// * Publishing: idempotent producer, `acks=all`; `publish` resolves on the
///   delivery report; CloudEvents binary mode (`ce_*` headers, record key =
///   partition key); the size is checked against `message.max.bytes` first.
/// * [`subscribe`](Broker::subscribe) (or [`source`](KafkaBroker::source) for
///   the concrete [`KafkaSource`]): the topic is the destination, the group
///   is the Kafka consumer group (required); provisions the topic, its retry
///   tier topics and its DLQ first unless the options turn it off.
/// * Dead letters: `<topic>.dlq`; [`DeadLetterOps`] counts, peeks, replays
///   and purges them.
/// * [`backlog`](Broker::backlog): the group's lag per partition.
///
/// ```no_run
/// use postbox_core::{Broker, Envelope, Publisher, SubscribeOptions};
/// use postbox_kafka::{KafkaBroker, KafkaConfig};
/// # #[tokio::main] async fn main() -> Result<(), postbox_core::Error> {
/// let broker = KafkaBroker::connect(KafkaConfig::from_url("kafka://127.0.0.1:9092")?).await?;
/// broker.provision("orders", &SubscribeOptions::group("billing")).await?;
/// broker.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await?;
/// let lag = broker.backlog("orders", Some("billing")).await?;
/// println!("{} waiting", lag.waiting);
/// broker.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    publisher: KafkaPublisher,
    ops: KafkaOps,
    admin: Arc<Admin>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBroker {
    /// Creates the clients of `config` and checks that the cluster answers
    /// (a metadata request, bounded by the request time-out).
    ///
    /// An invalid or unknown librdkafka property is an [`ErrorKind::Config`]
    /// error; an unreachable cluster a retryable [`ErrorKind::Connection`]
    /// error.
    pub async fn connect(config: KafkaConfig) -> Result<Self, Error> {
        let publisher = KafkaPublisher::new(&config)?;
        let ops = KafkaOps::new(&config, publisher.clone())?;
        let admin = Arc::new(Admin::new(&config)?);
        let broker = KafkaBroker {
            inner: Arc::new(Inner {
                config,
                publisher,
                ops,
                admin,
            }),
        };
        broker.inner.ops.health().await?;
        Ok(broker)
    }

    /// [`connect`](Self::connect) with [`KafkaConfig::from_env`]
    /// (`KAFKA_BOOTSTRAP_SERVERS`; unset is an [`ErrorKind::Config`] error
    /// naming it).
    pub async fn from_env() -> Result<Self, Error> {
        Self::connect(KafkaConfig::from_env()?).await
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The native producer (statistics, transactions, flushing).
    pub fn producer(&self) -> &FutureProducer {
        self.inner.publisher.producer()
    }

    /// The concrete source behind [`Broker::subscribe`]: consumer group
    /// `options`' group on `topic` and its retry tier topics (provisioned
    /// first unless the options turn it off), starting at `options`' start
    /// position when the group has no committed offset.
    pub async fn source(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<KafkaSource, Error> {
        let group = options.require_group(SYSTEM)?;
        self.check_open()?;
        if options.provisions() {
            self.provision(topic, &options).await?;
        }
        KafkaSource::open(
            &self.inner.config,
            topic,
            group,
            options.start(),
            self.inner.publisher.clone(),
        )
    }

    /// The topics provisioning creates for `topic` under the configured
    /// [`TopologySpec`](crate::TopologySpec): the topic, its retry tiers, its
    /// DLQ.
    pub fn topic_names(&self, topic: &str) -> Vec<String> {
        self.inner
            .admin
            .topic_names(topic, &self.inner.config.topology)
    }

    /// Deletes topics (missing ones are ignored).
    pub async fn delete_topics(&self, names: &[&str]) -> Result<(), Error> {
        self.inner.admin.delete_topics(names).await
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.publisher.is_closed() {
            return Err(Error::new(
                ErrorKind::Closed,
                "the Kafka broker handle is closed",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.inner.publisher.publish(destination, envelope).await
    }

    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        self.inner
            .publisher
            .publish_batch(destination, envelopes)
            .await
    }
}

#[async_trait]
impl DeadLetterOps for KafkaBroker {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        self.inner.ops.count(dlq).await
    }

    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        self.inner.ops.peek(dlq, limit).await
    }

    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        self.inner.ops.replay(dlq, filter, limit).await
    }

    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        self.inner.ops.purge(dlq).await
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    /// Group fan-out, order per partition, redelivery of what a closed member
    /// did not commit, lag as backlog, `message.max.bytes` as the size
    /// limit; no scheduled publishing (Kafka has no per-message delay).
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.group_fan_out = true;
        caps.ordered = true;
        caps.redelivery_on_close = true;
        caps.backlog = true;
        caps.max_message_bytes = Some(self.inner.publisher.max_message_bytes());
        caps
    }

    /// Creates the topic, its retry tier topics and its DLQ as the configured
    /// [`TopologySpec`](crate::TopologySpec) says, those that do not exist
    /// yet (no creation is asked for when all exist). The group needs nothing
    /// declared: a group without a committed offset starts at its
    /// [`StartPosition`](postbox_core::StartPosition), the earliest by
    /// default, so it keeps everything published from now on.
    async fn provision(&self, destination: &str, _options: &SubscribeOptions) -> Result<(), Error> {
        self.check_open()?;
        let spec = &self.inner.config.topology;
        let names = self.inner.admin.topic_names(destination, spec);
        self.inner.admin.ensure_topics(&names, spec).await
    }

    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error> {
        Ok(Box::new(self.source(destination, options).await?))
    }

    /// The group's lag on `destination`, per partition (high watermark −
    /// committed offset, or − low watermark without a commit). Kafka needs
    /// the group; a topic that does not exist is [`ErrorKind::NotFound`].
    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error> {
        let Some(group) = group else {
            return Err(Error::new(
                ErrorKind::Config,
                "the backlog of a Kafka topic is a consumer group's lag: name the group",
            ));
        };
        let lag = self.inner.ops.lag(destination, group).await?;
        if lag.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no Kafka topic named {destination:?}"),
            ));
        }
        Ok(Backlog::from_partitions(lag))
    }

    /// A metadata request; the detail counts the brokers and topics seen.
    /// Unreachable is a retryable [`ErrorKind::Connection`] error.
    async fn health(&self) -> Result<Health, Error> {
        self.check_open()?;
        self.inner.ops.health().await
    }

    /// Refuses new records, then waits (up to the request time-out) for the
    /// delivery reports of those already queued. Sources are closed on their
    /// own ([`Source::close`](postbox_core::Source::close)); close them first:
    /// their retry copies go through this handle's producer.
    async fn close(&self) -> Result<(), Error> {
        self.inner
            .publisher
            .close(self.inner.config.request_timeout)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BOOTSTRAP_ENV;

    // The only test of this crate's unit tests that touches the environment.
    #[tokio::test]
    async fn from_env_without_the_variable_is_a_config_error_naming_it() {
        let saved = std::env::var_os(BOOTSTRAP_ENV);
        std::env::remove_var(BOOTSTRAP_ENV);
        let config = KafkaConfig::from_env().unwrap_err();
        let broker = KafkaBroker::from_env().await.unwrap_err();
        if let Some(v) = saved {
            std::env::set_var(BOOTSTRAP_ENV, v);
        }
        for e in [config, broker] {
            assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
            assert!(e.message().contains(BOOTSTRAP_ENV), "{e}");
        }
    }
}
