//! The Kafka wire mapping: the CloudEvents Kafka protocol binding, both
//! content modes.
//!
//! **Publishing** ([`encode`]) in the configured [`ContentMode`]:
//! * binary (default): every envelope attribute is a `ce_<attr>` header
//!   (`ce_id`, `ce_type`, `ce_attempt`, user headers as `ce_<name>`), except
//!   `datacontenttype`, which is the `content-type` header (`ce_datacontenttype`
//!   when it starts with `application/cloudevents`, which would make readers
//!   take the value for a structured event); the record value is the payload;
//! * structured: the record value is the CloudEvents JSON document (core's
//!   structured codec) and `content-type` is
//!   `application/cloudevents+json; charset=UTF-8`; no `ce_` headers.
//!
//! In both modes the record key is the partition key (no `ce_partitionkey`
//! header in binary mode: the binding maps that extension onto the key).
//!
//! **Receiving** ([`decode`]) picks the mode as the binding says: a
//! `content-type` starting with `application/cloudevents` is structured
//! (the JSON format is read; another event format is undecodable); else any
//! `ce_` header (any case) makes it binary; else the record is **foreign**:
//! an envelope with id `<topic>/<partition>/<offset>`, a configured type,
//! source = topic, the record key as key, its `content-type` header, its
//! other headers as user headers and the raw value as payload.
//!
//! A record with CloudEvents markers that breaks the format is
//! **undecodable**: it becomes the envelope of [`undecodable_envelope`] (what
//! arrived: value, key and every header) with the decode error in the
//! [`DECODE_ERROR`] carrier header; the source turns that into
//! `Delivery::decode_error`, so the consumer's runtime dead-letters it with
//! reason `decode` before any handler runs — never skipped silently, never
//! mistaken for a foreign message — and a replay of the dead letter puts the
//! original record back ([`restore_undecodable`]).
//!
//! postbox's own transport headers (retry due time, origin of a retry copy)
//! are `postbox-*` headers outside the envelope.

use std::borrow::Cow;
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use postbox_core::codec::{
    attr, binary, check_event_format, foreign, is_reserved, is_structured_content_type, structured,
    transport_headers, ContentMode, STRUCTURED_CONTENT_TYPE, UNDECODABLE_TYPE,
};
use postbox_core::envelope::Text;
use postbox_core::{delivery, dlq, Envelope, Error, ErrorKind};
use rdkafka::message::{Header, OwnedHeaders};

/// Prefix of CloudEvents attribute headers.
pub const CE_PREFIX: &str = "ce_";
/// The header that carries `datacontenttype`.
pub const CONTENT_TYPE: &str = "content-type";
/// Retry copies: when the copy is due (`postbox-due`, the encoding of
/// [`postbox_core::delay`]: Unix milliseconds, rounded up).
pub(crate) const RETRY_DUE: &str = postbox_core::delay::DUE_HEADER;
/// The due header of older versions: still read, because copies they wrote
/// may still sit in retry topics; never written.
pub(crate) const LEGACY_RETRY_DUE: &str = "postbox-retry-due";
/// Retry copies: the topic the message was first consumed from.
pub(crate) const ORIGIN_TOPIC: &str = "postbox-origin-topic";
/// Retry copies: the partition the message was first consumed from.
pub(crate) const ORIGIN_PARTITION: &str = "postbox-origin-partition";
/// Retry copies: the offset the message was first consumed at.
pub(crate) const ORIGIN_OFFSET: &str = "postbox-origin-offset";
/// Envelope header that carries the decode error of an undecodable record
/// from the codec to the source (never published: the source moves it into
/// `Delivery::decode_error`).
pub const DECODE_ERROR: &str = "postbox.decode-error";
/// Envelope headers of an undecodable record that carry a record header
/// whose name cannot be an envelope header as it is (a reserved attribute
/// name, postbox's own metadata names, the `kafka:` namespace):
/// `kafka:header:<name>`.
const RAW_HEADER_PREFIX: &str = "kafka:header:";
/// A record header whose value is not UTF-8: `kafka:base64:<name>`.
const RAW_BASE64_PREFIX: &str = "kafka:base64:";
/// A record header without a value (null): `kafka:null:<name>`.
const RAW_NULL_PREFIX: &str = "kafka:null:";
/// The record key of an undecodable record when it is not UTF-8 (base64).
const RAW_KEY_BASE64: &str = "kafka:key-base64";
/// The namespace of the carried names above.
const RAW_NAMESPACE: &str = "kafka:";
/// The content type of an undecodable record's envelope (the original
/// `content-type` header is carried with the other headers).
const UNDECODABLE_CONTENT_TYPE: &str = "application/octet-stream";

