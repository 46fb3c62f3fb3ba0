//! The message envelope: CloudEvents-compatible metadata plus a payload of bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::{ContextV7, Timestamp, Uuid};

use crate::error::{Error, ErrorKind};

/// A cheap-to-clone string: `&'static str` costs nothing, owned strings are kept.
pub type Text = Cow<'static, str>;

/// Free user headers (string → string), ordered by name.
pub type Headers = BTreeMap<String, String>;

/// The default content type of a payload.
pub const JSON: &str = "application/json";

/// The unique id of a message, and its default idempotency key.
///
/// New ids are UUID v7 (time-ordered). Ids that came from elsewhere (a foreign
/// producer, a broker's own message id) are kept verbatim.
///
/// ```
/// use postbox_core::MessageId;
/// let id = MessageId::new();
/// assert_eq!(id.as_uuid().unwrap().get_version_num(), 7);
/// assert_eq!(MessageId::from("orders-0-42").as_str(), "orders-0-42");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Repr);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    Uuid(Uuid, [u8; 36]),
    Text(Arc<str>),
}

/// The UUID v7 counter of the ids made in this process (what `Uuid::now_v7`
/// keeps in its own shared context): ids made here are strictly ordered.
static ID_CONTEXT: Mutex<ContextV7> = Mutex::new(ContextV7::new());

impl MessageId {
    /// A fresh UUID v7 id.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// A fresh UUID v7 id for something that happens at `time`, so an envelope
    /// reads the clock once for its id and its `time` (a time before 1970
    /// counts as 1970).
    fn at(time: SystemTime) -> Self {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ts = Timestamp::from_unix(&ID_CONTEXT, since.as_secs(), since.subsec_nanos());
        Self::from_uuid(Uuid::new_v7(ts))
    }

    /// The nil UUID, without rendering it: a placeholder for an id that is
    /// filled in later.
    pub(crate) const NIL: MessageId = MessageId(Repr::Uuid(
        Uuid::nil(),
        *b"00000000-0000-0000-0000-000000000000",
    ));

    /// An id from a UUID (rendered lower-case hyphenated).
    pub fn from_uuid(uuid: Uuid) -> Self {
        let mut buf = [0u8; 36];
        uuid.hyphenated().encode_lower(&mut buf);
        MessageId(Repr::Uuid(uuid, buf))
    }

    /// The id as a UUID, if it is one in canonical form.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match &self.0 {
            Repr::Uuid(u, _) => Some(*u),
            Repr::Text(_) => None,
        }
    }

    /// The id as text (what goes on the wire).
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // The buffer holds ASCII hex digits and hyphens written by `encode_lower`.
            Repr::Uuid(_, buf) => std::str::from_utf8(buf).unwrap_or_default(),
            Repr::Text(s) => s,
        }
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<&str> for MessageId {
    fn from(s: &str) -> Self {
        // 36 characters that parse are the hyphenated form; in lower case they
        // are already the canonical rendering, so they are kept as they came
        // (no second rendering of the parsed value).
        if let Ok(text) = <[u8; 36]>::try_from(s.as_bytes()) {
            if let Some(uuid) = parse_lower_hyphenated(&text) {
                return MessageId(Repr::Uuid(uuid, text));
            }
        }
        MessageId(Repr::Text(Arc::from(s)))
    }
}

/// A UUID in its canonical text form (hyphenated, lower-case hex digits);
/// `None` for anything else.
fn parse_lower_hyphenated(text: &[u8; 36]) -> Option<Uuid> {
    /// Where each of the 16 bytes' two hex digits start.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    /// The value of a lower-case hex digit; 0xFF for any other byte.
    const NIBBLE: [u8; 256] = {
        let mut t = [0xFF; 256];
        let mut c = 0;
        while c < 10 {
            t[b'0' as usize + c] = c as u8;
            c += 1;
        }
        let mut c = 0;
        while c < 6 {
            t[b'a' as usize + c] = 10 + c as u8;
            c += 1;
        }
        t
    };
    if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    let mut bytes = [0u8; 16];
    // Any byte that is not a digit sets the high bits here.
    let mut bad = 0u8;
    for (byte, &at) in bytes.iter_mut().zip(&AT) {
        let (hi, lo) = (
            NIBBLE[usize::from(text[at])],
            NIBBLE[usize::from(text[at + 1])],
        );
        bad |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0F);
    }
    (bad & 0xF0 == 0).then(|| Uuid::from_bytes(bytes))
}

