//! Structured content mode: the envelope as one CloudEvents JSON document.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    attr, check_encodable, decode_error, encode_error, format_time, is_attribute_name,
    is_json_content_type, parse_attempt, parse_time, SPEC_VERSION,
};
use crate::envelope::{Envelope, Headers, MessageId};
use crate::error::Error;

#[derive(Serialize)]
struct Doc<'a> {
    specversion: &'static str,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    datacontenttype: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataversion: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partitionkey: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    attempt: u32,
    #[serde(flatten)]
    headers: Extensions<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
}

/// The user headers written as members: all of them, or only those that are
/// valid attribute names.
struct Extensions<'a> {
    headers: &'a Headers,
    all: bool,
}

impl Serialize for Extensions<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.headers {
            if self.all || is_attribute_name(k) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Raw(&'a RawValue),
    Text(&'a str),
}

/// Encodes an envelope as a CloudEvents 1.0 JSON document.
///
/// A JSON payload goes into `data` byte for byte; text of another content type
/// goes into `data` as a JSON string; anything else into `data_base64`.
///
/// ```
/// use postbox_core::{codec::structured, Envelope};
/// let env = Envelope::builder("order.placed").payload(r#"{"id":1}"#).build();
/// let bytes = structured::encode(&env).unwrap();
/// let text = std::str::from_utf8(&bytes).unwrap();
/// assert!(text.contains(r#""data":{"id":1}"#));
/// assert_eq!(structured::decode(&bytes).unwrap(), env);
/// ```
///
/// Headers whose names are not valid attribute names are left out: they are
/// transport metadata ([`transport_headers`](super::transport_headers)),
/// which the adapter carries beside the document. [`encode_lossless`] keeps
/// them, for storage.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, Error> {
    encode_doc(env, false)
}

/// [`encode`] with every header as a member, valid attribute name or not:
/// for storing an envelope (the outbox), where the document is read back
/// only by [`decode`] and must lose nothing. Not for the wire: a member whose
/// name is not a valid attribute name makes the document an invalid
/// CloudEvent.
///
/// ```
/// use postbox_core::{codec::structured, Envelope};
/// let env = Envelope::builder("t").header("x-trace", "abc").build();
/// let stored = structured::encode_lossless(&env).unwrap();
/// assert_eq!(structured::decode(&stored).unwrap(), env);
/// let wire = structured::encode(&env).unwrap();
/// assert!(!structured::decode(&wire).unwrap().headers.contains_key("x-trace"));
/// ```
pub fn encode_lossless(env: &Envelope) -> Result<Vec<u8>, Error> {
    encode_doc(env, true)
}

fn encode_doc(env: &Envelope, all_headers: bool) -> Result<Vec<u8>, Error> {
    check_encodable(env)?;
    let mut data = None;
    let mut data_base64 = None;
    if !env.payload.is_empty() {
        let as_json = if is_json_content_type(&env.content_type) {
            serde_json::from_slice::<&RawValue>(&env.payload)
                .ok()
                .filter(|raw| raw.get().as_bytes() == &env.payload[..])
                // `"data": null` reads back as no data: a `null` payload goes to `data_base64`.
                .filter(|raw| raw.get() != "null")
                .map(Data::Raw)
        } else {
            None
        };
        data = as_json.or_else(|| {
            if is_json_content_type(&env.content_type) {
                None
            } else {
                std::str::from_utf8(&env.payload).ok().map(Data::Text)
            }
        });
        if data.is_none() {
            data_base64 = Some(base64::engine::general_purpose::STANDARD.encode(&env.payload));
        }
    }
    let doc = Doc {
        specversion: SPEC_VERSION,
        id: env.id.as_str(),
        event_type: &env.event_type,
        source: &env.source,
        time: env.time.map(format_time).transpose()?,
        datacontenttype: &env.content_type,
        subject: env.subject.as_deref(),
        dataversion: env.schema_version.as_deref(),
        correlationid: env.correlation_id.as_deref(),
        causationid: env.causation_id.as_deref(),
        partitionkey: env.key.as_deref(),
        traceparent: env.traceparent.as_deref(),
        tracestate: env.tracestate.as_deref(),
        attempt: env.attempt,
        headers: Extensions {
            headers: &env.headers,
            all: all_headers,
        },
        data,
        data_base64,
    };
    serde_json::to_vec(&doc)
        .map_err(|e| encode_error("envelope could not be written as JSON").with_source(e))
}

/// Whether `bytes` look like a structured CloudEvent (a JSON object with `specversion`).
///
/// Cheap pre-check used to choose between [`decode`] and a
/// [foreign](super::foreign) envelope.
pub fn looks_like_cloudevent(bytes: &[u8]) -> bool {
    let trimmed = bytes.trim_ascii_start();
    trimmed.first() == Some(&b'{')
        && serde_json::from_slice::<BTreeMap<Cow<'_, str>, &RawValue>>(bytes)
            .map(|m| m.contains_key(attr::SPECVERSION))
            .unwrap_or(false)
}

fn string_attr(name: &str, raw: &RawValue) -> Result<String, Error> {
    text_attr(name, raw).map(Cow::into_owned)
}

/// A string member, borrowed from the document when it has no escapes.
fn text_attr<'a>(name: &str, raw: &'a RawValue) -> Result<Cow<'a, str>, Error> {
    if let Ok(s) = serde_json::from_str::<&'a str>(raw.get()) {
        return Ok(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(raw.get())
        .map(Cow::Owned)
        .map_err(|_| {
            decode_error(format!(
                "attribute `{name}` must be a string, got {}",
                truncate(raw.get())
            ))
        })
}

fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

fn required<'a>(slot: Option<&'a RawValue>, name: &str) -> Result<Cow<'a, str>, Error> {
    let raw =
        slot.ok_or_else(|| decode_error(format!("required attribute `{name}` is missing")))?;
    let value = text_attr(name, raw)?;
    if value.is_empty() {
        return Err(decode_error(format!(
            "required attribute `{name}` is empty"
        )));
    }
    Ok(value)
}

fn optional<'a>(slot: Option<&'a RawValue>, name: &str) -> Result<Option<Cow<'a, str>>, Error> {
    match slot {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => text_attr(name, raw).map(Some),
    }
}

/// The members of a document, read in one pass: each known attribute in
/// its slot, the rest as extensions, every value as raw JSON borrowed from
/// the input. A repeated member keeps its last value.
#[derive(Default)]
struct Members<'a> {
    specversion: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    event_type: Option<&'a RawValue>,
    source: Option<&'a RawValue>,
    time: Option<&'a RawValue>,
    datacontenttype: Option<&'a RawValue>,
    subject: Option<&'a RawValue>,
    dataversion: Option<&'a RawValue>,
    correlationid: Option<&'a RawValue>,
    causationid: Option<&'a RawValue>,
    partitionkey: Option<&'a RawValue>,
    traceparent: Option<&'a RawValue>,
    tracestate: Option<&'a RawValue>,
    attempt: Option<&'a RawValue>,
    data: Option<&'a RawValue>,
    data_base64: Option<&'a RawValue>,
    extensions: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut m = Members::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    let slot = match key.0.as_ref() {
                        attr::SPECVERSION => &mut m.specversion,
                        attr::ID => &mut m.id,
                        attr::TYPE => &mut m.event_type,
                        attr::SOURCE => &mut m.source,
                        attr::TIME => &mut m.time,
                        attr::DATACONTENTTYPE => &mut m.datacontenttype,
                        attr::SUBJECT => &mut m.subject,
                        attr::DATAVERSION => &mut m.dataversion,
                        attr::CORRELATIONID => &mut m.correlationid,
                        attr::CAUSATIONID => &mut m.causationid,
                        attr::PARTITIONKEY => &mut m.partitionkey,
                        attr::TRACEPARENT => &mut m.traceparent,
                        attr::TRACESTATE => &mut m.tracestate,
                        attr::ATTEMPT => &mut m.attempt,
                        attr::DATA => &mut m.data,
                        attr::DATA_BASE64 => &mut m.data_base64,
                        _ => {
                            // A repeat is overwritten when the headers are
                            // filled, in order.
                            m.extensions.push((key.0, value));
                            continue;
                        }
                    };
                    *slot = Some(value);
                }
                Ok(m)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A member name, borrowed unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// Decodes a CloudEvents 1.0 JSON document into an envelope.
