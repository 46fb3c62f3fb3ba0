//! The postbox side: `MemoryBroker` publish through the `Publisher` trait →
//! the `Consumer` runtime → a handler doing the same decode → ack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use postbox_core::{
    AnyBroker, Broker, Consumer, DeadLetterRouter, Envelope, Handler, HandlerResult, Publisher,
    RunReport, SubscribeOptions,
};
use postbox_memory::MemoryBroker;
use tokio::sync::{Notify, Semaphore};

use crate::workload;

/// The in-flight window is refilled in steps of this many messages, so the
/// window costs the postbox side one semaphore operation per 256 messages (the
/// raw side's bounded channel pays one per message).
pub(crate) const CREDIT_STEP: u64 = 256;

/// The event type of every benchmark message.
pub(crate) const EVENT_TYPE: &str = "bench.order";

/// The handler: decode, count, give the producer window credit back.
struct BenchHandler {
    handled: AtomicU64,
    expected: u64,
    credits: Arc<Semaphore>,
    done: Arc<Notify>,
}

impl Handler for BenchHandler {
    async fn handle(&self, envelope: &Envelope) -> HandlerResult {
        workload::handle(&envelope.payload);
        let handled = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if handled.is_multiple_of(CREDIT_STEP) {
            self.credits.add_permits(CREDIT_STEP as usize);
        }
        if handled == self.expected {
            self.done.notify_one();
        }
        Ok(())
    }
}

/// One postbox round.
pub(crate) struct Round<'a> {
    pub(crate) broker: &'a MemoryBroker,
    /// A queue name not used before.
    pub(crate) queue: String,
    pub(crate) messages: u64,
    pub(crate) payload: &'a Bytes,
    pub(crate) window: usize,
    pub(crate) concurrency: usize,
    /// Through the type-erased handle `postbox::connect` returns
    /// (`AnyBroker`, boxed source and deliveries) instead of the concrete types.
    pub(crate) erased: bool,
}

impl Round<'_> {
    /// Publishes `messages` envelopes and waits until the consumer acked them
    /// all; returns the time from the first publish to the last ack.
    pub(crate) async fn run(self) -> (Duration, RunReport) {
        let credits = Arc::new(Semaphore::new(self.window));
        let done = Arc::new(Notify::new());
        let handler = BenchHandler {
            handled: AtomicU64::new(0),
            expected: self.messages,
            credits: credits.clone(),
            done: done.clone(),
        };
        // The consumer is attached before the first publish.
        let consumer = if self.erased {
            let any = AnyBroker::new(self.broker.clone());
            let source = any
                .subscribe(&self.queue, SubscribeOptions::new())
                .await
                .expect("subscribe");
            Consumer::builder(source, handler)
                .concurrency(self.concurrency)
                .dead_letter(DeadLetterRouter::new(any))
                .build()
                .expect("consumer config")
                .spawn()
        } else {
            Consumer::builder(self.broker.subscribe(&self.queue), handler)
                .concurrency(self.concurrency)
                .dead_letter(DeadLetterRouter::new(self.broker.clone()))
                .build()
                .expect("consumer config")
                .spawn()
        };
        let concrete = self.broker.clone();
        let erased = self.erased.then(|| AnyBroker::new(self.broker.clone()));
        let payload = self.payload.clone();
        let queue = self.queue;
        let n = self.messages;
        let started = Instant::now();
        let producer = tokio::spawn(async move {
            let mut sent = 0;
            while sent < n {
                let step = CREDIT_STEP.min(n - sent);
                credits
                    .acquire_many(step as u32)
                    .await
                    .expect("window semaphore")
                    .forget();
                for _ in 0..step {
                    match &erased {
                        Some(any) => publish(any, &queue, &payload).await,
                        None => publish(&concrete, &queue, &payload).await,
                    }
                }
                sent += step;
            }
        });
        producer.await.expect("postbox producer");
        done.notified().await;
        let report = consumer.shutdown().await.expect("consumer shutdown");
        let elapsed = started.elapsed();
        assert_eq!(report.acked, n, "postbox: every message acked: {report:?}");
        (elapsed, report)
    }
}

/// One publish, the way users write it: a new envelope, through the trait.
pub(crate) async fn publish<P: Publisher>(publisher: &P, queue: &str, payload: &Bytes) {
    let envelope = Envelope::new(EVENT_TYPE, payload.clone());
    if let Err(e) = publisher.publish(queue, envelope).await {
        panic!("publish failed: {}", e.error);
    }
}