/// Per-record overhead of the Kafka v2 record format plus a share of the
/// batch header, used by the size estimate.
const RECORD_OVERHEAD: usize = 128;

/// Transport facts of a retry copy (written next to the envelope's headers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RetryInfo {
    /// When the copy is due.
    pub(crate) due: Option<SystemTime>,
    /// Where the message was first consumed: topic, partition, offset.
    pub(crate) origin: Option<(String, i32, i64)>,
}

/// The headers of an envelope, the record value and the estimated size of
/// the record.
pub(crate) struct Encoded {
    /// The record headers.
    pub(crate) headers: OwnedHeaders,
    /// The record value when it is not the envelope's payload (structured
    /// mode: the JSON document).
    pub(crate) body: Option<Vec<u8>>,
    /// Estimated size of the whole record (key, value, headers, overhead),
    /// compared with `message.max.bytes` before sending.
    pub(crate) size: usize,
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("headers", &rdkafka::message::Headers::count(&self.headers))
            .field("size", &self.size)
            .finish()
    }
}

fn header_name(name: &str) -> Cow<'static, str> {
    match name {
        attr::DATACONTENTTYPE => Cow::Borrowed(CONTENT_TYPE),
        attr::SPECVERSION => Cow::Borrowed("ce_specversion"),
        attr::ID => Cow::Borrowed("ce_id"),
        attr::TYPE => Cow::Borrowed("ce_type"),
        attr::SOURCE => Cow::Borrowed("ce_source"),
        attr::TIME => Cow::Borrowed("ce_time"),
        attr::ATTEMPT => Cow::Borrowed("ce_attempt"),
        attr::SUBJECT => Cow::Borrowed("ce_subject"),
        attr::DATAVERSION => Cow::Borrowed("ce_dataversion"),
        attr::CORRELATIONID => Cow::Borrowed("ce_correlationid"),
        attr::CAUSATIONID => Cow::Borrowed("ce_causationid"),
        attr::PARTITIONKEY => Cow::Borrowed("ce_partitionkey"),
        attr::TRACEPARENT => Cow::Borrowed("ce_traceparent"),
        attr::TRACESTATE => Cow::Borrowed("ce_tracestate"),
        other => Cow::Owned(format!("{CE_PREFIX}{other}")),
    }
}

