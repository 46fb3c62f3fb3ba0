//! Tests of the consumer runtime ([`postbox_core::Consumer`]) against an
//! in-test source whose deliveries record every settle operation: the failure
//! contract of docs/design.md §4 and the runtime behaviour of §7.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use postbox_core::delivery::{FIRST_FAILED_AT, LAST_REASON};
use postbox_core::dlq;
use postbox_core::{
    handler_fn, typed, CancellationToken, Consumer, ConsumerBuilder, DeadLetterMetadata,
    DeadLetterRouter, Delivery, Envelope, Error, ErrorKind, FailureReason, Handler, HandlerError,
    HandlerResult, Origin, ProcessingOrder, PublishError, Publisher, Retry, RetryPolicy, RunReport,
    SettleResult, Source, TypedEnvelope,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

const ORIGIN: &str = "orders";
const PARTITION: i32 = 3;
const CONSUMER: &str = "billing";
/// A message sent with this header arrives as undecodable, with its value as
/// the decoder's error.
const UNDECODABLE: &str = "undecodable";

// ---------------------------------------------------------------------------
// The event log shared by the source, the deliveries, the handlers and the DLQ.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Event {
    /// A handler started on message `id`, attempt `attempt`.
    Started {
        id: String,
        attempt: u32,
    },
    /// A handler finished on message `id`, attempt `attempt`.
    Finished {
        id: String,
        attempt: u32,
    },
    Ack(String),
    Retry {
        id: String,
        attempt: u32,
        retry: Retry,
    },
    Release(String),
    /// A delivery was dropped without being settled (left to broker redelivery).
    DroppedUnsettled(String),
    /// The DLQ publisher accepted a copy.
    DeadLettered {
        destination: String,
        envelope: Box<Envelope>,
    },
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    fn push(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|e| pred(e)).count()
    }
    fn position(&self, pred: impl Fn(&Event) -> bool) -> Option<usize> {
        self.0.lock().unwrap().iter().position(pred)
    }
    fn acks(&self) -> usize {
        self.count(|e| matches!(e, Event::Ack(_)))
    }
    fn started(&self) -> usize {
        self.count(|e| matches!(e, Event::Started { .. }))
    }
    fn retries(&self) -> Vec<(String, u32, Retry)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Retry { id, attempt, retry } => Some((id, attempt, retry)),
                _ => None,
            })
            .collect()
    }
    fn dead_letters(&self) -> Vec<(String, Envelope)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::DeadLettered {
                    destination,
                    envelope,
                } => Some((destination, *envelope)),
                _ => None,
            })
            .collect()
    }
}

fn is_ack(id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Ack(i) if i == id)
}
fn is_release(id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Release(i) if i == id)
}
fn is_started(id: &str, attempt: u32) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Started { id: i, attempt: a } if i == id && *a == attempt)
}
fn is_finished(id: &str, attempt: u32) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::Finished { id: i, attempt: a } if i == id && *a == attempt)
}
fn is_dead_lettered(id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::DeadLettered { envelope, .. } if envelope.id.as_str() == id)
}

// ---------------------------------------------------------------------------
// An mpsc-backed source and its deliveries.
// ---------------------------------------------------------------------------

struct TestDelivery {
    env: Envelope,
    origin: Origin,
    log: Log,
    /// Where a retry copy goes after its delay (a broker timer), if anywhere.
    redeliver: Option<mpsc::WeakUnboundedSender<Envelope>>,
    settled: bool,
    /// Set for a message sent with the `undecodable` header: what the
    /// adapter's decoder said about it.
    decode_error: Option<postbox_core::Error>,
}

impl TestDelivery {
    fn id(&self) -> String {
        self.env.id.to_string()
    }
}

impl Drop for TestDelivery {
    fn drop(&mut self) {
        if !self.settled {
            self.log.push(Event::DroppedUnsettled(self.id()));
        }
    }
}

impl Delivery for TestDelivery {
    fn envelope(&self) -> &Envelope {
        &self.env
    }

    fn attempt(&self) -> u32 {
        self.env.attempt
    }

    fn origin(&self) -> Origin {
        self.origin.clone()
    }

    fn decode_error(&self) -> Option<&postbox_core::Error> {
        self.decode_error.as_ref()
    }

    async fn ack(mut self) -> SettleResult<Self> {
        self.settled = true;
        self.log.push(Event::Ack(self.id()));
        Ok(())
    }

    async fn retry(mut self, retry: Retry) -> SettleResult<Self> {
        self.settled = true;
        self.log.push(Event::Retry {
            id: self.id(),
            attempt: self.env.attempt,
            retry: retry.clone(),
        });
        if let Some(tx) = self.redeliver.as_ref().and_then(|w| w.upgrade()) {
            let next = retry.next_envelope(&self.env);
            tokio::spawn(async move {
                tokio::time::sleep(retry.delay).await;
                let _ = tx.send(next);
            });
        }
        Ok(())
    }

    async fn release(mut self) -> SettleResult<Self> {
        self.settled = true;
        self.log.push(Event::Release(self.id()));
        Ok(())
    }
}

struct TestSource {
    rx: mpsc::UnboundedReceiver<Envelope>,
    weak_tx: mpsc::WeakUnboundedSender<Envelope>,
    redeliver_retries: bool,
    log: Log,
    token: CancellationToken,
    taken: Arc<AtomicUsize>,
    polls_after_cancel: Arc<AtomicUsize>,
    next_offset: i64,
}

