use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::error::{BoxError, Error};

/// What the runtime should do with a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Retry per the retry policy.
    Transient,
    /// Dead-letter now, without retries.
    Permanent,
    /// Retry after this delay (still bounded by the policy's attempt limit).
    RetryAfter(Duration),
}

/// Why a message failed; the `dlqreason` value (docs/design.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureReason {
    /// The handler returned an error.
    HandlerError,
    /// The message could not be decoded or upcast.
    Decode,
    /// The handler panicked.
    Panic,
    /// The handler ran out of time.
    Timeout,
    /// Transient failures used up every attempt.
    RetriesExhausted,
    /// Rejected outright (e.g. by a broker limit or a validation).
    Rejected,
}

impl FailureReason {
    /// The wire value, e.g. `handler-error`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::HandlerError => "handler-error",
            FailureReason::Decode => "decode",
            FailureReason::Panic => "panic",
            FailureReason::Timeout => "timeout",
            FailureReason::RetriesExhausted => "retries-exhausted",
            FailureReason::Rejected => "rejected",
        }
    }

    /// Parses a wire value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "handler-error" => FailureReason::HandlerError,
            "decode" => FailureReason::Decode,
            "panic" => FailureReason::Panic,
            "timeout" => FailureReason::Timeout,
            "retries-exhausted" => FailureReason::RetriesExhausted,
            "rejected" => FailureReason::Rejected,
            _ => return None,
        })
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified handler failure.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::{Disposition, HandlerError, ResultExt};
/// let e = HandlerError::transient("database unavailable");
/// assert_eq!(e.disposition(), Disposition::Transient);
/// let r: Result<u32, std::num::ParseIntError> = "x".parse::<u32>();
/// let e = r.permanent().unwrap_err();
/// assert_eq!(e.disposition(), Disposition::Permanent);
/// assert_eq!(e.error_type(), "core::num::error::ParseIntError");
/// // A message names no type: the classification stands in for it.
/// assert_eq!(HandlerError::transient("db down").error_type(), "transient");
/// let e = HandlerError::retry_after(Duration::from_secs(2), "rate limited");
/// assert_eq!(e.disposition(), Disposition::RetryAfter(Duration::from_secs(2)));
/// ```
pub struct HandlerError {
    disposition: Disposition,
    reason: FailureReason,
    message: String,
    error_type: Cow<'static, str>,
    source: Option<BoxError>,
}

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// The `dlqerrortype` of an error of Rust type `name`: the type where it says
/// something (`std::io::Error`), else how the error was classified — a `&str`,
/// a `String` or an already boxed error names no kind.
fn describe_type(name: &'static str, disposition: Disposition) -> &'static str {
    let says_nothing = name == "&str"
        || name.starts_with("&'")
        || name == "alloc::string::String"
        || name.starts_with("alloc::borrow::Cow<")
        || name.starts_with("alloc::boxed::Box<dyn ");
    if !says_nothing {
        return name;
    }
    match disposition {
        Disposition::Transient => "transient",
        Disposition::Permanent => "permanent",
        Disposition::RetryAfter(_) => "retry-after",
    }
}

impl HandlerError {
    fn from_error<E: Into<BoxError> + 'static>(disposition: Disposition, err: E) -> Self {
        let error_type = describe_type(std::any::type_name::<E>(), disposition);
        let boxed: BoxError = err.into();
        HandlerError {
            disposition,
            reason: FailureReason::HandlerError,
            message: boxed.to_string(),
            error_type: Cow::Borrowed(error_type),
            source: Some(boxed),
        }
    }

    /// A failure worth retrying (per the policy).
    pub fn transient<E: Into<BoxError> + 'static>(err: E) -> Self {
        Self::from_error(Disposition::Transient, err)
    }

    /// A failure no retry can fix: dead-letter now.
    pub fn permanent<E: Into<BoxError> + 'static>(err: E) -> Self {
        Self::from_error(Disposition::Permanent, err)
    }

    /// Retry after `delay` (e.g. a downstream `Retry-After`).
    pub fn retry_after<E: Into<BoxError> + 'static>(delay: Duration, err: E) -> Self {
        Self::from_error(Disposition::RetryAfter(delay), err)
    }

    /// A decode or upcast failure: permanent, reason `decode`.
    pub fn decode(err: Error) -> Self {
        let mut e = Self::from_error(Disposition::Permanent, err);
        e.reason = FailureReason::Decode;
        e.error_type = Cow::Borrowed("decode");
        e
    }

    /// A caught panic: transient, reason `panic`.
    pub fn panic(message: String) -> Self {
        HandlerError {
            disposition: Disposition::Transient,
            reason: FailureReason::Panic,
            message: format!("handler panicked: {message}"),
            error_type: Cow::Borrowed("panic"),
            source: None,
        }
    }

    /// A handler that ran out of time: transient, reason `timeout`.
    pub fn timeout(limit: Duration) -> Self {
        HandlerError {
            disposition: Disposition::Transient,
            reason: FailureReason::Timeout,
            message: format!("handler did not finish within {limit:?}"),
            error_type: Cow::Borrowed("timeout"),
            source: None,
        }
    }

    /// Overrides the reason.
    pub fn with_reason(mut self, reason: FailureReason) -> Self {
        self.reason = reason;
        self
    }

    /// What to do with the message.
    pub fn disposition(&self) -> Disposition {
        self.disposition
    }

    /// Why it failed.
    pub fn reason(&self) -> FailureReason {
        self.reason
    }

    /// The error message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The Rust type of the original error (`dlqerrortype`).
    pub fn error_type(&self) -> &str {
        &self.error_type
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("disposition", &self.disposition)
            .field("reason", &self.reason)
            .field("message", &self.message)
            .field("error_type", &self.error_type)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?}): {}",
            self.reason, self.disposition, self.message
        )
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Classifies any `Result` error as a [`HandlerError`].
pub trait ResultExt<T> {
    /// Errors are transient.
    fn transient(self) -> Result<T, HandlerError>;
    /// Errors are permanent.
    fn permanent(self) -> Result<T, HandlerError>;
    /// Errors retry after `delay`.
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError> + 'static> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
    fn retry_after(self, delay: Duration) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::retry_after(delay, e))
    }
}
