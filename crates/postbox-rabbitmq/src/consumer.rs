//! Consuming: [`RabbitSource`] (a `basic.consume` with manual acks and a
//! prefetch) and [`RabbitDelivery`].
//!
//! * Each source has its own connection and channel; `basic.qos` prefetch is
//!   the bound on unacked deliveries (set it to the runtime's in-flight bound:
//!   its concurrency, or `max_in_flight` in per-key mode).
//! * Several sources on one queue are competing consumers; fan-out is one
//!   queue per subscriber bound to an exchange.
//! * `ack` = `basic.ack`, grouped: acks are sent as one
//!   `basic.ack(multiple)` per 64 acks or 2 ms, whichever comes first, that
//!   never covers a delivery still in hand (an ack completed out of order is
//!   sent alone by the next flush). [`Source::close`] cancels the consumer,
//!   waits for the re-delays it started itself, sends every waiting ack and
//!   closes the channel, whose `close-ok` means the broker has processed them
//!   all, before it returns.
//!   A process that dies without closing gets its last messages redelivered
//!   (at-least-once, never lost).
//!   `release` = `basic.nack(requeue)`; `retry` = a
//!   confirmed copy into a delay tier, then `basic.ack` (see `retry.rs`).
//! * Attempts: the envelope's `attempt` plus `x-delivery-count` on quorum
//!   queues (on classic queues a redelivered message counts one more).
//! * Recovery: when the connection or channel drops, `next` reports the error
//!   once, then reconnects with backoff, re-declares the subscription's
//!   topology and resumes consuming. Unacked deliveries of the lost channel
//!   are redelivered by the broker; settling them fails with a `Settle` error.
//! * A message with CloudEvents markers that breaks the format is yielded
//!   with [`Delivery::decode_error`] set and an envelope holding what
//!   arrived (see `codec::undecodable_envelope`): the consumer runtime
//!   dead-letters it with reason `decode` through the consumer's own
//!   [`DeadLetterRouter`](postbox_core::DeadLetterRouter) before any handler
//!   runs, and acks it once the copy is confirmed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection};
use postbox_core::{
    Delivery, Envelope, Error, ErrorKind, Origin, Retry, SettleError, SettleResult, Source,
};

use crate::codec::{self, short, WireInfo};
use crate::error::from_lapin;
use crate::publisher::RabbitBroker;
use crate::retry::NOW_SLACK;
use crate::topology::Topology;
use crate::SYSTEM;

/// How long closing waits for the settlements the source started itself
/// (a re-delay is a confirmed publish, then an ack).
const BACKGROUND_GRACE: Duration = Duration::from_secs(35);