impl Source for TestSource {
    type Delivery = TestDelivery;

    fn next(&mut self) -> impl Future<Output = Option<Result<TestDelivery, Error>>> + Send {
        // `poll_recv` is cancel-safe: a dropped future loses nothing.
        std::future::poll_fn(move |cx| {
            if self.token.is_cancelled() {
                self.polls_after_cancel.fetch_add(1, AtomicOrdering::SeqCst);
            }
            self.rx.poll_recv(cx).map(|next| {
                next.map(|env| {
                    self.taken.fetch_add(1, AtomicOrdering::SeqCst);
                    let offset = self.next_offset;
                    self.next_offset += 1;
                    let decode_error = env.headers.get(UNDECODABLE).map(|why| {
                        postbox_core::Error::new(postbox_core::ErrorKind::Decode, why.clone())
                    });
                    Ok(TestDelivery {
                        decode_error,
                        env,
                        origin: Origin {
                            destination: ORIGIN.to_string(),
                            partition: Some(PARTITION),
                            offset: Some(offset),
                        },
                        log: self.log.clone(),
                        redeliver: self.redeliver_retries.then(|| self.weak_tx.clone()),
                        settled: false,
                    })
                })
            })
        })
    }

    fn system(&self) -> &'static str {
        "test"
    }

    fn destination(&self) -> &str {
        ORIGIN
    }
}

/// The test's side of the source: send messages, read the log and counters.
struct Broker {
    tx: mpsc::UnboundedSender<Envelope>,
    log: Log,
    token: CancellationToken,
    taken: Arc<AtomicUsize>,
    polls_after_cancel: Arc<AtomicUsize>,
}

impl Broker {
    fn send(&self, env: Envelope) {
        self.tx.send(env).unwrap();
    }
}

/// A broker and its source; with `redeliver_retries`, `Delivery::retry`
/// sends the next attempt back after its delay, like a broker timer.
fn broker(redeliver_retries: bool) -> (Broker, TestSource) {
    let (tx, rx) = mpsc::unbounded_channel();
    let log = Log::default();
    let token = CancellationToken::new();
    let taken = Arc::new(AtomicUsize::new(0));
    let polls_after_cancel = Arc::new(AtomicUsize::new(0));
    let source = TestSource {
        rx,
        weak_tx: tx.downgrade(),
        redeliver_retries,
        log: log.clone(),
        token: token.clone(),
        taken: taken.clone(),
        polls_after_cancel: polls_after_cancel.clone(),
        next_offset: 100,
    };
    let broker = Broker {
        tx,
        log,
        token,
        taken,
        polls_after_cancel,
    };
    (broker, source)
}

// ---------------------------------------------------------------------------
// DLQ publishers.
// ---------------------------------------------------------------------------

/// Accepts every copy and records it in the log.
struct RecordingPublisher {
    log: Log,
}

#[async_trait]
impl Publisher for RecordingPublisher {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.log.push(Event::DeadLettered {
            destination: destination.to_string(),
            envelope: Box::new(envelope),
        });
        Ok(())
    }
}

/// Fails every publish, as a broker that is down.
struct FailingPublisher {
    attempts: AtomicUsize,
}

#[async_trait]
impl Publisher for FailingPublisher {
    async fn publish(&self, _destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        self.attempts.fetch_add(1, AtomicOrdering::SeqCst);
        Err(PublishError::new(
            Error::new(ErrorKind::Connection, "DLQ broker unreachable"),
            envelope,
        ))
    }
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A consumer of `source` named `billing`, dead-lettering into the log.
fn consumer<H: Handler>(
    b: &Broker,
    source: TestSource,
    handler: H,
) -> ConsumerBuilder<TestSource, H> {
    Consumer::builder(source, handler)
        .name(CONSUMER)
        .shutdown_token(b.token.clone())
        .dead_letter(DeadLetterRouter::new(RecordingPublisher {
            log: b.log.clone(),
        }))
}

/// A handler that logs `Started`/`Finished` around `f`.
fn logged<F, Fut>(log: &Log, f: F) -> impl Handler
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let log = log.clone();
    handler_fn(move |env: Envelope| {
        let log = log.clone();
        let id = env.id.to_string();
        let attempt = env.attempt;
        let fut = f(env);
        async move {
            log.push(Event::Started {
                id: id.clone(),
                attempt,
            });
            let result = fut.await;
            log.push(Event::Finished { id, attempt });
            result
        }
    })
}

fn message(id: &str) -> Envelope {
    Envelope::builder("order.placed")
        .id(id)
        .source("shop")
        .payload(r#"{"id":1}"#)
        .build()
}

fn keyed(id: &str, key: &str) -> Envelope {
    Envelope::builder("order.placed")
        .id(id)
        .key(key)
        .payload(r#"{"id":1}"#)
        .build()
}

/// Waits (in virtual time) until `cond` holds; fails after ten virtual minutes.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs `fut` with a generous (virtual) time limit.
async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), fut)
        .await
        .expect("the consumer did not stop")
}

fn report(f: impl FnOnce(&mut RunReport)) -> RunReport {
    let mut r = RunReport::default();
    f(&mut r);
    r
}

