//! # postbox-rabbitmq
//!
//! The RabbitMQ (AMQP 0-9-1) adapter of postbox, on [lapin]. No broker
//! plugin is needed.
//!
//! [`RabbitBroker`] is the handle: a [`Broker`](postbox_core::Broker) that
//! publishes (publisher confirms + `mandatory`, persistent, pipelined),
//! subscribes ([`RabbitSource`]: manual acks, prefetch, grouped acks),
//! provisions queues with their `<queue>.dlq`, reports [`Backlog`](postbox_core::Backlog)
//! and [`Health`](postbox_core::Health), publishes with a delay through
//! delay-tier queues (also how retries wait), operates dead-letter queues
//! ([`DeadLetterOps`](postbox_core::DeadLetterOps)) and declares any
//! [`Topology`].
//!
//! * Publishing: `orders` (or `queue:orders`) is the queue `orders` through
//!   the default exchange; `exchange:events` is the exchange `events` with the
//!   envelope key as routing key; `exchange:events/order.placed` gives the
//!   routing key.
//! * Subscribing: `orders` consumes the queue `orders` (every subscriber
//!   competes, whatever the group); `exchange:events` with group `billing`
//!   consumes the queue `events.billing` bound to the fanout exchange
//!   `events`, so each group gets every message.
//! * Wire format: the CloudEvents AMQP binding, binary mode with
//!   `cloudEvents:` headers ([`HeaderPrefix`]) or structured mode
//!   ([`ContentMode`]), plus the native AMQP properties; decoding reads
//!   both modes and foreign messages. Envelope headers whose names are not
//!   CloudEvents attribute names (`x-trace`, `traceId`) travel as plain AMQP
//!   headers in both modes; the few names RabbitMQ and postbox reserve
//!   (`cloudEvents:…`, `ce-…`, `postbox-…`, `x-death`, …) are an `Encode`
//!   error. A message with CloudEvents markers that
//!   breaks the format is handed to the consumer runtime as undecodable
//!   ([`Delivery::decode_error`](postbox_core::Delivery::decode_error)), which
//!   dead-letters it with reason `decode` through the consumer's router.
//!
//! ```no_run
//! use postbox_core::{handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions};
//! use postbox_rabbitmq::{RabbitBroker, RabbitConfig};
//!
//! # async fn run() -> Result<(), postbox_core::Error> {
//! // Or `postbox::connect("amqp://…")` for the type-erased handle.
//! let rabbit = RabbitBroker::connect(RabbitConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f")?).await?;
//! let source = rabbit
//!     .subscribe("exchange:orders", SubscribeOptions::group("billing").prefetch(8))
//!     .await?; // declares the fanout exchange `orders` and the queue `orders.billing`
//! rabbit.publish("exchange:orders", Envelope::new("order.placed", r#"{"id":1}"#)).await?;
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
//!         println!("got {}", env.id);
//!         Ok(())
//!     }))
//!     .concurrency(8)
//!     .dead_letter(DeadLetterRouter::new(rabbit.clone()))
//!     .build()?
//!     .spawn();
//! // … on SIGTERM: stop consuming (every ack reaches the broker), then close.
//! consumer.shutdown().await?;
//! rabbit.close().await?;
//! # Ok(()) }
//! ```

// docs.rs (`--cfg docsrs`, see Cargo.toml) labels feature-gated items.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod broker;
mod codec;
mod config;
mod consumer;
mod error;
mod ops;
mod publisher;
mod retry;
mod topology;

pub use codec::{metadata_bytes, MAX_METADATA_BYTES};
pub use config::{
    HeaderPrefix, RabbitConfig, AMQP_URL_ENV, DEFAULT_DELAY_EXCHANGE, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_PREFETCH, DEFAULT_URL,
};
pub use consumer::{RabbitDelivery, RabbitSource};
pub use lapin::{ConnectionProperties, ExchangeKind};
// Core's definitions, re-exported for the configuration and tests of this crate.
pub use postbox_core::codec::{ContentMode, STRUCTURED_CONTENT_TYPE, UNDECODABLE_TYPE};
pub use publisher::RabbitBroker;
pub use topology::{BindingSpec, ExchangeSpec, Overflow, QueueKind, QueueSpec, Topology};

/// `messaging.system` of this adapter.
pub const SYSTEM: &str = "rabbitmq";
