//! # postbox
//!
//! One set of reliable messaging abstractions over Apache Kafka, RabbitMQ and
//! AWS SQS/SNS — and an in-process broker that needs nothing at all.
//!
//! * [`connect`]: a [`Broker`] handle from a URL (`memory://`, `kafka://…`,
//!   `amqp://…`, `sqs://…`): publish, subscribe, dead-letter operations,
//!   backlog, health, close — the same calls on every broker.
//! * [`Envelope`]: a CloudEvents-compatible message (UUID v7 id, type, source,
//!   time, schema version, correlation, partition key, trace context, attempt,
//!   headers, payload).
//! * [`Publisher`]: `publish` returns once the broker durably accepted the
//!   message; `publish_batch` reports each message.
//! * [`Consumer`]: runs a [`Handler`] with bounded concurrency, optional per-key
//!   ordering, retries with backoff, dead-lettering with metadata, idempotency,
//!   and graceful shutdown — with the same meaning on every broker.
//!
//! ```
//! use postbox::{handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions};
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), postbox::Error> {
//! let broker = postbox::connect("memory://").await?;      // or kafka://, amqp://, sqs://
//! let source = broker.subscribe("orders", SubscribeOptions::group("billing")).await?;
//! broker.publish("orders", Envelope::json("order.placed", &serde_json::json!({"id": 1}))?).await?;
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
//!         println!("{} {}", env.event_type, env.id);
//!         Ok(())
//!     }))
//!     .dead_letter(DeadLetterRouter::new(broker.clone()))
//!     .build()?
//!     .spawn();
//! # tokio::task::yield_now().await;
//! consumer.shutdown().await?;
//! broker.close().await?;
//! # Ok(()) }
//! ```
//!
//! Features: `memory` (default, the in-process broker), `kafka` (rdkafka),
//! `rabbitmq` (lapin), `sqs` (AWS SQS + SNS) and `postgres` (idempotency store
//! and transactional outbox). No broker client is built unless its feature is on.

// docs.rs (`--cfg docsrs`, see Cargo.toml) labels feature-gated items.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use postbox_core::*;

mod connect;
pub use connect::{connect, connect_from_env, URL_ENV};

/// The in-memory broker (feature `memory`, on by default).
#[cfg(feature = "memory")]
pub mod memory {
    pub use postbox_memory::*;
}

/// The Apache Kafka adapter (feature `kafka`).
#[cfg(feature = "kafka")]
pub mod kafka {
    pub use postbox_kafka::*;
}

/// The RabbitMQ adapter (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use postbox_rabbitmq::*;
}

/// The AWS SQS/SNS adapter (feature `sqs`).
#[cfg(feature = "sqs")]
pub mod sqs {
    pub use postbox_sqs::*;
}

/// PostgreSQL idempotency store and transactional outbox (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use postbox_postgres::*;
}