// ---------------------------------------------------------------------------
// Success.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn success_is_acked_after_the_handler_finished() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |_env| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    });
    let running = consumer(&b, source, handler)
        .concurrency(2)
        .build()
        .unwrap()
        .spawn();
    let ids: Vec<String> = (0..5).map(|i| format!("m-{i}")).collect();
    for id in &ids {
        b.send(message(id));
    }
    wait_until("5 acks", || b.log.acks() == 5).await;
    let r = within(running.shutdown()).await.unwrap();

    assert_eq!(
        r,
        report(|r| {
            r.received = 5;
            r.acked = 5;
        })
    );
    for id in &ids {
        let finished = b
            .log
            .position(is_finished(id, 1))
            .expect("handler finished");
        let ack = b.log.position(is_ack(id)).expect("acked");
        assert!(finished < ack, "{id} acked before its handler finished");
        assert_eq!(b.log.count(is_ack(id)), 1, "{id} acked once");
    }
    assert_eq!(
        b.log
            .count(|e| matches!(e, Event::Retry { .. } | Event::Release(_))),
        0
    );
    assert_eq!(b.log.count(|e| matches!(e, Event::DroppedUnsettled(_))), 0);
}

// ---------------------------------------------------------------------------
// Transient failures: retry through the broker, then dead-letter.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_then_dead_lettered_with_full_metadata() {
    let (b, source) = broker(true);
    let policy = RetryPolicy::exponential(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(300))
        .with_max_attempts(4);
    let handler = logged(&b.log, |_env| async {
        Err(HandlerError::transient(std::io::Error::other(
            "database unavailable",
        )))
    });
    let running = consumer(&b, source, handler)
        .retry_policy(policy.clone())
        .build()
        .unwrap()
        .spawn();
    let before = SystemTime::now();
    b.send(message("m-1"));
    wait_until("the dead letter", || {
        b.log.position(is_dead_lettered("m-1")).is_some()
    })
    .await;
    wait_until("the ack of the last attempt", || b.log.acks() == 1).await;
    let after = SystemTime::now();
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 4;
            r.retried = 3;
            r.dead_lettered = 1;
        })
    );

    // Attempts 1..3 were retried through the broker with next_attempt = attempt + 1
    // and a delay within the policy's ceiling (the same as the pure policy's).
    let retries = b.log.retries();
    assert_eq!(retries.len(), 3);
    for (n, (id, attempt, retry)) in retries.iter().enumerate() {
        let n = n as u32 + 1;
        assert_eq!(id, "m-1");
        assert_eq!(*attempt, n);
        assert_eq!(retry.next_attempt, n + 1);
        assert!(
            retry.delay <= policy.ceiling(n),
            "{:?} > ceiling",
            retry.delay
        );
        assert!(retry.delay <= policy.max_delay());
        assert_eq!(retry.delay, policy.delay(n, "m-1"));
        assert_eq!(retry.reason, "handler-error");
        // The first failure time is carried across attempts, never reset.
        assert_eq!(retry.first_failed_at, retries[0].2.first_failed_at);
    }
    let first_failed_at = retries[0].2.first_failed_at;
    assert!(before <= first_failed_at && first_failed_at <= after);

    // The last attempt (attempt == max_attempts) was dead-lettered: copy first, then ack.
    let dead = b.log.dead_letters();
    assert_eq!(dead.len(), 1);
    let (destination, copy) = &dead[0];
    assert_eq!(destination, "orders.dlq");
    assert_eq!(copy.id.as_str(), "m-1");
    assert_eq!(copy.payload, message("m-1").payload);
    let published = b.log.position(is_dead_lettered("m-1")).unwrap();
    let acked = b.log.position(is_ack("m-1")).unwrap();
    assert!(
        published < acked,
        "original acked before the DLQ copy was confirmed"
    );
    assert!(b.log.position(is_finished("m-1", 4)).unwrap() < published);

    let meta = DeadLetterMetadata::read(copy).expect("complete dead-letter metadata");
    assert_eq!(meta.reason, FailureReason::RetriesExhausted);
    assert_eq!(copy.headers[dlq::REASON], "retries-exhausted");
    assert_eq!(meta.error, "database unavailable");
    assert_eq!(meta.error_type, std::any::type_name::<std::io::Error>());
    assert_eq!(meta.attempts, 4);
    assert_eq!(copy.headers[dlq::ATTEMPTS], "4");
    assert_eq!(meta.first_failed_at, first_failed_at);
    assert!(first_failed_at <= meta.last_failed_at && meta.last_failed_at <= after);
    assert_eq!(
        meta.origin,
        Origin {
            destination: ORIGIN.into(),
            partition: Some(PARTITION),
            offset: Some(103),
        }
    );
    assert_eq!(copy.headers[dlq::ORIGIN], ORIGIN);
    assert_eq!(copy.headers[dlq::ORIGIN_PARTITION], "3");
    assert_eq!(copy.headers[dlq::ORIGIN_OFFSET], "103");
    assert_eq!(meta.consumer, CONSUMER);
    // Retry metadata is replaced by the dead-letter metadata, never appended.
    assert!(!copy.headers.contains_key(FIRST_FAILED_AT));
    assert!(!copy.headers.contains_key(LAST_REASON));
    assert_eq!(
        copy.headers
            .keys()
            .filter(|k| postbox_core::dlq::NAMES.contains(&k.as_str()))
            .count(),
        10
    );
}

