//! CloudEvents 1.0 codecs for [`Envelope`](crate::Envelope).
//!
//! * [`structured`]: the whole envelope as one CloudEvents JSON document
//!   (`application/cloudevents+json`); `data` for JSON payloads, `data_base64`
//!   for anything that is not. Used where headers are scarce (SQS, SNS).
//! * [`binary`]: the metadata as an attribute map that adapters turn into
//!   headers with their own prefix (`ce_` on Kafka, `cloudEvents:` on AMQP),
//!   the payload as the message body.
//! * [`foreign`]: an envelope for a message that was not produced by postbox
//!   (no CloudEvents attributes), so it can still be consumed.
//!
//! Decoding never panics: malformed input is an [`ErrorKind::Decode`](crate::ErrorKind::Decode) error
//! that says what was wrong.

pub mod binary;
pub mod foreign;
pub mod structured;

use std::time::SystemTime;

use crate::error::{Error, ErrorKind};

/// The CloudEvents specification version postbox writes and reads.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of a structured-mode CloudEvents JSON document.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// CloudEvents attribute names used by the envelope.
pub mod attr {
    /// `specversion`
    pub const SPECVERSION: &str = "specversion";
    /// `id`
    pub const ID: &str = "id";
    /// `type`
    pub const TYPE: &str = "type";
    /// `source`
    pub const SOURCE: &str = "source";
    /// `time`
    pub const TIME: &str = "time";
    /// `datacontenttype`
    pub const DATACONTENTTYPE: &str = "datacontenttype";
    /// `subject`
    pub const SUBJECT: &str = "subject";
    /// extension `dataversion`: the payload schema version
    pub const DATAVERSION: &str = "dataversion";
    /// extension `correlationid`
    pub const CORRELATIONID: &str = "correlationid";
    /// extension `causationid`
    pub const CAUSATIONID: &str = "causationid";
    /// extension `partitionkey` (CloudEvents partitioning extension)
    pub const PARTITIONKEY: &str = "partitionkey";
    /// extension `traceparent` (CloudEvents distributed tracing extension)
    pub const TRACEPARENT: &str = "traceparent";
    /// extension `tracestate`
    pub const TRACESTATE: &str = "tracestate";
    /// extension `attempt`: delivery attempt number
    pub const ATTEMPT: &str = "attempt";
    /// structured mode: the payload as JSON
    pub const DATA: &str = "data";
    /// structured mode: the payload as base64
    pub const DATA_BASE64: &str = "data_base64";
}

/// Attribute names a user header may not use: they belong to envelope fields.
pub const RESERVED: &[&str] = &[
    attr::SPECVERSION,
    attr::ID,
    attr::TYPE,
    attr::SOURCE,
    attr::TIME,
    attr::DATACONTENTTYPE,
    attr::SUBJECT,
    attr::DATAVERSION,
    attr::CORRELATIONID,
    attr::CAUSATIONID,
    attr::PARTITIONKEY,
    attr::TRACEPARENT,
    attr::TRACESTATE,
    attr::ATTEMPT,
    attr::DATA,
    attr::DATA_BASE64,
];

/// Whether `name` is reserved for an envelope field.
pub fn is_reserved(name: &str) -> bool {
    RESERVED.contains(&name)
}

/// Whether a content type says the payload is JSON (`application/json`, `*+json`, `text/json`).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

pub(crate) fn decode_error(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Decode, message)
}

pub(crate) fn encode_error(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Encode, message)
}

/// Formats a time as RFC 3339 in UTC with the sub-second digits it has.
pub fn format_time(t: SystemTime) -> Result<String, Error> {
    // Checked conversion: `OffsetDateTime::from(SystemTime)` panics out of range.
    let nanos: i128 = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|e| encode_error("time is out of the RFC 3339 range").with_source(e))?;
    dt.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| encode_error("time cannot be written as RFC 3339").with_source(e))
}

/// Parses an RFC 3339 time.
pub fn parse_time(s: &str) -> Result<SystemTime, Error> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            decode_error(format!("`time` is not an RFC 3339 timestamp: {s:?}")).with_source(e)
        })?;
    Ok(SystemTime::from(dt))
}

pub(crate) fn parse_attempt(s: &str) -> Result<u32, Error> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(decode_error(format!(
            "`attempt` must be a whole number from 1 up, got {s:?}"
        ))),
    }
}

pub(crate) fn check_encodable(env: &crate::Envelope) -> Result<(), Error> {
    if env.id.as_str().is_empty() {
        return Err(encode_error("the envelope id is empty"));
    }
    if env.event_type.is_empty() {
        return Err(encode_error("the envelope type is empty"));
    }
    if env.source.is_empty() {
        return Err(encode_error("the envelope source is empty"));
    }
    if env.attempt == 0 {
        return Err(encode_error("attempt numbers start at 1"));
    }
    if let Some(name) = env.headers.keys().find(|k| is_reserved(k)) {
        return Err(encode_error(format!(
            "header {name:?} is reserved for an envelope field"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.shop.order+json"));
        assert!(!is_json_content_type("application/octet-stream"));
        assert!(!is_json_content_type("text/plain"));
    }

    #[test]
    fn far_future_time_is_an_error_not_a_panic() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(400_000_000_000);
        assert_eq!(format_time(t).unwrap_err().kind(), &ErrorKind::Encode);
        let env = crate::Envelope::builder("t").time(t).build();
        assert_eq!(
            crate::codec::structured::encode(&env).unwrap_err().kind(),
            &ErrorKind::Encode
        );
        assert_eq!(
            crate::codec::binary::encode(&env).unwrap_err().kind(),
            &ErrorKind::Encode
        );
    }

    #[test]
    fn time_round_trips_with_nanoseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        let s = format_time(t).unwrap();
        assert_eq!(s, "2023-11-14T22:13:20.123456789Z");
        assert_eq!(parse_time(&s).unwrap(), t);
        assert_eq!(
            parse_time("2023-11-14T23:13:20.123456789+01:00").unwrap(),
            t
        );
        assert_eq!(
            parse_time("yesterday").unwrap_err().kind(),
            &ErrorKind::Decode
        );
    }
}
