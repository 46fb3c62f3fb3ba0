//! SNS → SQS fan-out with postbox: one SNS topic, two subscribed queues (one
//! with a filter policy), consumers with retries and a dead-letter queue.
//!
//! Needs an SQS/SNS endpoint: AWS, or LocalStack/moto locally:
//!
//! ```sh
//! scripts/brokers.sh up && eval "$(scripts/brokers.sh env)"
//! cargo run --example sns_sqs_fanout --features sqs
//! ```

#[cfg(not(feature = "sqs"))]
fn main() {
    eprintln!(
        "this example needs the `sqs` feature: cargo run --example sns_sqs_fanout --features sqs"
    );
}

#[cfg(feature = "sqs")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    example::run().await
}

#[cfg(feature = "sqs")]
mod example {
    use std::time::Duration;

    use postbox::dlq::{DeadLetterMetadata, DeadLetterOps};
    use postbox::sqs::{SqsBroker, SqsConfig, SubscriptionSpec};
    use postbox::{
        handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, HandlerError, Publisher,
        RetryPolicy, Source, SubscribeOptions,
    };

    pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error>> {
        // The AWS default chain; AWS_ENDPOINT_URL points it at an emulator.
        // (`postbox::connect("sqs://")` gives the same broker, type-erased.)
        let config = SqsConfig::from_env()?.wait_time(Duration::from_secs(2));
        let broker = SqsBroker::connect(config).await?;
        broker.health().await?;

        // One SNS topic; each consumer group is a queue `<topic>-<group>`
        // with a DLQ and a redrive policy, subscribed to the topic with raw
        // delivery: `subscribe` declares all of it (idempotent).
        let run = std::process::id();
        let topic = format!("orders-{run}");
        let destination = format!("sns:{topic}");
        let billing = broker
            .subscribe(&destination, SubscribeOptions::group("billing"))
            .await?;
        let shipping = broker
            .subscribe(&destination, SubscribeOptions::group("shipping"))
            .await?;
        let billing_queue = billing.destination().to_string();
        // A filter policy is SNS-specific: the native topology API sets it.
        broker
            .declare_subscription(
                &SubscriptionSpec::new(&topic, shipping.destination())
                    .filter_policy(r#"{"type":["order.paid"]}"#),
            )
            .await?;
        println!(
            "topic {destination} -> queues {billing_queue} (all), {} (order.paid only)",
            shipping.destination()
        );

        // Billing: order 3 is poison (permanent failure -> DLQ), order 2 fails
        // once (retried through the visibility timeout).
        let billing_handler = handler_fn(|env: Envelope| async move {
            let body = String::from_utf8_lossy(&env.payload).to_string();
            if body.contains("\"order\":3") {
                return Err(HandlerError::permanent("order 3 has no customer"));
            }
            if body.contains("\"order\":2") && env.attempt == 1 {
                println!(
                    "  billing: {} {body}: card declined, retry (attempt 1)",
                    env.event_type
                );
                return Err(HandlerError::transient("card declined"));
            }
            println!(
                "  billing: {} {body} (attempt {})",
                env.event_type, env.attempt
            );
            Ok(())
        });
        let shipping_handler = handler_fn(|env: Envelope| async move {
            println!(
                "  shipping: {} {}",
                env.event_type,
                String::from_utf8_lossy(&env.payload)
            );
            Ok(())
        });
        let policy = RetryPolicy::exponential(Duration::from_millis(200)).with_max_attempts(3);
        let billing_consumer = Consumer::builder(billing, billing_handler)
            .name("billing")
            .retry_policy(policy.clone())
            .dead_letter(DeadLetterRouter::new(broker.clone()))
            .build()?
            .spawn();
        let shipping_consumer = Consumer::builder(shipping, shipping_handler)
            .name("shipping")
            .retry_policy(policy)
            .dead_letter(DeadLetterRouter::new(broker.clone()))
            .build()?
            .spawn();

        // Publish: SNS PublishBatch (chunks of 10), `type` as a filterable attribute.
        let events: Vec<Envelope> = (1..=3)
            .flat_map(|order| {
                [
                    Envelope::json("order.placed", &serde_json::json!({ "order": order })),
                    Envelope::json("order.paid", &serde_json::json!({ "order": order })),
                ]
            })
            .collect::<Result<_, _>>()?;
        let report = broker.publish_batch(&destination, events).await;
        println!(
            "published {} of {} events",
            report.succeeded(),
            report.len()
        );

        // Wait for the poison messages in billing's DLQ (`orders-<run>-billing.dlq`).
        let dlq = postbox::dlq::default_destination(&billing_queue);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while broker.count(&dlq).await? < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await; // let the retry of order 2 finish
        let billing_report = billing_consumer.shutdown().await?;
        let shipping_report = shipping_consumer.shutdown().await?;
        println!("billing: {billing_report:?}");
        println!("shipping: {shipping_report:?}");

        for env in broker.peek(&dlq, 10).await? {
            if let Some(meta) = DeadLetterMetadata::read(&env) {
                println!(
                    "dead letter {} ({}): reason {}, error {:?}, attempts {}, origin {}",
                    env.id,
                    env.event_type,
                    meta.reason.as_str(),
                    meta.error,
                    meta.attempts,
                    meta.origin.destination
                );
            }
        }
        println!("purged {} dead letters", broker.purge(&dlq).await?);
        broker.close().await?;
        Ok(())
    }
}
