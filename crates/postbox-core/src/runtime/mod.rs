//! The consumer runtime: bounded concurrency, optional per-key ordering
//! lanes, the outcome → settle mapping, and graceful shutdown.
//!
//! Invariants it keeps (docs/design.md §4):
//! 1. a message is acked only after its handler finished;
//! 2. a message is settled after its retry or dead-letter copy is confirmed,
//!    and released for redelivery if that publish fails;
//! 3. retries are scheduled through the broker (durable), except in ordered
//!    mode, where the message is held unacked and retried in place;
//! 4. the delay for attempt N depends on N and the message id only;
//! 5. retry and dead-letter metadata replace old values;
//! 6. in ordered mode a retry blocks its key instead of overtaking.

mod decide;
mod slots;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub(crate) use decide::{decide, Decision};

use crate::delivery::Source;
use crate::dlq::DeadLetterRouter;
use crate::error::{Error, ErrorKind};
use crate::handler::{CatchPanic, CatchPanicLayer, Handler, Layer as _, Telemetry, TelemetryLayer};
use crate::retry::{RetryBudget, RetryPolicy};
use crate::telemetry::ConsumerMetrics;

/// How deliveries are ordered while processed concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProcessingOrder {
    /// Up to `concurrency` messages at once in any order; retries go through
    /// the broker (retry tiers, timers, visibility), so they never block others.
    #[default]
    Unordered,
    /// Messages with the same partition key are processed one after the other,
    /// in arrival order, in `concurrency` lanes; a retry holds its lane (in-process
    /// wait, message unacked) instead of overtaking, while other keys keep
    /// flowing (bounded by [`ConsumerBuilder::max_in_flight`]). Messages without a
    /// key share one lane.
    PerKey,
}

/// What a consumer did during [`Consumer::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunReport {
    /// Deliveries received from the source.
    pub received: u64,
    /// Deliveries acked after successful handling (duplicates skipped included).
    pub acked: u64,
    /// Retries scheduled through the broker.
    pub retried: u64,
    /// Retries done in place (ordered mode).
    pub retried_in_place: u64,
    /// Messages dead-lettered (copy confirmed, original acked).
    pub dead_lettered: u64,
    /// Deliveries given back for redelivery (shutdown, failed DLQ publish).
    pub released: u64,
    /// Settle operations that failed (the broker will redeliver).
    pub settle_failures: u64,
    /// Handlers still running when the grace period ended (abandoned unsettled;
    /// the broker redelivers them).
    pub abandoned: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    received: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    retried_in_place: AtomicU64,
    dead_lettered: AtomicU64,
    released: AtomicU64,
    settle_failures: AtomicU64,
    abandoned: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, AtomicOrdering::Relaxed);
    }
    fn report(&self) -> RunReport {
        let get = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        RunReport {
            received: get(&self.received),
            acked: get(&self.acked),
            retried: get(&self.retried),
            retried_in_place: get(&self.retried_in_place),
            dead_lettered: get(&self.dead_lettered),
            released: get(&self.released),
            settle_failures: get(&self.settle_failures),
            abandoned: get(&self.abandoned),
        }
    }
}

/// Everything the workers share.
pub(crate) struct Shared<H> {
    pub(crate) handler: CatchPanic<Telemetry<H>>,
    pub(crate) dead_letter: DeadLetterRouter,
    pub(crate) policy: RetryPolicy,
    pub(crate) budget: Option<Arc<RetryBudget>>,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    pub(crate) counters: Counters,
    pub(crate) name: String,
    pub(crate) shutdown: CancellationToken,
    /// Handlers running now (abandoned ones are counted from it).
    pub(crate) processing: AtomicU64,
}

