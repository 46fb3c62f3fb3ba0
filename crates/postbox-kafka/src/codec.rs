//! The Kafka wire mapping: CloudEvents binary content mode (the CloudEvents
//! Kafka protocol binding).
//!
//! * every envelope attribute is a `ce_<attr>` header (`ce_id`, `ce_type`,
//!   `ce_attempt`, user headers as `ce_<name>`), except `datacontenttype`,
//!   which is the `content-type` header;
//! * the record key is the partition key (no `ce_partitionkey` header: the
//!   binding maps that extension onto the key);
//! * the record value is the payload.
//!
//! A record without any `ce_` header is **foreign**: it becomes an envelope
//! with id `<topic>/<partition>/<offset>`, a configured type, source = topic,
//! the record key as key, its `content-type` header, its other headers as user
//! headers and the raw value as payload. A record whose `ce_` headers do not
//! decode gets the same envelope with the decode error in the
//! [`DECODE_ERROR`] header; the source turns that into
//! `Delivery::decode_error`, so the consumer's runtime dead-letters it with
//! reason `decode` before any handler runs — never skipped silently, never
//! mistaken for a foreign message.
//!
//! postbox's own transport headers (retry due time, origin of a retry copy)
//! are `postbox-*` headers outside the envelope.

use std::borrow::Cow;
use std::time::SystemTime;

use bytes::Bytes;
use postbox_core::codec::{attr, binary, foreign, is_reserved};
use postbox_core::envelope::Text;
use postbox_core::{Envelope, Error};
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
/// Envelope header set on a record whose CloudEvents headers did not decode.
pub const DECODE_ERROR: &str = "postbox.decode-error";

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

