//! What an adapter provides to run the conformance suite.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use postbox_core::{
    AnyBroker, BoxSource, Broker, DeadLetterOps, Error, Publisher, SubscribeOptions,
};

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

    /// Writes ONE message to `topic` (a topic of this harness, the
    /// destination the suite publishes to) that claims to be a CloudEvent
    /// but breaks the format (for example `specversion` 0.3), bypassing
    /// postbox's encoder, and returns the body bytes written: a consumer
    /// must dead-letter it with reason `decode`, its body unchanged, before
    /// any handler runs.
    ///
    /// `Ok(None)` (the default) when the adapter cannot carry such input (it
    /// moves envelopes, never bytes): the suite skips the case.
    async fn publish_undecodable(&self, topic: &str) -> Result<Option<Vec<u8>>, Error> {
        let _ = topic;
        Ok(None)
    }

    /// The subscribe options this harness uses for `group` (what
    /// [`Harness::subscribe`] passes to its broker), so a source can be
    /// subscribed the same way through another handle
    /// ([`Harness::reconnect`]). Default `SubscribeOptions::group(group)`.
    fn subscribe_options(&self, group: &str) -> SubscribeOptions {
        group_options(group)
    }

    /// A SECOND, independent handle on the same broker: its own connections
    /// (and producers, channels, clients), sharing nothing with the handle
    /// the harness publishes and subscribes through, so that a test can close
    /// it (drop its connections) while the harness's own handle goes on, as a
    /// process that exits does. Topics and groups of this harness are valid
    /// on it, subscribed with [`Harness::subscribe_options`]; the caller
    /// closes it.
    ///
    /// `Ok(None)` (the default) when the adapter has no connection to drop
    /// (an in-process broker): the suite then uses the harness itself.
    async fn reconnect(&self) -> Result<Option<AnyBroker>, Error> {
        Ok(None)
    }
}

fn group_options(group: &str) -> SubscribeOptions {
    SubscribeOptions::group(group)
}

type TopicFn = Box<dyn Fn(&str) -> String + Send + Sync>;
type OptionsFn = Box<dyn Fn(&str) -> SubscribeOptions + Send + Sync>;
type UndecodableFn =
    Box<dyn Fn(String) -> BoxFuture<'static, Result<Vec<u8>, Error>> + Send + Sync>;
type ReconnectFn = Box<dyn Fn() -> BoxFuture<'static, Result<AnyBroker, Error>> + Send + Sync>;

/// The harness of any broker handle: the suite runs through the [`Broker`]
/// trait (provision, subscribe, publish, dead-letter operations), so an
/// adapter declares only its handle, its capabilities and how test topics
/// are named.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # use std::time::Duration;
/// # use postbox_core::AnyBroker;
/// # fn any() -> AnyBroker { unimplemented!() }
/// # if false {
/// use postbox_testkit::{BrokerHarness, Capabilities};
/// let harness = BrokerHarness::new("my-broker", any(), Capabilities::all(Duration::from_millis(500)))
///     .topics(|test| format!("exchange:{test}"));
/// # let _ = harness;
/// # }
/// # }
/// ```
pub struct BrokerHarness {
    name: &'static str,
    broker: AnyBroker,
    capabilities: Capabilities,
    topic: TopicFn,
    options: OptionsFn,
    undecodable: Option<UndecodableFn>,
    reconnect: Option<ReconnectFn>,
}

impl BrokerHarness {
    /// A harness on `broker`, with fresh topics `<test>-<uuid>` and groups
    /// subscribed with `SubscribeOptions::group(group)`.
    pub fn new(name: &'static str, broker: impl Broker, capabilities: Capabilities) -> Self {
        BrokerHarness {
            name,
            broker: AnyBroker::new(broker),
            capabilities,
            topic: Box::new(crate::env::unique),
            options: Box::new(group_options),
            undecodable: None,
            reconnect: None,
        }
    }

    /// Names the topic of a test (called with the test's name; must be fresh).
    pub fn topics(mut self, topic: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.topic = Box::new(topic);
        self
    }

