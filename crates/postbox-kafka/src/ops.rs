//! Operations: DLQ count / peek / replay / purge, consumer lag, health.
//!
//! # DLQ bookkeeping
//! A Kafka topic cannot delete single records, so the DLQ operations keep
//! their position in a dedicated consumer group (`postbox-dlq-ops` by
//! default, [`KafkaConfig::dlq_ops_group`]): what lies before its committed
//! offset has been replayed or purged.
//!
//! * `count` = Σ over partitions of (high watermark − max(committed, low
//!   watermark));
//! * `peek` reads from the committed offsets without committing (manual
//!   assignment, no group join);
//! * `replay` reads from the committed offsets; a record that matches the
//!   filter is published to its origin topic (id kept); one that does not is
//!   **re-appended** to the DLQ unchanged, so that committing past it does not
//!   lose it; then the group commits past everything it looked at. It stops
//!   at `limit` replayed records. The dead letter of an undecodable record
//!   goes back as the record that arrived (key, value and headers), so a
//!   consumer fixed in the meantime reads the original;
//! * `purge` commits the group to the high watermarks.
//!
//! On tansu the "latest" offset is the base offset of the last *batch* + 1,
//! so `count` undercounts when the DLQ was written in batches of several
//! records; publish dead letters with `batch.num.messages=1` on tansu (a
//! real Kafka broker and librdkafka's mock cluster are exact).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use postbox_core::codec::UNDECODABLE_TYPE;
use postbox_core::dlq::{prepare_replay, DeadLetterOps, ReplayFilter, ReplayReport};
use postbox_core::{Envelope, Error, ErrorKind, Health, PartitionLag};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::codec::{self, RecordRef};
use crate::config::KafkaConfig;
use crate::error::from_kafka;
use crate::publisher::{KafkaPublisher, SYSTEM};

/// DLQ operations, lag probes and the health check for one cluster.
#[derive(Clone)]
pub(crate) struct KafkaOps {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    consumer: Mutex<BaseConsumer>,
    publisher: KafkaPublisher,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaOps")
            .field("dlq_ops_group", &self.inner.config.ops_group)
            .finish_non_exhaustive()
    }
}

type Range = (i32, i64, i64);

