//! Consuming a queue: `SqsSource` and `SqsDelivery`.
//!
//! * `receivers` concurrent long polls (`ReceiveMessage`, up to 10 messages
//!   each: the subscription's prefetch hint) feed a **bounded** buffer; a receiver only polls when the buffer
//!   has room, so in flight are at most `buffer + receivers × batch` messages
//!   plus what the runtime is handling.
//! * `ack` → `DeleteMessageBatch`: acks waiting at the same moment share one
//!   call (no timer: an ack is never delayed to fill a batch), and `ack`
//!   returns once SQS confirmed the delete.
//! * `retry(d)` → `ChangeMessageVisibility(d)`, see the `retry` module;
//!   `release` → `ChangeMessageVisibility(0)`.
//! * A **visibility heartbeat** extends the visibility timeout of every
//!   received, unsettled message before it expires, so a handler that runs
//!   longer than the timeout keeps its message (`ChangeMessageVisibilityBatch`).
//! * The attempt number is `ApproximateReceiveCount`.
//! * A body that claims to be a CloudEvent but breaks the format is handed
//!   out like any message, with [`Delivery::decode_error`] set and an
//!   envelope of what arrived, so the runtime dead-letters it (reason
//!   `decode`) without calling the handler; the source's `next` only fails
//!   for a failed `ReceiveMessage`.
//! * FIFO queues keep order per message group: SQS hands out a group's next
//!   messages only after the previous ones are deleted.
//! * `close` stops the receivers (each finishes its current long poll),
//!   makes what was received but not handed out visible again at once, and
//!   returns once every delete asked for by an ack has been answered.
//!   Dropping an unclosed source is the safety net: it warns, stops the
//!   receivers and gives back the buffer without waiting. A delivery dropped
//!   unsettled comes back after its visibility timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName,
};
use postbox_core::{
    Delivery, Envelope, Error, ErrorKind, Origin, Retry, SettleError, SettleResult, Source,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Received};
use crate::config::Settings;
use crate::error::from_sdk;
use crate::publisher::{SqsBroker, MAX_BATCH, SYSTEM};
use crate::retry::visibility_for;

struct Entry {
    receipt: String,
    /// Held by a settle operation or by the heartbeat while it extends the
    /// message; `true` once settled.
    settled: Arc<tokio::sync::Mutex<bool>>,
    /// When the message becomes visible again unless extended.
    visible_until: Mutex<Instant>,
}

type DeleteRequest = (String, oneshot::Sender<Result<(), Error>>);

struct Shared {
    broker: SqsBroker,
    url: String,
    queue: String,
    /// Messages per receive, 1–10.
    batch_size: i32,
    inflight: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    deletes: mpsc::Sender<DeleteRequest>,
    /// Deletes asked for and not answered yet (so `close` can wait for them).
    deletes_pending: AtomicUsize,
    deletes_answered: Notify,
}

impl Shared {
    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings(&self) -> &Settings {
        &self.broker.inner.settings
    }

    fn deletes_done(&self, n: usize) {
        self.deletes_pending.fetch_sub(n, Ordering::AcqRel);
        self.deletes_answered.notify_waiters();
    }

    /// Waits until every delete asked for so far has been answered by SQS.
    async fn deletes_settled(&self) {
        loop {
            let answered = self.deletes_answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if self.deletes_pending.load(Ordering::Acquire) == 0 {
                return;
            }
            answered.await;
        }
    }

    async fn change_visibility(&self, receipt: &str, seconds: i32) -> Result<(), Error> {
        self.broker
            .inner
            .sqs
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| from_sdk("ChangeMessageVisibility", e))?;
        Ok(())
    }

    /// `ChangeMessageVisibilityBatch` in chunks of 10; returns the receipts that failed.
    async fn change_visibility_batch(&self, receipts: &[String], seconds: i32) -> Vec<String> {
        let mut failed = Vec::new();
        for chunk in receipts.chunks(MAX_BATCH) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(seconds)
                        .build()
                        .ok()
                })
                .collect();
            let res = self
                .broker
                .inner
                .sqs
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await;
            match res {
                Ok(out) => {
                    for f in out.failed {
                        if let Ok(i) = f.id.parse::<usize>() {
                            failed.push(chunk[i].clone());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %from_sdk("ChangeMessageVisibilityBatch", e), "visibility change failed");
                    failed.extend(chunk.iter().cloned());
                }
            }
        }
        failed
    }
}

