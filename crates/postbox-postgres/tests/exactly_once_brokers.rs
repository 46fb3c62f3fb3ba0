//! Exactly-once *effect* on real brokers with **real process kills**:
//! producer → outbox → relays → broker → consumer *process* with the
//! transactional Postgres idempotency variant → a table. One test per broker
//! (SQS, Kafka, RabbitMQ), the same scenario for each:
//!
//! 20,000 orders are written through the outbox (in transactions); two
//! relays in this process publish them to a destination of the broker (an SQS
//! queue, a Kafka topic of 4 partitions, a RabbitMQ quorum queue). The
//! consumer runs in a **child process**: the broker's source feeding the
//! consumer runtime, whose handler is a [`TransactionalLayer`] inserting one
//! row per order into `applied`, a table *without* a unique constraint, so a
//! double apply would show. The child is killed with SIGKILL (`Child::kill`)
//! 4–6 times at random moments and restarted; relays are aborted and
//! restarted too (wire duplicates). What a killed consumer held comes back:
//! on SQS after the queue's short visibility timeout, on Kafka because its
//! uncommitted offsets are read again by the restarted member of the same
//! group, on RabbitMQ because the broker requeues the unacked messages of a
//! closed connection. At the end `applied` holds exactly 20,000 rows, each
//! order once; the outbox is empty, nothing is left on the broker and nothing
//! was dead-lettered.
//!
//! The brokers differ only in a [`Broker`] implementation (connect and
//! health-check, declare the destination, the relays' publisher, the
//! consumer's source, what is left, clean-up); the scenario is
//! [`exactly_once_effect`].
//!
//! **The child process.** This test target has no libtest harness
//! (`harness = false` in Cargo.toml): the same binary is the consumer
//! program when started with `POSTBOX_EO_ROLE=consumer` (see [`consumer`]),
//! so the child is always built with, and exactly as fresh as, the test.
//! Otherwise `main` runs the tests like libtest would (name filters,
//! `--exact`, `--skip`, `--list`, a `test result:` line).
//!
//! A test is skipped by name when its broker or PostgreSQL is unreachable;
//! it fails instead when `CI=true` or `POSTBOX_REQUIRE_BROKERS=1`.
//! `POSTBOX_EO_SEED` replays the random choices (kill count and moments) of
//! a printed seed.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{broker_unreachable, connect, count, drop_schema, exec, Counting, Effect};
use postbox_core::{BoxSource, Envelope, Error, ErrorKind, PublishError, Publisher};
use postbox_postgres::{Outbox, Postgres, SentRows};
use postbox_sqs::{QueueSpec, SqsBroker, SqsConfig};

const ORDERS: usize = 20_000;
const CUSTOMERS: usize = 64;
/// Orders per producer transaction.
const PRODUCER_TX: usize = 250;
/// Consumer process kills: 4 to 6, chosen at random.
const KILLS: std::ops::RangeInclusive<usize> = 4..=6;
const RELAY_KILLS: usize = 2;
/// The SQS queue's (and the consumer's) visibility timeout: what a killed
/// consumer held becomes visible again after this.
const VISIBILITY: Duration = Duration::from_secs(8);
/// How long the last consumer has to finish the work once everything was produced.
const FINISH_WITHIN: Duration = Duration::from_secs(170);

/// Selects the consumer role of this binary.
const ROLE_ENV: &str = "POSTBOX_EO_ROLE";
/// The consumer's broker: a [`Kind::name`].
const BROKER_ENV: &str = "POSTBOX_EO_BROKER";
const SCHEMA_ENV: &str = "POSTBOX_EO_SCHEMA";
/// The queue or topic consumed.
const DESTINATION_ENV: &str = "POSTBOX_EO_DESTINATION";
/// Replays a printed seed.
const SEED_ENV: &str = "POSTBOX_EO_SEED";

fn main() -> ExitCode {
    if std::env::var(ROLE_ENV).as_deref() == Ok("consumer") {
        return consumer::main();
    }
    harness::main()
}

