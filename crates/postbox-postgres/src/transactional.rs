//! The transactional handler variant: the processed mark is written in the
//! same database transaction as the handler's own writes.
//!
//! For each message [`Transactional`] opens a transaction, writes the key's
//! `done` mark first (which also locks the key: a concurrent copy of the same
//! message waits on that row lock, then sees it done), runs your handler with
//! the transaction, and commits. So the side effect and the mark commit or
//! roll back together:
//!
//! - handler `Ok` → commit: effect and mark are durable; a redelivered
//!   duplicate finds the mark and is acked without running the handler;
//! - handler `Err`, panic, time-out or a crash (the process dies, the task is
//!   dropped) before the commit → PostgreSQL rolls back both; the redelivery
//!   runs the handler again;
//! - commit fails with an unknown outcome → the message is retried; if the
//!   commit did happen the retry finds the mark and skips.
//!
//! Only writes through the given transaction are covered: calls to other
//! systems (HTTP, another database) are not undone by a rollback. To publish
//! from a handler atomically, [`enqueue`](crate::Outbox::enqueue) into the
//! outbox with the same transaction.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use postbox_core::idempotency::KeyFn;
use postbox_core::{Envelope, Handler, HandlerError, HandlerResult, Layer};
use tokio_postgres::Transaction;

use crate::error::{is_lock_timeout, pg};
use crate::idempotency::{millis, new_token, taken, StoreSql, Taken};
use crate::Postgres;

/// A handler that works inside a database transaction.
///
/// Implement it for your type, or build one from a closure with [`tx_handler_fn`].
///
/// ```
/// use postbox_core::{Envelope, HandlerResult, ResultExt};
/// use postbox_postgres::{tokio_postgres::Transaction, TransactionalHandler};
/// struct ApplyOrder;
/// impl TransactionalHandler for ApplyOrder {
///     async fn handle(&self, env: &Envelope, tx: &Transaction<'_>) -> HandlerResult {
///         tx.execute("INSERT INTO applied (id) VALUES ($1)", &[&env.id.as_str()])
///             .await
///             .transient()?;
///         Ok(())
///     }
/// }
/// ```
pub trait TransactionalHandler: Send + Sync + 'static {
    /// Handles one envelope; write the effect through `tx` (do not commit it:
    /// the caller commits, with the processed mark, when this returns `Ok`).
    fn handle(
        &self,
        envelope: &Envelope,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = HandlerResult> + Send;
}

impl<H: TransactionalHandler> TransactionalHandler for Arc<H> {
    fn handle(
        &self,
        envelope: &Envelope,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = HandlerResult> + Send {
        (**self).handle(envelope, tx)
    }
}

/// A boxed future borrowing the envelope and the transaction.
pub type TxFuture<'a> = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'a>>;

/// A [`TransactionalHandler`] from a closure returning a boxed future.
///
/// ```
/// use postbox_core::ResultExt;
/// use postbox_postgres::tx_handler_fn;
/// let handler = tx_handler_fn(|env, tx| Box::pin(async move {
///     tx.execute("INSERT INTO applied (id) VALUES ($1)", &[&env.id.as_str()])
///         .await
///         .transient()?;
///     Ok(())
/// }));
/// # let _ = handler;
/// ```
pub fn tx_handler_fn<F>(f: F) -> TxFn<F>
where
    F: for<'a, 't> Fn(&'a Envelope, &'a Transaction<'t>) -> TxFuture<'a> + Send + Sync + 'static,
{
    TxFn { f }
}

/// See [`tx_handler_fn`].
#[derive(Debug, Clone)]
pub struct TxFn<F> {
    f: F,
}

impl<F> TransactionalHandler for TxFn<F>
where
    F: for<'a, 't> Fn(&'a Envelope, &'a Transaction<'t>) -> TxFuture<'a> + Send + Sync + 'static,
{
    #[allow(clippy::manual_async_fn)]
    fn handle(
        &self,
        envelope: &Envelope,
        tx: &Transaction<'_>,
    ) -> impl Future<Output = HandlerResult> + Send {
        async move { (self.f)(envelope, tx).await }
    }
}

/// Makes a [`TransactionalHandler`] a postbox [`Handler`] (see the [module
/// docs](self)); configure the key, retention and lock wait here.
///
/// ```no_run
/// use postbox_core::ResultExt;
/// use postbox_postgres::{tx_handler_fn, Postgres, PostgresConfig, TransactionalLayer};
/// # async fn demo() -> Result<(), postbox_core::Error> {
/// let pg = Postgres::connect(PostgresConfig::from_env()?).await?;
/// let handler = TransactionalLayer::new(&pg).wrap(tx_handler_fn(|env, tx| Box::pin(async move {
///     tx.execute("INSERT INTO applied (id) VALUES ($1)", &[&env.id.as_str()]).await.transient()?;
///     Ok(())
/// })));
/// // `handler` is a postbox Handler: give it to a Consumer.
/// # let _ = handler; Ok(()) }
/// ```
#[derive(Clone)]
pub struct TransactionalLayer {
    pg: Postgres,
    sql: Arc<StoreSql>,
    key: Option<KeyFn>,
    retention: Duration,
    lock_timeout: Option<Duration>,
}

impl std::fmt::Debug for TransactionalLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalLayer")
            .field("schema", &self.pg.schema())
            .field("retention", &self.retention)
            .field("lock_timeout", &self.lock_timeout)
            .finish_non_exhaustive()
    }
}

/// Smallest wait before retrying a copy whose twin is in flight.
const MIN_IN_FLIGHT_WAIT: Duration = Duration::from_millis(50);

impl TransactionalLayer {
    /// Marks in `pg`'s `postbox_idempotency` table (shared with
    /// [`PostgresIdempotencyStore`](crate::PostgresIdempotencyStore));
    /// retention 24 h, lock wait 10 s.
    pub fn new(pg: &Postgres) -> Self {
        TransactionalLayer {
            pg: pg.clone(),
            sql: Arc::new(StoreSql::new(&pg.table("postbox_idempotency"))),
            key: None,
            retention: Duration::from_secs(24 * 3600),
            lock_timeout: Some(Duration::from_secs(10)),
        }
    }

