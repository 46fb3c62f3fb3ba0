//! Operations: queue backlog, DLQ count / peek / replay / purge
//! ([`DeadLetterOps`]), and the health check.
//!
//! * backlog: `ApproximateNumberOfMessages`, `…NotVisible`, `…Delayed`;
//! * peek: receive (hidden for a while), then make visible again at once
//!   (`ChangeMessageVisibility 0`), so nothing is consumed. Every message is
//!   shown: one that is not a valid CloudEvent appears raw (type
//!   [`UNDECODABLE_TYPE`](crate::UNDECODABLE_TYPE), body as payload,
//!   attributes in [`ATTRIBUTES_HEADER`](crate::ATTRIBUTES_HEADER), those
//!   named like postbox's metadata as metadata headers), so `count`, `peek`,
//!   `replay` and `purge` agree;
//! * replay: receive, publish matching messages back to their origin queue
//!   (ids kept, [`prepare_replay`]), then delete them from the DLQ; the rest
//!   is made visible again. An undecodable message's copy goes back as the
//!   body and attributes that arrived; a dead letter without `dlqorigin`
//!   (moved there by the redrive policy) is skipped;
//! * purge: receive and delete until the queue is empty (an exact count;
//!   [`SqsBroker::purge_queue`] is the native `PurgeQueue`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName,
};
use postbox_core::dlq::{prepare_replay, DeadLetterOps, ReplayFilter, ReplayReport};
use postbox_core::{Backlog, Envelope, Error, ErrorKind, Health, Publisher};

use crate::codec::{self, Received};
use crate::config::{name_of, queue_name};
use crate::error::from_sdk;
use crate::publisher::{SqsBroker, MAX_BATCH, SYSTEM};

/// How long peek/replay keep received messages hidden before giving them back.
const HOLD: i32 = 60;

impl SqsBroker {
    /// The backlog of a queue (name or URL): `ApproximateNumberOfMessages`
    /// waiting, `…NotVisible` in flight, `…Delayed` delayed.
    pub(crate) async fn queue_backlog(&self, queue: &str) -> Result<Backlog, Error> {
        let url = self.queue_url(queue).await?;
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| from_sdk("GetQueueAttributes", e))?;
        let attrs = out.attributes.unwrap_or_default();
        let get = |n: QueueAttributeName| {
            attrs
                .get(&n)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut backlog = Backlog::waiting(get(QueueAttributeName::ApproximateNumberOfMessages));
        backlog.in_flight = Some(get(
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ));
        backlog.delayed = Some(get(QueueAttributeName::ApproximateNumberOfMessagesDelayed));
        Ok(backlog)
    }

    /// Checks that SQS answers (a `ListQueues` of one, within 5 s).
    pub(crate) async fn check_health(&self) -> Result<Health, Error> {
        self.ensure_open()?;
        let started = Instant::now();
        let call = self.inner.sqs.list_queues().max_results(1).send();
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(_)) => {
                let region = self.inner.sqs.config().region().map_or("?", |r| r.as_ref());
                Ok(Health::new(
                    SYSTEM,
                    started.elapsed(),
                    format!("SQS answered ListQueues (region {region})"),
                ))
            }
            Ok(Err(e)) => Err(from_sdk("ListQueues (health check)", e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                "SQS did not answer within 5 s",
            )),
        }
    }

    /// The native `PurgeQueue` (asynchronous on AWS, at most once a minute).
    pub async fn purge_queue(&self, queue: &str) -> Result<(), Error> {
        let url = self.queue_url(queue).await?;
        self.inner
            .sqs
            .purge_queue()
            .queue_url(&url)
            .send()
            .await
            .map_err(|e| from_sdk("PurgeQueue", e))?;
        Ok(())
    }

    async fn receive_batch(&self, url: &str, max: i32) -> Result<Vec<Message>, Error> {
        let out = self
            .inner
            .sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max.clamp(1, 10))
            .visibility_timeout(HOLD)
            .wait_time_seconds(0)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .map_err(|e| from_sdk("ReceiveMessage", e))?;
        Ok(out.messages.unwrap_or_default())
    }

    async fn delete_receipts(&self, url: &str, receipts: &[String]) -> Result<(), Error> {
        for chunk in receipts.chunks(MAX_BATCH) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .ok()
                })
                .collect();
            let out = self
                .inner
                .sqs
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| from_sdk("DeleteMessageBatch", e))?;
            if let Some(f) = out.failed.into_iter().next() {
                return Err(crate::error::BatchEntryError {
                    code: f.code,
                    message: f.message,
                    sender_fault: f.sender_fault,
                }
                .into_error("DeleteMessageBatch"));
            }
        }
        Ok(())
    }

    async fn show_again(&self, url: &str, receipts: &[String]) {
        for r in receipts {
            let _ = self
                .inner
                .sqs
                .change_message_visibility()
                .queue_url(url)
                .receipt_handle(r)
                .visibility_timeout(0)
                .send()
                .await;
        }
    }

    /// A dead letter as an envelope: decoded, foreign, or — when it claims
    /// to be a CloudEvent but breaks the format — what arrived (type
    /// [`UNDECODABLE_TYPE`](crate::UNDECODABLE_TYPE), the body as payload,
    /// the attributes in [`ATTRIBUTES_HEADER`](crate::ATTRIBUTES_HEADER)),
    /// so every message in the queue is seen.
    fn decode_message(&self, queue: &str, m: &Message) -> Envelope {
        let foreign = postbox_core::envelope::Text::Borrowed(
            postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE,
        );
        let id = m.message_id.clone().unwrap_or_default();
        let group = m
            .attributes
            .as_ref()
            .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId));
        let received = Received {
            message_id: &id,
            queue,
            foreign_type: &foreign,
            attributes: m.message_attributes.as_ref(),
            group: group.map(String::as_str),
        };
        codec::decode(m.body.as_deref().unwrap_or(""), &received).0
    }

    /// Receives up to `limit` distinct messages, keeping them hidden.
    async fn take(&self, url: &str, limit: usize) -> Result<Vec<Message>, Error> {
        let mut seen: HashMap<String, ()> = HashMap::new();
        let mut got = Vec::new();
        while got.len() < limit {
            let want = i32::try_from((limit - got.len()).min(10)).unwrap_or(10);
            let batch = self.receive_batch(url, want).await?;
            if batch.is_empty() {
                break;
            }
            for m in batch {
                let id = m.message_id.clone().unwrap_or_default();
                if seen.insert(id, ()).is_none() {
                    got.push(m);
                }
            }
        }
        Ok(got)
    }
}

