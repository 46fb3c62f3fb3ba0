//! Property tests of the CloudEvents codecs: encode → decode round-trips, and
//! decoding arbitrary input never panics (docs/design.md §2).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use postbox_core::codec::foreign::{self, Foreign};
use postbox_core::codec::{self, binary, is_reserved, structured, RESERVED};
use postbox_core::{Envelope, ErrorKind, Headers, MessageId};
use proptest::prelude::*;
use serde_json::{Map, Value};
use uuid::Uuid;

/// First second of the year 10000: times must stay below it (RFC 3339 has four year digits).
const YEAR_10000: u64 = 253_402_300_800;

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "text/plain",
    "application/octet-stream",
    "application/vnd.x+json",
];

fn message_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        any::<u128>().prop_map(|n| MessageId::from_uuid(Uuid::from_u128(n))),
        Just(()).prop_map(|()| MessageId::new()),
        // Upper-case UUIDs are not canonical: they stay text, verbatim.
        any::<u128>().prop_map(|n| MessageId::from(Uuid::from_u128(n).to_string().to_uppercase())),
        ".+".prop_map(MessageId::from),
        any::<String>()
            .prop_filter("ids are not empty", |s| !s.is_empty())
            .prop_map(MessageId::from),
    ]
}

fn non_empty_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9.]{0,20}",
        any::<String>().prop_filter("not empty", |s| !s.is_empty()),
    ]
}

fn time() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        (0..YEAR_10000, 0u32..1_000_000_000),
        (0..YEAR_10000, Just(0u32)),
        (0..YEAR_10000, (0u32..1000).prop_map(|ms| ms * 1_000_000)),
    ]
    .prop_map(|(secs, nanos)| SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[ -~]{0,16}", Just(String::new())]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9]{0,12}",
        Just("dlqreason".to_string()),
        Just("retryfirstfailedat".to_string()),
        Just("dlq.reason".to_string()),
        any::<String>(),
    ]
    .prop_filter("reserved for an envelope field", |name| !is_reserved(name))
}

fn headers() -> impl Strategy<Value = Headers> {
    proptest::collection::btree_map(header_name(), text(), 0..6)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn whitespace() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,3}"
}

/// Valid JSON text: compact or pretty, with or without surrounding whitespace.
fn json_text() -> impl Strategy<Value = Vec<u8>> {
    (json_value(), any::<bool>(), whitespace(), whitespace()).prop_map(
        |(value, pretty, before, after)| {
            let body = if pretty {
                serde_json::to_string_pretty(&value).unwrap()
            } else {
                serde_json::to_string(&value).unwrap()
            };
            format!("{before}{body}{after}").into_bytes()
        },
    )
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..128),
        json_text(),
        any::<String>().prop_map(String::into_bytes),
        Just(Vec::new()),
    ]
}

fn content_type() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(CONTENT_TYPES)
}

prop_compose! {
    fn envelope()(
        id in message_id(),
        event_type in non_empty_text(),
        source in non_empty_text(),
        time in proptest::option::of(time()),
        (schema_version, subject, correlation_id, causation_id) in (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
        (key, traceparent, tracestate) in (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
        attempt in prop_oneof![1u32..10, 1u32..=u32::MAX],
        headers in headers(),
        content_type in content_type(),
        payload in payload(),
    ) -> Envelope {
        let mut env = Envelope::builder(event_type)
            .id(id)
            .source(source)
            .content_type(content_type)
            .payload(payload)
            .build();
        env.time = time;
        env.schema_version = schema_version.map(Cow::Owned);
        env.subject = subject;
        env.correlation_id = correlation_id;
        env.causation_id = causation_id;
        env.key = key;
        env.traceparent = traceparent;
        env.tracestate = tracestate;
        env.attempt = attempt;
        env.headers = headers;
        env
    }
}

/// Attribute names: every reserved one, plausible extension names, anything.
fn attribute_name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(RESERVED).prop_map(str::to_string),
        "[a-z]{1,10}",
        any::<String>(),
    ]
}

/// Attribute values: mostly valid-looking ones, so decoding gets past the
/// required attributes often, and anything.
fn attribute_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1.0".to_string()),
        Just(String::new()),
        "[0-9]{1,12}",
        "-[0-9]{1,3}",
        time().prop_map(|t| postbox_core::codec::format_time(t).unwrap()),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})",
        any::<String>(),
    ]
}

/// A JSON member value for a CloudEvent: strings that may be valid, and any JSON.
fn member_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        attribute_value().prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(|b| {
            use base64::Engine as _;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }),
        json_value(),
    ]
}

/// A JSON object with `"specversion":"1.0"` and random other members; often
/// with the required attributes, so the later checks are reached too.
fn cloudevent_like() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        proptest::collection::vec((attribute_name(), member_value()), 0..10),
    )
        .prop_map(|(with_required, members)| {
            let mut map = Map::new();
            map.insert("specversion".into(), "1.0".into());
            if with_required {
                map.insert("id".into(), "id-1".into());
                map.insert("type".into(), "t".into());
                map.insert("source".into(), "s".into());
            }
            for (name, value) in members {
                map.insert(name, value);
            }
            serde_json::to_vec(&Value::Object(map)).unwrap()
        })
}

fn assert_decode_error(
    result: &Result<Envelope, postbox_core::Error>,
) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        prop_assert_eq!(e.kind(), &ErrorKind::Decode, "{}", e);
    }
    Ok(())
}

