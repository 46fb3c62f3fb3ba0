//! A RabbitMQ work queue with postbox: a topic exchange, two queues bound by
//! pattern, two competing workers on one of them, retries through the delay
//! tiers and a dead-letter queue.
//!
//! ```sh
//! scripts/brokers.sh up && eval "$(scripts/brokers.sh env)"
//! cargo run --example rabbitmq_work_queue --features rabbitmq
//! ```

#[cfg(not(feature = "rabbitmq"))]
fn main() {
    eprintln!(
        "this example needs the `rabbitmq` feature: cargo run --example rabbitmq_work_queue --features rabbitmq"
    );
}

#[cfg(feature = "rabbitmq")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    example::run().await
}

#[cfg(feature = "rabbitmq")]
mod example {
    use std::time::Duration;

    use postbox::dlq::{DeadLetterMetadata, DeadLetterOps};
    use postbox::rabbitmq::{ExchangeKind, QueueSpec, RabbitBroker, RabbitConfig, Topology};
    use postbox::{
        handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, HandlerError, Publisher,
        RetryPolicy, SubscribeOptions,
    };

    pub(crate) async fn run() -> Result<(), Box<dyn std::error::Error>> {
        // AMQP_URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f (unset: an error naming it)
        let rabbit = RabbitBroker::connect(RabbitConfig::from_env()?).await?;
        println!("connected: {}", rabbit.health().await?.detail);

        // Topology (idempotent): a topic exchange; `work` gets every order
        // event (`order.#`), `audit` only the EU ones (`order.*.eu`).
        // Each quorum queue gets `<queue>.dlq` and an x-delivery-limit safety net.
        let run = std::process::id();
        let exchange = format!("shop-{run}");
        let (work, audit) = (format!("shop-{run}.work"), format!("shop-{run}.audit"));
        let topology = Topology::new()
            .exchange(&exchange, ExchangeKind::Topic)
            .queue(QueueSpec::quorum(&work))
            .queue(QueueSpec::quorum(&audit))
            .bind(&work, &exchange, "order.#")
            .bind(&audit, &exchange, "order.*.eu");
        rabbit.declare(&topology).await?;
        println!("exchange {exchange}: {work} <- order.#, {audit} <- order.*.eu");

        // The work handler: order 3 is poison (permanent -> DLQ right away),
        // order 2 fails on its first attempt (retried through a delay tier).
        let worker = |name: &'static str| {
            handler_fn(move |env: Envelope| async move {
                let body = String::from_utf8_lossy(&env.payload).to_string();
                if body.contains("\"order\":3") {
                    return Err(HandlerError::permanent("order 3 has no customer"));
                }
                if body.contains("\"order\":2") && env.attempt == 1 {
                    println!("  {name}: {body}: card declined, retry later (attempt 1)");
                    return Err(HandlerError::transient("card declined"));
                }
                println!(
                    "  {name}: {} {body} (attempt {})",
                    env.event_type, env.attempt
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            })
        };
        let policy = RetryPolicy::exponential(Duration::from_millis(500)).with_max_attempts(3);
        let mut workers = Vec::new();
        for name in ["worker-a", "worker-b"] {
            // Competing consumers: two subscriptions on one queue; prefetch =
            // the consumer's in-flight bound. The queue is declared above.
            let options = SubscribeOptions::new().prefetch(2).provision(false);
            let source = rabbit.subscribe(&work, options).await?;
            workers.push(
                Consumer::builder(source, worker(name))
                    .name(name)
                    .concurrency(2)
                    .retry_policy(policy.clone())
                    .dead_letter(DeadLetterRouter::new(rabbit.clone()))
                    .build()?
                    .spawn(),
            );
        }
        let auditor = Consumer::builder(
            rabbit
                .subscribe(&audit, SubscribeOptions::new().provision(false))
                .await?,
            handler_fn(|env: Envelope| async move {
                println!(
                    "  audit: {} {}",
                    env.event_type,
                    String::from_utf8_lossy(&env.payload)
                );
                Ok(())
            }),
        )
        .name("audit")
        .dead_letter(DeadLetterRouter::new(rabbit.clone()))
        .build()?
        .spawn();

        // Publish through the exchange with explicit routing keys; confirms pipelined.
        for order in 1..=6 {
            let region = if order % 2 == 0 { "eu" } else { "us" };
            let env = Envelope::json("order.placed", &serde_json::json!({ "order": order }))?;
            rabbit
                .publish(&format!("exchange:{exchange}/order.placed.{region}"), env)
                .await?;
        }
        println!("published 6 orders");

        let dlq = postbox::dlq::default_destination(&work);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while rabbit.count(&dlq).await? < 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await; // let the retry of order 2 finish
        for w in workers {
            println!("{:?}", w.shutdown().await?);
        }
        auditor.shutdown().await?;

        for env in rabbit.peek(&dlq, 10).await? {
            if let Some(meta) = DeadLetterMetadata::read(&env) {
                println!(
                    "dead letter {}: reason {}, error {:?}, attempts {}, origin {}",
                    env.id,
                    meta.reason.as_str(),
                    meta.error,
                    meta.attempts,
                    meta.origin.destination
                );
            }
        }
        println!(
            "{work}: {:?}; DLQ depth: {}",
            rabbit.backlog(&work, None).await?,
            rabbit.count(&dlq).await?
        );
        // Waits for outstanding confirms, then closes the connection.
        rabbit.close().await?;
        Ok(())
    }
}
