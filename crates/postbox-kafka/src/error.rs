//! Mapping rdkafka errors onto [`postbox_core::Error`] (kind + source).
//!
//! The rdkafka error is always kept as `source()`; the kind decides
//! [`Error::is_retryable`] / [`Error::is_permanent`]:
//!
//! | librdkafka error | kind |
//! |---|---|
//! | transport, all brokers down, not coordinator, leader unavailable | `Connection` (retryable) |
//! | message timed out, request timed out, queue full | `Timeout` (retryable) |
//! | unknown topic or partition | `NotFound` (permanent) |
//! | message too large | `LimitExceeded(BodySize)` (permanent) |
//! | client creation / configuration | `Config` (permanent) |
//! | other broker refusals (authorization, invalid record, …) | `Rejected` |

use postbox_core::{Error, ErrorKind, Limit};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The librdkafka error code inside `e`, if it carries one.
pub(crate) fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

/// The postbox kind of a librdkafka error code.
pub fn kind_of_code(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NotCoordinator
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend => ErrorKind::Connection,
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut | C::QueueFull => {
            ErrorKind::Timeout
        }
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => ErrorKind::NotFound,
        C::InvalidArgument | C::InvalidConfig | C::UnsupportedFeature => ErrorKind::Config,
        C::Fatal => ErrorKind::Closed,
        _ => ErrorKind::Rejected,
    }
}

/// Converts an rdkafka error into a postbox error with `message` as context;
/// the rdkafka error stays as `source()`.
pub fn from_kafka(message: impl Into<std::borrow::Cow<'static, str>>, e: KafkaError) -> Error {
    let kind = match &e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
        KafkaError::Canceled => ErrorKind::Closed,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => {
            ErrorKind::LimitExceeded(Limit::BodySize { max: 0, actual: 0 })
        }
        other => match code_of(other) {
            Some(code) => kind_of_code(code),
            None => ErrorKind::Other,
        },
    };
    Error::new(kind, message).with_source(e)
}

/// Whether the error is worth retrying (the same classification as the
/// [`ErrorKind`] it maps to).
pub fn is_retryable(e: &KafkaError) -> bool {
    from_kafka("", e.clone()).is_retryable()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn kinds_and_sources() {
        let e = from_kafka(
            "publish failed",
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        );
        assert_eq!(e.kind(), &ErrorKind::Timeout);
        assert!(e.is_retryable());
        assert!(e.source().is_some());
        let e = from_kafka(
            "x",
            KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition),
        );
        assert!(e.is_permanent());
        assert!(is_retryable(&KafkaError::MessageProduction(
            RDKafkaErrorCode::AllBrokersDown
        )));
        assert_eq!(
            from_kafka("x", KafkaError::ClientCreation("bad".into())).kind(),
            &ErrorKind::Config
        );
    }
}
