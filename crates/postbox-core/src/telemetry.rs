//! Metric names and handles (through the `metrics` facade).
//!
//! Every metric carries the labels `messaging_system`, `destination` and,
//! for consumers, `consumer`. Install any `metrics` recorder (Prometheus,
//! OpenTelemetry, …) to export them; without one they cost next to nothing.

use metrics::{Counter, Gauge, Histogram};

/// Messages published (counter).
pub const PUBLISHED: &str = "postbox_published_total";
/// Messages whose publish failed (counter).
pub const PUBLISH_FAILED: &str = "postbox_publish_failed_total";
/// Messages handed to a handler (counter).
pub const CONSUMED: &str = "postbox_consumed_total";
/// Messages handled successfully (counter).
pub const SUCCEEDED: &str = "postbox_succeeded_total";
/// Handler failures of any kind (counter).
pub const FAILED: &str = "postbox_failed_total";
/// Retries scheduled (counter).
pub const RETRIED: &str = "postbox_retried_total";
/// Messages dead-lettered (counter).
pub const DEAD_LETTERED: &str = "postbox_dead_lettered_total";
/// Duplicates skipped by the idempotency layer (counter).
pub const DUPLICATES_SKIPPED: &str = "postbox_duplicates_skipped_total";
/// Settle operations that failed, leaving the message to redelivery (counter).
pub const SETTLE_FAILED: &str = "postbox_settle_failed_total";
/// Handler duration in seconds (histogram).
pub const HANDLER_DURATION: &str = "postbox_handler_duration_seconds";
/// Messages in flight in a consumer (gauge).
pub const IN_FLIGHT: &str = "postbox_in_flight";

/// Metric handles of one consumer, registered once at start.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    pub(crate) system: &'static str,
    pub(crate) destination: String,
    pub(crate) consumer: String,
    /// See [`CONSUMED`].
    pub consumed: Counter,
    /// See [`SUCCEEDED`].
    pub succeeded: Counter,
    /// See [`FAILED`].
    pub failed: Counter,
    /// See [`RETRIED`].
    pub retried: Counter,
    /// See [`DEAD_LETTERED`].
    pub dead_lettered: Counter,
    /// See [`DUPLICATES_SKIPPED`].
    pub duplicates_skipped: Counter,
    /// See [`SETTLE_FAILED`].
    pub settle_failed: Counter,
    /// See [`HANDLER_DURATION`].
    pub handler_duration: Histogram,
    /// See [`IN_FLIGHT`].
    pub in_flight: Gauge,
}

impl ConsumerMetrics {
    /// Registers the handles for a consumer.
    pub fn new(system: &'static str, destination: &str, consumer: &str) -> Self {
        let labels = [
            ("messaging_system", system.to_string()),
            ("destination", destination.to_string()),
            ("consumer", consumer.to_string()),
        ];
        ConsumerMetrics {
            system,
            destination: destination.to_string(),
            consumer: consumer.to_string(),
            consumed: metrics::counter!(CONSUMED, &labels),
            succeeded: metrics::counter!(SUCCEEDED, &labels),
            failed: metrics::counter!(FAILED, &labels),
            retried: metrics::counter!(RETRIED, &labels),
            dead_lettered: metrics::counter!(DEAD_LETTERED, &labels),
            duplicates_skipped: metrics::counter!(DUPLICATES_SKIPPED, &labels),
            settle_failed: metrics::counter!(SETTLE_FAILED, &labels),
            handler_duration: metrics::histogram!(HANDLER_DURATION, &labels),
            in_flight: metrics::gauge!(IN_FLIGHT, &labels),
        }
    }
}

/// Metric handles of one publisher.
#[derive(Debug, Clone)]
pub struct PublisherMetrics {
    /// See [`PUBLISHED`].
    pub published: Counter,
    /// See [`PUBLISH_FAILED`].
    pub failed: Counter,
}

impl PublisherMetrics {
    /// Registers the handles for a publisher on `system`.
    pub fn new(system: &'static str) -> Self {
        let labels = [("messaging_system", system)];
        PublisherMetrics {
            published: metrics::counter!(PUBLISHED, &labels),
            failed: metrics::counter!(PUBLISH_FAILED, &labels),
        }
    }
}

/// Counts one duplicate skipped by an idempotency layer outside a consumer.
pub(crate) fn duplicate_skipped() {
    metrics::counter!(DUPLICATES_SKIPPED).increment(1);
}
