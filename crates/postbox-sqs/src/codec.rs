//! Envelope ⇄ SQS/SNS message wire mapping (pure functions).
//!
//! **Structured mode**: the message body is the CloudEvents
//! JSON document of the envelope ([`postbox_core::codec::structured`]), and
//! the envelope is the only truth on decode. A few *message attributes* are
//! added so that SNS filter policies and SQS consumers can route without
//! parsing the body:
//!
//! * `type` — the event type (always);
//! * one `String` attribute per user header (headers whose name is not a valid
//!   attribute name are carried in the body only).
//!
//! postbox's own `retry…` and `dlq…` metadata travels inside the body, never
//! as attributes, so the 10-attribute budget of SQS/SNS is `1 + user headers`,
//! checked before anything is sent ([`Limit::AttributeCount`]).
//!
//! Decoding accepts a structured CloudEvent, the same wrapped in the SNS
//! notification JSON (`{"Type":"Notification","Message":…}`, SNS → SQS
//! without raw message delivery), and anything without CloudEvents markers
//! as a *foreign* message with a synthesized envelope (id = SQS `MessageId`,
//! or the SNS message id).
//!
//! A body that claims to be a CloudEvent (a JSON object with `specversion`,
//! or broken JSON that names it) but breaks the format is **undecodable**:
//! [`decode`] describes what arrived in an envelope of type
//! [`UNDECODABLE_TYPE`] (the SQS body unchanged as payload, the message
//! attributes as headers, see [`attribute_header`]) next to the decoder's
//! error, so the runtime dead-letters it. That envelope's dead-letter copy is
//! an ordinary CloudEvent with the body in `data`; replaying it sends the body
//! back as it arrived ([`encode_raw`]).

use std::borrow::Cow;
use std::collections::HashMap;

use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use bytes::Bytes;
use postbox_core::codec::foreign::{self, Foreign};
use postbox_core::codec::{is_reserved, structured, UNDECODABLE_TYPE};
use postbox_core::envelope::Text;
use postbox_core::{dlq, Envelope, Error, ErrorKind, Limit};

/// The attribute that carries the event type (for filter policies).
pub const ATTR_TYPE: &str = "type";
/// Most message attributes SQS and SNS accept.
pub const MAX_ATTRIBUTES: usize = 10;
/// Largest SQS message (body plus attributes): 1 MiB.
pub const SQS_MAX_BYTES: usize = 1024 * 1024;
/// Largest SNS message (body plus attributes): 256 KiB.
pub const SNS_MAX_BYTES: usize = 256 * 1024;
/// The content type of an undecodable message's envelope whose body is not
/// even JSON: text, so its dead-letter copy carries it readably (a JSON
/// string in `data`). A body that is JSON gets `application/json` and sits
/// in `data` as it is.
pub const UNDECODABLE_TEXT: &str = "text/plain; charset=utf-8";
/// The prefix that keeps a message attribute apart from the envelope's own
/// fields when it becomes a header of an undecodable message's envelope: an
/// attribute named like a CloudEvents attribute (`type`, `id`, …) or one that
/// already starts with the prefix gets it (`type` → `sqs.type`), every other
/// attribute keeps its name. See [`attribute_header`].
pub const ATTRIBUTE_ESCAPE: &str = "sqs.";

/// An envelope ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// The CloudEvents JSON document.
    pub body: String,
    /// String message attributes, `type` first.
    pub attributes: Vec<(String, String)>,
}

impl Encoded {
    /// The size SQS/SNS count against their limit: body plus attribute
    /// names, data types and values.
    pub(crate) fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + "String".len() + v.len())
                .sum::<usize>()
    }
}

/// Whether `env` describes an undecodable message (see [`UNDECODABLE_TYPE`]).
pub(crate) fn is_undecodable(env: &Envelope) -> bool {
    env.event_type == UNDECODABLE_TYPE
}

/// The number of message attributes `env` needs: `type` plus one per user
/// header. An undecodable message's copy gets `type` alone: its headers are
/// the original attributes (up to 10 already), kept in the body.
pub(crate) fn attribute_count(env: &Envelope) -> usize {
    if is_undecodable(env) {
        return 1;
    }
    1 + env.headers.keys().filter(|k| !dlq::is_metadata(k)).count()
}

/// Whether `name` is a valid SQS/SNS message attribute name.
pub(crate) fn is_valid_attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

