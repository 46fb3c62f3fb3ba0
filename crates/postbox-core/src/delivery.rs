//! Consuming: deliveries, their settle operations, and the sources that yield them.
//!
//! Settling consumes the delivery (`ack(self)`, …) so settling twice does not
//! compile; a failed settle hands the delivery back inside [`SettleError`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::envelope::Envelope;
use crate::error::Error;

/// A boxed, sendable future (for trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A settle operation failed; the delivery is handed back to the caller.
pub struct SettleError<D> {
    /// Why it failed.
    pub error: Error,
    /// The delivery, unsettled.
    pub delivery: D,
}

impl<D> SettleError<D> {
    /// Pairs an error with the delivery it concerns.
    pub fn new(error: Error, delivery: D) -> Self {
        SettleError { error, delivery }
    }
}

impl<D> fmt::Debug for SettleError<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettleError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<D> fmt::Display for SettleError<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "settling a delivery failed: {}", self.error)
    }
}

impl<D> std::error::Error for SettleError<D> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Result of a settle operation.
pub type SettleResult<D> = Result<(), SettleError<D>>;

/// Where a delivery came from: the origin destination and, for logs, its position.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// Topic or queue the delivery was received from.
    pub destination: String,
    /// Kafka partition, when there is one.
    pub partition: Option<i32>,
    /// Kafka offset (or another broker sequence number), when there is one.
    pub offset: Option<i64>,
}

/// A scheduled retry, handed to [`Delivery::retry`].
///
/// The adapter makes the message come back after `delay` with attempt number
/// `next_attempt`: a broker timer or visibility change where the broker has one,
/// otherwise a copy in a delay tier, published *before* the original is acked.
#[derive(Debug, Clone)]
pub struct Retry {
    /// How long until the next attempt.
    pub delay: Duration,
    /// The attempt number of the next delivery.
    pub next_attempt: u32,
    /// When the first attempt failed (carried across attempts).
    pub first_failed_at: SystemTime,
    /// Short reason of the last failure (`handler-error`, `panic`, `timeout`, …).
    pub reason: &'static str,
}

/// Header that carries when the first attempt failed, across retries
/// (a valid CloudEvents extension name, like every header postbox writes).
pub const FIRST_FAILED_AT: &str = "retryfirstfailedat";
/// Header that carries why the last attempt failed.
pub const LAST_REASON: &str = "retryreason";
/// Every retry header name.
pub const RETRY_NAMES: [&str; 2] = [FIRST_FAILED_AT, LAST_REASON];

impl Retry {
    /// The envelope of the next attempt: `attempt` set, retry headers replaced
    /// (never appended), everything else unchanged — the id is kept.
    pub fn next_envelope(&self, original: &Envelope) -> Envelope {
        let mut next = original.clone();
        self.apply(&mut next);
        next
    }

    /// Writes the retry metadata into `env` in place (replacing old values).
    pub fn apply(&self, env: &mut Envelope) {
        env.attempt = self.next_attempt;
        let first = crate::codec::format_time(self.first_failed_at).unwrap_or_default();
        env.headers.insert(FIRST_FAILED_AT.to_string(), first);
        env.headers
            .insert(LAST_REASON.to_string(), self.reason.to_string());
    }
}

/// When the first attempt of `env` failed, as carried by a retry header.
pub fn first_failed_at(env: &Envelope) -> Option<SystemTime> {
    env.headers
        .get(FIRST_FAILED_AT)
        .and_then(|s| crate::codec::parse_time(s).ok())
}

/// A received message awaiting settlement.
///
/// Implemented by every adapter. Dropping a delivery without settling it leaves
/// it to the broker's redelivery (connection close, visibility timeout, no
/// commit) — it is never lost, but settle explicitly.
pub trait Delivery: Send + Sized + 'static {
    /// The message.
    fn envelope(&self) -> &Envelope;

    /// Delivery attempt number, 1 for the first (envelope header or the broker's
    /// own counter where it has one).
    fn attempt(&self) -> u32;

    /// Where it came from.
    fn origin(&self) -> Origin;

    /// Why the message could not be decoded, when it could not: it carried
    /// CloudEvents markers but broke the format (bad `specversion`, missing
    /// `id`, a `time` that is no timestamp, …). The envelope then holds what
    /// arrived (the body as payload, the transport metadata as headers), and
    /// the runtime dead-letters it with reason `decode` through the consumer's
    /// router before any handler runs — the same path on every broker. `None`
    /// (the default) for a decoded or foreign message.
    fn decode_error(&self) -> Option<&Error> {
        None
    }

    /// Processing succeeded: remove the message.
    fn ack(self) -> impl Future<Output = SettleResult<Self>> + Send;

    /// Processing failed transiently: deliver again after `retry.delay`.
    fn retry(self, retry: Retry) -> impl Future<Output = SettleResult<Self>> + Send;

    /// Give the message back for redelivery now (shutdown, or a failed
    /// dead-letter publish).
    fn release(self) -> impl Future<Output = SettleResult<Self>> + Send;
}

