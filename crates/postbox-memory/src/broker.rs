//! The broker: queues, topic bindings, publishing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::telemetry::PublisherMetrics;
use postbox_core::{
    Backlog, BatchReport, BoxSource, Broker, Capabilities, Envelope, Error, ErrorKind, Health,
    Limit, PublishError, Publisher, SubscribeOptions,
};

use crate::limits::Limits;
use crate::queue::{Queue, QueueOptions};
use crate::source::MemorySource;

/// `messaging.system` of the in-memory broker.
pub const SYSTEM: &str = "memory";

#[derive(Debug, Default)]
struct Topology {
    queues: HashMap<String, Arc<Queue>>,
    /// topic → queues it fans out to
    bindings: HashMap<String, Vec<Arc<Queue>>>,
}

#[derive(Debug)]
struct Inner {
    /// Read-mostly: publishing only reads it (and holds the read lock while
    /// enqueueing, so it needs no reference count traffic on the queues);
    /// declaring, binding and auto-creating write it.
    topology: RwLock<Topology>,
    limits: Limits,
    auto_create: bool,
    /// Options of queues created without explicit ones.
    queue_defaults: QueueOptions,
    /// Set by `Broker::close`: publishing fails with `Closed`.
    closed: AtomicBool,
    metrics: PublisherMetrics,
}