/// Encodes `env`, checking the attribute budget and `max_bytes` first.
pub(crate) fn encode(env: &Envelope, max_bytes: usize) -> Result<Encoded, Error> {
    let count = attribute_count(env);
    if count > MAX_ATTRIBUTES {
        return Err(Error::limit(Limit::AttributeCount {
            max: MAX_ATTRIBUTES,
            actual: count,
        }));
    }
    // Cheap bound first: the body is at least the payload.
    if env.payload.len() > max_bytes {
        return Err(Error::limit(Limit::BodySize {
            max: max_bytes,
            actual: env.payload.len(),
        }));
    }
    let body = structured::encode(env)?;
    // The structured codec writes JSON text, always valid UTF-8.
    let body = String::from_utf8(body).map_err(|e| {
        Error::new(
            postbox_core::ErrorKind::Encode,
            "structured body is not UTF-8",
        )
        .with_source(e)
    })?;
    let mut attributes = Vec::with_capacity(count);
    attributes.push((ATTR_TYPE.to_string(), env.event_type.to_string()));
    if !is_undecodable(env) {
        for (k, v) in &env.headers {
            if !dlq::is_metadata(k) && is_valid_attribute_name(k) && k != ATTR_TYPE && !v.is_empty()
            {
                attributes.push((k.clone(), v.clone()));
            }
        }
    }
    checked_size(Encoded { body, attributes }, max_bytes)
}

fn checked_size(encoded: Encoded, max_bytes: usize) -> Result<Encoded, Error> {
    let size = encoded.size();
    if size > max_bytes {
        return Err(Error::limit(Limit::BodySize {
            max: max_bytes,
            actual: size,
        }));
    }
    Ok(encoded)
}

/// The message an undecodable message's envelope stands for, as it arrived:
/// the payload as the body, the headers (dead-letter and retry metadata
/// left out) back to their attribute names. What replay sends.
pub(crate) fn encode_raw(env: &Envelope, max_bytes: usize) -> Result<Encoded, Error> {
    let body = std::str::from_utf8(&env.payload)
        .map_err(|e| {
            Error::new(
                ErrorKind::Encode,
                format!("the body of undecodable message {} is not UTF-8", env.id),
            )
            .with_source(e)
        })?
        .to_string();
    if body.is_empty() {
        return Err(Error::new(
            ErrorKind::Encode,
            format!("undecodable message {} has an empty body", env.id),
        ));
    }
    let mut attributes = Vec::new();
    for (header, value) in &env.headers {
        if dlq::is_metadata(header) {
            continue;
        }
        let name = header_attribute(header);
        if !is_valid_attribute_name(name) || value.is_empty() {
            return Err(Error::new(
                ErrorKind::Encode,
                format!(
                    "header {header:?} of undecodable message {} cannot be a message attribute",
                    env.id
                ),
            ));
        }
        attributes.push((name.to_string(), value.clone()));
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::limit(Limit::AttributeCount {
            max: MAX_ATTRIBUTES,
            actual: attributes.len(),
        }));
    }
    checked_size(Encoded { body, attributes }, max_bytes)
}

/// The header name of message attribute `name` in an undecodable message's
/// envelope: `name`, or [`ATTRIBUTE_ESCAPE`]`name` when `name` is reserved
/// for an envelope field or already starts with the prefix (so the mapping
/// reverses exactly).
///
/// ```
/// use postbox_sqs::attribute_header;
/// assert_eq!(attribute_header("tenant"), "tenant");
/// assert_eq!(attribute_header("type"), "sqs.type");
/// assert_eq!(attribute_header("sqs.x"), "sqs.sqs.x");
/// ```
pub fn attribute_header(name: &str) -> String {
    if is_reserved(name) || name.starts_with(ATTRIBUTE_ESCAPE) {
        format!("{ATTRIBUTE_ESCAPE}{name}")
    } else {
        name.to_string()
    }
}

/// The message attribute name of a header made by [`attribute_header`].
fn header_attribute(header: &str) -> &str {
    header.strip_prefix(ATTRIBUTE_ESCAPE).unwrap_or(header)
}

/// The message attributes of a received message, as the SDK gives them.
pub(crate) type Attributes = HashMap<String, MessageAttributeValue>;

/// The text of a message attribute: `String` and `Number` values as they
/// are, `Binary` values in base64.
fn attribute_text(v: &MessageAttributeValue) -> Option<String> {
    match (&v.string_value, &v.binary_value) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(b)) => Some(base64::engine::general_purpose::STANDARD.encode(b.as_ref())),
        (None, None) => None,
    }
}