#[tokio::test(start_paused = true)]
async fn the_last_attempt_goes_to_the_dlq_not_to_another_retry() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |_env| async {
        Err(HandlerError::transient("still down"))
    });
    let running = consumer(&b, source, handler).build().unwrap().spawn();
    // Delivered for the fifth time (the default policy's last attempt), with the
    // retry metadata an earlier attempt left.
    let first = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    let mut env = message("m-5");
    Retry {
        delay: Duration::ZERO,
        next_attempt: 5,
        first_failed_at: first,
        reason: "timeout",
    }
    .apply(&mut env);
    b.send(env);
    wait_until("the dead letter", || b.log.acks() == 1).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 1;
            r.dead_lettered = 1;
        })
    );
    assert!(b.log.retries().is_empty());
    let (_, copy) = &b.log.dead_letters()[0];
    let meta = DeadLetterMetadata::read(copy).unwrap();
    assert_eq!(meta.reason, FailureReason::RetriesExhausted);
    assert_eq!(meta.attempts, 5);
    assert_eq!(meta.first_failed_at, first);
    assert!(meta.last_failed_at > first);
    assert_eq!(meta.error, "still down");
    assert_eq!(meta.origin.offset, Some(100));
    assert!(!copy.headers.contains_key(FIRST_FAILED_AT));
    assert!(!copy.headers.contains_key(LAST_REASON));
}

#[tokio::test(start_paused = true)]
async fn retry_after_uses_the_explicit_delay() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |_env| async {
        Err(HandlerError::retry_after(
            Duration::from_secs(7),
            "rate limited",
        ))
    });
    let running = consumer(&b, source, handler).build().unwrap().spawn();
    b.send(message("m-1"));
    wait_until("the retry", || !b.log.retries().is_empty()).await;
    within(running.shutdown()).await.unwrap();
    let (_, attempt, retry) = &b.log.retries()[0];
    assert_eq!(*attempt, 1);
    assert_eq!(retry.next_attempt, 2);
    assert_eq!(retry.delay, Duration::from_secs(7));
}

// ---------------------------------------------------------------------------
// Permanent failures, decode failures, panics, failed DLQ publishes.
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn permanent_error_is_dead_lettered_at_once() {
    let (b, source) = broker(true);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let long = "x".repeat(5000);
    let handler = logged(&b.log, move |_env| {
        c.fetch_add(1, AtomicOrdering::SeqCst);
        let long = long.clone();
        async move { Err(HandlerError::permanent(format!("bad order {long}"))) }
    });
    let running = consumer(&b, source, handler).build().unwrap().spawn();
    b.send(message("m-1"));
    wait_until("the ack after dead-lettering", || b.log.acks() == 1).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 1;
            r.dead_lettered = 1;
        })
    );
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 1, "no retries");
    assert!(b.log.retries().is_empty());
    assert!(
        b.log.position(is_dead_lettered("m-1")).unwrap() < b.log.position(is_ack("m-1")).unwrap()
    );
    let (destination, copy) = &b.log.dead_letters()[0];
    assert_eq!(destination, "orders.dlq");
    let meta = DeadLetterMetadata::read(copy).unwrap();
    assert_eq!(meta.reason, FailureReason::HandlerError);
    assert_eq!(copy.headers[dlq::REASON], "handler-error");
    assert_eq!(meta.attempts, 1);
    assert!(meta.error.starts_with("bad order xxx"));
    assert_eq!(
        meta.error.len(),
        dlq::MAX_ERROR_BYTES,
        "dlqerror is truncated to 1 KiB"
    );
    assert_eq!(meta.first_failed_at, meta.last_failed_at);
    assert_eq!(meta.consumer, CONSUMER);
}

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
}

#[tokio::test(start_paused = true)]
async fn typed_handler_with_an_undecodable_payload_is_dead_lettered_as_decode() {
    let (b, source) = broker(true);
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let handler = typed(move |order: TypedEnvelope<Order>| {
        c.lock().unwrap().push(order.data.id);
        async { Ok(()) }
    });
    let running = consumer(&b, source, handler).build().unwrap().spawn();
    b.send(
        Envelope::builder("order.placed")
            .id("bad")
            .payload("not json")
            .build(),
    );
    b.send(
        Envelope::builder("order.placed")
            .id("wrong-shape")
            .payload(r#"{"id":"seven"}"#)
            .build(),
    );
    b.send(
        Envelope::builder("order.placed")
            .id("good")
            .payload(r#"{"id":7}"#)
            .build(),
    );
    wait_until("3 settled", || b.log.acks() == 3).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 3;
            r.acked = 1;
            r.dead_lettered = 2;
        })
    );
    assert_eq!(
        *calls.lock().unwrap(),
        vec![7],
        "the closure ran only for the good payload"
    );
    assert!(b.log.retries().is_empty());
    let dead = b.log.dead_letters();
    assert_eq!(dead.len(), 2);
    for (_, copy) in &dead {
        let meta = DeadLetterMetadata::read(copy).unwrap();
        assert_eq!(meta.reason, FailureReason::Decode, "{}", copy.id);
        assert_eq!(copy.headers[dlq::REASON], "decode");
        assert_eq!(meta.attempts, 1);
        assert!(!meta.error.is_empty());
    }
}

