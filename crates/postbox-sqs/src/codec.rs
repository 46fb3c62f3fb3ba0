//! Envelope ⇄ SQS/SNS message wire mapping (pure functions).
//!
//! **Structured mode**: the message body is the CloudEvents JSON document of
//! the envelope ([`postbox_core::codec::structured`]); *message attributes*
//! carry what SNS filter policies route on and what the document must not
//! hold:
//!
//! * `type` — the event type (for filter policies);
//! * a user header whose name is a valid CloudEvents attribute name
//!   ([`is_attribute_name`]: `tenant`) is an extension in the document, and
//!   also a `String` attribute of the same name, for filter policies (unless
//!   its value is empty: SQS/SNS take no empty attribute value);
//! * every other user header (`x-trace`, `traceId`) is **transport
//!   metadata** (core's header rule): a `String` attribute under its own
//!   name, never in the document, so the document stays a valid CloudEvent.
//!   A name SQS/SNS cannot take as an attribute name (see
//!   [`is_valid_attribute_name`]), or an empty value, is an
//!   [`ErrorKind::Encode`] error before sending ([`check_transport_header`]).
//!
//! postbox's own `retry…` and `dlq…` metadata travels inside the body, never
//! as attributes, so the 10-attribute budget of SQS/SNS is `1 + user headers`,
//! checked before anything is sent ([`Limit::AttributeCount`]). A dead-letter
//! copy (an envelope carrying `dlqreason`) is never refused for headers that
//! are in its document: its transport headers are attributes, then `type`
//! and the valid-name copies as long as the budget allows (a copy of a
//! received message always fits: it arrived with at most 10 attributes).
//!
//! Decoding accepts a structured CloudEvent, the same wrapped in the SNS
//! notification JSON (`{"Type":"Notification","Message":…}`, SNS → SQS
//! without raw message delivery, whose `MessageAttributes` stand for the
//! message attributes), and anything without CloudEvents markers as a
//! *foreign* message with a synthesized envelope (id = SQS `MessageId`, or
//! the SNS message id). Message attributes become headers:
//!
//! * of a CloudEvent, those the document does not hold already, under their
//!   own names, except `type` and other names of envelope fields (the
//!   document is the truth for those);
//! * of a foreign message, all of them, under [`attribute_header`] names
//!   (`type` → `sqs.type`);
//! * as text: `String` and `Number` values as they are, `Binary` ones in
//!   base64. The data type itself is not kept: a header is published as a
//!   `String` attribute (only an undecodable message keeps its attributes
//!   exactly, below).
//!
//! A body that claims to be a CloudEvent (a JSON object with `specversion`,
//! or broken JSON that names it) but breaks the format is **undecodable**:
//! [`decode`] describes what arrived in an envelope of type
//! [`UNDECODABLE_TYPE`] (the SQS body unchanged as payload, the message
//! attributes exactly, data types included, as JSON in the one header
//! [`ATTRIBUTES_HEADER`]) next to the decoder's error, so the runtime
//! dead-letters it. That envelope's dead-letter copy is an ordinary, valid
//! CloudEvent with the body in `data` and `sqsattributes` an extension, and
//! `type` its only message attribute; replaying it sends the body and the
//! attributes back as they arrived ([`encode_raw`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use bytes::Bytes;
use postbox_core::codec::foreign::{self, Foreign};
use postbox_core::codec::{is_attribute_name, is_reserved, structured, UNDECODABLE_TYPE};
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
/// The prefix that keeps a foreign message's attribute apart from the
/// envelope's own fields when it becomes a header: an attribute named like
/// a CloudEvents attribute (`type`, `id`, …), or like such a name already
/// escaped, gets it (`type` → `sqs.type`, `sqs.type` → `sqs.sqs.type`);
/// every other attribute keeps its name. See [`attribute_header`].
pub const ATTRIBUTE_ESCAPE: &str = "sqs.";
/// The header of an undecodable message's envelope that holds its message
/// attributes exactly, as a JSON object by attribute name: a `String`
/// attribute as its value (`{"tenant":"acme"}`), any other as its data type
/// and value under the SQS API's names
/// (`{"n":{"DataType":"Number","StringValue":"5"}}`,
/// `{"b":{"DataType":"Binary","BinaryValue":"AP8="}}`, base64). A valid
/// CloudEvents attribute name, so the dead-letter copy carries it as an
/// extension; replay restores the attributes from it. Attributes named like
/// postbox's `dlq…`/`retry…` metadata are not in it: they are that envelope's
/// metadata headers.
pub const ATTRIBUTES_HEADER: &str = "sqsattributes";
/// The data type of every attribute postbox makes of a header.
const STRING: &str = "String";

/// The value of a message attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttributeValue {
    /// `String` and `Number` types (and their custom labels).
    Text(String),
    /// `Binary` types.
    Binary(Vec<u8>),
}

/// One message attribute to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attribute {
    /// Its name.
    pub name: String,
    /// Its data type: `String` for every attribute made of a header.
    pub data_type: String,
    /// Its value.
    pub value: AttributeValue,
}

impl Attribute {
    fn string(name: impl Into<String>, value: impl Into<String>) -> Attribute {
        Attribute {
            name: name.into(),
            data_type: STRING.to_string(),
            value: AttributeValue::Text(value.into()),
        }
    }