/// What the consumer knows about a received message besides its body.
#[derive(Debug, Clone)]
pub(crate) struct Received<'a> {
    /// SQS `MessageId`.
    pub message_id: &'a str,
    /// The queue it came from (source of foreign envelopes).
    pub queue: &'a str,
    /// The type given to foreign messages.
    pub foreign_type: &'a Text,
    /// The message attributes, kept on an undecodable message's envelope
    /// (read only then, so a good message costs nothing more).
    pub attributes: Option<&'a Attributes>,
    /// The FIFO `MessageGroupId`: an undecodable message's key, so its
    /// dead-letter copy (and replay) can go to a FIFO queue.
    pub group: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct SnsNotification<'a> {
    #[serde(rename = "Type")]
    kind: Cow<'a, str>,
    #[serde(rename = "Message")]
    message: String,
    #[serde(rename = "MessageId")]
    message_id: Option<String>,
    #[serde(rename = "TopicArn")]
    topic_arn: String,
}

/// The SNS notification wrapper of a body delivered without raw message
/// delivery, if it is one: `(message, sns message id, topic arn)`.
pub(crate) fn unwrap_sns(body: &str) -> Option<(String, Option<String>, String)> {
    let trimmed = body.trim_start();
    if !trimmed.starts_with('{') || !trimmed.contains("\"TopicArn\"") {
        return None;
    }
    let n: SnsNotification<'_> = serde_json::from_str(body).ok()?;
    (n.kind == "Notification").then_some((n.message, n.message_id, n.topic_arn))
}

/// Whether `bytes` claim to be a structured CloudEvent: a JSON object with
/// `specversion`, or an object that is not even JSON but names
/// `"specversion"` (a truncated or mangled event).
pub(crate) fn claims_cloudevent(bytes: &[u8]) -> bool {
    if structured::looks_like_cloudevent(bytes) {
        return true;
    }
    const MARKER: &[u8] = b"\"specversion\"";
    bytes.trim_ascii_start().first() == Some(&b'{')
        && bytes.windows(MARKER.len()).any(|w| w == MARKER)
        // Valid JSON with `specversion` deeper down is someone else's document.
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err()
}

/// Decodes a received body (raw or SNS-wrapped, postbox or foreign). A body
/// that claims to be a CloudEvent but breaks the format comes back as what
/// arrived (see [`UNDECODABLE_TYPE`]) with the decoder's error.
pub(crate) fn decode(body: &str, received: &Received<'_>) -> (Envelope, Option<Error>) {
    let (event, id, source) = match unwrap_sns(body) {
        Some((message, sns_id, topic)) => (
            message,
            sns_id.unwrap_or_else(|| received.message_id.to_string()),
            topic,
        ),
        None => (
            body.to_string(),
            received.message_id.to_string(),
            received.queue.to_string(),
        ),
    };
    if claims_cloudevent(event.as_bytes()) {
        return match structured::decode(event.as_bytes()) {
            Ok(env) => (env, None),
            Err(error) => (undecodable(body, id, source, received), Some(error)),
        };
    }
    let mut f = Foreign::new(id, source);
    f.event_type = received.foreign_type.clone();
    (foreign::envelope(f, Bytes::from(event)), None)
}

