//! The transactional outbox and an exactly-once effect, on PostgreSQL and the
//! in-memory broker:
//!
//! 1. each order and its `order.placed` event are written in ONE database
//!    transaction (the event exists if and only if the order does);
//! 2. a relay publishes the events, in order per customer;
//! 3. a consumer ships each order, marking the message processed in the same
//!    transaction as the shipment, so a redelivered duplicate ships nothing.
//!
//! Needs PostgreSQL (`scripts/brokers.sh up`; `DATABASE_URL`, default
//! `postgres://postgres:postgres@127.0.0.1:5432/postbox`). Run it with
//! `cargo run --example outbox_orders --features postgres`.

use std::sync::Arc;
use std::time::Duration;

use postbox::memory::MemoryBroker;
use postbox::postgres::{
    tx_handler_fn, Outbox, Postgres, PostgresConfig, SentRows, TransactionalLayer,
};
use postbox::{
    CancellationToken, Consumer, DeadLetterRouter, Envelope, Publisher, ResultExt, TypedEnvelope,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: i64,
    customer: String,
    amount_cents: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postbox".into());
    let pg = Postgres::connect(PostgresConfig::from_url(&url)?.schema("outbox_example")).await?;
    pg.migrate().await?; // postbox's own tables; idempotent
    pg.client()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS outbox_example.orders (
                 id bigint PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS outbox_example.shipments (
                 order_id bigint NOT NULL, shipped_at timestamptz NOT NULL DEFAULT now());
             TRUNCATE outbox_example.orders, outbox_example.shipments;",
        )
        .await?;

    // 1. Place orders: the row and the event commit together.
    let outbox = Outbox::new(&pg);
    let mut client = pg.client().await?;
    let mut first = None;
    for order in 1..=5 {
        let event = OrderPlaced {
            order,
            customer: format!("customer-{}", order % 2),
            amount_cents: 1000 * order,
        };
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO outbox_example.orders (id, customer, amount_cents) VALUES ($1, $2, $3)",
            &[&event.order, &event.customer, &event.amount_cents],
        )
        .await?;
        let envelope = Envelope::builder("order.placed")
            .source("shop")
            .key(event.customer.clone()) // per-customer order on the wire
            .json(&event)?
            .build();
        outbox.enqueue(&tx, "orders", &envelope).await?;
        tx.commit().await?;
        first.get_or_insert(envelope);
    }
    println!(
        "placed 5 orders; outbox backlog: {:?}",
        outbox.backlog().await?
    );

    // 2. The relay publishes what was committed.
    let broker = MemoryBroker::new();
    broker.declare_queue("orders");
    let stop = CancellationToken::new();
    let relay = outbox
        .relay(Arc::new(broker.clone()))
        .sent_rows(SentRows::Delete)
        .spawn(stop.clone());

    // 3. An idempotent consumer: shipment and processed mark in one transaction.
    let handler = TransactionalLayer::new(&pg).wrap(tx_handler_fn(|env, tx| {
        Box::pin(async move {
            let order: TypedEnvelope<OrderPlaced> = env.clone().into_typed().permanent()?;
            tx.execute(
                "INSERT INTO outbox_example.shipments (order_id) VALUES ($1)",
                &[&order.data.order],
            )
            .await
            .transient()?;
            println!(
                "shipped order {} for {}",
                order.data.order, order.data.customer
            );
            Ok(())
        })
    }));
    let consumer = Consumer::builder(broker.subscribe("orders"), handler)
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()?
        .spawn();

    // Wait for the five shipments, then deliver a duplicate of one event.
    let shipped = |pg: Postgres| async move {
        let row = pg
            .client()
            .await?
            .query_one("SELECT count(*) FROM outbox_example.shipments", &[])
            .await?;
        Ok::<i64, Box<dyn std::error::Error>>(row.get(0))
    };
    while shipped(pg.clone()).await? < 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The broker redelivers order 1 (at-least-once): nothing is shipped twice.
    broker
        .publish("orders", first.expect("an order was placed"))
        .await?;
    while broker.depth("orders") > 0 || broker.unacked("orders") > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    relay.await??;
    let report = consumer.shutdown().await?;
    println!(
        "done: {} shipments for 5 orders, {} messages acked, outbox backlog {}",
        shipped(pg.clone()).await?,
        report.acked,
        outbox.backlog().await?.pending
    );
    Ok(())
}
