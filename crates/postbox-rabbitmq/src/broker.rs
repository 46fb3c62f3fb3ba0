//! [`Broker`] on RabbitMQ: what `subscribe`, `provision` and `backlog` map a
//! destination and a group to, and the handle's health, delayed publishing
//! and close.
//!
//! | destination | group | queue consumed | provisioned |
//! |---|---|---|---|
//! | `orders` or `queue:orders` | ignored | `orders` | `orders` + `orders.dlq` |
//! | `exchange:shop` | `billing` (required) | `shop.billing` | fanout exchange `shop`, `shop.billing` + `shop.billing.dlq`, binding |

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use lapin::ExchangeKind;
use postbox_core::{
    unsupported, Backlog, BoxSource, Broker, Capabilities, Envelope, Error, ErrorKind, Health,
    Limit, PublishError, SubscribeOptions,
};

use crate::publisher::RabbitBroker;
use crate::topology::{QueueKind, QueueSpec, Topology};
use crate::SYSTEM;

/// What a destination and a group name on RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A plain queue: every subscriber competes.
    Queue(String),
    /// The group's queue `<exchange>.<group>` bound to the fanout exchange.
    Group { exchange: String, queue: String },
}

impl Target {
    fn resolve(destination: &str, group: Option<&str>) -> Result<Target, Error> {
        if let Some(exchange) = destination.strip_prefix("exchange:") {
            if exchange.contains('/') {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "cannot subscribe to `{destination}`: subscribe to `exchange:<name>` (a fanout exchange, one queue per group); for routing keys, declare a Topology and consume its queue"
                    ),
                ));
            }
            if exchange.is_empty() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("`{destination}` names no exchange"),
                ));
            }
            let group = group.ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "a rabbitmq subscription to `{destination}` needs a consumer group (its queue is `{exchange}.<group>`): SubscribeOptions::group(\"name\")"
                    ),
                )
            })?;
            return Ok(Target::Group {
                exchange: exchange.to_string(),
                queue: format!("{exchange}.{group}"),
            });
        }
        let queue = destination.strip_prefix("queue:").unwrap_or(destination);
        if queue.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                format!("`{destination}` names no queue"),
            ));
        }
        Ok(Target::Queue(queue.to_string()))
    }

    fn queue(&self) -> &str {
        match self {
            Target::Queue(q) | Target::Group { queue: q, .. } => q,
        }
    }
}

impl RabbitBroker {
    fn spec(&self, queue: &str) -> QueueSpec {
        match self.inner.config.queue_kind {
            QueueKind::Quorum => QueueSpec::quorum(queue),
            QueueKind::Classic => QueueSpec::classic(queue),
        }
    }

    /// The topology a subscription of `target` needs.
    fn topology_of(&self, target: &Target) -> Topology {
        match target {
            Target::Queue(q) => Topology::new().queue(self.spec(q)),
            Target::Group { exchange, queue } => Topology::new()
                .exchange(exchange, ExchangeKind::Fanout)
                .queue(self.spec(queue))
                .bind(queue, exchange, ""),
        }
    }

    /// The longest delay [`Broker::publish_delayed`] serves: none without
    /// tiers; otherwise any, as a chain of tier hops re-delayed by the
    /// queue's consumers (bounded only by what a due time can express).
    fn max_delay(&self) -> Option<Duration> {
        if self.inner.config.tiers.is_none() {
            None
        } else {
            Some(Duration::MAX)
        }
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn system(&self) -> &'static str {
        SYSTEM
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        // Fan-out is addressed: `exchange:<name>`, a queue per group.
        caps.group_fan_out = false;
        caps.ordered = true;
        caps.redelivery_on_close = true;
        caps.scheduled_publish = self.max_delay();
        caps.max_message_bytes = Some(self.inner.config.max_message_size);
        caps.backlog = true;
        caps
    }

    /// Declares the queue (and its `<queue>.dlq`) of a plain destination, or
    /// for `exchange:<name>` the fanout exchange, the group's queue
    /// `<name>.<group>` (and its DLQ) and the binding; plus the delay tiers.
    async fn provision(&self, destination: &str, options: &SubscribeOptions) -> Result<(), Error> {
        let target = Target::resolve(destination, options.group_name())?;
        self.declare(&self.topology_of(&target)).await?;
        let link = self.link().await?;
        self.ensure_delay_tiers(&link).await
    }