/// Encodes the envelope in `mode` (see the module docs), plus the transport
/// headers of a retry copy.
pub(crate) fn encode(
    env: &Envelope,
    retry: Option<&RetryInfo>,
    mode: ContentMode,
) -> Result<Encoded, Error> {
    let key_len = env.key.as_deref().map_or(0, str::len);
    let mut encoded = match mode {
        ContentMode::Binary => encode_binary(env, key_len)?,
        ContentMode::Structured => {
            let body = structured::encode(env)?;
            let size = RECORD_OVERHEAD
                + body.len()
                + key_len
                + CONTENT_TYPE.len()
                + STRUCTURED_CONTENT_TYPE.len()
                + 2;
            Encoded {
                headers: OwnedHeaders::new_with_capacity(4).insert(Header {
                    key: CONTENT_TYPE,
                    value: Some(STRUCTURED_CONTENT_TYPE),
                }),
                body: Some(body),
                size,
            }
        }
    };
    // The header rule (`postbox_core::codec::is_attribute_name`): headers
    // that are not attribute names travel as plain record headers.
    for (name, value) in transport_headers(env) {
        check_transport_name(name)?;
        encoded.size += name.len() + value.len() + 2;
        encoded.headers = encoded.headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    if let Some(info) = retry {
        let mut extra: Vec<(&str, String)> = Vec::with_capacity(4);
        if let Some(due) = info.due {
            extra.push((RETRY_DUE, postbox_core::delay::format_due(due)));
        }
        if let Some((topic, partition, offset)) = &info.origin {
            extra.push((ORIGIN_TOPIC, topic.clone()));
            extra.push((ORIGIN_PARTITION, partition.to_string()));
            extra.push((ORIGIN_OFFSET, offset.to_string()));
        }
        for (k, v) in &extra {
            encoded.size += k.len() + v.len() + 2;
            encoded.headers = encoded.headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
    }
    Ok(encoded)
}

fn encode_binary(env: &Envelope, key_len: usize) -> Result<Encoded, Error> {
    let attrs = binary::encode(env)?;
    let mut headers = OwnedHeaders::new_with_capacity(attrs.len() + 4);
    let mut size = RECORD_OVERHEAD + env.payload.len() + key_len;
    // A binary record must not look structured to its readers.
    let looks_structured = is_structured_content_type(&env.content_type);
    for (name, value) in &attrs {
        if name == attr::PARTITIONKEY && env.key.as_deref() == Some(value.as_str()) {
            continue; // it is the record key
        }
        let key = if looks_structured && name == attr::DATACONTENTTYPE {
            Cow::Borrowed("ce_datacontenttype")
        } else {
            header_name(name)
        };
        size += key.len() + value.len() + 2;
        headers = headers.insert(Header {
            key: key.as_ref(),
            value: Some(value.as_bytes()),
        });
    }
    Ok(Encoded {
        headers,
        body: None,
        size,
    })
}

/// A record as the decoder sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordRef<'a> {
    /// Topic.
    pub(crate) topic: &'a str,
    /// Partition.
    pub(crate) partition: i32,
    /// Offset.
    pub(crate) offset: i64,
    /// Record key.
    pub(crate) key: Option<&'a [u8]>,
    /// Record value.
    pub(crate) payload: Option<&'a [u8]>,
}

impl RecordRef<'_> {
    /// The id of an envelope synthesized for the record:
    /// `<topic>/<partition>/<offset>`.
    fn id(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// A decoded record: the envelope and the retry transport facts.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    /// The envelope (boxed: consumers hold it boxed, and it is written once
    /// in place).
    pub(crate) envelope: Box<Envelope>,
    /// Retry transport headers, if this is a retry copy.
    pub(crate) retry: RetryInfo,
    /// Whether the record was foreign (no CloudEvents markers).
    // Only the tests read it: consumers see a foreign record by its type.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) foreign: bool,
}

/// Decodes a record. Never fails: foreign and undecodable records get their
/// own envelopes (see the module docs). `headers` yields the record's
/// headers; it is called a second time only for an undecodable record.
pub(crate) fn decode<'a, I>(
    record: RecordRef<'a>,
    headers: impl Fn() -> I,
    foreign_type: &Text,
) -> Decoded
where
    I: Iterator<Item = (&'a str, Option<&'a [u8]>)>,
{
    let mut attrs = binary::Attributes::default();
    let mut others: Vec<(&str, Option<&[u8]>)> = Vec::new();
    let mut retry = RetryInfo::default();
    let mut has_ce = false;
    let mut content_type: Option<&[u8]> = None;
    // A `ce_` (or `content-type`) header whose value is not UTF-8 text, or
    // is null: a decode failure naming it, never a dropped attribute.
    let mut bad_value: Option<(&str, &str)> = None;
    let mut origin: (Option<&str>, Option<i32>, Option<i64>) = (None, None, None);
    for (name, value) in headers() {
        if let Some(a) = binary::strip_prefix(name, CE_PREFIX) {
            has_ce = true;
            match value.map(std::str::from_utf8) {
                Some(Ok(v)) => attrs.set(a, v),
                Some(Err(_)) => bad_value = Some((name, "is not UTF-8")),
                None => bad_value = Some((name, "has no value")),
            }
        } else if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            if value.is_none() {
                bad_value = Some((name, "has no value"));
            }
            content_type = value;
        } else if name == RETRY_DUE || name == LEGACY_RETRY_DUE {
            retry.due = value
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(postbox_core::delay::parse_due);
        } else if name == ORIGIN_TOPIC {
            origin.0 = value.and_then(|v| std::str::from_utf8(v).ok());
        } else if name == ORIGIN_PARTITION {
            origin.1 = utf8_parse(value);
        } else if name == ORIGIN_OFFSET {
            origin.2 = utf8_parse(value);
        } else {
            others.push((name, value));
        }
    }
    if let (Some(t), Some(p), Some(o)) = origin {
        retry.origin = Some((t.to_string(), p, o));
    }
    let payload = Bytes::copy_from_slice(record.payload.unwrap_or_default());
    let content_type = match content_type.map(std::str::from_utf8) {
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) if has_ce => {
            let e = Error::new(ErrorKind::Decode, "header \"content-type\" is not UTF-8");
            return undecodable(record, headers(), payload, &e, retry);
        }
        _ => None,
    };
    // On failure the payload comes back with the error: cloning a fresh
    // `Bytes` would allocate its shared header on every record.
    let result: Result<Box<Envelope>, (Error, Bytes)> = match content_type {
        Some(ct) if is_structured_content_type(ct) => {
            match check_event_format(ct).and_then(|()| structured::decode(&payload)) {
                Ok(env) => Ok(Box::new(env)),
                Err(e) => Err((e, payload)),
            }
        }
        _ if has_ce => {
            // The binding maps `datacontenttype` to `content-type`; a
            // `ce_datacontenttype` header is read where that is absent.
            attrs.datacontenttype = content_type.or(attrs.datacontenttype);
            match bad_value {
                Some((name, why)) => Err((
                    Error::new(ErrorKind::Decode, format!("header {name:?} {why}")),
                    payload,
                )),
                None => match attrs.decode_boxed(Bytes::new()) {
                    Ok(mut env) => {
                        env.payload = payload;
                        Ok(env)
                    }
                    Err(e) => Err((e, payload)),
                },
            }
        }
        _ => return foreign_envelope(record, &others, content_type, payload, foreign_type),
    };
    match result {
        Ok(mut envelope) => {
            // Transport headers (names that are not attribute names, or
            // headers another producer set) come back as envelope headers.
            for (name, value) in &others {
                carry(&mut envelope, name, *value, is_read_back_as_is(name));
            }
            if envelope.key.is_none() {
                envelope.key = record
                    .key
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .map(str::to_string);
            }
            Decoded {
                envelope,
                retry,
                foreign: false,
            }
        }
        Err((e, payload)) => undecodable(record, headers(), payload, &e, retry),
    }
}

