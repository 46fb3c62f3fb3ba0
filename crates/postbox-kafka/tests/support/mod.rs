//! Test support: the test clients' settings, tansu and librdkafka's mock
//! cluster as brokers under test, the tansu close ordering, a proxy that
//! cuts a broker off, and a tansu of a test's own.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::delay::DelayTiers;
use postbox_core::dlq::{ReplayFilter, ReplayReport};
use postbox_core::{
    Backlog, BatchReport, BoxSource, Broker, Capabilities, DeadLetterOps, Envelope, Error, Health,
    PublishError, Publisher, Source, SubscribeOptions,
};
use postbox_kafka::rdkafka::mocking::MockCluster;
use postbox_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use postbox_kafka::{
    KafkaBroker, KafkaConfig, KafkaDelivery, KafkaSource, TopologySpec, BOOTSTRAP_ENV,
};
use postbox_testkit::env;

/// `KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`.
pub fn bootstrap() -> String {
    env::var_or(BOOTSTRAP_ENV, "127.0.0.1:9092")
}

/// Retry tiers small enough for tests.
pub fn test_tiers() -> DelayTiers {
    DelayTiers::new([Duration::from_secs(1), Duration::from_secs(10)]).expect("non-empty tiers")
}

/// How often test members heartbeat (`heartbeat.interval.ms`).
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// Client settings for tests: topics of `partitions` partitions, quick group
/// joins and fetches. On tansu, `batch.num.messages=1` keeps its "latest
/// offset" exact (it is the last batch's base offset + 1).
pub fn test_config(bootstrap: &str, tansu: bool, partitions: i32) -> KafkaConfig {
    let mut c = KafkaConfig::new(bootstrap)
        .retry_tiers(test_tiers())
        .topology(TopologySpec::new(partitions, 1))
        .revoke_timeout(Duration::from_secs(5))
        .set("linger.ms", "1")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", HEARTBEAT.as_millis().to_string())
        // Bounds how long a rebalance waits for a member that left mid-join
        // (the JoinGroup rebalance time-out).
        .set("max.poll.interval.ms", "10000")
        .set("fetch.wait.max.ms", "100")
        .set("fetch.queue.backoff.ms", "10");
    if tansu {
        c = c.set("batch.num.messages", "1");
    }
    c
}

/// A broker on the shared tansu, or `None` (skip printed; a failure under
/// `CI`/`POSTBOX_REQUIRE_BROKERS`) when it is unreachable.
pub async fn tansu_or_skip(test: &str, partitions: i32) -> Option<TestKafka> {
    let b = bootstrap();
    let connect = KafkaBroker::connect(test_config(&b, true, partitions));
    let broker = env::connect_or_skip(test, &format!("Kafka (tansu) at {b}"), connect).await?;
    Some(TestKafka {
        broker,
        mock: None,
        partitions,
    })
}

/// A broker on a fresh in-process mock cluster of one broker, with the test
/// settings changed by `adjust`.
pub async fn mock(partitions: i32, adjust: impl FnOnce(KafkaConfig) -> KafkaConfig) -> TestKafka {
    let mock = Arc::new(MockKafka::start(1));
    let config = adjust(test_config(&mock.bootstrap, false, partitions));
    let broker = KafkaBroker::connect(config).await.expect("mock cluster");
    TestKafka {
        broker,
        mock: Some(mock),
        partitions,
    }
}

/// A broker under test, with its mock cluster when it runs on one.
pub struct TestKafka {
    pub broker: KafkaBroker,
    pub mock: Option<Arc<MockKafka>>,
    pub partitions: i32,
}

impl TestKafka {
    /// The consumer group id of `group` on `topic`.
    pub fn group_id(topic: &str, group: &str) -> String {
        format!("{topic}.{group}")
    }

    /// Creates the topic, its retry tiers and DLQ (on the mock cluster
    /// through the mock: it has no CreateTopics).
    pub async fn create(&self, topic: &str) -> Result<(), Error> {
        match &self.mock {
            Some(mock) => mock.create_topology(&self.broker, topic, self.partitions),
            None => {
                self.broker
                    .provision(topic, &SubscribeOptions::group("any"))
                    .await
            }
        }
    }

    /// A source of group `<topic>.<group>` (the topology is created by
    /// [`TestKafka::create`]).
    pub async fn source(&self, topic: &str, group: &str) -> Result<KafkaSource, Error> {
        let options = SubscribeOptions::group(Self::group_id(topic, group)).provision(false);
        self.broker.source(topic, options).await
    }

    /// The committed offset of each partition of `topic` for `group`.
    pub async fn committed(&self, topic: &str, group: &str) -> Vec<Option<i64>> {
        let backlog = self
            .broker
            .backlog(topic, Some(&Self::group_id(topic, group)))
            .await
            .unwrap();
        backlog.partitions.iter().map(|p| p.committed).collect()
    }
}

/// The testkit capabilities of a broker on topics of `partitions`
/// partitions: global publish order needs a single partition, competing
/// consumers at least two.
pub fn testkit_capabilities(
    broker: &KafkaBroker,
    partitions: i32,
) -> postbox_testkit::Capabilities {
    let declared = broker.capabilities();
    let mut caps = postbox_testkit::Capabilities::all(Duration::from_millis(1500));
    caps.fan_out = declared.group_fan_out;
    caps.redelivery_on_close = declared.redelivery_on_close;
    caps.ordered = declared.ordered && partitions == 1;
    caps.competing_consumers = partitions > 1;
    caps.size_limit = declared.max_message_bytes;
    caps.header_limit = declared.max_headers;
    caps
}

