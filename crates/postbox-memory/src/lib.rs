//! # postbox-memory
//!
//! An in-process broker for postbox: the embedded default (no external
//! process, no C build) and a faithful test double. It has queues with
//! competing consumers, topics that fan out to bound queues (consumer groups),
//! ack / release / retry with a delay / visibility timeouts / redelivery with
//! attempt counts, delayed delivery, dead-letter queues, and limit profiles
//! ([`Limits::sqs`]) that reject what a real broker would, with typed errors
//! naming the limit.
//!
//! ```
//! use std::sync::Arc;
//! use postbox_core::{handler_fn, Consumer, DeadLetterRouter, Envelope, Publisher};
//! use postbox_memory::MemoryBroker;
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), postbox_core::Error> {
//! let broker = MemoryBroker::new();
//! broker.publish("orders", Envelope::new("order.placed", "{}")).await.map_err(|e| e.error)?;
//! let consumer = Consumer::builder(broker.subscribe("orders"), handler_fn(|_env: Envelope| async { Ok(()) }))
//!     .dead_letter(DeadLetterRouter::new(broker.clone()))
//!     .build()?
//!     .spawn();
//! # tokio::task::yield_now().await;
//! let report = consumer.shutdown().await?;
//! # let _ = report;
//! # Ok(()) }
//! ```

mod broker;
mod limits;
mod ops;
mod queue;
mod source;

pub use broker::{MemoryBroker, SYSTEM};
pub use limits::Limits;
pub use queue::QueueOptions;
pub use source::{MemoryDelivery, MemorySource};