fn undecodable<'a>(
    record: RecordRef<'a>,
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    payload: Bytes,
    error: &Error,
    retry: RetryInfo,
) -> Decoded {
    let mut envelope = Box::new(undecodable_envelope(record, headers, payload));
    envelope
        .headers
        .insert(DECODE_ERROR.to_string(), error.message().to_string());
    Decoded {
        envelope,
        retry,
        foreign: false,
    }
}

/// The envelope of an undecodable record: what arrived, so that its
/// dead-letter copy shows it and a replay can put it back
/// ([`restore_undecodable`]).
///
/// * payload = the value, byte for byte; content type
///   `application/octet-stream` (the original `content-type` header is
///   carried with the others);
/// * id = `<topic>/<partition>/<offset>`; type =
///   [`UNDECODABLE_TYPE`]; source = `kafka:<topic>`; key = the record key
///   (a key that is not UTF-8 is also carried base64-encoded under
///   `kafka:key-base64`);
/// * every header as an envelope header under its own name and its value as
///   text; a value that is not UTF-8 goes base64-encoded under
///   `kafka:base64:<name>`, a null value under `kafka:null:<name>`, and a
///   name that cannot be an envelope header as it is (a reserved attribute
///   name such as `id`, postbox's own dead-letter or retry metadata names,
///   the `kafka:` namespace) under `kafka:header:<name>`. Of two headers
///   with one name, the last is kept.
pub(crate) fn undecodable_envelope<'a>(
    record: RecordRef<'a>,
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    payload: Bytes,
) -> Envelope {
    let mut facts =
        foreign::Foreign::new(record.id(), Cow::Owned(format!("kafka:{}", record.topic)));
    facts.event_type = Cow::Borrowed(UNDECODABLE_TYPE);
    facts.content_type = Some(Cow::Borrowed(UNDECODABLE_CONTENT_TYPE));
    let mut env = foreign::envelope(facts, payload);
    if let Some(key) = record.key {
        env.key = Some(String::from_utf8_lossy(key).into_owned());
        if std::str::from_utf8(key).is_err() {
            env.headers.insert(
                RAW_KEY_BASE64.to_string(),
                base64::engine::general_purpose::STANDARD.encode(key),
            );
        }
    }
    for (name, value) in headers {
        let as_is = is_carried_as_is(name) && !name.starts_with(RAW_NAMESPACE);
        carry(&mut env, name, value, as_is);
    }
    env
}

/// Puts a record header into `env.headers`: under its own name when
/// `as_is`, else under `kafka:header:<name>`; a value that is not UTF-8
/// base64-encoded under `kafka:base64:<name>`, a null value under
/// `kafka:null:<name>`. Lossless: [`restore_undecodable`] and
/// [`encode`] put it back.
fn carry(env: &mut Envelope, name: &str, value: Option<&[u8]>, as_is: bool) {
    let (carried, text) = match value {
        None => (format!("{RAW_NULL_PREFIX}{name}"), String::new()),
        Some(v) => match std::str::from_utf8(v) {
            Ok(text) if as_is => (name.to_string(), text.to_string()),
            Ok(text) => (format!("{RAW_HEADER_PREFIX}{name}"), text.to_string()),
            Err(_) => (
                format!("{RAW_BASE64_PREFIX}{name}"),
                base64::engine::general_purpose::STANDARD.encode(v),
            ),
        },
    };
    env.headers.insert(carried, text);
}

/// Whether a record header name can be an envelope header as it is: not an
/// envelope field, not postbox's own metadata, and not a name this binding
/// reserves ([`check_transport_name`]), which could not be written back.
fn is_carried_as_is(name: &str) -> bool {
    !(is_reserved(name)
        || name == DECODE_ERROR
        || dlq::is_metadata(name)
        || delivery::RETRY_NAMES.contains(&name)
        || is_reserved_transport_name(name))
}

