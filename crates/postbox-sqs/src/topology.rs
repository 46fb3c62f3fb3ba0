//! Provisioning (idempotent): queues with FIFO, visibility, retention and a
//! dead-letter queue behind a native redrive policy; SNS topics; SQS
//! subscriptions with raw delivery, filter policies and the queue policy that
//! lets SNS deliver. `Broker::provision` (and `subscribe`, unless told not
//! to) declares the usual shape with these; call them directly for the rest
//! (filter policies, retention, wrapped delivery).
//!
//! Running any declaration again is harmless: existing queues get the
//! declared attributes (except `FifoQueue`, which SQS cannot change),
//! existing subscriptions get the declared raw-delivery and filter settings,
//! and the queue policy statement is added once per topic.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use postbox_core::{Error, ErrorKind};

use crate::config::{name_of, queue_name};
use crate::error::from_sdk;
use crate::publisher::SqsBroker;

/// A queue to declare.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueueSpec {
    /// Queue name (normalised, see [`queue_name`](crate::queue_name)); `.fifo` makes it FIFO.
    pub name: String,
    /// Default visibility timeout (SQS default 30 s).
    pub visibility_timeout: Option<Duration>,
    /// Message retention (SQS default 4 days; at most 14 days).
    pub retention: Option<Duration>,
    /// Declare `<name>.dlq` and a redrive policy with this `maxReceiveCount`
    /// (default 10). Keep it above the retry policy's attempts: postbox
    /// dead-letters with metadata first; the redrive policy is the safety net.
    pub max_receive_count: Option<u32>,
    /// FIFO content-based de-duplication.
    pub content_based_deduplication: bool,
}

impl QueueSpec {
    /// A queue with a DLQ (redrive after 10 receives) and SQS defaults otherwise.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: queue_name(&name.into()),
            visibility_timeout: None,
            retention: None,
            max_receive_count: Some(10),
            content_based_deduplication: false,
        }
    }
    /// Sets the default visibility timeout.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = Some(d);
        self
    }
    /// Sets the retention period.
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = Some(d);
        self
    }
    /// Sets the redrive policy's `maxReceiveCount`.
    pub fn max_receive_count(mut self, n: u32) -> Self {
        self.max_receive_count = Some(n);
        self
    }
    /// No DLQ and no redrive policy.
    pub fn without_dead_letter_queue(mut self) -> Self {
        self.max_receive_count = None;
        self
    }
    /// Enables FIFO content-based de-duplication.
    pub fn content_based_deduplication(mut self, on: bool) -> Self {
        self.content_based_deduplication = on;
        self
    }
    fn is_fifo(&self) -> bool {
        self.name.ends_with(".fifo")
    }
}

/// An SQS queue subscribed to an SNS topic.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionSpec {
    /// Topic name or ARN.
    pub topic: String,
    /// Queue name or URL.
    pub queue: String,
    /// Raw message delivery (default on): the body is the CloudEvent as
    /// published. Off: SNS wraps it in its notification JSON (decoded too).
    pub raw: bool,
    /// An SNS filter policy (JSON) on the message attributes, e.g.
    /// `{"type":["order.placed"]}`.
    pub filter_policy: Option<String>,
}

impl SubscriptionSpec {
    /// A raw-delivery subscription without filter.
    pub fn new(topic: impl Into<String>, queue: impl Into<String>) -> Self {
        SubscriptionSpec {
            topic: topic.into(),
            queue: queue.into(),
            raw: true,
            filter_policy: None,
        }
    }
    /// Raw message delivery on or off.
    pub fn raw(mut self, raw: bool) -> Self {
        self.raw = raw;
        self
    }
    /// Sets the filter policy (JSON).
    pub fn filter_policy(mut self, policy: impl Into<String>) -> Self {
        self.filter_policy = Some(policy.into());
        self
    }
}

fn secs(d: Duration) -> String {
    d.as_secs().to_string()
}

