//! Dead-letter routing: the bounded metadata schema, the destination router,
//! and the operations API (count, peek, replay, purge).

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::delivery::{self, Delivery, Origin, SettleError, SettleResult};
use crate::envelope::Envelope;
use crate::error::Error;
use crate::handler::FailureReason;
use crate::publisher::Publisher;

/// `dlqreason`: why the message was dead-lettered.
pub const REASON: &str = "dlqreason";
/// `dlqerror`: the last error message, at most 1 KiB.
pub const ERROR: &str = "dlqerror";
/// `dlqerrortype`: the kind of the last error (its type where that says something).
pub const ERROR_TYPE: &str = "dlqerrortype";
/// `dlqattempts`: attempts made.
pub const ATTEMPTS: &str = "dlqattempts";
/// `dlqfirstfailedat`: when the first attempt failed (RFC 3339).
pub const FIRST_FAILED_AT: &str = "dlqfirstfailedat";
/// `dlqlastfailedat`: when the last attempt failed (RFC 3339).
pub const LAST_FAILED_AT: &str = "dlqlastfailedat";
/// `dlqorigin`: the topic or queue it was consumed from.
pub const ORIGIN: &str = "dlqorigin";
/// `dlqpartition`: the origin partition (Kafka).
pub const ORIGIN_PARTITION: &str = "dlqpartition";
/// `dlqoffset`: the origin offset (Kafka).
pub const ORIGIN_OFFSET: &str = "dlqoffset";
/// `dlqconsumer`: the consumer (group or handler name).
pub const CONSUMER: &str = "dlqconsumer";

/// Every dead-letter header name. They are valid CloudEvents extension names
/// (lower-case letters and digits, at most 20 characters), so a dead-lettered
/// copy is a valid CloudEvent on every broker.
pub const NAMES: [&str; 10] = [
    REASON,
    ERROR,
    ERROR_TYPE,
    ATTEMPTS,
    FIRST_FAILED_AT,
    LAST_FAILED_AT,
    ORIGIN,
    ORIGIN_PARTITION,
    ORIGIN_OFFSET,
    CONSUMER,
];

/// Whether `name` is postbox's own dead-letter or retry metadata (which
/// adapters with an attribute budget carry in the body, not as attributes).
pub fn is_metadata(name: &str) -> bool {
    NAMES.contains(&name) || delivery::RETRY_NAMES.contains(&name)
}

/// Removes every dead-letter and retry header from `env`.
fn remove_metadata(env: &mut Envelope) {
    env.headers.retain(|k, _| !is_metadata(k));
}

