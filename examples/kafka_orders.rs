//! Orders on Kafka with postbox: a producer, and an idempotent consumer with
//! retries through the delay-tier retry topics and a dead-letter topic.
//!
//! * the topic, its retry tiers (`<topic>.retry.<tier>`) and its DLQ
//!   (`<topic>.dlq`) are created at startup (opt-in provisioning);
//! * one order is published twice: the idempotency layer runs it once;
//! * one order fails transiently on its first attempt: it is republished to
//!   a retry topic, its partition there is paused until due, then it succeeds;
//! * one order is poison: it is dead-lettered with the bounded metadata, and
//!   the DLQ is inspected through the broker handle (count, peek).
//!
//! ```sh
//! scripts/brokers.sh up && eval "$(scripts/brokers.sh env)"   # KAFKA_BOOTSTRAP_SERVERS
//! cargo run --example kafka_orders --features kafka
//! ```

#[cfg(not(feature = "kafka"))]
fn main() {
    eprintln!(
        "this example needs the `kafka` feature: cargo run --example kafka_orders --features kafka"
    );
}

#[cfg(feature = "kafka")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    example::run().await
}

#[cfg(feature = "kafka")]
mod example {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use postbox::dlq::{DeadLetterMetadata, DeadLetterOps};
    use postbox::kafka::{KafkaBroker, KafkaConfig, TopologySpec};
    use postbox::{
        handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, HandlerBuilder, HandlerError,
        IdempotencyLayer, MemoryIdempotencyStore, Publisher, RetryPolicy, SubscribeOptions,
    };

    pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error>> {
        // KAFKA_BOOTSTRAP_SERVERS, or the local broker of scripts/brokers.sh.
        let config = KafkaConfig::from_env()
            .unwrap_or_else(|_| KafkaConfig::new("127.0.0.1:9092"))
            // What subscribing provisions: the topic, its retry tiers, its DLQ.
            .topology(TopologySpec::new(3, 1))
            // A quick first group join (the default is 45 s of session time-out).
            .set("session.timeout.ms", "6000");
        let topic = format!(
            "orders-example-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        );
        let broker = KafkaBroker::connect(config).await?;
        println!("broker: {:?}", broker.health().await?);

        // The consumer: provisions the topology, then subscribes to the topic
        // and its retry tiers in consumer group "shipping".
        let source = broker
            .subscribe(&topic, SubscribeOptions::group("shipping"))
            .await?;

        let shipped = Arc::new(Mutex::new(HashSet::new()));
        let flaky_seen = Arc::new(Mutex::new(false));
        let handler = {
            let shipped = shipped.clone();
            handler_fn(move |env: Envelope| {
                let shipped = shipped.clone();
                let flaky_seen = flaky_seen.clone();
                async move {
                    let order = env.subject.clone().unwrap_or_default();
                    if order == "order-13" {
                        return Err(HandlerError::permanent("order 13 has no address"));
                    }
                    if order == "order-7"
                        && !std::mem::replace(&mut *flaky_seen.lock().unwrap(), true)
                    {
                        return Err(HandlerError::transient("the warehouse API timed out"));
                    }
                    println!("shipping {order} (attempt {})", env.attempt);
                    assert!(shipped.lock().unwrap().insert(order), "shipped twice");
                    Ok(())
                }
            })
        };
        let handler = HandlerBuilder::new()
            .layer(IdempotencyLayer::new(Arc::new(
                MemoryIdempotencyStore::new(10_000),
            )))
            .handler(handler);
        let consumer = Consumer::builder(source, handler)
            .name("shipping")
            .concurrency(4)
            .retry_policy(
                RetryPolicy::exponential(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_attempts(4),
            )
            .dead_letter(DeadLetterRouter::new(broker.clone()))
            .build()?
            .spawn();

        // The producer: 15 orders keyed by customer (per-customer order is
        // per-partition order), one of them published twice.
        let mut orders = Vec::new();
        for n in 1..=15 {
            let env = Envelope::builder("order.placed")
                .source("shop")
                .subject(format!("order-{n}"))
                .key(format!("customer-{}", n % 4))
                .json(&serde_json::json!({ "order": n, "amount_cents": 1000 * n }))?
                .build();
            orders.push(env);
        }
        orders.push(orders[2].clone()); // a duplicate (same id)
        let report = broker.publish_batch(&topic, orders).await;
        println!("published {} of {}", report.succeeded(), report.len());

        // Wait until 14 orders shipped and one is in the DLQ.
        let dlq = format!("{topic}.dlq");
        let deadline = Instant::now() + Duration::from_secs(60);
        while shipped.lock().unwrap().len() < 14 || broker.count(&dlq).await? < 1 {
            if Instant::now() > deadline {
                return Err("timed out waiting for the orders".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Finishes in-flight handlers, commits, leaves the group.
        let report = consumer.shutdown().await?;
        println!("consumer: {report:?}");
        for dead in broker.peek(&dlq, 10).await? {
            let meta = DeadLetterMetadata::read(&dead).ok_or("missing DLQ metadata")?;
            println!(
                "dead letter {} ({:?}): {} after {} attempt(s), from {} partition {:?} offset {:?}",
                dead.subject.as_deref().unwrap_or("?"),
                meta.reason,
                meta.error,
                meta.attempts,
                meta.origin.destination,
                meta.origin.partition,
                meta.origin.offset,
            );
        }
        broker.close().await?;
        Ok(())
    }
}
