use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument as _;

use super::{Handler, HandlerResult, Layer};
use crate::envelope::Envelope;
use crate::telemetry::ConsumerMetrics;

/// A `tracing` span per message, named and attributed per the OpenTelemetry
/// messaging conventions (`process <destination>`, `messaging.system`,
/// `messaging.destination.name`, `messaging.message.id`, …) with the W3C trace
/// context of the envelope, plus handler duration and outcome metrics.
///
/// The consumer runtime adds it for you.
#[derive(Debug, Clone)]
pub struct TelemetryLayer {
    metrics: Arc<ConsumerMetrics>,
}

impl TelemetryLayer {
    /// Telemetry for a consumer of `destination` on `system`, named `consumer`.
    pub fn new(system: &'static str, destination: &str, consumer: &str) -> Self {
        TelemetryLayer {
            metrics: Arc::new(ConsumerMetrics::new(system, destination, consumer)),
        }
    }

    pub(crate) fn from_metrics(metrics: Arc<ConsumerMetrics>) -> Self {
        TelemetryLayer { metrics }
    }
}

impl<H> Layer<H> for TelemetryLayer {
    type Handler = Telemetry<H>;
    fn layer(&self, inner: H) -> Telemetry<H> {
        Telemetry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The handler made by [`TelemetryLayer`].
#[derive(Debug, Clone)]
pub struct Telemetry<H> {
    inner: H,
    metrics: Arc<ConsumerMetrics>,
}

impl<H: Handler> Handler for Telemetry<H> {
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        let m = &self.metrics;
        let span = tracing::info_span!(
            "postbox.process",
            otel.name = %format_args!("process {}", m.destination),
            otel.kind = "consumer",
            messaging.system = m.system,
            messaging.operation.type = "process",
            messaging.destination.name = %m.destination,
            messaging.consumer.group.name = %m.consumer,
            messaging.message.id = %envelope.id,
            messaging.message.conversation_id = envelope.correlation_id.as_deref(),
            messaging.message.body.size = envelope.payload.len(),
            postbox.attempt = envelope.attempt,
            postbox.type = %envelope.event_type,
            traceparent = envelope.traceparent.as_deref(),
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let fut = self.inner.handle(envelope);
        async move {
            m.consumed.increment(1);
            let started = Instant::now();
            let result = fut.await;
            m.handler_duration.record(started.elapsed().as_secs_f64());
            match &result {
                Ok(()) => m.succeeded.increment(1),
                Err(e) => {
                    m.failed.increment(1);
                    let span = tracing::Span::current();
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", e.reason().as_str());
                    tracing::warn!(reason = e.reason().as_str(), error = %e.message(), "handler failed");
                }
            }
            result
        }
        .instrument(span)
    }
}
