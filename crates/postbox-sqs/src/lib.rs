//! # postbox-sqs
//!
//! The postbox adapter for AWS SQS and SNS, on `aws-sdk-sqs` / `aws-sdk-sns`.
//! [`SqsBroker`] is the broker handle: it implements
//! [`Broker`](postbox_core::Broker) (subscribe, provision, backlog, health,
//! scheduled publish, close), [`Publisher`](postbox_core::Publisher) and
//! [`DeadLetterOps`](postbox_core::DeadLetterOps).
//!
//! * Connect with `postbox::connect("sqs://?region=…&endpoint=…")`,
//!   [`SqsBroker::connect`]`(`[`SqsConfig`]`)` or [`SqsBroker::from_env`]
//!   (the AWS default chain); your own `SdkConfig` or clients go through
//!   [`SqsConfig::from_sdk_config`] / [`SqsConfig::from_clients`].
//! * Publishing: single sends, `SendMessageBatch` / `PublishBatch` in chunks
//!   of 10 with per-message results, FIFO group and de-duplication ids, and
//!   `DelaySeconds` sends (`Broker::publish_delayed`, ≤ 15 min).
//! * Subscribing: a queue, or `sns:<topic>` with a group (the queue
//!   `<topic>-<group>` subscribed to the topic with raw delivery), declared
//!   first with a dead-letter queue and redrive policy. Long polling,
//!   concurrent receivers into a bounded buffer, batched deletes, a
//!   visibility heartbeat, attempts from `ApproximateReceiveCount`;
//!   SNS-wrapped and foreign messages are decoded, broken CloudEvents are
//!   handed over for dead-lettering.
//! * Retries are visibility changes (≤ 12 h, [`MAX_VISIBILITY`]);
//!   dead-lettering goes through core's
//!   [`DeadLetterRouter`](postbox_core::DeadLetterRouter) to the queue
//!   `<queue>-dlq` with the metadata in the body.
//!
//! ## Addressing
//!
//! | destination | meaning |
//! |---|---|
//! | `orders`, `sqs:orders` | the SQS queue `orders` (URL resolved once and cached) |
//! | `https://sqs.…/123456789012/orders` | the SQS queue at that URL |
//! | `orders.fifo` | the FIFO queue `orders.fifo` |
//! | `sns:orders` | the SNS topic `orders` (ARN resolved once and cached) |
//! | `arn:aws:sns:…:orders` | the SNS topic with that ARN |
//!
//! SQS queue names may not contain dots (except the `.fifo` suffix), so a
//! queue name is normalised ([`queue_name`]): dots become `-` and a `.fifo`
//! anywhere moves to the end. The conventional dead-letter destination
//! `<queue>.dlq` is thus the queue `<queue>-dlq`, and `orders.fifo.dlq` is
//! `orders-dlq.fifo`.
//!
//! Wire format: the body is the CloudEvents JSON document; the message
//! attributes are [`ATTR_TYPE`] and the user headers, at most
//! [`MAX_ATTRIBUTES`] in total (postbox's `dlq…`/`retry…` metadata travels
//! in the body). Under core's header rule
//! ([`is_attribute_name`](postbox_core::codec::is_attribute_name)), a header
//! whose name is a valid CloudEvents attribute name is an extension in the
//! document (and an attribute copy for filter policies); any other
//! (`x-trace`, `traceId`) is transport metadata: a message attribute only,
//! and an [`ErrorKind::Encode`](postbox_core::ErrorKind::Encode) error
//! before sending when SQS/SNS cannot take its name as an attribute name.
//! On receipt the message attributes that the document does not hold become
//! headers again (read from the notification's `MessageAttributes` when SNS
//! wraps the message). A body without CloudEvents markers is a *foreign*
//! message for the handler (its attributes as headers, see
//! [`attribute_header`]); one that claims to be a CloudEvent but breaks the
//! format is *undecodable*: the delivery carries
//! [`Delivery::decode_error`](postbox_core::Delivery::decode_error) and an
//! envelope of what arrived ([`UNDECODABLE_TYPE`]: the body as payload, the
//! attributes exactly in [`ATTRIBUTES_HEADER`]), and the runtime
//! dead-letters it with reason `decode`; replaying its copy puts the body
//! and the attributes back as they arrived. The crate README has the full
//! mapping.
//!
//! ```no_run
//! use postbox_core::{handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions};
//! use postbox_sqs::{SqsBroker, SqsConfig};
//! # async fn demo() -> Result<(), postbox_core::Error> {
//! // The AWS default chain, with the endpoint of a local emulator.
//! let config = SqsConfig::from_url("sqs://?region=us-east-1&endpoint=http://127.0.0.1:4566")?;
//! let broker = SqsBroker::connect(config).await?;
//!
//! // Declares topic `orders`, queue `orders-billing` (+ its DLQ) and the subscription.
//! let source = broker.subscribe("sns:orders", SubscribeOptions::group("billing")).await?;
//! broker
//!     .publish("sns:orders", Envelope::new("order.placed", r#"{"id":1}"#))
//!     .await?;
//!
//! let consumer = Consumer::builder(source, handler_fn(|env: Envelope| async move {
//!     println!("{} {}", env.event_type, env.attempt);
//!     Ok(())
//! }))
//! .dead_letter(DeadLetterRouter::new(broker.clone()))
//! .build()?
//! .spawn();
//! consumer.shutdown().await?; // closes the source: acks confirmed, the rest given back
//! broker.close().await
//! # }
//! ```

mod broker;
mod codec;
mod config;
mod consumer;
mod error;
mod ops;
mod publisher;
mod retry;
mod topology;

pub use codec::{
    attribute_header, ATTRIBUTES_HEADER, ATTRIBUTE_ESCAPE, ATTR_TYPE, MAX_ATTRIBUTES,
    SNS_MAX_BYTES, SQS_MAX_BYTES, UNDECODABLE_TEXT,
};
// Core's definition, re-exported next to the SQS-specific constants.
pub use config::{queue_name, FifoDeduplication, SqsConfig};
pub use postbox_core::codec::UNDECODABLE_TYPE;
pub use publisher::{SqsBroker, MAX_BATCH, MAX_DELAY, SYSTEM};
pub use retry::MAX_VISIBILITY;
pub use topology::{QueueSpec, SubscriptionSpec};

/// Re-exported so users need not depend on `aws-config` (`SdkConfig`,
/// `BehaviorVersion`).
pub use aws_config;
/// Re-exported for [`SqsConfig::from_clients`] and [`SqsBroker::sns`].
pub use aws_sdk_sns;
/// Re-exported for [`SqsConfig::from_clients`] and [`SqsBroker::sqs`].
pub use aws_sdk_sqs;
