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
//!
//! A configuration error about a secret property (see
//! `config::is_secret`) keeps neither librdkafka's description nor the
//! rdkafka error: both quote the value.

use postbox_core::{Error, ErrorKind, Limit};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The librdkafka error code inside `e`, if it carries one.
pub(crate) fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

/// The postbox kind of a librdkafka error code.
pub(crate) fn kind_of_code(code: RDKafkaErrorCode) -> ErrorKind {
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
pub(crate) fn from_kafka(
    message: impl Into<std::borrow::Cow<'static, str>>,
    e: KafkaError,
) -> Error {
    if let KafkaError::ClientConfig(_, description, key, _) = &e {
        let message = message.into();
        if crate::config::is_secret(key) {
            return Error::new(
                ErrorKind::Config,
                format!("{message}: invalid value for the configuration property {key}"),
            );
        }
        let text = format!("{message}: {description}");
        return Error::new(ErrorKind::Config, text).with_source(e);
    }
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
#[cfg(test)]
fn is_retryable(e: &KafkaError) -> bool {
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

    #[test]
    fn config_errors_of_secret_properties_do_not_quote_the_value() {
        use rdkafka::types::RDKafkaConfRes;
        let e = from_kafka(
            "creating the producer failed",
            KafkaError::ClientConfig(
                RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                "Invalid value \"hunter2\" for configuration property \"sasl.password\"".into(),
                "sasl.password".into(),
                "hunter2".into(),
            ),
        );
        assert_eq!(e.kind(), &ErrorKind::Config);
        let text = format!("{e} {e:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("sasl.password"), "{text}");
        let e = from_kafka(
            "x",
            KafkaError::ClientConfig(
                RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
                "No such configuration property: \"lingr.ms\"".into(),
                "lingr.ms".into(),
                "5".into(),
            ),
        );
        assert!(e.to_string().contains("lingr.ms"), "{e}");
    }
}
