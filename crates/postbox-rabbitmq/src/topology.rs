//! Topology: exchanges, queues (classic or quorum, length limits, DLQ), bindings
//! and the delay tiers. Declaring is idempotent (declaring the same thing
//! twice is a no-op; declaring a queue with *different* arguments is a
//! `Config` error from the broker, `406 PRECONDITION_FAILED`).
//!
//! Every queue declared with a [`QueueSpec`] (unless [`QueueSpec::without_dlq`])
//! gets a durable classic `<queue>.dlq`, and its own dead-letter arguments point
//! there (`x-dead-letter-exchange = ""`, `x-dead-letter-routing-key = <queue>.dlq`),
//! so a broker-side dead-letter (a quorum queue's `x-delivery-limit`, a
//! `reject-publish-dlx` overflow) lands in the same DLQ the adapter publishes to.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use postbox_core::Error;

use crate::codec::{short, TIER_HEADER};
use crate::error::from_lapin;

/// Classic or quorum queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// Classic queue (`x-queue-type = classic`).
    Classic,
    /// Quorum queue (`x-queue-type = quorum`): replicated, counts redeliveries
    /// in `x-delivery-count`, supports `x-delivery-limit`.
    #[default]
    Quorum,
}

/// What a full queue does (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message.
    DropHead,
    /// Refuse new publishes (the publisher gets a nack: `Rejected`).
    RejectPublish,
    /// Refuse new publishes and dead-letter them.
    RejectPublishDlx,
}

impl Overflow {
    fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// A durable queue to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Classic or quorum.
    pub kind: QueueKind,
    /// `x-max-length`.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Option<Overflow>,
    /// `x-delivery-limit` (quorum only): the broker dead-letters a message
    /// redelivered more often than this — a safety net under the retry policy.
    pub delivery_limit: Option<u32>,
    /// Declare `<name>.dlq` and point the queue's dead-lettering at it (default true).
    pub dead_letter: bool,
}

impl QueueSpec {
    /// A quorum queue with a DLQ and a delivery limit of 50.
    pub fn quorum(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            kind: QueueKind::Quorum,
            max_length: None,
            max_length_bytes: None,
            overflow: None,
            delivery_limit: Some(50),
            dead_letter: true,
        }
    }

    /// A classic durable queue with a DLQ.
    pub fn classic(name: impl Into<String>) -> Self {
        QueueSpec {
            kind: QueueKind::Classic,
            delivery_limit: None,
            ..QueueSpec::quorum(name)
        }
    }

    /// Sets `x-max-length`.
    pub fn max_length(mut self, n: u64) -> Self {
        self.max_length = Some(n);
        self
    }

    /// Sets `x-max-length-bytes`.
    pub fn max_length_bytes(mut self, n: u64) -> Self {
        self.max_length_bytes = Some(n);
        self
    }

    /// Sets `x-overflow`.
    pub fn overflow(mut self, o: Overflow) -> Self {
        self.overflow = Some(o);
        self
    }

    /// Sets (or clears) `x-delivery-limit` (quorum queues only).
    pub fn delivery_limit(mut self, limit: Option<u32>) -> Self {
        self.delivery_limit = limit;
        self
    }

    /// No `<name>.dlq` and no dead-letter arguments.
    pub fn without_dlq(mut self) -> Self {
        self.dead_letter = false;
        self
    }

    /// The DLQ name, `<name>.dlq`.
    pub fn dlq_name(&self) -> String {
        postbox_core::dlq::default_destination(&self.name)
    }

    /// The `x-` arguments of the declaration.
    pub fn arguments(&self) -> FieldTable {
        let mut t = FieldTable::default();
        let kind = match self.kind {
            QueueKind::Classic => "classic",
            QueueKind::Quorum => "quorum",
        };
        t.insert("x-queue-type".into(), long(kind));
        if self.dead_letter {
            t.insert("x-dead-letter-exchange".into(), long(""));
            t.insert("x-dead-letter-routing-key".into(), long(&self.dlq_name()));
        }
        if let Some(n) = self.max_length {
            t.insert("x-max-length".into(), AMQPValue::LongLongInt(clamp(n)));
        }
        if let Some(n) = self.max_length_bytes {
            t.insert(
                "x-max-length-bytes".into(),
                AMQPValue::LongLongInt(clamp(n)),
            );
        }
        if let Some(o) = self.overflow {
            t.insert("x-overflow".into(), long(o.as_str()));
        }
        if let (QueueKind::Quorum, Some(n)) = (self.kind, self.delivery_limit) {
            t.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(n)),
            );
        }
        t
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A durable exchange to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    /// Exchange name.
    pub name: String,
    /// direct, fanout, topic (`*`, `#`) or headers.
    pub kind: ExchangeKind,
}

/// A binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingSpec {
    /// Queue name.
    pub queue: String,
    /// Exchange name.
    pub exchange: String,
    /// Binding key (a pattern with `*`/`#` on topic exchanges).
    pub routing_key: String,
    /// Binding arguments (headers exchanges: the headers to match and `x-match`).
    pub arguments: FieldTable,
}

