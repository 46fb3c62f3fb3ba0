//! [`SqsBroker`] as a [`Broker`]: what a destination and a group map to,
//! provisioning, backlog, health, scheduled publishing and close.

use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{
    Backlog, BoxSource, Broker, Capabilities, Envelope, Error, ErrorKind, Health, PublishError,
    SubscribeOptions,
};

use crate::config::{group_queue, is_url, name_of, Destination};
use crate::publisher::{SqsBroker, MAX_DELAY, SYSTEM};
use crate::topology::{QueueSpec, SubscriptionSpec};

/// What a subscription reads.
enum Target {
    /// A queue (name or URL), read by every group alike.
    Queue(String),
    /// The queue of one group, subscribed to an SNS topic (name or ARN).
    Topic { topic: String, queue: String },
}

impl SqsBroker {
    /// The queue behind `destination` for `group`: the queue itself, or
    /// `<topic>-<group>` for `sns:<topic>` (which needs a group).
    fn target(&self, destination: &str, group: Option<&str>) -> Result<Target, Error> {
        match Destination::parse(destination) {
            Destination::Queue(queue) => Ok(Target::Queue(queue)),
            Destination::Topic(topic) => {
                let group = group.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "{destination:?} is an SNS topic: a subscription needs a consumer group \
                             (SubscribeOptions::group(\"name\")), whose queue is <topic>-<group>"
                        ),
                    )
                })?;
                let queue = group_queue(&topic, group);
                Ok(Target::Topic { topic, queue })
            }
        }
    }

    /// The queue (and `<queue>.dlq`, redrive after `max_receive_count`) that
    /// provisioning declares.
    fn queue_spec(&self, queue: &str) -> QueueSpec {
        QueueSpec::new(queue).max_receive_count(self.inner.settings.max_receive_count)
    }
}

impl Target {
    fn queue(&self) -> &str {
        match self {
            Target::Queue(q) | Target::Topic { queue: q, .. } => q,
        }
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    /// Fan-out is addressed (`sns:<topic>`, a queue per group), so
    /// `group_fan_out` is false; order is kept by FIFO queues only, so
    /// `ordered` is false (an ordered subscription to a `.fifo` queue is
    /// accepted).
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.redelivery_on_close = true;
        caps.scheduled_publish = Some(MAX_DELAY);
        caps.max_message_bytes = Some(self.inner.settings.max_sqs_bytes);
        caps.max_headers = Some(crate::codec::MAX_ATTRIBUTES);
        caps.backlog = true;
        caps
    }

    /// A queue: declares it with its `<queue>.dlq` and redrive policy (a
    /// queue URL is used as it is). `sns:<topic>` + group: declares the topic
    /// (unless given by ARN), the queue `<topic>-<group>` with its DLQ, and a
    /// raw-delivery subscription of the queue to the topic.
    async fn provision(&self, destination: &str, options: &SubscribeOptions) -> Result<(), Error> {
        self.ensure_open()?;
        match self.target(destination, options.group_name())? {
            Target::Queue(queue) => {
                if !is_url(&queue) {
                    self.declare_queue(&self.queue_spec(&queue)).await?;
                }
            }
            Target::Topic { topic, queue } => {
                if !topic.starts_with("arn:") {
                    self.declare_topic(&topic).await?;
                }
                self.declare_queue(&self.queue_spec(&queue)).await?;
                self.declare_subscription(&SubscriptionSpec::new(topic, queue))
                    .await?;
            }
        }
        Ok(())
    }

    /// Consumes the queue behind `destination` (see [`Broker::provision`]),
    /// with the prefetch hint as the receive batch (at most 10). An ordered
    /// subscription to a standard queue is [`ErrorKind::Unsupported`].
    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error> {
        self.ensure_open()?;
        let target = self.target(destination, options.group_name())?;
        let queue = target.queue();
        if options.is_ordered() && !name_of(queue).ends_with(".fifo") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{SYSTEM} keeps order on FIFO queues only; {queue:?} is a standard queue (use a `.fifo` queue or topic)"
                ),
            ));
        }
        if options.provisions() {
            self.provision(destination, &options).await?;
        }
        let batch = options.prefetch_hint().map_or(10, |p| i32::from(p.min(10)));
        Ok(Box::new(crate::consumer::open(self, queue, batch).await?))
    }

    /// `waiting` = `ApproximateNumberOfMessages`, `in_flight` = `…NotVisible`,
    /// `delayed` = `…Delayed` of the queue behind `destination` (a group is
    /// needed for `sns:<topic>`).
    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error> {
        let target = self.target(destination, group)?;
        self.queue_backlog(target.queue()).await
    }

    /// A `ListQueues` of one, within 5 s.
    async fn health(&self) -> Result<Health, Error> {
        self.check_health().await
    }

    /// `DelaySeconds` (rounded up to whole seconds) on a standard queue. A
    /// delay beyond 15 minutes is a
    /// [`Limit::Delay`](postbox_core::Limit::Delay) error; FIFO queues have no
    /// per-message delay
    /// ([`Limit::FifoDelayUnsupported`](postbox_core::Limit::FifoDelayUnsupported))
    /// and SNS topics none at all ([`ErrorKind::Config`]).
    async fn publish_delayed(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Duration,
    ) -> Result<(), PublishError> {
        self.send(destination, envelope, Some(delay)).await
    }

    /// Refuses new work ([`ErrorKind::Closed`]) and stops the receivers of
    /// every source of this handle (close the sources, or let their consumers
    /// stop, to wait for their acks). Nothing is buffered on the publishing
    /// side: every publish returned once SQS/SNS answered.
    async fn close(&self) -> Result<(), Error> {
        self.inner.shutdown.cancel();
        Ok(())
    }
}
