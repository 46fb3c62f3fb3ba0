//! # postbox-core
//!
//! The broker-agnostic heart of postbox: the [`Envelope`] and its CloudEvents
//! [`codec`]s, the [`Publisher`] / [`Source`] / [`Delivery`] traits adapters
//! implement, the [`Handler`] pipeline and its middleware, the
//! [`RetryPolicy`], dead-letter routing ([`dlq`]), [`idempotency`], and the
//! consumer runtime ([`Consumer`]) that maps handler outcomes onto settle
//! operations with the same meaning on every broker.
//!
//! Core depends on no broker client.

pub mod codec;
mod delivery;
pub mod dlq;
mod envelope;
mod error;
pub mod handler;
pub mod idempotency;
pub mod retry;
mod runtime;
pub mod telemetry;

pub use delivery::{
    first_failed_at, BoxFuture, BoxSource, Delivery, DynDelivery, DynSource, Origin, Retry,
    SettleError, SettleResult, Source, FIRST_FAILED_AT, LAST_REASON,
};
pub use dlq::{DeadLetterMetadata, DeadLetterOps, DeadLetterRouter, ReplayReport};
pub use envelope::{
    Envelope, EnvelopeBuilder, Headers, MessageId, Text, TypedEnvelope, DEFAULT_SOURCE, JSON,
};
pub use error::{BoxError, Error, ErrorKind, Limit, Result};
pub use handler::{
    handler_fn, typed, Disposition, FailureReason, Handler, HandlerBuilder, HandlerError,
    HandlerResult, Layer, ResultExt, Upcasters,
};
pub use idempotency::{Claim, IdempotencyLayer, IdempotencyStore, Lease, MemoryIdempotencyStore};
pub use publisher::{BatchReport, PublishError, Publisher};
pub use retry::{RetryBudget, RetryPolicy};
pub use runtime::{
    decide, Consumer, ConsumerBuilder, Decision, Ordering, RunReport, RunningConsumer,
};

/// Cancellation token used for graceful shutdown (re-exported from `tokio-util`).
pub use tokio_util::sync::CancellationToken;

mod publisher;