/// Deliveries of one SQS queue, from
/// [`Broker::subscribe`](postbox_core::Broker::subscribe). Several sources on
/// one queue (in one process or many) are competing consumers.
pub(crate) struct SqsSource {
    rx: mpsc::Receiver<Result<SqsDelivery, Error>>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    receivers: Vec<JoinHandle<()>>,
    closed: bool,
}

impl std::fmt::Debug for SqsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsSource")
            .field("queue", &self.shared.queue)
            .field("batch_size", &self.shared.batch_size)
            .finish_non_exhaustive()
    }
}

/// Consumes a queue (by name or URL) with the broker's consumer settings and
/// `batch_size` messages per receive. Must be called inside a tokio runtime:
/// receivers, the deleter and the heartbeat are tasks.
pub(crate) async fn open(
    broker: &SqsBroker,
    queue: &str,
    batch_size: i32,
) -> Result<SqsSource, Error> {
    let name = crate::config::queue_name(queue);
    let url = broker.queue_url(&name).await?;
    let settings = &broker.inner.settings;
    let (tx, rx) = mpsc::channel(settings.buffer.max(1));
    let (dtx, drx) = mpsc::channel(256);
    // Closing the broker handle stops the receivers of its sources too.
    let cancel = broker.inner.shutdown.child_token();
    let shared = Arc::new(Shared {
        broker: broker.clone(),
        url,
        queue: crate::config::name_of(&name).to_string(),
        batch_size: batch_size.clamp(1, 10),
        inflight: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        deletes: dtx,
        deletes_pending: AtomicUsize::new(0),
        deletes_answered: Notify::new(),
    });
    let receivers = (0..settings.receivers)
        .map(|_| tokio::spawn(receiver(shared.clone(), tx.clone(), cancel.clone())))
        .collect();
    // As many delete calls in flight as receive calls (at least 4).
    let delete_calls = settings.receivers.max(4);
    tokio::spawn(deleter(Arc::downgrade(&shared), drx, delete_calls));
    tokio::spawn(heartbeat(Arc::downgrade(&shared), cancel.clone()));
    Ok(SqsSource {
        rx,
        shared,
        cancel,
        receivers,
        closed: false,
    })
}

