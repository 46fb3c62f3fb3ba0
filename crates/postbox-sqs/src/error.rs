//! Mapping AWS SDK errors onto [`postbox_core::Error`] (kind + source).
//!
//! * transport failures (connection refused, DNS, TLS) → [`ErrorKind::Connection`];
//! * time-outs → [`ErrorKind::Timeout`];
//! * throttling and 5xx service errors → [`ErrorKind::Connection`] (retryable);
//! * a queue or topic that does not exist → [`ErrorKind::NotFound`];
//! * an expired or invalid receipt handle → [`ErrorKind::Settle`];
//! * bad credentials or permissions → [`ErrorKind::Config`];
//! * invalid message contents → [`ErrorKind::Encode`];
//! * any other service error → [`ErrorKind::Rejected`].
//!
//! The SDK error is always kept as `source()`.

use std::fmt;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use postbox_core::{Error, ErrorKind};

/// Error codes meaning "no such queue / topic".
const NOT_FOUND: &[&str] = &[
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "NotFound",
    "NotFoundException",
    "ResourceNotFoundException",
];

/// Error codes meaning "the receipt handle is no longer usable".
const SETTLE: &[&str] = &[
    "ReceiptHandleIsInvalid",
    "InvalidReceiptHandle",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
];

const THROTTLED: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "ThrottledException",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "KMSThrottling",
];

const AUTH: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "AuthorizationError",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "MissingAuthenticationToken",
];

const CONTENTS: &[&str] = &[
    "InvalidMessageContents",
    "AWS.SimpleQueueService.InvalidMessageContents",
];

/// Classifies an error code returned by SQS or SNS.
pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    if NOT_FOUND.contains(&code) {
        ErrorKind::NotFound
    } else if SETTLE.contains(&code) {
        ErrorKind::Settle
    } else if THROTTLED.contains(&code) {
        ErrorKind::Connection
    } else if AUTH.contains(&code) {
        ErrorKind::Config
    } else if CONTENTS.contains(&code) {
        ErrorKind::Encode
    } else {
        ErrorKind::Rejected
    }
}

/// Maps an SDK error of any SQS/SNS operation, keeping it as the source.
pub(crate) fn from_sdk<E, R>(what: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let (kind, detail) = match &err {
        SdkError::ConstructionFailure(_) => {
            (ErrorKind::Config, "request could not be built".into())
        }
        SdkError::TimeoutError(_) => (ErrorKind::Timeout, "timed out".into()),
        SdkError::DispatchFailure(d) => {
            if d.is_timeout() {
                (ErrorKind::Timeout, "timed out".into())
            } else {
                (ErrorKind::Connection, "endpoint unreachable".into())
            }
        }
        SdkError::ResponseError(_) => (ErrorKind::Connection, "invalid response".into()),
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown");
            let mut kind = kind_of_code(code);
            if kind == ErrorKind::Rejected
                && e.message().is_some_and(|m| m.contains("does not exist"))
            {
                kind = ErrorKind::NotFound;
            }
            (kind, format!("{code}: {}", e.message().unwrap_or("")))
        }
        _ => (ErrorKind::Other, "unexpected SDK error".into()),
    };
    Error::new(kind, format!("{what} failed: {detail}")).with_source(err)
}

/// One failed entry of a batch call (`SendMessageBatch`, `PublishBatch`,
/// `DeleteMessageBatch`, `ChangeMessageVisibilityBatch`), kept as the source
/// of the per-message [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchEntryError {
    /// The error code, e.g. `InvalidMessageContents`.
    pub code: String,
    /// The message the service gave.
    pub message: Option<String>,
    /// Whether the caller's input was at fault (not worth retrying as is).
    pub sender_fault: bool,
}

impl fmt::Display for BatchEntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        if self.sender_fault {
            f.write_str(" (sender fault)")?;
        }
        Ok(())
    }
}

impl std::error::Error for BatchEntryError {}

impl BatchEntryError {
    /// The postbox error for this entry: kind from the code, this as source.
    pub(crate) fn into_error(self, what: &str) -> Error {
        let mut kind = kind_of_code(&self.code);
        if kind == ErrorKind::Rejected && !self.sender_fault {
            kind = ErrorKind::Connection;
        }
        Error::new(kind, format!("{what}: entry failed: {self}")).with_source(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(
            kind_of_code("AWS.SimpleQueueService.NonExistentQueue"),
            ErrorKind::NotFound
        );
        assert_eq!(kind_of_code("ReceiptHandleIsInvalid"), ErrorKind::Settle);
        assert_eq!(kind_of_code("ThrottlingException"), ErrorKind::Connection);
        assert_eq!(kind_of_code("InvalidMessageContents"), ErrorKind::Encode);
        assert_eq!(kind_of_code("InvalidParameterValue"), ErrorKind::Rejected);
    }

    #[test]
    fn batch_entry_keeps_its_source() {
        use std::error::Error as _;
        let e = BatchEntryError {
            code: "InvalidMessageContents".into(),
            message: Some("bad char".into()),
            sender_fault: true,
        }
        .into_error("send");
        assert_eq!(e.kind(), &ErrorKind::Encode);
        assert!(e.source().unwrap().to_string().contains("bad char"));
        let server = BatchEntryError {
            code: "InternalErrorX".into(),
            message: None,
            sender_fault: false,
        }
        .into_error("send");
        assert!(server.is_retryable());
    }
}