impl KafkaOps {
    /// Operations that replay through `publisher`.
    pub(crate) fn new(config: &KafkaConfig, publisher: KafkaPublisher) -> Result<Self, Error> {
        let consumer = ops_consumer(config, &config.ops_group)?;
        Ok(KafkaOps {
            inner: Arc::new(Inner {
                config: config.clone(),
                consumer: Mutex::new(consumer),
                publisher,
                timeout: config.request_timeout,
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &BaseConsumer) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let c = inner.consumer.lock().unwrap_or_else(|e| e.into_inner());
            f(&inner, &c)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Other, "an operations task failed").with_source(e))?
    }

    /// Consumer lag of `group` on `topic`, per partition (none when the
    /// topic does not exist).
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>, Error> {
        let (topic, group) = (topic.to_string(), group.to_string());
        self.blocking(move |inner, _| {
            let c = ops_consumer(&inner.config, &group)?;
            let parts = partitions(&c, &topic, inner.timeout)?;
            let committed = committed(&c, &topic, &parts, inner.timeout)?;
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                let (lo, hi) = c
                    .fetch_watermarks(&topic, p, inner.timeout)
                    .map_err(|e| from_kafka("fetching watermarks failed", e))?;
                let done = committed.get(&p).copied();
                out.push(PartitionLag {
                    partition: p,
                    high_watermark: hi,
                    committed: done,
                    lag: (hi - done.unwrap_or(lo).max(lo)).max(0),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Checks broker connectivity (a metadata request).
    pub(crate) async fn health(&self) -> Result<Health, Error> {
        let started = std::time::Instant::now();
        self.blocking(move |inner, c| {
            let md = c.fetch_metadata(None, inner.timeout).map_err(|e| {
                let mut err = from_kafka("the Kafka cluster is not reachable", e);
                if !err.is_retryable() {
                    err = Error::new(ErrorKind::Connection, "the Kafka cluster is not reachable")
                        .with_source(err);
                }
                err
            })?;
            let detail = format!(
                "{} brokers, {} topics seen",
                md.brokers().len(),
                md.topics().len()
            );
            Ok(Health::new(SYSTEM, started.elapsed(), detail))
        })
        .await
    }

    /// The unconsumed range of each partition of `dlq`: (partition, start, end).
    fn ranges(inner: &Inner, c: &BaseConsumer, dlq: &str) -> Result<Vec<Range>, Error> {
        let parts = partitions(c, dlq, inner.timeout)?;
        let done = committed(c, dlq, &parts, inner.timeout)?;
        let mut out = Vec::with_capacity(parts.len());
        for p in parts {
            let (lo, hi) = c
                .fetch_watermarks(dlq, p, inner.timeout)
                .map_err(|e| from_kafka("fetching watermarks failed", e))?;
            let start = done.get(&p).copied().unwrap_or(lo).max(lo);
            out.push((p, start, hi.max(start)));
        }
        Ok(out)
    }

    /// Reads the records of `ranges` (at most `max` of them), in partition order.
    fn read(
        inner: &Inner,
        c: &BaseConsumer,
        dlq: &str,
        ranges: &[Range],
        max: usize,
    ) -> Result<Vec<OwnedMessage>, Error> {
        let mut tpl = TopicPartitionList::new();
        let mut end: HashMap<i32, i64> = HashMap::new();
        for &(p, start, hi) in ranges {
            if start < hi {
                let _ = tpl.add_partition_offset(dlq, p, Offset::Offset(start));
                end.insert(p, hi);
            }
        }
        let mut out = Vec::new();
        if end.is_empty() || max == 0 {
            return Ok(out);
        }
        c.assign(&tpl)
            .map_err(|e| from_kafka("assigning DLQ partitions failed", e))?;
        let deadline = Instant::now() + inner.timeout;
        let result = loop {
            if end.is_empty() || out.len() >= max {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(Error::new(
                    ErrorKind::Timeout,
                    format!("reading {dlq} did not reach its end in time"),
                ));
            }
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let p = m.partition();
                    let Some(&hi) = end.get(&p) else { continue };
                    if m.offset() < hi {
                        out.push(m.detach());
                    }
                    if m.offset() + 1 >= hi {
                        end.remove(&p);
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "DLQ read error"),
                None => {}
            }
        };
        let _ = c.unassign();
        result?;
        out.sort_by_key(|m| (m.partition(), m.offset()));
        Ok(out)
    }

    fn commit(c: &BaseConsumer, dlq: &str, positions: &HashMap<i32, i64>) -> Result<(), Error> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in positions {
            let _ = tpl.add_partition_offset(dlq, p, Offset::Offset(o));
        }
        c.commit(&tpl, CommitMode::Sync)
            .map_err(|e| from_kafka("committing the DLQ position failed", e))
    }
}

/// The envelope of a stored record.
pub(crate) fn envelope_of(m: &OwnedMessage) -> Envelope {
    let rec = RecordRef {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
    };
    let headers = m.headers();
    let decoded = codec::decode(
        rec,
        || {
            headers
                .into_iter()
                .flat_map(|h| h.iter())
                .map(|h| (h.key, h.value))
        },
        &std::borrow::Cow::Borrowed(postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE),
    );
    *decoded.envelope
}

fn ops_consumer(config: &KafkaConfig, group: &str) -> Result<BaseConsumer, Error> {
    let mut native = config.with_defaults(&[("auto.offset.reset", "earliest")]);
    native
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    native
        .create()
        .map_err(|e| from_kafka("the Kafka operations consumer could not be created", e))
}

/// Partitions of `topic`; none when it does not exist.
fn partitions(c: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>, Error> {
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| from_kafka("fetching topic metadata failed", e))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

fn committed(
    c: &BaseConsumer,
    topic: &str,
    parts: &[i32],
    timeout: Duration,
) -> Result<HashMap<i32, i64>, Error> {
    if parts.is_empty() {
        return Ok(HashMap::new());
    }
    let mut tpl = TopicPartitionList::new();
    for &p in parts {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, timeout)
        .map_err(|e| from_kafka("fetching committed offsets failed", e))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// Most records a single replay looks at.
const REPLAY_WINDOW: usize = 10_000;

#[async_trait]
impl DeadLetterOps for KafkaOps {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        let dlq = dlq.to_string();
        self.blocking(move |inner, c| {
            let ranges = Self::ranges(inner, c, &dlq)?;
            Ok(ranges.iter().map(|(_, s, h)| (h - s).max(0) as u64).sum())
        })
        .await
    }

    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        let dlq = dlq.to_string();
        self.blocking(move |inner, c| {
            let ranges = Self::ranges(inner, c, &dlq)?;
            let records = Self::read(inner, c, &dlq, &ranges, limit)?;
            Ok(records.iter().take(limit).map(envelope_of).collect())
        })
        .await
    }

    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        let name = dlq.to_string();
        let records = self
            .blocking(move |inner, c| {
                let ranges = Self::ranges(inner, c, &name)?;
                Self::read(inner, c, &name, &ranges, REPLAY_WINDOW)
            })
            .await?;
        let mut report = ReplayReport::default();
        let mut positions: HashMap<i32, i64> = HashMap::new();
        let mut failure = None;
        for m in &records {
            if report.replayed >= limit {
                break;
            }
            let env = envelope_of(m);
            let replay = if filter(&env) {
                prepare_replay(env)
            } else {
                None
            };
            let result = match replay {
                // An undecodable record goes back as it arrived.
                Some((origin, env)) if env.event_type == UNDECODABLE_TYPE => {
                    match codec::restore_undecodable(&env) {
                        Ok(raw) => self
                            .inner
                            .publisher
                            .send_raw(
                                &origin,
                                raw.key.as_deref(),
                                Some(&raw.value[..]),
                                Some(raw.owned_headers()),
                            )
                            .await
                            .map(|()| report.replayed += 1),
                        Err(e) => Err(e),
                    }
                }
                Some((origin, env)) => self
                    .inner
                    .publisher
                    .publish_to(&origin, env)
                    .await
                    .map(|()| report.replayed += 1),
                None => {
                    // Kept: re-appended, so committing past it loses nothing.
                    let headers = m.headers().map(|h| h.as_borrowed().detach());
                    self.inner
                        .publisher
                        .send_raw(dlq, m.key(), m.payload(), headers)
                        .await
                        .map(|()| report.skipped += 1)
                }
            };
            if let Err(e) = result {
                failure = Some(e);
                break;
            }
            positions.insert(m.partition(), m.offset() + 1);
        }
        let name = dlq.to_string();
        self.blocking(move |_, c| Self::commit(c, &name, &positions))
            .await?;
        match failure {
            Some(e) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "replay stopped short: {} messages replayed; the rest stay in {dlq:?}",
                    report.replayed
                ),
            )
            .with_source(e)),
            None => Ok(report),
        }
    }

    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        let dlq = dlq.to_string();
        self.blocking(move |inner, c| {
            let ranges = Self::ranges(inner, c, &dlq)?;
            let positions: HashMap<i32, i64> = ranges.iter().map(|&(p, _, h)| (p, h)).collect();
            Self::commit(c, &dlq, &positions)?;
            Ok(ranges.iter().map(|(_, s, h)| (h - s).max(0) as u64).sum())
        })
        .await
    }
}