/// The brokers, one test each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqs,
    Kafka,
    RabbitMq,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Sqs, Kind::Kafka, Kind::RabbitMq];

    /// As in the test name and in `POSTBOX_EO_BROKER`.
    fn name(self) -> &'static str {
        match self {
            Kind::Sqs => "sqs",
            Kind::Kafka => "kafka",
            Kind::RabbitMq => "rabbitmq",
        }
    }

    fn test_name(self) -> &'static str {
        match self {
            Kind::Sqs => "exactly_once_effect_sqs_with_process_kills",
            Kind::Kafka => "exactly_once_effect_kafka_with_process_kills",
            Kind::RabbitMq => "exactly_once_effect_rabbitmq_with_process_kills",
        }
    }

    /// The broker and where it is, for messages.
    fn broker(self) -> String {
        match self {
            Kind::Sqs => format!("SQS at {}", endpoint()),
            Kind::Kafka => format!("Kafka at {}", kafka::bootstrap()),
            Kind::RabbitMq => format!("RabbitMQ at {}", rabbitmq::redacted_url()),
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The test (this process).
    async fn test(self) {
        match self {
            Kind::Sqs => exactly_once_effect::<sqs::Sqs>().await,
            Kind::Kafka => exactly_once_effect::<kafka::Kafka>().await,
            Kind::RabbitMq => exactly_once_effect::<rabbitmq::Rabbit>().await,
        }
    }

    /// The consumer program (the child process).
    async fn consume(self, schema: String, destination: String) -> Result<(), Error> {
        match self {
            Kind::Sqs => consumer::run::<sqs::Sqs>(schema, destination).await,
            Kind::Kafka => consumer::run::<kafka::Kafka>(schema, destination).await,
            Kind::RabbitMq => consumer::run::<rabbitmq::Rabbit>(schema, destination).await,
        }
    }
}

/// What is still on the broker for the destination.
#[derive(Debug)]
struct Left {
    /// Messages not consumed and settled yet (retry copies included).
    pending: u64,
    /// Messages dead-lettered.
    dead: u64,
    /// What was looked at, for the messages.
    detail: String,
}

/// What the scenario needs of one broker. Both processes make theirs with
/// [`Broker::connect`] from the environment, so they agree on every setting.
trait Broker: Sized {
    const KIND: Kind;

    /// A client for `destination`, checked to answer (`Err` = unreachable).
    async fn connect(destination: &str) -> Result<Self, Error>;

    /// Declares the queue or topic (with its DLQ and retry path).
    async fn declare(&self, destination: &str) -> Result<(), Error>;

    /// The publisher the relays publish through.
    fn relay_publisher(&self, destination: &str) -> Arc<dyn Publisher>;

    /// In the consumer process: the source and the dead-letter publisher.
    async fn subscribe(&self, destination: &str) -> Result<(BoxSource, Arc<dyn Publisher>), Error>;

    /// What is left on the broker.
    async fn left(&self, destination: &str) -> Result<Left, Error>;

    /// After the last consumer process was killed: waits until the broker
    /// took back what that process held (so [`Broker::left`] counts it).
    async fn released(&self, _destination: &str) {}

    /// Deletes what [`Broker::declare`] created.
    async fn cleanup(&self, destination: &str);
}

// ---------------------------------------------------------------------------
// Helpers.

use postbox_testkit::env::var_or as env_or;

/// `AWS_ENDPOINT_URL`, default `http://127.0.0.1:4566`.
fn endpoint() -> String {
    env_or("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
}

fn region() -> String {
    env_or("AWS_REGION", "us-east-1")
}

fn credentials() -> (String, String) {
    (
        env_or("AWS_ACCESS_KEY_ID", "test"),
        env_or("AWS_SECRET_ACCESS_KEY", "test"),
    )
}

/// The emulator, with short time-outs, and the consumer's settings: 8
/// receivers, 1 s long polls, the short visibility timeout, a buffer of 80.
fn sqs_config() -> Result<SqsConfig, Error> {
    let (key, secret) = credentials();
    Ok(SqsConfig::from_url(&format!(
        "sqs://?endpoint={}&region={}",
        endpoint(),
        region()
    ))?
    .credentials(key, secret)
    .connect_timeout(Duration::from_secs(2))
    .operation_timeout(Duration::from_secs(40))
    .receivers(8)
    .wait_time(Duration::from_secs(1))
    .visibility_timeout(VISIBILITY)
    .buffer(80))
}

// ---------------------------------------------------------------------------
/// The consumer program (the child process).
///
/// Reads `POSTBOX_EO_BROKER`, `DATABASE_URL`, `POSTBOX_EO_SCHEMA` (migrated,
/// with the `applied` table), `POSTBOX_EO_DESTINATION` and the broker's
/// variables; prints `ready` once it consumes, then `stats <deliveries>
/// <handler runs>` every 100 ms on stdout. It never stops by itself: it is
/// killed.
mod consumer {
    use super::*;
    use postbox_core::{Consumer, DeadLetterRouter, ResultExt, RetryPolicy};
    use postbox_postgres::{tx_handler_fn, PostgresConfig, TransactionalLayer};

    pub(super) fn main() -> ExitCode {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        let kind = Kind::from_name(&var(BROKER_ENV)).expect("a known POSTBOX_EO_BROKER");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        match runtime.block_on(kind.consume(var(SCHEMA_ENV), var(DESTINATION_ENV))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("eo-consumer ({}): {e}", kind.name());
                ExitCode::FAILURE
            }
        }
    }

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    pub(super) async fn run<B: Broker>(schema: String, destination: String) -> Result<(), Error> {
        let pg = Postgres::connect(
            PostgresConfig::from_url(&common::database_url())?
                .schema(schema)
                .pool_size(32),
        )
        .await?;
        let broker = B::connect(&destination).await?;
        let (source, dead_letters) = broker.subscribe(&destination).await?;

        let deliveries = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU64::new(0));
        let insert = format!(
            "INSERT INTO \"{}\".applied (order_id, customer, pid) VALUES ($1, $2, $3)",
            pg.schema()
        );
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let handler = TransactionalLayer::new(&pg)
            .lock_timeout(Some(Duration::from_secs(2)))
            .wrap(tx_handler_fn({
                let runs = runs.clone();
                move |env, tx| {
                    let insert = insert.clone();
                    let runs = runs.clone();
                    Box::pin(async move {
                        runs.fetch_add(1, Ordering::Relaxed);
                        let order: serde_json::Value = env.decode_json().permanent()?;
                        let id = order["order"].as_i64().unwrap();
                        let customer = env.key.clone().unwrap_or_default();
                        tx.execute(&insert, &[&id, &customer, &pid])
                            .await
                            .transient()?;
                        Ok(())
                    })
                }
            }));
        let consumer = Consumer::builder(
            source,
            Counting {
                inner: handler,
                deliveries: deliveries.clone(),
            },
        )
        .dead_letter(DeadLetterRouter::new(dead_letters))
        .concurrency(32)
        .retry_policy(
            RetryPolicy::exponential(Duration::from_millis(10))
                .with_max_delay(Duration::from_millis(500))
                .with_max_attempts(1000),
        )
        .build()?;
        tokio::spawn(async move {
            loop {
                say(&format!(
                    "stats {} {}",
                    deliveries.load(Ordering::Relaxed),
                    runs.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        say("ready");
        consumer.run().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
/// Runs the tests like libtest would, one after the other.
mod harness {
    use super::*;

    pub(super) fn main() -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut filters = Vec::new();
        let mut skips = Vec::new();
        let (mut exact, mut list, mut ignored_only, mut terse) = (false, false, false, false);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--list" => list = true,
                "--exact" => exact = true,
                "--ignored" => ignored_only = true,
                "--skip" => skips.extend(it.next().cloned()),
                "--format" => terse = it.next().is_some_and(|f| f == "terse"),
                "--format=terse" => terse = true,
                "--test-threads" | "--color" | "--logfile" | "-Z" => {
                    it.next();
                }
                s if s.starts_with('-') => {}
                s => filters.push(s.to_string()),
            }
        }
        let matches = |name: &str, p: &String| {
            if exact {
                name == p
            } else {
                name.contains(p.as_str())
            }
        };
        let selected: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| {
                let name = k.test_name();
                !ignored_only
                    && (filters.is_empty() || filters.iter().any(|p| matches(name, p)))
                    && !skips.iter().any(|p| matches(name, p))
            })
            .collect();
        let filtered_out = Kind::ALL.len() - selected.len();
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        if list {
            for k in &selected {
                println!("{}: test", k.test_name());
            }
            if !terse {
                println!(
                    "\n{} test{}, 0 benchmarks",
                    selected.len(),
                    plural(selected.len())
                );
            }
            return ExitCode::SUCCESS;
        }
        println!(
            "\nrunning {} test{}",
            selected.len(),
            plural(selected.len())
        );
        let started = Instant::now();
        let mut failed = Vec::new();
        for kind in &selected {
            let outcome = std::panic::catch_unwind(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(4)
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(kind.test())
            });
            let verdict = if outcome.is_ok() { "ok" } else { "FAILED" };
            println!("test {} ... {verdict}", kind.test_name());
            if outcome.is_err() {
                failed.push(kind.test_name());
            }
        }
        if !failed.is_empty() {
            println!("\nfailures:");
            for name in &failed {
                println!("    {name}");
            }
        }
        println!(
            "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in {:.2}s\n",
            if failed.is_empty() { "ok" } else { "FAILED" },
            selected.len() - failed.len(),
            failed.len(),
            started.elapsed().as_secs_f64()
        );
        if failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(101)
        }
    }
}

// ---------------------------------------------------------------------------
// The test.

type PendingPublish = (
    Envelope,
    tokio::sync::oneshot::Sender<Result<(), PublishError>>,
);

/// A publisher for the relays that turns concurrent single publishes to the
/// queue into `SendMessageBatch` calls of up to 10 (the relay publishes row by
/// row, one lane per key): each `publish` still returns only once SQS
/// confirmed *its* entry, so the relay's guarantees are unchanged. Without it
/// the emulator spends most of its time on 20,000 single sends.
struct Coalescing {
    inner: Arc<dyn Publisher>,
    queue: String,
    tx: tokio::sync::mpsc::Sender<PendingPublish>,
}

impl Coalescing {
    fn new(inner: Arc<dyn Publisher>, queue: &str, calls: usize) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<PendingPublish>(1024);
        let calls = Arc::new(tokio::sync::Semaphore::new(calls));
        let (publisher, dest) = (inner.clone(), queue.to_string());
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Wait for a free call first: publishes arriving meanwhile join the batch.
                let Ok(permit) = calls.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < postbox_sqs::MAX_BATCH {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let (publisher, dest) = (publisher.clone(), dest.clone());
                tokio::spawn(async move {
                    let (envelopes, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let report = publisher.publish_batch(&dest, envelopes).await;
                    for (result, waiter) in report.into_results().into_iter().zip(waiters) {
                        let _ = waiter.send(result);
                    }
                    drop(permit);
                });
            }
        });
        Coalescing {
            inner,
            queue: queue.to_string(),
            tx,
        }
    }
}