    /// The bytes SQS/SNS count: name, data type and value.
    fn size(&self) -> usize {
        self.name.len()
            + self.data_type.len()
            + match &self.value {
                AttributeValue::Text(s) => s.len(),
                AttributeValue::Binary(b) => b.len(),
            }
    }

    fn is_empty(&self) -> bool {
        match &self.value {
            AttributeValue::Text(s) => s.is_empty(),
            AttributeValue::Binary(b) => b.is_empty(),
        }
    }
}

/// An envelope ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// The CloudEvents JSON document.
    pub body: String,
    /// Message attributes, `type` (if any) first, then by name.
    pub attributes: Vec<Attribute>,
}

impl Encoded {
    /// The size SQS/SNS count against their limit: body plus attribute
    /// names, data types and values.
    pub(crate) fn size(&self) -> usize {
        self.body.len() + self.attributes.iter().map(Attribute::size).sum::<usize>()
    }
}

/// Whether `env` describes an undecodable message (see [`UNDECODABLE_TYPE`]).
pub(crate) fn is_undecodable(env: &Envelope) -> bool {
    env.event_type == UNDECODABLE_TYPE
}

/// Whether `name` is a valid SQS/SNS message attribute name: letters,
/// digits, `_`, `-` and `.`, at most 256 characters, not starting with
/// `AWS.` or `Amazon.` (in any case), no `..`, not starting or ending with
/// `.`.
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

/// Checks that a transport header — a user header whose name is not a valid
/// CloudEvents attribute name, so it travels as a message attribute under
/// its own name — can be one: an [`ErrorKind::Encode`] error naming it when
/// SQS/SNS refuse the name (see [`is_valid_attribute_name`]), when it is the
/// adapter's own `type`, or when the value is empty.
pub(crate) fn check_transport_header(name: &str, value: &str) -> Result<(), Error> {
    if name == ATTR_TYPE || !is_valid_attribute_name(name) {
        return Err(Error::new(
            ErrorKind::Encode,
            format!(
                "header {name:?} is not a CloudEvents attribute name, so it travels as an \
                 SQS/SNS message attribute, and it cannot be one (letters, digits, `_`, `-` \
                 and `.`, at most 256, no `..`, no leading or trailing `.`, no `AWS.` or \
                 `Amazon.` prefix, not `type`)"
            ),
        ));
    }
    if value.is_empty() {
        return Err(Error::new(
            ErrorKind::Encode,
            format!(
                "header {name:?} travels as an SQS/SNS message attribute, which cannot have \
                 an empty value"
            ),
        ));
    }
    Ok(())
}

/// The message attributes of `env`, checked against the budget: `type`,
/// every transport header, and a copy of every valid-name header for filter
/// policies (dead-letter and retry metadata never: it is in the body).
///
/// The budget is `1 + user headers` (metadata not counted). A dead-letter
/// copy (it carries `dlqreason`) or an undecodable message's envelope is
/// only refused when its transport headers alone exceed it: `type` and the
/// copies, whose values are in the document anyway, come as long as there
/// is room (`type` first, then by name). An undecodable message's envelope
/// gets no copies (its one header, [`ATTRIBUTES_HEADER`], is in the body).
fn attributes_of(env: &Envelope) -> Result<Vec<Attribute>, Error> {
    let undecodable = is_undecodable(env);
    let copy = undecodable || env.headers.contains_key(dlq::REASON);
    let mut user = 0;
    let mut transport = Vec::new();
    let mut copies = Vec::new();
    for (name, value) in &env.headers {
        if dlq::is_metadata(name) {
            continue;
        }
        user += 1;
        if !is_attribute_name(name) {
            check_transport_header(name, value)?;
            transport.push((name, value));
        } else if !undecodable && is_valid_attribute_name(name) && !value.is_empty() {
            copies.push((name, value));
        }
    }
    let with_type = if copy {
        if transport.len() > MAX_ATTRIBUTES {
            return Err(Error::limit(Limit::AttributeCount {
                max: MAX_ATTRIBUTES,
                actual: transport.len(),
            }));
        }
        let room = MAX_ATTRIBUTES - transport.len();
        copies.truncate(room.saturating_sub(1));
        room > 0
    } else {
        if 1 + user > MAX_ATTRIBUTES {
            return Err(Error::limit(Limit::AttributeCount {
                max: MAX_ATTRIBUTES,
                actual: 1 + user,
            }));
        }
        true
    };
    let mut headers: Vec<(&String, &String)> = transport.into_iter().chain(copies).collect();
    headers.sort();
    let mut attributes = Vec::with_capacity(headers.len() + 1);
    if with_type {
        attributes.push(Attribute::string(ATTR_TYPE, env.event_type.as_ref()));
    }
    attributes.extend(headers.into_iter().map(|(k, v)| Attribute::string(k, v)));
    Ok(attributes)
}

