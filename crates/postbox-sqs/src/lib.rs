//! # postbox-sqs
//!
//! The postbox adapter for AWS SQS and SNS, on `aws-sdk-sqs` / `aws-sdk-sns`.
//!
//! * [`SqsBroker`] publishes to SQS queues and SNS topics (see [`config`] for
//!   addressing: `orders`, `orders.fifo`, `sns:orders`, an ARN or a URL),
//!   with single sends, `SendMessageBatch` / `PublishBatch` in chunks of 10
//!   with per-message results, FIFO group and de-duplication ids, and
//!   scheduled sends ([`SqsBroker::publish_delayed`]).
//! * [`SqsBroker::subscribe`] gives an [`SqsSource`] for the consumer
//!   runtime: long polling, concurrent receivers into a bounded buffer,
//!   batched deletes, a visibility heartbeat, attempts from
//!   `ApproximateReceiveCount`, SNS-wrapped and foreign messages decoded.
//! * Retries are visibility changes ([`retry`]); dead-lettering goes through
//!   core's [`DeadLetterRouter`](postbox_core::DeadLetterRouter) to the queue
//!   `<queue>-dlq` with the metadata in the body.
//! * [`topology`] provisions queues, DLQs with redrive policies, topics and
//!   subscriptions; [`ops`] has depth, DLQ operations and a health check.
//!
//! Wire format ([`codec`]): the body is the CloudEvents JSON document; the
//! attributes are `type` plus the user headers, at most 10 in total.
//!
//! ```no_run
//! use std::sync::Arc;
//! use postbox_core::{handler_fn, Consumer, DeadLetterRouter, Envelope, Publisher};
//! use postbox_sqs::{QueueSpec, SqsBroker, SubscriptionSpec};
//! # async fn demo() -> Result<(), postbox_core::Error> {
//! // Standard AWS configuration chain; honours AWS_ENDPOINT_URL (LocalStack).
//! let broker = SqsBroker::from_env(aws_config::BehaviorVersion::latest()).await;
//! broker.declare_topic("orders").await?;
//! broker.declare_queue(&QueueSpec::new("billing")).await?; // + billing-dlq, redrive
//! broker.declare_subscription(&SubscriptionSpec::new("orders", "billing")).await?;
//!
//! broker
//!     .publish("sns:orders", Envelope::new("order.placed", r#"{"id":1}"#))
//!     .await
//!     .map_err(|e| e.error)?;
//!
//! let source = broker.subscribe("billing").await?;
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
//!     println!("{} {}", env.event_type, env.attempt);
//!     Ok(())
//! }))
//! .dead_letter(DeadLetterRouter::new(Arc::new(broker.clone())))
//! .build()?
//! .spawn();
//! consumer.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod codec;
pub mod config;
mod consumer;
pub mod error;
pub mod ops;
mod publisher;
pub mod retry;
pub mod topology;

pub use config::{queue_name, ConsumerOptions, Destination, FifoDeduplication};
pub use consumer::{SqsDelivery, SqsSource};
pub use ops::QueueDepth;
pub use publisher::{SqsBroker, MAX_BATCH, MAX_DELAY, SYSTEM};
pub use topology::{QueueSpec, SubscriptionSpec};

/// Re-exported so users need not depend on `aws-config` for the behavior version.
pub use aws_config;
pub use aws_sdk_sns;
pub use aws_sdk_sqs;