impl From<String> for MessageId {
    fn from(s: String) -> Self {
        MessageId::from(s.as_str())
    }
}

impl From<Uuid> for MessageId {
    fn from(u: Uuid) -> Self {
        MessageId::from_uuid(u)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.as_str())
    }
}

/// A message: metadata plus a payload of bytes.
///
/// Every field maps to a CloudEvents 1.0 attribute (see `docs/design.md` §2); the
/// codecs in [`crate::codec`] put it on the wire. Build one with
/// [`Envelope::builder`] or [`Envelope::json`].
///
/// ```
/// use postbox_core::Envelope;
/// let env = Envelope::builder("order.placed")
///     .source("shop")
///     .key("customer-7")
///     .header("tenant", "acme")
///     .payload(r#"{"order":1}"#)
///     .build();
/// assert_eq!(env.event_type, "order.placed");
/// assert_eq!(env.attempt, 1);
/// assert_eq!(env.headers["tenant"], "acme");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// Unique message id (CloudEvents `id`); UUID v7 by default.
    pub id: MessageId,
    /// Event or command type, e.g. `order.placed` (CloudEvents `type`).
    pub event_type: Text,
    /// The producing service (CloudEvents `source`).
    pub source: Text,
    /// When the event occurred (CloudEvents `time`).
    pub time: Option<SystemTime>,
    /// Version of the payload schema, for upcasting (extension `dataversion`).
    pub schema_version: Option<Text>,
    /// Content type of the payload (CloudEvents `datacontenttype`).
    pub content_type: Text,
    /// Optional subject (CloudEvents `subject`).
    pub subject: Option<String>,
    /// Correlation id of the conversation (extension `correlationid`).
    pub correlation_id: Option<String>,
    /// Id of the message that caused this one (extension `causationid`).
    pub causation_id: Option<String>,
    /// Partition key: Kafka record key, SQS FIFO group, RabbitMQ routing hint
    /// (extension `partitionkey`).
    pub key: Option<String>,
    /// W3C `traceparent` (extension `traceparent`).
    pub traceparent: Option<String>,
    /// W3C `tracestate` (extension `tracestate`).
    pub tracestate: Option<String>,
    /// Delivery attempt number, 1 for the first delivery (extension `attempt`).
    pub attempt: u32,
    /// Free user headers (other extensions).
    pub headers: Headers,
    /// The payload (CloudEvents `data`).
    pub payload: Bytes,
}

/// The default `source` of envelopes built without one.
pub const DEFAULT_SOURCE: &str = "postbox";

impl Envelope {
    /// Starts building an envelope of the given type.
    pub fn builder(event_type: impl Into<Text>) -> EnvelopeBuilder {
        EnvelopeBuilder {
            env: Envelope::new(event_type, Bytes::new()),
        }
    }

