//! The PostgreSQL [`IdempotencyStore`]: leases and processed marks shared by
//! every replica.
//!
//! One row per key in `postbox_idempotency`:
//!
//! - **claim** is one statement: insert the key as `in_flight` with a fresh
//!   token, or, if the key exists but its lease or retention has run out,
//!   take it over (`INSERT … ON CONFLICT (key) DO UPDATE … WHERE expires_at <=
//!   now()`). PostgreSQL serialises conflicting inserts on the key, so of many
//!   concurrent claimers exactly one gets the row back. The others read the
//!   row: `done` → [`Claim::AlreadyDone`], `in_flight` → [`Claim::InFlight`].
//! - **complete** turns the row `done` until `now() + retention`, only for the
//!   token that claimed it (a holder whose lease was taken over gets a
//!   retryable `Settle` error).
//! - **release** deletes the row, again only for the claiming token.
//! - [`cleanup`](PostgresIdempotencyStore::cleanup) deletes expired rows.
//!
//! Times are the database's clock (`now()`), so replicas with skewed clocks
//! agree.

use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{Claim, Error, ErrorKind, IdempotencyStore, Lease};

use crate::error::pg;
use crate::Postgres;

/// SQL of the store for one table.
#[derive(Debug)]
pub(crate) struct StoreSql {
    /// `$1 key, $2 token, $3 ttl ms, $4 state` → `token` when claimed.
    pub(crate) claim: String,
    /// `$1 key` → `state, remaining seconds`.
    pub(crate) probe: String,
    complete: String,
    release: String,
    cleanup: String,
}

impl StoreSql {
    pub(crate) fn new(table: &str) -> Self {
        StoreSql {
            claim: format!(
                "INSERT INTO {table} AS i (key, token, state, expires_at, updated_at) \
                 VALUES ($1, $2, $4, now() + $3::bigint * interval '1 millisecond', now()) \
                 ON CONFLICT (key) DO UPDATE SET token = excluded.token, state = excluded.state, \
                 expires_at = excluded.expires_at, updated_at = excluded.updated_at \
                 WHERE i.expires_at <= now() \
                 RETURNING token"
            ),
            probe: format!(
                "SELECT state, extract(epoch FROM (expires_at - now()))::float8 \
                 FROM {table} WHERE key = $1"
            ),
            complete: format!(
                "UPDATE {table} SET state = 'done', \
                 expires_at = now() + $3::bigint * interval '1 millisecond', updated_at = now() \
                 WHERE key = $1 AND token = $2 AND state = 'in_flight'"
            ),
            release: format!(
                "DELETE FROM {table} WHERE key = $1 AND token = $2 AND state = 'in_flight'"
            ),
            cleanup: format!(
                "DELETE FROM {table} WHERE key IN \
                 (SELECT key FROM {table} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        }
    }
}

/// What a row that could not be claimed says.
pub(crate) enum Taken {
    Done,
    InFlight(Duration),
    /// Gone or expired meanwhile: claim again.
    Retry,
}

pub(crate) fn taken(row: Option<tokio_postgres::Row>) -> Taken {
    let Some(row) = row else {
        return Taken::Retry;
    };
    let state: &str = row.get(0);
    let remaining: f64 = row.get(1);
    if remaining <= 0.0 {
        return Taken::Retry;
    }
    match state {
        "done" => Taken::Done,
        _ => Taken::InFlight(Duration::from_secs_f64(remaining)),
    }
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4).max(1)
}

pub(crate) fn new_token() -> u64 {
    fastrand::u64(..)
}

/// How many times a claim re-reads a row that vanished or expired under it.
const CLAIM_ROUNDS: usize = 5;

/// The [`IdempotencyStore`] on PostgreSQL (table `postbox_idempotency` of the
/// configured schema; run [`Postgres::migrate`] first).
///
/// ```no_run
/// use std::{sync::Arc, time::Duration};
/// use postbox_core::{handler_fn, Envelope, HandlerBuilder, IdempotencyLayer};
/// use postbox_postgres::{Postgres, PostgresConfig, PostgresIdempotencyStore};
/// # async fn demo() -> Result<(), postbox_core::Error> {
/// let pg = Postgres::connect(PostgresConfig::from_env()?).await?;
/// pg.migrate().await?;
/// let store = Arc::new(PostgresIdempotencyStore::new(&pg));
/// let handler = HandlerBuilder::new()
///     .layer(IdempotencyLayer::new(store).lease(Duration::from_secs(60)))
///     .handler(handler_fn(|_env: Envelope| async { Ok(()) }));
/// # let _ = handler; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresIdempotencyStore {
    pg: Postgres,
    sql: std::sync::Arc<StoreSql>,
}