/// Encodes `env`, checking its transport headers, the attribute budget and
/// `max_bytes` first.
pub(crate) fn encode(env: &Envelope, max_bytes: usize) -> Result<Encoded, Error> {
    let attributes = attributes_of(env)?;
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
        Error::new(ErrorKind::Encode, "structured body is not UTF-8").with_source(e)
    })?;
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
/// the payload as the body, the attributes of [`ATTRIBUTES_HEADER`] with
/// their data types (dead-letter and retry metadata left out). What replay
/// sends.
///
/// Copies written before the attributes were carried in that one header
/// have one header per attribute (a name that is not an attribute name
/// there, `sqs.type`, with the [`ATTRIBUTE_ESCAPE`] prefix): those go back
/// as `String` attributes under the name without the prefix, as they did.
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
    let mut attributes = match env.headers.get(ATTRIBUTES_HEADER) {
        Some(json) => carried_attributes(json).map_err(|e| {
            Error::new(
                ErrorKind::Encode,
                format!(
                    "header {ATTRIBUTES_HEADER} of undecodable message {} does not hold \
                     message attributes: {e}",
                    env.id
                ),
            )
        })?,
        None => Vec::new(),
    };
    for (header, value) in &env.headers {
        if dlq::is_metadata(header) || header == ATTRIBUTES_HEADER {
            continue;
        }
        let name = header.strip_prefix(ATTRIBUTE_ESCAPE).unwrap_or(header);
        attributes.push(Attribute::string(name, value.clone()));
    }
    attributes.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, a) in attributes.iter().enumerate() {
        let repeated = i > 0 && attributes[i - 1].name == a.name;
        if !is_valid_attribute_name(&a.name) || a.is_empty() || repeated {
            return Err(Error::new(
                ErrorKind::Encode,
                format!(
                    "attribute {:?} of undecodable message {} cannot be sent: {}",
                    a.name,
                    env.id,
                    if repeated {
                        "it is given twice"
                    } else if a.is_empty() {
                        "its value is empty"
                    } else {
                        "it is not a valid message attribute name"
                    }
                ),
            ));
        }
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::limit(Limit::AttributeCount {
            max: MAX_ATTRIBUTES,
            actual: attributes.len(),
        }));
    }
    checked_size(Encoded { body, attributes }, max_bytes)
}

/// One attribute in [`ATTRIBUTES_HEADER`].
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Carried {
    /// A `String` attribute: its value.
    Text(String),
    /// Any other: its data type and value, as the SQS API names them.
    Typed {
        #[serde(rename = "DataType")]
        data_type: String,
        #[serde(
            rename = "StringValue",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        string_value: Option<String>,
        /// Base64.
        #[serde(
            rename = "BinaryValue",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        binary_value: Option<String>,
    },
}

impl Carried {
    fn of(v: &MessageAttributeValue) -> Carried {
        match (&v.string_value, &v.binary_value) {
            (Some(s), _) if v.data_type == STRING => Carried::Text(s.clone()),
            (string_value, binary_value) => Carried::Typed {
                data_type: v.data_type.clone(),
                string_value: string_value.clone(),
                binary_value: binary_value.as_ref().map(|b| BASE64.encode(b.as_ref())),
            },
        }
    }