/// How long a source closed before its first assignment keeps taking part
/// in its group before it leaves anyway.
const JOIN_BEFORE_LEAVE: Duration = Duration::from_secs(30);

/// Taken by a source closed before its first assignment while it waits for
/// its group to be steady and leaves: one such leave at a time per process.
static LEAVE_TURN: AtomicBool = AtomicBool::new(false);

struct LeaveTurn;

impl LeaveTurn {
    fn try_take() -> Option<LeaveTurn> {
        LEAVE_TURN
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| LeaveTurn)
    }
}

impl Drop for LeaveTurn {
    fn drop(&mut self) {
        LEAVE_TURN.store(false, Ordering::SeqCst);
    }
}

/// Closes a source the way tansu needs. tansu's group coordinator mishandles
/// a member that leaves in the middle of its first join, or while the group
/// rebalances: it keeps the departed member as the leader of a generation
/// that never syncs, and the group's remaining members never get a partition
/// (a real Kafka coordinator removes the member and completes the
/// rebalance). So a source closed before its first assignment first finishes
/// its join, takes this process's turn, waits until no rebalance event came
/// for two heartbeats (what it takes to notice one that the previous leave
/// started) while it holds an assignment, and only then closes; all within
/// [`JOIN_BEFORE_LEAVE`]. Meanwhile it polls the native consumer (a member
/// that does not poll holds its group's rebalances up): the records read
/// that way are not tracked, so never committed, and the next owner reads
/// them.
pub async fn close_on_tansu(source: KafkaSource) -> Result<(), Error> {
    if source.rebalances() > 0 {
        return source.close().await;
    }
    let deadline = tokio::time::Instant::now() + JOIN_BEFORE_LEAVE;
    while source.rebalances() == 0 && tokio::time::Instant::now() < deadline {
        poll_for(&source, Duration::from_millis(50)).await;
    }
    let turn = loop {
        if let Some(turn) = LeaveTurn::try_take() {
            break Some(turn);
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
        poll_for(&source, Duration::from_millis(50)).await;
    };
    while tokio::time::Instant::now() < deadline {
        let seen = source.rebalances();
        poll_for(&source, HEARTBEAT * 2).await;
        if source.rebalances() == seen && source.is_assigned() {
            break;
        }
    }
    let closed = source.close().await;
    drop(turn);
    closed
}

/// Polls the native consumer of `source` for `d`, dropping the records.
async fn poll_for(source: &KafkaSource, d: Duration) {
    let polling = async {
        loop {
            drop(source.native().recv().await);
        }
    };
    let _ = tokio::time::timeout(d, polling).await;
}

/// The broker handle on tansu for the conformance suite: a [`KafkaBroker`]
/// whose sources close the way tansu needs ([`close_on_tansu`]).
#[derive(Clone)]
pub struct OnTansu(pub KafkaBroker);

/// A source of [`OnTansu`].
pub struct TansuSource(Option<KafkaSource>);

impl Source for TansuSource {
    type Delivery = KafkaDelivery;

    async fn next(&mut self) -> Option<Result<KafkaDelivery, Error>> {
        self.0.as_mut()?.next().await
    }

    fn system(&self) -> &'static str {
        postbox_kafka::SYSTEM
    }

    fn destination(&self) -> &str {
        self.0.as_ref().map_or("", |s| s.destination())
    }

    async fn close(mut self) -> Result<(), Error> {
        match self.0.take() {
            Some(source) => close_on_tansu(source).await,
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Publisher for OnTansu {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.0.publish(destination, envelope).await
    }
    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        self.0.publish_batch(destination, envelopes).await
    }
}

#[async_trait]
impl DeadLetterOps for OnTansu {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        self.0.count(dlq).await
    }
    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        self.0.peek(dlq, limit).await
    }
    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        self.0.replay(dlq, filter, limit).await
    }
    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        self.0.purge(dlq).await
    }
}

#[async_trait]
impl Broker for OnTansu {
    fn system(&self) -> &'static str {
        self.0.system()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn provision(&self, destination: &str, options: &SubscribeOptions) -> Result<(), Error> {
        self.0.provision(destination, options).await
    }
    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error> {
        let source = self.0.source(destination, options).await?;
        Ok(Box::new(TansuSource(Some(source))))
    }
    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error> {
        self.0.backlog(destination, group).await
    }
    async fn health(&self) -> Result<Health, Error> {
        self.0.health().await
    }
    async fn close(&self) -> Result<(), Error> {
        self.0.close().await
    }
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

    /// Creates what `broker` provisions for `topic`: the topic, its retry
    /// tiers, its DLQ (the mock cluster has no CreateTopics, so the broker's
    /// own provisioning finds them all there and creates nothing).
    pub fn create_topology(
        &self,
        broker: &KafkaBroker,
        topic: &str,
        partitions: i32,
    ) -> Result<(), Error> {
        for name in broker.topic_names(topic) {
            self.create_topic(&name, partitions)
                .map_err(|e| Error::new(postbox_core::ErrorKind::Other, e))?;
        }
        Ok(())
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
            env::unreachable(
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