async fn receiver(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<SqsDelivery, Error>>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let wait = i32::try_from(shared.settings().wait_time.as_secs()).unwrap_or(20);
    let visibility = crate::publisher::ceil_secs(shared.settings().visibility_timeout);
    loop {
        // Only poll when the buffer has room (bounded in-flight).
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = tx.reserve() => match p { Ok(p) => p, Err(_) => return },
        };
        let res = shared
            .broker
            .inner
            .sqs
            .receive_message()
            .queue_url(&shared.url)
            .max_number_of_messages(shared.batch_size)
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_attribute_names("All")
            .send()
            .await;
        let messages = match res {
            Ok(out) => {
                backoff = Duration::from_millis(100);
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                let err = from_sdk(&format!("ReceiveMessage from {}", shared.queue), e);
                tracing::warn!(queue = %shared.queue, error = %err, retry_in = ?backoff, "receiving failed");
                permit.send(Err(err));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let received_at = Instant::now();
        let mut items = messages
            .into_iter()
            .filter_map(|m| to_delivery(&shared, m, received_at))
            .collect::<Vec<_>>()
            .into_iter();
        if cancel.is_cancelled() {
            release_all(&shared, items.collect()).await;
            return;
        }
        let Some(first) = items.next() else {
            drop(permit);
            continue;
        };
        permit.send(Ok(first));
        while let Some(item) = items.next() {
            let permit = tokio::select! {
                _ = cancel.cancelled() => None,
                p = tx.reserve() => p.ok(),
            };
            if let Some(p) = permit {
                p.send(Ok(item));
            } else {
                let mut rest = vec![item];
                rest.extend(items);
                release_all(&shared, rest).await;
                return;
            }
        }
    }
}

/// Makes received, never handed out messages visible again at once; returns
/// how many could not be.
async fn release_all(shared: &Arc<Shared>, deliveries: Vec<SqsDelivery>) -> usize {
    let mut receipts = Vec::with_capacity(deliveries.len());
    for mut d in deliveries {
        if let Some(entry) = d.entry.take() {
            shared.inflight().remove(&d.id);
            receipts.push(entry.receipt.clone());
        }
    }
    if receipts.is_empty() {
        return 0;
    }
    shared.change_visibility_batch(&receipts, 0).await.len()
}

fn to_delivery(shared: &Arc<Shared>, m: Message, received_at: Instant) -> Option<SqsDelivery> {
    let Message {
        receipt_handle,
        message_id,
        body,
        attributes: system,
        message_attributes,
        ..
    } = m;
    let receipt = receipt_handle?;
    let message_id = message_id.unwrap_or_default();
    let attempt = system
        .as_ref()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|c| c.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let group = system
        .as_ref()
        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId));
    let received = Received {
        message_id: &message_id,
        queue: &shared.queue,
        foreign_type: &shared.settings().foreign_type,
        attributes: message_attributes.as_ref(),
        group: group.map(String::as_str),
    };
    let body = body.as_deref().unwrap_or_default();
    // An undecodable message is handed out like any other, so the runtime
    // dead-letters it (reason `decode`) through the consumer's router at once
    // instead of leaving it to circulate until a redrive policy, if any,
    // moves it.
    let (mut envelope, decode_error) = codec::decode(body, &received);
    if let Some(error) = &decode_error {
        tracing::warn!(queue = %shared.queue, message_id = %message_id, attempt, error = %error, "received a broken CloudEvent; it goes to the dead-letter queue");
    }
    envelope.attempt = attempt;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let entry = Arc::new(Entry {
        receipt,
        settled: Arc::new(tokio::sync::Mutex::new(false)),
        visible_until: Mutex::new(received_at + shared.settings().visibility_timeout),
    });
    shared.inflight().insert(id, entry.clone());
    Some(SqsDelivery {
        shared: shared.clone(),
        entry: Some(entry),
        id,
        envelope,
        attempt,
        decode_error,
    })
}

/// Batches deletes: every ack waiting at this moment goes into one
/// `DeleteMessageBatch` (up to 10), with `calls` calls in flight. The batch
/// is taken once a call may start, so acks that arrive while all calls are
/// in flight share the next one instead of queueing as calls of one.
async fn deleter(
    shared: std::sync::Weak<Shared>,
    mut rx: mpsc::Receiver<DeleteRequest>,
    calls: usize,
) {
    let calls = Arc::new(tokio::sync::Semaphore::new(calls));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = calls.clone().acquire_owned().await else {
            let _ = first
                .1
                .send(Err(Error::new(ErrorKind::Closed, "the deleter stopped")));
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            for (_, done) in batch {
                let _ = done.send(Err(Error::new(ErrorKind::Closed, "the source is closed")));
            }
            continue;
        };
        tokio::spawn(async move {
            let n = batch.len();
            delete_batch(&shared, batch).await;
            shared.deletes_done(n);
            drop(permit);
        });
    }
}