    fn into_attribute(self, name: String) -> Result<Attribute, String> {
        let (data_type, value) = match self {
            Carried::Text(s) => (STRING.to_string(), AttributeValue::Text(s)),
            Carried::Typed {
                data_type,
                string_value: Some(s),
                binary_value: None,
            } => (data_type, AttributeValue::Text(s)),
            Carried::Typed {
                data_type,
                string_value: None,
                binary_value: Some(b),
            } => {
                let bytes = BASE64
                    .decode(b)
                    .map_err(|e| format!("{name:?}: BinaryValue is not base64 ({e})"))?;
                (data_type, AttributeValue::Binary(bytes))
            }
            Carried::Typed { .. } => {
                return Err(format!("{name:?} needs one of StringValue and BinaryValue"))
            }
        };
        Ok(Attribute {
            name,
            data_type,
            value,
        })
    }
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The attributes [`ATTRIBUTES_HEADER`] holds.
fn carried_attributes(json: &str) -> Result<Vec<Attribute>, String> {
    let map: BTreeMap<String, Carried> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    map.into_iter()
        .map(|(name, carried)| carried.into_attribute(name))
        .collect()
}

/// The header name of a foreign message's attribute `name`: `name`, or
/// [`ATTRIBUTE_ESCAPE`]`name` when `name` is reserved for an envelope field
/// (`type`, `id`, …) or is such a name with the prefix already (so no two
/// attributes share a header).
///
/// ```
/// use postbox_sqs::attribute_header;
/// assert_eq!(attribute_header("tenant"), "tenant");
/// assert_eq!(attribute_header("x-trace"), "x-trace");
/// assert_eq!(attribute_header("type"), "sqs.type");
/// assert_eq!(attribute_header("sqs.type"), "sqs.sqs.type");
/// assert_eq!(attribute_header("sqs.x"), "sqs.x");
/// ```
pub fn attribute_header(name: &str) -> String {
    let mut base = name;
    while let Some(rest) = base.strip_prefix(ATTRIBUTE_ESCAPE) {
        base = rest;
    }
    if is_reserved(base) {
        format!("{ATTRIBUTE_ESCAPE}{name}")
    } else {
        name.to_string()
    }
}

/// The message attributes of a received message, as the SDK gives them.
pub(crate) type Attributes = HashMap<String, MessageAttributeValue>;

/// The text of a message attribute: `String` and `Number` values as they
/// are, `Binary` values in base64.
fn attribute_text(v: &MessageAttributeValue) -> Option<String> {
    match (&v.string_value, &v.binary_value) {
        (Some(s), _) => Some(s.clone()),
        (None, Some(b)) => Some(BASE64.encode(b.as_ref())),
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
    /// The message attributes: headers of the envelope (see [`decode`]).
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
    #[serde(rename = "MessageAttributes", default)]
    message_attributes: BTreeMap<String, SnsAttribute>,
}

/// A message attribute in the SNS notification JSON: its value as text
/// (`Binary` ones in base64).
#[derive(serde::Deserialize)]
struct SnsAttribute {
    #[serde(rename = "Value")]
    value: String,
}

/// The SNS notification wrapper of a body delivered without raw message
/// delivery.
#[derive(Debug)]
pub(crate) struct Notification {
    /// The published message.
    pub message: String,
    /// The SNS message id.
    pub message_id: Option<String>,
    /// The topic.
    pub topic_arn: String,
    /// The message attributes, as `(name, text)`.
    pub attributes: Vec<(String, String)>,
}

/// The SNS notification wrapper of a body delivered without raw message
/// delivery, if it is one.
pub(crate) fn unwrap_sns(body: &str) -> Option<Notification> {
    let trimmed = body.trim_start();
    if !trimmed.starts_with('{') || !trimmed.contains("\"TopicArn\"") {
        return None;
    }
    let n: SnsNotification<'_> = serde_json::from_str(body).ok()?;
    (n.kind == "Notification").then(|| Notification {
        message: n.message,
        message_id: n.message_id,
        topic_arn: n.topic_arn,
        attributes: n
            .message_attributes
            .into_iter()
            .map(|(k, v)| (k, v.value))
            .collect(),
    })
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

/// Decodes a received body (raw or SNS-wrapped, postbox or foreign), the
/// message attributes becoming headers (see the module docs). A body that
/// claims to be a CloudEvent but breaks the format comes back as what
/// arrived (see [`UNDECODABLE_TYPE`]) with the decoder's error.
pub(crate) fn decode(body: &str, received: &Received<'_>) -> (Envelope, Option<Error>) {
    let (event, id, source, wrapped) = match unwrap_sns(body) {
        Some(n) => (
            n.message,
            n.message_id
                .unwrap_or_else(|| received.message_id.to_string()),
            n.topic_arn,
            n.attributes,
        ),
        None => (
            body.to_string(),
            received.message_id.to_string(),
            received.queue.to_string(),
            Vec::new(),
        ),
    };
    // The notification's attributes first, then SQS's own (none, usually,
    // on a wrapped message).
    let texts = wrapped.into_iter().chain(
        received
            .attributes
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), attribute_text(v)?))),
    );
    if claims_cloudevent(event.as_bytes()) {
        return match structured::decode(event.as_bytes()) {
            Ok(mut env) => {
                for (name, text) in texts {
                    if name != ATTR_TYPE && !is_reserved(&name) {
                        env.headers.entry(name).or_insert(text);
                    }
                }
                (env, None)
            }
            Err(error) => (undecodable(body, id, source, received), Some(error)),
        };
    }
    let mut f = Foreign::new(id, source);
    f.event_type = received.foreign_type.clone();
    let mut env = foreign::envelope(f, Bytes::from(event));
    for (name, text) in texts {
        env.headers.entry(attribute_header(&name)).or_insert(text);
    }
    (env, None)
}