/// Keeps a consumer's connection and channel open while it or any of its
/// deliveries lives; dropping the last handle closes the connection, so the
/// broker redelivers whatever was left unacked.
struct Link {
    connection: Connection,
    channel: Channel,
    acks: Acks,
    /// Settlements the source started on its own tasks (re-delays); closing
    /// waits for them.
    background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Group commit of acks on one channel. Every delivery handed out is "in hand"
/// until settled. An ack is recorded and sent later, in a group: one
/// `basic.ack(multiple)` up to the highest acked tag below every tag still in
/// hand (and not above the last tag handed out, so nothing still buffered is
/// covered). A group goes out when [`ACK_BATCH`] acks wait, or half the
/// prefetch if that is less (sent by the ack that fills it) or [`ACK_LINGER`] after the first waiting ack (by a flush
/// task, one per group, not per message); that flush also sends acks that
/// completed out of order, singly. Closing the channel flushes first. A
/// process that dies before a flush leaves its last acks unsent: the broker
/// redelivers those messages (at-least-once; the idempotency layer absorbs
/// the duplicate), nothing is lost.
struct Acks {
    state: std::sync::Mutex<AckState>,
    send: tokio::sync::Mutex<()>,
    /// Waiting acks that are sent at once.
    batch: usize,
}

/// How long an ack may wait to be sent together with later ones.
const ACK_LINGER: Duration = Duration::from_millis(2);

/// How many waiting acks make a group that is sent at once.
const ACK_BATCH: usize = 64;

#[derive(Default)]
struct AckState {
    last_handed_out: u64,
    in_hand: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    flush_scheduled: bool,
}

/// What [`Acks::record`] asks of the acking delivery.
struct AckPlan {
    /// A full group waits: send it now.
    flush_now: bool,
    /// No flush is scheduled yet: schedule one.
    schedule: bool,
}

impl Acks {
    /// Acks of a channel with this prefetch (0 = unlimited): a group never
    /// waits for more than half of it, so the broker keeps delivering.
    fn new(prefetch: u16) -> Acks {
        let batch = match usize::from(prefetch) {
            0 => ACK_BATCH,
            p => (p / 2).clamp(1, ACK_BATCH),
        };
        Acks {
            state: Default::default(),
            send: Default::default(),
            batch,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handed_out(&self, tag: u64) {
        let mut st = self.state();
        st.last_handed_out = st.last_handed_out.max(tag);
        st.in_hand.insert(tag);
    }

    /// A delivery settled some other way (nack, reject, single ack already sent).
    fn settled(&self, tag: u64) {
        self.state().in_hand.remove(&tag);
    }

    /// The highest tag a multiple ack may cover now.
    fn safe(st: &AckState) -> u64 {
        st.in_hand
            .first()
            .map(|t| t.saturating_sub(1))
            .unwrap_or(u64::MAX)
            .min(st.last_handed_out)
    }

    /// Records the ack of `tag` (to be sent in a group).
    fn record(&self, tag: u64) -> AckPlan {
        let mut st = self.state();
        st.in_hand.remove(&tag);
        st.acked.insert(tag);
        let flush_now = st.acked.len() >= self.batch;
        let schedule = !st.flush_scheduled;
        st.flush_scheduled = true;
        AckPlan {
            flush_now,
            schedule,
        }
    }

    /// Sends one `basic.ack(multiple)` for the waiting acks a group may
    /// cover, and with `stragglers` every other waiting ack singly.
    async fn flush(&self, channel: &Channel, stragglers: bool) -> Result<(), lapin::Error> {
        let _sender = self.send.lock().await;
        let (upto, singles) = {
            let mut st = self.state();
            let safe = Self::safe(&st);
            let upto = st.acked.range(..=safe).next_back().copied();
            if let Some(upto) = upto {
                st.acked = st.acked.split_off(&(upto + 1));
            }
            let singles = if stragglers {
                std::mem::take(&mut st.acked)
            } else {
                BTreeSet::new()
            };
            (upto, singles)
        };
        let mut result = Ok(());
        if let Some(upto) = upto {
            result = channel
                .basic_ack(upto, BasicAckOptions { multiple: true })
                .await;
        }
        for tag in singles {
            let r = channel
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await;
            result = result.and(r);
        }
        result
    }

    /// Whether acks still wait; if none do, the scheduled flush ends.
    fn more_waiting(&self) -> bool {
        let mut st = self.state();
        if st.acked.is_empty() {
            st.flush_scheduled = false;
            false
        } else {
            true
        }
    }
}

impl Link {
    /// Runs a settlement of the source's own on a task that closing waits for.
    fn spawn_background(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.background.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }

    /// The orderly end of a subscription: cancel the consumer (nothing new
    /// arrives), finish the source's own settlements, send every waiting ack,
    /// then close the channel — the broker answers `close-ok` only after it
    /// processed every frame sent before, so the acks are in when this
    /// returns — and the connection. Deliveries still unsettled go back to
    /// the queue.
    async fn shutdown(&self, consumer_tag: lapin::types::ShortString) -> Result<(), Error> {
        let mut result = Ok(());
        if self.channel.status().connected() {
            result = self
                .channel
                .basic_cancel(consumer_tag, BasicCancelOptions::default())
                .await
                .map_err(|e| from_lapin("cancelling the consumer", e));
            let tasks =
                std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
            let finished =
                tokio::time::timeout(BACKGROUND_GRACE, futures_util::future::join_all(tasks)).await;
            if finished.is_err() {
                tracing::warn!(grace = ?BACKGROUND_GRACE, "a re-delay publish did not finish before the consumer closed; its message will be redelivered");
            }
            if let Err(e) = self.acks.flush(&self.channel, true).await {
                result = result.and(Err(from_lapin("sending the last acks", e)));
            }
            if let Err(e) = self.channel.close(200, "closed".into()).await {
                result = result.and(Err(from_lapin("closing the consumer channel", e)));
            }
        }
        if self.connection.status().connected() {
            if let Err(e) = self.connection.close(200, "closed".into()).await {
                result = result.and(Err(from_lapin("closing the consumer connection", e)));
            }
        }
        result
    }

    /// Sends the waiting acks [`ACK_LINGER`] from now, and again while more
    /// arrive. Holds the link, so the channel closes only after the flush.
    fn schedule_flush(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ACK_LINGER).await;
                if let Err(e) = self.acks.flush(&self.channel, true).await {
                    tracing::debug!(error = %e, "sending acks failed; the broker redelivers their messages");
                }
                if !self.acks.more_waiting() {
                    break;
                }
            }
        });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.connection.status().connected() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let channel = self.channel.clone();
                handle.spawn(async move {
                    let _ = channel.close(200, "closed".into()).await;
                });
            }
        }
    }
}

