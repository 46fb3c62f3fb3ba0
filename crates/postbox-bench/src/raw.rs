//! The raw side: what a careful engineer writes by hand with tokio alone.
//!
//! A producer task sends a message struct carrying the `Bytes` payload through
//! a bounded `tokio::sync::mpsc` channel (the in-flight window) to a consumer
//! task, which decodes it (the same black-boxed decode as the postbox handler)
//! and then acks it by bumping an ack counter the producer side can read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::workload;

/// The hand-written message: a sequence number and the payload.
struct RawMessage {
    id: u64,
    payload: Bytes,
}

/// Sends `n` messages through the pipeline; returns the time from the first
/// send to the last ack.
pub(crate) async fn round(n: u64, payload: &Bytes, window: usize) -> Duration {
    let (tx, mut rx) = mpsc::channel::<RawMessage>(window);
    let acked = Arc::new(AtomicU64::new(0));
    // The consumer is attached before the first message is sent.
    let consumer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                std::hint::black_box(msg.id);
                workload::handle(&msg.payload);
                // Ack after the handler, as postbox does.
                acked.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let payload = payload.clone();
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for id in 0..n {
            let msg = RawMessage {
                id,
                payload: payload.clone(),
            };
            if tx.send(msg).await.is_err() {
                panic!("raw consumer stopped early");
            }
        }
    });
    producer.await.expect("raw producer");
    consumer.await.expect("raw consumer");
    let elapsed = started.elapsed();
    assert_eq!(acked.load(Ordering::Relaxed), n, "raw: every message acked");
    elapsed
}