    /// A [`RabbitSource`](crate::RabbitSource) on the queue the destination
    /// and group name (see [`Broker::provision`]), declared first unless
    /// provisioning is off, with the options' prefetch (or the configured one).
    async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<BoxSource, Error> {
        let target = Target::resolve(destination, options.group_name())?;
        let topology = if options.provisions() {
            self.topology_of(&target)
        } else {
            Topology::new()
        };
        let prefetch = options
            .prefetch_hint()
            .unwrap_or(self.inner.config.prefetch);
        let source = self.consume(target.queue(), topology, prefetch).await?;
        Ok(Box::new(source))
    }

    /// `waiting` = the queue's ready messages, `consumers` = consumers
    /// attached (passive `queue.declare`); unacked and delayed messages are
    /// not reported by AMQP. `NotFound` when the queue does not exist.
    async fn backlog(&self, destination: &str, group: Option<&str>) -> Result<Backlog, Error> {
        let target = Target::resolve(destination, group)?;
        let depth = self.queue_depth(target.queue()).await?;
        let mut backlog = Backlog::waiting(depth.messages);
        backlog.consumers = Some(depth.consumers);
        Ok(backlog)
    }

    /// Opens (and closes) a channel on the publishing connection, reconnecting
    /// if needed: the broker answered.
    async fn health(&self) -> Result<Health, Error> {
        let started = Instant::now();
        let link = self.link().await?;
        let channel = self.side_channel().await?;
        crate::ops::close(&channel).await;
        let configuration = link.connection.configuration();
        let detail = format!(
            "{} (vhost {}, frame_max {}, channel_max {}, heartbeat {} s)",
            self.inner.config.redacted_url(),
            link.connection.status().vhost(),
            configuration.frame_max(),
            configuration.channel_max(),
            configuration.heartbeat(),
        );
        Ok(Health::new(SYSTEM, started.elapsed(), detail))
    }

    /// Through the delay tiers (see the crate docs): the message waits in the
    /// longest tier that fits and the queue's consumers re-delay it until it
    /// is due. Queues only: an `exchange:` destination is
    /// [`ErrorKind::Unsupported`] (a tier returns messages to a queue).
    async fn publish_delayed(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Duration,
    ) -> Result<(), PublishError> {
        if destination.starts_with("exchange:") {
            let what = format!("delayed publishing to an exchange ({destination}): the delay tiers return a message to a queue, so publish it to the queue");
            return Err(PublishError::new(unsupported(SYSTEM, &what), envelope));
        }
        let Some(max) = self.max_delay() else {
            let what =
                "delayed publishing without delay tiers (RabbitConfig::delay_tiers is empty)";
            return Err(PublishError::new(unsupported(SYSTEM, what), envelope));
        };
        let queue = match Target::resolve(destination, None) {
            Ok(target) => target.queue().to_string(),
            Err(e) => return Err(PublishError::new(e, envelope)),
        };
        // The due time travels as Unix milliseconds in an i64 header.
        let due = SystemTime::now()
            .checked_add(delay)
            .filter(|due| i64::try_from(postbox_core::delay::due_to_millis(*due)).is_ok());
        let Some(due) = due else {
            let limit = Limit::Delay {
                max,
                requested: delay,
            };
            return Err(PublishError::new(Error::limit(limit), envelope));
        };
        match self.publish_due(&queue, &envelope, due).await {
            Ok(()) => Ok(()),
            Err(e) => Err(PublishError::new(e, envelope)),
        }
    }

    /// Waits for the outstanding publisher confirms, then closes the
    /// publishing connection (idempotent). Publishing, dead-letter operations
    /// and `health` then fail with [`ErrorKind::Closed`]; sources keep their
    /// own connections until they are closed, but no longer reconnect.
    async fn close(&self) -> Result<(), Error> {
        self.shut().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_and_groups_name_queues() {
        assert_eq!(
            Target::resolve("orders", Some("ignored")).unwrap(),
            Target::Queue("orders".into())
        );
        assert_eq!(
            Target::resolve("queue:orders", None).unwrap(),
            Target::Queue("orders".into())
        );
        assert_eq!(
            Target::resolve("exchange:shop", Some("billing")).unwrap(),
            Target::Group {
                exchange: "shop".into(),
                queue: "shop.billing".into()
            }
        );
        for (destination, group) in [
            ("exchange:shop", None),
            ("exchange:shop/order.placed", Some("g")),
            ("exchange:", Some("g")),
            ("", None),
            ("queue:", None),
        ] {
            let e = Target::resolve(destination, group).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config, "{destination}: {e}");
        }
        let e = Target::resolve("exchange:shop", None).unwrap_err();
        assert!(e.message().contains("consumer group"), "{e}");
    }
}