    /// A new envelope with a fresh id, the current time and a payload of bytes.
    pub fn new(event_type: impl Into<Text>, payload: impl Into<Bytes>) -> Self {
        let now = SystemTime::now();
        Envelope {
            id: MessageId::at(now),
            event_type: event_type.into(),
            source: Cow::Borrowed(DEFAULT_SOURCE),
            time: Some(now),
            schema_version: None,
            content_type: Cow::Borrowed(JSON),
            subject: None,
            correlation_id: None,
            causation_id: None,
            key: None,
            traceparent: None,
            tracestate: None,
            attempt: 1,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// A new envelope whose payload is `data` serialized as JSON.
    ///
    /// ```
    /// # use postbox_core::Envelope;
    /// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    /// struct Order { id: u32 }
    /// let env = Envelope::json("order.placed", &Order { id: 7 }).unwrap();
    /// assert_eq!(env.decode_json::<Order>().unwrap(), Order { id: 7 });
    /// ```
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<Text>,
        data: &T,
    ) -> Result<Self, Error> {
        let payload = serde_json::to_vec(data).map_err(|e| {
            Error::new(ErrorKind::Encode, "payload could not be serialized as JSON").with_source(e)
        })?;
        Ok(Envelope::new(event_type, payload))
    }

    /// Deserializes the JSON payload; a failure is an [`ErrorKind::Decode`] error.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::new(
                ErrorKind::Decode,
                format!(
                    "payload of message {} (type {}) is not a valid {}: {e}",
                    self.id,
                    self.event_type,
                    std::any::type_name::<T>()
                ),
            )
            .with_source(e)
        })
    }

    /// Decodes the payload into a [`TypedEnvelope`].
    pub fn into_typed<T: DeserializeOwned>(self) -> Result<TypedEnvelope<T>, Error> {
        let data = self.decode_json()?;
        Ok(TypedEnvelope {
            envelope: self,
            data,
        })
    }

    /// A new envelope caused by this one: same correlation id (or this id when
    /// there is none), causation id = this id, same trace context.
    pub fn reply(&self, event_type: impl Into<Text>, payload: impl Into<Bytes>) -> Envelope {
        let mut next = Envelope::new(event_type, payload);
        next.source = self.source.clone();
        next.correlation_id = Some(
            self.correlation_id
                .clone()
                .unwrap_or_else(|| self.id.to_string()),
        );
        next.causation_id = Some(self.id.to_string());
        next.traceparent = self.traceparent.clone();
        next.tracestate = self.tracestate.clone();
        next
    }

    /// Removes every header whose name starts with `prefix`.
    pub fn remove_headers_with_prefix(&mut self, prefix: &str) {
        self.headers.retain(|k, _| !k.starts_with(prefix));
    }
}

/// Builder for [`Envelope`]; every setter is optional.
#[derive(Debug, Clone)]
pub struct EnvelopeBuilder {
    env: Envelope,
}

impl EnvelopeBuilder {
    /// Sets the id (default: a fresh UUID v7).
    pub fn id(mut self, id: impl Into<MessageId>) -> Self {
        self.env.id = id.into();
        self
    }
    /// Sets the producing service.
    pub fn source(mut self, source: impl Into<Text>) -> Self {
        self.env.source = source.into();
        self
    }
    /// Sets the event time (default: now).
    pub fn time(mut self, time: SystemTime) -> Self {
        self.env.time = Some(time);
        self
    }
    /// Sets the payload schema version.
    pub fn schema_version(mut self, version: impl Into<Text>) -> Self {
        self.env.schema_version = Some(version.into());
        self
    }
    /// Sets the content type (default `application/json`).
    pub fn content_type(mut self, content_type: impl Into<Text>) -> Self {
        self.env.content_type = content_type.into();
        self
    }
    /// Sets the subject.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.env.subject = Some(subject.into());
        self
    }
    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.env.correlation_id = Some(id.into());
        self
    }
    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.env.causation_id = Some(id.into());
        self
    }
    /// Sets the partition key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.env.key = Some(key.into());
        self
    }
    /// Sets the W3C trace context.
    pub fn trace_context(
        mut self,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Self {
        self.env.traceparent = Some(traceparent.into());
        self.env.tracestate = tracestate;
        self
    }
    /// Adds a user header (replacing one of the same name).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.headers.insert(name.into(), value.into());
        self
    }
    /// Sets the payload bytes.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.env.payload = payload.into();
        self
    }
    /// Sets the payload to `data` serialized as JSON (content type `application/json`).
    pub fn json<T: Serialize + ?Sized>(mut self, data: &T) -> Result<Self, Error> {
        self.env.payload = serde_json::to_vec(data)
            .map_err(|e| {
                Error::new(ErrorKind::Encode, "payload could not be serialized as JSON")
                    .with_source(e)
            })?
            .into();
        self.env.content_type = Cow::Borrowed(JSON);
        Ok(self)
    }
    /// Finishes the envelope.
    pub fn build(self) -> Envelope {
        self.env
    }
}

