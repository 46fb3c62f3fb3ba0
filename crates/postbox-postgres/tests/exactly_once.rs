//! Exactly-once *effect*, end to end: producer → outbox → relays → broker →
//! consumer with the transactional Postgres idempotency variant → a table.
//!
//! 20,000 orders are written through the outbox; consumers apply each order
//! as a row of `applied` (a table *without* a unique constraint, so a double
//! apply would show). While the work runs, the consumer is killed several
//! times at random points and restarted, and relays are killed too (a relay
//! killed between the broker's confirmation and its commit republishes
//! rows: duplicates on the wire the consumer must absorb). At the end
//! `applied` holds exactly 20,000 rows, each order once, and the outbox and
//! the queue are empty.
//!
//! **How the kill is done.** The memory broker lives inside the test process,
//! so a consumer in a child process could not reach it. The in-process
//! analogue of SIGKILL is used: the consumer runs on its own task, which is
//! aborted (`JoinHandle::abort`) at a random moment. Everything the consumer
//! had in flight is dropped mid-step exactly as a killed process would leave
//! it: unsettled deliveries go back to the queue (redelivered), open
//! transactions are rolled back by the server, nothing runs to a graceful
//! end. Real brokers can add a child-process SIGKILL variant through the
//! [`Broker`] trait below.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect, count, drop_schema, exec, Counting, Effect};
use postbox_core::{
    CancellationToken, Consumer, DeadLetterRouter, Envelope, Publisher, ResultExt, RetryPolicy,
    Source,
};
use postbox_memory::MemoryBroker;
use postbox_postgres::{tx_handler_fn, Outbox, Postgres, SentRows, TransactionalLayer};

const ORDERS: usize = 20_000;
const CUSTOMERS: usize = 64;
const CONSUMER_KILLS: usize = 6;
const RELAY_KILLS: usize = 3;
const DESTINATION: &str = "orders";

/// What the scenario needs from a broker adapter.
trait Broker: Send + Sync + 'static {
    type Source: Source + 'static;
    fn name(&self) -> &'static str;
    /// A publisher for the relays.
    fn publisher(&self) -> Arc<dyn Publisher>;
    /// A fresh consumer of `DESTINATION` (a restarted consumer process).
    fn source(&self) -> Self::Source;
    /// Whether nothing is left to deliver (ready, delayed or unacked).
    fn drained(&self) -> bool;
    /// Messages dead-lettered (must stay 0).
    fn dead_lettered(&self) -> usize;
}

struct Memory(MemoryBroker);

impl Broker for Memory {
    type Source = postbox_memory::MemorySource;
    fn name(&self) -> &'static str {
        "memory"
    }
    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.0.clone())
    }
    fn source(&self) -> Self::Source {
        self.0.subscribe(DESTINATION)
    }
    fn drained(&self) -> bool {
        self.0.depth(DESTINATION) == 0
            && self.0.delayed(DESTINATION) == 0
            && self.0.unacked(DESTINATION) == 0
    }
    fn dead_lettered(&self) -> usize {
        self.0.depth(&format!("{DESTINATION}.dlq"))
    }
}

fn spawn_consumer<B: Broker>(
    broker: &B,
    pg: &Postgres,
    runs: Arc<AtomicU64>,
    deliveries: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let insert = format!(
        "INSERT INTO \"{}\".applied (order_id, customer) VALUES ($1, $2)",
        pg.schema()
    );
    let handler = TransactionalLayer::new(pg)
        .lock_timeout(Some(Duration::from_secs(2)))
        .wrap(tx_handler_fn(move |env, tx| {
            let insert = insert.clone();
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::Relaxed);
                let order: serde_json::Value = env.decode_json().permanent()?;
                let id = order["order"].as_i64().unwrap();
                let customer = env.key.clone().unwrap_or_default();
                tx.execute(&insert, &[&id, &customer]).await.transient()?;
                Ok(())
            })
        }));
    let handler = Counting {
        inner: handler,
        deliveries,
    };
    let consumer = Consumer::builder(broker.source(), handler)
        .dead_letter(DeadLetterRouter::new(broker.publisher()))
        .concurrency(12)
        .retry_policy(
            RetryPolicy::exponential(Duration::from_millis(10))
                .with_max_delay(Duration::from_millis(500))
                .with_max_attempts(1000),
        )
        .build()
        .unwrap();
    tokio::spawn(async move {
        let _ = consumer.run().await;
    })
}