/// The envelope of an undecodable message: the SQS body unchanged (the SNS
/// wrapper included) as payload, the message attributes as headers.
fn undecodable(body: &str, id: String, source: String, received: &Received<'_>) -> Envelope {
    let mut f = Foreign::new(id, source);
    f.event_type = Cow::Borrowed(UNDECODABLE_TYPE);
    // JSON stays JSON in the copy's `data` (no growth, readable); anything
    // else becomes a JSON string.
    let json = serde_json::from_str::<serde::de::IgnoredAny>(body).is_ok();
    f.content_type = Some(Cow::Borrowed(if json {
        postbox_core::envelope::JSON
    } else {
        UNDECODABLE_TEXT
    }));
    let mut env = foreign::envelope(f, Bytes::copy_from_slice(body.as_bytes()));
    env.key = received.group.map(str::to_string);
    for (name, value) in received.attributes.into_iter().flatten() {
        if let Some(text) = attribute_text(value) {
            env.headers.insert(attribute_header(name), text);
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use postbox_core::ErrorKind;

    fn decoded((env, error): (Envelope, Option<Error>)) -> Envelope {
        assert!(error.is_none(), "{error:?}");
        env
    }

    struct Broken {
        envelope: Envelope,
        error: Error,
    }

    fn broken((envelope, error): (Envelope, Option<Error>)) -> Broken {
        let error = error.expect("a decode error");
        Broken { envelope, error }
    }

    fn received() -> (String, Text) {
        ("m-1".to_string(), Cow::Borrowed("postbox.foreign"))
    }

    #[test]
    fn round_trip_with_attributes() {
        let env = Envelope::builder("order.placed")
            .key("k")
            .header("tenant", "acme")
            .header(postbox_core::delivery::LAST_REASON, "x")
            .payload(r#"{"a":1}"#)
            .build();
        let enc = encode(&env, SQS_MAX_BYTES).unwrap();
        assert_eq!(
            enc.attributes,
            vec![
                ("type".to_string(), "order.placed".to_string()),
                ("tenant".to_string(), "acme".to_string())
            ]
        );
        let (id, ty) = received();
        let r = Received {
            message_id: &id,
            queue: "q",
            foreign_type: &ty,
            attributes: None,
            group: None,
        };
        assert_eq!(decoded(decode(&enc.body, &r)), env);
    }

    #[test]
    fn eleven_attributes_are_refused() {
        let mut env = Envelope::new("t", "{}");
        for i in 0..10 {
            env.headers.insert(format!("h{i}"), "v".into());
        }
        let e = encode(&env, SQS_MAX_BYTES).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::LimitExceeded(Limit::AttributeCount {
                max: 10,
                actual: 11
            })
        );
        env.headers.remove("h0");
        env.headers.insert(dlq::REASON.into(), "decode".into());
        assert!(
            encode(&env, SQS_MAX_BYTES).is_ok(),
            "dlq metadata is in the body"
        );
    }

    #[test]
    fn oversize_is_refused() {
        let env = Envelope::new("t", vec![b'a'; 300 * 1024]);
        let e = encode(&env, SNS_MAX_BYTES).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::LimitExceeded(Limit::BodySize { max, .. }) if *max == SNS_MAX_BYTES
        ));
        // Base64 growth is counted too.
        let env = Envelope::builder("t")
            .content_type("application/octet-stream")
            .payload(vec![0u8; 900 * 1024])
            .build();
        assert!(encode(&env, SQS_MAX_BYTES).is_err());
    }

    #[test]
    fn sns_wrapper_is_unwrapped() {
        let env = Envelope::new("order.placed", r#"{"a":1}"#);
        let enc = encode(&env, SQS_MAX_BYTES).unwrap();
        let wrapped = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-1",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": enc.body,
            "Timestamp": "2026-01-01T00:00:00.000Z",
        })
        .to_string();
        let (id, ty) = received();
        let r = Received {
            message_id: &id,
            queue: "q",
            foreign_type: &ty,
            attributes: None,
            group: None,
        };
        assert_eq!(decoded(decode(&wrapped, &r)), env);
        // A foreign message through SNS keeps the SNS id and the topic as source.
        let foreign = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-2",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": "hello",
        })
        .to_string();
        let got = decoded(decode(&foreign, &r));
        assert_eq!(got.id.as_str(), "sns-2");
        assert_eq!(&got.payload[..], b"hello");
        assert!(got.source.ends_with(":orders"));
    }

    #[test]
    fn foreign_messages_get_a_synthesized_envelope() {
        let (id, ty) = received();
        let r = Received {
            message_id: &id,
            queue: "orders",
            foreign_type: &ty,
            attributes: None,
            group: None,
        };
        let got = decoded(decode(r#"{"order":7}"#, &r));
        assert_eq!(got.id.as_str(), "m-1");
        assert_eq!(got.event_type, "postbox.foreign");
        assert_eq!(got.source, "orders");
        // JSON without `specversion` at the top, and text, are foreign too.
        for body in [
            r#"{"data":{"specversion":"1.0"}}"#,
            "hello",
            "{not json",
            " ",
        ] {
            let got = decoded(decode(body, &r));
            assert_eq!(got.event_type, "postbox.foreign", "{body}");
            assert_eq!(&got.payload[..], body.as_bytes());
        }
    }

    #[test]
    fn a_broken_cloudevent_is_undecodable_with_what_arrived() {
        let (id, ty) = received();
        let text = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .unwrap()
        };
        let attributes = Attributes::from([
            ("tenant".to_string(), text("acme")),
            ("type".to_string(), text("order.placed")),
            ("sqs.x".to_string(), text("1")),
            (
                "blob".to_string(),
                MessageAttributeValue::builder()
                    .data_type("Binary")
                    .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![0u8, 255]))
                    .build()
                    .unwrap(),
            ),
        ]);
        let r = Received {
            message_id: &id,
            queue: "orders",
            foreign_type: &ty,
            attributes: Some(&attributes),
            group: Some("g1"),
        };
        for (body, why) in [
            (r#"{"specversion":"1.0","id":"1"}"#, "`type` is missing"),
            (
                r#"{"specversion":"0.3","id":"1","type":"t","source":"s"}"#,
                "specversion",
            ),
            (r#"{"specversion":"1.0""#, "not a CloudEvents JSON document"),
            (
                r#" {"specversion":"1.0","id":1,"type":"t","source":"s"} "#,
                "`id` must be a string",
            ),
        ] {
            let u = broken(decode(body, &r));
            assert_eq!(u.error.kind(), &ErrorKind::Decode, "{body}");
            assert!(u.error.message().contains(why), "{body}: {}", u.error);
            let env = &u.envelope;
            assert_eq!(&env.payload[..], body.as_bytes());
            assert_eq!(env.id.as_str(), "m-1");
            assert_eq!(env.event_type, UNDECODABLE_TYPE);
            assert_eq!(env.source, "orders");
            assert_eq!(env.key.as_deref(), Some("g1"));
            assert_eq!(env.headers["tenant"], "acme");
            assert_eq!(env.headers["sqs.type"], "order.placed");
            assert_eq!(env.headers["sqs.sqs.x"], "1");
            assert_eq!(env.headers["blob"], "AP8=");
            let json = serde_json::from_str::<serde_json::Value>(body).is_ok();
            let expected = if json {
                "application/json"
            } else {
                UNDECODABLE_TEXT
            };
            assert_eq!(env.content_type, expected, "{body}");
            // Its dead-letter copy fits the attribute budget whatever arrived.
            let mut copy = env.clone();
            copy.headers.insert(dlq::REASON.into(), "decode".into());
            for i in 0..10 {
                copy.headers.insert(format!("a{i}"), "v".into());
            }
            let enc = encode(&copy, SQS_MAX_BYTES).unwrap();
            assert_eq!(
                enc.attributes,
                vec![("type".to_string(), UNDECODABLE_TYPE.to_string())]
            );
            // ... and reads back as the same bytes and attributes.
            let back = structured::decode(enc.body.as_bytes()).unwrap();
            assert_eq!(back.payload, env.payload);
            if json && body.trim() == body {
                assert!(
                    enc.body.contains(&format!(r#""data":{body}"#)),
                    "{}",
                    enc.body
                );
            }
            assert_eq!(back.headers["sqs.type"], "order.placed");
            // Replay sends the body as it arrived, attributes under their names.
            let raw = encode_raw(env, SQS_MAX_BYTES).unwrap();
            assert_eq!(raw.body, body);
            assert_eq!(
                raw.attributes,
                vec![
                    ("blob".to_string(), "AP8=".to_string()),
                    ("sqs.x".to_string(), "1".to_string()),
                    ("type".to_string(), "order.placed".to_string()),
                    ("tenant".to_string(), "acme".to_string()),
                ]
            );
        }
    }

    #[test]
    fn an_sns_wrapped_broken_cloudevent_keeps_the_wrapper() {
        let (id, ty) = received();
        let r = Received {
            message_id: &id,
            queue: "orders-billing",
            foreign_type: &ty,
            attributes: None,
            group: None,
        };
        let wrapped = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-3",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": r#"{"specversion":"1.0","id":"1","type":"t","source":"s","time":"noon"}"#,
        })
        .to_string();
        let u = broken(decode(&wrapped, &r));
        assert!(u.error.message().contains("RFC 3339"), "{}", u.error);
        assert_eq!(&u.envelope.payload[..], wrapped.as_bytes());
        assert_eq!(u.envelope.id.as_str(), "sns-3");
        assert!(u.envelope.source.ends_with(":orders"));
    }

    #[test]
    fn replay_of_an_undecodable_message_checks_what_it_sends() {
        let mut env = Envelope::builder(UNDECODABLE_TYPE)
            .payload(vec![0xff, 0xfe])
            .build();
        assert_eq!(
            encode_raw(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::Encode
        );
        env.payload = Bytes::from_static(b"{");
        env.headers.insert("bad name".into(), "v".into());
        assert_eq!(
            encode_raw(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::Encode
        );
        env.headers.clear();
        for i in 0..11 {
            env.headers.insert(format!("a{i}"), "v".into());
        }
        assert!(matches!(
            encode_raw(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            ErrorKind::LimitExceeded(Limit::AttributeCount {
                max: 10,
                actual: 11
            })
        ));
        env.headers.clear();
        env.payload = Bytes::new();
        assert_eq!(
            encode_raw(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::Encode
        );
    }

    #[test]
    fn attribute_names() {
        assert!(is_valid_attribute_name("tenant-id_2.x"));
        assert!(!is_valid_attribute_name("AWS.trace"));
        assert!(!is_valid_attribute_name("a..b"));
        assert!(!is_valid_attribute_name("with space"));
    }
}