struct Live {
    link: Arc<Link>,
    consumer: lapin::Consumer,
}

/// A subscription to one queue: what [`Broker::subscribe`] returns (boxed),
/// or [`RabbitBroker::consume`] typed.
///
/// Close it ([`Source::close`]; the consumer runtime does) so that every ack
/// reaches the broker before the connection goes; dropping it is a safety
/// net that warns.
///
/// [`Broker::subscribe`]: postbox_core::Broker::subscribe
pub struct RabbitSource {
    client: RabbitBroker,
    queue: Arc<str>,
    topology: Topology,
    prefetch: u16,
    live: Option<Live>,
    backoff: Duration,
    wait_before_reconnect: Option<Duration>,
}

impl std::fmt::Debug for RabbitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSource")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("connected", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for RabbitSource {
    fn drop(&mut self) {
        if self.live.is_some() {
            tracing::warn!(queue = %self.queue, "a RabbitSource was dropped without close(); acks not sent yet are lost with its connection and their messages will be redelivered");
        }
    }
}

impl RabbitBroker {
    /// Consumes `queue` with `basic.qos` prefetch `prefetch` (at least 1),
    /// declaring `topology` first and again after every reconnect (an empty
    /// [`Topology`] declares nothing). The connection is opened now, so a
    /// missing queue fails here (`NotFound`).
    ///
    /// The power form of [`Broker::subscribe`](postbox_core::Broker::subscribe):
    /// any exchanges, queue arguments and bindings, and a typed source.
    pub async fn consume(
        &self,
        queue: &str,
        topology: Topology,
        prefetch: u16,
    ) -> Result<RabbitSource, Error> {
        if queue.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "consuming needs a queue name (server-named queues are not supported)",
            ));
        }
        let mut source = RabbitSource {
            client: self.clone(),
            queue: Arc::from(queue),
            backoff: self.inner.config.reconnect_min,
            topology,
            prefetch: prefetch.max(1),
            live: None,
            wait_before_reconnect: None,
        };
        source.live = Some(source.open().await?);
        Ok(source)
    }
}

