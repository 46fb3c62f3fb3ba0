//! postbox-postgres against the real PostgreSQL of `scripts/brokers.sh`:
//! the idempotency store, the transactional handler and the outbox relay.
//! Each test works in a schema of its own, so they run in parallel.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{connect, count, drop_schema, eventually, exec};
use postbox_core::{
    handler_fn, CancellationToken, Claim, Envelope, Error, ErrorKind, Handler, HandlerBuilder,
    HandlerError, IdempotencyLayer, IdempotencyStore, PublishError, Publisher, ResultExt,
};
use postbox_postgres::{
    tx_handler_fn, Outbox, PostgresIdempotencyStore, SentRows, TransactionalLayer,
};

const LEASE: Duration = Duration::from_secs(30);

/// The metrics of this test binary (installed once; tests read their own
/// series, told apart by their unique schema label).
fn metrics() -> &'static metrics_util::debugging::Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
        std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder in this test binary");
        snapshotter
    })
}

/// The value of a gauge or counter named `name` with label `schema`.
///
/// Snapshots of the debugging recorder reset what they read (counters to 0,
/// gauges to 0 until set again), and tests run in parallel: counters are
/// summed over every snapshot taken, gauges keep the last value set.
fn metric(name: &str, schema: Option<&str>) -> Option<f64> {
    use metrics_util::debugging::DebugValue;
    type Seen = std::collections::HashMap<(String, Option<String>), (bool, f64)>;
    static SEEN: std::sync::OnceLock<Mutex<Seen>> = std::sync::OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock().unwrap();
    for (key, _, _, value) in metrics().snapshot().into_vec() {
        let label = key
            .key()
            .labels()
            .find(|l| l.key() == "schema")
            .map(|l| l.value().to_string());
        let entry = seen
            .entry((key.key().name().to_string(), label))
            .or_insert((false, 0.0));
        match value {
            DebugValue::Counter(c) => entry.1 += c as f64,
            // 0 is also what a gauge reads when nothing was set since the
            // last snapshot: only values set to something else are kept.
            DebugValue::Gauge(g) if g.into_inner() != 0.0 => *entry = (true, g.into_inner()),
            DebugValue::Gauge(_) => {}
            DebugValue::Histogram(h) => entry.1 += h.len() as f64,
        }
    }
    seen.get(&(name.to_string(), schema.map(str::to_string)))
        .map(|v| v.1)
}

mod store {
    use super::*;

