//! The error type shared by every postbox crate surface.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Boxed error source kept as [`std::error::Error::source`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A limit a broker (or a broker profile of the in-memory broker) enforces.
///
/// Carried by [`ErrorKind::LimitExceeded`] so the caller learns *which* limit a
/// message broke, and by how much.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// The encoded message is larger than the broker accepts.
    BodySize {
        /// Largest accepted size in bytes.
        max: usize,
        /// Size of the rejected message in bytes.
        actual: usize,
    },
    /// More message attributes / headers than the broker accepts.
    AttributeCount {
        /// Largest accepted number of attributes.
        max: usize,
        /// Number of attributes the message would need.
        actual: usize,
    },
    /// A delivery delay longer than the broker supports.
    Delay {
        /// Longest supported delay.
        max: Duration,
        /// The delay that was asked for.
        requested: Duration,
    },
    /// A visibility timeout (retry delay) longer than the broker supports.
    Visibility {
        /// Longest supported visibility timeout.
        max: Duration,
        /// The timeout that was asked for.
        requested: Duration,
    },
    /// A FIFO destination needs a partition key (message group id).
    FifoGroupRequired,
    /// A FIFO destination does not support per-message delays.
    FifoDelayUnsupported,
    /// More entries in one batch call than the broker accepts.
    BatchSize {
        /// Largest accepted batch.
        max: usize,
        /// Size of the rejected batch.
        actual: usize,
    },
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::BodySize { max, actual } => {
                write!(
                    f,
                    "message size {actual} bytes exceeds the limit of {max} bytes"
                )
            }
            Limit::AttributeCount { max, actual } => {
                write!(f, "{actual} message attributes exceed the limit of {max}")
            }
            Limit::Delay { max, requested } => {
                write!(f, "delay of {requested:?} exceeds the maximum of {max:?}")
            }
            Limit::Visibility { max, requested } => write!(
                f,
                "visibility timeout of {requested:?} exceeds the maximum of {max:?}"
            ),
            Limit::FifoGroupRequired => {
                f.write_str("a FIFO destination needs a partition key (message group id)")
            }
            Limit::FifoDelayUnsupported => {
                f.write_str("a FIFO destination does not support per-message delays")
            }
            Limit::BatchSize { max, actual } => {
                write!(f, "batch of {actual} entries exceeds the limit of {max}")
            }
        }
    }
}

/// What went wrong, coarsely: the part of an [`Error`] code can match on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker could not be reached or the connection dropped.
    Connection,
    /// An operation did not finish in time.
    Timeout,
    /// The broker refused the message (negative acknowledgement, failed batch entry).
    Rejected,
    /// The broker accepted the message but could route it nowhere.
    Unroutable,
    /// The message breaks a broker limit; checked before sending.
    LimitExceeded(Limit),
    /// Bytes that could not be decoded into an envelope.
    Decode,
    /// An envelope that could not be encoded (e.g. a reserved header name).
    Encode,
    /// Invalid configuration.
    Config,
    /// The client, consumer or broker is closed.
    Closed,
    /// A destination, queue or subscription that does not exist.
    NotFound,
    /// A settle operation (ack, retry, release) failed, e.g. the receipt expired.
    Settle,
    /// The broker cannot do this (a capability it does not have).
    Unsupported,
    /// Anything else; see the message and source.
    Other,
}

impl ErrorKind {
    fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Unroutable => "unroutable",
            ErrorKind::LimitExceeded(_) => "limit exceeded",
            ErrorKind::Decode => "decode",
            ErrorKind::Encode => "encode",
            ErrorKind::Config => "configuration",
            ErrorKind::Closed => "closed",
            ErrorKind::NotFound => "not found",
            ErrorKind::Settle => "settle",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Other => "other",
        }
    }
}

/// The postbox error: a [`kind`](Error::kind), a message, and the underlying
/// broker or library error as [`source`](std::error::Error::source).
///
/// ```
/// use postbox_core::{Error, ErrorKind};
/// let err = Error::new(ErrorKind::Timeout, "publish confirm did not arrive");
/// assert!(err.is_retryable());
/// assert!(!err.is_permanent());
/// ```
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                source: None,
            }),
        }
    }

    /// Attaches the underlying error, kept as `source()`.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// An [`ErrorKind::LimitExceeded`] error for `limit`.
    pub fn limit(limit: Limit) -> Self {
        let message = limit.to_string();
        Error::new(ErrorKind::LimitExceeded(limit), message)
    }

    /// What kind of error this is.
    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// The message, without the source chain.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// The limit that was exceeded, if this is a [`ErrorKind::LimitExceeded`].
    pub fn exceeded_limit(&self) -> Option<&Limit> {
        match &self.inner.kind {
            ErrorKind::LimitExceeded(limit) => Some(limit),
            _ => None,
        }
    }

    /// Whether trying the same operation again may succeed (connection loss,
    /// time-outs, a closed channel that reconnects, a settle that raced).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::Closed
                | ErrorKind::Rejected
                | ErrorKind::Settle
        )
    }

    /// Whether trying again with the same input can never succeed (bad bytes,
    /// a broken limit, bad configuration, an unroutable destination).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::LimitExceeded(_)
                | ErrorKind::Decode
                | ErrorKind::Encode
                | ErrorKind::Config
                | ErrorKind::Unroutable
                | ErrorKind::NotFound
                | ErrorKind::Unsupported
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.kind.as_str(), self.inner.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn classification_is_disjoint() {
        let kinds = [
            ErrorKind::Connection,
            ErrorKind::Timeout,
            ErrorKind::Rejected,
            ErrorKind::Unroutable,
            ErrorKind::LimitExceeded(Limit::FifoGroupRequired),
            ErrorKind::Decode,
            ErrorKind::Encode,
            ErrorKind::Config,
            ErrorKind::Closed,
            ErrorKind::NotFound,
            ErrorKind::Settle,
            ErrorKind::Other,
        ];
        for kind in kinds {
            let e = Error::new(kind.clone(), "x");
            assert!(
                !(e.is_retryable() && e.is_permanent()),
                "{kind:?} is both retryable and permanent"
            );
        }
    }

    #[test]
    fn source_is_kept_not_flattened() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = Error::new(ErrorKind::Connection, "lost broker").with_source(io);
        assert_eq!(e.to_string(), "connection: lost broker");
        assert_eq!(e.source().unwrap().to_string(), "reset by peer");
        assert!(e.is_retryable());
    }

    #[test]
    fn limit_error_names_the_limit() {
        let e = Error::limit(Limit::AttributeCount {
            max: 10,
            actual: 12,
        });
        assert!(e.is_permanent());
        assert_eq!(
            e.exceeded_limit(),
            Some(&Limit::AttributeCount {
                max: 10,
                actual: 12
            })
        );
        assert!(e
            .to_string()
            .contains("12 message attributes exceed the limit of 10"));
    }
}
