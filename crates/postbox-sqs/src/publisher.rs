//! [`SqsBroker`]: the broker handle, its constructors, and its [`Publisher`]
//! implementation for SQS queues and SNS topics.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use postbox_core::telemetry::PublisherMetrics;
use postbox_core::{BatchReport, Envelope, Error, ErrorKind, Limit, PublishError, Publisher};
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Attribute, AttributeValue, Encoded};
use crate::config::{is_url, Destination, FifoDeduplication, Settings, SqsConfig};
use crate::error::{from_sdk, BatchEntryError};

/// `messaging.system` of this adapter.
pub const SYSTEM: &str = "aws_sqs";
/// Longest `DelaySeconds` SQS accepts: 15 minutes.
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// Entries per SQS/SNS batch call.
pub const MAX_BATCH: usize = 10;

pub(crate) struct Inner {
    pub(crate) sqs: aws_sdk_sqs::Client,
    pub(crate) sns: aws_sdk_sns::Client,
    urls: RwLock<HashMap<String, String>>,
    topics: RwLock<HashMap<String, String>>,
    pub(crate) settings: Settings,
    metrics: PublisherMetrics,
    /// Cancelled by [`Broker::close`](postbox_core::Broker::close): refuses
    /// new work and stops the receivers of every source of this handle.
    pub(crate) shutdown: CancellationToken,
}