/// Longest `dlqerror`, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The dead-letter metadata: one bounded schema on every broker.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterMetadata {
    /// Why the message was dead-lettered.
    pub reason: FailureReason,
    /// The last error message (truncated to 1 KiB on write).
    pub error: String,
    /// The kind of the last error: its type where that says something, else
    /// how it was classified (`transient`, `permanent`, `panic`, …).
    pub error_type: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: SystemTime,
    /// When the last attempt failed.
    pub last_failed_at: SystemTime,
    /// Origin destination, partition and offset.
    pub origin: Origin,
    /// The consumer (group or handler name).
    pub consumer: String,
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl DeadLetterMetadata {
    /// Writes the metadata into `env`: every existing dead-letter and retry
    /// header is removed first, so headers never grow however often a message is
    /// dead-lettered and replayed.
    pub fn apply(&self, env: &mut Envelope) {
        remove_metadata(env);
        let time = |t: SystemTime| crate::codec::format_time(t).unwrap_or_default();
        let h = &mut env.headers;
        h.insert(REASON.into(), self.reason.as_str().into());
        h.insert(
            ERROR.into(),
            truncate_utf8(&self.error, MAX_ERROR_BYTES).into(),
        );
        h.insert(ERROR_TYPE.into(), self.error_type.clone());
        h.insert(ATTEMPTS.into(), self.attempts.to_string());
        h.insert(FIRST_FAILED_AT.into(), time(self.first_failed_at));
        h.insert(LAST_FAILED_AT.into(), time(self.last_failed_at));
        h.insert(ORIGIN.into(), self.origin.destination.clone());
        if let Some(p) = self.origin.partition {
            h.insert(ORIGIN_PARTITION.into(), p.to_string());
        }
        if let Some(o) = self.origin.offset {
            h.insert(ORIGIN_OFFSET.into(), o.to_string());
        }
        h.insert(CONSUMER.into(), self.consumer.clone());
    }

    /// Reads the metadata back from a dead-lettered envelope.
    pub fn read(env: &Envelope) -> Option<DeadLetterMetadata> {
        let h = &env.headers;
        let time = |k: &str| h.get(k).and_then(|s| crate::codec::parse_time(s).ok());
        Some(DeadLetterMetadata {
            reason: FailureReason::parse(h.get(REASON)?)?,
            error: h.get(ERROR)?.clone(),
            error_type: h.get(ERROR_TYPE).cloned().unwrap_or_default(),
            attempts: h.get(ATTEMPTS)?.parse().ok()?,
            first_failed_at: time(FIRST_FAILED_AT)?,
            last_failed_at: time(LAST_FAILED_AT)?,
            origin: Origin {
                destination: h.get(ORIGIN)?.clone(),
                partition: h.get(ORIGIN_PARTITION).and_then(|s| s.parse().ok()),
                offset: h.get(ORIGIN_OFFSET).and_then(|s| s.parse().ok()),
            },
            consumer: h.get(CONSUMER).cloned().unwrap_or_default(),
        })
    }
}

/// The default dead-letter destination of `origin`: `<origin>.dlq`.
pub fn default_destination(origin: &str) -> String {
    format!("{origin}.dlq")
}

type RouteFn = Arc<dyn Fn(&Origin, &Envelope) -> String + Send + Sync>;

/// Publishes dead-lettered messages and settles the original only after the
/// broker confirmed the copy (invariant 2).
///
/// ```
/// use std::sync::Arc;
/// use postbox_core::{DeadLetterRouter, Origin, Envelope, Publisher};
/// # fn demo(publisher: Arc<dyn Publisher>) {
/// let router = DeadLetterRouter::new(publisher)
///     .with_route(|origin: &Origin, _env: &Envelope| format!("dead.{}", origin.destination));
/// # let _ = router;
/// # }
/// ```
#[derive(Clone)]
pub struct DeadLetterRouter {
    publisher: Arc<dyn Publisher>,
    route: RouteFn,
}

impl std::fmt::Debug for DeadLetterRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterRouter").finish_non_exhaustive()
    }
}

impl DeadLetterRouter {
    /// Dead-letters through `publisher` (a broker handle, or any
    /// [`Publisher`]) to `<origin>.dlq`.
    pub fn new(publisher: impl Publisher + 'static) -> Self {
        DeadLetterRouter {
            publisher: Arc::new(publisher),
            route: Arc::new(|origin: &Origin, _: &Envelope| {
                default_destination(&origin.destination)
            }),
        }
    }

    /// Chooses the destination with a function of the origin and the message.
    pub fn with_route<F>(mut self, route: F) -> Self
    where
        F: Fn(&Origin, &Envelope) -> String + Send + Sync + 'static,
    {
        self.route = Arc::new(route);
        self
    }

    /// The destination for a message from `origin`.
    pub fn destination(&self, origin: &Origin, env: &Envelope) -> String {
        (self.route)(origin, env)
    }

