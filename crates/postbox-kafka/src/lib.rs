//! # postbox-kafka
//!
//! The Apache Kafka adapter of postbox, on rdkafka (bundled librdkafka).
//! Start from [`KafkaBroker`]: `postbox::connect("kafka://host:9092")` with
//! the facade, or [`KafkaBroker::connect`] with a [`KafkaConfig`].
//!
//! * Publishing ([`Publisher`](postbox_core::Publisher)): idempotent
//!   producer, `acks=all`; `publish` resolves on the delivery report,
//!   `publish_batch` pipelines and reports each record; CloudEvents binary
//!   mode (`ce_*` headers, [`CONTENT_TYPE`], record key = partition key);
//!   size checked against `message.max.bytes` before sending.
//! * Subscribing ([`Broker::subscribe`](postbox_core::Broker::subscribe), or
//!   [`KafkaBroker::source`] for the concrete [`KafkaSource`]): a consumer
//!   group on a topic; offsets stored only after processing, committed as
//!   the contiguous completed watermark per partition; rebalance-safe;
//!   foreign records consumed with a synthesized envelope; closing commits
//!   and leaves the group.
//! * Retries ([`retry`]): ordered mode retries in place (core's
//!   `ProcessingOrder::PerKey`); unordered mode republishes to delay-tier
//!   retry topics `<topic>.retry.<tier>` whose partitions are paused until
//!   due. Dead letters go to `<topic>.dlq` through core's `DeadLetterRouter`.
//! * Operations: provisioning ([`TopologySpec`]), DLQ count / peek / replay /
//!   purge, consumer lag as [`Backlog`](postbox_core::Backlog), health.
//!
//! ```no_run
//! use postbox_core::{
//!     handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions,
//! };
//! use postbox_kafka::{KafkaBroker, KafkaConfig, TopologySpec};
//! # #[tokio::main] async fn main() -> Result<(), postbox_core::Error> {
//! let config = KafkaConfig::from_url("kafka://127.0.0.1:9092")?
//!     .topology(TopologySpec::new(3, 1)); // what subscribe provisions
//! let broker = KafkaBroker::connect(config).await?;
//! broker.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await?;
//!
//! // Topic, retry tiers and DLQ are created if missing; group "billing".
//! let source = broker.subscribe("orders", SubscribeOptions::group("billing")).await?;
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
//!         println!("got {}", env.id);
//!         Ok(())
//!     }))
//!     .concurrency(8)
//!     .dead_letter(DeadLetterRouter::new(broker.clone()))
//!     .build()?
//!     .spawn();
//! // … on SIGTERM: finishes in-flight work, commits, leaves the group.
//! consumer.shutdown().await?;
//! broker.close().await?;
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
pub mod retry;
mod topology;

pub use broker::KafkaBroker;
pub use codec::{CE_PREFIX, CONTENT_TYPE, DECODE_ERROR};
pub use config::{KafkaConfig, BOOTSTRAP_ENV};
pub use consumer::{KafkaDelivery, KafkaSource};
pub use publisher::{PRODUCER_DEFAULTS, SYSTEM};
pub use topology::TopologySpec;
// Core's definitions, re-exported for the configuration of this crate.
pub use postbox_core::codec::{ContentMode, STRUCTURED_CONTENT_TYPE, UNDECODABLE_TYPE};

/// Re-export of the rdkafka crate, for its `ClientConfig` and native types.
pub use rdkafka;
