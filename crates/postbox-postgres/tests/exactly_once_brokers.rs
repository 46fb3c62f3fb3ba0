//! Exactly-once *effect* on SQS with **real process kills**: producer →
//! outbox → relays → SQS queue → consumer *process* with the transactional
//! Postgres idempotency variant → a table.
//!
//! 20,000 orders are written through the outbox (in transactions); two
//! relays in this process publish them to an SQS queue of the local emulator
//! through [`SqsBroker`]. The consumer runs in a **child process**: an
//! [`SqsSource`](postbox_sqs::SqsSource) feeding the consumer runtime, whose
//! handler is a [`TransactionalLayer`] inserting one row per order into
//! `applied`, a table *without* a unique constraint, so a double apply would
//! show. The child is killed with SIGKILL (`Child::kill`) 4–6 times at random
//! moments and restarted; relays are aborted and restarted too (wire
//! duplicates). The queue has a short visibility timeout, so what a killed
//! consumer held comes back quickly. At the end `applied` holds exactly
//! 20,000 rows, each order once; the outbox, the queue and its DLQ are empty.
//!
//! **The child process.** This test target has no libtest harness
//! (`harness = false` in Cargo.toml): the same binary is the consumer
//! program when started with `POSTBOX_EO_ROLE=consumer` (see [`consumer`]),
//! so the child is always built with, and exactly as fresh as, the test.
//! Otherwise `main` runs the test like libtest would (name filters, `--list`,
//! a `test result:` line).
//!
//! Skipped by name when SQS or PostgreSQL is unreachable; fails instead when
//! `CI=true` or `POSTBOX_REQUIRE_BROKERS=1`.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{brokers_required, connect, count, drop_schema, exec};
use postbox_core::{Envelope, ErrorKind, Handler, HandlerResult, PublishError, Publisher};
use postbox_postgres::{Outbox, Postgres, SentRows};
use postbox_sqs::aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use postbox_sqs::{QueueSpec, SqsBroker};

const TEST: &str = "exactly_once_effect_sqs_with_process_kills";
const ORDERS: usize = 20_000;
const CUSTOMERS: usize = 64;
/// Orders per producer transaction.
const PRODUCER_TX: usize = 250;
/// Consumer process kills: 4 to 6, chosen at random.
const KILLS: std::ops::RangeInclusive<usize> = 4..=6;
const RELAY_KILLS: usize = 2;
/// The queue's (and the consumer's) visibility timeout: what a killed
/// consumer held becomes visible again after this.
const VISIBILITY: Duration = Duration::from_secs(8);
/// How long the last consumer has to finish the work once everything was produced.
const FINISH_WITHIN: Duration = Duration::from_secs(170);

/// Selects the consumer role of this binary.
const ROLE_ENV: &str = "POSTBOX_EO_ROLE";
const SCHEMA_ENV: &str = "POSTBOX_EO_SCHEMA";
const QUEUE_ENV: &str = "POSTBOX_EO_QUEUE";

fn main() -> ExitCode {
    if std::env::var(ROLE_ENV).as_deref() == Ok("consumer") {
        return consumer::main();
    }
    harness::main()
}

// ---------------------------------------------------------------------------
// SQS helpers (copied from postbox-sqs's tests: this crate must not depend on
// another crate's test helpers).

/// A variable, or `default` when unset or empty.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

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

/// Fails the test (brokers required) or reports a skip by name.
fn sqs_unreachable(test: &str, why: impl std::fmt::Display) {
    let broker = format!("SQS at {}", endpoint());
    if brokers_required() {
        panic!("{test}: {broker} is unreachable: {why} (start it with `scripts/brokers.sh up`)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: SKIPPED ({broker} unreachable: {why}; run `scripts/brokers.sh up`, or `scripts/test.sh`)"
    );
}

/// A broker on the emulator (SNS is unused but part of the handle).
fn sqs_broker() -> SqsBroker {
    let (key, secret) = credentials();
    let creds = Credentials::new(key, secret, None, None, "postbox-postgres-tests");
    let timeouts = postbox_sqs::aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(40))
        .build();
    let sqs = postbox_sqs::aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region()))
        .endpoint_url(endpoint())
        .credentials_provider(creds.clone())
        .timeout_config(timeouts.clone())
        .build();
    let sns = postbox_sqs::aws_sdk_sns::Config::builder()
        .behavior_version(postbox_sqs::aws_sdk_sns::config::BehaviorVersion::latest())
        .region(postbox_sqs::aws_sdk_sns::config::Region::new(region()))
        .endpoint_url(endpoint())
        .credentials_provider(creds)
        .timeout_config(timeouts)
        .build();
    SqsBroker::new(
        postbox_sqs::aws_sdk_sqs::Client::from_conf(sqs),
        postbox_sqs::aws_sdk_sns::Client::from_conf(sns),
    )
}