/// A consumer: a source, a handler, and the failure contract between them.
///
/// ```
/// use std::sync::Arc;
/// use postbox_core::{Consumer, DeadLetterRouter, Envelope, handler_fn, Publisher, Source};
/// # async fn demo<S: Source>(source: S, broker: Arc<dyn Publisher>) -> Result<(), postbox_core::Error> {
/// let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
///         println!("got {}", env.id);
///         Ok(())
///     }))
///     .concurrency(16)
///     .dead_letter(DeadLetterRouter::new(broker))
///     .build()?;
/// let running = consumer.spawn();
/// // … later, on SIGTERM:
/// let report = running.shutdown().await?;
/// println!("acked {}", report.acked);
/// # Ok(()) }
/// ```
pub struct Consumer<S, H> {
    source: S,
    shared: Arc<Shared<H>>,
    concurrency: usize,
    ordering: ProcessingOrder,
    grace: Duration,
    max_in_flight: usize,
}

/// Builds a [`Consumer`].
pub struct ConsumerBuilder<S, H> {
    source: S,
    handler: H,
    name: Option<String>,
    concurrency: usize,
    ordering: ProcessingOrder,
    policy: RetryPolicy,
    budget: Option<Arc<RetryBudget>>,
    dead_letter: Option<DeadLetterRouter>,
    grace: Duration,
    shutdown: CancellationToken,
    max_in_flight: Option<usize>,
}

impl<S: Source, H: Handler> Consumer<S, H> {
    /// Starts building a consumer of `source` with `handler`.
    pub fn builder(source: S, handler: H) -> ConsumerBuilder<S, H> {
        ConsumerBuilder {
            source,
            handler,
            name: None,
            concurrency: 1,
            ordering: ProcessingOrder::Unordered,
            policy: RetryPolicy::default(),
            budget: None,
            dead_letter: None,
            grace: Duration::from_secs(30),
            shutdown: CancellationToken::new(),
            max_in_flight: None,
        }
    }

    /// The token that stops this consumer when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled (or the source closes), then
    /// stops fetching, lets in-flight handlers finish and settle within the
    /// grace period, and returns what it did. Handlers still running after the
    /// grace period are abandoned unsettled: the broker redelivers them.
    pub async fn run(self) -> Result<RunReport, Error> {
        let Consumer {
            source,
            shared,
            concurrency,
            ordering,
            grace,
            max_in_flight,
        } = self;
        // Each task hands the source back when it ends (or `None`), so the
        // source can be closed explicitly once no worker uses it.
        let mut tasks: JoinSet<Option<S>> = JoinSet::new();
        match ordering {
            ProcessingOrder::Unordered if concurrency == 1 => {
                let shared = shared.clone();
                tasks.spawn(async move {
                    Some(worker::unordered(shared, worker::Owned(source)).await.0)
                });
            }
            ProcessingOrder::Unordered => {
                let shared = shared.clone();
                tasks.spawn(
                    async move { Some(worker::concurrent(shared, source, concurrency).await) },
                );
            }
            ProcessingOrder::PerKey => {
                let mut lanes = Vec::with_capacity(concurrency);
                for _ in 0..concurrency {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    lanes.push(tx);
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        worker::lane(shared, rx).await;
                        None
                    });
                }
                let bound = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(concurrency)));
                let shared = shared.clone();
                tasks.spawn(
                    async move { Some(worker::dispatch(shared, source, lanes, bound).await) },
                );
            }
        }
        let mut returned = None;
        // Wait for shutdown, or for every worker to end (source closed).
        let mut finished_early = false;
        tokio::select! {
            _ = shared.shutdown.cancelled() => {}
            _ = join_all(&mut tasks, &mut returned) => finished_early = true,
        }
        if !finished_early
            && tokio::time::timeout(grace, join_all(&mut tasks, &mut returned))
                .await
                .is_err()
        {
            let left = shared.processing.load(AtomicOrdering::Relaxed);
            tracing::warn!(consumer = %shared.name, grace = ?grace, "grace period over; abandoning in-flight handlers unsettled (they will be redelivered)");
            shared
                .counters
                .abandoned
                .fetch_add(left, AtomicOrdering::Relaxed);
            tasks.abort_all();
            join_all(&mut tasks, &mut returned).await;
        }
        let source = returned;
        // Explicit close: commits what was processed and leaves the group
        // (Kafka), cancels the consumer (RabbitMQ). A source a worker still
        // held when it was aborted is closed by its `Drop`.
        if let Some(source) = source {
            if let Err(e) = source.close().await {
                tracing::warn!(consumer = %shared.name, error = %e, "closing the source failed");
            }
        }
        shared.shutdown.cancel();
        Ok(shared.counters.report())
    }

    /// Runs on a new task; the handle stops it.
    pub fn spawn(self) -> RunningConsumer
    where
        S: Source,
    {
        let token = self.shared.shutdown.clone();
        RunningConsumer {
            token,
            task: tokio::spawn(self.run()),
        }
    }
}

