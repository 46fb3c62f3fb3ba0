//! Connection and pool configuration.

use std::fmt;
use std::time::Duration;

use postbox_core::{Error, ErrorKind};

pub use deadpool_postgres::RecyclingMethod;

/// How to reach PostgreSQL and where postbox's tables live.
///
/// The native [`tokio_postgres::Config`] is passed through unchanged (hosts,
/// TLS-free options, application name, timeouts, …); postbox adds the schema
/// of its tables and the pool settings. `Debug` never prints the password.
///
/// ```
/// use postbox_postgres::PostgresConfig;
/// let config = PostgresConfig::from_url("postgres://app:secret@db:5432/shop")
///     .unwrap()
///     .schema("messaging")
///     .pool_size(8);
/// let shown = format!("{config:?}");
/// assert!(shown.contains("messaging"));
/// assert!(!shown.contains("secret"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// The driver configuration (passthrough).
    pub pg: tokio_postgres::Config,
    /// Schema of postbox's tables (`postbox_idempotency`, `postbox_outbox`,
    /// `postbox_migrations`); default `public`.
    pub schema: String,
    /// Maximum pooled connections (default 16).
    pub pool_size: usize,
    /// How long to wait for a pooled connection (default 30 s).
    pub wait_timeout: Duration,
    /// How a returned connection is checked before reuse (default `Fast`: only
    /// whether it is closed; `Verified` runs a test query).
    pub recycling: RecyclingMethod,
}

/// Variable read by [`PostgresConfig::from_env`].
pub const DATABASE_URL: &str = "DATABASE_URL";

impl PostgresConfig {
    /// A configuration from a native driver configuration.
    pub fn new(pg: tokio_postgres::Config) -> Self {
        let mut pg = pg;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(10));
        }
        PostgresConfig {
            pg,
            schema: "public".to_string(),
            pool_size: 16,
            wait_timeout: Duration::from_secs(30),
            recycling: RecyclingMethod::Fast,
        }
    }

    /// Parses a `postgres://user:password@host:port/db?options` URL (or a
    /// `key=value` connection string).
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let pg: tokio_postgres::Config = url.parse().map_err(|e| {
            // The URL may contain a password: it is not repeated in the message.
            Error::new(ErrorKind::Config, "invalid PostgreSQL connection string").with_source(e)
        })?;
        Ok(Self::new(pg))
    }

    /// Reads the URL from `DATABASE_URL`.
    pub fn from_env() -> Result<Self, Error> {
        let url = std::env::var(DATABASE_URL).map_err(|_| {
            Error::new(
                ErrorKind::Config,
                format!("{DATABASE_URL} is not set (expected postgres://user:password@host/db)"),
            )
        })?;
        Self::from_url(&url)
    }

    /// Sets the schema of postbox's tables (ASCII letters, digits, `_`; at
    /// most 40 characters; created by [`migrate`](crate::Postgres::migrate)).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the maximum number of pooled connections.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Sets how long to wait for a pooled connection.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Sets how pooled connections are checked before reuse.
    pub fn recycling(mut self, method: RecyclingMethod) -> Self {
        self.recycling = method;
        self
    }

    /// Checks the schema name (it is spliced into SQL as an identifier).
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let s = &self.schema;
        let ok = !s.is_empty()
            && s.len() <= 40
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit());
        if ok {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Config,
                format!(
                    "invalid schema name {s:?}: use 1 to 40 lowercase ASCII letters, digits or `_`, not starting with a digit"
                ),
            ))
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        f.debug_struct("PostgresConfig")
            .field("hosts", &hosts)
            .field("ports", &self.pg.get_ports())
            .field("dbname", &self.pg.get_dbname())
            .field("user", &self.pg.get_user())
            .field("password", &self.pg.get_password().map(|_| "<redacted>"))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("wait_timeout", &self.wait_timeout)
            .field("recycling", &self.recycling)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_password() {
        let c = PostgresConfig::from_url("postgres://u:hunter2@localhost:5433/db").unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("<redacted>") && s.contains("5433") && s.contains("localhost"));
    }

    #[test]
    fn bad_url_is_a_config_error_without_the_secret() {
        let e = PostgresConfig::from_url("postgres://u:hunter2@host:notaport/db").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config);
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn schema_names_are_validated() {
        let c = PostgresConfig::from_url("postgres://localhost/db").unwrap();
        assert!(c.clone().schema("app_1").validate().is_ok());
        for bad in ["", "App", "a;drop", "1abc", "a\"b", &"x".repeat(41)] {
            assert!(c.clone().schema(bad).validate().is_err(), "{bad:?}");
        }
    }
}