async fn exactly_once_effect<B: Broker>(broker: B, test: &str) {
    let Some(pg) = connect(test, 40).await else {
        return;
    };
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    exec(
        &pg,
        "CREATE TABLE {s}.applied (order_id bigint NOT NULL, customer text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await;
    let outbox = Outbox::new(&pg);
    let started = Instant::now();

    // Producer: orders in transactions of 250, concurrently with everything else.
    let producer = {
        let (pg, outbox) = (pg.clone(), outbox.clone());
        tokio::spawn(async move {
            let mut client = pg.client().await.unwrap();
            for chunk in (0..ORDERS).collect::<Vec<_>>().chunks(250) {
                let tx = client.transaction().await.unwrap();
                for &i in chunk {
                    let env = Envelope::builder("order.placed")
                        .key(format!("customer-{}", i % CUSTOMERS))
                        .json(&serde_json::json!({ "order": i }))
                        .unwrap()
                        .build();
                    outbox.enqueue(&tx, DESTINATION, &env).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
        })
    };

    // Two relays; relays are killed now and then as well.
    let stop = CancellationToken::new();
    let publisher = broker.publisher();
    let new_relay = |stop: &CancellationToken| {
        outbox
            .relay(publisher.clone())
            .batch_size(200)
            .sent_rows(SentRows::Delete)
            .poll_interval(Duration::from_millis(100))
            .backoff(Duration::from_millis(20), Duration::from_millis(500))
            .spawn(stop.clone())
    };
    let mut relays = vec![new_relay(&stop), new_relay(&stop)];

    // Consumers: killed at random points, restarted.
    let runs = Arc::new(AtomicU64::new(0));
    let deliveries = Arc::new(AtomicU64::new(0));
    let mut consumer_kills = 0;
    let mut relay_kills = 0;
    for kill in 0..CONSUMER_KILLS {
        let consumer = spawn_consumer(&broker, &pg, runs.clone(), deliveries.clone());
        tokio::time::sleep(Duration::from_millis(rng.u64(1000..5000))).await;
        consumer.abort(); // SIGKILL analogue: in-flight work dropped mid-step
        let _ = consumer.await;
        consumer_kills += 1;
        if kill % 2 == 0 && relay_kills < RELAY_KILLS {
            let i = rng.usize(..relays.len());
            relays[i].abort();
            relays[i] = new_relay(&stop);
            relay_kills += 1;
        }
    }
    let applied_at_last_kill = count(&pg, "SELECT count(*) FROM {s}.applied").await;

    // The last consumer runs to the end.
    let consumer = spawn_consumer(&broker, &pg, runs.clone(), deliveries.clone());
    producer.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let applied = count(&pg, "SELECT count(DISTINCT order_id) FROM {s}.applied").await;
        let pending = count(&pg, "SELECT count(*) FROM {s}.postbox_outbox").await;
        if applied == ORDERS as i64 && pending == 0 && broker.drained() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done: {applied} orders applied, {pending} outbox rows left, drained: {} (seed {seed})",
            broker.drained()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let anything still in flight settle, then stop everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.abort();
    stop.cancel();
    for r in relays {
        let _ = r.await;
    }

    let effect = Effect::read(&pg, ORDERS).await;
    eprintln!(
        "exactly-once effect [{}]: {ORDERS} orders, consumer killed {consumer_kills}x ({applied_at_last_kill} applied before the last kill), relays killed {relay_kills}x, deliveries {} (redeliveries and wire duplicates included), handler runs {} (incl. rolled back), {effect}, {:.1}s, seed {seed}",
        broker.name(),
        deliveries.load(Ordering::Relaxed),
        runs.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    effect.assert_exactly_once(ORDERS);
    assert!(broker.drained(), "nothing left on the broker");
    assert_eq!(broker.dead_lettered(), 0, "nothing dead-lettered");
    assert_eq!(consumer_kills, CONSUMER_KILLS);
    drop_schema(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_effect_memory_with_consumer_kills() {
    let broker = MemoryBroker::new();
    broker.declare_queue(DESTINATION);
    exactly_once_effect(Memory(broker), "exactly_once_memory").await;
}