    async fn acquire(
        store: &PostgresIdempotencyStore,
        key: &str,
        lease: Duration,
    ) -> postbox_core::Lease {
        match store.claim(key, lease).await.unwrap() {
            Claim::Acquired(l) => l,
            other => panic!("expected a lease on {key}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn claim_in_flight_complete_then_already_done() {
        let Some(pg) = connect("claim_in_flight_complete", 4).await else {
            return;
        };
        let store = PostgresIdempotencyStore::new(&pg);
        let lease = acquire(&store, "m-1", LEASE).await;
        match store.claim("m-1", LEASE).await.unwrap() {
            Claim::InFlight { remaining } => {
                assert!(
                    remaining <= LEASE && remaining > LEASE - Duration::from_secs(5),
                    "{remaining:?}"
                )
            }
            other => panic!("expected InFlight, got {other:?}"),
        }
        store
            .complete(&lease, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(store.claim("m-1", LEASE).await.unwrap(), Claim::AlreadyDone);
        // Completing twice is refused (the lease is no longer in flight).
        assert_eq!(
            store.complete(&lease, LEASE).await.unwrap_err().kind(),
            &ErrorKind::Settle
        );
        // Other keys are independent.
        acquire(&store, "m-2", LEASE).await;
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn exactly_one_of_32_parallel_claimers_wins() {
        let Some(pg) = connect("one_of_32_claimers", 32).await else {
            return;
        };
        let store = Arc::new(PostgresIdempotencyStore::new(&pg));
        // Warm 32 connections so the claims really race on the server.
        let clients: Vec<_> = futures_join(32, |_| {
            let pg = pg.clone();
            async move { pg.client().await.unwrap() }
        })
        .await;
        drop(clients);
        for round in 0..10 {
            let key = format!("hot-{round}");
            let barrier = Arc::new(tokio::sync::Barrier::new(32));
            let results = futures_join(32, |_| {
                let store = store.clone();
                let barrier = barrier.clone();
                let key = key.clone();
                async move {
                    barrier.wait().await;
                    store.claim(&key, LEASE).await.unwrap()
                }
            })
            .await;
            let acquired = results
                .iter()
                .filter(|c| matches!(c, Claim::Acquired(_)))
                .count();
            let in_flight = results
                .iter()
                .filter(|c| matches!(c, Claim::InFlight { .. }))
                .count();
            assert_eq!((acquired, in_flight), (1, 31), "round {round}: {results:?}");
        }
        drop_schema(&pg).await;
    }

    async fn futures_join<T, F, Fut>(n: usize, f: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn lease_expires_after_a_crashed_holder() {
        let Some(pg) = connect("lease_expires", 4).await else {
            return;
        };
        let store = PostgresIdempotencyStore::new(&pg);
        let short = Duration::from_millis(300);
        // The holder "crashes": it never completes nor releases.
        let stale = acquire(&store, "k", short).await;
        assert!(matches!(
            store.claim("k", LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
        tokio::time::sleep(short + Duration::from_millis(200)).await;
        let fresh = acquire(&store, "k", LEASE).await;
        assert_ne!(fresh.token, stale.token);
        // The crashed holder can neither complete nor release the new lease.
        let err = store.complete(&stale, LEASE).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Settle);
        assert!(err.is_retryable());
        store.release(&stale).await.unwrap();
        assert!(matches!(
            store.claim("k", LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
        store
            .complete(&fresh, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::AlreadyDone);
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn release_lets_a_redelivery_claim() {
        let Some(pg) = connect("release_redelivery", 4).await else {
            return;
        };
        let store = PostgresIdempotencyStore::new(&pg);
        let lease = acquire(&store, "k", LEASE).await;
        store.release(&lease).await.unwrap();
        assert_eq!(
            count(&pg, "SELECT count(*) FROM {s}.postbox_idempotency").await,
            0
        );
        acquire(&store, "k", LEASE).await;
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn retention_ends_and_cleanup_deletes_expired_rows() {
        let Some(pg) = connect("retention_cleanup", 4).await else {
            return;
        };
        let store = PostgresIdempotencyStore::new(&pg);
        let a = acquire(&store, "a", LEASE).await;
        store
            .complete(&a, Duration::from_millis(200))
            .await
            .unwrap();
        let b = acquire(&store, "b", LEASE).await;
        store.complete(&b, Duration::from_secs(3600)).await.unwrap();
        let _crashed = acquire(&store, "c", Duration::from_millis(200)).await;
        let _live = acquire(&store, "d", LEASE).await;
        assert_eq!(store.cleanup(1000).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(400)).await;
        // "a" (retention over) and "c" (lease of a crashed holder) go; "b" and "d" stay.
        assert_eq!(store.cleanup(1000).await.unwrap(), 2);
        assert_eq!(store.claim("b", LEASE).await.unwrap(), Claim::AlreadyDone);
        assert!(matches!(
            store.claim("d", LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
        acquire(&store, "a", LEASE).await;
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn an_unmigrated_schema_is_a_not_found_error() {
        let Some(pg) = connect("unmigrated", 2).await else {
            return;
        };
        exec(&pg, "DROP TABLE {s}.postbox_idempotency").await;
        let store = PostgresIdempotencyStore::new(&pg);
        let err = store.claim("k", LEASE).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::NotFound, "{err}");
        assert!(err.is_permanent());
        assert!(
            std::error::Error::source(&err).is_some(),
            "driver error kept as source"
        );
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn migrate_is_idempotent_and_concurrent_safe() {
        let Some(pg) = connect("migrate_twice", 4).await else {
            return;
        };
        let (a, b) = tokio::join!(pg.migrate(), pg.migrate());
        assert!(a.unwrap().is_empty() && b.unwrap().is_empty());
        assert_eq!(
            count(&pg, "SELECT count(*)::bigint FROM {s}.postbox_migrations").await,
            2
        );
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn bad_credentials_are_a_config_error() {
        let url = common::database_url().replace("postgres:postgres@", "postgres:wrong-password@");
        let config = postbox_postgres::PostgresConfig::from_url(&url).unwrap();
        match postbox_postgres::Postgres::connect(config).await {
            Ok(_) => panic!(
                "the server accepted a wrong password (scripts/brokers.sh sets md5/scram auth)"
            ),
            Err(e) if e.kind() == &ErrorKind::Connection => {
                common::unreachable("bad_credentials_are_a_config_error", e)
            }
            Err(e) => {
                assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
                assert!(!e.to_string().contains("wrong-password"));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idempotency_layer_runs_a_handler_once_per_message() {
        let Some(pg) = connect("layer_once", 8).await else {
            return;
        };
        let store = Arc::new(PostgresIdempotencyStore::new(&pg));
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let handler = HandlerBuilder::new()
            .layer(IdempotencyLayer::new(store).lease(LEASE))
            .handler(handler_fn(move |_env: Envelope| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }));
        let env = Envelope::new("t", "x");
        handler.handle(&env).await.unwrap();
        handler.handle(&env).await.unwrap();
        handler.handle(&Envelope::new("t", "y")).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        drop_schema(&pg).await;
    }
}

mod transactional {
    use super::*;

    async fn effects(pg: &postbox_postgres::Postgres) -> i64 {
        count(pg, "SELECT count(*) FROM {s}.effects").await
    }

    fn recording(
        pg: &postbox_postgres::Postgres,
        runs: Arc<AtomicUsize>,
    ) -> postbox_postgres::Transactional<impl postbox_postgres::TransactionalHandler> {
        let insert = format!("INSERT INTO \"{}\".effects (msg) VALUES ($1)", pg.schema());
        TransactionalLayer::new(pg).wrap(tx_handler_fn(move |env, tx| {
            let insert = insert.clone();
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.execute(&insert, &[&env.id.as_str()]).await.transient()?;
                if env.event_type == "fail" {
                    return Err(HandlerError::transient("failed after the write"));
                }
                if env.event_type == "slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                if env.event_type == "hang" {
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        }))
    }

    #[tokio::test]
    async fn commit_makes_effect_and_mark_durable_and_a_duplicate_is_skipped() {
        let Some(pg) = connect("tx_commit", 4).await else {
            return;
        };
        exec(&pg, "CREATE TABLE {s}.effects (msg text NOT NULL)").await;
        let runs = Arc::new(AtomicUsize::new(0));
        let handler = recording(&pg, runs.clone());
        let env = Envelope::new("ok", "x");
        metrics();
        handler.handle(&env).await.unwrap();
        handler.handle(&env).await.unwrap(); // redelivered duplicate
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let skipped = metric(postbox_core::telemetry::DUPLICATES_SKIPPED, None);
        assert!(skipped.is_some_and(|n| n >= 1.0), "{skipped:?}");
        assert_eq!(effects(&pg).await, 1);
        assert_eq!(
            count(
                &pg,
                "SELECT count(*) FROM {s}.postbox_idempotency WHERE state = 'done'"
            )
            .await,
            1
        );
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn a_failed_handler_rolls_back_effect_and_mark() {
        let Some(pg) = connect("tx_rollback", 4).await else {
            return;
        };
        exec(&pg, "CREATE TABLE {s}.effects (msg text NOT NULL)").await;
        let runs = Arc::new(AtomicUsize::new(0));
        let handler = recording(&pg, runs.clone());
        let mut env = Envelope::new("fail", "x");
        let err = handler.handle(&env).await.unwrap_err();
        assert_eq!(err.disposition(), postbox_core::Disposition::Transient);
        assert_eq!(effects(&pg).await, 0);
        assert_eq!(
            count(&pg, "SELECT count(*) FROM {s}.postbox_idempotency").await,
            0
        );
        // The redelivery (same id) runs again and succeeds.
        env.event_type = "ok".into();
        handler.handle(&env).await.unwrap();
        assert_eq!((runs.load(Ordering::SeqCst), effects(&pg).await), (2, 1));
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_before_commit_leaves_neither_effect_nor_mark() {
        let Some(pg) = connect("tx_crash", 4).await else {
            return;
        };
        exec(&pg, "CREATE TABLE {s}.effects (msg text NOT NULL)").await;
        let runs = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(recording(&pg, runs.clone()));
        let mut env = Envelope::new("hang", "x");
        // The "process" dies in the middle of the handler, after its write.
        let h = handler.clone();
        let e = env.clone();
        let task = tokio::spawn(async move { h.handle(&e).await });
        eventually(Duration::from_secs(10), "handler started", || {
            let runs = runs.clone();
            async move { runs.load(Ordering::SeqCst) == 1 }
        })
        .await;
        // The hung transaction's last statement wrote to this test's schema.
        let open_tx = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' \
             AND query LIKE '%\"{}\".effects%'",
            pg.schema()
        );
        eventually(
            Duration::from_secs(10),
            "the handler's transaction is open",
            || {
                let (pg, q) = (pg.clone(), open_tx.clone());
                async move { count(&pg, &q).await == 1 }
            },
        )
        .await;
        task.abort();
        let _ = task.await;
        // The transaction is rolled back: no effect, no mark, no lock.
        eventually(
            Duration::from_secs(10),
            "rollback of the dropped transaction",
            || {
                let (pg, q) = (pg.clone(), open_tx.clone());
                async move { count(&pg, &q).await == 0 }
            },
        )
        .await;
        assert_eq!(effects(&pg).await, 0);
        assert_eq!(
            count(&pg, "SELECT count(*) FROM {s}.postbox_idempotency").await,
            0
        );
        env.event_type = "ok".into();
        handler.handle(&env).await.unwrap();
        assert_eq!(effects(&pg).await, 1);
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_copies_apply_once() {
        let Some(pg) = connect("tx_concurrent", 8).await else {
            return;
        };
        exec(&pg, "CREATE TABLE {s}.effects (msg text NOT NULL)").await;
        let runs = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(recording(&pg, runs.clone()));
        let env = Envelope::new("slow", "x");
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let h = handler.clone();
                let e = env.clone();
                tokio::spawn(async move { h.handle(&e).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap(); // the copies wait on the row lock, then skip
        }
        assert_eq!(effects(&pg).await, 1);
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn a_copy_waiting_longer_than_the_lock_timeout_is_retried_later() {
        let Some(pg) = connect("tx_lock_timeout", 4).await else {
            return;
        };
        exec(&pg, "CREATE TABLE {s}.effects (msg text NOT NULL)").await;
        let insert = format!("INSERT INTO \"{}\".effects (msg) VALUES ($1)", pg.schema());
        let handler = Arc::new(
            TransactionalLayer::new(&pg)
                .lock_timeout(Some(Duration::from_millis(100)))
                .wrap(tx_handler_fn(move |env, tx| {
                    let insert = insert.clone();
                    Box::pin(async move {
                        tx.execute(&insert, &[&env.id.as_str()]).await.transient()?;
                        tokio::time::sleep(Duration::from_millis(600)).await;
                        Ok(())
                    })
                })),
        );
        let env = Envelope::new("slow", "x");
        let (h, e) = (handler.clone(), env.clone());
        let first = tokio::spawn(async move { h.handle(&e).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let err = handler.handle(&env).await.unwrap_err();
        assert!(
            matches!(err.disposition(), postbox_core::Disposition::RetryAfter(_)),
            "{err}"
        );
        first.await.unwrap().unwrap();
        handler.handle(&env).await.unwrap(); // now a skipped duplicate
        assert_eq!(effects(&pg).await, 1);
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn an_ignored_statement_error_is_not_acked() {
        let Some(pg) = connect("tx_swallowed", 4).await else {
            return;
        };
        exec(&pg, "CREATE TABLE {s}.effects (msg text PRIMARY KEY)").await;
        let insert = format!("INSERT INTO \"{}\".effects (msg) VALUES ($1)", pg.schema());
        let handler = TransactionalLayer::new(&pg).wrap(tx_handler_fn(move |_env, tx| {
            let insert = insert.clone();
            Box::pin(async move {
                // A duplicate primary key aborts the transaction; the handler ignores it.
                let _ = tx.execute(&insert, &[&"same"]).await;
                let _ = tx.execute(&insert, &[&"same"]).await;
                Ok(())
            })
        }));
        let err = handler.handle(&Envelope::new("t", "x")).await.unwrap_err();
        assert_eq!(
            err.disposition(),
            postbox_core::Disposition::Transient,
            "{err}"
        );
        assert_eq!(effects(&pg).await, 0);
        assert_eq!(
            count(&pg, "SELECT count(*) FROM {s}.postbox_idempotency").await,
            0
        );
        drop_schema(&pg).await;
    }
}

mod outbox {
    use super::*;
    use postbox_memory::MemoryBroker;

    /// (destination, id, key, payload) of a confirmed publish.
    type Published = (String, String, Option<String>, String);

    /// Records every confirmed publish (destination, id, key, payload) and can
    /// be switched to fail, like a broker that is down.
    #[derive(Default)]
    struct Recorder {
        published: Mutex<Vec<Published>>,
        down: AtomicBool,
        failures: AtomicUsize,
    }

    #[async_trait]
    impl Publisher for Recorder {
        async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
            if self.down.load(Ordering::SeqCst) {
                self.failures.fetch_add(1, Ordering::SeqCst);
                return Err(PublishError::new(
                    Error::new(ErrorKind::Connection, "broker down"),
                    envelope,
                ));
            }
            // A little latency so relays really overlap.
            if fastrand::u8(..) < 16 {
                tokio::task::yield_now().await;
            }
            self.published.lock().unwrap().push((
                destination.to_string(),
                envelope.id.to_string(),
                envelope.key.clone(),
                String::from_utf8(envelope.payload.to_vec()).unwrap(),
            ));
            Ok(())
        }
    }

    async fn enqueue_orders(
        pg: &postbox_postgres::Postgres,
        outbox: &Outbox,
        n: usize,
        keys: usize,
    ) {
        let mut client = pg.client().await.unwrap();
        // Chunks alternate between `enqueue` and `enqueue_many`.
        for (c, chunk) in (0..n).collect::<Vec<_>>().chunks(100).enumerate() {
            let tx = client.transaction().await.unwrap();
            let envs: Vec<Envelope> = chunk
                .iter()
                .map(|i| {
                    Envelope::builder("order.placed")
                        .key(format!("customer-{}", i % keys))
                        .payload(format!("{{\"seq\":{i}}}"))
                        .build()
                })
                .collect();
            if c % 2 == 0 {
                for env in &envs {
                    outbox.enqueue(&tx, "orders", env).await.unwrap();
                }
            } else {
                let ids = outbox.enqueue_many(&tx, "orders", &envs).await.unwrap();
                assert_eq!(ids.len(), envs.len());
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in slice order");
            }
            tx.commit().await.unwrap();
        }
    }

    fn seq(payload: &str) -> usize {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap();
        v["seq"].as_u64().unwrap() as usize
    }

    #[tokio::test]
    async fn enqueue_follows_the_application_transaction() {
        let Some(pg) = connect("outbox_tx", 4).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        let mut client = pg.client().await.unwrap();
        let tx = client.transaction().await.unwrap();
        outbox
            .enqueue(&tx, "orders", &Envelope::new("rolled.back", "{}"))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(outbox.backlog().await.unwrap().pending, 0);
        assert_eq!(outbox.backlog().await.unwrap().oldest, None);
        let tx = client.transaction().await.unwrap();
        let env = Envelope::builder("order.placed")
            .key("c-1")
            .header("tenant", "acme")
            .payload(r#"{"id": 1,  "x": [1, 2]}"#)
            .build();
        outbox.enqueue(&tx, "orders", &env).await.unwrap();
        tx.commit().await.unwrap();
        let backlog = outbox.backlog().await.unwrap();
        assert_eq!(backlog.pending, 1);
        assert!(backlog.oldest.is_some());
        // Stored as a structured CloudEvent that decodes to the same envelope.
        let row = client
            .query_one(
                &format!(
                    "SELECT event::text, partition_key, message_id FROM \"{}\".postbox_outbox",
                    pg.schema()
                ),
                &[],
            )
            .await
            .unwrap();
        let doc: String = row.get(0);
        assert!(doc.contains("\"specversion\":\"1.0\""), "{doc}");
        assert_eq!(
            postbox_core::codec::structured::decode(doc.as_bytes()).unwrap(),
            env
        );
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("c-1"));
        assert_eq!(row.get::<_, String>(2), env.id.to_string());
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn an_envelope_that_cannot_be_encoded_is_an_encode_error() {
        let Some(pg) = connect("outbox_encode", 2).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        let mut client = pg.client().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let env = Envelope::builder("t").header("specversion", "2").build();
        let err = outbox.enqueue(&tx, "orders", &env).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Encode, "{err}");
        drop(tx);
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_relays_publish_each_row_once_in_order_per_key() {
        let Some(pg) = connect("two_relays", 12).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        const N: usize = 3000;
        const KEYS: usize = 12;
        let recorder = Arc::new(Recorder::default());
        let stop = CancellationToken::new();
        // Relays start first and race while rows are still being written.
        let relays: Vec<_> = (0..2)
            .map(|_| {
                outbox
                    .relay(recorder.clone())
                    .batch_size(50)
                    .poll_interval(Duration::from_millis(50))
                    .spawn(stop.clone())
            })
            .collect();
        enqueue_orders(&pg, &outbox, N, KEYS).await;
        eventually(Duration::from_secs(60), "backlog drained", || {
            let outbox = outbox.clone();
            async move { outbox.backlog().await.unwrap().pending == 0 }
        })
        .await;
        stop.cancel();
        let mut per_relay = Vec::new();
        for r in relays {
            per_relay.push(r.await.unwrap().unwrap().published);
        }
        let published = recorder.published.lock().unwrap().clone();
        assert_eq!(published.len(), N, "no duplicate publish");
        let ids: std::collections::HashSet<_> = published.iter().map(|p| p.1.clone()).collect();
        assert_eq!(ids.len(), N);
        assert_eq!(per_relay.iter().sum::<u64>(), N as u64);
        assert!(
            per_relay.iter().all(|&n| n > 0),
            "both relays worked: {per_relay:?}"
        );
        // In order per key.
        let mut last = [None::<usize>; KEYS];
        for (_, _, key, payload) in &published {
            let s = seq(payload);
            let k: usize = key
                .as_deref()
                .unwrap()
                .trim_start_matches("customer-")
                .parse()
                .unwrap();
            assert_eq!(s % KEYS, k);
            if let Some(prev) = last[k] {
                assert!(s > prev, "key {k}: {s} published after {prev}");
            }
            last[k] = Some(s);
        }
        // Nothing left behind: every row marked sent after one attempt.
        assert_eq!(
            count(
                &pg,
                "SELECT count(*) FROM {s}.postbox_outbox WHERE sent_at IS NULL"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &pg,
                "SELECT count(*) FROM {s}.postbox_outbox WHERE attempts <> 1"
            )
            .await,
            0
        );
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_down_then_up_loses_nothing() {
        let Some(pg) = connect("broker_down_up", 6).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        // The memory broker without auto-creation rejects publishes (Unroutable)
        // until the queue is declared: the broker is "down".
        let broker = MemoryBroker::new().without_auto_create();
        let stop = CancellationToken::new();
        let relay = outbox
            .relay(Arc::new(broker.clone()))
            .batch_size(64)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .sent_rows(SentRows::Delete)
            .spawn(stop.clone());
        enqueue_orders(&pg, &outbox, 500, 5).await;
        eventually(Duration::from_secs(10), "failed attempts recorded", || {
            let pg = pg.clone();
            async move {
                count(&pg, "SELECT count(*) FROM {s}.postbox_outbox WHERE attempts >= 2 AND last_error IS NOT NULL").await >= 5
            }
        })
        .await;
        assert_eq!(outbox.backlog().await.unwrap().pending, 500);
        assert!(outbox.backlog().await.unwrap().oldest.is_some());
        broker.declare_queue("orders"); // the broker is back
        eventually(Duration::from_secs(30), "backlog drained", || {
            let outbox = outbox.clone();
            async move { outbox.backlog().await.unwrap().pending == 0 }
        })
        .await;
        stop.cancel();
        let stats = relay.await.unwrap().unwrap();
        assert_eq!(stats.published, 500);
        assert!(stats.failed >= 5, "{stats:?}");
        assert_eq!(broker.depth("orders"), 500);
        assert_eq!(
            count(&pg, "SELECT count(*) FROM {s}.postbox_outbox").await,
            0,
            "deleted once sent"
        );
        // Per key order survived the outage.
        let mut source = broker.subscribe("orders");
        let mut last = [None::<usize>; 5];
        while let Some(d) = source.try_next() {
            use postbox_core::Delivery;
            let s = seq(std::str::from_utf8(&d.envelope().payload).unwrap());
            if let Some(prev) = last[s % 5] {
                assert!(s > prev);
            }
            last[s % 5] = Some(s);
            d.ack().await.unwrap();
        }
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn a_failed_row_holds_back_its_key_but_not_others() {
        let Some(pg) = connect("holds_back_key", 4).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        struct FailKey(Recorder);
        #[async_trait]
        impl Publisher for FailKey {
            async fn publish(&self, d: &str, e: Envelope) -> Result<(), PublishError> {
                if e.key.as_deref() == Some("customer-0") {
                    return Err(PublishError::new(
                        Error::new(ErrorKind::Timeout, "no confirm"),
                        e,
                    ));
                }
                self.0.publish(d, e).await
            }
        }
        enqueue_orders(&pg, &outbox, 10, 2).await;
        let publisher = Arc::new(FailKey(Recorder::default()));
        let report = outbox.relay(publisher.clone()).relay_once().await.unwrap();
        assert_eq!(
            (
                report.fetched,
                report.published,
                report.failed,
                report.held_back
            ),
            (10, 5, 1, 4)
        );
        let published = publisher.0.published.lock().unwrap().clone();
        assert!(published
            .iter()
            .all(|p| p.2.as_deref() == Some("customer-1")));
        assert_eq!(outbox.backlog().await.unwrap().pending, 5);
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notify_wakes_an_idle_relay_and_polling_works_without_it() {
        let Some(pg) = connect("notify_wakes", 6).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        for listen in [true, false] {
            let recorder = Arc::new(Recorder::default());
            let stop = CancellationToken::new();
            // With LISTEN the poll interval is an hour: only a notification can wake it.
            let poll = if listen {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(100)
            };
            let relay = outbox
                .relay(recorder.clone())
                .listen(listen)
                .poll_interval(poll)
                .spawn(stop.clone());
            tokio::time::sleep(Duration::from_millis(500)).await; // relay idle, listening
            enqueue_orders(&pg, &outbox, 3, 3).await;
            let r = recorder.clone();
            eventually(Duration::from_secs(5), "woken and published", move || {
                let r = r.clone();
                async move { r.published.lock().unwrap().len() == 3 }
            })
            .await;
            stop.cancel();
            let stats = relay.await.unwrap().unwrap();
            assert_eq!(stats.published, 3, "listen={listen}");
        }
        drop_schema(&pg).await;
    }

    #[tokio::test]
    async fn purge_sent_deletes_old_marked_rows() {
        let Some(pg) = connect("purge_sent", 4).await else {
            return;
        };
        let outbox = Outbox::new(&pg);
        enqueue_orders(&pg, &outbox, 7, 1).await;
        let report = outbox
            .relay(Arc::new(Recorder::default()))
            .relay_once()
            .await
            .unwrap();
        assert_eq!(report.published, 7);
        assert_eq!(
            outbox.purge_sent(Duration::from_secs(3600)).await.unwrap(),
            0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            outbox.purge_sent(Duration::from_millis(1)).await.unwrap(),
            7
        );
        drop_schema(&pg).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_exports_backlog_and_age_gauges() {
        let Some(pg) = connect("relay_gauges", 4).await else {
            return;
        };
        metrics();
        let schema = pg.schema().to_string();
        let outbox = Outbox::new(&pg);
        let recorder = Arc::new(Recorder::default());
        recorder.down.store(true, Ordering::SeqCst);
        enqueue_orders(&pg, &outbox, 5, 5).await;
        tokio::time::sleep(Duration::from_millis(300)).await; // the rows age
        let stop = CancellationToken::new();
        let relay = outbox
            .relay(recorder.clone())
            .metrics_interval(Duration::from_millis(20))
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .spawn(stop.clone());
        let s = schema.clone();
        eventually(
            Duration::from_secs(10),
            "backlog gauges while the broker is down",
            move || {
                let s = s.clone();
                async move {
                    metric(postbox_postgres::outbox::BACKLOG, Some(&s)) == Some(5.0)
                        && metric(postbox_postgres::outbox::OLDEST_PENDING, Some(&s))
                            .is_some_and(|age| age >= 0.3)
                        && metric(postbox_postgres::outbox::RELAY_FAILED, Some(&s))
                            .is_some_and(|n| n >= 1.0)
                }
            },
        )
        .await;
        recorder.down.store(false, Ordering::SeqCst);
        let s = schema.clone();
        eventually(
            Duration::from_secs(10),
            "rows relayed once the broker is up",
            move || {
                let s = s.clone();
                async move { metric(postbox_postgres::outbox::RELAYED, Some(&s)) == Some(5.0) }
            },
        )
        .await;
        assert_eq!(
            outbox.backlog().await.unwrap(),
            postbox_postgres::Backlog {
                pending: 0,
                oldest: None
            }
        );
        stop.cancel();
        relay.await.unwrap().unwrap();
        drop_schema(&pg).await;
    }
}