    /// Publishes a copy of the delivery's envelope with `metadata` to the DLQ,
    /// then acks the original. If the publish fails the delivery is handed back
    /// unsettled (the caller releases it for broker redelivery).
    pub async fn dead_letter<D: Delivery>(
        &self,
        delivery: D,
        metadata: &DeadLetterMetadata,
    ) -> SettleResult<D> {
        let mut copy = delivery.envelope().clone();
        metadata.apply(&mut copy);
        let destination = self.destination(&metadata.origin, &copy);
        if let Err(e) = self.publisher.publish(&destination, copy).await {
            return Err(SettleError::new(e.error, delivery));
        }
        delivery.ack().await
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayReport {
    /// Messages published back to their origin and removed from the DLQ.
    pub replayed: usize,
    /// Messages looked at that did not match the filter (left in the DLQ).
    pub skipped: usize,
}

/// A filter for [`DeadLetterOps::replay`].
pub type ReplayFilter<'a> = &'a (dyn Fn(&Envelope) -> bool + Send + Sync);

/// Operations on a dead-letter queue: a library API, not only a convention.
#[async_trait]
pub trait DeadLetterOps: Send + Sync {
    /// Messages in the DLQ.
    async fn count(&self, dlq: &str) -> Result<u64, Error>;
    /// Up to `limit` messages, without consuming them.
    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error>;
    /// Publishes up to `limit` messages matching `filter` back to their origin
    /// (ids kept, see [`prepare_replay`]) and removes them from the DLQ.
    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error>;
    /// Removes every message; returns how many.
    async fn purge(&self, dlq: &str) -> Result<u64, Error>;
}

/// Turns a dead-lettered envelope into the one to replay: the id is kept (so
/// idempotent consumers skip what they already did), dead-letter and retry
/// headers are removed, and the attempt count starts again at 1. Returns the
/// origin, or `None` when the envelope has no `dlqorigin`.
pub fn prepare_replay(mut env: Envelope) -> Option<(String, Envelope)> {
    let origin = env.headers.get(ORIGIN)?.clone();
    remove_metadata(&mut env);
    env.attempt = 1;
    Some((origin, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(error: &str) -> DeadLetterMetadata {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        DeadLetterMetadata {
            reason: FailureReason::RetriesExhausted,
            error: error.into(),
            error_type: "std::io::Error".into(),
            attempts: 5,
            first_failed_at: t,
            last_failed_at: t + std::time::Duration::from_millis(1500),
            origin: Origin {
                destination: "orders".into(),
                partition: Some(3),
                offset: Some(42),
            },
            consumer: "billing".into(),
        }
    }

    #[test]
    fn metadata_round_trips_through_headers() {
        let mut env = Envelope::new("order.placed", "{}");
        let m = meta("db down");
        m.apply(&mut env);
        assert_eq!(DeadLetterMetadata::read(&env), Some(m));
        assert_eq!(env.headers[REASON], "retries-exhausted");
        for name in NAMES.iter().chain(delivery::RETRY_NAMES.iter()) {
            assert!(
                name.len() <= 20
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                "{name} is not a valid CloudEvents attribute name"
            );
        }
        assert_eq!(env.headers[ORIGIN_OFFSET], "42");
    }

    #[test]
    fn metadata_replaces_never_appends() {
        let mut env = Envelope::builder("t").header("tenant", "a").build();
        for i in 0..10 {
            meta(&format!("failure {i}")).apply(&mut env);
        }
        assert_eq!(env.headers.len(), 1 + 10);
        assert_eq!(env.headers[ERROR], "failure 9");
        let (origin, replay) = prepare_replay(env).unwrap();
        assert_eq!(origin, "orders");
        assert_eq!(replay.headers.len(), 1);
        assert_eq!(replay.attempt, 1);
    }

    #[test]
    fn error_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let mut env = Envelope::new("t", "");
        meta(&long).apply(&mut env);
        let stored = &env.headers[ERROR];
        assert!(stored.len() <= MAX_ERROR_BYTES);
        assert!(stored.len() >= MAX_ERROR_BYTES - 1);
    }

    #[test]
    fn default_route_appends_dlq() {
        assert_eq!(default_destination("orders"), "orders.dlq");
    }
}
