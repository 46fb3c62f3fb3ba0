//! # postbox-rabbitmq
//!
//! The RabbitMQ (AMQP 0-9-1) adapter of postbox, on [lapin].
//!
//! * [`RabbitMq`] is the client: a [`Publisher`](postbox_core::Publisher)
//!   (confirms + `mandatory`, persistent, pipelined), a factory of
//!   [`RabbitSource`] subscriptions (manual acks, prefetch), topology
//!   declaration ([`Topology`]), delay tiers for retries ([`retry`]) and
//!   [`DeadLetterOps`](postbox_core::DeadLetterOps) (count, peek, replay, purge).
//! * Destinations: `orders` (or `queue:orders`) publishes to the queue
//!   `orders` through the default exchange; `exchange:events` publishes to the
//!   exchange `events` with the envelope key as routing key;
//!   `exchange:events/order.placed` gives the routing key.
//! * Wire format: CloudEvents binary mode with `cloudEvents:` headers plus the
//!   native properties ([`codec`]).
//!
//! ```no_run
//! use postbox_core::{Consumer, DeadLetterRouter, Envelope, Publisher, handler_fn};
//! use postbox_rabbitmq::{QueueSpec, RabbitConfig, RabbitMq, SubscribeOptions};
//! use std::sync::Arc;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let rabbit = RabbitMq::connect(RabbitConfig::from_env()).await?;
//! let source = rabbit
//!     .subscribe("orders", SubscribeOptions::new().prefetch(8).declare_queue(QueueSpec::quorum("orders")))
//!     .await?;
//! rabbit.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await?;
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| {
//!         println!("got {}", env.id);
//!         async { Ok(()) }
//!     }))
//!     .concurrency(8)
//!     .dead_letter(DeadLetterRouter::new(Arc::new(rabbit.clone())))
//!     .build()?
//!     .spawn();
//! consumer.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod codec;
pub mod config;
mod consumer;
pub mod error;
mod ops;
mod publisher;
pub mod retry;
pub mod topology;

pub use config::{HeaderPrefix, RabbitConfig};
pub use consumer::{RabbitDelivery, RabbitSource, SubscribeOptions};
pub use lapin::{ConnectionProperties, ExchangeKind};
pub use ops::QueueDepth;
pub use publisher::RabbitMq;
pub use topology::{Overflow, QueueKind, QueueSpec, Topology};

/// `messaging.system` of this adapter.
pub const SYSTEM: &str = "rabbitmq";
