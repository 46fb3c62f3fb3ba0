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
//! Decoding never panics: malformed input is an [`ErrorKind::Decode`] error
//! that says what was wrong.

pub mod binary;
pub mod foreign;
mod intern;
pub mod structured;

pub(crate) use intern::intern;

use std::time::SystemTime;

use crate::error::{Error, ErrorKind};

/// The CloudEvents specification version postbox writes and reads.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of a structured-mode message postbox writes: the
/// CloudEvents JSON event format.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// The media-type prefix that marks structured mode in the Kafka and AMQP
/// bindings: any content type starting with it names an event format.
const CLOUDEVENTS_MEDIA: &str = "application/cloudevents";

/// The one event format postbox reads in structured mode.
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// The `type` of the envelope that stands for an **undecodable** message: one
/// that carries CloudEvents markers (attribute headers, or a structured-mode
/// content type) but breaks the format. Every adapter hands it to the consumer
/// runtime as what arrived (the body unchanged as payload, the transport
/// metadata as headers, see each adapter's README) through
/// [`Delivery::decode_error`](crate::Delivery::decode_error), and the runtime
/// dead-letters it with reason `decode` before any handler runs; replaying
/// its dead-letter copy puts the original back.
pub const UNDECODABLE_TYPE: &str = "postbox.undecodable";

/// How a message carries its CloudEvent on brokers with headers (Kafka,
/// RabbitMQ): the two content modes of the CloudEvents protocol bindings.
/// Receivers read both whatever a publisher chose; SQS and SNS always use
/// the structured form.
///
/// ```
/// use postbox_core::codec::ContentMode;
/// assert_eq!(ContentMode::default(), ContentMode::Binary);
/// assert_eq!("structured".parse::<ContentMode>().unwrap(), ContentMode::Structured);
/// assert!("text".parse::<ContentMode>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ContentMode {
    /// Attributes as prefixed headers (`ce_` on Kafka, `cloudEvents:` on
    /// AMQP), the payload as the body byte for byte (default: the smallest
    /// body, and brokers route and filter on headers).
    #[default]
    Binary,
    /// The body is the CloudEvents JSON document, with content type
    /// [`STRUCTURED_CONTENT_TYPE`] and no attribute headers: for receivers
    /// that read the event format rather than headers, and cheaper to parse
    /// where headers are costly (Kafka).
    Structured,
}

impl ContentMode {
    /// The lower-case name used in URLs and configuration (`binary`, `structured`).
    pub fn as_str(self) -> &'static str {
        match self {
            ContentMode::Binary => "binary",
            ContentMode::Structured => "structured",
        }
    }
}

impl std::fmt::Display for ContentMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ContentMode {
    type Err = Error;

    /// `binary` or `structured`, in any case; anything else is a `Config` error.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.eq_ignore_ascii_case("binary") {
            Ok(ContentMode::Binary)
        } else if s.eq_ignore_ascii_case("structured") {
            Ok(ContentMode::Structured)
        } else {
            Err(Error::new(
                ErrorKind::Config,
                format!("content mode {s:?} is neither `binary` nor `structured`"),
            ))
        }
    }
}

/// Whether a content type marks structured mode: it starts with
/// `application/cloudevents` (any case), as the Kafka and AMQP bindings say.
///
/// ```
/// use postbox_core::codec::is_structured_content_type;
/// assert!(is_structured_content_type("application/cloudevents+json; charset=UTF-8"));
/// assert!(is_structured_content_type("Application/CloudEvents-batch+json"));
/// assert!(!is_structured_content_type("application/json"));
/// ```
pub fn is_structured_content_type(content_type: &str) -> bool {
    content_type
        .get(..CLOUDEVENTS_MEDIA.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(CLOUDEVENTS_MEDIA))
}

/// Checks that a structured-mode content type names the JSON event format,
/// the one postbox reads: another format (`+avro`, `-batch+json`, …) is a
/// `Decode` error that names it.
///
/// ```
/// use postbox_core::codec::check_event_format;
/// assert!(check_event_format("application/cloudevents+json; charset=utf-8").is_ok());
/// assert!(check_event_format("application/cloudevents+avro").is_err());
/// ```
pub fn check_event_format(content_type: &str) -> Result<(), Error> {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(CLOUDEVENTS_JSON) {
        Ok(())
    } else {
        Err(decode_error(format!(
            "content type `{content_type}` names a CloudEvents event format postbox does not read (it reads {CLOUDEVENTS_JSON})"
        )))
    }
}

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

