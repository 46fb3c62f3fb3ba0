//! Structured content mode: the envelope as one CloudEvents JSON document.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    attr, check_encodable, decode_error, encode_error, format_time, is_json_content_type,
    parse_attempt, parse_time, SPEC_VERSION,
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
    headers: &'a Headers,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
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
pub fn encode(env: &Envelope) -> Result<Vec<u8>, Error> {
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
        headers: &env.headers,
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
    serde_json::from_str::<String>(raw.get()).map_err(|_| {
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

fn required(map: &mut BTreeMap<Cow<'_, str>, &RawValue>, name: &str) -> Result<String, Error> {
    let raw = map
        .remove(name)
        .ok_or_else(|| decode_error(format!("required attribute `{name}` is missing")))?;
    let value = string_attr(name, raw)?;
    if value.is_empty() {
        return Err(decode_error(format!(
            "required attribute `{name}` is empty"
        )));
    }
    Ok(value)
}

fn optional(
    map: &mut BTreeMap<Cow<'_, str>, &RawValue>,
    name: &str,
) -> Result<Option<String>, Error> {
    match map.remove(name) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => string_attr(name, raw).map(Some),
    }
}

/// Decodes a CloudEvents 1.0 JSON document into an envelope.
///
/// Strict: input that is not a CloudEvent, or a CloudEvent that breaks the
/// specification (missing `id`, a non-string `type`, `data` and `data_base64`
/// both present, …), is an [`ErrorKind::Decode`](crate::ErrorKind::Decode) error
/// naming the problem. Use [`super::foreign`] for input that may be foreign.
pub fn decode(bytes: &[u8]) -> Result<Envelope, Error> {
    let mut map: BTreeMap<Cow<'_, str>, &RawValue> =
        serde_json::from_slice(bytes).map_err(|e| {
            decode_error("not a CloudEvents JSON document (expected a JSON object)").with_source(e)
        })?;
    let spec = required(&mut map, attr::SPECVERSION)?;
    if spec != SPEC_VERSION {
        return Err(decode_error(format!(
            "unsupported CloudEvents specversion {spec:?}"
        )));
    }
    let id = required(&mut map, attr::ID)?;
    let event_type = required(&mut map, attr::TYPE)?;
    let source = required(&mut map, attr::SOURCE)?;
    let time = optional(&mut map, attr::TIME)?
        .map(|t| parse_time(&t))
        .transpose()?;
    let content_type = optional(&mut map, attr::DATACONTENTTYPE)?;
    let attempt = match map.remove(attr::ATTEMPT) {
        None => 1,
        Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
            Ok(n) if (1..=u64::from(u32::MAX)).contains(&n) => n as u32,
            Ok(n) => return Err(decode_error(format!("`attempt` out of range: {n}"))),
            Err(_) => parse_attempt(&string_attr(attr::ATTEMPT, raw)?)?,
        },
    };
    // Not `Envelope::new`: it would generate an id and read the clock, both
    // overwritten here.
    let mut env = super::binary::blank(Bytes::new());
    env.event_type = super::intern(&event_type);
    env.id = MessageId::from(id);
    env.source = super::intern(&source);
    env.time = time;
    if let Some(ct) = content_type {
        env.content_type = super::intern(&ct);
    }
    env.attempt = attempt;
    env.subject = optional(&mut map, attr::SUBJECT)?;
    env.schema_version = optional(&mut map, attr::DATAVERSION)?.map(Cow::Owned);
    env.correlation_id = optional(&mut map, attr::CORRELATIONID)?;
    env.causation_id = optional(&mut map, attr::CAUSATIONID)?;
    env.key = optional(&mut map, attr::PARTITIONKEY)?;
    env.traceparent = optional(&mut map, attr::TRACEPARENT)?;
    env.tracestate = optional(&mut map, attr::TRACESTATE)?;

    let data = map.remove(attr::DATA).filter(|raw| raw.get() != "null");
    let data_base64 = map
        .remove(attr::DATA_BASE64)
        .filter(|raw| raw.get() != "null");
    env.payload = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(decode_error("both `data` and `data_base64` are present"));
        }
        (None, Some(raw)) => {
            let text = string_attr(attr::DATA_BASE64, raw)?;
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

    for (name, raw) in map {
        let text = raw.get();
        let value = match text.as_bytes().first() {
            Some(b'"') => string_attr(&name, raw)?,
            Some(b'{') | Some(b'[') => {
                return Err(decode_error(format!(
                    "extension attribute `{name}` must be a string, number or boolean"
                )))
            }
            _ if text == "null" => continue,
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