/// Counts deliveries that reach the handler stack (first deliveries,
/// redeliveries and wire duplicates alike).
struct Counting<H> {
    inner: H,
    deliveries: Arc<AtomicU64>,
}

impl<H: Handler> Handler for Counting<H> {
    async fn handle(&self, envelope: &Envelope) -> HandlerResult {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        self.inner.handle(envelope).await
    }
}

// ---------------------------------------------------------------------------
/// The consumer program (the child process).
///
/// Reads `DATABASE_URL`, `POSTBOX_EO_SCHEMA` (migrated, with the `applied`
/// table), `POSTBOX_EO_QUEUE` and the AWS variables; prints `ready` once it
/// consumes, then `stats <deliveries> <handler runs>` every 100 ms on stdout.
/// It never stops by itself: it is killed.
mod consumer {
    use super::*;
    use postbox_core::{Consumer, DeadLetterRouter, ResultExt, RetryPolicy};
    use postbox_postgres::{tx_handler_fn, PostgresConfig, TransactionalLayer};
    use postbox_sqs::ConsumerOptions;

    pub(super) fn main() -> ExitCode {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        match runtime.block_on(run()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("eo-consumer: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    async fn run() -> Result<(), postbox_core::Error> {
        let schema = std::env::var(SCHEMA_ENV).expect("POSTBOX_EO_SCHEMA");
        let queue = std::env::var(QUEUE_ENV).expect("POSTBOX_EO_QUEUE");
        let pg = Postgres::connect(
            PostgresConfig::from_url(&common::database_url())?
                .schema(schema)
                .pool_size(32),
        )
        .await?;
        let broker = sqs_broker();
        let source = broker
            .subscribe_with(
                &queue,
                ConsumerOptions::default()
                    .receivers(8)
                    .batch_size(10)
                    .wait_time(Duration::from_secs(1))
                    .visibility_timeout(VISIBILITY)
                    .buffer(80),
            )
            .await?;

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
        .dead_letter(DeadLetterRouter::new(Arc::new(broker.clone())))
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
/// Runs the one test like libtest would.
mod harness {
    use super::*;

    pub(super) fn main() -> ExitCode {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut filters = Vec::new();
        let mut skips = Vec::new();
        let (mut exact, mut list, mut ignored_only) = (false, false, false);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--list" => list = true,
                "--exact" => exact = true,
                "--ignored" => ignored_only = true,
                "--skip" => skips.extend(it.next().cloned()),
                "--test-threads" | "--format" | "--color" | "--logfile" | "-Z" => {
                    it.next();
                }
                s if s.starts_with('-') => {}
                s => filters.push(s.to_string()),
            }
        }
        let matches = |p: &String| {
            if exact {
                TEST == p
            } else {
                TEST.contains(p.as_str())
            }
        };
        let selected = !ignored_only
            && (filters.is_empty() || filters.iter().any(matches))
            && !skips.iter().any(matches);
        if list {
            if selected {
                println!("{TEST}: test");
            }
            return ExitCode::SUCCESS;
        }
        if !selected {
            println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out; finished in 0.00s\n");
            return ExitCode::SUCCESS;
        }
        println!("\nrunning 1 test");
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .unwrap()
                .block_on(exactly_once_effect_sqs(TEST))
        });
        let secs = started.elapsed().as_secs_f64();
        if outcome.is_ok() {
            println!("test {TEST} ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s\n");
            ExitCode::SUCCESS
        } else {
            println!("test {TEST} ... FAILED\n\nfailures:\n    {TEST}\n\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s\n");
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
    fn spawn(schema: &str, queue: &str) -> Self {
        let exe = std::env::current_exe().expect("the test binary's path");
        let (key, secret) = credentials();
        let mut child = Command::new(exe)
            .env(ROLE_ENV, "consumer")
            .env(SCHEMA_ENV, schema)
            .env(QUEUE_ENV, queue)
            .env("DATABASE_URL", common::database_url())
            .env("AWS_ENDPOINT_URL", endpoint())
            .env("AWS_REGION", region())
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
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

async fn exactly_once_effect_sqs(test: &str) {
    let broker = sqs_broker();
    if let Err(e) = broker.health().await {
        sqs_unreachable(test, e);
        return;
    }
    let Some(pg) = connect(test, 24).await else {
        return;
    };
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let kills = rng.usize(KILLS);
    exec(
        &pg,
        "CREATE TABLE {s}.applied (order_id bigint NOT NULL, customer text NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await;
    let queue = format!("pb-eo-{}", pg.schema().replace('_', "-"));
    broker
        .declare_queue(
            &QueueSpec::new(&queue)
                .visibility_timeout(VISIBILITY)
                // Far above anything a kill causes: postbox dead-letters, not SQS.
                .max_receive_count(100),
        )
        .await
        .expect("declaring the queue");
    let outbox = Outbox::new(&pg);
    let started = Instant::now();

    // Producer: orders in transactions, concurrently with everything else.
    let producer = {
        let (pg, outbox, queue) = (pg.clone(), outbox.clone(), queue.clone());
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
                outbox.enqueue_many(&tx, &queue, &envelopes).await.unwrap();
                tx.commit().await.unwrap();
            }
        })
    };

    // Two relays in this process; aborted (and restarted) now and then.
    let stop = postbox_core::CancellationToken::new();
    let publisher: Arc<dyn Publisher> =
        Arc::new(Coalescing::new(Arc::new(broker.clone()), &queue, 4));
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
    for k in 0..kills {
        let mut child = ConsumerProcess::spawn(pg.schema(), &queue);
        child.wait_ready().await;
        // A random moment once it is applying orders (connecting 40
        // connections under load can take seconds: a kill before that
        // would prove little).
        child.wait_working().await;
        let after = Duration::from_millis(rng.u64(200..4000));
        tokio::time::sleep(after).await;
        child.assert_alive();
        let (d, r) = child.kill();
        deliveries += d;
        runs += r;
        let applied = count(&pg, "SELECT count(*) FROM {s}.applied").await;
        kill_log.push(format!(
            "#{} after {:.1}s ({d} deliveries, {applied} rows)",
            k + 1,
            after.as_secs_f64()
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
    let mut last = ConsumerProcess::spawn(pg.schema(), &queue);
    last.wait_ready().await;
    producer.await.unwrap();
    let deadline = Instant::now() + FINISH_WITHIN;
    let mut progress = Instant::now();
    loop {
        let applied = count(&pg, "SELECT count(DISTINCT order_id) FROM {s}.applied").await;
        let pending = count(&pg, "SELECT count(*) FROM {s}.postbox_outbox").await;
        let depth = broker.depth(&queue).await.expect("queue depth");
        if applied == ORDERS as i64 && pending == 0 && depth.total() == 0 {
            break;
        }
        last.assert_alive();
        if progress.elapsed() >= Duration::from_secs(10) {
            progress = Instant::now();
            eprintln!(
                "{test}: {:.0}s: {applied} orders applied, {pending} outbox rows left, queue {depth:?}",
                started.elapsed().as_secs_f64()
            );
        }
        assert!(
            Instant::now() < deadline,
            "not done after {FINISH_WITHIN:?}: {applied} orders applied, {pending} outbox rows left, queue {depth:?} (seed {seed})"
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
    stop.cancel();
    for r in relays {
        let _ = r.await;
    }

    let rows = count(&pg, "SELECT count(*) FROM {s}.applied").await;
    let distinct = count(&pg, "SELECT count(DISTINCT order_id) FROM {s}.applied").await;
    let in_range = count(
        &pg,
        &format!(
            "SELECT count(*) FROM {{s}}.applied WHERE order_id BETWEEN 0 AND {}",
            ORDERS - 1
        ),
    )
    .await;
    let processes = count(&pg, "SELECT count(DISTINCT pid) FROM {s}.applied").await;
    let outbox_left = count(&pg, "SELECT count(*) FROM {s}.postbox_outbox").await;
    let marks = count(
        &pg,
        "SELECT count(*) FROM {s}.postbox_idempotency WHERE state = 'done'",
    )
    .await;
    let depth = broker.depth(&queue).await.unwrap();
    let dlq = broker.dlq_depth(&queue).await.unwrap();
    eprintln!(
        "exactly-once effect [sqs, process kills]: {ORDERS} orders, consumer process SIGKILLed {kills}x [{}] ({applied_at_last_kill} rows before the last kill), relays aborted {relay_kills}x, rows written by {processes} processes; deliveries {deliveries} (redeliveries and wire duplicates included; as last reported before each kill), handler runs {runs} (incl. rolled back), applied rows {rows}, distinct {distinct}, processed marks {marks}, outbox rows left {outbox_left}, queue {depth:?}, dlq {dlq:?}; done in {:.1}s, seed {seed}",
        kill_log.join(", "),
        elapsed.as_secs_f64()
    );
    assert_eq!(rows, ORDERS as i64, "each order applied exactly once");
    assert_eq!(distinct, ORDERS as i64);
    assert_eq!(in_range, ORDERS as i64);
    assert_eq!(outbox_left, 0, "nothing left in the outbox");
    assert_eq!(depth.total(), 0, "nothing left on the queue");
    assert_eq!(dlq.total(), 0, "nothing dead-lettered");
    assert!(marks >= ORDERS as i64);
    assert!(
        processes >= 2,
        "the work was shared by the restarted processes"
    );
    drop_schema(&pg).await;
    for q in [queue.clone(), format!("{queue}-dlq")] {
        if let Ok(url) = broker.queue_url(&q).await {
            let _ = broker.sqs().delete_queue().queue_url(url).send().await;
        }
    }
}
