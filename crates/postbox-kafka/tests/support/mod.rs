//! Test support: broker reachability (skip or fail), the conformance
//! harness for tansu and for librdkafka's mock cluster.
#![allow(dead_code, unreachable_pub)]

use std::io::Write as _;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{BoxSource, DeadLetterOps, Error, Publisher};
use postbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use postbox_kafka::rdkafka::mocking::MockCluster;
use postbox_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use postbox_kafka::{
    KafkaConfig, KafkaOps, KafkaPublisher, KafkaSource, RetryTiers, Topology, TopologySpec,
};
use postbox_testkit::{Capabilities, Harness};

/// `KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "127.0.0.1:9092".to_string())
}

/// Whether an unreachable broker must fail the run.
pub fn brokers_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("POSTBOX_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Fails (brokers required) or prints a skip by name.
pub fn unreachable(test: &str, broker: &str, why: impl std::fmt::Display) {
    if brokers_required() {
        panic!("{test}: {broker} is unreachable: {why} (start it with `scripts/brokers.sh up`)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED ({broker} unreachable: {why}; run `scripts/brokers.sh up`, or `scripts/test.sh`)"
    );
}

/// Whether the Kafka broker at `bootstrap` answers a metadata request.
pub fn reachable(bootstrap: &str) -> Result<(), String> {
    let c: BaseConsumer = KafkaConfig::new(bootstrap)
        .client_config()
        .create()
        .map_err(|e| e.to_string())?;
    c.fetch_metadata(None, Duration::from_secs(5))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A tansu harness, or `None` (skip printed) when the broker is unreachable.
pub async fn tansu_or_skip(test: &str, partitions: i32) -> Option<KafkaHarness> {
    let b = bootstrap();
    let b2 = b.clone();
    match tokio::task::spawn_blocking(move || reachable(&b2))
        .await
        .unwrap()
    {
        Ok(()) => Some(KafkaHarness::tansu(&b, partitions)),
        Err(e) => {
            unreachable(test, &format!("Kafka (tansu) at {b}"), e);
            None
        }
    }
}

/// Retry tiers small enough for tests.
pub fn test_tiers() -> RetryTiers {
    RetryTiers::new([Duration::from_secs(1), Duration::from_secs(10)])
}

/// Client settings for tests: quick group joins and fetches. On tansu,
/// `batch.num.messages=1` keeps its "latest offset" exact (BROKERS.md).
pub fn test_config(bootstrap: &str, tansu: bool) -> KafkaConfig {
    let mut c = KafkaConfig::new(bootstrap)
        .retry_tiers(test_tiers())
        .set("linger.ms", "1")
        .revoke_timeout(Duration::from_secs(5));
    if tansu {
        c = c.set("batch.num.messages", "1");
    }
    c
}

/// Consumer settings added at subscribe time.
pub fn consumer_config(config: &KafkaConfig) -> KafkaConfig {
    config
        .clone()
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        // Bounds how long a rebalance waits for a member that left mid-join
        // (the JoinGroup rebalance time-out).
        .set("max.poll.interval.ms", "10000")
        .set("fetch.wait.max.ms", "100")
        .set("fetch.queue.backoff.ms", "10")
}

enum MockCmd {
    CreateTopic(String, i32),
    BrokerDown(i32),
    BrokerUp(i32),
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
    Clear(RDKafkaApiKey),
}

type Reply = mpsc::Sender<Result<(), String>>;

/// librdkafka's mock cluster, owned by a thread of its own (it is not `Send`).
///
/// Every command waits until the mock thread has applied it, so a test that
/// injects a fault and then acts sees the fault (fire-and-forget commands
/// raced the client's next request).
pub struct MockKafka {
    pub bootstrap: String,
    tx: std::sync::Mutex<mpsc::Sender<(MockCmd, Reply)>>,
}

impl MockKafka {
    /// Starts a mock cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> MockKafka {
        let (tx, rx) = mpsc::channel::<(MockCmd, Reply)>();
        let (btx, brx) = mpsc::channel();
        std::thread::spawn(move || {
            let mock = MockCluster::new(brokers).expect("mock cluster");
            btx.send(mock.bootstrap_servers()).unwrap();
            while let Ok((cmd, reply)) = rx.recv() {
                let done = match cmd {
                    MockCmd::CreateTopic(name, partitions) => mock
                        .create_topic(&name, partitions, 1)
                        .map_err(|e| e.to_string()),
                    MockCmd::BrokerDown(id) => mock.broker_down(id).map_err(|e| e.to_string()),
                    MockCmd::BrokerUp(id) => mock.broker_up(id).map_err(|e| e.to_string()),
                    MockCmd::RequestErrors(api, errs) => {
                        mock.request_errors(api, &errs);
                        Ok(())
                    }
                    MockCmd::Clear(api) => {
                        mock.clear_request_errors(api);
                        Ok(())
                    }
                };
                let _ = reply.send(done);
            }
        });
        let bootstrap = brx.recv().expect("mock bootstrap");
        MockKafka {
            bootstrap,
            tx: std::sync::Mutex::new(tx),
        }
    }

    /// Runs `cmd` on the mock thread and waits until it is applied.
    fn run(&self, cmd: MockCmd) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .lock()
            .unwrap()
            .send((cmd, tx))
            .map_err(|_| "the mock cluster thread is gone".to_string())?;
        rx.recv().map_err(|e| e.to_string())?
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        self.run(MockCmd::CreateTopic(name.to_string(), partitions))
    }

    /// Takes a broker down.
    pub fn broker_down(&self, id: i32) {
        self.run(MockCmd::BrokerDown(id)).expect("mock broker down");
    }

    /// Brings a broker back.
    pub fn broker_up(&self, id: i32) {
        self.run(MockCmd::BrokerUp(id)).expect("mock broker up");
    }

    /// Makes the next requests of `api` fail with `errs`.
    pub fn request_errors(&self, api: RDKafkaApiKey, errs: Vec<RDKafkaRespErr>) {
        self.run(MockCmd::RequestErrors(api, errs))
            .expect("mock request errors");
    }

    /// Clears injected request errors.
    pub fn clear(&self, api: RDKafkaApiKey) {
        self.run(MockCmd::Clear(api)).expect("mock clear");
    }
}

/// The conformance harness: topic = Kafka topic (with its retry tiers and
/// DLQ), group = consumer group `<topic>.<group>`.
pub struct KafkaHarness {
    pub config: KafkaConfig,
    pub publisher: KafkaPublisher,
    pub ops: KafkaOps,
    pub partitions: i32,
    pub mock: Option<Arc<MockKafka>>,
    topology: Option<Topology>,
    name: &'static str,
}

impl KafkaHarness {
    /// Against tansu at `bootstrap`, topics with `partitions` partitions.
    pub fn tansu(bootstrap: &str, partitions: i32) -> Self {
        let config = test_config(bootstrap, true);
        let publisher = KafkaPublisher::new(&config).expect("publisher");
        KafkaHarness {
            ops: KafkaOps::with_publisher(&config, publisher.clone()).expect("ops"),
            topology: Some(Topology::new(&config).expect("admin")),
            publisher,
            config,
            partitions,
            mock: None,
            name: if partitions == 1 {
                "kafka-tansu-1p"
            } else {
                "kafka-tansu"
            },
        }
    }

    /// Against a fresh in-process mock cluster.
    pub fn mock(partitions: i32) -> Self {
        let mock = Arc::new(MockKafka::start(1));
        let config = test_config(&mock.bootstrap, false);
        let publisher = KafkaPublisher::new(&config).expect("publisher");
        KafkaHarness {
            ops: KafkaOps::with_publisher(&config, publisher.clone()).expect("ops"),
            topology: None,
            publisher,
            config,
            partitions,
            mock: Some(mock),
            name: "kafka-mock",
        }
    }

    /// The consumer group id of `group` on `topic`.
    pub fn group_id(topic: &str, group: &str) -> String {
        format!("{topic}.{group}")
    }

    /// A source with the harness settings.
    pub async fn source(&self, topic: &str, group: &str) -> Result<KafkaSource, Error> {
        KafkaSource::builder(
            &consumer_config(&self.config),
            topic,
            Self::group_id(topic, group),
        )
        .publisher(self.publisher.clone())
        .build()
        .await
    }

    /// Creates the topic, its retry tiers and DLQ.
    pub async fn create(&self, topic: &str) -> Result<(), Error> {
        let spec = TopologySpec::new(self.partitions, 1);
        match (&self.topology, &self.mock) {
            (Some(t), _) => t.ensure_consumer_topology(topic, &spec).await,
            (None, Some(mock)) => {
                let mut names = vec![topic.to_string(), format!("{topic}.dlq")];
                names.extend(self.config_tiers().topics(topic));
                for n in names {
                    mock.create_topic(&n, self.partitions)
                        .map_err(|e| Error::new(postbox_core::ErrorKind::Other, e))?;
                }
                Ok(())
            }
            (None, None) => unreachable!("a harness has a topology or a mock"),
        }
    }

    fn config_tiers(&self) -> RetryTiers {
        test_tiers()
    }
}

#[async_trait]
impl Harness for KafkaHarness {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::all(Duration::from_millis(1500));
        // Global publish order needs a single partition; competing consumers
        // need at least two.
        caps.ordered = self.partitions == 1;
        caps.competing_consumers = self.partitions > 1;
        caps.size_limit = Some(self.publisher.max_message_bytes());
        caps
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.publisher.clone())
    }

    fn dead_letters(&self) -> Arc<dyn DeadLetterOps> {
        Arc::new(self.ops.clone())
    }

    async fn provision(&self, topic: &str, _groups: &[&str]) -> Result<(), Error> {
        // Groups without a commit start at the earliest offset: they keep
        // everything published from now on.
        self.create(topic).await
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<BoxSource, Error> {
        Ok(Box::new(self.source(topic, group).await?))
    }
}