async fn undecodable_deliveries_are_dead_lettered_without_the_handler(
    ordering: ProcessingOrder,
    concurrency: usize,
) {
    let (b, source) = broker(true);
    let handler = logged(&b.log, |_env: Envelope| async { Ok(()) });
    let running = consumer(&b, source, handler)
        .ordering(ordering)
        .concurrency(concurrency)
        .build()
        .unwrap()
        .spawn();
    let mut raw = message("raw");
    raw.headers.insert(
        UNDECODABLE.into(),
        "`time` is not an RFC 3339 timestamp".into(),
    );
    raw.headers.insert("ce_time".into(), "yesterday".into());
    b.send(raw.clone());
    b.send(message("good"));
    wait_until("2 settled", || b.log.acks() == 2).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 2;
            r.acked = 1;
            r.dead_lettered = 1;
        })
    );
    assert_eq!(
        b.log.count(is_started("raw", 1)),
        0,
        "the handler never ran"
    );
    assert!(
        b.log.retries().is_empty(),
        "a decode failure is never retried"
    );
    let dead = b.log.dead_letters();
    assert_eq!(dead.len(), 1);
    let (destination, copy) = &dead[0];
    assert_eq!(destination, "orders.dlq");
    let meta = DeadLetterMetadata::read(copy).unwrap();
    assert_eq!(meta.reason, FailureReason::Decode);
    assert_eq!(meta.attempts, 1);
    assert!(meta.error.contains("RFC 3339"), "{}", meta.error);
    assert_eq!(meta.error_type, "decode");
    // What arrived is kept: body and transport metadata unchanged.
    assert_eq!(copy.payload, raw.payload);
    assert_eq!(copy.headers["ce_time"], "yesterday");
}

#[tokio::test(start_paused = true)]
async fn undecodable_deliveries_are_dead_lettered_without_the_handler_one_at_a_time() {
    undecodable_deliveries_are_dead_lettered_without_the_handler(ProcessingOrder::Unordered, 1)
        .await;
}

#[tokio::test(start_paused = true)]
async fn undecodable_deliveries_are_dead_lettered_without_the_handler_concurrently() {
    undecodable_deliveries_are_dead_lettered_without_the_handler(ProcessingOrder::Unordered, 4)
        .await;
}

#[tokio::test(start_paused = true)]
async fn undecodable_deliveries_are_dead_lettered_without_the_handler_per_key() {
    undecodable_deliveries_are_dead_lettered_without_the_handler(ProcessingOrder::PerKey, 2).await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_retried_with_reason_panic_and_the_consumer_keeps_running() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |env: Envelope| async move {
        if env.id.as_str() == "boom" {
            panic!("handler bug");
        }
        Ok(())
    });
    let running = consumer(&b, source, handler)
        .concurrency(1)
        .build()
        .unwrap()
        .spawn();
    b.send(message("boom"));
    b.send(message("next"));
    b.send(message("boom"));
    b.send(message("after"));
    wait_until("2 acks", || b.log.acks() == 2).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 4;
            r.acked = 2;
            r.retried = 2;
        })
    );
    let retries = b.log.retries();
    assert_eq!(retries.len(), 2);
    for (id, attempt, retry) in &retries {
        assert_eq!(id, "boom");
        assert_eq!(*attempt, 1);
        assert_eq!(retry.next_attempt, 2);
        assert_eq!(retry.reason, "panic");
        assert!(retry.delay <= RetryPolicy::default().ceiling(1));
    }
    // The consumer went on with the next messages after each panic.
    assert!(b.log.position(is_ack("next")).is_some());
    assert!(b.log.position(is_ack("after")).is_some());
    assert_eq!(b.log.count(|e| matches!(e, Event::DroppedUnsettled(_))), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panic_on_the_last_attempt_is_dead_lettered() {
    let (b, source) = broker(false);
    let handler = handler_fn(|_env: Envelope| async { panic!("always") });
    let running = consumer(&b, source, handler)
        .retry_policy(RetryPolicy::default().with_max_attempts(1))
        .build()
        .unwrap()
        .spawn();
    b.send(message("m-1"));
    wait_until("the dead letter", || b.log.acks() == 1).await;
    within(running.shutdown()).await.unwrap();
    let (_, copy) = &b.log.dead_letters()[0];
    let meta = DeadLetterMetadata::read(copy).unwrap();
    assert_eq!(meta.reason, FailureReason::RetriesExhausted);
    assert_eq!(meta.error, "handler panicked: always");
    assert_eq!(meta.error_type, "panic");
}

#[tokio::test(start_paused = true)]
async fn a_failed_dlq_publish_releases_the_original() {
    let (b, source) = broker(false);
    let publisher = Arc::new(FailingPublisher {
        attempts: AtomicUsize::new(0),
    });
    let handler = logged(&b.log, |env: Envelope| async move {
        if env.id.as_str() == "poison" {
            Err(HandlerError::permanent("bad order"))
        } else {
            Ok(())
        }
    });
    let running = Consumer::builder(source, handler)
        .name(CONSUMER)
        .shutdown_token(b.token.clone())
        .dead_letter(DeadLetterRouter::new(publisher.clone()))
        .build()
        .unwrap()
        .spawn();
    b.send(message("poison"));
    b.send(message("fine"));
    wait_until("the release and the ack", || {
        b.log.position(is_release("poison")).is_some() && b.log.acks() == 1
    })
    .await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 2;
            r.acked = 1;
            r.released = 1;
            r.settle_failures = 1;
        })
    );
    assert_eq!(publisher.attempts.load(AtomicOrdering::SeqCst), 1);
    // Not acked, not lost: released for broker redelivery.
    assert_eq!(b.log.count(is_ack("poison")), 0);
    assert_eq!(b.log.count(is_release("poison")), 1);
    assert_eq!(b.log.count(|e| matches!(e, Event::DroppedUnsettled(_))), 0);
    assert!(b.log.dead_letters().is_empty());
}

