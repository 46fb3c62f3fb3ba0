use std::borrow::Cow;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use std::sync::atomic::Ordering as AtomicOrdering;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::slots::{self, Slots};
use super::{decide, Counters, Decision, Shared};
use crate::delivery::{first_failed_at, Delivery, Retry, SettleResult, Source};
use crate::dlq::DeadLetterMetadata;
use crate::envelope::Envelope;
use crate::error::Error;
use crate::handler::{FailureReason, Handler, HandlerError, HandlerResult};

/// Back-off after a source error, doubling up to the cap.
const SOURCE_ERROR_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_secs(5));

/// Logs a source error and waits (cancellably); returns false on shutdown.
async fn after_source_error<H>(shared: &Shared<H>, error: Error, backoff: &mut Duration) -> bool {
    tracing::warn!(consumer = %shared.name, error = %error, retry_in = ?*backoff, "receiving failed");
    let wait = *backoff;
    *backoff = (*backoff * 2).min(SOURCE_ERROR_BACKOFF.1);
    tokio::select! {
        _ = shared.shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Where a worker of the unordered mode takes deliveries from.
pub(crate) trait Fetch: Send + 'static {
    type Delivery: Delivery;
    /// The next delivery (cancel-safe, like [`Source::next`]).
    fn fetch(&mut self) -> impl Future<Output = Option<Result<Self::Delivery, Error>>> + Send;
}

/// The only worker owns the source: no lock to take per message.
pub(crate) struct Owned<S>(pub(crate) S);

impl<S: Source> Fetch for Owned<S> {
    type Delivery = S::Delivery;
    fn fetch(&mut self) -> impl Future<Output = Option<Result<S::Delivery, Error>>> + Send {
        self.0.next()
    }
}

/// A worker of the unordered mode: takes the next delivery from the source,
/// handles it, settles it; `concurrency` of these run at once.
pub(crate) async fn unordered<F: Fetch, H: Handler>(shared: Arc<Shared<H>>, mut source: F) -> F {
    let mut backoff = SOURCE_ERROR_BACKOFF.0;
    loop {
        let next = {
            // What `select! { biased; _ = cancelled => return, next = fetch => next }`
            // does, except that it registers for the cancellation wake-up only
            // when the fetch has to wait: a ready delivery costs one
            // `is_cancelled` check. (Polled in place: a delivery is large.)
            let token = &shared.shutdown;
            let mut fetch = pin!(source.fetch());
            let mut cancelled = pin!(token.cancelled());
            std::future::poll_fn(|cx| {
                if token.is_cancelled() {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(next) = fetch.as_mut().poll(cx) {
                    return Poll::Ready(Some(next));
                }
                // Registers the wake-up before returning `Pending`.
                cancelled.as_mut().poll(cx).map(|()| None)
            })
            .await
        };
        let delivery = match next {
            None | Some(None) => return source,
            Some(Some(Err(e))) => {
                if !after_source_error(&shared, e, &mut backoff).await {
                    return source;
                }
                continue;
            }
            Some(Some(Ok(delivery))) => delivery,
        };
        backoff = SOURCE_ERROR_BACKOFF.0;
        Counters::add(&shared.counters.received);
        shared.process(delivery).await;
    }
}

/// The unordered mode with `concurrency` > 1: one loop owns the source and
/// drives up to `concurrency` handle-and-settle futures at once on its own
/// task. Fetching takes no lock and spawns no task per message; while the
/// bound is reached it only drives the in-flight futures. On shutdown it stops
/// fetching and lets what is in flight finish (the runtime's grace period
/// aborts it if they do not).
pub(crate) async fn concurrent<S: Source, H: Handler>(
    shared: Arc<Shared<H>>,
    mut source: S,
    concurrency: usize,
) -> S {
    let mut in_flight = Slots::new(concurrency);
    let mut backoff = SOURCE_ERROR_BACKOFF.0;
    loop {
        // Room for one more.
        slots::below(&mut in_flight, concurrency).await;
        let next = {
            let token = &shared.shutdown;
            let mut fetch = pin!(source.next());
            let mut cancelled = pin!(token.cancelled());
            std::future::poll_fn(|cx| {
                // Finished handlers free their slots while the fetch waits.
                in_flight.drive(cx);
                if token.is_cancelled() {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(next) = fetch.as_mut().poll(cx) {
                    return Poll::Ready(Some(next));
                }
                cancelled.as_mut().poll(cx).map(|()| None)
            })
            .await
        };
        let delivery = match next {
            None | Some(None) => break,
            Some(Some(Err(e))) => {
                let waited = {
                    let mut wait = pin!(after_source_error(&shared, e, &mut backoff));
                    // Keep driving the in-flight handlers during the back-off.
                    std::future::poll_fn(|cx| {
                        in_flight.drive(cx);
                        wait.as_mut().poll(cx)
                    })
                    .await
                };
                if !waited {
                    break;
                }
                continue;
            }
            Some(Some(Ok(delivery))) => delivery,
        };
        backoff = SOURCE_ERROR_BACKOFF.0;
        Counters::add(&shared.counters.received);
        let mut process = Some(shared.process(delivery));
        std::future::poll_fn(|cx| {
            if let Some(process) = process.take() {
                in_flight.start(process, cx);
            }
            Poll::Ready(())
        })
        .await;
    }
    // Stopped fetching: what is in flight finishes and settles.
    slots::below(&mut in_flight, 1).await;
    source
}

/// A delivery handed to a lane, with its share of the in-flight bound.
pub(crate) type Laned<D> = (D, OwnedSemaphorePermit);

/// The dispatcher of the ordered mode: one reader of the source hands each
/// delivery to the lane of its key. It fetches only while the in-flight bound
/// has room, so a key waiting on a retry holds its own lane but never stops
/// the other keys (until the bound is reached).
pub(crate) async fn dispatch<S: Source, H: Handler>(
    shared: Arc<Shared<H>>,
    mut source: S,
    lanes: Vec<mpsc::UnboundedSender<Laned<S::Delivery>>>,
    in_flight: Arc<Semaphore>,
) -> S {
    let mut backoff = SOURCE_ERROR_BACKOFF.0;
    loop {
        let permit = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return source,
            permit = in_flight.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return source,
            },
        };
        let next = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return source,
            next = source.next() => next,
        };
        let delivery = match next {
            None => return source,
            Some(Err(e)) => {
                if !after_source_error(&shared, e, &mut backoff).await {
                    return source;
                }
                continue;
            }
            Some(Ok(d)) => d,
        };
        backoff = SOURCE_ERROR_BACKOFF.0;
        Counters::add(&shared.counters.received);
        let lane = &lanes[lane_of(delivery.envelope(), lanes.len())];
        if let Err(mpsc::error::SendError((delivery, _permit))) = lane.send((delivery, permit)) {
            // The lane is gone (its task ended): give the message back.
            shared.release(delivery).await;
            return source;
        }
    }
}