impl SqsBroker {
    /// Declares a queue (and its DLQ with a redrive policy); returns its URL.
    pub async fn declare_queue(&self, spec: &QueueSpec) -> Result<String, Error> {
        let mut attrs: HashMap<QueueAttributeName, String> = HashMap::new();
        if let Some(max) = spec.max_receive_count {
            let dlq = QueueSpec {
                name: queue_name(&postbox_core::dlq::default_destination(&spec.name)),
                visibility_timeout: None,
                retention: Some(Duration::from_secs(14 * 24 * 3600)),
                max_receive_count: None,
                content_based_deduplication: spec.content_based_deduplication,
            };
            let dlq_url = Box::pin(self.declare_queue(&dlq)).await?;
            let arn = self.queue_arn(&dlq_url).await?;
            let policy = serde_json::json!({
                "deadLetterTargetArn": arn,
                "maxReceiveCount": max.to_string(),
            });
            attrs.insert(QueueAttributeName::RedrivePolicy, policy.to_string());
        }
        if let Some(v) = spec.visibility_timeout {
            attrs.insert(QueueAttributeName::VisibilityTimeout, secs(v));
        }
        if let Some(r) = spec.retention {
            attrs.insert(QueueAttributeName::MessageRetentionPeriod, secs(r));
        }
        if spec.content_based_deduplication {
            attrs.insert(QueueAttributeName::ContentBasedDeduplication, "true".into());
        }
        let mut create = attrs.clone();
        if spec.is_fifo() {
            create.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        let res = self
            .inner
            .sqs
            .create_queue()
            .queue_name(&spec.name)
            .set_attributes(Some(create))
            .send()
            .await;
        let url = match res {
            Ok(out) => out.queue_url.unwrap_or_default(),
            Err(e) => {
                let code = aws_sdk_sqs::error::ProvideErrorMetadata::code(&e)
                    .unwrap_or("")
                    .to_string();
                if !code.contains("QueueAlreadyExists") && !code.contains("QueueNameExists") {
                    return Err(from_sdk(&format!("CreateQueue {}", spec.name), e));
                }
                // Exists with other attributes: bring them to the declared state.
                self.forget_queue(&spec.name);
                let url = self.queue_url(&spec.name).await?;
                self.inner
                    .sqs
                    .set_queue_attributes()
                    .queue_url(&url)
                    .set_attributes(Some(attrs))
                    .send()
                    .await
                    .map_err(|e| from_sdk(&format!("SetQueueAttributes {}", spec.name), e))?;
                url
            }
        };
        self.remember_queue(&spec.name, &url);
        Ok(url)
    }

    /// The ARN of a queue (name or URL).
    pub async fn queue_arn(&self, queue: &str) -> Result<String, Error> {
        let url = self.queue_url(queue).await?;
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| from_sdk("GetQueueAttributes QueueArn", e))?;
        out.attributes
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no ARN for queue {queue}")))
    }

    /// Declares an SNS topic (FIFO when the name ends in `.fifo`); returns its ARN.
    pub async fn declare_topic(&self, name: &str) -> Result<String, Error> {
        let mut req = self.inner.sns.create_topic().name(name);
        if name.ends_with(".fifo") {
            req = req.attributes("FifoTopic", "true");
        }
        let arn = req
            .send()
            .await
            .map_err(|e| from_sdk(&format!("CreateTopic {name}"), e))?
            .topic_arn
            .ok_or_else(|| Error::new(ErrorKind::Other, "CreateTopic returned no ARN"))?;
        self.remember_topic(name, &arn);
        Ok(arn)
    }

