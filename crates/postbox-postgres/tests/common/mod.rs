//! Shared helpers: a migrated schema of its own per test, and the
//! skip-or-fail rule for an unreachable database.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postbox_postgres::{Postgres, PostgresConfig};

/// `DATABASE_URL`, default `postgres://postgres:postgres@127.0.0.1:5432/postbox`.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres:postgres@127.0.0.1:5432/postbox".to_string())
}

#[allow(unused_imports)]
pub use postbox_testkit::env::{brokers_required, unreachable as broker_unreachable};

/// Fails the test (brokers required) or reports a skip by name.
pub fn unreachable(test: &str, why: impl std::fmt::Display) {
    broker_unreachable(test, "postgres", why);
}

/// Counts deliveries that reach the handler stack (first deliveries,
/// redeliveries and wire duplicates alike).
pub struct Counting<H> {
    /// The handler counted.
    pub inner: H,
    /// Deliveries so far.
    pub deliveries: std::sync::Arc<AtomicU64>,
}

impl<H: postbox_core::Handler> postbox_core::Handler for Counting<H> {
    async fn handle(&self, envelope: &postbox_core::Envelope) -> postbox_core::HandlerResult {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        self.inner.handle(envelope).await
    }
}

/// A schema name no other test (or run) uses.
pub fn unique_schema(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let short: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    format!(
        "t_{short}_{:x}_{}",
        (nanos as u64) ^ u64::from(std::process::id()),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A pool on a fresh, migrated schema; `None` (after reporting) when the
/// database cannot be reached.
pub async fn connect(test: &str, pool_size: usize) -> Option<Postgres> {
    let config = PostgresConfig::from_url(&database_url())
        .unwrap()
        .schema(unique_schema(test))
        .pool_size(pool_size)
        .wait_timeout(Duration::from_secs(30));
    let pg = match tokio::time::timeout(Duration::from_secs(15), Postgres::connect(config)).await {
        Ok(Ok(pg)) => pg,
        Ok(Err(e)) => {
            unreachable(test, e);
            return None;
        }
        Err(_) => {
            unreachable(test, "connect timed out");
            return None;
        }
    };
    pg.migrate().await.expect("migrations apply");
    Some(pg)
}

/// Drops the test's schema.
pub async fn drop_schema(pg: &Postgres) {
    let client = pg.client().await.unwrap();
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            pg.schema()
        ))
        .await
        .unwrap();
}

/// Runs a statement on the test's schema (`{s}` is replaced by the quoted schema).
pub async fn exec(pg: &Postgres, sql: &str) {
    let client = pg.client().await.unwrap();
    client
        .batch_execute(&sql.replace("{s}", &format!("\"{}\"", pg.schema())))
        .await
        .unwrap();
}

/// One `bigint` from a query (`{s}` is replaced by the quoted schema).
pub async fn count(pg: &Postgres, sql: &str) -> i64 {
    let client = pg.client().await.unwrap();
    client
        .query_one(&sql.replace("{s}", &format!("\"{}\"", pg.schema())), &[])
        .await
        .unwrap()
        .get(0)
}

/// Polls `check` until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What an exactly-once-effect run left behind: the `applied` table (one
/// row per order applied, no unique constraint), the outbox and the marks.
#[derive(Debug, Clone, Copy)]
pub struct Effect {
    /// Rows of `applied`.
    pub rows: i64,
    /// Distinct orders among them.
    pub distinct: i64,
    /// Rows whose order is one of `0..orders`.
    pub in_range: i64,
    /// Rows still in the outbox.
    pub outbox_left: i64,
    /// Idempotency marks in state `done`.
    pub marks: i64,
}

impl std::fmt::Display for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "applied rows {}, distinct {}, processed marks {}, outbox rows left {}",
            self.rows, self.distinct, self.marks, self.outbox_left
        )
    }
}

impl Effect {
    /// Reads the counts of the test's schema.
    pub async fn read(pg: &Postgres, orders: usize) -> Effect {
        let in_range = format!(
            "SELECT count(*) FROM {{s}}.applied WHERE order_id BETWEEN 0 AND {}",
            orders - 1
        );
        Effect {
            rows: count(pg, "SELECT count(*) FROM {s}.applied").await,
            distinct: count(pg, "SELECT count(DISTINCT order_id) FROM {s}.applied").await,
            in_range: count(pg, &in_range).await,
            outbox_left: count(pg, "SELECT count(*) FROM {s}.postbox_outbox").await,
            marks: count(
                pg,
                "SELECT count(*) FROM {s}.postbox_idempotency WHERE state = 'done'",
            )
            .await,
        }
    }

    /// Each of `orders` orders applied exactly once, nothing left in the outbox.
    pub fn assert_exactly_once(&self, orders: usize) {
        let n = orders as i64;
        assert_eq!(self.rows, n, "each order applied exactly once: {self:?}");
        assert_eq!(self.distinct, n, "{self:?}");
        assert_eq!(self.in_range, n, "{self:?}");
        assert_eq!(self.outbox_left, 0, "nothing left in the outbox: {self:?}");
        assert!(self.marks >= n, "a processed mark per order: {self:?}");
    }
}