/// The failure of a delivery that arrived undecodable: dead-lettered with
/// reason `decode` before any handler runs (no handler, no retries).
fn undecodable<D: Delivery>(delivery: &D) -> Option<HandlerError> {
    delivery
        .decode_error()
        .map(|e| HandlerError::decode(Error::new(e.kind().clone(), e.message().to_string())))
}

fn lane_of(env: &Envelope, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    env.key.as_deref().unwrap_or("").hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// A lane of the ordered mode: handles its deliveries one after the other.
pub(crate) async fn lane<D: Delivery, H: Handler>(
    shared: Arc<Shared<H>>,
    mut rx: mpsc::UnboundedReceiver<Laned<D>>,
) {
    while let Some((delivery, permit)) = rx.recv().await {
        if shared.shutdown.is_cancelled() {
            // Fetched but not started: give it back rather than start new work.
            shared.release(delivery).await;
            drop(permit);
            continue;
        }
        shared.metrics.in_flight.increment(1.0);
        shared.processing.fetch_add(1, AtomicOrdering::Relaxed);
        shared.process_in_place(delivery).await;
        shared.processing.fetch_sub(1, AtomicOrdering::Relaxed);
        shared.metrics.in_flight.decrement(1.0);
        drop(permit);
    }
}

impl<H: Handler> Shared<H> {
    /// Handles one delivery and settles it (unordered mode).
    async fn process<D: Delivery>(&self, delivery: D) {
        self.metrics.in_flight.increment(1.0);
        self.processing.fetch_add(1, AtomicOrdering::Relaxed);
        let attempt = delivery.attempt();
        self.deposit_first_attempt(attempt);
        let result = match undecodable(&delivery) {
            Some(e) => Err(e),
            None => self.handler.handle(delivery.envelope()).await,
        };
        if result.is_ok() {
            // What `decide` answers for a success, without rendering the id
            // (only retry jitter needs it).
            let acked = delivery.ack().await;
            self.acked(acked);
        } else {
            self.failed(delivery, attempt, result).await;
        }
        self.processing.fetch_sub(1, AtomicOrdering::Relaxed);
        self.metrics.in_flight.decrement(1.0);
    }

    fn deposit_first_attempt(&self, attempt: u32) {
        if attempt <= 1 {
            if let Some(b) = &self.budget {
                b.deposit();
            }
        }
    }

    /// Counts the outcome of an ack.
    fn acked<D>(&self, acked: SettleResult<D>) {
        match acked {
            Ok(()) => Counters::add(&self.counters.acked),
            Err(e) => self.settle_failed("ack", e.error),
        }
    }

    /// Settles a delivery whose handler failed, through the broker.
    async fn failed<D: Delivery>(&self, delivery: D, attempt: u32, result: HandlerResult) {
        let decision = decide(
            &result,
            attempt,
            delivery.envelope().id.as_str(),
            &self.policy,
            self.budget.as_deref(),
        );
        self.settle(delivery, decision, attempt, result, None).await;
    }

    /// Ordered mode: retries happen here, holding the lane, with the message
    /// unacked; on shutdown during a wait the message is released.
    async fn process_in_place<D: Delivery>(&self, delivery: D) {
        let mut attempt = delivery.attempt();
        self.deposit_first_attempt(attempt);
        if let Some(e) = undecodable(&delivery) {
            self.settle(
                delivery,
                Decision::DeadLetter {
                    reason: FailureReason::Decode,
                },
                attempt,
                Err(e),
                None,
            )
            .await;
            return;
        }
        let mut retried: Option<Envelope> = None;
        loop {
            let env = retried.as_ref().unwrap_or(delivery.envelope());
            let result = self.handler.handle(env).await;
            let decision = decide(
                &result,
                attempt,
                env.id.as_str(),
                &self.policy,
                self.budget.as_deref(),
            );
            let Decision::Retry { delay, reason } = decision else {
                // After in-place retries the first failure time is on the retried
                // copy, not on the delivery's own envelope.
                let first_failed = retried.as_ref().and_then(first_failed_at);
                self.settle(delivery, decision, attempt, result, first_failed)
                    .await;
                return;
            };
            Counters::add(&self.counters.retried_in_place);
            self.metrics.retried.increment(1);
            let retry = Retry {
                delay,
                next_attempt: attempt + 1,
                first_failed_at: first_failed_at(env).unwrap_or_else(SystemTime::now),
                reason: reason.as_str(),
            };
            let next = retry.next_envelope(env);
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.release(delivery).await;
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
            retried = Some(next);
        }
    }

    async fn settle<D: Delivery>(
        &self,
        delivery: D,
        decision: Decision,
        attempt: u32,
        result: HandlerResult,
        first_failed: Option<SystemTime>,
    ) {
        match decision {
            Decision::Ack => self.acked(delivery.ack().await),
            Decision::Retry { delay, reason } => {
                let retry = Retry {
                    delay,
                    next_attempt: attempt + 1,
                    first_failed_at: first_failed_at(delivery.envelope())
                        .unwrap_or_else(SystemTime::now),
                    reason: reason.as_str(),
                };
                match delivery.retry(retry).await {
                    Ok(()) => {
                        Counters::add(&self.counters.retried);
                        self.metrics.retried.increment(1);
                    }
                    Err(e) => {
                        self.settle_failed("retry", e.error);
                        self.release(e.delivery).await;
                    }
                }
            }
            Decision::DeadLetter { reason } => {
                let err = result.err();
                let metadata =
                    self.metadata(&delivery, reason, attempt, err.as_ref(), first_failed);
                match self.dead_letter.dead_letter(delivery, &metadata).await {
                    Ok(()) => {
                        Counters::add(&self.counters.dead_lettered);
                        self.metrics.dead_lettered.increment(1);
                        tracing::warn!(consumer = %self.name, reason = reason.as_str(), attempts = attempt, "message dead-lettered");
                    }
                    Err(e) => {
                        self.settle_failed("dead-letter", e.error);
                        self.release(e.delivery).await;
                    }
                }
            }
        }
    }

    fn metadata<D: Delivery>(
        &self,
        delivery: &D,
        reason: FailureReason,
        attempt: u32,
        err: Option<&HandlerError>,
        first_failed: Option<SystemTime>,
    ) -> DeadLetterMetadata {
        let now = SystemTime::now();
        DeadLetterMetadata {
            reason,
            error: err
                .map(|e| Cow::Borrowed(e.message()))
                .unwrap_or(Cow::Borrowed(""))
                .into_owned(),
            error_type: err.map(|e| e.error_type().to_string()).unwrap_or_default(),
            attempts: attempt,
            first_failed_at: first_failed
                .or_else(|| first_failed_at(delivery.envelope()))
                .unwrap_or(now),
            last_failed_at: now,
            origin: delivery.origin(),
            consumer: self.name.clone(),
        }
    }

    fn settle_failed(&self, op: &str, error: Error) {
        Counters::add(&self.counters.settle_failures);
        self.metrics.settle_failed.increment(1);
        tracing::warn!(consumer = %self.name, operation = op, error = %error, "settling failed; the broker will redeliver");
    }

    pub(crate) async fn release<D: Delivery>(&self, delivery: D) {
        match delivery.release().await {
            Ok(()) => Counters::add(&self.counters.released),
            Err(e) => {
                // Dropping it unsettled leaves it to the broker's redelivery.
                self.settle_failed("release", e.error);
            }
        }
    }
}