/// An envelope whose payload has been decoded into `T`.
///
/// ```
/// # use postbox_core::Envelope;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Order { id: u32 }
/// let typed = Envelope::json("order.placed", &Order { id: 3 }).unwrap()
///     .into_typed::<Order>().unwrap();
/// assert_eq!(typed.data.id, 3);
/// assert_eq!(typed.event_type, "order.placed"); // metadata through Deref
/// ```
#[derive(Debug, Clone)]
pub struct TypedEnvelope<T> {
    /// The envelope, payload bytes included.
    pub envelope: Envelope,
    /// The decoded payload.
    pub data: T,
}

impl<T> std::ops::Deref for TypedEnvelope<T> {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.envelope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_eq!(a.as_uuid().unwrap().get_version_num(), 7);
        assert!(a.as_str() < b.as_str() || a.as_str()[..13] == b.as_str()[..13]);
    }

    #[test]
    fn foreign_ids_are_kept_verbatim() {
        for s in ["orders/0/17", "ABCDEF00-0000-0000-0000-000000000000", ""] {
            assert_eq!(MessageId::from(s).as_str(), s);
        }
        let u = Uuid::now_v7().to_string();
        assert_eq!(
            MessageId::from(u.as_str()).as_uuid().unwrap().to_string(),
            u
        );
    }

    #[test]
    fn canonical_uuid_text_is_kept_as_a_uuid_id() {
        let u = Uuid::now_v7();
        let text = u.hyphenated().to_string();
        let id = MessageId::from(text.as_str());
        assert_eq!(id.as_uuid(), Some(u));
        assert_eq!(id.as_str(), text);
        assert_eq!(id, MessageId::from_uuid(u));
        // Upper case is not the canonical rendering: kept as text, verbatim.
        let upper = text.to_ascii_uppercase();
        assert_eq!(MessageId::from(upper.as_str()).as_uuid(), None);
        // Hyphens out of place do not parse as a UUID.
        let shifted = format!("{}-{}", &text[..7], &text[7..35].replace('-', "0"));
        assert_eq!(shifted.len(), 36);
        assert_eq!(MessageId::from(shifted.as_str()).as_str(), shifted);
        assert_eq!(MessageId::NIL, MessageId::from_uuid(Uuid::nil()));
    }

    proptest::proptest! {
        /// The canonical-form parser reads exactly what the `uuid` crate
        /// reads, among 36-character texts in lower case.
        #[test]
        fn canonical_ids_parse_as_the_uuid_crate_does(
            text in "[0-9a-fA-F-]{8}-[0-9a-gA-G-]{4}-[0-9a-f]{4}[-x][0-9a-f]{4}-[0-9a-f]{12}",
            bytes in proptest::array::uniform16(proptest::num::u8::ANY),
        ) {
            let expected = Uuid::try_parse(&text)
                .ok()
                .filter(|_| !text.bytes().any(|b| b.is_ascii_uppercase()));
            let id = MessageId::from(text.as_str());
            proptest::prop_assert_eq!(id.as_uuid(), expected);
            proptest::prop_assert_eq!(id.as_str(), text.as_str());
            let u = Uuid::from_bytes(bytes);
            let canonical = u.hyphenated().to_string();
            proptest::prop_assert_eq!(MessageId::from(canonical.as_str()).as_uuid(), Some(u));
        }
    }

    #[test]
    fn reply_carries_the_conversation() {
        let first = Envelope::builder("order.placed")
            .trace_context(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                None,
            )
            .build();
        let next = first.reply("order.paid", "{}");
        assert_eq!(next.correlation_id.as_deref(), Some(first.id.as_str()));
        assert_eq!(next.causation_id.as_deref(), Some(first.id.as_str()));
        assert_eq!(next.traceparent, first.traceparent);
        let third = next.reply("order.shipped", "{}");
        assert_eq!(third.correlation_id, next.correlation_id);
    }

    #[test]
    fn decode_failure_is_typed() {
        let env = Envelope::new("x", "not json");
        let err = env.decode_json::<u32>().unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Decode);
    }
}