/// A stream of deliveries from one subscription.
pub trait Source: Send + 'static {
    /// The delivery type.
    type Delivery: Delivery;

    /// The next delivery; `None` when the source is closed for good.
    ///
    /// Must be cancel-safe: dropping the future before it completes loses no
    /// message (the runtime does so on shutdown).
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Delivery, Error>>> + Send;

    /// Which broker this is, for telemetry (`messaging.system`: `kafka`,
    /// `rabbitmq`, `aws_sqs`, `memory`).
    fn system(&self) -> &'static str;

    /// The destination consumed (topic or queue), for telemetry and DLQ routing.
    fn destination(&self) -> &str;

    /// Closes the subscription for good: commits what was processed and
    /// leaves the consumer group (Kafka), cancels the consumer (RabbitMQ),
    /// stops receiving (SQS). The consumer runtime calls it when it stops;
    /// dropping a source without closing it is a safety net, not a plan.
    /// The default has nothing to close.
    fn close(self) -> impl Future<Output = Result<(), Error>> + Send
    where
        Self: Sized,
    {
        async { Ok(()) }
    }
}

/// Object-safe form of [`Delivery`], for `Box<dyn DynDelivery>`.
pub trait DynDelivery: Send + 'static {
    /// See [`Delivery::envelope`].
    fn envelope(&self) -> &Envelope;
    /// See [`Delivery::attempt`].
    fn attempt(&self) -> u32;
    /// See [`Delivery::origin`].
    fn origin(&self) -> Origin;
    /// See [`Delivery::decode_error`].
    fn decode_error(&self) -> Option<&Error>;
    /// See [`Delivery::ack`].
    fn ack_boxed(self: Box<Self>) -> BoxFuture<'static, SettleResult<Box<dyn DynDelivery>>>;
    /// See [`Delivery::retry`].
    fn retry_boxed(
        self: Box<Self>,
        retry: Retry,
    ) -> BoxFuture<'static, SettleResult<Box<dyn DynDelivery>>>;
    /// See [`Delivery::release`].
    fn release_boxed(self: Box<Self>) -> BoxFuture<'static, SettleResult<Box<dyn DynDelivery>>>;
}

fn rebox<D: Delivery>(r: SettleResult<D>) -> SettleResult<Box<dyn DynDelivery>> {
    r.map_err(|e| SettleError::new(e.error, Box::new(e.delivery) as Box<dyn DynDelivery>))
}

impl<D: Delivery> DynDelivery for D {
    fn envelope(&self) -> &Envelope {
        Delivery::envelope(self)
    }
    fn attempt(&self) -> u32 {
        Delivery::attempt(self)
    }
    fn origin(&self) -> Origin {
        Delivery::origin(self)
    }
    fn decode_error(&self) -> Option<&Error> {
        Delivery::decode_error(self)
    }
    fn ack_boxed(self: Box<Self>) -> BoxFuture<'static, SettleResult<Box<dyn DynDelivery>>> {
        Box::pin(async move { rebox(Delivery::ack(*self).await) })
    }
    fn retry_boxed(
        self: Box<Self>,
        retry: Retry,
    ) -> BoxFuture<'static, SettleResult<Box<dyn DynDelivery>>> {
        Box::pin(async move { rebox(Delivery::retry(*self, retry).await) })
    }
    fn release_boxed(self: Box<Self>) -> BoxFuture<'static, SettleResult<Box<dyn DynDelivery>>> {
        Box::pin(async move { rebox(Delivery::release(*self).await) })
    }
}

impl Delivery for Box<dyn DynDelivery> {
    fn envelope(&self) -> &Envelope {
        (**self).envelope()
    }
    fn attempt(&self) -> u32 {
        (**self).attempt()
    }
    fn origin(&self) -> Origin {
        (**self).origin()
    }
    fn decode_error(&self) -> Option<&Error> {
        (**self).decode_error()
    }
    fn ack(self) -> impl Future<Output = SettleResult<Self>> + Send {
        self.ack_boxed()
    }
    fn retry(self, retry: Retry) -> impl Future<Output = SettleResult<Self>> + Send {
        self.retry_boxed(retry)
    }
    fn release(self) -> impl Future<Output = SettleResult<Self>> + Send {
        self.release_boxed()
    }
}

/// Object-safe form of [`Source`].
pub trait DynSource: Send + 'static {
    /// See [`Source::next`].
    fn next_boxed(&mut self) -> BoxFuture<'_, Option<Result<Box<dyn DynDelivery>, Error>>>;
    /// See [`Source::system`].
    fn system(&self) -> &'static str;
    /// See [`Source::destination`].
    fn destination(&self) -> &str;
    /// See [`Source::close`].
    fn close_boxed(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>>;
}

impl<S: Source> DynSource for S {
    fn next_boxed(&mut self) -> BoxFuture<'_, Option<Result<Box<dyn DynDelivery>, Error>>> {
        Box::pin(async move {
            Source::next(self)
                .await
                .map(|r| r.map(|d| Box::new(d) as Box<dyn DynDelivery>))
        })
    }
    fn system(&self) -> &'static str {
        Source::system(self)
    }
    fn destination(&self) -> &str {
        Source::destination(self)
    }
    fn close_boxed(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(Source::close(*self))
    }
}

/// A type-erased delivery: what a [`BoxSource`] yields.
pub type BoxDelivery = Box<dyn DynDelivery>;

/// A type-erased source: any adapter's subscription as one type.
pub type BoxSource = Box<dyn DynSource>;

impl Source for Box<dyn DynSource> {
    type Delivery = Box<dyn DynDelivery>;
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Delivery, Error>>> + Send {
        (**self).next_boxed()
    }
    fn system(&self) -> &'static str {
        (**self).system()
    }
    fn destination(&self) -> &str {
        (**self).destination()
    }
    fn close(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.close_boxed()
    }
}
