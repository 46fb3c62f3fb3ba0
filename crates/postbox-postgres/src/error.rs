//! Mapping PostgreSQL and pool errors onto [`postbox_core::Error`].
//!
//! The driver error is kept as `source()`; the kind says whether trying again
//! can help ([`Error::is_retryable`]): a lost connection, a time-out, a lock
//! time-out, a serialization failure or a deadlock are retryable; a missing
//! table (run [`crate::Postgres::migrate`]), bad credentials or bad SQL are not.

use postbox_core::{Error, ErrorKind};
use tokio_postgres::error::SqlState;

/// Converts a driver error, with `context` saying what was being done.
pub(crate) fn pg(context: &str, err: tokio_postgres::Error) -> Error {
    Error::new(kind_of(&err), format!("{context}: {}", describe(&err))).with_source(err)
}

/// Converts an error of the connection pool.
pub(crate) fn pool(err: deadpool_postgres::PoolError) -> Error {
    use deadpool_postgres::PoolError;
    match err {
        PoolError::Backend(e) => pg("connecting to PostgreSQL", e),
        PoolError::Timeout(_) => Error::new(
            ErrorKind::Timeout,
            "no PostgreSQL connection became available in time",
        )
        .with_source(err),
        PoolError::Closed => {
            Error::new(ErrorKind::Closed, "the PostgreSQL pool is closed").with_source(err)
        }
        other => Error::new(
            ErrorKind::Connection,
            format!("getting a PostgreSQL connection: {other}"),
        )
        .with_source(other),
    }
}

/// The SQLSTATE of a database error, if it is one.
pub(crate) fn sqlstate(err: &tokio_postgres::Error) -> Option<&SqlState> {
    err.code()
}

/// Whether the error is `lock_not_available` (a `lock_timeout` ran out).
pub(crate) fn is_lock_timeout(err: &tokio_postgres::Error) -> bool {
    sqlstate(err) == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

/// The kind of a driver error.
pub(crate) fn kind_of(err: &tokio_postgres::Error) -> ErrorKind {
    if err.is_closed() {
        return ErrorKind::Connection;
    }
    let Some(code) = err.code() else {
        // No SQLSTATE: I/O, protocol, or a client-side conversion problem.
        let text = err.to_string();
        return if text.contains("timed out") || text.contains("timeout") {
            ErrorKind::Timeout
        } else if err.as_db_error().is_none()
            && (text.contains("error connecting")
                || text.contains("connection")
                || text.contains("communicating"))
        {
            ErrorKind::Connection
        } else {
            ErrorKind::Other
        };
    };
    let class = &code.code()[..2];
    match class {
        "08" | "57" if *code != SqlState::QUERY_CANCELED => ErrorKind::Connection,
        "28" => ErrorKind::Config,   // invalid authorization
        "3D" => ErrorKind::Config,   // no such database
        "53" => ErrorKind::Rejected, // insufficient resources (too many connections, …)
        "40" => ErrorKind::Rejected, // serialization failure, deadlock: retry
        _ if *code == SqlState::QUERY_CANCELED => ErrorKind::Timeout,
        _ if *code == SqlState::LOCK_NOT_AVAILABLE => ErrorKind::Timeout,
        _ if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::INVALID_SCHEMA_NAME => {
            ErrorKind::NotFound
        }
        _ => ErrorKind::Other,
    }
}