/// The envelope of an undecodable message: the SQS body unchanged (the SNS
/// wrapper included) as payload, the message attributes exactly in
/// [`ATTRIBUTES_HEADER`] — but those named like postbox's metadata, which
/// are its metadata headers (as text).
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
    let mut carried = BTreeMap::new();
    for (name, value) in received.attributes.into_iter().flatten() {
        if dlq::is_metadata(name) {
            if let Some(text) = attribute_text(value) {
                env.headers.insert(name.clone(), text);
            }
        } else {
            carried.insert(name.as_str(), Carried::of(value));
        }
    }
    if !carried.is_empty() {
        // A map of strings and plain objects always serializes.
        let json = serde_json::to_string(&carried).unwrap_or_default();
        env.headers.insert(ATTRIBUTES_HEADER.to_string(), json);
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

    const FOREIGN: Text = Cow::Borrowed("postbox.foreign");

    fn received<'a>(queue: &'a str, attributes: Option<&'a Attributes>) -> Received<'a> {
        Received {
            message_id: "m-1",
            queue,
            foreign_type: &FOREIGN,
            attributes,
            group: None,
        }
    }

    /// The attributes as `(name, text)`, all `String`.
    fn strings(enc: &Encoded) -> Vec<(String, String)> {
        enc.attributes
            .iter()
            .map(|a| match &a.value {
                AttributeValue::Text(s) if a.data_type == STRING => (a.name.clone(), s.clone()),
                other => panic!("{}: {} {other:?}", a.name, a.data_type),
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The attributes as SQS delivers them.
    fn arrived(attributes: &[Attribute]) -> Attributes {
        attributes
            .iter()
            .map(|a| {
                let b = MessageAttributeValue::builder().data_type(&a.data_type);
                let b = match &a.value {
                    AttributeValue::Text(s) => b.string_value(s),
                    AttributeValue::Binary(v) => {
                        b.binary_value(aws_sdk_sqs::primitives::Blob::new(v.clone()))
                    }
                };
                (a.name.clone(), b.build().unwrap())
            })
            .collect()
    }

    fn text(v: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    }

    /// Every member of the document is a valid CloudEvents attribute name
    /// (or `data_base64`).
    fn assert_strict(body: &str) {
        let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body).unwrap();
        for name in doc.keys() {
            assert!(
                is_attribute_name(name) || name == "data_base64",
                "member {name:?} of {body}"
            );
        }
    }

    fn dead_letter(env: &mut Envelope) {
        env.headers.insert(dlq::REASON.into(), "decode".into());
        env.headers.insert(dlq::ORIGIN.into(), "orders".into());
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
            strings(&enc),
            pairs(&[("type", "order.placed"), ("tenant", "acme")])
        );
        let attrs = arrived(&enc.attributes);
        assert_eq!(
            decoded(decode(&enc.body, &received("q", Some(&attrs)))),
            env
        );
        assert_eq!(decoded(decode(&enc.body, &received("q", None))), env);
    }

    #[test]
    fn transport_headers_are_attributes_and_come_back_as_headers() {
        let env = Envelope::builder("order.placed")
            .header("tenant", "acme")
            .header("empty", "")
            .header("x-trace", "abc")
            .header("traceId", "t-1")
            .header("Tenant_Id.v2", "7")
            .payload(r#"{"a":1}"#)
            .build();
        let enc = encode(&env, SQS_MAX_BYTES).unwrap();
        // The document holds valid attribute names only.
        assert_strict(&enc.body);
        assert!(!enc.body.contains("x-trace"), "{}", enc.body);
        assert!(enc.body.contains(r#""empty":"""#), "{}", enc.body);
        assert_eq!(
            strings(&enc),
            pairs(&[
                ("type", "order.placed"),
                ("Tenant_Id.v2", "7"),
                ("tenant", "acme"),
                ("traceId", "t-1"),
                ("x-trace", "abc"),
            ])
        );
        // SQS (and SNS with raw delivery): attributes.
        let attrs = arrived(&enc.attributes);
        assert_eq!(
            decoded(decode(&enc.body, &received("q", Some(&attrs)))),
            env
        );
        // Without the attributes only the document's headers are left.
        let bare = decoded(decode(&enc.body, &received("q", None)));
        assert_eq!(bare.headers.keys().collect::<Vec<_>>(), ["empty", "tenant"]);
        // SNS without raw delivery: the notification's `MessageAttributes`.
        let mut message_attributes = serde_json::Map::new();
        for (k, v) in strings(&enc) {
            message_attributes.insert(k, serde_json::json!({"Type": "String", "Value": v}));
        }
        let wrapped = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-1",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": enc.body,
            "MessageAttributes": message_attributes,
        })
        .to_string();
        assert_eq!(decoded(decode(&wrapped, &received("q", None))), env);
    }

    #[test]
    fn received_attributes_of_an_event_fill_in_what_the_document_lacks() {
        let body = r#"{"specversion":"1.0","id":"1","type":"t","source":"s","tenant":"acme"}"#;
        let blob = MessageAttributeValue::builder()
            .data_type("Binary.gz")
            .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![0u8, 255]))
            .build()
            .unwrap();
        let number = MessageAttributeValue::builder()
            .data_type("Number")
            .string_value("5.50")
            .build()
            .unwrap();
        let attrs = Attributes::from([
            ("tenant".to_string(), text("other")),
            ("type".to_string(), text("other.type")),
            ("source".to_string(), text("elsewhere")),
            ("blob".to_string(), blob),
            ("priority".to_string(), number),
            ("X-Trace".to_string(), text("abc")),
        ]);
        let env = decoded(decode(body, &received("q", Some(&attrs))));
        assert_eq!(env.event_type, "t");
        assert_eq!(env.source, "s");
        assert_eq!(
            env.headers,
            BTreeMap::from([
                ("X-Trace".to_string(), "abc".to_string()),
                ("blob".to_string(), "AP8=".to_string()),
                ("priority".to_string(), "5.50".to_string()),
                // The document wins.
                ("tenant".to_string(), "acme".to_string()),
            ])
        );
    }

    #[test]
    fn transport_names_sqs_refuses_are_encode_errors_naming_them() {
        let long = "X".repeat(257);
        for name in [
            "amqp:content-type",
            "with space",
            "AWS.trace",
            "aws.Trace",
            "Amazon.x",
            "amazon.x",
            "a..b",
            ".x",
            "x.",
            "é-x",
            long.as_str(),
        ] {
            let env = Envelope::builder("t").header(name, "v").build();
            let e = encode(&env, SQS_MAX_BYTES).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Encode, "{name}");
            assert!(e.message().contains(&format!("{name:?}")), "{e}");
            // A dead-letter copy too.
            let mut copy = env.clone();
            dead_letter(&mut copy);
            assert_eq!(
                encode(&copy, SQS_MAX_BYTES).unwrap_err().kind(),
                &ErrorKind::Encode
            );
        }
        // SQS/SNS take no empty attribute value.
        let env = Envelope::builder("t").header("x-trace", "").build();
        let e = encode(&env, SQS_MAX_BYTES).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Encode);
        assert!(e.message().contains("\"x-trace\""), "{e}");
        assert!(e.message().contains("empty"), "{e}");
        // The adapter's own `type` cannot be a transport header: it is a
        // valid attribute name, reserved for the envelope field.
        let mut env = Envelope::new("t", "{}");
        env.headers.insert("type".into(), "x".into());
        assert_eq!(
            encode(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::Encode
        );
        assert!(check_transport_header("type", "x").is_err());
        for name in ["x-trace", "traceId", "Tenant_Id.v2", "sqs.type", "a.b-c_d"] {
            assert!(check_transport_header(name, "v").is_ok(), "{name}");
        }
    }

    #[test]
    fn eleven_attributes_are_refused() {
        let mut env = Envelope::new("t", "{}");
        for i in 0..8 {
            env.headers.insert(format!("h{i}"), "v".into());
        }
        env.headers.insert("x-a".into(), "v".into());
        env.headers.insert("x-b".into(), "v".into());
        let e = encode(&env, SQS_MAX_BYTES).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::LimitExceeded(Limit::AttributeCount {
                max: 10,
                actual: 11
            })
        );
        env.headers.remove("h0");
        let enc = encode(&env, SQS_MAX_BYTES).unwrap();
        assert_eq!(enc.attributes.len(), 10);
        env.headers.insert(dlq::ERROR.into(), "boom".into());
        assert!(
            encode(&env, SQS_MAX_BYTES).is_ok(),
            "dlq metadata is in the body"
        );
    }

    #[test]
    fn a_dead_letter_copy_keeps_its_transport_headers_within_the_budget() {
        // What a message with 10 attributes (foreign, or an event with
        // many extensions) becomes: 10 or more headers.
        let mut env = Envelope::new("postbox.foreign", "hello");
        for i in 0..4 {
            env.headers.insert(format!("x-t{i}"), format!("t{i}"));
            env.headers.insert(format!("h{i}"), format!("v{i}"));
        }
        env.headers.insert("sqs.type".into(), "legacy".into());
        env.headers.insert("Tenant-Id".into(), "7".into());
        for i in 4..8 {
            // Extensions of the document only (an event with many).
            env.headers.insert(format!("h{i}"), format!("v{i}"));
        }
        assert_eq!(
            encode(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::LimitExceeded(Limit::AttributeCount {
                max: 10,
                actual: 15
            }),
            "an ordinary publish is refused"
        );
        let mut copy = env.clone();
        dead_letter(&mut copy);
        let enc = encode(&copy, SQS_MAX_BYTES).unwrap();
        assert_strict(&enc.body);
        let names: Vec<&str> = enc.attributes.iter().map(|a| a.name.as_str()).collect();
        // The 6 transport headers, `type`, then copies as room allows.
        assert_eq!(
            names,
            [
                "type",
                "Tenant-Id",
                "h0",
                "h1",
                "h2",
                "sqs.type",
                "x-t0",
                "x-t1",
                "x-t2",
                "x-t3"
            ]
        );
        let attrs = arrived(&enc.attributes);
        let back = decoded(decode(&enc.body, &received("q-dlq", Some(&attrs))));
        assert_eq!(back, copy, "every header comes back");
        // Ten transport headers: no room for `type`.
        let mut copy = Envelope::new("postbox.foreign", "hello");
        for i in 0..10 {
            copy.headers.insert(format!("x-{i}"), "v".into());
        }
        copy.headers.insert("tenant".into(), "acme".into());
        dead_letter(&mut copy);
        let enc = encode(&copy, SQS_MAX_BYTES).unwrap();
        assert_eq!(enc.attributes.len(), 10);
        assert!(enc.attributes.iter().all(|a| a.name.starts_with("x-")));
        let attrs = arrived(&enc.attributes);
        assert_eq!(
            decoded(decode(&enc.body, &received("q-dlq", Some(&attrs)))),
            copy
        );
        // Eleven cannot be carried.
        copy.headers.insert("x-10".into(), "v".into());
        assert_eq!(
            encode(&copy, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::LimitExceeded(Limit::AttributeCount {
                max: 10,
                actual: 11
            })
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
        // And transport attributes.
        let env = Envelope::builder("t")
            .header("x-big", "v".repeat(SNS_MAX_BYTES))
            .build();
        assert!(matches!(
            encode(&env, SNS_MAX_BYTES).unwrap_err().kind(),
            ErrorKind::LimitExceeded(Limit::BodySize { .. })
        ));
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
            "MessageAttributes": {"type": {"Type": "String", "Value": "order.placed"}},
        })
        .to_string();
        let r = received("q", None);
        assert_eq!(decoded(decode(&wrapped, &r)), env);
        // A foreign message through SNS keeps the SNS id, the topic as
        // source and its attributes.
        let foreign = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-2",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": "hello",
            "MessageAttributes": {
                "type": {"Type": "String", "Value": "legacy"},
                "x-trace": {"Type": "String", "Value": "abc"},
                "n": {"Type": "Number", "Value": "5"},
                "b": {"Type": "Binary", "Value": "AP8="},
            },
        })
        .to_string();
        let got = decoded(decode(&foreign, &r));
        assert_eq!(got.id.as_str(), "sns-2");
        assert_eq!(&got.payload[..], b"hello");
        assert!(got.source.ends_with(":orders"));
        assert_eq!(
            got.headers,
            BTreeMap::from([
                ("b".to_string(), "AP8=".to_string()),
                ("n".to_string(), "5".to_string()),
                ("sqs.type".to_string(), "legacy".to_string()),
                ("x-trace".to_string(), "abc".to_string()),
            ])
        );
    }

    #[test]
    fn foreign_messages_get_a_synthesized_envelope() {
        let r = received("orders", None);
        let got = decoded(decode(r#"{"order":7}"#, &r));
        assert_eq!(got.id.as_str(), "m-1");
        assert_eq!(got.event_type, "postbox.foreign");
        assert_eq!(got.source, "orders");
        assert!(got.headers.is_empty());
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

    /// Ten attributes, named every way SQS allows.
    fn ten_attributes() -> Attributes {
        let blob = MessageAttributeValue::builder()
            .data_type("Binary")
            .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![0u8, 255]))
            .build()
            .unwrap();
        let number = MessageAttributeValue::builder()
            .data_type("Number.int")
            .string_value("42")
            .build()
            .unwrap();
        Attributes::from([
            ("tenant".to_string(), text("acme")),
            ("type".to_string(), text("order.placed")),
            ("id".to_string(), text("legacy-7")),
            ("sqs.type".to_string(), text("1")),
            ("sqs.x".to_string(), text("2")),
            ("Tenant-Id".to_string(), text("7")),
            ("x-trace".to_string(), text("abc")),
            ("blob".to_string(), blob),
            ("count".to_string(), number),
            ("dlqreason".to_string(), text("handler-error")),
        ])
    }

    #[test]
    fn a_foreign_message_keeps_its_attributes_and_its_dead_letter_copy_fits() {
        let attrs = ten_attributes();
        let got = decoded(decode("hello", &received("orders", Some(&attrs))));
        assert_eq!(
            got.headers,
            BTreeMap::from([
                ("Tenant-Id".to_string(), "7".to_string()),
                ("blob".to_string(), "AP8=".to_string()),
                ("count".to_string(), "42".to_string()),
                ("dlqreason".to_string(), "handler-error".to_string()),
                ("sqs.id".to_string(), "legacy-7".to_string()),
                ("sqs.sqs.type".to_string(), "1".to_string()),
                ("sqs.type".to_string(), "order.placed".to_string()),
                ("sqs.x".to_string(), "2".to_string()),
                ("tenant".to_string(), "acme".to_string()),
                ("x-trace".to_string(), "abc".to_string()),
            ])
        );
        // Its dead-letter copy: a valid CloudEvent within the budget, with
        // every header back on receipt (`dlqreason` is replaced).
        let mut copy = got.clone();
        dead_letter(&mut copy);
        let enc = encode(&copy, SQS_MAX_BYTES).unwrap();
        assert_strict(&enc.body);
        assert!(enc.attributes.len() <= MAX_ATTRIBUTES);
        let attrs = arrived(&enc.attributes);
        let back = decoded(decode(&enc.body, &received("orders-dlq", Some(&attrs))));
        assert_eq!(back, copy);
        // ... also when SNS wraps it.
        let mut message_attributes = serde_json::Map::new();
        for (k, v) in strings(&enc) {
            message_attributes.insert(k, serde_json::json!({"Type": "String", "Value": v}));
        }
        let wrapped = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-1",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:dead",
            "Message": enc.body,
            "MessageAttributes": message_attributes,
        })
        .to_string();
        assert_eq!(decoded(decode(&wrapped, &received("q", None))), copy);
    }

    #[test]
    fn a_broken_cloudevent_is_undecodable_with_what_arrived() {
        let attributes = ten_attributes();
        let r = Received {
            group: Some("g1"),
            ..received("orders", Some(&attributes))
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
            // The attributes exactly, in one header; metadata as metadata.
            assert_eq!(
                env.headers.keys().collect::<Vec<_>>(),
                [dlq::REASON, ATTRIBUTES_HEADER]
            );
            assert_eq!(env.headers[dlq::REASON], "handler-error");
            let carried: serde_json::Value =
                serde_json::from_str(&env.headers[ATTRIBUTES_HEADER]).unwrap();
            assert_eq!(
                carried,
                serde_json::json!({
                    "Tenant-Id": "7",
                    "blob": {"DataType": "Binary", "BinaryValue": "AP8="},
                    "count": {"DataType": "Number.int", "StringValue": "42"},
                    "id": "legacy-7",
                    "sqs.type": "1",
                    "sqs.x": "2",
                    "tenant": "acme",
                    "type": "order.placed",
                    "x-trace": "abc",
                })
            );
            let json = serde_json::from_str::<serde_json::Value>(body).is_ok();
            let expected = if json {
                "application/json"
            } else {
                UNDECODABLE_TEXT
            };
            assert_eq!(env.content_type, expected, "{body}");
            // Its dead-letter copy is a valid CloudEvent with `type` as its
            // only attribute, whatever arrived ...
            let mut copy = env.clone();
            postbox_core::dlq::DeadLetterMetadata {
                reason: postbox_core::FailureReason::Decode,
                error: u.error.to_string(),
                error_type: "decode".into(),
                attempts: 1,
                first_failed_at: std::time::SystemTime::now(),
                last_failed_at: std::time::SystemTime::now(),
                origin: postbox_core::Origin {
                    destination: "orders".into(),
                    partition: None,
                    offset: None,
                },
                consumer: "c".into(),
            }
            .apply(&mut copy);
            let enc = encode(&copy, SQS_MAX_BYTES).unwrap();
            assert_strict(&enc.body);
            assert_eq!(strings(&enc), pairs(&[("type", UNDECODABLE_TYPE)]));
            if json && body.trim() == body {
                assert!(
                    enc.body.contains(&format!(r#""data":{body}"#)),
                    "{}",
                    enc.body
                );
            }
            // ... and reads back as the same envelope (what peek shows).
            let attrs = arrived(&enc.attributes);
            let back = decoded(decode(&enc.body, &received("orders-dlq", Some(&attrs))));
            assert_eq!(back, copy);
            // Replay sends the body as it arrived, the attributes exactly
            // (data types included), without the metadata.
            let (_, replay) = postbox_core::dlq::prepare_replay(back).unwrap();
            let raw = encode_raw(&replay, SQS_MAX_BYTES).unwrap();
            assert_eq!(raw.body, body);
            let mut expected: Vec<Attribute> = arrived_to_vec(&attributes);
            expected.retain(|a| a.name != dlq::REASON);
            assert_eq!(raw.attributes, expected);
        }
    }

    /// The attributes of `attrs`, by name, as `encode_raw` sends them.
    fn arrived_to_vec(attrs: &Attributes) -> Vec<Attribute> {
        let mut out: Vec<Attribute> = attrs
            .iter()
            .map(|(name, v)| Attribute {
                name: name.clone(),
                data_type: v.data_type.clone(),
                value: match (&v.string_value, &v.binary_value) {
                    (Some(s), _) => AttributeValue::Text(s.clone()),
                    (None, Some(b)) => AttributeValue::Binary(b.as_ref().to_vec()),
                    (None, None) => unreachable!(),
                },
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    #[test]
    fn an_undecodable_message_without_attributes_has_no_headers() {
        let r = received("orders", None);
        let u = broken(decode(r#"{"specversion":"1.0"}"#, &r));
        assert!(u.envelope.headers.is_empty());
        let raw = encode_raw(&u.envelope, SQS_MAX_BYTES).unwrap();
        assert!(raw.attributes.is_empty());
    }

    #[test]
    fn an_sns_wrapped_broken_cloudevent_keeps_the_wrapper() {
        let r = received("orders-billing", None);
        let wrapped = serde_json::json!({
            "Type": "Notification",
            "MessageId": "sns-3",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": r#"{"specversion":"1.0","id":"1","type":"t","source":"s","time":"noon"}"#,
            "MessageAttributes": {"x-trace": {"Type": "String", "Value": "abc"}},
        })
        .to_string();
        let u = broken(decode(&wrapped, &r));
        assert!(u.error.message().contains("RFC 3339"), "{}", u.error);
        assert_eq!(&u.envelope.payload[..], wrapped.as_bytes());
        assert_eq!(u.envelope.id.as_str(), "sns-3");
        assert!(u.envelope.source.ends_with(":orders"));
        // The notification's attributes are in the payload, not headers.
        assert!(u.envelope.headers.is_empty());
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
        for bad in [
            "not json",
            r#"{"a":1}"#,
            r#"{"a":{"DataType":"Binary","BinaryValue":"%%"}}"#,
            r#"{"a":{"DataType":"Number"}}"#,
            r#"{"a":""}"#,
            r#"{"a b":"v"}"#,
        ] {
            env.headers
                .insert(ATTRIBUTES_HEADER.into(), bad.to_string());
            let e = encode_raw(&env, SQS_MAX_BYTES).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Encode, "{bad}");
        }
        env.headers.clear();
        env.headers.insert("bad name".into(), "v".into());
        assert_eq!(
            encode_raw(&env, SQS_MAX_BYTES).unwrap_err().kind(),
            &ErrorKind::Encode
        );
        // The same attribute twice (in the JSON and as a header).
        env.headers.clear();
        env.headers
            .insert(ATTRIBUTES_HEADER.into(), r#"{"tenant":"a"}"#.into());
        env.headers.insert("tenant".into(), "b".into());
        let e = encode_raw(&env, SQS_MAX_BYTES).unwrap_err();
        assert!(e.message().contains("twice"), "{e}");
        env.headers.clear();
        let eleven: BTreeMap<String, String> = (0..11)
            .map(|i| (format!("a{i}"), "v".to_string()))
            .collect();
        env.headers.insert(
            ATTRIBUTES_HEADER.into(),
            serde_json::to_string(&eleven).unwrap(),
        );
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
    fn copies_written_with_one_header_per_attribute_still_replay() {
        // Before `sqsattributes`: the attributes as headers, escaped.
        let env = Envelope::builder(UNDECODABLE_TYPE)
            .header("tenant", "acme")
            .header("sqs.type", "order.placed")
            .header("sqs.sqs.x", "1")
            .header(dlq::ORIGIN, "orders")
            .payload("{")
            .build();
        let raw = encode_raw(&env, SQS_MAX_BYTES).unwrap();
        assert_eq!(
            strings(&raw),
            pairs(&[("sqs.x", "1"), ("tenant", "acme"), ("type", "order.placed")])
        );
    }

    #[test]
    fn attribute_names() {
        assert!(is_valid_attribute_name("tenant-id_2.x"));
        assert!(!is_valid_attribute_name("AWS.trace"));
        assert!(!is_valid_attribute_name("a..b"));
        assert!(!is_valid_attribute_name("with space"));
        assert!(is_valid_attribute_name(&"a".repeat(256)));
        assert!(!is_valid_attribute_name(&"a".repeat(257)));
    }

    #[test]
    fn attribute_headers_never_collide() {
        let names = [
            "type",
            "sqs.type",
            "sqs.sqs.type",
            "id",
            "sqs.id",
            "sqs.x",
            "x",
            "sqs.sqs.x",
            "data_base64",
        ];
        let headers: std::collections::BTreeSet<String> =
            names.iter().map(|n| attribute_header(n)).collect();
        assert_eq!(headers.len(), names.len(), "{headers:?}");
        for h in &headers {
            assert!(!is_reserved(h), "{h}");
        }
    }
}
