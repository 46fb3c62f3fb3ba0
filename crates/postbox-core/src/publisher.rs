//! Publishing: the [`Publisher`] trait and per-message batch results.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::Error;

/// A failed publish: the error, and the envelope handed back to the caller so
/// nothing is lost (retry it, store it, or dead-letter it).
pub struct PublishError {
    /// Why the publish failed.
    pub error: Error,
    /// The envelope that was not published.
    pub envelope: Box<Envelope>,
}

impl PublishError {
    /// Pairs an error with the envelope it concerns.
    pub fn new(error: Error, envelope: Envelope) -> Self {
        PublishError {
            error,
            envelope: Box::new(envelope),
        }
    }

    /// Splits into the error and the envelope.
    pub fn into_parts(self) -> (Error, Envelope) {
        (self.error, *self.envelope)
    }
}

/// A failed publish as a plain [`Error`] (the envelope is dropped), for `?`
/// in functions that return `postbox_core::Error`.
impl From<PublishError> for Error {
    fn from(e: PublishError) -> Self {
        e.error
    }
}

impl fmt::Debug for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishError")
            .field("error", &self.error)
            .field("message_id", &self.envelope.id)
            .finish()
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "publishing message {} failed: {}",
            self.envelope.id, self.error
        )
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Per-message results of [`Publisher::publish_batch`], in input order.
///
/// A partial failure is visible: [`BatchReport::is_success`] is true only when
/// every message was accepted by the broker.
#[derive(Debug)]
pub struct BatchReport {
    results: Vec<Result<(), PublishError>>,
}

impl BatchReport {
    /// A report from per-message results in input order.
    pub fn new(results: Vec<Result<(), PublishError>>) -> Self {
        BatchReport { results }
    }

    /// Whether every message was published.
    pub fn is_success(&self) -> bool {
        self.results.iter().all(Result::is_ok)
    }

    /// How many messages were published.
    pub fn succeeded(&self) -> usize {
        self.results.iter().filter(|r| r.is_ok()).count()
    }

    /// The failures, with their index in the batch.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &PublishError)> {
        self.results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    }

    /// The results in input order.
    pub fn results(&self) -> &[Result<(), PublishError>] {
        &self.results
    }

    /// The results in input order, by value (to take failed envelopes back).
    pub fn into_results(self) -> Vec<Result<(), PublishError>> {
        self.results
    }

    /// The number of messages in the batch.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether the batch was empty.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }
}

/// Publishes envelopes to a destination (topic, queue or exchange).
///
/// `publish` returns only after the broker has durably accepted the message
/// (delivery report, publisher confirm, API success). Usable as
/// `Arc<dyn Publisher>`.
///
/// ```
/// # use postbox_core::{Publisher, Envelope};
/// async fn announce(publisher: &dyn Publisher) -> Result<(), postbox_core::PublishError> {
///     publisher.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await
/// }
/// ```
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one envelope; on failure the envelope comes back in the error.
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError>;

    /// Publishes many envelopes with native batching and reports each result.
    ///
    /// The default publishes one after the other; adapters override it.
    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        let mut results = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            results.push(self.publish(destination, env).await);
        }
        BatchReport::new(results)
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        (**self).publish(destination, envelope).await
    }
    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        (**self).publish_batch(destination, envelopes).await
    }
}