/// The SQS/SNS broker handle: publishes ([`Publisher`]), subscribes,
/// provisions, reports backlog and health ([`postbox_core::Broker`]) and
/// operates dead-letter queues ([`postbox_core::DeadLetterOps`]). Cheap to
/// clone; every clone is the same handle.
///
/// Destinations address queues or topics, see the crate docs.
#[derive(Clone)]
pub struct SqsBroker {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for SqsBroker {
    // The clients are not printed: their configuration holds the credentials provider.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBroker")
            .field(
                "region",
                &self.inner.sqs.config().region().map(|r| r.as_ref()),
            )
            .field("settings", &self.inner.settings)
            .field("closed", &self.inner.shutdown.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl SqsBroker {
    /// A broker on `config`: the AWS default chain with its overrides, or
    /// your `SdkConfig` or clients (see [`SqsConfig`]). Fails with
    /// [`ErrorKind::Config`] when no region can be found.
    ///
    /// AWS clients connect lazily: nothing is sent here, so an unreachable
    /// endpoint shows on the first call; check with
    /// [`Broker::health`](postbox_core::Broker::health).
    pub async fn connect(config: SqsConfig) -> Result<SqsBroker, Error> {
        let (sqs, sns, settings) = config.into_parts().await?;
        Ok(SqsBroker {
            inner: Arc::new(Inner {
                sqs,
                sns,
                urls: RwLock::new(HashMap::new()),
                topics: RwLock::new(HashMap::new()),
                settings,
                metrics: PublisherMetrics::new(SYSTEM),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// A broker on the AWS default chain: `SqsBroker::connect(SqsConfig::from_env()?)`.
    /// Without a region (`AWS_REGION`, a profile, instance metadata) it is an
    /// [`ErrorKind::Config`] error naming `AWS_REGION`.
    pub async fn from_env() -> Result<SqsBroker, Error> {
        Self::connect(SqsConfig::from_env()?).await
    }

    /// [`ErrorKind::Closed`] once the handle is closed.
    pub(crate) fn ensure_open(&self) -> Result<(), Error> {
        if self.inner.shutdown.is_cancelled() {
            Err(closed())
        } else {
            Ok(())
        }
    }

    fn group_id(&self, env: &Envelope) -> String {
        env.key
            .clone()
            .or_else(|| self.inner.settings.fifo_default_group.clone())
            .unwrap_or_default()
    }

    /// The SQS client.
    pub fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.inner.sqs
    }

    /// The SNS client.
    pub fn sns(&self) -> &aws_sdk_sns::Client {
        &self.inner.sns
    }

    /// The URL of a queue (a name, normalised, or a URL), resolved once and cached.
    pub async fn queue_url(&self, queue: &str) -> Result<String, Error> {
        if is_url(queue) {
            return Ok(queue.to_string());
        }
        let name = crate::config::queue_name(queue);
        if let Some(url) = read(&self.inner.urls).get(&name) {
            return Ok(url.clone());
        }
        let out = self
            .inner
            .sqs
            .get_queue_url()
            .queue_name(&name)
            .send()
            .await
            .map_err(|e| from_sdk(&format!("GetQueueUrl {name}"), e))?;
        let url = out
            .queue_url
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no URL for queue {name}")))?;
        self.remember_queue(&name, &url);
        Ok(url)
    }

    pub(crate) fn remember_queue(&self, name: &str, url: &str) {
        write(&self.inner.urls).insert(name.to_string(), url.to_string());
    }

    pub(crate) fn forget_queue(&self, name: &str) {
        write(&self.inner.urls).remove(name);
    }

    pub(crate) fn remember_topic(&self, name: &str, arn: &str) {
        write(&self.inner.topics).insert(name.to_string(), arn.to_string());
    }

    /// The ARN of a topic (a name or an ARN), resolved once and cached.
    pub async fn topic_arn(&self, topic: &str) -> Result<String, Error> {
        if topic.starts_with("arn:") {
            return Ok(topic.to_string());
        }
        if let Some(arn) = read(&self.inner.topics).get(topic) {
            return Ok(arn.clone());
        }
        let suffix = format!(":{topic}");
        let mut pages = self.inner.sns.list_topics().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| from_sdk("ListTopics", e))?;
            for t in page.topics.unwrap_or_default() {
                if let Some(arn) = t.topic_arn {
                    if arn.ends_with(&suffix) {
                        self.remember_topic(topic, &arn);
                        return Ok(arn);
                    }
                }
            }
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!("no SNS topic named {topic:?} (declare it first)"),
        ))
    }

    fn failed(&self, error: Error, envelope: Envelope) -> PublishError {
        self.inner.metrics.failed.increment(1);
        PublishError::new(error, envelope)
    }

    fn dedup_id(&self, env: &Envelope) -> Option<String> {
        match self.inner.settings.fifo_dedup {
            FifoDeduplication::EnvelopeId => Some(env.id.to_string()),
            FifoDeduplication::ContentBased => None,
            FifoDeduplication::PerSend => Some(postbox_core::MessageId::new().to_string()),
        }
    }

    /// Checks and encodes `env` for `dest`.
    fn prepare(
        &self,
        dest: &Destination,
        env: &Envelope,
        delay: Option<Duration>,
    ) -> Result<Encoded, Error> {
        let fifo = dest.is_fifo();
        let max = match dest {
            Destination::Queue(_) => self.inner.settings.max_sqs_bytes,
            Destination::Topic(_) => self.inner.settings.max_sns_bytes,
        };
        let encoded = codec::encode(env, max)?;
        if fifo && env.key.is_none() && self.inner.settings.fifo_default_group.is_none() {
            return Err(Error::limit(Limit::FifoGroupRequired));
        }
        if let Some(delay) = delay {
            if delay > MAX_DELAY {
                return Err(Error::limit(Limit::Delay {
                    max: MAX_DELAY,
                    requested: delay,
                }));
            }
            if fifo && !delay.is_zero() {
                return Err(Error::limit(Limit::FifoDelayUnsupported));
            }
            if matches!(dest, Destination::Topic(_)) && !delay.is_zero() {
                return Err(Error::new(
                    ErrorKind::Config,
                    "SNS topics have no per-message delay; publish to a queue",
                ));
            }
        }
        Ok(encoded)
    }

    pub(crate) async fn send(
        &self,
        destination: &str,
        envelope: Envelope,
        delay: Option<Duration>,
    ) -> Result<(), PublishError> {
        if let Err(closed) = self.ensure_open() {
            return Err(self.failed(closed, envelope));
        }
        let dest = Destination::parse(destination);
        let encoded = match self.prepare(&dest, &envelope, delay) {
            Ok(e) => e,
            Err(e) => return Err(self.failed(e, envelope)),
        };
        let result = match &dest {
            Destination::Queue(q) => self.send_sqs(q, &envelope, encoded, delay).await,
            Destination::Topic(t) => self.send_sns(t, &envelope, encoded).await,
        };
        match result {
            Ok(()) => {
                self.inner.metrics.published.increment(1);
                Ok(())
            }
            Err(e) => Err(self.failed(e, envelope)),
        }
    }

    /// Sends the message an undecodable message's envelope stands for, as it
    /// arrived ([`codec::encode_raw`]): what replay does with one.
    pub(crate) async fn send_raw(&self, destination: &str, env: &Envelope) -> Result<(), Error> {
        let sent = self.try_send_raw(destination, env).await;
        match &sent {
            Ok(()) => self.inner.metrics.published.increment(1),
            Err(_) => self.inner.metrics.failed.increment(1),
        }
        sent
    }

    async fn try_send_raw(&self, destination: &str, env: &Envelope) -> Result<(), Error> {
        self.ensure_open()?;
        let dest = Destination::parse(destination);
        let max = match dest {
            Destination::Queue(_) => self.inner.settings.max_sqs_bytes,
            Destination::Topic(_) => self.inner.settings.max_sns_bytes,
        };
        let encoded = codec::encode_raw(env, max)?;
        if dest.is_fifo() && env.key.is_none() && self.inner.settings.fifo_default_group.is_none() {
            return Err(Error::limit(Limit::FifoGroupRequired));
        }
        match &dest {
            Destination::Queue(q) => self.send_sqs(q, env, encoded, None).await,
            Destination::Topic(t) => self.send_sns(t, env, encoded).await,
        }
    }

    async fn send_sqs(
        &self,
        queue: &str,
        env: &Envelope,
        enc: Encoded,
        delay: Option<Duration>,
    ) -> Result<(), Error> {
        let url = self.queue_url(queue).await?;
        let mut req = self
            .inner
            .sqs
            .send_message()
            .queue_url(&url)
            .message_body(enc.body)
            .set_message_attributes(Some(sqs_attributes(enc.attributes)?));
        if let Some(d) = delay {
            req = req.delay_seconds(ceil_secs(d));
        }
        if crate::config::name_of(queue).ends_with(".fifo") {
            req = req
                .message_group_id(self.group_id(env))
                .set_message_deduplication_id(self.dedup_id(env));
        }
        req.send().await.map_err(|e| {
            let err = from_sdk(&format!("SendMessage to {queue}"), e);
            if err.kind() == &ErrorKind::NotFound {
                self.forget_queue(queue);
            }
            err
        })?;
        Ok(())
    }

    async fn send_sns(&self, topic: &str, env: &Envelope, enc: Encoded) -> Result<(), Error> {
        let arn = self.topic_arn(topic).await?;
        let mut req = self
            .inner
            .sns
            .publish()
            .topic_arn(&arn)
            .message(enc.body)
            .set_message_attributes(Some(sns_attributes(enc.attributes)?));
        if arn.ends_with(".fifo") {
            req = req
                .message_group_id(self.group_id(env))
                .set_message_deduplication_id(self.dedup_id(env));
        }
        req.send()
            .await
            .map_err(|e| from_sdk(&format!("Publish to {topic}"), e))?;
        Ok(())
    }

    async fn batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        if self.inner.shutdown.is_cancelled() {
            return BatchReport::new(
                envelopes
                    .into_iter()
                    .map(|env| Err(self.failed(closed(), env)))
                    .collect(),
            );
        }
        let dest = Destination::parse(destination);
        let mut results: Vec<Option<Result<(), PublishError>>> =
            Vec::with_capacity(envelopes.len());
        let mut ready: Vec<(usize, Envelope, Encoded)> = Vec::new();
        for (i, env) in envelopes.into_iter().enumerate() {
            match self.prepare(&dest, &env, None) {
                Ok(enc) => {
                    results.push(None);
                    ready.push((i, env, enc));
                }
                Err(e) => results.push(Some(Err(self.failed(e, env)))),
            }
        }
        let max_bytes = match dest {
            Destination::Queue(_) => self.inner.settings.max_sqs_bytes,
            Destination::Topic(_) => self.inner.settings.max_sns_bytes,
        };
        // Chunks of at most 10 entries and at most the size limit in total.
        let mut chunks: Vec<Vec<(usize, Envelope, Encoded)>> = Vec::new();
        let mut size = 0;
        for item in ready {
            let s = item.2.size();
            match chunks.last_mut() {
                Some(c) if c.len() < MAX_BATCH && size + s <= max_bytes => {
                    size += s;
                    c.push(item);
                }
                _ => {
                    size = s;
                    chunks.push(vec![item]);
                }
            }
        }
        for chunk in chunks {
            let outcome = match &dest {
                Destination::Queue(q) => self.batch_sqs(q, &chunk).await,
                Destination::Topic(t) => self.batch_sns(t, &chunk).await,
            };
            match outcome {
                Ok(mut failed) => {
                    for (i, env, _) in chunk {
                        results[i] = Some(match failed.remove(&i) {
                            None => {
                                self.inner.metrics.published.increment(1);
                                Ok(())
                            }
                            Some(e) => Err(self.failed(e, env)),
                        });
                    }
                }
                Err(e) => {
                    for (i, env, _) in chunk {
                        let err = Error::new(e.kind().clone(), e.message().to_string());
                        results[i] = Some(Err(self.failed(err.with_source(clone_error(&e)), env)));
                    }
                }
            }
        }
        BatchReport::new(
            results
                .into_iter()
                .map(|r| r.expect("every message has a result"))
                .collect(),
        )
    }

    /// Sends one chunk; returns the failed entries by input index.
    async fn batch_sqs(
        &self,
        queue: &str,
        chunk: &[(usize, Envelope, Encoded)],
    ) -> Result<HashMap<usize, Error>, Error> {
        let url = self.queue_url(queue).await?;
        let fifo = crate::config::name_of(queue).ends_with(".fifo");
        let mut entries = Vec::with_capacity(chunk.len());
        for (i, env, enc) in chunk {
            let mut e = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(enc.body.clone())
                .set_message_attributes(Some(sqs_attributes(enc.attributes.clone())?));
            if fifo {
                e = e
                    .message_group_id(self.group_id(env))
                    .set_message_deduplication_id(self.dedup_id(env));
            }
            entries.push(e.build().map_err(|e| {
                Error::new(ErrorKind::Encode, "batch entry could not be built").with_source(e)
            })?);
        }
        let out = self
            .inner
            .sqs
            .send_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| from_sdk(&format!("SendMessageBatch to {queue}"), e))?;
        Ok(failed_entries(
            out.failed
                .into_iter()
                .map(|f| (f.id, f.code, f.message, f.sender_fault)),
            "SendMessageBatch",
        ))
    }

    async fn batch_sns(
        &self,
        topic: &str,
        chunk: &[(usize, Envelope, Encoded)],
    ) -> Result<HashMap<usize, Error>, Error> {
        let arn = self.topic_arn(topic).await?;
        let fifo = arn.ends_with(".fifo");
        let mut entries = Vec::with_capacity(chunk.len());
        for (i, env, enc) in chunk {
            let mut e = PublishBatchRequestEntry::builder()
                .id(i.to_string())
                .message(enc.body.clone())
                .set_message_attributes(Some(sns_attributes(enc.attributes.clone())?));
            if fifo {
                e = e
                    .message_group_id(self.group_id(env))
                    .set_message_deduplication_id(self.dedup_id(env));
            }
            entries.push(e.build().map_err(|e| {
                Error::new(ErrorKind::Encode, "batch entry could not be built").with_source(e)
            })?);
        }
        let out = self
            .inner
            .sns
            .publish_batch()
            .topic_arn(&arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await
            .map_err(|e| from_sdk(&format!("PublishBatch to {topic}"), e))?;
        Ok(failed_entries(
            out.failed
                .unwrap_or_default()
                .into_iter()
                .map(|f| (f.id, f.code, f.message, f.sender_fault)),
            "PublishBatch",
        ))
    }
}

fn failed_entries(
    failed: impl Iterator<Item = (String, String, Option<String>, bool)>,
    what: &str,
) -> HashMap<usize, Error> {
    let mut map = HashMap::new();
    for (id, code, message, sender_fault) in failed {
        if let Ok(i) = id.parse::<usize>() {
            let e = BatchEntryError {
                code,
                message,
                sender_fault,
            };
            map.insert(i, e.into_error(what));
        }
    }
    map
}

/// A copy of an error for each message of a failed batch call (kind and
/// message; the original source is described in text).
fn clone_error(e: &Error) -> Error {
    let mut msg = e.message().to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Error::new(e.kind().clone(), msg)
}

fn closed() -> Error {
    Error::new(ErrorKind::Closed, "the SQS broker handle is closed")
}

pub(crate) fn ceil_secs(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn sqs_attributes(attrs: Vec<Attribute>) -> Result<HashMap<String, MessageAttributeValue>, Error> {
    attrs
        .into_iter()
        .map(|a| {
            let value = MessageAttributeValue::builder().data_type(a.data_type);
            let value = match a.value {
                AttributeValue::Text(s) => value.string_value(s),
                AttributeValue::Binary(b) => {
                    value.binary_value(aws_sdk_sqs::primitives::Blob::new(b))
                }
            };
            let value = value.build().map_err(|e| {
                Error::new(ErrorKind::Encode, "bad message attribute").with_source(e)
            })?;
            Ok((a.name, value))
        })
        .collect()
}

fn sns_attributes(
    attrs: Vec<Attribute>,
) -> Result<HashMap<String, aws_sdk_sns::types::MessageAttributeValue>, Error> {
    attrs
        .into_iter()
        .map(|a| {
            let value = aws_sdk_sns::types::MessageAttributeValue::builder().data_type(a.data_type);
            let value = match a.value {
                AttributeValue::Text(s) => value.string_value(s),
                AttributeValue::Binary(b) => {
                    value.binary_value(aws_sdk_sns::primitives::Blob::new(b))
                }
            };
            let value = value.build().map_err(|e| {
                Error::new(ErrorKind::Encode, "bad message attribute").with_source(e)
            })?;
            Ok((a.name, value))
        })
        .collect()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Publisher for SqsBroker {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.send(destination, envelope, None).await
    }

    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        self.batch(destination, envelopes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}