/// An in-process broker: the embedded default, and a test double that behaves
/// like a real broker (competing consumers, fan-out, acks, redelivery with
/// attempt counts, visibility timeouts, delays, FIFO groups, limits).
///
/// Routing: publishing to a name delivers to the queue of that name, and to
/// every queue [bound](MemoryBroker::bind) to it as a topic. A name that is
/// neither is created as a queue on first use (unless
/// [`without_auto_create`](MemoryBroker::without_auto_create), then it is an
/// [`ErrorKind::Unroutable`] error — never a silent drop).
///
/// ```
/// use postbox_core::{Delivery, Envelope, Publisher, Source};
/// use postbox_memory::MemoryBroker;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let broker = MemoryBroker::new();
/// broker.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await.unwrap();
/// let mut source = broker.subscribe("orders");
/// let delivery = source.next().await.unwrap().unwrap();
/// assert_eq!(delivery.envelope().event_type, "order.placed");
/// delivery.ack().await.unwrap();
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker without limits that creates queues on first use.
    pub fn new() -> Self {
        Self::with_limits(Limits::none())
    }

    /// A broker enforcing `limits` (e.g. [`Limits::sqs`]).
    pub fn with_limits(limits: Limits) -> Self {
        MemoryBroker {
            inner: Arc::new(Inner {
                topology: RwLock::new(Topology::default()),
                limits,
                auto_create: true,
                queue_defaults: QueueOptions::default(),
                closed: AtomicBool::new(false),
                metrics: PublisherMetrics::new(SYSTEM),
            }),
        }
    }

    /// Publishing to an undeclared name becomes an `Unroutable` error.
    pub fn without_auto_create(self) -> Self {
        self.rebuilt(|inner| inner.auto_create = false)
    }

    /// Options for every queue created without explicit ones (auto-created,
    /// bound, or provisioned through [`Broker`]), e.g. a visibility timeout.
    pub fn with_queue_defaults(self, options: QueueOptions) -> Self {
        self.rebuilt(|inner| inner.queue_defaults = options)
    }

    fn rebuilt(self, change: impl FnOnce(&mut Inner)) -> Self {
        let inner = &self.inner;
        let mut next = Inner {
            topology: RwLock::new(std::mem::take(&mut *write(&inner.topology))),
            limits: inner.limits.clone(),
            auto_create: inner.auto_create,
            queue_defaults: inner.queue_defaults.clone(),
            closed: AtomicBool::new(inner.closed.load(AtomicOrdering::Relaxed)),
            metrics: inner.metrics.clone(),
        };
        change(&mut next);
        MemoryBroker {
            inner: Arc::new(next),
        }
    }

    /// The limits this broker enforces.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    fn default_options(&self, name: &str) -> QueueOptions {
        QueueOptions {
            fifo: self.inner.limits.fifo_by_name && name.ends_with(".fifo"),
            ..self.inner.queue_defaults.clone()
        }
    }

    /// Declares a queue with default options (idempotent).
    pub fn declare_queue(&self, name: &str) {
        self.declare_queue_with(name, self.default_options(name));
    }

    /// Declares a queue (idempotent: an existing queue keeps its options).
    pub fn declare_queue_with(&self, name: &str, options: QueueOptions) {
        let _ = self.queue_or_create(name, Some(options));
    }

    fn queue_or_create(&self, name: &str, options: Option<QueueOptions>) -> Arc<Queue> {
        let mut topo = write(&self.inner.topology);
        if let Some(q) = topo.queues.get(name) {
            return q.clone();
        }
        let options = options.unwrap_or_else(|| self.default_options(name));
        let q = Queue::new(name, options, &self.inner.limits);
        topo.queues.insert(name.to_string(), q.clone());
        q
    }

    /// Binds `queue` to `topic`: everything published to `topic` is copied to
    /// `queue` (fan-out). Declares the queue if needed; idempotent.
    pub fn bind(&self, topic: &str, queue: &str) {
        let q = self.queue_or_create(queue, None);
        let mut topo = write(&self.inner.topology);
        let bound = topo.bindings.entry(topic.to_string()).or_default();
        if !bound.iter().any(|b| Arc::ptr_eq(b, &q)) {
            bound.push(q);
        }
    }

    /// The queue of consumer group `group` on `topic`: `"{topic}:{group}"`,
    /// declared and bound. Every group gets every message; consumers of one
    /// group compete.
    pub fn group_queue(&self, topic: &str, group: &str) -> String {
        let name = group_queue_name(topic, group);
        self.bind(topic, &name);
        name
    }

    /// Consumes a queue (declared if needed). Several sources on one queue
    /// are competing consumers.
    pub fn subscribe(&self, queue: &str) -> MemorySource {
        MemorySource::new(self.queue_or_create(queue, None))
    }

    /// Consumes `topic` as consumer group `group` (see [`group_queue`](Self::group_queue)).
    pub fn subscribe_group(&self, topic: &str, group: &str) -> MemorySource {
        let name = self.group_queue(topic, group);
        self.subscribe(&name)
    }

    pub(crate) fn existing_queue(&self, name: &str) -> Result<Arc<Queue>, Error> {
        read(&self.inner.topology)
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no queue named {name:?}")))
    }

    /// Messages ready in `queue` (0 if it does not exist).
    pub fn depth(&self, queue: &str) -> usize {
        self.existing_queue(queue).map(|q| q.depth()).unwrap_or(0)
    }

    /// Deliveries of `queue` handed out and not yet settled.
    pub fn unacked(&self, queue: &str) -> u64 {
        self.existing_queue(queue)
            .map(|q| q.unacked.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Messages of `queue` waiting for a delay or a retry timer.
    pub fn delayed(&self, queue: &str) -> usize {
        self.existing_queue(queue).map(|q| q.delayed()).unwrap_or(0)
    }

    /// Declares `destination` as a queue for a publish that found no route
    /// (or fails with `Unroutable` without auto-creation).
    fn create_route(&self, destination: &str) -> Result<(), Error> {
        let mut topo = write(&self.inner.topology);
        if topo.queues.contains_key(destination)
            || topo
                .bindings
                .get(destination)
                .is_some_and(|b| !b.is_empty())
        {
            return Ok(()); // declared meanwhile
        }
        if !self.inner.auto_create {
            return Err(Error::new(
                ErrorKind::Unroutable,
                format!("no queue or binding for {destination:?}; the message would be lost"),
            ));
        }
        let q = Queue::new(
            destination,
            self.default_options(destination),
            &self.inner.limits,
        );
        topo.queues.insert(destination.to_string(), q);
        Ok(())
    }

    fn check(
        &self,
        targets: &[Arc<Queue>],
        env: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), Error> {
        self.inner.limits.check_message(env)?;
        if let Some(delay) = delay {
            self.inner.limits.check_delay(delay)?;
        }
        for q in targets {
            if q.options.fifo {
                if env.key.is_none() {
                    return Err(Error::limit(Limit::FifoGroupRequired));
                }
                if delay.is_some_and(|d| !d.is_zero()) {
                    return Err(Error::limit(Limit::FifoDelayUnsupported));
                }
            }
        }
        Ok(())
    }

    fn route(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Option<Duration>,
    ) -> Result<(), PublishError> {
        if self.inner.closed.load(AtomicOrdering::Relaxed) {
            let e = Error::new(ErrorKind::Closed, "the memory broker handle is closed");
            return Err(self.failed(e, envelope));
        }
        loop {
            let topo = read(&self.inner.topology);
            // Publishing delivers to every queue bound to `destination` (in
            // binding order), then to the queue of that name if it is not one
            // of them. Resolved without allocating or cloning in the common cases.
            let both: Vec<Arc<Queue>>;
            let targets: &[Arc<Queue>] = match (
                topo.bindings.get(destination).filter(|b| !b.is_empty()),
                topo.queues.get(destination),
            ) {
                (None, Some(q)) => std::slice::from_ref(q),
                (Some(bound), None) => bound,
                (Some(bound), Some(q)) if bound.iter().any(|t| Arc::ptr_eq(t, q)) => bound,
                (Some(bound), Some(q)) => {
                    both = bound.iter().chain(std::iter::once(q)).cloned().collect();
                    &both
                }
                (None, None) => {
                    drop(topo);
                    if let Err(e) = self.create_route(destination) {
                        return Err(self.failed(e, envelope));
                    }
                    continue;
                }
            };
            if let Err(e) = self.check(targets, &envelope, delay) {
                return Err(self.failed(e, envelope));
            }
            let (last, rest) = targets.split_last().expect("targets is never empty");
            for q in rest {
                self.enqueue(q, envelope.clone(), delay);
            }
            self.enqueue(last, envelope, delay);
            self.inner.metrics.published.increment(1);
            return Ok(());
        }
    }

    fn enqueue(&self, q: &Arc<Queue>, envelope: Envelope, delay: Option<Duration>) {
        match delay {
            Some(d) if !d.is_zero() => q.push_later(envelope, d),
            _ => {
                q.push(envelope);
            }
        }
    }

    fn failed(&self, error: Error, envelope: Envelope) -> PublishError {
        self.inner.metrics.failed.increment(1);
        PublishError::new(error, envelope)
    }

    /// The queue a subscription of `options` on `destination` reads: the
    /// group's queue bound to the topic, or the destination itself.
    fn queue_of(&self, destination: &str, group: Option<&str>) -> String {
        match group {
            Some(g) => self.group_queue(destination, g),
            None => destination.to_string(),
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        let limits = &self.inner.limits;
        let mut caps = Capabilities::none();
        caps.group_fan_out = true;
        caps.ordered = true;
        caps.redelivery_on_close = true;
        caps.scheduled_publish = Some(limits.max_delay.unwrap_or(Duration::MAX));
        caps.max_message_bytes = limits.max_body_bytes;
        caps.max_headers = limits.max_attributes;
        caps.backlog = true;
        caps
    }

    async fn provision(&self, destination: &str, options: &SubscribeOptions) -> Result<(), Error> {
        let queue = self.queue_of(destination, options.group_name());
        self.declare_queue(&queue);
        self.declare_queue(&postbox_core::dlq::default_destination(&queue));
        Ok(())
    }

    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error> {
        if options.provisions() {
            self.provision(destination, &options).await?;
        }
        let queue = self.queue_of(destination, options.group_name());
        Ok(Box::new(self.subscribe(&queue)))
    }

    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error> {
        let name = match group {
            Some(g) => group_queue_name(destination, g),
            None => destination.to_string(),
        };
        let q = self.existing_queue(&name)?;
        let mut backlog = Backlog::waiting(q.depth() as u64);
        backlog.in_flight = Some(q.unacked.load(AtomicOrdering::Relaxed));
        backlog.delayed = Some(q.delayed() as u64);
        Ok(backlog)
    }

    async fn health(&self) -> Result<Health, Error> {
        if self.inner.closed.load(AtomicOrdering::Relaxed) {
            return Err(Error::new(
                ErrorKind::Closed,
                "the memory broker handle is closed",
            ));
        }
        Ok(Health::new(SYSTEM, Duration::ZERO, "in-process broker"))
    }

    /// Delivered after `delay` (SQS `DelaySeconds` with [`Limits::sqs`]).
    async fn publish_delayed(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Duration,
    ) -> Result<(), PublishError> {
        self.route(destination, envelope, Some(delay))
    }

    async fn close(&self) -> Result<(), Error> {
        self.inner.closed.store(true, AtomicOrdering::Relaxed);
        Ok(())
    }
}

/// The queue of consumer group `group` on `topic`.
fn group_queue_name(topic: &str, group: &str) -> String {
    format!("{topic}:{group}")
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.route(destination, envelope, None)
    }

    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        BatchReport::new(
            envelopes
                .into_iter()
                .map(|e| self.route(destination, e, None))
                .collect(),
        )
    }
}