async fn join_all<S: 'static>(tasks: &mut JoinSet<Option<S>>, returned: &mut Option<S>) {
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Some(source)) => *returned = Some(source),
            Ok(None) => {}
            Err(e) if e.is_panic() => {
                tracing::error!("a consumer worker panicked outside a handler: {e}");
            }
            Err(_) => {}
        }
    }
}

/// A consumer running on its own task.
#[derive(Debug)]
pub struct RunningConsumer {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<RunReport, Error>>,
}

impl RunningConsumer {
    /// The token that stops it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Stops it gracefully and waits for the report.
    pub async fn shutdown(self) -> Result<RunReport, Error> {
        self.token.cancel();
        self.join().await
    }

    /// Waits until it stops by itself (source closed or token cancelled elsewhere).
    pub async fn join(self) -> Result<RunReport, Error> {
        self.task
            .await
            .map_err(|e| Error::new(ErrorKind::Other, "consumer task failed").with_source(e))?
    }
}

impl<S: Source, H: Handler> ConsumerBuilder<S, H> {
    /// Names the consumer (group or handler name) for `dlqconsumer`,
    /// telemetry and logs; defaults to the source's destination.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Messages in flight at once (default 1); the in-flight bound.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// [`ProcessingOrder::PerKey`] only: how many deliveries may be fetched and not
    /// yet settled across all lanes (default 4 × concurrency, at least the
    /// concurrency). A key waiting on a retry keeps its lane; the other keys
    /// keep flowing until this bound is reached. (Unordered: the bound is the
    /// concurrency.)
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n.max(1));
        self
    }

    /// Sets the ordering mode (default [`ProcessingOrder::Unordered`]).
    pub fn ordering(mut self, ordering: ProcessingOrder) -> Self {
        self.ordering = ordering;
        self
    }

    /// Sets the retry policy (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets a retry budget (none by default).
    pub fn retry_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Where dead letters go. Required: a consumer that could only drop a
    /// poison message is refused at build time.
    pub fn dead_letter(mut self, router: DeadLetterRouter) -> Self {
        self.dead_letter = Some(router);
        self
    }

    /// How long in-flight handlers get to finish on shutdown (default 30 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Uses `token` for shutdown (e.g. one shared by the whole service).
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Builds the consumer; fails with [`ErrorKind::Config`] without a dead-letter router.
    pub fn build(self) -> Result<Consumer<S, H>, Error> {
        let dead_letter = self.dead_letter.ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "a consumer needs a dead-letter router (ConsumerBuilder::dead_letter)",
            )
        })?;
        let destination = self.source.destination().to_string();
        let name = self.name.unwrap_or_else(|| destination.clone());
        let metrics = Arc::new(ConsumerMetrics::new(
            self.source.system(),
            &destination,
            &name,
        ));
        let handler = CatchPanicLayer
            .layer(TelemetryLayer::from_metrics(metrics.clone()).layer(self.handler));
        Ok(Consumer {
            source: self.source,
            shared: Arc::new(Shared {
                handler,
                dead_letter,
                policy: self.policy,
                budget: self.budget,
                metrics,
                counters: Counters::default(),
                name,
                shutdown: self.shutdown,
                processing: AtomicU64::new(0),
            }),
            concurrency: self.concurrency,
            ordering: self.ordering,
            grace: self.grace,
            max_in_flight: self.max_in_flight.unwrap_or(4 * self.concurrency),
        })
    }
}