// ---------------------------------------------------------------------------
// Graceful shutdown.
// ---------------------------------------------------------------------------

async fn shutdown_lets_in_flight_handlers_finish(ordering: ProcessingOrder) {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |_env| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    });
    let running = consumer(&b, source, handler)
        .ordering(ordering)
        .concurrency(4)
        .grace_period(Duration::from_secs(30))
        .build()
        .unwrap()
        .spawn();
    for i in 0..3 {
        b.send(keyed(&format!("m-{i}"), &format!("k-{i}")));
    }
    wait_until("3 handlers started", || b.log.started() == 3).await;
    assert_eq!(b.log.acks(), 0, "the handlers are still running");
    b.token.cancel();
    // Work that arrives after the cancel is not fetched.
    b.send(keyed("late-1", "k-0"));
    b.send(keyed("late-2", "k-9"));
    let r = within(running.join()).await.unwrap();

    assert_eq!(
        r,
        report(|r| {
            r.received = 3;
            r.acked = 3;
        })
    );
    for i in 0..3 {
        let id = format!("m-{i}");
        let finished = b.log.position(is_finished(&id, 1)).expect("finished");
        assert!(finished < b.log.position(is_ack(&id)).expect("acked"));
    }
    assert_eq!(
        b.log.count(|e| matches!(
            e,
            Event::Release(_) | Event::Retry { .. } | Event::DroppedUnsettled(_)
        )),
        0,
        "nothing that finished is released or redelivered: {:?}",
        b.log.events()
    );
    assert_eq!(b.taken.load(AtomicOrdering::SeqCst), 3);
    assert_eq!(
        b.polls_after_cancel.load(AtomicOrdering::SeqCst),
        0,
        "the source was polled after the cancel"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_in_flight_handlers_finish_and_ack_unordered() {
    shutdown_lets_in_flight_handlers_finish(ProcessingOrder::Unordered).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_in_flight_handlers_finish_and_ack_per_key() {
    shutdown_lets_in_flight_handlers_finish(ProcessingOrder::PerKey).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_a_stuck_handler_after_the_grace_period() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |env: Envelope| async move {
        let d = if env.id.as_str() == "stuck" { 3600 } else { 1 };
        tokio::time::sleep(Duration::from_secs(d)).await;
        Ok(())
    });
    let running = consumer(&b, source, handler)
        .concurrency(2)
        .grace_period(Duration::from_secs(5))
        .build()
        .unwrap()
        .spawn();
    b.send(message("stuck"));
    b.send(message("quick"));
    wait_until("2 handlers started", || b.log.started() == 2).await;
    let cancelled_at = Instant::now();
    b.token.cancel();
    let r = within(running.join()).await.unwrap();
    assert!(Instant::now() - cancelled_at < Duration::from_secs(3600));
    assert_eq!(
        r,
        report(|r| {
            r.received = 2;
            r.acked = 1;
            r.abandoned = 1;
        })
    );
    assert_eq!(b.log.count(is_ack("quick")), 1);
    assert_eq!(b.log.count(is_ack("stuck")), 0);
    assert_eq!(b.log.count(is_release("stuck")), 0);
    // Abandoned unsettled: the broker redelivers it.
    assert_eq!(
        b.log
            .count(|e| matches!(e, Event::DroppedUnsettled(id) if id == "stuck")),
        1
    );
    assert_eq!(b.polls_after_cancel.load(AtomicOrdering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_an_in_place_retry_wait_releases_the_message() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |_env| async {
        Err(HandlerError::transient("down"))
    });
    let running = consumer(&b, source, handler)
        .ordering(ProcessingOrder::PerKey)
        .retry_policy(RetryPolicy::exponential(Duration::from_secs(60)).without_jitter())
        .build()
        .unwrap()
        .spawn();
    b.send(keyed("m-1", "a"));
    wait_until("the first failure", || {
        b.log.position(is_finished("m-1", 1)).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.token.cancel();
    let r = within(running.join()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 1;
            r.retried_in_place = 1;
            r.released = 1;
        })
    );
    assert_eq!(b.log.count(is_release("m-1")), 1);
    assert_eq!(b.log.started(), 1, "not retried after the cancel");
}

// ---------------------------------------------------------------------------
// Ordering.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct OrderState {
    /// Per key: the sequence numbers in the order their handlers started.
    handled: BTreeMap<String, Vec<u32>>,
    /// Keys with a handler running right now.
    active: HashMap<String, bool>,
    /// Same-key handlers that overlapped.
    overlaps: usize,
    current: usize,
    max: usize,
}

#[tokio::test(start_paused = true)]
async fn per_key_order_is_kept_with_random_handler_durations() {
    const KEYS: u32 = 20;
    const PER_KEY: u32 = 10;
    let (b, source) = broker(false);
    let state = Arc::new(Mutex::new(OrderState::default()));
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(7)));
    let (s, r) = (state.clone(), rng.clone());
    let handler = handler_fn(move |env: Envelope| {
        let (state, rng) = (s.clone(), r.clone());
        async move {
            let key = env.key.clone().unwrap();
            let seq: u32 = env.headers["seq"].parse().unwrap();
            {
                let mut st = state.lock().unwrap();
                if st.active.insert(key.clone(), true) == Some(true) {
                    st.overlaps += 1;
                }
                st.handled.entry(key.clone()).or_default().push(seq);
                st.current += 1;
                st.max = st.max.max(st.current);
            }
            let ms = rng.lock().unwrap().u64(0..20);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut st = state.lock().unwrap();
            st.active.insert(key, false);
            st.current -= 1;
            Ok(())
        }
    });
    let running = consumer(&b, source, handler)
        .ordering(ProcessingOrder::PerKey)
        .concurrency(4)
        .build()
        .unwrap()
        .spawn();

    // Interleave the keys randomly, each key's messages in sequence.
    let mut next = vec![0u32; KEYS as usize];
    let mut order = fastrand::Rng::with_seed(42);
    let mut sent = 0;
    while sent < KEYS * PER_KEY {
        let k = order.u32(0..KEYS) as usize;
        if next[k] == PER_KEY {
            continue;
        }
        let env = Envelope::builder("t")
            .id(format!("k{k}-{}", next[k]))
            .key(format!("k{k}"))
            .header("seq", next[k].to_string())
            .build();
        b.send(env);
        next[k] += 1;
        sent += 1;
    }
    let total = (KEYS * PER_KEY) as usize;
    wait_until("every message acked", || b.log.acks() == total).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(r.received, total as u64);
    assert_eq!(r.acked, total as u64);

    let st = state.lock().unwrap();
    assert_eq!(st.overlaps, 0, "two handlers of one key ran at once");
    assert!(
        st.max <= 4,
        "{} handlers at once with concurrency 4",
        st.max
    );
    assert!(st.max > 1, "the lanes ran concurrently");
    assert_eq!(st.handled.len(), KEYS as usize);
    for (key, seqs) in &st.handled {
        assert_eq!(
            *seqs,
            (0..PER_KEY).collect::<Vec<_>>(),
            "order of key {key}"
        );
    }
    // Acks follow the same per-key order.
    let mut acked: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for e in b.log.events() {
        if let Event::Ack(id) = e {
            let (key, seq) = id.split_once('-').unwrap();
            acked
                .entry(key.to_string())
                .or_default()
                .push(seq.parse().unwrap());
        }
    }
    for (key, seqs) in &acked {
        assert_eq!(
            *seqs,
            (0..PER_KEY).collect::<Vec<_>>(),
            "ack order of key {key}"
        );
    }
}

