//! Metrics through the `metrics` facade and OpenTelemetry-named `tracing`
//! spans, observed from a real consumer run on the memory broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use postbox_core::{
    handler_fn, telemetry, Consumer, DeadLetterRouter, Envelope, HandlerBuilder, HandlerError,
    IdempotencyLayer, MemoryIdempotencyStore, Publisher, RetryPolicy,
};
use postbox_memory::MemoryBroker;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

#[derive(Default, Clone)]
struct Spans(Arc<Mutex<Vec<HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);
impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        fields.insert("span.name".to_string(), attrs.metadata().name().to_string());
        attrs.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(fields);
    }
}

#[test]
fn consumer_reports_metrics_and_otel_spans() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");
    let spans = Spans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let broker = MemoryBroker::new();
        let handler = HandlerBuilder::new()
            .layer(IdempotencyLayer::new(Arc::new(
                MemoryIdempotencyStore::new(100),
            )))
            .handler(handler_fn(|env: Envelope| async move {
                match env.event_type.as_ref() {
                    "poison" => Err(HandlerError::permanent("poison")),
                    "flaky" if env.attempt == 1 => Err(HandlerError::transient("flaky")),
                    _ => Ok(()),
                }
            }));
        let consumer = Consumer::builder(broker.subscribe("orders"), handler)
            .name("billing")
            .retry_policy(RetryPolicy::exponential(Duration::from_millis(5)))
            .dead_letter(DeadLetterRouter::new(broker.clone()))
            .build()
            .unwrap()
            .spawn();
        let ok = Envelope::new("ok", "{}");
        for env in [
            ok.clone(),
            ok,
            Envelope::new("flaky", "{}"),
            Envelope::new("poison", "{}"),
        ] {
            broker.publish("orders", env).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while broker.depth("orders.dlq") < 1
            || broker.depth("orders") + broker.delayed("orders") > 0
            || broker.unacked("orders") > 0
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "consumer did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = consumer.shutdown().await.unwrap();
        assert_eq!(
            (report.acked, report.retried, report.dead_lettered),
            (3, 1, 1),
            "{report:?}"
        );
    });

    let mut counters: HashMap<String, u64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_string();
        let labels: HashMap<_, _> = key
            .key()
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        if name.starts_with("postbox_")
            && ![
                telemetry::PUBLISHED,
                telemetry::PUBLISH_FAILED,
                telemetry::DUPLICATES_SKIPPED,
            ]
            .contains(&name.as_str())
        {
            assert_eq!(
                labels.get("messaging_system").map(String::as_str),
                Some("memory"),
                "{name}"
            );
            assert_eq!(
                labels.get("destination").map(String::as_str),
                Some("orders"),
                "{name}"
            );
            assert_eq!(
                labels.get("consumer").map(String::as_str),
                Some("billing"),
                "{name}"
            );
        }
        match value {
            DebugValue::Counter(n) => *counters.entry(name).or_default() += n,
            DebugValue::Histogram(samples) => {
                *counters.entry(name).or_default() += samples.len() as u64
            }
            DebugValue::Gauge(_) => {
                counters.entry(name).or_default();
            }
        }
    }
    // 4 published + 1 retry redelivery handled; the DLQ copy is published too.
    assert_eq!(counters[telemetry::PUBLISHED], 5, "{counters:?}");
    assert_eq!(counters[telemetry::CONSUMED], 5, "{counters:?}");
    assert_eq!(counters[telemetry::SUCCEEDED], 3, "{counters:?}");
    assert_eq!(counters[telemetry::FAILED], 2, "{counters:?}");
    assert_eq!(counters[telemetry::RETRIED], 1, "{counters:?}");
    assert_eq!(counters[telemetry::DEAD_LETTERED], 1, "{counters:?}");
    assert_eq!(counters[telemetry::DUPLICATES_SKIPPED], 1, "{counters:?}");
    assert_eq!(counters[telemetry::HANDLER_DURATION], 5, "{counters:?}");
    assert!(counters.contains_key(telemetry::IN_FLIGHT), "{counters:?}");

    let spans = spans.0.lock().unwrap();
    let process: Vec<_> = spans
        .iter()
        .filter(|s| s["span.name"] == "postbox.process")
        .collect();
    assert_eq!(process.len(), 5);
    for s in process {
        assert_eq!(s["otel.name"], "process orders");
        assert_eq!(s["messaging.system"], "memory");
        assert_eq!(s["messaging.destination.name"], "orders");
        assert_eq!(s["messaging.consumer.group.name"], "billing");
        assert!(!s["messaging.message.id"].is_empty());
    }
}