fn receipts(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| m.receipt_handle.clone())
        .collect()
}

#[async_trait]
impl DeadLetterOps for SqsBroker {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        match self.queue_backlog(&queue_name(dlq)).await {
            Ok(b) => Ok(b.total()),
            Err(e) if e.kind() == &ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        let name = queue_name(dlq);
        let url = match self.queue_url(&name).await {
            Ok(u) => u,
            Err(e) if e.kind() == &ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let msgs = self.take(&url, limit).await?;
        self.show_again(&url, &receipts(&msgs)).await;
        Ok(msgs
            .iter()
            .map(|m| self.decode_message(name_of(&name), m))
            .collect())
    }

    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        let name = queue_name(dlq);
        let url = self.queue_url(&name).await?;
        let mut report = ReplayReport::default();
        let mut keep = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut failure = None;
        'outer: while report.replayed < limit {
            let batch = self.receive_batch(&url, 10).await?;
            if batch.is_empty() {
                break;
            }
            for m in batch {
                let receipt = m.receipt_handle.clone().unwrap_or_default();
                if !seen.insert(m.message_id.clone().unwrap_or_default()) {
                    keep.push(receipt);
                    continue;
                }
                let env = self.decode_message(name_of(&name), &m);
                if report.replayed >= limit || !filter(&env) {
                    report.skipped += 1;
                    keep.push(receipt);
                    continue;
                }
                let Some((origin, replay)) = prepare_replay(env) else {
                    report.skipped += 1;
                    keep.push(receipt);
                    continue;
                };
                // An undecodable message goes back as it arrived (body and
                // attributes), not wrapped in a CloudEvent (which would hide
                // the breakage).
                let sent = if codec::is_undecodable(&replay) {
                    self.send_raw(&origin, &replay).await
                } else {
                    self.publish(&origin, replay).await.map_err(|e| e.error)
                };
                match sent {
                    Ok(()) => {
                        self.delete_receipts(&url, std::slice::from_ref(&receipt))
                            .await?;
                        report.replayed += 1;
                    }
                    Err(e) => {
                        keep.push(receipt);
                        failure = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        self.show_again(&url, &keep).await;
        match failure {
            Some(first) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "replay stopped short: {} messages replayed; the rest stay in {dlq:?}",
                    report.replayed
                ),
            )
            .with_source(first)),
            None => Ok(report),
        }
    }

    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        let name = queue_name(dlq);
        let url = match self.queue_url(&name).await {
            Ok(u) => u,
            Err(e) if e.kind() == &ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0u64;
        loop {
            let batch = self.receive_batch(&url, 10).await?;
            if batch.is_empty() {
                return Ok(removed);
            }
            let r = receipts(&batch);
            self.delete_receipts(&url, &r).await?;
            removed += r.len() as u64;
        }
    }
}