/// Whether the binding or postbox reserves `name` for a plain record
/// header: `ce_…` (attributes), `content-type`, and postbox's own
/// `postbox-…` / `postbox.…` transport headers (any case).
fn is_reserved_transport_name(name: &str) -> bool {
    let starts = |p: &str| {
        name.get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    };
    starts(CE_PREFIX)
        || name.eq_ignore_ascii_case(CONTENT_TYPE)
        || starts("postbox-")
        || starts("postbox.")
}

/// Refuses a transport header (an envelope header that is not a valid
/// attribute name, written as a plain record header) whose name the binding
/// or postbox reserves: `ce_…` (attributes), `content-type`, and postbox's
/// own `postbox-…` / `postbox.…` transport headers. Read back, such a header
/// would be taken for what it names.
fn check_transport_name(name: &str) -> Result<(), Error> {
    if is_reserved_transport_name(name) {
        Err(Error::new(
            ErrorKind::Encode,
            format!(
                "header {name:?} is not a CloudEvents attribute name, so it travels as a plain Kafka header, \
                 and that name is reserved (`ce_…`, `content-type`, `postbox-…`, `postbox.…`): rename it"
            ),
        ))
    } else {
        Ok(())
    }
}

/// Whether a plain record header of a record that decoded (a CloudEvent or
/// a foreign record) becomes an envelope header under its own name: yes,
/// unless it names an envelope field or the decoder's carrier; names in
/// the `kafka:` namespace are postbox's own carried names, read as they are.
fn is_read_back_as_is(name: &str) -> bool {
    !(is_reserved(name) || name == DECODE_ERROR)
}

/// The record an undecodable record's envelope stands for (the inverse of
/// [`undecodable_envelope`]): its key, value and headers, the dead-letter
/// and retry metadata left out.
pub(crate) fn restore_undecodable(env: &Envelope) -> Result<RawRecord, Error> {
    let b64 = |name: &str, v: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|e| {
                Error::new(ErrorKind::Encode, format!("`{name}` is not base64")).with_source(e)
            })
    };
    let mut record = RawRecord {
        key: env.key.as_ref().map(|k| k.as_bytes().to_vec()),
        value: env.payload.clone(),
        headers: Vec::with_capacity(env.headers.len()),
    };
    for (k, v) in &env.headers {
        if dlq::is_metadata(k) || delivery::RETRY_NAMES.contains(&k.as_str()) || k == DECODE_ERROR {
            continue;
        }
        let header = if k == RAW_KEY_BASE64 {
            record.key = Some(b64(k, v)?);
            continue;
        } else if let Some(name) = k.strip_prefix(RAW_BASE64_PREFIX) {
            (name.to_string(), Some(b64(k, v)?))
        } else if let Some(name) = k.strip_prefix(RAW_NULL_PREFIX) {
            (name.to_string(), None)
        } else if let Some(name) = k.strip_prefix(RAW_HEADER_PREFIX) {
            (name.to_string(), Some(v.as_bytes().to_vec()))
        } else {
            (k.clone(), Some(v.as_bytes().to_vec()))
        };
        record.headers.push(header);
    }
    Ok(record)
}

/// A record as it is sent back by a replay of an undecodable dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawRecord {
    /// The record key.
    pub(crate) key: Option<Vec<u8>>,
    /// The record value.
    pub(crate) value: Bytes,
    /// The headers, in order.
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawRecord {
    /// The headers as rdkafka takes them.
    pub(crate) fn owned_headers(&self) -> OwnedHeaders {
        let mut out = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            out = out.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        out
    }
}