/// A set of exchanges, queues and bindings declared together, in that order.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Exchanges.
    pub exchanges: Vec<ExchangeSpec>,
    /// Queues.
    pub queues: Vec<QueueSpec>,
    /// Bindings.
    pub bindings: Vec<BindingSpec>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a durable exchange.
    pub fn exchange(mut self, name: impl Into<String>, kind: ExchangeKind) -> Self {
        self.exchanges.push(ExchangeSpec {
            name: name.into(),
            kind,
        });
        self
    }

    /// Adds a queue.
    pub fn queue(mut self, spec: QueueSpec) -> Self {
        self.queues.push(spec);
        self
    }

    /// Binds `queue` to `exchange` with a binding key.
    pub fn bind(
        mut self,
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.bindings.push(BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            arguments: FieldTable::default(),
        });
        self
    }

    /// Binds `queue` to a headers exchange: messages whose headers match
    /// `headers` (all of them, or any when `match_all` is false).
    pub fn bind_headers(
        mut self,
        queue: impl Into<String>,
        exchange: impl Into<String>,
        headers: &BTreeMap<String, String>,
        match_all: bool,
    ) -> Self {
        let mut args = FieldTable::default();
        args.insert(
            "x-match".into(),
            long(if match_all { "all" } else { "any" }),
        );
        for (k, v) in headers {
            if let Ok(k) = lapin::types::ShortString::try_new(k.as_str()) {
                args.insert(k, long(v));
            }
        }
        self.bindings.push(BindingSpec {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: String::new(),
            arguments: args,
        });
        self
    }

    /// Declares everything on `channel` (idempotent).
    pub(crate) async fn declare(&self, channel: &Channel) -> Result<(), Error> {
        for e in &self.exchanges {
            declare_exchange(channel, &e.name, e.kind.clone()).await?;
        }
        for q in &self.queues {
            declare_queue(channel, q).await?;
        }
        for b in &self.bindings {
            channel
                .queue_bind(
                    short("queue name", &b.queue)?,
                    short("exchange name", &b.exchange)?,
                    short("binding key", &b.routing_key)?,
                    QueueBindOptions::default(),
                    b.arguments.clone(),
                )
                .await
                .map_err(|e| from_lapin(format!("binding {} to {}", b.queue, b.exchange), e))?;
        }
        Ok(())
    }
}

/// Declares a durable exchange.
pub(crate) async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), Error> {
    channel
        .exchange_declare(
            short("exchange name", name)?,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| from_lapin(format!("declaring exchange {name}"), e))
}

/// Declares a queue (and its DLQ first).
pub(crate) async fn declare_queue(channel: &Channel, spec: &QueueSpec) -> Result<(), Error> {
    if spec.dead_letter {
        let dlq = spec.dlq_name();
        channel
            .queue_declare(short("queue name", &dlq)?, durable(), FieldTable::default())
            .await
            .map_err(|e| from_lapin(format!("declaring queue {dlq}"), e))?;
    }
    channel
        .queue_declare(
            short("queue name", &spec.name)?,
            durable(),
            spec.arguments(),
        )
        .await
        .map_err(|e| from_lapin(format!("declaring queue {}", spec.name), e))?;
    Ok(())
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// The tier queue for `tier`: `<delay exchange>.<milliseconds>ms`.
pub(crate) fn tier_queue(exchange: &str, tier: Duration) -> String {
    format!("{exchange}.{}ms", tier.as_millis())
}

/// The value of [`TIER_HEADER`] that routes to `tier`.
pub(crate) fn tier_key(tier: Duration) -> String {
    format!("{}ms", tier.as_millis())
}

/// Declares the delay exchange (headers) and one queue per tier, each with one
/// `x-message-ttl` and dead-lettering to the default exchange *without* a
/// routing-key override, so an expired copy goes back to the queue named by
/// its routing key: its origin queue.
pub(crate) async fn declare_delay_tiers(
    channel: &Channel,
    exchange: &str,
    tiers: &[Duration],
) -> Result<(), Error> {
    declare_exchange(channel, exchange, ExchangeKind::Headers).await?;
    for &tier in tiers {
        let queue = tier_queue(exchange, tier);
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("classic"));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(clamp(u64::try_from(tier.as_millis()).unwrap_or(u64::MAX))),
        );
        args.insert("x-dead-letter-exchange".into(), long(""));
        channel
            .queue_declare(short("queue name", &queue)?, durable(), args)
            .await
            .map_err(|e| from_lapin(format!("declaring delay tier {queue}"), e))?;
        let mut bind = FieldTable::default();
        bind.insert("x-match".into(), long("all"));
        bind.insert(TIER_HEADER.into(), long(&tier_key(tier)));
        channel
            .queue_bind(
                short("queue name", &queue)?,
                short("exchange name", exchange)?,
                "".into(),
                QueueBindOptions::default(),
                bind,
            )
            .await
            .map_err(|e| from_lapin(format!("binding delay tier {queue}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_are_milliseconds() {
        let ms = Duration::from_millis;
        assert_eq!(tier_queue("postbox.delay", ms(500)), "postbox.delay.500ms");
        assert_eq!(tier_key(Duration::from_secs(3600)), "3600000ms");
    }

    #[test]
    fn queue_arguments() {
        let q = QueueSpec::quorum("orders")
            .max_length(10)
            .overflow(Overflow::RejectPublish);
        let a = q.arguments();
        let inner = a.inner();
        assert!(inner.contains_key("x-delivery-limit"));
        assert!(inner.contains_key("x-dead-letter-routing-key"));
        assert_eq!(q.dlq_name(), "orders.dlq");
        let c = QueueSpec::classic("c").without_dlq();
        assert!(!c.arguments().inner().contains_key("x-dead-letter-exchange"));
        assert!(!c.arguments().inner().contains_key("x-delivery-limit"));
    }
}