    /// Uses `f` instead of the message id as the key.
    pub fn key_fn<F: Fn(&Envelope) -> String + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.key = Some(Arc::new(f));
        self
    }

    /// How long a processed key is remembered.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a copy waits for a twin in flight on another consumer
    /// (`lock_timeout` of the transaction); after it the copy is retried
    /// later. `None`: wait as long as the twin's transaction lasts.
    pub fn lock_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Wraps `handler`.
    pub fn wrap<H: TransactionalHandler>(&self, handler: H) -> Transactional<H> {
        Transactional {
            inner: handler,
            config: self.clone(),
        }
    }
}

impl<H: TransactionalHandler> Layer<H> for TransactionalLayer {
    type Handler = Transactional<H>;
    fn layer(&self, inner: H) -> Transactional<H> {
        self.wrap(inner)
    }
}

/// The [`Handler`] made by [`TransactionalLayer`].
#[derive(Debug)]
pub struct Transactional<H> {
    inner: H,
    config: TransactionalLayer,
}

impl<H: TransactionalHandler> Transactional<H> {
    async fn run(&self, envelope: &Envelope) -> HandlerResult {
        let c = &self.config;
        let key = match &c.key {
            Some(f) => f(envelope),
            None => envelope.id.to_string(),
        };
        let mut client = c.pg.client().await.map_err(HandlerError::transient)?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| HandlerError::transient(pg("starting a transaction", e)))?;
        if let Some(t) = c.lock_timeout {
            let ms = format!("{}ms", millis(t));
            tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&ms])
                .await
                .map_err(|e| HandlerError::transient(pg("setting lock_timeout", e)))?;
        }
        let mark = tx
            .prepare_cached(&c.sql.claim)
            .await
            .map_err(|e| HandlerError::transient(pg("preparing the processed mark", e)))?;
        let token = new_token() as i64;
        let marked = tx
            .query_opt(&mark, &[&key, &token, &millis(c.retention), &"done"])
            .await;
        let marked = match marked {
            Ok(row) => row.is_some(),
            Err(e) if is_lock_timeout(&e) => {
                return Err(HandlerError::retry_after(
                    c.lock_timeout.unwrap_or(MIN_IN_FLIGHT_WAIT),
                    format!("message {key} is being processed by another consumer"),
                ));
            }
            Err(e) => return Err(HandlerError::transient(pg("writing the processed mark", e))),
        };
        if !marked {
            let row = tx
                .query_opt(c.sql.probe.as_str(), &[&key])
                .await
                .map_err(|e| HandlerError::transient(pg("reading the processed mark", e)))?;
            drop(tx); // rolls back
            return match taken(row) {
                Taken::Done => {
                    metrics::counter!(postbox_core::telemetry::DUPLICATES_SKIPPED).increment(1);
                    tracing::debug!(key = %key, "duplicate skipped (already committed)");
                    Ok(())
                }
                Taken::InFlight(remaining) => Err(HandlerError::retry_after(
                    remaining.max(MIN_IN_FLIGHT_WAIT),
                    format!("message {key} holds a live lease of another consumer"),
                )),
                Taken::Retry => Err(HandlerError::retry_after(
                    MIN_IN_FLIGHT_WAIT,
                    format!("the processed mark of {key} changed meanwhile"),
                )),
            };
        }
        match self.inner.handle(envelope, &tx).await {
            Ok(()) => {
                // A statement error the handler swallowed aborts the transaction,
                // and COMMIT of an aborted transaction silently rolls back: make
                // sure it is still alive, or the message would be acked without
                // its effect.
                tx.batch_execute("SELECT 1").await.map_err(|e| {
                    HandlerError::transient(pg(
                        "the handler's transaction failed (a statement error was ignored?)",
                        e,
                    ))
                })?;
                tx.commit().await.map_err(|e| {
                    HandlerError::transient(pg("committing the handler's transaction", e))
                })
            }
            Err(e) => {
                if let Err(rb) = tx.rollback().await {
                    tracing::debug!(error = %rb, "rollback failed; the connection drop rolls back");
                }
                Err(e)
            }
        }
    }
}

impl<H: TransactionalHandler> Handler for Transactional<H> {
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        self.run(envelope)
    }
}