/// When each (message id, attempt) handler started and ended.
type StartEnd = HashMap<(String, u32), (Instant, Instant)>;

#[tokio::test(start_paused = true)]
async fn ordered_retry_happens_in_place_and_blocks_only_its_key() {
    let (b, source) = broker(true);
    let times: Arc<Mutex<StartEnd>> = Arc::default();
    let seen: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let (t, s) = (times.clone(), seen.clone());
    let handler = logged(&b.log, move |env: Envelope| {
        let (times, seen) = (t.clone(), s.clone());
        async move {
            let start = Instant::now();
            seen.lock().unwrap().push(env.clone());
            tokio::time::sleep(Duration::from_millis(10)).await;
            times
                .lock()
                .unwrap()
                .insert((env.id.to_string(), env.attempt), (start, Instant::now()));
            if env.id.as_str() == "a-1" && env.attempt == 1 {
                return Err(HandlerError::transient("flaky"));
            }
            Ok(())
        }
    });
    let policy = RetryPolicy::exponential(Duration::from_secs(1)).without_jitter();
    let running = consumer(&b, source, handler)
        .ordering(ProcessingOrder::PerKey)
        .concurrency(4)
        .retry_policy(policy)
        .build()
        .unwrap()
        .spawn();
    let others: Vec<String> = ["b", "c", "d", "e", "f", "g", "h"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    b.send(keyed("a-1", "a"));
    b.send(keyed("a-2", "a"));
    for k in &others {
        b.send(keyed(&format!("{k}-1"), k));
    }
    b.send(keyed("a-3", "a"));
    let total = 3 + others.len();
    wait_until("every message acked", || b.log.acks() == total).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = total as u64;
            r.acked = total as u64;
            r.retried_in_place = 1;
        })
    );
    // In place: no retry through the broker.
    assert!(b.log.retries().is_empty());

    // The second attempt saw the retry metadata, same id.
    let seen = seen.lock().unwrap();
    let second = seen
        .iter()
        .find(|e| e.id.as_str() == "a-1" && e.attempt == 2)
        .expect("a-1 retried with attempt 2");
    assert_eq!(second.headers[LAST_REASON], "handler-error");
    assert!(second.headers.contains_key(FIRST_FAILED_AT));

    // Key `a` in order: a-1 (fails), a-1 again after the 1 s delay, a-2, a-3.
    let times = times.lock().unwrap();
    let at = |id: &str, attempt: u32| times[&(id.to_string(), attempt)];
    let (_, a1_failed) = at("a-1", 1);
    let (a1_retry_start, a1_done) = at("a-1", 2);
    assert!(a1_retry_start - a1_failed >= Duration::from_secs(1));
    assert!(at("a-2", 1).0 >= a1_done, "a-2 overtook the retry of a-1");
    assert!(at("a-3", 1).0 >= at("a-2", 1).1);
    assert!(b.log.position(is_ack("a-1")).unwrap() < b.log.position(is_started("a-2", 1)).unwrap());
    assert_eq!(b.log.count(is_ack("a-1")), 1);
    // Other keys went on while a-1 waited for its retry.
    let overtaken = others
        .iter()
        .filter(|k| at(&format!("{k}-1"), 1).1 <= a1_retry_start)
        .count();
    assert!(
        overtaken >= 1,
        "no other key proceeded during the in-place retry"
    );
}

