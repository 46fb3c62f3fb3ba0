//! The Kafka publisher: idempotent producer, `acks=all`, resolves on the
//! delivery report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::telemetry::PublisherMetrics;
use postbox_core::{
    BatchReport, ContentMode, Envelope, Error, ErrorKind, Limit, PublishError, Publisher,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::codec::{self, RetryInfo};
use crate::config::KafkaConfig;
use crate::error::from_kafka;

/// `messaging.system` of this adapter.
pub const SYSTEM: &str = "kafka";

/// Producer settings postbox sets unless the configuration sets them: the
/// idempotent producer with `acks=all`, so a delivery report means the record
/// is durably written and never duplicated by producer retries.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

/// Publishes envelopes to Kafka topics in CloudEvents binary mode (the
/// publishing half of [`KafkaBroker`](crate::KafkaBroker)).
///
/// `publish` returns after the delivery report (`acks=all`, idempotent
/// producer); `publish_batch` enqueues the whole batch first (pipelined,
/// batched by librdkafka) and then reports each record's delivery. The
/// encoded record is checked against `message.max.bytes` before sending
/// ([`Limit::BodySize`]). A failed publish hands the envelope back.
///
/// The record's partition is chosen by librdkafka's partitioner from the
/// record key, which is the envelope's partition key.
#[derive(Clone)]
pub(crate) struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    producer: FutureProducer,
    max_bytes: usize,
    /// How envelopes are written.
    mode: ContentMode,
    metrics: PublisherMetrics,
    /// Set by [`KafkaPublisher::close`]: nothing is enqueued any more.
    closed: AtomicBool,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher with its own producer.
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self, Error> {
        let native = config.with_defaults(PRODUCER_DEFAULTS);
        if native.get("acks").is_some_and(|a| a != "all" && a != "-1") {
            tracing::warn!("the producer is configured with a weaker `acks` than `all`: publish confirms are not durable");
        }
        let producer: FutureProducer = native
            .create()
            .map_err(|e| from_kafka("the Kafka producer could not be created", e))?;
        Ok(KafkaPublisher {
            inner: Arc::new(Inner {
                producer,
                max_bytes: config.max_message_bytes(),
                mode: config.mode,
                metrics: PublisherMetrics::new(SYSTEM),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The underlying producer.
    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.inner.producer
    }

    /// The size limit checked before sending (`message.max.bytes`).
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.inner.max_bytes
    }

    /// Whether [`KafkaPublisher::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Refuses new records from now on, then waits (up to `timeout`) until
    /// every record already queued got its delivery report. Asynchronous:
    /// the producer's own thread serves the reports.
    pub(crate) async fn close(&self, timeout: Duration) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.inner.producer.in_flight_count();
            if left <= 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("{left} records still had no delivery report when closing timed out ({timeout:?})"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn closed_error() -> Error {
        Error::new(
            ErrorKind::Closed,
            "the Kafka broker handle is closed: nothing is published any more",
        )
    }

    /// Encodes and enqueues one record (waiting while the local queue is full).
    async fn enqueue(
        &self,
        topic: &str,
        env: &Envelope,
        retry: Option<&RetryInfo>,
    ) -> Result<DeliveryFuture, Error> {
        if self.is_closed() {
            return Err(Self::closed_error());
        }
        let encoded = codec::encode(env, retry, self.inner.mode)?;
        if encoded.size > self.inner.max_bytes {
            return Err(Error::limit(Limit::BodySize {
                max: self.inner.max_bytes,
                actual: encoded.size,
            }));
        }
        let value = encoded.body.as_deref().unwrap_or(&env.payload[..]);
        let mut record = FutureRecord::to(topic)
            .payload(value)
            .headers(encoded.headers);
        if let Some(key) = env.key.as_deref() {
            record = record.key(key);
        }
        self.enqueue_record(record).await
    }

    async fn enqueue_record<K, P>(
        &self,
        mut record: FutureRecord<'_, K, P>,
    ) -> Result<DeliveryFuture, Error>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        loop {
            match self.inner.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(from_kafka("the record could not be enqueued", e)),
            }
        }
    }

    async fn report(delivery: DeliveryFuture) -> Result<(i32, i64), Error> {
        match delivery.await {
            Ok(Ok(d)) => Ok((d.partition, d.offset)),
            Ok(Err((e, _))) => Err(from_kafka("the broker did not accept the record", e)),
            Err(_) => Err(Error::new(
                ErrorKind::Closed,
                "the producer was closed before the delivery report",
            )),
        }
    }

    /// Publishes and returns the partition and offset written.
    pub(crate) async fn send(
        &self,
        topic: &str,
        env: Envelope,
        retry: Option<&RetryInfo>,
    ) -> Result<(i32, i64), PublishError> {
        let result = match self.enqueue(topic, &env, retry).await {
            Ok(f) => Self::report(f).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(pos) => {
                self.inner.metrics.published.increment(1);
                Ok(pos)
            }
            Err(e) => {
                self.inner.metrics.failed.increment(1);
                Err(PublishError::new(e, env))
            }
        }
    }

    /// Publishes with the error only (the envelope is not needed back).
    pub(crate) async fn publish_to(&self, topic: &str, env: Envelope) -> Result<(), Error> {
        self.send(topic, env, None)
            .await
            .map(|_| ())
            .map_err(|e| e.error)
    }

    /// Writes a record as it is (key, value, headers): used to keep a
    /// dead letter in its DLQ while others are replayed.
    pub(crate) async fn send_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Self::closed_error());
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let f = self.enqueue_record(record).await?;
        Self::report(f).await.map(|_| ())
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.send(destination, envelope, None).await.map(|_| ())
    }

    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        // Enqueue everything first (librdkafka batches and pipelines), then
        // collect the delivery reports in input order.
        let mut pending = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let queued = self.enqueue(destination, &env, None).await;
            pending.push((env, queued));
        }
        let mut results = Vec::with_capacity(pending.len());
        for (env, queued) in pending {
            let result = match queued {
                Ok(f) => Self::report(f).await,
                Err(e) => Err(e),
            };
            results.push(match result {
                Ok(_) => {
                    self.inner.metrics.published.increment(1);
                    Ok(())
                }
                Err(e) => {
                    self.inner.metrics.failed.increment(1);
                    Err(PublishError::new(e, env))
                }
            });
        }
        BatchReport::new(results)
    }
}
