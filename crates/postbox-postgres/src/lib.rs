//! # postbox-postgres
//!
//! PostgreSQL for postbox (docs/design.md §5–§6): a shared [idempotency
//! store](PostgresIdempotencyStore) with lease semantics, a
//! [transactional](TransactionalLayer) handler variant that writes the
//! processed mark in the handler's own database transaction, and the
//! transactional [outbox](Outbox) with its [relay](Relay).
//!
//! Driver: [`tokio_postgres`] with a [`deadpool_postgres`] pool (both
//! re-exported, so your code uses the same versions). Connections are
//! plain TCP (`NoTls`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use postbox_core::{CancellationToken, Envelope, Publisher};
//! use postbox_postgres::{Outbox, Postgres, PostgresConfig};
//! # async fn demo(broker: Arc<dyn Publisher>) -> Result<(), postbox_core::Error> {
//! let pg = Postgres::connect(PostgresConfig::from_env()?.schema("shop")).await?;
//! pg.migrate().await?; // or run the SQL of `postbox_postgres::migrations` yourself
//!
//! // Write the order and its event in one transaction.
//! let outbox = Outbox::new(&pg);
//! let mut client = pg.client().await?;
//! let tx = client.transaction().await.unwrap();
//! tx.execute("INSERT INTO orders (id) VALUES (1)", &[]).await.unwrap();
//! outbox.enqueue(&tx, "orders", &Envelope::new("order.placed", r#"{"id":1}"#)).await?;
//! tx.commit().await.unwrap();
//!
//! // Publish what was committed, in order per partition key.
//! let stop = CancellationToken::new();
//! let relay = outbox.relay(broker).spawn(stop.clone());
//! // … on shutdown:
//! stop.cancel();
//! relay.await.unwrap()?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod error;
pub mod idempotency;
pub mod migrations;
pub mod outbox;
pub mod transactional;

use std::sync::Arc;

use postbox_core::{Error, ErrorKind};

pub use config::{PostgresConfig, RecyclingMethod};
pub use idempotency::PostgresIdempotencyStore;
pub use outbox::{Backlog, Outbox, Relay, RelayReport, RelayStats, SentRows};
pub use transactional::{
    tx_handler_fn, Transactional, TransactionalHandler, TransactionalLayer, TxFn,
};

/// The pool, re-exported.
pub use deadpool_postgres;
/// The driver, re-exported.
pub use tokio_postgres;

/// A pooled connection.
pub type PooledClient = deadpool_postgres::Object;

/// A PostgreSQL connection pool plus the schema of postbox's tables; cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    pool: deadpool_postgres::Pool,
    config: PostgresConfig,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("config", &self.inner.config)
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

impl Postgres {
    /// Creates the pool and checks that the database answers.
    pub async fn connect(config: PostgresConfig) -> Result<Self, Error> {
        let pg = Self::lazy(config)?;
        let client = pg.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| error::pg("checking the PostgreSQL connection", e))?;
        Ok(pg)
    }

    /// Creates the pool without connecting (the first use connects).
    pub fn lazy(config: PostgresConfig) -> Result<Self, Error> {
        config.validate()?;
        let manager = deadpool_postgres::Manager::from_config(
            config.pg.clone(),
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: config.recycling.clone(),
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(config.wait_timeout))
            .create_timeout(config.pg.get_connect_timeout().copied())
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Config, "building the PostgreSQL pool").with_source(e)
            })?;
        Ok(Postgres {
            inner: Arc::new(Inner { pool, config }),
        })
    }

    /// Applies the shipped migrations not applied yet (see [`migrations`]);
    /// returns the versions applied by this call. Safe to call from many
    /// replicas at once.
    pub async fn migrate(&self) -> Result<Vec<i32>, Error> {
        let mut client = self.client().await?;
        migrations::migrate(&mut client, self.schema()).await
    }

    /// A pooled connection (use it for your own transactions).
    pub async fn client(&self) -> Result<PooledClient, Error> {
        self.inner.pool.get().await.map_err(error::pool)
    }

    /// The pool.
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.inner.pool
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The schema of postbox's tables.
    pub fn schema(&self) -> &str {
        &self.inner.config.schema
    }

    /// `"schema".name`, for SQL.
    pub(crate) fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.schema())
    }
}