    /// The subscribe options of a group (default `SubscribeOptions::group(group)`).
    pub fn options(
        mut self,
        options: impl Fn(&str) -> SubscribeOptions + Send + Sync + 'static,
    ) -> Self {
        self.options = Box::new(options);
        self
    }

    /// Installs [`Harness::publish_undecodable`]: `write` is called with a
    /// harness topic (the destination string the suite publishes to), writes
    /// ONE message there that claims to be a CloudEvent but breaks the
    /// format, bypassing postbox's encoder (a raw client of the broker), and
    /// returns the body bytes it wrote. Without it the harness reports that
    /// it cannot carry such input and the suite's case is skipped.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use postbox_core::AnyBroker;
    /// # fn any() -> AnyBroker { unimplemented!() }
    /// # if false {
    /// use futures_util::FutureExt as _;
    /// use postbox_testkit::{BrokerHarness, Capabilities};
    /// let harness = BrokerHarness::new("my-broker", any(), Capabilities::all(Duration::from_millis(500)))
    ///     .undecodable(|topic: String| {
    ///         async move {
    ///             let body = br#"{"specversion":"0.3","id":"x","type":"t","source":"s"}"#.to_vec();
    ///             // … write `body` raw to `topic` …
    ///             Ok(body)
    ///         }
    ///         .boxed()
    ///     });
    /// # let _ = harness;
    /// # }
    /// ```
    pub fn undecodable(
        mut self,
        write: impl Fn(String) -> BoxFuture<'static, Result<Vec<u8>, Error>> + Send + Sync + 'static,
    ) -> Self {
        self.undecodable = Some(Box::new(write));
        self
    }

    /// Installs [`Harness::reconnect`]: `connect` opens a SECOND,
    /// independent handle on the same broker as the harness's own (the same
    /// configuration, its own connections; wrapped the same way as the
    /// harness's handle if the harness wraps it), which the suite closes
    /// when it is done with it. Without it the harness reports that it has
    /// no second handle and the suite uses the harness itself.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use postbox_core::AnyBroker;
    /// # fn any() -> AnyBroker { unimplemented!() }
    /// # async fn connect_again() -> Result<AnyBroker, postbox_core::Error> { unimplemented!() }
    /// # if false {
    /// use futures_util::FutureExt as _;
    /// use postbox_testkit::{BrokerHarness, Capabilities};
    /// let harness = BrokerHarness::new("my-broker", any(), Capabilities::all(Duration::from_millis(500)))
    ///     .reconnect(|| {
    ///         async move {
    ///             // … connect a new handle with the same configuration …
    ///             connect_again().await
    ///         }
    ///         .boxed()
    ///     });
    /// # let _ = harness;
    /// # }
    /// ```
    pub fn reconnect(
        mut self,
        connect: impl Fn() -> BoxFuture<'static, Result<AnyBroker, Error>> + Send + Sync + 'static,
    ) -> Self {
        self.reconnect = Some(Box::new(connect));
        self
    }

    /// The broker handle under test.
    pub fn broker(&self) -> &AnyBroker {
        &self.broker
    }
}

#[async_trait]
impl Harness for BrokerHarness {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.broker.clone())
    }

    fn dead_letters(&self) -> Arc<dyn DeadLetterOps> {
        Arc::new(self.broker.clone())
    }

    async fn provision(&self, topic: &str, groups: &[&str]) -> Result<(), Error> {
        for group in groups {
            self.broker.provision(topic, &(self.options)(group)).await?;
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<BoxSource, Error> {
        self.broker.subscribe(topic, (self.options)(group)).await
    }

    fn topic(&self, test: &str) -> String {
        (self.topic)(test)
    }

    async fn publish_undecodable(&self, topic: &str) -> Result<Option<Vec<u8>>, Error> {
        match &self.undecodable {
            Some(write) => write(topic.to_string()).await.map(Some),
            None => Ok(None),
        }
    }

    fn subscribe_options(&self, group: &str) -> SubscribeOptions {
        (self.options)(group)
    }

    async fn reconnect(&self) -> Result<Option<AnyBroker>, Error> {
        match &self.reconnect {
            Some(connect) => connect().await.map(Some),
            None => Ok(None),
        }
    }
}