impl RabbitSource {
    async fn open(&self) -> Result<Live, Error> {
        let connection = self.client.open_connection().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| from_lapin("opening a consumer channel", e))?;
        self.topology.declare(&channel).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| from_lapin("setting the prefetch", e))?;
        let consumer = channel
            .basic_consume(
                short("queue name", &self.queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| from_lapin(format!("consuming from {}", self.queue), e))?;
        Ok(Live {
            link: Arc::new(Link {
                connection,
                channel,
                acks: Acks::new(self.prefetch),
                background: Default::default(),
            }),
            consumer,
        })
    }

    fn lost(&mut self, error: Error) -> Error {
        self.live = None;
        self.wait_before_reconnect = Some(self.backoff);
        tracing::warn!(queue = %self.queue, error = %error, "consumer lost its connection; reconnecting");
        error
    }

    /// Turns a lapin delivery into a postbox delivery, or re-delays it here
    /// (a retry copy not yet due) and returns `None`. An undecodable message
    /// becomes a delivery with its [`Delivery::decode_error`] set and an
    /// envelope holding what arrived: the runtime dead-letters it with
    /// reason `decode` through the consumer's router.
    fn accept(&self, link: &Arc<Link>, d: lapin::message::Delivery) -> Option<RabbitDelivery> {
        let lapin::message::Delivery {
            delivery_tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = d;
        link.acks.handed_out(delivery_tag);
        let body = Bytes::from(data);
        let info = WireInfo {
            exchange: exchange.as_str(),
            routing_key: routing_key.as_str(),
            queue: &self.queue,
        };
        let foreign_type = &self.client.inner.config.foreign_type;
        let (mut envelope, decode_error) = match codec::decode(
            &properties,
            body.clone(),
            info,
            foreign_type,
        ) {
            Ok(envelope) => {
                if let Some(due) = codec::due_of(&properties) {
                    if due > SystemTime::now() + NOW_SLACK {
                        self.redelay(link, envelope, due, (delivery_tag, acker));
                        return None;
                    }
                }
                (envelope, None)
            }
            Err(e) => {
                tracing::debug!(queue = %self.queue, error = %e, "undecodable message; the consumer dead-letters it");
                // Its dead-letter copy goes out on a connection with the
                // same frame_max as this one: carry what fits in it.
                let budget = codec::undecodable_budget(link.connection.configuration().frame_max());
                let envelope = codec::undecodable_envelope(&properties, body, info, budget);
                (envelope, Some(e))
            }
        };
        let attempt = codec::attempt(envelope.attempt, &properties, redelivered);
        envelope.attempt = attempt;
        Some(RabbitDelivery {
            envelope,
            attempt,
            decode_error,
            queue: self.queue.clone(),
            tag: delivery_tag,
            acker,
            link: link.clone(),
            client: self.client.clone(),
        })
    }

    fn redelay(
        &self,
        link: &Arc<Link>,
        env: Envelope,
        due: SystemTime,
        (tag, acker): (u64, Acker),
    ) {
        let (client, queue, task_link) = (self.client.clone(), self.queue.clone(), link.clone());
        link.spawn_background(async move {
            let link = task_link;
            match client.publish_due(&queue, &env, due).await {
                Ok(()) => {
                    let _ = acker.ack(BasicAckOptions::default()).await;
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "re-delaying a retry copy failed; it will be redelivered");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                }
            }
            link.acks.settled(tag);
        });
    }
}

impl Source for RabbitSource {
    type Delivery = RabbitDelivery;