/// Whether `name` is a valid CloudEvents attribute name: lower-case letters
/// `a`–`z` and digits `0`–`9` only, at least one (the specification's MUST;
/// its 20-character SHOULD is not enforced).
///
/// **The header rule**, decided here once for every broker: an envelope
/// header whose name is a valid attribute name travels as a CloudEvents
/// extension attribute; any other name (`x-trace`, `traceId`,
/// `amqp:content-type`) is **transport metadata** and travels outside the
/// attribute set — a plain Kafka header, a plain AMQP header, an SQS/SNS
/// message attribute — and comes back as an envelope header. So every
/// message postbox writes is a valid CloudEvent whatever its headers are
/// named, and nothing is dropped. Each adapter refuses, with an `Encode`
/// error, the few names its transport reserves (see its README).
///
/// ```
/// use postbox_core::codec::is_attribute_name;
/// assert!(is_attribute_name("tenant"));
/// assert!(is_attribute_name("dlqreason"));
/// assert!(!is_attribute_name("x-trace"));
/// assert!(!is_attribute_name("traceId"));
/// assert!(!is_attribute_name(""));
/// ```
pub fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The envelope headers that are transport metadata under the header rule
/// of [`is_attribute_name`]: those whose name is not a valid attribute name,
/// in name order.
///
/// ```
/// use postbox_core::{codec::transport_headers, Envelope};
/// let env = Envelope::builder("t").header("tenant", "acme").header("x-trace", "abc").build();
/// assert_eq!(transport_headers(&env).collect::<Vec<_>>(), [("x-trace", "abc")]);
/// ```
pub fn transport_headers(env: &crate::Envelope) -> impl Iterator<Item = (&str, &str)> {
    env.headers
        .iter()
        .filter(|(k, _)| !is_attribute_name(k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

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
    if let Some(t) = parse_utc_fast(s.as_bytes()) {
        return Ok(t);
    }
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            decode_error(format!("`time` is not an RFC 3339 timestamp: {s:?}")).with_source(e)
        })?;
    Ok(SystemTime::from(dt))
}

/// The form [`format_time`] writes (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`, at
/// most 9 digits, 1970 or later), without the general parser; anything else
/// (offsets, lower-case `t`/`z`, leap seconds, out of range) returns `None`
/// and goes through the general parser, which also produces the error.
fn parse_utc_fast(b: &[u8]) -> Option<SystemTime> {
    /// Where the digits of `YYYY-MM-DDTHH:MM:SS` are.
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    /// 10^(9 - n): what a fraction of n digits is multiplied by.
    const SCALE: [u32; 10] = [
        1_000_000_000,
        100_000_000,
        10_000_000,
        1_000_000,
        100_000,
        10_000,
        1_000,
        100,
        10,
        1,
    ];
    let (head, rest) = b.split_first_chunk::<19>()?;
    let digit = |i: usize| u32::from(head[i].wrapping_sub(b'0'));
    if DIGITS.iter().any(|&i| digit(i) > 9)
        || head[4] != b'-'
        || head[7] != b'-'
        || head[10] != b'T'
        || head[13] != b':'
        || head[16] != b':'
    {
        return None;
    }
    let two = |i: usize| digit(i) * 10 + digit(i + 1);
    let year = two(0) * 100 + two(2);
    let (month, day) = (two(5), two(8));
    let (hour, minute, second) = (two(11), two(14), two(17));
    let (fraction, zone) = match rest.split_first()? {
        (b'.', tail) => {
            // One to nine digits, read in one pass.
            let (mut f, mut n) = (0u32, 0usize);
            for &c in tail {
                let d = c.wrapping_sub(b'0');
                if d > 9 {
                    break;
                }
                if n == 9 {
                    return None;
                }
                f = f * 10 + u32::from(d);
                n += 1;
            }
            if n == 0 {
                return None;
            }
            (f * SCALE[n], &tail[n..])
        }
        _ => (0, rest),
    };
    if zone != b"Z"
        || year < 1970
        || !(1..=12).contains(&month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day == 0 || day > month_days[month as usize - 1] {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (March-based year;
    // the year is at least 1969 here, so all of it is unsigned).
    let (y, m) = if month <= 2 {
        (u64::from(year) - 1, month + 9)
    } else {
        (u64::from(year), month - 3)
    };
    let (era, yoe) = (y / 400, y % 400);
    let doy = (153 * u64::from(m) + 2) / 5 + u64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + u64::from(hour * 3600 + minute * 60 + second);
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::new(secs, fraction))
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

    fn general(s: &str) -> Option<SystemTime> {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(SystemTime::from)
    }

    #[test]
    fn the_fast_path_leaves_what_it_does_not_know_to_the_general_parser() {
        for s in [
            "2024-02-29T00:00:00Z",
            "2100-02-28T23:59:59.5Z",
            "1970-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
        ] {
            assert_eq!(parse_utc_fast(s.as_bytes()), general(s), "{s}");
            assert!(parse_utc_fast(s.as_bytes()).is_some(), "{s}");
        }
        for s in [
            "2023-02-29T00:00:00Z",
            "2023-11-14T22:13:20+01:00",
            "2023-11-14t22:13:20z",
            "2023-11-14T22:13:60Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20.1234567891Z",
            "1969-12-31T23:59:59Z",
            "2023-13-01T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "+023-11-14T22:13:20Z",
        ] {
            assert_eq!(parse_utc_fast(s.as_bytes()), None, "{s}");
        }
    }

    proptest::proptest! {
        /// Whatever the fast path accepts, it reads as the general parser does.
        #[test]
        fn the_fast_path_agrees_with_the_general_parser(
            secs in 0i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
            digits in 0usize..=9,
        ) {
            let dt = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            let mut s = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                dt.year(), u8::from(dt.month()), dt.day(), dt.hour(), dt.minute(), dt.second()
            );
            if digits > 0 {
                s.push('.');
                s.push_str(&format!("{nanos:09}")[..digits]);
            }
            s.push('Z');
            let fast = parse_utc_fast(s.as_bytes());
            proptest::prop_assert!(fast.is_some(), "{}", s);
            proptest::prop_assert_eq!(fast, general(&s), "{}", s);
        }

        #[test]
        fn the_fast_path_never_panics(s in "[0-9TZ:.+-]{0,40}") {
            if let Some(t) = parse_utc_fast(s.as_bytes()) {
                proptest::prop_assert_eq!(Some(t), general(&s), "{}", s);
            }
        }
    }
}
