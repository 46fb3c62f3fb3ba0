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
//! * **peek** and **replay** show every message: one that does not decode
//!   (a broker-side dead letter of an undecodable message) is shown as the
//!   envelope of what arrived, never skipped.
//! * **replay** takes messages one by one; a message that passes the filter
//!   (up to `limit`) is published back, confirmed, then acked; the others
//!   are requeued when the channel closes. A router's copy goes to its
//!   `dlqorigin` with its id kept and the `dlq…`/`retry…` headers removed —
//!   an undecodable message as the original AMQP message, rebuilt from its
//!   envelope; a broker-side dead letter goes back to the queue of its last
//!   `x-death`, as it is. A message that says neither is skipped (counted).
//! * **purge** is `queue.purge`.

use async_trait::async_trait;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use postbox_core::dlq::{self, prepare_replay, ReplayFilter};
use postbox_core::{DeadLetterOps, Envelope, Error, Publisher, ReplayReport};

use crate::codec::{self, short, Route, WireInfo, MAX_METADATA_BYTES};
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

    /// What a DLQ operation shows of a message: its envelope, or for a
    /// message that does not decode, the envelope of what arrived
    /// (`codec::undecodable_envelope`): never skipped, never a silent drop.
    fn view(&self, queue: &str, d: &lapin::message::Delivery) -> Envelope {
        let info = WireInfo {
            exchange: d.exchange.as_str(),
            routing_key: d.routing_key.as_str(),
            queue,
        };
        let body = Bytes::copy_from_slice(&d.data);
        let foreign = &self.inner.config.foreign_type;
        codec::decode(&d.properties, body.clone(), info, foreign).unwrap_or_else(|_| {
            codec::undecodable_envelope(&d.properties, body, info, MAX_METADATA_BYTES)
        })
    }

    /// Publishes one dead letter back; `false` when nothing says where it
    /// came from (then it stays in the DLQ, counted as skipped).
    ///
    /// * a copy written by a `DeadLetterRouter` goes to its `dlqorigin`:
    ///   the envelope with its dead-letter metadata removed, or, for an
    ///   undecodable message, the original AMQP message rebuilt from what
    ///   its envelope carries;
    /// * a message the broker dead-lettered (a reject, a quorum queue's
    ///   delivery limit) goes back to the queue of its last `x-death`, as
    ///   it is, without the headers the broker added.
    async fn replay_one(
        &self,
        view: Envelope,
        d: &lapin::message::Delivery,
    ) -> Result<bool, Error> {
        if view.event_type == postbox_core::codec::UNDECODABLE_TYPE {
            if let Some(origin) = view.headers.get(dlq::ORIGIN) {
                let route = codec::route(origin, &view);
                let original = codec::restore_undecodable(&view)?;
                self.publish_raw(&route, &original.body, original.properties)
                    .await?;
                return Ok(true);
            }
        }
        if let Some((origin, env)) = prepare_replay(view) {
            self.publish(&origin, env).await.map_err(|e| e.error)?;
            return Ok(true);
        }
        if let Some(queue) = codec::death_queue(&d.properties) {
            let route = Route {
                exchange: String::new(),
                routing_key: queue,
            };
            self.publish_raw(&route, &d.data, codec::without_death(&d.properties))
                .await?;
            return Ok(true);
        }
        Ok(false)
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
                    Some(d) => out.push(self.view(dlq, &d)),
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
                let view = self.view(dlq, &d);
                if report.replayed >= limit || !filter(&view) {
                    report.skipped += 1;
                    continue;
                }
                if !self.replay_one(view, &d).await? {
                    report.skipped += 1;
                    continue;
                }
                d.acker
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