impl std::fmt::Debug for PostgresIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresIdempotencyStore")
            .field("schema", &self.pg.schema())
            .finish_non_exhaustive()
    }
}

impl PostgresIdempotencyStore {
    /// The store in `pg`'s schema.
    pub fn new(pg: &Postgres) -> Self {
        PostgresIdempotencyStore {
            pg: pg.clone(),
            sql: std::sync::Arc::new(StoreSql::new(&pg.table("postbox_idempotency"))),
        }
    }

    /// Deletes up to `limit` expired rows (completed keys past their
    /// retention, leases of crashed holders); returns how many. Run it
    /// periodically, e.g. with [`spawn_cleanup`](Self::spawn_cleanup).
    pub async fn cleanup(&self, limit: i64) -> Result<u64, Error> {
        let client = self.pg.client().await?;
        let stmt = client
            .prepare_cached(&self.sql.cleanup)
            .await
            .map_err(|e| pg("preparing the idempotency cleanup", e))?;
        client
            .execute(&stmt, &[&limit])
            .await
            .map_err(|e| pg("deleting expired idempotency keys", e))
    }

    /// Runs [`cleanup`](Self::cleanup) every `every` until `shutdown` is cancelled.
    pub fn spawn_cleanup(
        &self,
        every: Duration,
        shutdown: postbox_core::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                loop {
                    match store.cleanup(10_000).await {
                        Ok(10_000) => continue,
                        Ok(n) => {
                            tracing::debug!(deleted = n, "idempotency cleanup");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "idempotency cleanup failed");
                            break;
                        }
                    }
                }
            }
        })
    }
}

fn lost_lease(lease: &Lease) -> Error {
    Error::new(
        ErrorKind::Settle,
        format!(
            "the lease on {:?} expired and was taken over (or released) before completion",
            lease.key
        ),
    )
}

#[async_trait]
impl IdempotencyStore for PostgresIdempotencyStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, Error> {
        let client = self.pg.client().await?;
        let claim = client
            .prepare_cached(&self.sql.claim)
            .await
            .map_err(|e| pg("preparing the idempotency claim", e))?;
        let probe = client
            .prepare_cached(&self.sql.probe)
            .await
            .map_err(|e| pg("preparing the idempotency probe", e))?;
        for _ in 0..CLAIM_ROUNDS {
            let token = new_token();
            let row = client
                .query_opt(
                    &claim,
                    &[&key, &(token as i64), &millis(lease), &"in_flight"],
                )
                .await
                .map_err(|e| pg("claiming an idempotency key", e))?;
            if let Some(row) = row {
                let got: i64 = row.get(0);
                debug_assert_eq!(got as u64, token);
                return Ok(Claim::Acquired(Lease {
                    key: key.to_string(),
                    token,
                    ttl: lease,
                }));
            }
            let row = client
                .query_opt(&probe, &[&key])
                .await
                .map_err(|e| pg("reading an idempotency key", e))?;
            match taken(row) {
                Taken::Done => return Ok(Claim::AlreadyDone),
                Taken::InFlight(remaining) => return Ok(Claim::InFlight { remaining }),
                Taken::Retry => continue,
            }
        }
        Err(Error::new(
            ErrorKind::Rejected,
            format!("idempotency key {key:?} kept changing under a claim"),
        ))
    }

    async fn complete(&self, lease: &Lease, retention: Duration) -> Result<(), Error> {
        let client = self.pg.client().await?;
        let stmt = client
            .prepare_cached(&self.sql.complete)
            .await
            .map_err(|e| pg("preparing the idempotency completion", e))?;
        let n = client
            .execute(
                &stmt,
                &[&lease.key, &(lease.token as i64), &millis(retention)],
            )
            .await
            .map_err(|e| pg("completing an idempotency key", e))?;
        if n == 1 {
            Ok(())
        } else {
            Err(lost_lease(lease))
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let client = self.pg.client().await?;
        let stmt = client
            .prepare_cached(&self.sql.release)
            .await
            .map_err(|e| pg("preparing the idempotency release", e))?;
        client
            .execute(&stmt, &[&lease.key, &(lease.token as i64)])
            .await
            .map_err(|e| pg("releasing an idempotency key", e))?;
        Ok(())
    }
}