    /// Subscribes a queue to a topic (both must exist): adds the queue policy
    /// statement that lets the topic send, subscribes, and sets raw delivery
    /// and the filter policy. Returns the subscription ARN.
    pub async fn declare_subscription(&self, spec: &SubscriptionSpec) -> Result<String, Error> {
        let topic_arn = self.topic_arn(&spec.topic).await?;
        let url = self.queue_url(&spec.queue).await?;
        let queue_arn = self.queue_arn(&url).await?;
        self.allow_topic(&url, &queue_arn, &topic_arn).await?;
        let mut req = self
            .inner
            .sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .return_subscription_arn(true);
        if spec.raw {
            req = req.attributes("RawMessageDelivery", "true");
        }
        if let Some(f) = &spec.filter_policy {
            req = req.attributes("FilterPolicy", f);
        }
        let sub_arn = match req.send().await {
            Ok(out) => out.subscription_arn.unwrap_or_default(),
            Err(e) => {
                // Exists with other attributes: find it and update it below.
                let err = from_sdk("Subscribe", e);
                self.find_subscription(&topic_arn, &queue_arn)
                    .await?
                    .ok_or(err)?
            }
        };
        let sns = &self.inner.sns;
        let set = |name: &'static str, value: String| {
            sns.set_subscription_attributes()
                .subscription_arn(&sub_arn)
                .attribute_name(name)
                .attribute_value(value)
                .send()
        };
        set("RawMessageDelivery", spec.raw.to_string())
            .await
            .map_err(|e| from_sdk("SetSubscriptionAttributes RawMessageDelivery", e))?;
        if let Some(f) = &spec.filter_policy {
            set("FilterPolicy", f.clone())
                .await
                .map_err(|e| from_sdk("SetSubscriptionAttributes FilterPolicy", e))?;
        }
        Ok(sub_arn)
    }

    async fn find_subscription(
        &self,
        topic_arn: &str,
        queue_arn: &str,
    ) -> Result<Option<String>, Error> {
        let mut pages = self
            .inner
            .sns
            .list_subscriptions_by_topic()
            .topic_arn(topic_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| from_sdk("ListSubscriptionsByTopic", e))?;
            for s in page.subscriptions.unwrap_or_default() {
                if s.endpoint.as_deref() == Some(queue_arn) {
                    return Ok(s.subscription_arn);
                }
            }
        }
        Ok(None)
    }

    /// Adds (once) the queue policy statement letting `topic_arn` send to the queue.
    async fn allow_topic(&self, url: &str, queue_arn: &str, topic_arn: &str) -> Result<(), Error> {
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::Policy)
            .send()
            .await
            .map_err(|e| from_sdk("GetQueueAttributes Policy", e))?;
        let existing = out
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::Policy).cloned());
        let mut policy: serde_json::Value = existing
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or_else(|| serde_json::json!({"Version": "2012-10-17", "Statement": []}));
        let sid = format!(
            "postbox-sns-{}",
            name_of(topic_arn).rsplit(':').next().unwrap_or("")
        );
        let statements = policy
            .get_mut("Statement")
            .and_then(|s| s.as_array_mut())
            .ok_or_else(|| {
                Error::new(ErrorKind::Config, "the queue policy has no Statement list")
            })?;
        if statements
            .iter()
            .any(|s| s.get("Sid").and_then(|v| v.as_str()) == Some(sid.as_str()))
        {
            return Ok(());
        }
        statements.push(serde_json::json!({
            "Sid": sid,
            "Effect": "Allow",
            "Principal": {"Service": "sns.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
        }));
        self.inner
            .sqs
            .set_queue_attributes()
            .queue_url(url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| from_sdk("SetQueueAttributes Policy", e))?;
        Ok(())
    }

    /// The redrive policy of a queue, as `(dead-letter target ARN, maxReceiveCount)`.
    pub async fn redrive_policy(&self, queue: &str) -> Result<Option<(String, u32)>, Error> {
        let url = self.queue_url(queue).await?;
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| from_sdk("GetQueueAttributes RedrivePolicy", e))?;
        let Some(raw) = out
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy).cloned())
        else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(&raw)
            .map_err(|e| Error::new(ErrorKind::Decode, "invalid RedrivePolicy").with_source(e))?;
        let arn = v["deadLetterTargetArn"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let max = match &v["maxReceiveCount"] {
            serde_json::Value::String(s) => s.parse().unwrap_or(0),
            serde_json::Value::Number(n) => n.as_u64().unwrap_or(0) as u32,
            _ => 0,
        };
        Ok(Some((arn, max)))
    }
}