fn foreign_facts() -> Foreign {
    Foreign::new("orders/0/42", "orders")
}

/// What an adapter does on receipt: the transport headers of `sent` (those
/// whose names are not attribute names, carried outside the event) back
/// into the decoded envelope.
fn with_transport(mut back: Envelope, sent: &Envelope) -> Envelope {
    for (k, v) in codec::transport_headers(sent) {
        back.headers.insert(k.to_string(), v.to_string());
    }
    back
}

proptest! {
    #[test]
    fn structured_round_trips(env in envelope()) {
        let bytes = structured::encode(&env).unwrap();
        let back = structured::decode(&bytes);
        prop_assert!(back.is_ok(), "{:?}\n{}", back, String::from_utf8_lossy(&bytes));
        prop_assert_eq!(with_transport(back.unwrap(), &env), env.clone());
        // Storage keeps everything in the document.
        let stored = structured::encode_lossless(&env).unwrap();
        prop_assert_eq!(structured::decode(&stored).unwrap(), env);
    }

    #[test]
    fn structured_output_is_a_cloudevent(env in envelope()) {
        let bytes = structured::encode(&env).unwrap();
        prop_assert!(structured::looks_like_cloudevent(&bytes));
        // Every member is a valid attribute name (or data / data_base64).
        let doc: Map<String, Value> = serde_json::from_slice(&bytes).unwrap();
        for name in doc.keys() {
            prop_assert!(
                codec::is_attribute_name(name) || name == "data_base64",
                "member {:?} is not an attribute name", name
            );
        }
        let back = foreign::structured_or_foreign(Bytes::from(bytes), foreign_facts).unwrap();
        prop_assert_eq!(with_transport(back, &env), env);
    }

    #[test]
    fn binary_round_trips(env in envelope()) {
        let attrs = binary::encode(&env).unwrap();
        let back = binary::decode(
            attrs.iter().map(|(k, v)| (k.as_ref(), v.as_str())),
            env.payload.clone(),
        );
        prop_assert!(back.is_ok(), "{:?}\n{:?}", back, attrs);
        for (name, _) in &attrs {
            prop_assert!(codec::is_attribute_name(name), "attribute {:?}", name);
        }
        prop_assert_eq!(with_transport(back.unwrap(), &env), env);
    }

    #[test]
    fn structured_decode_of_arbitrary_bytes_never_panics(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            json_text(),
            cloudevent_like(),
        ]
    ) {
        assert_decode_error(&structured::decode(&bytes))?;
    }

    #[test]
    fn structured_or_foreign_never_panics(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            json_text(),
            cloudevent_like(),
        ]
    ) {
        let body = Bytes::from(bytes.clone());
        let result = foreign::structured_or_foreign(body, foreign_facts);
        assert_decode_error(&result)?;
        if !structured::looks_like_cloudevent(&bytes) {
            // Anything that is not a CloudEvent is consumable as a foreign message.
            let env = result.unwrap();
            prop_assert_eq!(env.id.as_str(), "orders/0/42");
            prop_assert_eq!(&env.payload[..], &bytes[..]);
        }
    }

    #[test]
    fn binary_decode_of_arbitrary_attributes_never_panics(
        attrs in proptest::collection::vec((attribute_name(), attribute_value()), 0..16),
        payload in payload(),
    ) {
        let result = binary::decode(
            attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            Bytes::from(payload),
        );
        assert_decode_error(&result)?;
    }

    #[test]
    fn binary_decode_with_the_required_attributes_never_panics(
        attrs in proptest::collection::vec((attribute_name(), attribute_value()), 0..12),
    ) {
        let required = [("specversion", "1.0"), ("id", "i"), ("type", "t"), ("source", "s")];
        let all = required
            .into_iter()
            .chain(attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_decode_error(&binary::decode(all, Bytes::new()))?;
    }

    #[test]
    fn cloudevent_like_objects_never_panic_and_decode_stably(doc in cloudevent_like()) {
        let result = structured::decode(&doc);
        assert_decode_error(&result)?;
        if let Ok(env) = result {
            // Whatever decodes encodes, and decodes to the same envelope again.
            let again = structured::encode(&env).unwrap();
            let back = with_transport(structured::decode(&again).unwrap(), &env);
            prop_assert_eq!(back, env.clone());
            let attrs = binary::encode(&env).unwrap();
            let back = binary::decode(
                attrs.iter().map(|(k, v)| (k.as_ref(), v.as_str())),
                env.payload.clone(),
            )
            .unwrap();
            prop_assert_eq!(with_transport(back, &env), env);
        }
    }
}

/// Found by `structured_round_trips`: a JSON payload `null` was written as
/// `"data": null`, which reads back as no data (an empty payload).
#[test]
fn json_null_payload_round_trips() {
    for content_type in ["application/json", "application/vnd.x+json"] {
        let env = Envelope::builder("t")
            .content_type(content_type)
            .payload("null")
            .build();
        let bytes = structured::encode(&env).unwrap();
        assert_eq!(structured::decode(&bytes).unwrap(), env);
    }
    let empty = Envelope::builder("t").build();
    let bytes = structured::encode(&empty).unwrap();
    assert_eq!(structured::decode(&bytes).unwrap().payload, Bytes::new());
}