/// The headers of an envelope and the estimated size of the record.
pub(crate) struct Encoded {
    /// The record headers.
    pub(crate) headers: OwnedHeaders,
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

/// Encodes the envelope's metadata as Kafka headers (binary content mode),
/// plus the transport headers of a retry copy.
pub(crate) fn encode(env: &Envelope, retry: Option<&RetryInfo>) -> Result<Encoded, Error> {
    let attrs = binary::encode(env)?;
    let mut headers = OwnedHeaders::new_with_capacity(attrs.len() + 4);
    let mut size = RECORD_OVERHEAD + env.payload.len() + env.key.as_deref().map_or(0, str::len);
    for (name, value) in &attrs {
        if name == attr::PARTITIONKEY && env.key.as_deref() == Some(value.as_str()) {
            continue; // it is the record key
        }
        let key = header_name(name);
        size += key.len() + value.len() + 2;
        headers = headers.insert(Header {
            key: key.as_ref(),
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
            size += k.len() + v.len() + 2;
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
    }
    Ok(Encoded { headers, size })
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

/// A decoded record: the envelope and the retry transport facts.
#[derive(Debug, Clone)]
pub(crate) struct Decoded {
    /// The envelope (boxed: consumers hold it boxed, and it is written once
    /// in place).
    pub(crate) envelope: Box<Envelope>,
    /// Retry transport headers, if this is a retry copy.
    pub(crate) retry: RetryInfo,
    /// Whether the record was foreign (no CloudEvents headers, or broken ones).
    // Only the tests read it: consumers see a foreign record by its type.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) foreign: bool,
}

/// Decodes a record. Never fails: foreign and broken records become foreign
/// envelopes (see the module docs).
pub(crate) fn decode<'a>(
    record: RecordRef<'a>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    foreign_type: &Text,
) -> Decoded {
    let mut attrs = binary::Attributes::default();
    let mut others: Vec<(&str, Option<&[u8]>)> = Vec::new();
    let mut retry = RetryInfo::default();
    let mut has_ce = false;
    let mut bad_utf8: Option<&str> = None;
    let mut origin: (Option<&str>, Option<i32>, Option<i64>) = (None, None, None);
    for (name, value) in headers {
        if let Some(a) = binary::strip_prefix(name, CE_PREFIX) {
            has_ce = true;
            match value.map(std::str::from_utf8) {
                Some(Ok(v)) => attrs.set(a, v),
                Some(Err(_)) => bad_utf8 = Some(name),
                None => {}
            }
        } else if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            if let Some(Ok(v)) = value.map(std::str::from_utf8) {
                attrs.datacontenttype = Some(v);
            }
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
    let record_key = record.key.and_then(|k| std::str::from_utf8(k).ok());
    if has_ce {
        let result = match bad_utf8 {
            Some(name) => Err(Error::new(
                postbox_core::ErrorKind::Decode,
                format!("header {name:?} is not UTF-8"),
            )),
            // The payload is set afterwards: a clone of a fresh `Bytes` would
            // allocate its shared header (the failure path needs it too).
            None => attrs.decode_boxed(Bytes::new()),
        };
        match result {
            Ok(mut envelope) => {
                envelope.payload = payload;
                if envelope.key.is_none() {
                    envelope.key = record_key.map(str::to_string);
                }
                return Decoded {
                    envelope,
                    retry,
                    foreign: false,
                };
            }
            Err(e) => {
                let content_type = attrs.datacontenttype;
                let mut d = foreign_envelope(record, &others, content_type, payload, foreign_type);
                d.envelope
                    .headers
                    .insert(DECODE_ERROR.to_string(), e.message().to_string());
                return d;
            }
        }
    }
    let content_type = attrs.datacontenttype;
    foreign_envelope(record, &others, content_type, payload, foreign_type)
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
    let mut facts = foreign::Foreign::new(
        format!("{}/{}/{}", record.topic, record.partition, record.offset),
        Cow::Owned(record.topic.to_string()),
    );
    facts.event_type = foreign_type.clone();
    facts.content_type = content_type.map(|v| Cow::Owned(v.to_string()));
    let mut envelope = Box::new(foreign::envelope(facts, payload));
    envelope.key = record.key.map(|k| String::from_utf8_lossy(k).into_owned());
    for (name, value) in others {
        if is_reserved(name) {
            continue;
        }
        let v = value.map(String::from_utf8_lossy).unwrap_or_default();
        envelope.headers.insert(name.to_string(), v.into_owned());
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
        let enc = encode(env, retry).unwrap();
        let p = pairs(&enc.headers);
        let rec = RecordRef {
            topic: "orders",
            partition: 1,
            offset: 7,
            key: env.key.as_deref().map(str::as_bytes),
            payload: Some(&env.payload),
        };
        decode(
            rec,
            p.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))),
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
        let enc = encode(&env, None).unwrap();
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
            [
                ("trace", Some(&b"abc"[..])),
                ("content-type", Some(&b"text/plain"[..])),
            ],
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
    fn broken_cloudevents_headers_are_consumed_as_foreign_with_the_error() {
        let rec = RecordRef {
            topic: "t",
            partition: 0,
            offset: 1,
            key: None,
            payload: None,
        };
        let d = decode(
            rec,
            [
                ("ce_specversion", Some(&b"1.0"[..])),
                ("ce_id", Some(&b"x"[..])),
            ],
            &Cow::Borrowed("f"),
        );
        assert!(d.foreign);
        assert!(d.envelope.headers[DECODE_ERROR].contains("type"));
        let d = decode(
            rec,
            [("ce_id", Some(&[0xffu8, 0xfe][..]))],
            &Cow::Borrowed("f"),
        );
        assert!(d.envelope.headers[DECODE_ERROR].contains("UTF-8"));
    }

    #[test]
    fn size_estimate_covers_payload_and_headers() {
        let env = Envelope::builder("t").payload(vec![1u8; 1000]).build();
        let enc = encode(&env, None).unwrap();
        assert!(enc.size > 1000 + 50, "{}", enc.size);
    }
}
