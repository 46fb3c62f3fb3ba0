//! One service, any broker: the code below names no broker. The URL in
//! `POSTBOX_URL` picks it:
//!
//! ```sh
//! POSTBOX_URL=memory:// cargo run --example any_broker
//! POSTBOX_URL=kafka://127.0.0.1:9092 cargo run --example any_broker --features kafka
//! POSTBOX_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example any_broker --features rabbitmq
//! POSTBOX_URL='sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1' cargo run --example any_broker --features sqs
//! ```
//!
//! It publishes 20 orders (and a duplicate of one), consumes them with
//! retries, a dead-letter queue and idempotency, then inspects the DLQ (count,
//! peek), "fixes the bug" and replays it. It exits 0 only if every order was
//! charged exactly once and the DLQ ends empty.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postbox::dlq::{DeadLetterMetadata, DeadLetterOps};
use postbox::{
    typed, AnyBroker, Broker, Consumer, DeadLetterRouter, Envelope, HandlerBuilder, HandlerError,
    IdempotencyLayer, MemoryIdempotencyStore, Publisher, RetryPolicy, RunReport, SubscribeOptions,
    TypedEnvelope,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u32,
    amount_cents: u64,
}

const ORDERS: u32 = 20;
/// Orders the handler refuses until the "fix" (dead-lettered as permanent).
const POISON: [u32; 2] = [7, 13];
/// An order whose first attempt hits a transient failure (retried).
const FLAKY: u32 = 3;
const GROUP: &str = "billing";
const DEADLINE: Duration = Duration::from_secs(120);

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the service did: how often each order was charged.
#[derive(Default)]
struct Ledger {
    charged: Mutex<BTreeMap<u32, u32>>,
    flaky_failed: AtomicBool,
    fixed: AtomicBool,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let broker = postbox::connect_from_env().await?;
    let health = broker.health().await?;
    println!("connected: {} ({})", health.system, health.detail);

    // A fresh destination per run: brokers keep what earlier runs left.
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let orders = format!("any-broker-orders-{nanos}");
    let options = SubscribeOptions::group(GROUP);
    broker.provision(&orders, &options).await?;

    // Publish the orders, and one of them twice (same id: a duplicate).
    let mut batch = Vec::new();
    for order in 1..=ORDERS {
        let data = OrderPlaced {
            order,
            amount_cents: 100 * u64::from(order),
        };
        batch.push(
            Envelope::builder("order.placed")
                .key(format!("customer-{}", order % 4))
                .json(&data)?
                .build(),
        );
    }
    let duplicate = batch[0].clone();
    let report = broker.publish_batch(&orders, batch).await;
    if !report.is_success() {
        return Err(format!(
            "{} of {ORDERS} orders not published",
            ORDERS as usize - report.succeeded()
        )
        .into());
    }
    broker.publish(&orders, duplicate).await?;
    println!("published {ORDERS} orders and one duplicate to {orders}");

    // Consume until every good order is charged and the poison ones are dead.
    let ledger = Arc::new(Ledger::default());
    let (report, dlq) = consume(&broker, &orders, &options, &ledger, |l| {
        l.charged.lock().unwrap().len() == (ORDERS as usize - POISON.len())
    })
    .await?;
    println!("first run: {report:?}");
    wait_for(|| async { Ok(broker.count(&dlq).await? == POISON.len() as u64) }).await?;

    // An operator looks at the DLQ.
    let dead = broker.peek(&dlq, 10).await?;
    println!("{dlq} holds {} messages:", broker.count(&dlq).await?);
    for env in &dead {
        let meta = DeadLetterMetadata::read(env).ok_or("a dead letter without its metadata")?;
        println!(
            "  {} {} — reason {}, attempts {}, error {:?}",
            env.id,
            String::from_utf8_lossy(&env.payload),
            meta.reason.as_str(),
            meta.attempts,
            meta.error
        );
    }
    if dead.len() != POISON.len() {
        return Err(format!(
            "peek showed {} dead letters, expected {}",
            dead.len(),
            POISON.len()
        )
        .into());
    }