    async fn next(&mut self) -> Option<Result<RabbitDelivery, Error>> {
        loop {
            if self.live.is_none() {
                if self.client.is_closed() {
                    // The broker handle was closed: no reconnecting.
                    return None;
                }
                if let Some(wait) = self.wait_before_reconnect {
                    tokio::time::sleep(wait).await;
                    self.wait_before_reconnect = None;
                }
                match self.open().await {
                    Ok(live) => {
                        tracing::info!(queue = %self.queue, "consumer connected");
                        self.live = Some(live);
                        self.backoff = self.client.inner.config.reconnect_min;
                    }
                    Err(e) => {
                        let cfg = &self.client.inner.config;
                        self.wait_before_reconnect = Some(self.backoff);
                        self.backoff = (self.backoff * 2).min(cfg.reconnect_max);
                        return Some(Err(e));
                    }
                }
            }
            let live = self.live.as_mut()?;
            match live.consumer.next().await {
                Some(Ok(d)) => {
                    let link = live.link.clone();
                    if let Some(delivery) = self.accept(&link, d) {
                        return Some(Ok(delivery));
                    }
                }
                Some(Err(e)) => {
                    let error = from_lapin(format!("consuming from {}", self.queue), e);
                    return Some(Err(self.lost(error)));
                }
                None => {
                    let error = Error::new(
                        ErrorKind::Closed,
                        format!("the consumer of {} was cancelled", self.queue),
                    );
                    return Some(Err(self.lost(error)));
                }
            }
        }
    }

    fn system(&self) -> &'static str {
        SYSTEM
    }

    fn destination(&self) -> &str {
        &self.queue
    }

    async fn close(mut self) -> Result<(), Error> {
        let Some(Live { link, consumer }) = self.live.take() else {
            return Ok(());
        };
        let result = link.shutdown(consumer.tag()).await;
        drop(consumer);
        if let Err(e) = &result {
            tracing::warn!(queue = %self.queue, error = %e, "closing the consumer failed; unacked messages will be redelivered");
        }
        result
    }
}

/// A message received from RabbitMQ, awaiting settlement.
pub struct RabbitDelivery {
    envelope: Envelope,
    attempt: u32,
    /// Why the message did not decode, when it did not.
    decode_error: Option<Error>,
    queue: Arc<str>,
    tag: u64,
    acker: Acker,
    link: Arc<Link>,
    client: RabbitBroker,
}

impl std::fmt::Debug for RabbitDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDelivery")
            .field("id", &self.envelope.id)
            .field("queue", &self.queue)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

fn settle_error(what: &str, e: lapin::Error) -> Error {
    let inner = from_lapin(what, e);
    Error::new(ErrorKind::Settle, inner.message().to_string()).with_source(inner)
}

impl RabbitDelivery {
    /// The AMQP properties are not kept; this is the queue it came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }
}

impl Delivery for RabbitDelivery {
    fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    fn origin(&self) -> Origin {
        Origin {
            destination: self.queue.to_string(),
            partition: None,
            offset: None,
        }
    }

    fn decode_error(&self) -> Option<&Error> {
        self.decode_error.as_ref()
    }

    async fn ack(self) -> SettleResult<Self> {
        if !self.link.channel.status().connected() {
            // Its channel is gone (the broker redelivers the message): say so.
            let options = BasicAckOptions::default();
            return match self.link.channel.basic_ack(self.tag, options).await {
                Ok(()) => Ok(()),
                Err(e) => Err(SettleError::new(settle_error("basic.ack", e), self)),
            };
        }
        let plan = self.link.acks.record(self.tag);
        if plan.schedule {
            self.link.clone().schedule_flush();
        }
        if plan.flush_now {
            if let Err(e) = self.link.acks.flush(&self.link.channel, false).await {
                return Err(SettleError::new(settle_error("basic.ack", e), self));
            }
        }
        Ok(())
    }

    async fn retry(self, retry: Retry) -> SettleResult<Self> {
        let copy = retry.next_envelope(&self.envelope);
        let due = SystemTime::now() + retry.delay;
        if let Err(e) = self.client.publish_due(&self.queue, &copy, due).await {
            return Err(SettleError::new(e, self));
        }
        self.ack().await
    }

    async fn release(self) -> SettleResult<Self> {
        let options = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        match self.acker.nack(options).await {
            Ok(_) => {
                self.link.acks.settled(self.tag);
                Ok(())
            }
            Err(e) => Err(SettleError::new(settle_error("basic.nack", e), self)),
        }
    }
}
