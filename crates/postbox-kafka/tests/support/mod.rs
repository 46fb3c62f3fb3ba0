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

/// A TCP proxy in front of a broker that a test can cut off: while cut, every
/// open connection is closed and new ones are closed as soon as they are
/// accepted — to the client, the broker is gone; its storage is not.
pub struct CutProxy {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: u16) -> CutProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy port");
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        continue;
                    };
                    let task = tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    let mut conns = conns.lock().unwrap();
                    conns.retain(|c| !c.is_finished());
                    conns.push(task.abort_handle());
                }
            })
        };
        CutProxy {
            port,
            cut,
            conns,
            accept,
        }
    }

    /// Cuts the broker off: closes every connection, refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A tansu broker process of a test's own (the binary `scripts/brokers.sh`
/// runs, `POSTBOX_TANSU_BIN`), in-memory storage, advertised behind a
/// [`CutProxy`] so that every client connection goes through it. Killed
/// when dropped.
pub struct OwnTansu {
    child: std::process::Child,
    pub proxy: CutProxy,
}

impl OwnTansu {
    /// Starts one, or `None` (skip printed; a failure with `CI`/
    /// `POSTBOX_REQUIRE_BROKERS`) without a tansu binary.
    pub async fn start(test: &str) -> Option<OwnTansu> {
        let Some(bin) = std::env::var("POSTBOX_TANSU_BIN")
            .ok()
            .filter(|b| !b.is_empty())
        else {
            unreachable(
                test,
                "a Kafka broker of the test's own",
                "POSTBOX_TANSU_BIN is not set (`eval \"$(scripts/brokers.sh env)\"`)",
            );
            return None;
        };
        // A free port for the broker (taken, then given back to it).
        let broker_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let proxy = CutProxy::start(broker_port).await;
        let log = std::env::temp_dir().join(format!("postbox-{test}-tansu-{broker_port}.log"));
        let out = std::fs::File::create(&log).expect("tansu log");
        let child = std::process::Command::new(&bin)
            .args([
                "broker",
                "--cluster-id",
                &format!("postbox-{test}"),
                "--listener-url",
                &format!("tcp://127.0.0.1:{broker_port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", proxy.port),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env_remove("CLUSTER_ID")
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: starting {bin} failed: {e}"));
        let own = OwnTansu { child, proxy };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", broker_port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{test}: tansu did not listen within 20 s (log: {})",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(own)
    }

    /// The bootstrap address (the proxy).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port)
    }
}

impl Drop for OwnTansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
