//! postbox in one minute, on the in-memory broker (no set-up needed):
//! a transient failure that succeeds on retry, a poison message that lands in
//! the dead-letter queue with its metadata, and a duplicate that is skipped.
//!
//! Run it with `cargo run --example quickstart`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postbox::dlq::{DeadLetterMetadata, DeadLetterOps};
use postbox::memory::MemoryBroker;
use postbox::{
    typed, Consumer, DeadLetterRouter, Envelope, HandlerBuilder, HandlerError, IdempotencyLayer,
    MemoryIdempotencyStore, Publisher, RetryPolicy, TypedEnvelope,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u32,
    amount_cents: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();

    // A handler: order 2 hits a flaky dependency once; everything else works.
    let flaky_seen = Arc::new(Mutex::new(HashSet::new()));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let (flaky_seen, handled) = (flaky_seen.clone(), handled.clone());
        typed(move |msg: TypedEnvelope<OrderPlaced>| {
            let (flaky_seen, handled) = (flaky_seen.clone(), handled.clone());
            async move {
                let order = msg.data.order;
                if order == 2 && flaky_seen.lock().unwrap().insert(order) {
                    println!(
                        "  order {order}: payment service timed out (attempt {}) -> retry",
                        msg.attempt
                    );
                    return Err(HandlerError::transient("payment service timed out"));
                }
                println!(
                    "  order {order}: charged {} cents (attempt {})",
                    msg.data.amount_cents, msg.attempt
                );
                handled.lock().unwrap().push(order);
                Ok(())
            }
        })
    };

    // Idempotency in front of the handler: a duplicate id is acked, not re-run.
    let handler = HandlerBuilder::new()
        .timeout(Duration::from_secs(5))
        .layer(IdempotencyLayer::new(Arc::new(
            MemoryIdempotencyStore::new(10_000),
        )))
        .handler(handler);

    let consumer = Consumer::builder(broker.subscribe("orders"), handler)
        .name("billing")
        .concurrency(4)
        .retry_policy(RetryPolicy::exponential(Duration::from_millis(50)).with_max_attempts(3))
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()?
        .spawn();

    println!("publishing 5 orders, 1 duplicate and 1 poison message to `orders`");
    let mut first = None;
    for order in 1..=5 {
        let env = Envelope::builder("order.placed")
            .source("shop")
            .key(format!("customer-{}", order % 2))
            .json(&OrderPlaced {
                order,
                amount_cents: 1000 * u64::from(order),
            })?
            .build();
        first.get_or_insert_with(|| env.clone());
        broker.publish("orders", env).await?;
    }
    // The same message again (same id), as at-least-once delivery may do.
    broker.publish("orders", first.expect("published")).await?;
    // A message whose payload is not an order: it can never succeed.
    broker
        .publish(
            "orders",
            Envelope::builder("order.placed")
                .payload("{\"order\": \"oops\"")
                .build(),
        )
        .await?;

    // Wait until the five orders are handled and the poison message is dead-lettered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (handled.lock().unwrap().len() < 5 || broker.count("orders.dlq").await? < 1)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = consumer.shutdown().await?;

    let dead = broker.peek("orders.dlq", 10).await?;
    let mut orders = handled.lock().unwrap().clone();
    orders.sort_unstable();
    println!();
    println!("summary");
    println!("  handled orders      : {orders:?}");
    println!(
        "  deliveries          : {} received, {} acked (1 duplicate skipped), {} retried, {} dead-lettered",
        report.received, report.acked, report.retried, report.dead_lettered
    );
    for env in &dead {
        let meta = DeadLetterMetadata::read(env).ok_or("dead letter without metadata")?;
        println!(
            "  dead letter {}: reason={} attempts={} origin={} consumer={}\n    error: {}",
            env.id, meta.reason, meta.attempts, meta.origin.destination, meta.consumer, meta.error
        );
    }
    let ok = orders == vec![1, 2, 3, 4, 5]
        && dead.len() == 1
        && report.retried >= 1
        && report.acked == 6;
    if !ok {
        return Err(format!("unexpected outcome: {report:?}").into());
    }
    println!("  everything accounted for: nothing lost, nothing handled twice");
    Ok(())
}
