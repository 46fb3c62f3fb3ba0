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
//! without raw message delivery), and anything else as a *foreign* message
//! with a synthesized envelope (id = SQS `MessageId`, or the SNS message id).

use std::borrow::Cow;

use bytes::Bytes;
use postbox_core::codec::foreign::{self, Foreign};
use postbox_core::codec::structured;
use postbox_core::envelope::Text;
use postbox_core::{dlq, Envelope, Error, Limit};

/// The attribute that carries the event type (for filter policies).
pub const ATTR_TYPE: &str = "type";
/// Most message attributes SQS and SNS accept.
pub const MAX_ATTRIBUTES: usize = 10;
/// Largest SQS message (body plus attributes): 1 MiB.
pub const SQS_MAX_BYTES: usize = 1024 * 1024;
/// Largest SNS message (body plus attributes): 256 KiB.
pub const SNS_MAX_BYTES: usize = 256 * 1024;

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

/// The number of message attributes `env` needs: `type` plus one per user header.
pub(crate) fn attribute_count(env: &Envelope) -> usize {
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
    for (k, v) in &env.headers {
        if !dlq::is_metadata(k) && is_valid_attribute_name(k) && k != ATTR_TYPE && !v.is_empty() {
            attributes.push((k.clone(), v.clone()));
        }
    }
    let encoded = Encoded { body, attributes };
    let size = encoded.size();
    if size > max_bytes {
        return Err(Error::limit(Limit::BodySize {
            max: max_bytes,
            actual: size,
        }));
    }
    Ok(encoded)
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

/// Decodes a received body (raw or SNS-wrapped, postbox or foreign).
pub(crate) fn decode(body: &str, received: &Received<'_>) -> Result<Envelope, Error> {
    let (body, id, source) = match unwrap_sns(body) {
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
    foreign::structured_or_foreign(Bytes::from(body), || {
        let mut f = Foreign::new(id, source);
        f.event_type = received.foreign_type.clone();
        f
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postbox_core::ErrorKind;

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
        };
        assert_eq!(decode(&enc.body, &r).unwrap(), env);
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
        };
        assert_eq!(decode(&wrapped, &r).unwrap(), env);
        // A foreign message through SNS keeps the SNS id and the topic as source.
        let foreign = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-2",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": "hello",
        })
        .to_string();
        let got = decode(&foreign, &r).unwrap();
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
        };
        let got = decode(r#"{"order":7}"#, &r).unwrap();
        assert_eq!(got.id.as_str(), "m-1");
        assert_eq!(got.event_type, "postbox.foreign");
        assert_eq!(got.source, "orders");
        // A broken CloudEvent is a decode error, not a foreign message.
        let e = decode(r#"{"specversion":"1.0","id":"1"}"#, &r).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Decode);
    }

    #[test]
    fn attribute_names() {
        assert!(is_valid_attribute_name("tenant-id_2.x"));
        assert!(!is_valid_attribute_name("AWS.trace"));
        assert!(!is_valid_attribute_name("a..b"));
        assert!(!is_valid_attribute_name("with space"));
    }
}
