//! Mapping lapin / AMQP errors onto [`postbox_core::Error`].
//!
//! The lapin error is always kept as `source()`. Classification:
//!
//! | broker error | [`ErrorKind`] | retryable |
//! |---|---|---|
//! | I/O error, missing heartbeat, connection or channel not open | `Connection` / `Closed` | yes |
//! | `404 NOT_FOUND` (queue or exchange missing) | `NotFound` | no |
//! | `406 PRECONDITION_FAILED` (declared with other arguments) | `Config` | no |
//! | `403 ACCESS_REFUSED` | `Config` | no |
//! | `311 CONTENT_TOO_LARGE` | `Rejected` | yes (as core says) |
//! | `312 NO_ROUTE` (a returned mandatory publish) | `Unroutable` | no |
//! | anything else | `Other` | no |

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use postbox_core::{Error, ErrorKind};

/// Converts a lapin error into core's error, with `what` describing the operation.
pub(crate) fn from_lapin(what: impl Into<String>, e: lapin::Error) -> Error {
    let kind = kind_of(&e);
    Error::new(kind, format!("{}: {e}", what.into())).with_source(e)
}

/// The [`ErrorKind`] a lapin error maps to.
pub(crate) fn kind_of(e: &lapin::Error) -> ErrorKind {
    use lapin::ErrorKind as K;
    match e.kind() {
        K::IOError(_) | K::MissingHeartbeatError | K::RuntimeShutdownError(_) => {
            ErrorKind::Connection
        }
        K::InvalidChannelState(..) | K::InvalidConnectionState(_) | K::InvalidChannel(_) => {
            ErrorKind::Closed
        }
        K::ChannelsLimitReached => ErrorKind::Connection,
        K::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            | AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Config,
            AMQPErrorKind::Soft(AMQPSoftError::NOROUTE) => ErrorKind::Unroutable,
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => ErrorKind::Rejected,
            AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => ErrorKind::Rejected,
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => ErrorKind::Connection,
            _ => ErrorKind::Other,
        },
        K::InvalidProtocolVersion(_) | K::AuthProviderError(_) | K::NoDefaultRuntime => {
            ErrorKind::Config
        }
        _ => ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_connection_errors_and_retryable() {
        let e: lapin::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into();
        assert_eq!(kind_of(&e), ErrorKind::Connection);
        let mapped = from_lapin("publishing", e);
        assert!(mapped.is_retryable());
        assert_eq!(mapped.kind(), &ErrorKind::Connection);
        assert!(std::error::Error::source(&mapped).is_some());
    }
}
