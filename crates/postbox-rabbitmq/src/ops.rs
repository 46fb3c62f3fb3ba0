//! Operations: DLQ count / peek / replay / purge ([`DeadLetterOps`]), queue
//! depth probes (passive `queue.declare`, behind `Broker::backlog`) and queue
//! deletion.
//!
//! Each operation runs on its own short-lived channel of the publishing
//! connection, so a `404` for a missing queue closes only that channel.
//!
//! * **peek** takes up to `limit` messages with `basic.get` (manual ack) and
//!   then closes the channel, which requeues them all. Classic queues put them
//!   back at their original positions; the peeked messages are marked
//!   *redelivered* (and a quorum DLQ would count a delivery — the DLQs this
//!   crate declares are classic for that reason).
//! * **replay** takes messages one by one; a message that passes the filter
//!   (up to `limit`) is published to its origin queue (`dlqorigin`) with its
//!   id kept and the `dlq…`/`retry…` headers removed, confirmed, then acked;
//!   the others are requeued when the channel closes.
//! * **purge** is `queue.purge`.

use async_trait::async_trait;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use postbox_core::dlq::{prepare_replay, ReplayFilter};
use postbox_core::{DeadLetterOps, Envelope, Error, Publisher, ReplayReport};

use crate::codec::{self, short, WireInfo};
use crate::error::from_lapin;
use crate::publisher::RabbitBroker;

/// Depth of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueDepth {
    /// Messages ready for delivery (not counting unacked ones).
    pub(crate) messages: u64,
    /// Consumers attached.
    pub(crate) consumers: u64,
}

impl RabbitBroker {
    /// The depth of `queue` (passive declare; `NotFound` if it does not exist).
    pub(crate) async fn queue_depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        let channel = self.side_channel().await?;
        let r = channel
            .queue_declare(
                short("queue name", queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| from_lapin(format!("inspecting queue {queue}"), e));
        close(&channel).await;
        let q = r?;
        Ok(QueueDepth {
            messages: u64::from(q.message_count()),
            consumers: u64::from(q.consumer_count()),
        })
    }

    /// Deletes a queue (and its messages); returns how many messages it held.
    pub async fn delete_queue(&self, queue: &str) -> Result<u64, Error> {
        let channel = self.side_channel().await?;
        let r = channel
            .queue_delete(short("queue name", queue)?, Default::default())
            .await
            .map_err(|e| from_lapin(format!("deleting queue {queue}"), e));
        close(&channel).await;
        Ok(u64::from(r?))
    }

    fn decode_lenient(&self, queue: &str, d: lapin::message::Delivery) -> Envelope {
        let info = WireInfo {
            exchange: d.exchange.as_str(),
            routing_key: d.routing_key.as_str(),
            queue,
        };
        let body = Bytes::from(d.data);
        let foreign = &self.inner.config.foreign_type;
        codec::decode(&d.properties, body.clone(), info, foreign)
            .unwrap_or_else(|_| codec::foreign_envelope(&d.properties, body, info, foreign))
    }
}

pub(crate) async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

async fn get(channel: &Channel, queue: &str) -> Result<Option<lapin::message::Delivery>, Error> {
    let got = channel
        .basic_get(
            short("queue name", queue)?,
            BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(|e| from_lapin(format!("basic.get from {queue}"), e))?;
    Ok(got.map(|m| m.delivery))
}

#[async_trait]
impl DeadLetterOps for RabbitBroker {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        Ok(self.queue_depth(dlq).await?.messages)
    }

    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        let channel = self.side_channel().await?;
        let mut out = Vec::new();
        let result = async {
            while out.len() < limit {
                match get(&channel, dlq).await? {
                    Some(d) => out.push(self.decode_lenient(dlq, d)),
                    None => break,
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        // Closing the channel requeues everything taken.
        close(&channel).await;
        result.map(|()| out)
    }

    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        let initial = self.count(dlq).await?;
        let channel = self.side_channel().await?;
        let mut report = ReplayReport::default();
        let result = async {
            for _ in 0..initial {
                let Some(d) = get(&channel, dlq).await? else {
                    break;
                };
                let acker = d.acker.clone();
                let env = self.decode_lenient(dlq, d);
                if report.replayed >= limit || !filter(&env) {
                    report.skipped += 1;
                    continue;
                }
                let Some((origin, env)) = prepare_replay(env) else {
                    report.skipped += 1;
                    continue;
                };
                self.publish(&origin, env).await.map_err(|e| e.error)?;
                acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| from_lapin("acking a replayed message", e))?;
                report.replayed += 1;
            }
            Ok::<_, Error>(())
        }
        .await;
        close(&channel).await;
        result.map(|()| report)
    }

    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        let channel = self.side_channel().await?;
        let r = channel
            .queue_purge(short("queue name", dlq)?, QueuePurgeOptions::default())
            .await
            .map_err(|e| from_lapin(format!("purging {dlq}"), e));
        close(&channel).await;
        Ok(u64::from(r?))
    }
}