#[async_trait::async_trait]
impl Publisher for Coalescing {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        if destination != self.queue {
            return self.inner.publish(destination, envelope).await;
        }
        let (done, confirmed) = tokio::sync::oneshot::channel();
        if let Err(e) = self.tx.send((envelope, done)).await {
            let closed = postbox_core::Error::new(ErrorKind::Closed, "the batcher stopped");
            return Err(PublishError::new(closed, e.0 .0));
        }
        confirmed.await.unwrap_or_else(|_| {
            panic!("the batcher dropped a publish");
        })
    }
}

/// One consumer process; killed (SIGKILL) when dropped, so a failing test
/// leaves no orphan behind.
struct ConsumerProcess {
    child: Child,
    ready: Arc<AtomicBool>,
    /// Last reported deliveries / handler runs of this process.
    deliveries: Arc<AtomicU64>,
    runs: Arc<AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ConsumerProcess {
    /// Starts this binary as the consumer of `destination` on `kind`'s broker
    /// (the environment, with the brokers' addresses, is inherited).
    fn spawn(kind: Kind, schema: &str, destination: &str) -> Self {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .env(ROLE_ENV, "consumer")
            .env(BROKER_ENV, kind.name())
            .env(SCHEMA_ENV, schema)
            .env(DESTINATION_ENV, destination)
            .env("DATABASE_URL", common::database_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the consumer process");
        let ready = Arc::new(AtomicBool::new(false));
        let deliveries = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().unwrap();
        let reader = {
            let (ready, deliveries, runs) = (ready.clone(), deliveries.clone(), runs.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut words = line.split_whitespace();
                    match words.next() {
                        Some("ready") => ready.store(true, Ordering::SeqCst),
                        Some("stats") => {
                            let mut n = words.filter_map(|w| w.parse::<u64>().ok());
                            deliveries.store(n.next().unwrap_or(0), Ordering::SeqCst);
                            runs.store(n.next().unwrap_or(0), Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            })
        };
        ConsumerProcess {
            child,
            ready,
            deliveries,
            runs,
            reader: Some(reader),
        }
    }

    /// Waits until the process consumes (panics if it exits or hangs).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ready.load(Ordering::SeqCst) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the consumer process exited before consuming: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the consumer process is not ready after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the process has run its handler at least once.
    async fn wait_working(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.runs.load(Ordering::SeqCst) == 0 {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "the consumer process applies nothing after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics if the process has exited on its own (it must only die by kill).
    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the consumer process exited by itself: {status}");
        }
    }

    /// SIGKILL; returns the last reported (deliveries, handler runs).
    fn kill(mut self) -> (u64, u64) {
        self.stop();
        (
            self.deliveries.load(Ordering::SeqCst),
            self.runs.load(Ordering::SeqCst),
        )
    }

    fn stop(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// The brokers.

/// SQS on the local emulator: a standard queue with a short visibility
/// timeout and its DLQ.
mod sqs {
    use super::*;
    use postbox_core::Broker as _;
    use postbox_core::SubscribeOptions;

    pub(super) struct Sqs(SqsBroker);

    impl Broker for Sqs {
        const KIND: Kind = Kind::Sqs;

        async fn connect(_queue: &str) -> Result<Self, Error> {
            let broker = SqsBroker::connect(sqs_config()?).await?;
            broker.health().await?;
            Ok(Sqs(broker))
        }

        async fn declare(&self, queue: &str) -> Result<(), Error> {
            let spec = QueueSpec::new(queue)
                .visibility_timeout(VISIBILITY)
                // Far above anything a kill causes: postbox dead-letters, not SQS.
                .max_receive_count(100);
            self.0.declare_queue(&spec).await.map(drop)
        }

        fn relay_publisher(&self, queue: &str) -> Arc<dyn Publisher> {
            Arc::new(Coalescing::new(Arc::new(self.0.clone()), queue, 4))
        }

        async fn subscribe(&self, queue: &str) -> Result<(BoxSource, Arc<dyn Publisher>), Error> {
            // Declared by `declare` (provisioning would reset its attributes).
            let options = SubscribeOptions::new().prefetch(10).provision(false);
            let source = self.0.subscribe(queue, options).await?;
            Ok((source, Arc::new(self.0.clone())))
        }

        /// Pending = visible + in flight + delayed.
        async fn left(&self, queue: &str) -> Result<Left, Error> {
            let depth = self.0.backlog(queue, None).await?;
            let dlq = self
                .0
                .backlog(&postbox_core::dlq::default_destination(queue), None)
                .await?;
            Ok(Left {
                pending: depth.total(),
                dead: dlq.total(),
                detail: format!("queue {depth:?}, dlq {dlq:?}"),
            })
        }

        async fn cleanup(&self, queue: &str) {
            for q in [queue.to_string(), format!("{queue}-dlq")] {
                if let Ok(url) = self.0.queue_url(&q).await {
                    let _ = self.0.sqs().delete_queue().queue_url(url).send().await;
                }
            }
        }
    }
}

/// Kafka (tansu on this machine): a topic of [`PARTITIONS`] partitions with
/// its retry tier topics and DLQ, consumed by the group named like the topic.
mod kafka {
    use super::*;
    use postbox_core::delay::DelayTiers;
    use postbox_core::{Broker as _, DeadLetterOps as _, SubscribeOptions};
    use postbox_kafka::retry::{dlq_topic, retry_topics};
    use postbox_kafka::{KafkaBroker, KafkaConfig, TopologySpec};

    /// Partitions of the topic (the records of one key stay in one).
    const PARTITIONS: i32 = 4;

    /// `KAFKA_BOOTSTRAP_SERVERS`, default `127.0.0.1:9092`.
    pub(super) fn bootstrap() -> String {
        env_or("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    }

    /// Delay tiers of the retry topics `<topic>.retry.<tier>`.
    fn tiers() -> DelayTiers {
        DelayTiers::new([Duration::from_secs(1), Duration::from_secs(5)]).expect("non-empty tiers")
    }

    /// Client settings of both processes (like postbox-kafka's tests).
    fn config() -> KafkaConfig {
        KafkaConfig::new(&bootstrap())
            .retry_tiers(tiers())
            .request_timeout(Duration::from_secs(5))
            .revoke_timeout(Duration::from_secs(3))
            .set("linger.ms", "1")
            // On tansu the "latest" offset is the last *batch*'s base offset
            // + 1 (docs/testing.md): one record per batch keeps it exact, so a lag
            // of 0 means every record (wire duplicates and retry copies
            // included) was committed.
            .set("batch.num.messages", "1")
    }

    /// Consumer settings: tansu's first group join takes about half the
    /// session time-out, and a restarted process waits for the killed one to
    /// leave the group (session time-out, or the rebalance time-out
    /// `max.poll.interval.ms` when it died mid-join). With 3 s a restart
    /// applies again after ~8 s (~12 s with the 6 s of postbox-kafka's tests);
    /// static membership (`group.instance.id`) did not shorten it on tansu.
    fn consumer_config() -> KafkaConfig {
        config()
            .set("session.timeout.ms", "3000")
            .set("heartbeat.interval.ms", "250")
            .set("max.poll.interval.ms", "5000")
            .set("fetch.wait.max.ms", "100")
            .set("fetch.queue.backoff.ms", "10")
            .set("auto.commit.interval.ms", "500")
    }

    fn spec() -> TopologySpec {
        TopologySpec::new(PARTITIONS, 1)
    }

    /// One handle with the consumer settings (the producer ignores them).
    pub(super) struct Kafka(KafkaBroker);

    impl Broker for Kafka {
        const KIND: Kind = Kind::Kafka;

        async fn connect(_topic: &str) -> Result<Self, Error> {
            KafkaBroker::connect(consumer_config().topology(spec()))
                .await
                .map(Kafka)
        }

        async fn declare(&self, topic: &str) -> Result<(), Error> {
            self.0
                .provision(topic, &SubscribeOptions::group(topic))
                .await
        }

        fn relay_publisher(&self, _topic: &str) -> Arc<dyn Publisher> {
            Arc::new(self.0.clone())
        }

        /// The group is named like the topic.
        async fn subscribe(&self, topic: &str) -> Result<(BoxSource, Arc<dyn Publisher>), Error> {
            let options = SubscribeOptions::group(topic).provision(false);
            let source = self.0.subscribe(topic, options).await?;
            Ok((source, Arc::new(self.0.clone())))
        }

        /// Pending = the group's lag on the topic and its retry tiers.
        async fn left(&self, topic: &str) -> Result<Left, Error> {
            let (mut pending, mut detail) = (0, Vec::new());
            for t in std::iter::once(topic.to_string()).chain(retry_topics(topic, &tiers())) {
                let backlog = self.0.backlog(&t, Some(topic)).await?;
                let records: i64 = backlog.partitions.iter().map(|p| p.high_watermark).sum();
                pending += backlog.waiting;
                detail.push(format!("{t}: {records} records, lag {}", backlog.waiting));
            }
            let dlq = dlq_topic(topic);
            let dead = self.0.count(&dlq).await?;
            detail.push(format!("{dlq}: {dead}"));
            Ok(Left {
                pending,
                dead,
                detail: detail.join(", "),
            })
        }

        async fn cleanup(&self, topic: &str) {
            let names = self.0.topic_names(topic);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let _ = self.0.delete_topics(&names).await;
        }
    }
}

/// RabbitMQ: a quorum queue with its DLQ; retries through delay tiers of an
/// exchange of the test's own, so what waits in them counts as left.
mod rabbitmq {
    use super::*;
    use postbox_core::{DeadLetterOps, SubscribeOptions};
    use postbox_rabbitmq::{RabbitBroker, RabbitConfig, Topology};

    /// Unacked deliveries a consumer process holds (what a kill gives back).
    const PREFETCH: u16 = 100;
    /// Delay tiers of the retry copies, in milliseconds.
    const TIERS: [u64; 4] = [20, 100, 500, 2_000];

    /// `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    fn amqp_url() -> String {
        env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    }

    pub(super) fn redacted_url() -> String {
        RabbitConfig::new(amqp_url()).redacted_url()
    }

    fn delay_exchange(queue: &str) -> String {
        format!("{queue}.delay")
    }

    pub(super) struct Rabbit(RabbitBroker);

    impl Rabbit {
        /// Ready messages of `queue`.
        async fn ready(&self, queue: &str) -> Result<u64, Error> {
            let backlog = postbox_core::Broker::backlog(&self.0, queue, None).await?;
            Ok(backlog.waiting)
        }
    }

    impl Broker for Rabbit {
        const KIND: Kind = Kind::RabbitMq;

        async fn connect(queue: &str) -> Result<Self, Error> {
            let config = RabbitConfig::new(amqp_url())
                .connect_timeout(Duration::from_secs(5))
                .delay_exchange(delay_exchange(queue))
                .delay_tiers(TIERS.map(Duration::from_millis));
            RabbitBroker::connect(config).await.map(Rabbit)
        }

        async fn declare(&self, queue: &str) -> Result<(), Error> {
            let spec = postbox_rabbitmq::QueueSpec::quorum(queue)
                // Far above anything a kill causes: postbox dead-letters, not the broker.
                .delivery_limit(Some(100));
            self.0.declare(&Topology::new().queue(spec)).await?;
            self.0.declare_delay_tiers().await
        }

        fn relay_publisher(&self, _queue: &str) -> Arc<dyn Publisher> {
            Arc::new(self.0.clone())
        }

        async fn subscribe(&self, queue: &str) -> Result<(BoxSource, Arc<dyn Publisher>), Error> {
            // Declared by `declare` (with a delivery limit of its own).
            let options = SubscribeOptions::new().prefetch(PREFETCH).provision(false);
            let source = postbox_core::Broker::subscribe(&self.0, queue, options).await?;
            Ok((source, Arc::new(self.0.clone())))
        }

        /// Pending = ready on the queue + waiting in the delay tiers (unacked
        /// ones count once their consumer is gone: see `released`).
        async fn left(&self, queue: &str) -> Result<Left, Error> {
            let ready = self.ready(queue).await?;
            let mut delayed = 0;
            for tier in self.0.config().delay_queues() {
                delayed += self.ready(&tier).await?;
            }
            let dead = self
                .0
                .count(&postbox_core::dlq::default_destination(queue))
                .await?;
            Ok(Left {
                pending: ready + delayed,
                dead,
                detail: format!("queue: {ready} ready, {delayed} in delay tiers, dlq {dead}"),
            })
        }

        async fn released(&self, queue: &str) {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                match postbox_core::Broker::backlog(&self.0, queue, None).await {
                    Ok(b) if b.consumers == Some(0) => return,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            panic!("the killed consumer of {queue} is still attached after 15 s");
        }

        async fn cleanup(&self, queue: &str) {
            let dlq = postbox_core::dlq::default_destination(queue);
            for q in [queue.to_string(), dlq]
                .into_iter()
                .chain(self.0.config().delay_queues())
            {
                let _ = self.0.delete_queue(&q).await;
            }
            // The delay exchange (postbox-rabbitmq has no call to delete one).
            let deleted = async {
                let connection =
                    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                        .await?;
                let channel = connection.create_channel().await?;
                let exchange = delay_exchange(queue);
                channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await?;
                connection.close(200, "done".into()).await
            };
            let _ = deleted.await;
            let _ = postbox_core::Broker::close(&self.0).await;
        }
    }
}

/// The test on broker `B`.
async fn exactly_once_effect<B: Broker>() {
    let kind = B::KIND;
    let test = kind.test_name();
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let destination = format!("pb-eo-{}-{:x}", kind.name(), fastrand::u64(..));
    let broker = match B::connect(&destination).await {
        Ok(b) => b,
        Err(e) => return broker_unreachable(test, &kind.broker(), e),
    };
    let Some(pg) = connect(test, 24).await else {
        return;
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let kills = rng.usize(KILLS);
    // Kill #k comes after a random time, or once the table holds a random
    // number of rows, whichever is first: a fast consumer is still killed
    // mid-stream, never only after it applied everything.
    let mut kill_at_rows: Vec<i64> = (0..kills)
        .map(|_| rng.i64(ORDERS as i64 / 20..ORDERS as i64 * 9 / 10))
        .collect();
    kill_at_rows.sort_unstable();
    exec(
        &pg,
        "CREATE TABLE {s}.applied (order_id bigint NOT NULL, customer text NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await;
    broker
        .declare(&destination)
        .await
        .unwrap_or_else(|e| panic!("declaring {destination}: {e}"));
    let outbox = Outbox::new(&pg);
    let started = Instant::now();

    // Producer: orders in transactions, concurrently with everything else.
    let producer = {
        let (pg, outbox, destination) = (pg.clone(), outbox.clone(), destination.clone());
        tokio::spawn(async move {
            let mut client = pg.client().await.unwrap();
            for chunk in (0..ORDERS).collect::<Vec<_>>().chunks(PRODUCER_TX) {
                let envelopes: Vec<Envelope> = chunk
                    .iter()
                    .map(|&i| {
                        Envelope::builder("order.placed")
                            .key(format!("customer-{}", i % CUSTOMERS))
                            .json(&serde_json::json!({ "order": i }))
                            .unwrap()
                            .build()
                    })
                    .collect();
                let tx = client.transaction().await.unwrap();
                outbox
                    .enqueue_many(&tx, &destination, &envelopes)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        })
    };

    // Two relays in this process; aborted (and restarted) now and then.
    let stop = postbox_core::CancellationToken::new();
    let publisher = broker.relay_publisher(&destination);
    let new_relay = |stop: &postbox_core::CancellationToken| {
        outbox
            .relay(publisher.clone())
            .batch_size(512)
            .concurrency(32)
            .sent_rows(SentRows::Delete)
            .poll_interval(Duration::from_millis(100))
            .backoff(Duration::from_millis(20), Duration::from_millis(500))
            .spawn(stop.clone())
    };
    let mut relays = vec![new_relay(&stop), new_relay(&stop)];

    // The consumer process: SIGKILLed at random moments, restarted.
    let mut deliveries = 0u64;
    let mut runs = 0u64;
    let mut relay_kills = 0;
    let mut kill_log = Vec::new();
    for (k, &rows_at_most) in kill_at_rows.iter().enumerate() {
        let spawned = Instant::now();
        let mut child = ConsumerProcess::spawn(kind, pg.schema(), &destination);
        child.wait_ready().await;
        // A random moment once it is applying orders (connecting 32
        // connections or joining a consumer group under load can take
        // seconds: a kill before that would prove little).
        child.wait_working().await;
        let working = Instant::now();
        let start = working - spawned;
        let at_most = Duration::from_millis(rng.u64(200..4000));
        while working.elapsed() < at_most
            && count(&pg, "SELECT count(*) FROM {s}.applied").await < rows_at_most
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = working.elapsed();
        child.assert_alive();
        let (d, r) = child.kill();
        deliveries += d;
        runs += r;
        let applied = count(&pg, "SELECT count(*) FROM {s}.applied").await;
        kill_log.push(format!(
            "#{} after {:.1}s of work (working {:.1}s after its start; {d} deliveries, {applied} rows)",
            k + 1,
            after.as_secs_f64(),
            start.as_secs_f64()
        ));
        if k % 2 == 0 && relay_kills < RELAY_KILLS {
            let i = rng.usize(..relays.len());
            relays[i].abort();
            relays[i] = new_relay(&stop);
            relay_kills += 1;
        }
    }
    let applied_at_last_kill = count(&pg, "SELECT count(*) FROM {s}.applied").await;

    // The last consumer process runs to the end.
    let mut last = ConsumerProcess::spawn(kind, pg.schema(), &destination);
    last.wait_ready().await;
    producer.await.unwrap();
    let deadline = Instant::now() + FINISH_WITHIN;
    let mut progress = Instant::now();
    loop {
        let applied = count(&pg, "SELECT count(DISTINCT order_id) FROM {s}.applied").await;
        let pending = count(&pg, "SELECT count(*) FROM {s}.postbox_outbox").await;
        let report = progress.elapsed() >= Duration::from_secs(10);
        // The broker is asked only once the table and the outbox are done
        // (or for the progress line).
        let left = if (applied == ORDERS as i64 && pending == 0) || report {
            Some(broker.left(&destination).await.expect("what is left"))
        } else {
            None
        };
        if applied == ORDERS as i64 && pending == 0 && left.as_ref().is_some_and(|l| l.pending == 0)
        {
            break;
        }
        last.assert_alive();
        if report {
            progress = Instant::now();
            eprintln!(
                "{test}: {:.0}s: {applied} orders applied, {pending} outbox rows left, {}",
                started.elapsed().as_secs_f64(),
                left.as_ref().map_or("", |l| l.detail.as_str())
            );
        }
        assert!(
            Instant::now() < deadline,
            "not done after {FINISH_WITHIN:?}: {applied} orders applied, {pending} outbox rows left, broker: {left:?} (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    // Anything still settling settles; then stop everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    last.assert_alive();
    let (d, r) = last.kill();
    deliveries += d;
    runs += r;
    broker.released(&destination).await;
    stop.cancel();
    for r in relays {
        let _ = r.await;
    }

    let effect = Effect::read(&pg, ORDERS).await;
    let processes = count(&pg, "SELECT count(DISTINCT pid) FROM {s}.applied").await;
    let left = broker.left(&destination).await.unwrap();
    eprintln!(
        "exactly-once effect [{}, process kills]: {ORDERS} orders, consumer process SIGKILLed {kills}x [{}] ({applied_at_last_kill} rows before the last kill), relays aborted {relay_kills}x, rows written by {processes} processes; deliveries {deliveries} (redeliveries and wire duplicates included; as last reported before each kill), handler runs {runs} (incl. rolled back), {effect}, {}; done in {:.1}s, seed {seed}",
        kind.name(),
        kill_log.join(", "),
        left.detail,
        elapsed.as_secs_f64()
    );
    effect.assert_exactly_once(ORDERS);
    assert_eq!(
        left.pending, 0,
        "nothing left on the broker: {}",
        left.detail
    );
    assert_eq!(left.dead, 0, "nothing dead-lettered: {}", left.detail);
    assert!(
        processes >= 2,
        "the work was shared by the restarted processes"
    );
    drop_schema(&pg).await;
    broker.cleanup(&destination).await;
}
