//! # postbox-core
//!
//! The broker-agnostic heart of postbox: the [`Envelope`] and its CloudEvents
//! [`codec`]s, the [`Broker`] handle and the [`Publisher`] / [`Source`] /
//! [`Delivery`] traits adapters implement, the [`Handler`] pipeline and its middleware, the
//! [`RetryPolicy`], the delay tiers and due-time header of brokers without a
//! per-message delay ([`delay`]), dead-letter routing ([`dlq`]),
//! [`idempotency`], and the consumer runtime ([`Consumer`]) that maps handler outcomes onto settle
//! operations with the same meaning on every broker.
//!
//! Core depends on no broker client.

mod broker;
pub mod codec;
pub mod delay;
pub mod delivery;
pub mod dlq;
pub mod envelope;
mod error;
pub mod handler;
pub mod idempotency;
pub mod retry;
mod runtime;
pub mod telemetry;

pub use broker::{
    unsupported, AnyBroker, Backlog, Broker, Capabilities, Health, PartitionLag, StartPosition,
    SubscribeOptions,
};
pub use codec::ContentMode;
pub use delivery::{
    BoxDelivery, BoxFuture, BoxSource, Delivery, Origin, Retry, SettleError, SettleResult, Source,
};
pub use dlq::{DeadLetterMetadata, DeadLetterOps, DeadLetterRouter, ReplayReport};
pub use envelope::{Envelope, EnvelopeBuilder, Headers, MessageId, TypedEnvelope};
pub use error::{BoxError, Error, ErrorKind, Limit};
pub use handler::{
    handler_fn, typed, Disposition, FailureReason, Handler, HandlerBuilder, HandlerError,
    HandlerResult, Layer, ResultExt, Upcasters,
};
pub use idempotency::{Claim, IdempotencyLayer, IdempotencyStore, Lease, MemoryIdempotencyStore};
pub use publisher::{BatchReport, PublishError, Publisher};
pub use retry::{RetryBudget, RetryPolicy};
pub use runtime::{Consumer, ConsumerBuilder, ProcessingOrder, RunReport, RunningConsumer};

/// Cancellation token used for graceful shutdown (re-exported from `tokio-util`).
pub use tokio_util::sync::CancellationToken;

mod publisher;