async fn delete_batch(shared: &Shared, batch: Vec<DeleteRequest>) {
    let entries: Vec<_> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, (r, _))| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .build()
                .ok()
        })
        .collect();
    let res = shared
        .broker
        .inner
        .sqs
        .delete_message_batch()
        .queue_url(&shared.url)
        .set_entries(Some(entries))
        .send()
        .await;
    match res {
        Ok(out) => {
            let mut failed: HashMap<usize, Error> = HashMap::new();
            for f in out.failed {
                if let Ok(i) = f.id.parse::<usize>() {
                    let e = crate::error::BatchEntryError {
                        code: f.code,
                        message: f.message,
                        sender_fault: f.sender_fault,
                    };
                    let mut err = e.into_error("DeleteMessageBatch");
                    if err.kind() == &ErrorKind::Rejected || err.kind() == &ErrorKind::Encode {
                        err = Error::new(ErrorKind::Settle, err.message().to_string())
                            .with_source(err);
                    }
                    failed.insert(i, err);
                }
            }
            for (i, (_, done)) in batch.into_iter().enumerate() {
                let _ = done.send(failed.remove(&i).map_or(Ok(()), Err));
            }
        }
        Err(e) => {
            let err = from_sdk("DeleteMessageBatch", e);
            for (_, done) in batch {
                let _ = done.send(Err(Error::new(err.kind().clone(), err.to_string())));
            }
        }
    }
}

/// Extends the visibility of every unsettled message before it expires.
async fn heartbeat(shared: std::sync::Weak<Shared>, cancel: CancellationToken) {
    let tick = {
        let Some(s) = shared.upgrade() else { return };
        (s.settings().visibility_timeout / 4).max(Duration::from_millis(250))
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(tick) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let visibility = shared.settings().visibility_timeout;
        let now = Instant::now();
        let due: Vec<(u64, Arc<Entry>)> = shared
            .inflight()
            .iter()
            .filter(|(_, e)| {
                let until = *e.visible_until.lock().unwrap_or_else(|p| p.into_inner());
                until.saturating_duration_since(now) < visibility * 3 / 4
            })
            .map(|(id, e)| (*id, e.clone()))
            .collect();
        if due.is_empty() {
            if cancel.is_cancelled() && shared.inflight().is_empty() {
                return;
            }
            continue;
        }
        // Hold each message's settle lock while extending it, so a retry's
        // visibility change is never overwritten by the heartbeat.
        let mut held = Vec::new();
        for (id, e) in due {
            if let Ok(guard) = e.settled.clone().try_lock_owned() {
                if !*guard {
                    held.push((id, e, guard));
                }
            }
        }
        let receipts: Vec<String> = held.iter().map(|(_, e, _)| e.receipt.clone()).collect();
        let failed = shared
            .change_visibility_batch(&receipts, crate::publisher::ceil_secs(visibility))
            .await;
        let until = Instant::now() + visibility;
        for (id, e, guard) in held {
            if failed.contains(&e.receipt) {
                // Expired or deleted: no point extending it again.
                shared.inflight().remove(&id);
            } else {
                *e.visible_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
            }
            drop(guard);
        }
        tracing::trace!(queue = %shared.queue, extended = receipts.len() - failed.len(), "visibility heartbeat");
    }
}

impl Source for SqsSource {
    type Delivery = SqsDelivery;

    async fn next(&mut self) -> Option<Result<SqsDelivery, Error>> {
        self.rx.recv().await
    }

    fn system(&self) -> &'static str {
        SYSTEM
    }

    fn destination(&self) -> &str {
        &self.shared.queue
    }

    /// Stops the receivers (each finishes its current long poll, at most the
    /// wait time, and gives back what it got), gives back (visibility 0)
    /// what was received but not handed out, and returns once every delete
    /// asked for by an ack has been answered by SQS.
    async fn close(mut self) -> Result<(), Error> {
        self.closed = true;
        self.cancel.cancel();
        // A long poll cut short could leave its messages invisible for the
        // visibility timeout: wait for it, bounded by the wait time.
        let patience = self.shared.settings().wait_time + Duration::from_secs(5);
        let mut receivers = std::mem::take(&mut self.receivers);
        let deadline = Instant::now() + patience;
        for r in &mut receivers {
            if tokio::time::timeout_at(deadline, &mut *r).await.is_err() {
                r.abort();
            }
        }
        self.rx.close();
        let mut buffered = Vec::new();
        while let Ok(item) = self.rx.try_recv() {
            if let Ok(d) = item {
                buffered.push(d);
            }
        }
        let given_back = buffered.len();
        let failed = release_all(&self.shared, buffered).await;
        self.shared.deletes_settled().await;
        tracing::debug!(queue = %self.shared.queue, given_back, "SQS source closed");
        if failed > 0 {
            return Err(Error::new(
                ErrorKind::Settle,
                format!(
                    "{failed} received messages of {} could not be made visible again; they return after their visibility timeout",
                    self.shared.queue
                ),
            ));
        }
        Ok(())
    }
}