#[tokio::test(start_paused = true)]
async fn ordered_retries_exhausted_in_place_dead_letter_with_the_first_failure_time() {
    let (b, source) = broker(false);
    let calls: Arc<Mutex<Vec<SystemTime>>> = Arc::default();
    let c = calls.clone();
    let handler = handler_fn(move |_env: Envelope| {
        c.lock().unwrap().push(SystemTime::now());
        // Let the wall clock move between attempts (timers are virtual).
        std::thread::sleep(Duration::from_millis(2));
        async { Err(HandlerError::transient("down")) }
    });
    let running = consumer(&b, source, handler)
        .ordering(ProcessingOrder::PerKey)
        .retry_policy(RetryPolicy::default().with_max_attempts(3))
        .build()
        .unwrap()
        .spawn();
    b.send(keyed("m-1", "a"));
    wait_until("the dead letter", || b.log.acks() == 1).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 1;
            r.retried_in_place = 2;
            r.dead_lettered = 1;
        })
    );
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), 3);
    let (_, copy) = &b.log.dead_letters()[0];
    let meta = DeadLetterMetadata::read(copy).unwrap();
    assert_eq!(meta.reason, FailureReason::RetriesExhausted);
    assert_eq!(meta.attempts, 3);
    assert!(
        calls[0] <= meta.first_failed_at && meta.first_failed_at < calls[1],
        "dlqfirstfailedat {:?} is not the time of the first failure (attempts at {:?})",
        meta.first_failed_at,
        *calls
    );
    assert!(meta.last_failed_at >= calls[2]);
}

// ---------------------------------------------------------------------------
// Bounded concurrency.
// ---------------------------------------------------------------------------

async fn never_more_than_n_at_once(ordering: ProcessingOrder, n: usize) {
    let (b, source) = broker(false);
    let current = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(3)));
    let (c, m) = (current.clone(), max.clone());
    let handler = handler_fn(move |_env: Envelope| {
        let (current, max, rng) = (c.clone(), m.clone(), rng.clone());
        async move {
            let now = current.fetch_add(1, AtomicOrdering::SeqCst) + 1;
            max.fetch_max(now, AtomicOrdering::SeqCst);
            let ms = rng.lock().unwrap().u64(1..30);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            current.fetch_sub(1, AtomicOrdering::SeqCst);
            Ok(())
        }
    });
    let running = consumer(&b, source, handler)
        .ordering(ordering)
        .concurrency(n)
        .build()
        .unwrap()
        .spawn();
    for i in 0..60 {
        b.send(keyed(&format!("m-{i}"), &format!("k-{}", i % 17)));
    }
    wait_until("every message acked", || b.log.acks() == 60).await;
    let r = within(running.shutdown()).await.unwrap();
    assert_eq!(r.acked, 60);
    let max = max.load(AtomicOrdering::SeqCst);
    assert!(max <= n, "{max} handlers ran at once with concurrency {n}");
    assert!(max > 1, "handlers never ran concurrently");
    if ordering == ProcessingOrder::Unordered {
        assert_eq!(max, n, "the concurrency limit was never reached");
    }
}

#[tokio::test(start_paused = true)]
async fn bounded_concurrency_unordered() {
    never_more_than_n_at_once(ProcessingOrder::Unordered, 3).await;
}

#[tokio::test(start_paused = true)]
async fn bounded_concurrency_per_key() {
    never_more_than_n_at_once(ProcessingOrder::PerKey, 4).await;
}

// ---------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn building_without_a_dead_letter_router_is_a_config_error() {
    let (_b, source) = broker(false);
    let built = Consumer::builder(source, handler_fn(|_env: Envelope| async { Ok(()) })).build();
    let Err(e) = built else {
        panic!("a consumer without a dead-letter router was built");
    };
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(e.message().contains("dead-letter"));
}

#[tokio::test(start_paused = true)]
async fn the_consumer_stops_by_itself_when_the_source_closes() {
    let (b, source) = broker(false);
    let handler = logged(&b.log, |_env| async { Ok(()) });
    let built = consumer(&b, source, handler)
        .concurrency(2)
        .build()
        .unwrap();
    b.send(message("m-1"));
    b.send(message("m-2"));
    let Broker { tx, log, .. } = b;
    drop(tx);
    let r = within(built.run()).await.unwrap();
    assert_eq!(
        r,
        report(|r| {
            r.received = 2;
            r.acked = 2;
        })
    );
    assert_eq!(log.acks(), 2);
}
