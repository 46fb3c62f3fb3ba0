//! # postbox-kafka
//!
//! The Apache Kafka adapter of postbox, on rdkafka (bundled librdkafka).
//!
//! * [`KafkaPublisher`]: idempotent producer, `acks=all`; `publish` resolves
//!   on the delivery report, `publish_batch` pipelines and reports each
//!   record; CloudEvents binary mode (`ce_*` headers, `content-type`, record
//!   key = partition key, see [`codec`]); size checked against
//!   `message.max.bytes` before sending.
//! * [`KafkaSource`]: a consumer group; offsets stored only after processing,
//!   committed as the contiguous completed watermark per partition;
//!   rebalance-safe; foreign records consumed with a synthesized envelope.
//! * Retries ([`retry`]): ordered mode retries in place (core's
//!   `ProcessingOrder::PerKey`); unordered mode republishes to delay-tier retry
//!   topics `<topic>.retry.<tier>` whose partitions are paused until due.
//!   Dead letters go to `<topic>.dlq` through core's `DeadLetterRouter`.
//! * [`Topology`] (opt-in topic creation) and [`KafkaOps`] (DLQ count / peek
//!   / replay / purge, consumer lag, health).
//!
//! ```no_run
//! use std::sync::Arc;
//! use postbox_core::{handler_fn, Consumer, DeadLetterRouter, Envelope, Publisher};
//! use postbox_kafka::{KafkaConfig, KafkaPublisher, KafkaSource, TopologySpec};
//! # #[tokio::main] async fn main() -> Result<(), postbox_core::Error> {
//! let config = KafkaConfig::from_env()?; // KAFKA_BOOTSTRAP_SERVERS
//! let publisher = KafkaPublisher::new(&config)?;
//! publisher.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await
//!     .map_err(|e| e.error)?;
//!
//! let source = KafkaSource::builder(&config, "orders", "billing")
//!     .provision(TopologySpec::new(3, 1)) // topic, retry tiers, DLQ
//!     .build()
//!     .await?;
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
//!         println!("got {}", env.id);
//!         Ok(())
//!     }))
//!     .concurrency(8)
//!     .dead_letter(DeadLetterRouter::new(Arc::new(publisher)))
//!     .build()?
//!     .spawn();
//! // … on SIGTERM:
//! consumer.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod codec;
mod config;
mod consumer;
pub mod error;
mod ops;
mod publisher;
pub mod retry;
mod topology;

pub use config::{KafkaConfig, BOOTSTRAP_ENV};
pub use consumer::{KafkaDelivery, KafkaSource, KafkaSourceBuilder, StartPosition};
pub use ops::{Health, KafkaOps, PartitionLag};
pub use publisher::{KafkaPublisher, PRODUCER_DEFAULTS, SYSTEM};
pub use retry::RetryTiers;
pub use topology::{Topology, TopologySpec};

/// Re-export of the rdkafka crate, for its `ClientConfig` and native types.
pub use rdkafka;