fn utf8_parse<T: std::str::FromStr>(v: Option<&[u8]>) -> Option<T> {
    v.and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

fn foreign_envelope(
    record: RecordRef<'_>,
    others: &[(&str, Option<&[u8]>)],
    content_type: Option<&str>,
    payload: Bytes,
    foreign_type: &Text,
) -> Decoded {
    let mut facts = foreign::Foreign::new(record.id(), Cow::Owned(record.topic.to_string()));
    facts.event_type = foreign_type.clone();
    facts.content_type = content_type.map(|v| Cow::Owned(v.to_string()));
    let mut envelope = Box::new(foreign::envelope(facts, payload));
    envelope.key = record.key.map(|k| String::from_utf8_lossy(k).into_owned());
    for (name, value) in others {
        carry(&mut envelope, name, *value, is_read_back_as_is(name));
    }
    Decoded {
        envelope,
        retry: RetryInfo::default(),
        foreign: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;
    use std::time::{Duration, UNIX_EPOCH};

    fn pairs(h: &OwnedHeaders) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    fn round_trip(env: &Envelope, retry: Option<&RetryInfo>) -> Decoded {
        round_trip_in(env, retry, ContentMode::Binary)
    }

    fn round_trip_in(env: &Envelope, retry: Option<&RetryInfo>, mode: ContentMode) -> Decoded {
        let enc = encode(env, retry, mode).unwrap();
        let p = pairs(&enc.headers);
        let value = enc.body.clone().unwrap_or_else(|| env.payload.to_vec());
        let rec = RecordRef {
            topic: "orders",
            partition: 1,
            offset: 7,
            key: env.key.as_deref().map(str::as_bytes),
            payload: Some(&value),
        };
        decode_pairs(rec, &p)
    }

    fn decode_pairs(rec: RecordRef<'_>, p: &[(String, Vec<u8>)]) -> Decoded {
        decode(
            rec,
            || p.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
            &Cow::Borrowed("x.foreign"),
        )
    }

    #[test]
    fn binary_mode_round_trips() {
        let env = Envelope::builder("order.placed")
            .source("shop")
            .key("customer-7")
            .subject("s")
            .correlation_id("c")
            .header("tenant", "acme")
            .content_type("application/octet-stream")
            .payload(vec![0u8, 255, 1])
            .build();
        let enc = encode(&env, None, ContentMode::Binary).unwrap();
        let names: Vec<String> = pairs(&enc.headers).into_iter().map(|p| p.0).collect();
        assert!(names.contains(&"ce_id".to_string()));
        assert!(names.contains(&"content-type".to_string()));
        assert!(names.contains(&"ce_tenant".to_string()));
        assert!(!names.contains(&"ce_partitionkey".to_string()));
        assert!(!names.contains(&"ce_datacontenttype".to_string()));
        let back = round_trip(&env, None);
        assert!(!back.foreign);
        assert_eq!(*back.envelope, env);
    }

    #[test]
    fn retry_headers_are_outside_the_envelope() {
        let env = Envelope::builder("t").key("k").build();
        let due = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let info = RetryInfo {
            due: Some(due),
            origin: Some(("orders".into(), 2, 99)),
        };
        let back = round_trip(&env, Some(&info));
        assert_eq!(back.retry, info);
        assert_eq!(*back.envelope, env);
    }

    #[test]
    fn records_with_many_user_headers_round_trip() {
        let mut b = Envelope::builder("order.placed").key("k").subject("s");
        for i in 0..24 {
            b = b.header(format!("h{i:02}"), format!("v{i}"));
        }
        let env = b.build();
        let back = round_trip(&env, None);
        assert!(!back.foreign);
        assert_eq!(*back.envelope, env);
    }

    #[test]
    fn a_due_time_between_milliseconds_is_rounded_up_never_down() {
        let env = Envelope::builder("order.placed")
            .payload(b"x".to_vec())
            .build();
        let due = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_000_001);
        let info = RetryInfo {
            due: Some(due),
            origin: None,
        };
        let back = round_trip(&env, Some(&info)).retry.due.unwrap();
        assert!(back >= due, "{back:?} is before {due:?}");
        assert_eq!(back, UNIX_EPOCH + Duration::from_millis(1_700_000_000_124));
    }

    #[test]
    fn foreign_records_get_a_synthesized_envelope() {
        let rec = RecordRef {
            topic: "legacy",
            partition: 3,
            offset: 42,
            key: Some(b"k1"),
            payload: Some(b"{\"a\":1}"),
        };
        let d = decode(
            rec,
            || {
                [
                    ("trace", Some(&b"abc"[..])),
                    ("content-type", Some(&b"text/plain"[..])),
                ]
                .into_iter()
            },
            &Cow::Borrowed("legacy.event"),
        );
        assert!(d.foreign);
        assert_eq!(d.envelope.id.as_str(), "legacy/3/42");
        assert_eq!(d.envelope.event_type, "legacy.event");
        assert_eq!(d.envelope.source, "legacy");
        assert_eq!(d.envelope.key.as_deref(), Some("k1"));
        assert_eq!(d.envelope.content_type, "text/plain");
        assert_eq!(d.envelope.headers["trace"], "abc");
        assert_eq!(&d.envelope.payload[..], b"{\"a\":1}");
        assert_eq!(d.envelope.attempt, 1);
    }

    #[test]
    fn broken_cloudevents_headers_make_an_undecodable_envelope_with_the_error() {
        let rec = RecordRef {
            topic: "t",
            partition: 0,
            offset: 1,
            key: None,
            payload: None,
        };
        let missing_type = [
            ("ce_specversion".to_string(), b"1.0".to_vec()),
            ("ce_id".to_string(), b"x".to_vec()),
        ];
        let d = decode_pairs(rec, &missing_type);
        assert!(!d.foreign);
        assert_eq!(d.envelope.event_type, UNDECODABLE_TYPE);
        assert!(d.envelope.headers[DECODE_ERROR].contains("type"));
        let d = decode_pairs(rec, &[("ce_id".to_string(), vec![0xff, 0xfe])]);
        assert!(d.envelope.headers[DECODE_ERROR].contains("UTF-8"));
        // A null value is not an absent attribute: it names the header.
        let null_time = [
            ("ce_specversion", Some(&b"1.0"[..])),
            ("ce_id", Some(&b"x"[..])),
            ("ce_type", Some(&b"t"[..])),
            ("ce_source", Some(&b"s"[..])),
            ("ce_time", None),
        ];
        let d = decode(rec, || null_time.iter().copied(), &Cow::Borrowed("f"));
        assert_eq!(d.envelope.event_type, UNDECODABLE_TYPE);
        let why = &d.envelope.headers[DECODE_ERROR];
        assert!(why.contains("ce_time") && why.contains("no value"), "{why}");
        assert_eq!(d.envelope.headers["kafka:null:ce_time"], "");
    }

    #[test]
    fn an_undecodable_record_is_kept_as_it_arrived_and_restored_by_replay() {
        let rec = RecordRef {
            topic: "orders",
            partition: 2,
            offset: 9,
            key: Some(&[0xff, b'k']),
            payload: Some(b"\x00garbage"),
        };
        let headers = [
            ("ce_specversion", Some(&b"0.3"[..])),
            ("ce_id", Some(&b"e-1"[..])),
            ("id", Some(&b"not-an-attribute"[..])),
            ("trace", Some(&[0xc3u8, 0x28][..])),
            ("empty", None),
            ("content-type", Some(&b"application/json"[..])),
        ];
        let d = decode(rec, || headers.iter().copied(), &Cow::Borrowed("f"));
        let env = &d.envelope;
        assert_eq!(env.event_type, UNDECODABLE_TYPE);
        assert_eq!(env.id.as_str(), "orders/2/9");
        assert_eq!(env.source, "kafka:orders");
        assert_eq!(&env.payload[..], b"\x00garbage");
        // Names this binding reserves are carried under `kafka:header:`,
        // so the dead-letter copy can write them back as plain headers.
        assert_eq!(env.headers["kafka:header:ce_specversion"], "0.3");
        assert_eq!(env.headers["kafka:header:id"], "not-an-attribute");
        assert_eq!(env.headers["kafka:base64:trace"], "wyg=");
        assert_eq!(env.headers["kafka:null:empty"], "");
        assert_eq!(env.headers["kafka:header:content-type"], "application/json");
        // Its dead-letter copy is a valid CloudEvent: every header is either
        // `ce_<attribute name>`, `content-type`, or a plain transport header
        // that reads back as the same envelope header.
        // (The source takes the decode-error carrier out before anything
        // is published.)
        let mut env = env.clone();
        env.headers.remove(DECODE_ERROR);
        let copy = encode(&env, None, ContentMode::Binary).unwrap();
        let written = pairs(&copy.headers);
        for (name, _) in &written {
            if let Some(a) = name.strip_prefix(CE_PREFIX) {
                assert!(postbox_core::codec::is_attribute_name(a), "{name}");
            }
        }
        let rec2 = RecordRef {
            key: env.key.as_deref().map(str::as_bytes),
            ..rec
        };
        let mut back = decode_pairs(rec2, &written).envelope;
        back.key.clone_from(&env.key);
        assert_eq!(back.headers, env.headers);
        assert!(d.envelope.headers[DECODE_ERROR].contains("specversion"));
        // What a replay sends back: the record as it arrived.
        let raw = restore_undecodable(&env).unwrap();
        assert_eq!(raw.key.as_deref(), Some(&[0xff, b'k'][..]));
        assert_eq!(&raw.value[..], b"\x00garbage");
        let mut want: Vec<(String, Option<Vec<u8>>)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
            .collect();
        let mut got = raw.headers.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn structured_mode_round_trips_with_retry_headers() {
        let env = Envelope::builder("order.placed")
            .source("shop")
            .key("customer-7")
            .subject("s")
            .header("tenant", "acme")
            .payload(r#"{"n":1}"#)
            .build();
        let info = RetryInfo {
            due: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)),
            origin: Some(("orders".into(), 0, 3)),
        };
        let enc = encode(&env, Some(&info), ContentMode::Structured).unwrap();
        let names: Vec<String> = pairs(&enc.headers).into_iter().map(|p| p.0).collect();
        assert!(names.iter().all(|n| !n.starts_with(CE_PREFIX)), "{names:?}");
        assert!(names.contains(&CONTENT_TYPE.to_string()));
        let body = String::from_utf8(enc.body.clone().unwrap()).unwrap();
        assert!(body.contains(r#""data":{"n":1}"#), "{body}");
        assert!(enc.size > body.len());
        let back = round_trip_in(&env, Some(&info), ContentMode::Structured);
        assert!(!back.foreign);
        assert_eq!(back.retry, info);
        assert_eq!(*back.envelope, env);
    }

    #[test]
    fn structured_records_from_other_producers_are_read_by_content_type() {
        let doc = br#"{"specversion":"1.0","id":"x-1","type":"t","source":"/s","time":"2026-12-07T10:00:00Z","data":{"a":1}}"#;
        let rec = RecordRef {
            topic: "t",
            partition: 0,
            offset: 5,
            key: Some(b"k"),
            payload: Some(doc),
        };
        let ct = [(
            "Content-Type".to_string(),
            b"application/cloudevents+json; charset=UTF-8".to_vec(),
        )];
        let d = decode_pairs(rec, &ct);
        assert!(!d.foreign);
        assert_eq!(d.envelope.id.as_str(), "x-1");
        assert!(d.envelope.time.is_some());
        assert_eq!(d.envelope.key.as_deref(), Some("k"));
        assert_eq!(&d.envelope.payload[..], br#"{"a":1}"#);
        // Broken JSON, or another event format: undecodable, body kept.
        for (ct, body) in [
            ("application/cloudevents+json", &b"{not json"[..]),
            ("application/cloudevents+avro", &doc[..]),
        ] {
            let rec = RecordRef {
                payload: Some(body),
                ..rec
            };
            let d = decode_pairs(rec, &[(CONTENT_TYPE.to_string(), ct.as_bytes().to_vec())]);
            assert_eq!(d.envelope.event_type, UNDECODABLE_TYPE, "{ct}");
            assert_eq!(&d.envelope.payload[..], body);
            assert!(d.envelope.headers.contains_key(DECODE_ERROR));
        }
    }

    #[test]
    fn headers_that_are_not_attribute_names_travel_as_plain_headers_in_both_modes() {
        let env = Envelope::builder("t")
            .key("k")
            .header("tenant", "acme")
            .header("x-trace", "abc")
            .header("traceId", "t-1")
            .build();
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let enc = encode(&env, None, mode).unwrap();
            let names: Vec<String> = pairs(&enc.headers).into_iter().map(|p| p.0).collect();
            assert!(names.contains(&"x-trace".to_string()), "{mode}: {names:?}");
            assert!(names.contains(&"traceId".to_string()), "{mode}: {names:?}");
            assert!(!names.iter().any(|n| n == "ce_x-trace" || n == "ce_traceId"));
            if mode == ContentMode::Binary {
                assert!(names.contains(&"ce_tenant".to_string()));
            }
            let back = round_trip_in(&env, None, mode);
            assert_eq!(*back.envelope, env, "{mode}");
        }
    }

    #[test]
    fn transport_header_names_the_binding_reserves_are_refused() {
        for name in [
            "ce_x",
            "CE_Y",
            "Content-Type",
            "postbox-due",
            "postbox.decode-error",
        ] {
            let env = Envelope::builder("t").header(name, "v").build();
            for mode in [ContentMode::Binary, ContentMode::Structured] {
                let e = encode(&env, None, mode).unwrap_err();
                assert_eq!(e.kind(), &ErrorKind::Encode, "{name}");
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }

    #[test]
    fn a_binary_record_never_looks_structured() {
        let env = Envelope::builder("t")
            .content_type("application/cloudevents+json")
            .payload(r#"{"specversion":"1.0"}"#)
            .build();
        let enc = encode(&env, None, ContentMode::Binary).unwrap();
        let p = pairs(&enc.headers);
        assert!(p.iter().all(|(k, _)| k != CONTENT_TYPE));
        assert!(p.iter().any(|(k, _)| k == "ce_datacontenttype"));
        let back = round_trip(&env, None);
        assert_eq!(*back.envelope, env);
    }

    #[test]
    fn size_estimate_covers_payload_and_headers() {
        let env = Envelope::builder("t").payload(vec![1u8; 1000]).build();
        let enc = encode(&env, None, ContentMode::Binary).unwrap();
        assert!(enc.size > 1000 + 50, "{}", enc.size);
    }
}