///
/// Strict: input that is not a CloudEvent, or a CloudEvent that breaks the
/// specification (missing `id`, a non-string `type`, `data` and `data_base64`
/// both present, …), is an [`ErrorKind::Decode`](crate::ErrorKind::Decode) error
/// naming the problem. Use [`super::foreign`] for input that may be foreign.
pub fn decode(bytes: &[u8]) -> Result<Envelope, Error> {
    let m: Members<'_> = serde_json::from_slice(bytes).map_err(|e| {
        decode_error("not a CloudEvents JSON document (expected a JSON object)").with_source(e)
    })?;
    let spec = required(m.specversion, attr::SPECVERSION)?;
    if spec != SPEC_VERSION {
        return Err(decode_error(format!(
            "unsupported CloudEvents specversion {spec:?}"
        )));
    }
    let id = required(m.id, attr::ID)?;
    let event_type = required(m.event_type, attr::TYPE)?;
    let source = required(m.source, attr::SOURCE)?;
    let time = optional(m.time, attr::TIME)?
        .map(|t| parse_time(&t))
        .transpose()?;
    let content_type = optional(m.datacontenttype, attr::DATACONTENTTYPE)?;
    let attempt = match m.attempt {
        None => 1,
        Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
            Ok(n) if (1..=u64::from(u32::MAX)).contains(&n) => n as u32,
            Ok(n) => return Err(decode_error(format!("`attempt` out of range: {n}"))),
            Err(_) => parse_attempt(&text_attr(attr::ATTEMPT, raw)?)?,
        },
    };
    // Not `Envelope::new`: it would generate an id and read the clock, both
    // overwritten here.
    let mut env = super::binary::blank(Bytes::new());
    env.event_type = super::intern(&event_type);
    env.id = MessageId::from(id.as_ref());
    env.source = super::intern(&source);
    env.time = time;
    if let Some(ct) = content_type {
        env.content_type = super::intern(&ct);
    }
    env.attempt = attempt;
    let owned = |v: Option<Cow<'_, str>>| v.map(Cow::into_owned);
    env.subject = owned(optional(m.subject, attr::SUBJECT)?);
    env.schema_version = optional(m.dataversion, attr::DATAVERSION)?.map(|v| super::intern(&v));
    env.correlation_id = owned(optional(m.correlationid, attr::CORRELATIONID)?);
    env.causation_id = owned(optional(m.causationid, attr::CAUSATIONID)?);
    env.key = owned(optional(m.partitionkey, attr::PARTITIONKEY)?);
    env.traceparent = owned(optional(m.traceparent, attr::TRACEPARENT)?);
    env.tracestate = owned(optional(m.tracestate, attr::TRACESTATE)?);

    let data = m.data.filter(|raw| raw.get() != "null");
    let data_base64 = m.data_base64.filter(|raw| raw.get() != "null");
    env.payload = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(decode_error("both `data` and `data_base64` are present"));
        }
        (None, Some(raw)) => {
            let text = text_attr(attr::DATA_BASE64, raw)?;
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| decode_error("`data_base64` is not valid base64").with_source(e))?
                .into()
        }
        (Some(raw), None) => {
            if !is_json_content_type(&env.content_type) && raw.get().starts_with('"') {
                string_attr(attr::DATA, raw)?.into_bytes().into()
            } else {
                Bytes::copy_from_slice(raw.get().as_bytes())
            }
        }
        (None, None) => Bytes::new(),
    };

    for (name, raw) in m.extensions {
        let text = raw.get();
        let value = match text.as_bytes().first() {
            Some(b'"') => string_attr(&name, raw)?,
            Some(b'{') | Some(b'[') => {
                return Err(decode_error(format!(
                    "extension attribute `{name}` must be a string, number or boolean"
                )))
            }
            _ if text == "null" => {
                env.headers.remove(name.as_ref());
                continue;
            }
            _ => text.to_string(),
        };
        env.headers.insert(name.into_owned(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn binary_payload_uses_data_base64() {
        let env = Envelope::builder("blob")
            .content_type("application/octet-stream")
            .payload(vec![0u8, 159, 146, 150, 255])
            .build();
        let bytes = encode(&env).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"data_base64\":\"AJ+SlvmA\"") || text.contains("data_base64"));
        assert_eq!(decode(&bytes).unwrap(), env);
    }

    #[test]
    fn json_with_whitespace_round_trips_exactly() {
        let env = Envelope::builder("x").payload(" { \"a\" : 1 } ").build();
        let decoded = decode(&encode(&env).unwrap()).unwrap();
        assert_eq!(decoded.payload, env.payload);
    }

    #[test]
    fn text_payload_is_a_json_string() {
        let env = Envelope::builder("note")
            .content_type("text/plain")
            .payload("héllo \"x\"")
            .build();
        let bytes = encode(&env).unwrap();
        assert!(std::str::from_utf8(&bytes)
            .unwrap()
            .contains(r#""data":"héllo \"x\"""#));
        assert_eq!(decode(&bytes).unwrap(), env);
    }

    #[test]
    fn reads_a_cloudevent_from_another_sdk() {
        let doc = br#"{"specversion":"1.0","id":"A234-1234-1234","type":"com.example.someevent",
            "source":"/mycontext","time":"2018-04-05T17:31:00Z","comexampleextension1":"value",
            "comexampleothervalue":5,"datacontenttype":"application/json","data":{"a":[1,2]}}"#;
        let env = decode(doc).unwrap();
        assert_eq!(env.id.as_str(), "A234-1234-1234");
        assert_eq!(env.headers["comexampleothervalue"], "5");
        assert_eq!(env.headers["comexampleextension1"], "value");
        assert_eq!(&env.payload[..], br#"{"a":[1,2]}"#);
        assert_eq!(env.attempt, 1);
    }

    #[test]
    fn malformed_cloudevents_are_typed_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a CloudEvents JSON document"),
            (br#"{"specversion":"1.0","type":"t","source":"s"}"#, "`id` is missing"),
            (br#"{"specversion":"0.3","id":"1","type":"t","source":"s"}"#, "specversion"),
            (br#"{"specversion":"1.0","id":1,"type":"t","source":"s"}"#, "`id` must be a string"),
            (br#"{"specversion":"1.0","id":"1","type":"t","source":"s","data":1,"data_base64":"AA=="}"#, "both"),
            (br#"{"specversion":"1.0","id":"1","type":"t","source":"s","data_base64":"%%"}"#, "base64"),
            (br#"{"specversion":"1.0","id":"1","type":"t","source":"s","attempt":0}"#, "attempt"),
            (br#"{"specversion":"1.0","id":"1","type":"t","source":"s","time":"noon"}"#, "RFC 3339"),
            (br#"{"specversion":"1.0","id":"1","type":"t","source":"s","x":{"y":1}}"#, "extension attribute `x`"),
        ];
        for (input, expected) in cases {
            let err = decode(input).unwrap_err();
            assert_eq!(
                err.kind(),
                &ErrorKind::Decode,
                "{}",
                String::from_utf8_lossy(input)
            );
            assert!(
                err.message().contains(expected),
                "{:?} should mention {expected:?}",
                err.message()
            );
        }
    }

    #[test]
    fn reserved_header_is_an_encode_error() {
        let env = Envelope::builder("x").header("partitionkey", "k").build();
        assert_eq!(encode(&env).unwrap_err().kind(), &ErrorKind::Encode);
    }
}