    // The bug is fixed: replay the DLQ (ids kept) and consume again.
    ledger.fixed.store(true, AtomicOrdering::SeqCst);
    let replayed = broker.replay(&dlq, &|_: &Envelope| true, 100).await?;
    println!("replayed {} from {dlq}", replayed.replayed);
    let (report, _) = consume(&broker, &orders, &options, &ledger, |l| {
        l.charged.lock().unwrap().len() == ORDERS as usize
    })
    .await?;
    println!("second run: {report:?}");
    wait_for(|| async { Ok(broker.count(&dlq).await? == 0) }).await?;

    let charged = ledger.charged.lock().unwrap().clone();
    let twice: Vec<_> = charged.iter().filter(|(_, n)| **n != 1).collect();
    if charged.len() != ORDERS as usize || !twice.is_empty() {
        return Err(
            format!("charged {charged:?}: every order must be charged exactly once").into(),
        );
    }
    if !ledger.flaky_failed.load(AtomicOrdering::SeqCst) {
        return Err("the transient failure never happened".into());
    }
    let backlog = broker.backlog(&orders, Some(GROUP)).await?;
    println!(
        "backlog of {orders} for {GROUP}: {} waiting",
        backlog.waiting
    );
    broker.close().await?;
    println!(
        "ok: {ORDERS} orders charged exactly once on {}",
        health.system
    );
    Ok(())
}

/// Runs a consumer until `done(ledger)`, then shuts it down; returns its
/// report and the dead-letter queue of the subscription.
async fn consume(
    broker: &AnyBroker,
    orders: &str,
    options: &SubscribeOptions,
    ledger: &Arc<Ledger>,
    done: impl Fn(&Ledger) -> bool,
) -> Result<(RunReport, String), Error> {
    let source = broker.subscribe(orders, options.clone()).await?;
    let dlq = postbox::dlq::default_destination(source.destination());
    let handler = {
        let ledger = ledger.clone();
        typed(move |msg: TypedEnvelope<OrderPlaced>| {
            let ledger = ledger.clone();
            async move {
                let order = msg.data.order;
                if POISON.contains(&order) && !ledger.fixed.load(AtomicOrdering::SeqCst) {
                    return Err(HandlerError::permanent(format!(
                        "order {order}: unknown customer"
                    )));
                }
                if order == FLAKY && !ledger.flaky_failed.swap(true, AtomicOrdering::SeqCst) {
                    return Err(HandlerError::transient("payment service timed out"));
                }
                *ledger.charged.lock().unwrap().entry(order).or_insert(0) += 1;
                Ok(())
            }
        })
    };
    // One idempotency store for both runs: a replayed id that was already
    // charged would be skipped (the dead ones never were).
    static STORE: std::sync::OnceLock<Arc<MemoryIdempotencyStore>> = std::sync::OnceLock::new();
    let store = STORE.get_or_init(|| Arc::new(MemoryIdempotencyStore::new(10_000)));
    let handler = HandlerBuilder::new()
        .timeout(Duration::from_secs(10))
        .layer(IdempotencyLayer::new(store.clone()))
        .handler(handler);
    let running = Consumer::builder(source, handler)
        .concurrency(4)
        .retry_policy(RetryPolicy::exponential(Duration::from_millis(200)).with_max_attempts(4))
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()?
        .spawn();
    let waited = wait_for(|| async { Ok(done(ledger)) }).await;
    let report = running.shutdown().await?;
    waited?;
    Ok((report, dlq))
}

/// Polls `check` every 100 ms until it is true, or fails after the deadline.
async fn wait_for<F, Fut>(check: F) -> Result<(), Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    let start = Instant::now();
    while !check().await? {
        if start.elapsed() > DEADLINE {
            return Err(format!("timed out after {DEADLINE:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
