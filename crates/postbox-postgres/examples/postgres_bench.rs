//! Throughput of the PostgreSQL idempotency store and of the outbox relay.
//!
//! ```text
//! cargo run --release -p postbox-postgres --example postgres_bench [-- --quick]
//! ```
//!
//! Prints, against `DATABASE_URL` (default the `scripts/brokers.sh` PostgreSQL),
//! in a schema of its own that it drops at the end:
//! - claims/s: `claim` of fresh keys by 1 and by 16 concurrent tasks, and the
//!   full `claim + complete` cycle (what the idempotency layer costs per message);
//! - transactional marks/s: the transactional variant with an empty handler;
//! - enqueue rows/s: `Outbox::enqueue` in transactions of 100;
//! - relay rows/s: pending rows published to the in-memory broker (so the
//!   number is the relay's own cost), one relay and two relays, marking or
//!   deleting sent rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postbox_core::{CancellationToken, Claim, Envelope, Handler, IdempotencyStore};
use postbox_memory::MemoryBroker;
use postbox_postgres::{
    tx_handler_fn, Outbox, Postgres, PostgresConfig, PostgresIdempotencyStore, SentRows,
    TransactionalLayer,
};

const LEASE: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: usize = if quick { 2_000 } else { 20_000 };
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postbox".into());
    let schema = format!("bench_{}", std::process::id());
    let pg = Postgres::connect(
        PostgresConfig::from_url(&url)?
            .schema(schema.clone())
            .pool_size(24),
    )
    .await?;
    pg.migrate().await?;
    println!(
        "postbox-postgres bench ({} build), {n} operations per line",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );

    let store = Arc::new(PostgresIdempotencyStore::new(&pg));
    // Warm-up: open every pooled connection (SCRAM authentication is slow in a
    // debug build) and prepare the statements, outside the measurements.
    run_parallel(240, 24, {
        let store = store.clone();
        move |i| {
            let store = store.clone();
            async move {
                store.claim(&format!("warm-{i}"), LEASE).await.unwrap();
            }
        }
    })
    .await;
    for tasks in [1usize, 16] {
        let rate = run_parallel(n, tasks, {
            let store = store.clone();
            move |i| {
                let store = store.clone();
                async move {
                    let c = store
                        .claim(&format!("claim-{tasks}-{i}"), LEASE)
                        .await
                        .unwrap();
                    assert!(matches!(c, Claim::Acquired(_)));
                }
            }
        })
        .await;
        println!("store claim (fresh keys), {tasks:>2} tasks:          {rate:>9.0} claims/s");
    }
    let rate = run_parallel(n, 16, {
        let store = store.clone();
        move |i| {
            let store = store.clone();
            async move {
                let Claim::Acquired(l) = store.claim(&format!("cycle-{i}"), LEASE).await.unwrap()
                else {
                    panic!("not acquired")
                };
                store.complete(&l, Duration::from_secs(3600)).await.unwrap();
            }
        }
    })
    .await;
    println!("store claim + complete, 16 tasks:         {rate:>9.0} messages/s");
    let rate = run_parallel(n, 16, {
        let store = store.clone();
        move |i| {
            let store = store.clone();
            async move {
                let c = store.claim(&format!("cycle-{i}"), LEASE).await.unwrap();
                assert_eq!(c, Claim::AlreadyDone);
            }
        }
    })
    .await;
    println!("store claim of a done key (duplicate), 16: {rate:>9.0} claims/s");

    let tx_handler = Arc::new(
        TransactionalLayer::new(&pg).wrap(tx_handler_fn(|_env, _tx| Box::pin(async { Ok(()) }))),
    );
    let rate = run_parallel(n, 16, move |_| {
        let h = tx_handler.clone();
        async move { h.handle(&Envelope::new("bench", "{}")).await.unwrap() }
    })
    .await;
    println!("transactional variant (empty handler), 16: {rate:>9.0} messages/s");

    let outbox = Outbox::new(&pg);
    for (relays, sent, many) in [
        (1usize, SentRows::Mark, false),
        (1, SentRows::Delete, true),
        (2, SentRows::Delete, true),
    ] {
        let started = Instant::now();
        let mut client = pg.client().await?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            let tx = client.transaction().await?;
            let envs: Vec<Envelope> = chunk
                .iter()
                .map(|i| {
                    Envelope::builder("order.placed")
                        .key(format!("customer-{}", i % 64))
                        .payload(format!("{{\"order\":{i}}}"))
                        .build()
                })
                .collect();
            if many {
                outbox.enqueue_many(&tx, "orders", &envs).await?;
            } else {
                for env in &envs {
                    outbox.enqueue(&tx, "orders", env).await?;
                }
            }
            tx.commit().await?;
        }
        let enqueue_rate = n as f64 / started.elapsed().as_secs_f64();
        let broker = MemoryBroker::new();
        let stop = CancellationToken::new();
        let started = Instant::now();
        let handles: Vec<_> = (0..relays)
            .map(|_| {
                outbox
                    .relay(Arc::new(broker.clone()))
                    .batch_size(500)
                    .sent_rows(sent)
                    .poll_interval(Duration::from_millis(20))
                    .spawn(stop.clone())
            })
            .collect();
        while broker.depth("orders") < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        stop.cancel();
        for h in handles {
            h.await??;
        }
        assert_eq!(outbox.backlog().await?.pending, 0);
        let how = if many { "enqueue_many" } else { "enqueue" };
        println!("outbox {how:<12} (tx of 100 rows):      {enqueue_rate:>9.0} rows/s");
        let what = format!("{relays} relay(s), {sent:?}");
        println!("outbox relay, {what:<20}:         {rate:>9.0} rows/s");
        client
            .batch_execute(&format!("TRUNCATE \"{schema}\".postbox_outbox"))
            .await?;
    }
    pg.client()
        .await?
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await?;
    Ok(())
}

/// Runs `op(0..n)` on `tasks` concurrent tasks; returns operations per second.
async fn run_parallel<F, Fut>(n: usize, tasks: usize, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    op(i).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}