impl Drop for SqsSource {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        tracing::warn!(queue = %self.shared.queue, "SQS source dropped without close(): stopping its receivers; acks in flight are not awaited");
        self.cancel.cancel();
        self.rx.close();
        let mut buffered = Vec::new();
        while let Ok(item) = self.rx.try_recv() {
            if let Ok(d) = item {
                buffered.push(d);
            }
        }
        if buffered.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { release_all(&shared, buffered).await });
        }
    }
}

/// A received SQS message awaiting settlement.
pub(crate) struct SqsDelivery {
    shared: Arc<Shared>,
    entry: Option<Arc<Entry>>,
    id: u64,
    envelope: Envelope,
    attempt: u32,
    /// Set when the body claimed to be a CloudEvent but broke the format.
    decode_error: Option<Error>,
}

impl std::fmt::Debug for SqsDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsDelivery")
            .field("queue", &self.shared.queue)
            .field("id", &self.envelope.id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl SqsDelivery {
    fn entry(&self) -> Arc<Entry> {
        self.entry
            .clone()
            .expect("an unsettled delivery has its entry")
    }

    fn settled(&mut self) {
        self.entry = None;
        self.shared.inflight().remove(&self.id);
    }

    async fn settle_with<F, Fut>(mut self, op: F) -> SettleResult<Self>
    where
        F: FnOnce(Arc<Shared>, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        let entry = self.entry();
        let mut guard = entry.settled.lock().await;
        match op(self.shared.clone(), entry.receipt.clone()).await {
            Ok(()) => {
                *guard = true;
                drop(guard);
                self.settled();
                Ok(())
            }
            Err(e) => {
                drop(guard);
                let e = if e.kind() == &ErrorKind::Rejected {
                    Error::new(ErrorKind::Settle, e.message().to_string()).with_source(e)
                } else {
                    e
                };
                Err(SettleError::new(e, self))
            }
        }
    }
}

impl Delivery for SqsDelivery {
    fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Set for a body that claims to be a CloudEvent (a JSON object with
    /// `specversion`, or broken JSON naming it) but breaks the format; the
    /// envelope then holds what arrived (see
    /// [`UNDECODABLE_TYPE`](crate::UNDECODABLE_TYPE)).
    fn decode_error(&self) -> Option<&Error> {
        self.decode_error.as_ref()
    }

    fn origin(&self) -> Origin {
        Origin {
            destination: self.shared.queue.clone(),
            partition: None,
            offset: None,
        }
    }

    async fn ack(self) -> SettleResult<Self> {
        self.settle_with(|shared, receipt| async move {
            let (tx, rx) = oneshot::channel();
            shared.deletes_pending.fetch_add(1, Ordering::AcqRel);
            if shared.deletes.send((receipt, tx)).await.is_err() {
                shared.deletes_done(1);
                return Err(Error::new(ErrorKind::Closed, "the deleter stopped"));
            }
            rx.await
                .map_err(|_| Error::new(ErrorKind::Closed, "the deleter stopped"))?
        })
        .await
    }

    async fn retry(self, retry: Retry) -> SettleResult<Self> {
        let seconds = match visibility_for(retry.delay) {
            Ok(s) => s,
            Err(e) => return Err(SettleError::new(e, self)),
        };
        self.settle_with(move |shared, receipt| async move {
            shared.change_visibility(&receipt, seconds).await
        })
        .await
    }

    async fn release(self) -> SettleResult<Self> {
        self.settle_with(
            |shared, receipt| async move { shared.change_visibility(&receipt, 0).await },
        )
        .await
    }
}

impl Drop for SqsDelivery {
    fn drop(&mut self) {
        if self.entry.take().is_some() {
            // Unsettled: the heartbeat stops, SQS redelivers after the timeout.
            self.shared.inflight().remove(&self.id);
        }
    }
}
