//! The envelope on the wire, as the CloudEvents AMQP binding has it.
//!
//! **Publishing** ([`encode`]), in the configured [`ContentMode`]:
//! * binary (default): CloudEvents attributes and user headers go into the
//!   headers table as long strings, prefixed `cloudEvents:` (configurable:
//!   `cloudEvents_`, `ce-`); the payload is the body, byte for byte;
//!   `content_type` = `datacontenttype` (left out when it starts with
//!   `application/cloudevents`, which would make receivers read the body as
//!   a structured event; the header still carries it);
//! * structured: the body is the CloudEvents JSON document (core's
//!   structured codec), `content_type` = [`STRUCTURED_CONTENT_TYPE`], no
//!   attribute headers.
//!
//! **Transport headers** (core's header rule,
//! [`is_attribute_name`](postbox_core::codec::is_attribute_name)): an
//! envelope header whose name is not a valid CloudEvents attribute name
//! (`x-trace`, `traceId`) is not an attribute: in both modes it is a plain
//! AMQP header under its own name (a long string), beside the attribute
//! headers or the structured body, and comes back as an envelope header. A
//! few names are refused with an `Encode` error naming the header, before
//! sending ([`check_transport_name`]): names starting with a decode prefix
//! (`cloudEvents:`, `cloudEvents_`, `ce-`) or `postbox-` (postbox's own
//! transport headers), the headers RabbitMQ sets when it dead-letters or
//! redelivers (`x-death`, `x-delivery-count`, `x-first-death-…`,
//! `x-last-death-…`) — all ASCII case-insensitive — and names longer than an
//! AMQP short string (255 bytes).
//!
//! Both modes fill the native properties `message_id` = id, `type` = type,
//! `app_id` = source, `timestamp` = time (seconds), `correlation_id`, and
//! `delivery_mode` = 2 (persistent). The CloudEvents metadata of a message
//! may take at most [`MAX_METADATA_BYTES`] ([`metadata_bytes`]), checked
//! when publishing and when receiving, so that retry and dead-letter copies,
//! which carry it again, always fit in one AMQP content-header frame.
//!
//! **Receiving** ([`decode`]) picks the mode as the binding says: a
//! `content_type` starting with `application/cloudevents` is structured mode
//! (`application/cloudevents+json` is read; another event format is a decode
//! failure); else any `cloudEvents:`/`cloudEvents_`/`ce-` header (any case)
//! makes it binary mode; else the message is foreign. In binary mode each
//! attribute is read in its own CloudEvents type, from its native AMQP type
//! or its canonical string form: `time` from a timestamp (`T`) or an RFC 3339
//! string, `attempt` from any integer or a decimal string, extensions from
//! strings, integers, booleans (`"true"`/`"false"`) or timestamps (RFC 3339);
//! string attributes only from strings (long strings and byte arrays must be
//! UTF-8). Anything else — text that is not UTF-8, a `time` array, a float —
//! is a decode failure, never a lossy or dropped value. The `content_type`
//! property is the `datacontenttype` (the header is read when the property
//! is absent).
//!
//! The plain headers of a received CloudEvent (either mode) become envelope
//! headers ([`read_transport_headers`]): every header without an attribute
//! prefix except the reserved names above (postbox's and RabbitMQ's own,
//! read where they mean something: `postbox-due`, `x-delivery-count`),
//! its value as text rendered as for an undecodable message (strings as they
//! are, integers, booleans, timestamps in RFC 3339, arrays and tables as
//! JSON). A value that is not UTF-8 text is a decode failure naming the
//! header (never lossy: the dead-letter copy carries it base64-encoded, see
//! below). A header named like an envelope field (`id`, `time`, …) or like
//! an extension the event also carries is kept under `amqp:header:<name>`.
//!
//! A **foreign** message (no CloudEvents marker) gets a synthesized
//! envelope: id = the `message_id` property, or else `amqp-<hash>` — a
//! 64-bit FNV-1a hash of exchange, routing key, `timestamp`, `correlation_id`
//! and body, which is stable across redeliveries of one message (two
//! byte-identical messages without `message_id`/`timestamp` share it); type =
//! the `type` property or the configured default; source = `app_id` or
//! `rabbitmq:<queue>`; content type = `content_type` or JSON. Its plain
//! AMQP headers become envelope headers as a CloudEvent's do, a value that
//! is not UTF-8 text base64-encoded under `amqp:base64:<name>`.
//!
//! An **undecodable** message (CloudEvents markers, broken format) gets the
//! envelope of [`undecodable_envelope`]: what arrived, so that its dead-letter
//! copy shows it — as a valid CloudEvent: headers named like attributes or
//! like reserved names travel under `amqp:header:` — and a replay can put it
//! back ([`restore_undecodable`]).
//!
//! Destinations (see [`route`]): `orders` is the queue `orders` (through the
//! default exchange); `queue:orders` is the same; `exchange:events` is the
//! exchange `events` with the envelope's key (or `""`) as routing key;
//! `exchange:events/order.placed.eu` gives the routing key explicitly.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use lapin::types::{AMQPValue, DecimalValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use postbox_core::codec::{
    attr, binary, check_event_format, foreign, format_time, is_attribute_name, is_reserved,
    is_structured_content_type, structured, transport_headers, ContentMode,
    STRUCTURED_CONTENT_TYPE, UNDECODABLE_TYPE,
};
use postbox_core::{dlq, Envelope, Error, ErrorKind, MessageId};

use crate::config::HeaderPrefix;

/// The prefixes accepted when decoding, in order.
pub(crate) const DECODE_PREFIXES: [&str; 3] = ["cloudEvents:", "cloudEvents_", "ce-"];

/// Header the delay exchange routes on to pick a tier queue.
pub(crate) const TIER_HEADER: &str = "postbox-delay-tier";
/// Header quorum queues set on redeliveries.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";
/// The prefix of postbox's own transport headers ([`TIER_HEADER`],
/// [`DUE_HEADER`](postbox_core::delay::DUE_HEADER)).
const POSTBOX_PREFIX: &str = "postbox-";
/// The header RabbitMQ adds when it dead-letters a message.
const DEATH_HEADER: &str = "x-death";
/// The prefixes of the headers RabbitMQ adds with `x-death`.
const DEATH_PREFIXES: [&str; 2] = ["x-first-death-", "x-last-death-"];
/// The longest AMQP header name (a short string).
const MAX_HEADER_NAME: usize = 255;

/// The most CloudEvents metadata one message may carry, in bytes as
/// [`metadata_bytes`] counts them: checked when publishing (an `Encode`
/// error) and when receiving (a decode failure, dead-lettered with reason
/// `decode`). The retry and dead-letter metadata postbox adds is not counted,
/// so a copy fits wherever its original did: RabbitMQ's default `frame_max`
/// (128 KiB) holds the largest metadata plus every copy's own.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// What [`metadata_bytes`] adds per attribute besides its name and value:
/// the header prefix and the AMQP field-table encoding.
const ATTRIBUTE_OVERHEAD: usize = 20;

/// Envelope headers of an undecodable message that carry AMQP properties:
/// `amqp:<property>` (AMQP 0-9-1 names: `amqp:content-type`,
/// `amqp:message-id`, …).
const PROPERTY_PREFIX: &str = "amqp:";
/// An AMQP header whose name cannot be an envelope header name as it is
/// (a reserved attribute name, the `amqp:` namespace, or too long).
const RAW_HEADER_PREFIX: &str = "amqp:header:";
/// An AMQP header whose value is not UTF-8: carried base64-encoded.
const RAW_BASE64_PREFIX: &str = "amqp:base64:";
/// Says which headers of an undecodable message did not fit in the
/// metadata limit.
const RAW_OMITTED: &str = "amqp:omitted";
/// The longest carried name: with the longest publishing prefix
/// (`cloudEvents:`) it is still an AMQP short string.
const MAX_CARRIED_NAME: usize = 255 - "cloudEvents:".len();

/// Where a destination string publishes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// Exchange name (`""` is the default exchange).
    pub(crate) exchange: String,
    /// Routing key (the queue name on the default exchange).
    pub(crate) routing_key: String,
}

/// Maps a destination string to an exchange and routing key (see the module docs).
pub(crate) fn route(destination: &str, env: &Envelope) -> Route {
    if let Some(rest) = destination.strip_prefix("exchange:") {
        let (exchange, key) = match rest.split_once('/') {
            Some((e, k)) => (e, k.to_string()),
            None => (rest, env.key.clone().unwrap_or_default()),
        };
        return Route {
            exchange: exchange.to_string(),
            routing_key: key,
        };
    }
    let queue = destination.strip_prefix("queue:").unwrap_or(destination);
    Route {
        exchange: String::new(),
        routing_key: queue.to_string(),
    }
}

pub(crate) fn short(what: &str, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s).map_err(|e| {
        Error::new(
            ErrorKind::Encode,
            format!("{what} is longer than 255 bytes ({} bytes)", s.len()),
        )
        .with_source(e)
    })
}

fn decode_error(message: impl Into<Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Decode, message)
}

/// A message ready to send: its properties (headers included) and body.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    /// The AMQP properties, headers table included.
    pub(crate) properties: BasicProperties,
    /// The body.
    pub(crate) body: Bytes,
}

/// Encodes an envelope in `mode` (see the module docs).
pub(crate) fn encode(
    env: &Envelope,
    prefix: HeaderPrefix,
    mode: ContentMode,
) -> Result<Encoded, Error> {
    check_metadata(env, ErrorKind::Encode)?;
    let transport = transport_table(env)?;
    let props = native_properties(env);
    match mode {
        ContentMode::Binary => {
            let mut props = props.with_headers(encode_headers(env, prefix, transport)?);
            // A binary message must not look structured to its receivers.
            if !is_structured_content_type(&env.content_type) {
                if let Ok(ct) = ShortString::try_new(env.content_type.as_ref()) {
                    props = props.with_content_type(ct);
                }
            }
            Ok(Encoded {
                properties: props,
                body: env.payload.clone(),
            })
        }
        ContentMode::Structured => {
            let body = Bytes::from(structured::encode(env)?);
            let mut props = props.with_content_type(STRUCTURED_CONTENT_TYPE.into());
            // The document holds the attributes; transport headers ride
            // beside it.
            if !transport.inner().is_empty() {
                props = props.with_headers(transport);
            }
            Ok(Encoded {
                properties: props,
                body,
            })
        }
    }
}

/// The headers table of an envelope in binary mode: its CloudEvents
/// attributes (user headers with valid attribute names included), prefixed,
/// and its transport headers `table` as they are.
fn encode_headers(
    env: &Envelope,
    prefix: HeaderPrefix,
    mut table: FieldTable,
) -> Result<FieldTable, Error> {
    let attrs = binary::encode(env)?;
    let p = prefix.as_str();
    for (name, value) in attrs {
        let key = ShortString::try_new(format!("{p}{name}")).map_err(|e| {
            Error::new(
                ErrorKind::Encode,
                format!(
                    "header {:?} is longer than the {} bytes an AMQP header name holds with the prefix `{p}`",
                    shown(&name),
                    MAX_HEADER_NAME - p.len()
                ),
            )
            .with_source(e)
        })?;
        table.insert(key, AMQPValue::LongString(LongString::from(value)));
    }
    Ok(table)
}

/// The transport headers of an envelope (those whose names are not
/// attribute names) as plain AMQP headers, long strings under their own
/// names; a name the transport reserves is an `Encode` error.
fn transport_table(env: &Envelope) -> Result<FieldTable, Error> {
    let mut table = FieldTable::default();
    for (name, value) in transport_headers(env) {
        check_transport_name(name)?;
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    Ok(table)
}

/// Whether RabbitMQ or postbox reserve a plain AMQP header name (ASCII
/// case-insensitive): a decode prefix (`cloudEvents:`, `cloudEvents_`,
/// `ce-`), postbox's own `postbox-…` headers, and what RabbitMQ adds when it
/// dead-letters or redelivers (`x-death`, `x-delivery-count`,
/// `x-first-death-…`, `x-last-death-…`). Such a header is never an envelope
/// header: it is refused when publishing and not read back.
pub(crate) fn is_reserved_header(name: &str) -> bool {
    let starts = |p: &str| {
        name.get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    };
    DECODE_PREFIXES.iter().any(|p| starts(p))
        || starts(POSTBOX_PREFIX)
        || name.eq_ignore_ascii_case(DEATH_HEADER)
        || name.eq_ignore_ascii_case(DELIVERY_COUNT)
        || DEATH_PREFIXES.iter().any(|p| starts(p))
}

/// The name for error messages: at most 60 bytes of it.
fn shown(name: &str) -> Cow<'_, str> {
    if name.len() <= 60 {
        return Cow::Borrowed(name);
    }
    let mut end = 60;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &name[..end], name.len()))
}

/// Refuses a transport header (an envelope header that is not a valid
/// attribute name, written as a plain AMQP header) whose name the transport
/// reserves ([`is_reserved_header`]) or that is longer than an AMQP short
/// string: an `Encode` error naming it.
pub(crate) fn check_transport_name(name: &str) -> Result<(), Error> {
    if is_reserved_header(name) {
        return Err(Error::new(
            ErrorKind::Encode,
            format!(
                "header {:?} is not a CloudEvents attribute name, so it travels as a plain AMQP header, \
                 and that name is reserved (`cloudEvents:…`, `cloudEvents_…`, `ce-…`, `postbox-…`, `x-death`, \
                 `x-delivery-count`, `x-first-death-…`, `x-last-death-…`, any case): rename it",
                shown(name)
            ),
        ));
    }
    if name.len() > MAX_HEADER_NAME {
        return Err(Error::new(
            ErrorKind::Encode,
            format!(
                "header {:?} is not a CloudEvents attribute name, so it travels as a plain AMQP header, \
                 and its name is longer than the {MAX_HEADER_NAME} bytes an AMQP header name holds",
                shown(name)
            ),
        ));
    }
    Ok(())
}

/// Whether an envelope header named `name` can be published (under the
/// longest attribute prefix if it is an attribute name).
fn is_publishable(name: &str) -> bool {
    if is_attribute_name(name) {
        name.len() <= MAX_CARRIED_NAME
    } else {
        check_transport_name(name).is_ok()
    }
}

/// The native properties of both modes (no content type, no headers).
fn native_properties(env: &Envelope) -> BasicProperties {
    let mut props = BasicProperties::default().with_delivery_mode(2);
    // Properties are short strings: a longer value is carried by the
    // CloudEvents attribute alone.
    if let Ok(id) = ShortString::try_new(env.id.as_str()) {
        props = props.with_message_id(id);
    }
    if let Ok(t) = ShortString::try_new(env.event_type.as_ref()) {
        props = props.with_type(t);
    }
    if let Ok(s) = ShortString::try_new(env.source.as_ref()) {
        props = props.with_app_id(s);
    }
    if let Some(c) = env
        .correlation_id
        .as_deref()
        .and_then(|c| ShortString::try_new(c).ok())
    {
        props = props.with_correlation_id(c);
    }
    if let Some(secs) = env
        .time
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
    {
        props = props.with_timestamp(secs);
    }
    props
}

/// The size of an envelope's CloudEvents metadata as [`MAX_METADATA_BYTES`]
/// bounds it: each attribute's and transport header's name and value plus
/// 20 bytes, the retry and dead-letter metadata excepted.
pub fn metadata_bytes(env: &Envelope) -> usize {
    let attribute = |name: &str, value: usize| ATTRIBUTE_OVERHEAD + name.len() + value;
    let mut n = attribute(attr::SPECVERSION, 3)
        + attribute(attr::ID, env.id.as_str().len())
        + attribute(attr::TYPE, env.event_type.len())
        + attribute(attr::SOURCE, env.source.len())
        + attribute(attr::DATACONTENTTYPE, env.content_type.len())
        + attribute(attr::ATTEMPT, 10);
    if env.time.is_some() {
        // The longest RFC 3339 form postbox writes.
        n += attribute(attr::TIME, 30);
    }
    for (name, value) in binary::optional_attributes(env) {
        if let Some(v) = value {
            n += attribute(name, v.len());
        }
    }
    // Every header, extension attribute or transport header alike.
    for (k, v) in &env.headers {
        if !dlq::is_metadata(k) {
            n += attribute(k, v.len());
        }
    }
    n
}

fn check_metadata(env: &Envelope, kind: ErrorKind) -> Result<(), Error> {
    let n = metadata_bytes(env);
    if n > MAX_METADATA_BYTES {
        return Err(Error::new(
            kind,
            format!(
                "the CloudEvents metadata of message {} takes {n} bytes, more than the {MAX_METADATA_BYTES} bytes allowed (retry and dead-letter copies must fit in one AMQP header frame)",
                env.id
            ),
        ));
    }
    Ok(())
}

/// The size of the content-header frame payload that carries `props` (what
/// the broker compares with `frame_max` less the 8 bytes of frame overhead).
pub(crate) fn header_frame_size(props: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    // class id, weight, body size, property flags
    12 + 2
        + short(props.content_type())
        + short(props.content_encoding())
        + props.headers().as_ref().map_or(0, table_size)
        + props.delivery_mode().map_or(0, |_| 1)
        + props.priority().map_or(0, |_| 1)
        + short(props.correlation_id())
        + short(props.reply_to())
        + short(props.expiration())
        + short(props.message_id())
        + props.timestamp().map_or(0, |_| 8)
        + short(props.kind())
        + short(props.user_id())
        + short(props.app_id())
        + short(props.cluster_id())
}

/// The encoded size of a field table: its length prefix and entries.
fn table_size(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

/// The encoded size of a field value: its type tag and payload.
fn value_size(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

/// A header as an unsigned integer (any integer type, or a numeric string).
pub(crate) fn header_u64(props: &BasicProperties, name: &str) -> Option<u64> {
    let v = props.headers().as_ref()?.inner().get(name)?;
    match v {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// What a received message says about itself besides its envelope.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WireInfo<'a> {
    /// The exchange it was published to.
    pub(crate) exchange: &'a str,
    /// Its routing key.
    pub(crate) routing_key: &'a str,
    /// The queue it was consumed from.
    pub(crate) queue: &'a str,
}

/// Decodes a received message (see the module docs): a CloudEvent in
/// structured or binary mode, or a foreign message. A message that carries
/// CloudEvents markers but breaks the format is a `Decode` error naming what
/// is wrong.
pub(crate) fn decode(
    props: &BasicProperties,
    body: Bytes,
    info: WireInfo<'_>,
    foreign_type: &str,
) -> Result<Envelope, Error> {
    let content_type = props
        .content_type()
        .as_ref()
        .map(|c| c.as_str())
        .filter(|c| !c.is_empty());
    let mut env = match content_type.filter(|ct| is_structured_content_type(ct)) {
        Some(ct) => {
            check_event_format(ct)?;
            structured::decode(&body)?
        }
        None => match decode_binary(props, body, content_type)? {
            Ok(env) => env,
            Err(body) => {
                let mut env = foreign_envelope(props, body, info, foreign_type);
                if let Some(headers) = props.headers() {
                    read_transport_headers(&mut env, headers, Values::Base64)?;
                }
                check_metadata(&env, ErrorKind::Decode)?;
                return Ok(env);
            }
        },
    };
    if let Some(headers) = props.headers() {
        read_transport_headers(&mut env, headers, Values::Text)?;
    }
    check_metadata(&env, ErrorKind::Decode)?;
    Ok(env)
}

/// A binary-mode CloudEvent from the attribute headers, or the body back
/// when no header marks the message as one (a foreign message).
fn decode_binary(
    props: &BasicProperties,
    body: Bytes,
    content_type: Option<&str>,
) -> Result<Result<Envelope, Bytes>, Error> {
    let Some(headers) = props.headers().as_ref() else {
        return Ok(Err(body));
    };
    let mut marked = false;
    let mut attrs: Vec<(&str, Cow<'_, str>)> = Vec::with_capacity(headers.inner().len() + 1);
    for (k, v) in headers.inner() {
        let header = k.as_str();
        let Some(name) = DECODE_PREFIXES
            .iter()
            .find_map(|p| binary::strip_prefix(header, p))
        else {
            continue;
        };
        marked = true;
        if let Some(value) = attribute_value(header, name, v)? {
            attrs.push((name, value));
        }
    }
    if !marked {
        return Ok(Err(body));
    }
    if let Some(ct) = content_type {
        // The binding maps `datacontenttype` to the property; pushed last,
        // it wins over a header of the same attribute.
        attrs.push((attr::DATACONTENTTYPE, Cow::Borrowed(ct)));
    }
    binary::decode(attrs.iter().map(|(k, v)| (*k, v.as_ref())), body).map(Ok)
}

/// What a plain header value that is not UTF-8 text means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    /// A decode error naming the header (a CloudEvent's headers are text).
    Text,
    /// Carried base64-encoded under `amqp:base64:<name>` (a foreign
    /// message's headers, whatever they hold).
    Base64,
}

/// Puts the plain headers of a received message into its envelope (see
/// the module docs): every header but the reserved ones
/// ([`is_reserved_header`], which includes the attribute prefixes), its
/// value as text ([`render`]); a value that is not UTF-8 text is a decode
/// error naming the header for a CloudEvent, and carried base64-encoded
/// under `amqp:base64:<name>` for a foreign message ([`Values`]). A name the envelope cannot hold as it is — an
/// envelope field (`id`, `time`, …) or an extension the event already
/// carries — goes under `amqp:header:<name>`; a name that could not be
/// written back (too long with its prefix, or taken twice) is a decode
/// error: whatever is read can be published again, as a retry or
/// dead-letter copy.
fn read_transport_headers(
    env: &mut Envelope,
    headers: &FieldTable,
    values: Values,
) -> Result<(), Error> {
    for (k, v) in headers.inner() {
        let header = k.as_str();
        if is_reserved_header(header) {
            continue;
        }
        let (value, base64) = match render(v) {
            Rendered::Text(text) => (text.into_owned(), false),
            Rendered::Base64(b64) if values == Values::Base64 => (b64, true),
            Rendered::Base64(_) => {
                return Err(decode_error(format!(
                    "`{header}` is not UTF-8 text (a plain header of a CloudEvent is read as text)"
                )))
            }
        };
        let name = if base64 {
            format!("{RAW_BASE64_PREFIX}{header}")
        } else if is_reserved(header) || env.headers.contains_key(header) {
            format!("{RAW_HEADER_PREFIX}{header}")
        } else {
            header.to_string()
        };
        if env.headers.contains_key(&name) {
            return Err(decode_error(format!(
                "`{header}` and another header are both carried as the envelope header `{name}`"
            )));
        }
        if !is_publishable(&name) {
            return Err(decode_error(format!(
                "the name of `{}` is too long to be carried as the envelope header `{}`",
                shown(header),
                shown(&name)
            )));
        }
        env.headers.insert(name, value);
    }
    Ok(())
}

/// The CloudEvents type an attribute is read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttrType {
    /// A string (or URI, URI-reference): AMQP strings only.
    Text,
    /// `time`: an AMQP timestamp or an RFC 3339 string.
    Time,
    /// `attempt`: an AMQP integer or a decimal string.
    Integer,
    /// Any extension: string, integer, boolean or timestamp.
    Extension,
}

impl AttrType {
    fn of(name: &str) -> AttrType {
        match name {
            attr::TIME => AttrType::Time,
            attr::ATTEMPT => AttrType::Integer,
            attr::SPECVERSION
            | attr::ID
            | attr::TYPE
            | attr::SOURCE
            | attr::DATACONTENTTYPE
            | attr::SUBJECT
            | attr::DATAVERSION
            | attr::CORRELATIONID
            | attr::CAUSATIONID
            | attr::PARTITIONKEY
            | attr::TRACEPARENT
            | attr::TRACESTATE
            | "dataschema" => AttrType::Text,
            _ => AttrType::Extension,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            AttrType::Text => "a string is expected",
            AttrType::Time => "a timestamp or an RFC 3339 string is expected",
            AttrType::Integer => "an integer or a decimal string is expected",
            AttrType::Extension => {
                "a string, integer, boolean or timestamp is expected (CloudEvents has no other type)"
            }
        }
    }
}

/// The AMQP type of a value, for error messages.
fn amqp_type(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "boolean",
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_) => "integer",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "floating-point number",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "string",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "byte array",
        AMQPValue::Void => "void",
    }
}

/// An integer value in decimal, if it is one.
fn integer_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        _ => return None,
    })
}

/// An AMQP timestamp (seconds) in RFC 3339; `None` out of range.
fn timestamp_text(secs: u64) -> Option<String> {
    let t = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    format_time(t).ok()
}

/// The value of the attribute `name` (header `header`) in its canonical
/// string form; `None` for an AMQP void (no value). A value of another type,
/// or bytes that are not UTF-8, is a decode error naming the header.
fn attribute_value<'a>(
    header: &str,
    name: &str,
    v: &'a AMQPValue,
) -> Result<Option<Cow<'a, str>>, Error> {
    let ty = AttrType::of(name);
    let utf8 = |bytes: &'a [u8]| {
        std::str::from_utf8(bytes)
            .map(|s| Some(Cow::Borrowed(s)))
            .map_err(|e| decode_error(format!("`{header}` is not UTF-8 text")).with_source(e))
    };
    match v {
        AMQPValue::Void => Ok(None),
        AMQPValue::LongString(s) => utf8(s.as_bytes()),
        AMQPValue::ByteArray(b) => utf8(b.as_slice()),
        AMQPValue::ShortString(s) => Ok(Some(Cow::Borrowed(s.as_str()))),
        AMQPValue::Timestamp(secs) if matches!(ty, AttrType::Time | AttrType::Extension) => {
            match timestamp_text(*secs) {
                Some(t) => Ok(Some(Cow::Owned(t))),
                None => Err(decode_error(format!(
                    "`{header}` is a timestamp out of range ({secs} s)"
                ))),
            }
        }
        AMQPValue::Boolean(b) if ty == AttrType::Extension => {
            Ok(Some(Cow::Borrowed(if *b { "true" } else { "false" })))
        }
        other => match integer_text(other) {
            Some(n) if matches!(ty, AttrType::Integer | AttrType::Extension) => {
                Ok(Some(Cow::Owned(n)))
            }
            _ => Err(decode_error(format!(
                "`{header}` is an AMQP {}: {}",
                amqp_type(other),
                ty.expected()
            ))),
        },
    }
}

/// The envelope of a message postbox did not produce (see the module docs).
pub(crate) fn foreign_envelope(
    props: &BasicProperties,
    body: Bytes,
    info: WireInfo<'_>,
    foreign_type: &str,
) -> Envelope {
    let event_type = props
        .kind()
        .as_ref()
        .map(|t| t.as_str().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| foreign_type.to_string());
    let source = props
        .app_id()
        .as_ref()
        .map(|a| a.as_str().to_string())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| format!("rabbitmq:{}", info.queue));
    let mut f = foreign::Foreign::new(message_id(props, &body, info), source);
    f.event_type = Cow::Owned(event_type);
    f.content_type = props
        .content_type()
        .as_ref()
        .map(|c| Cow::Owned(c.as_str().to_string()));
    let mut env = foreign::envelope(f, body);
    env.time = props
        .timestamp()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s));
    env.correlation_id = props.correlation_id().as_ref().map(|c| c.to_string());
    env
}

/// The `message_id` property, or else the content id.
fn message_id(props: &BasicProperties, body: &[u8], info: WireInfo<'_>) -> MessageId {
    match props.message_id() {
        Some(id) if !id.as_str().is_empty() => MessageId::from(id.as_str()),
        _ => MessageId::from(content_id(props, body, info)),
    }
}

/// The envelope of an undecodable message: what arrived, so the runtime can
/// dead-letter it through the consumer's router and the DLQ shows it.
///
/// * payload = the body, byte for byte; content type
///   `application/octet-stream` (the original is `amqp:content-type`);
/// * id = the `message_id` property, or else `amqp-<hash>` (as a foreign
///   message); type = [`UNDECODABLE_TYPE`]; source = `rabbitmq:<queue>`;
/// * every AMQP header as an envelope header under its own name, its value as
///   text: strings as they are, integers and booleans in decimal /
///   `true`/`false`, timestamps in RFC 3339, arrays and tables as JSON; a
///   value that is not UTF-8 goes base64-encoded under `amqp:base64:<name>`,
///   and a name that cannot be an envelope header as it is goes under
///   `amqp:header:<name>` (cut to 243 bytes): a reserved attribute name
///   such as `id`, postbox's dead-letter and retry metadata names, the
///   `amqp:` namespace, a name longer than 243 bytes, and the names a copy
///   could not carry as a plain header ([`is_reserved_header`]:
///   `cloudEvents:id`, `ce-…`, `postbox-due`, `x-death`, …) — so the
///   dead-letter copy is a valid CloudEvent, and can always be published;
/// * every AMQP property as `amqp:<name>` (`amqp:content-type`,
///   `amqp:message-id`, `amqp:timestamp` in seconds, …);
/// * the whole stays within `max_metadata` ([`undecodable_budget`]), so its
///   dead-letter copy can always be published: headers that do not fit are
///   left out and `amqp:omitted` says how many and how large they were.
pub(crate) fn undecodable_envelope(
    props: &BasicProperties,
    body: Bytes,
    info: WireInfo<'_>,
    max_metadata: usize,
) -> Envelope {
    let mut f = foreign::Foreign::new(
        message_id(props, &body, info),
        format!("rabbitmq:{}", info.queue),
    );
    f.event_type = Cow::Borrowed(UNDECODABLE_TYPE);
    f.content_type = Some(Cow::Borrowed("application/octet-stream"));
    let mut env = foreign::envelope(f, body);
    // Room for the `amqp:omitted` note.
    const NOTE: usize = 200;
    let mut room = max_metadata.saturating_sub(metadata_bytes(&env) + NOTE);
    let (mut omitted, mut omitted_bytes) = (0usize, 0usize);
    let mut carry = |env: &mut Envelope, name: String, value: String| {
        let size = ATTRIBUTE_OVERHEAD + name.len() + value.len();
        if size <= room {
            room -= size;
            env.headers.insert(name, value);
        } else {
            omitted += 1;
            omitted_bytes += size;
        }
    };
    for (name, value) in property_entries(props) {
        carry(&mut env, format!("{PROPERTY_PREFIX}{name}"), value);
    }
    if let Some(headers) = props.headers() {
        for (k, v) in headers.inner() {
            let (name, value) = match render(v) {
                Rendered::Text(text) => (carried_name(k.as_str(), None), text.into_owned()),
                Rendered::Base64(b64) => (carried_name(k.as_str(), Some(RAW_BASE64_PREFIX)), b64),
            };
            carry(&mut env, name, value);
        }
    }
    if omitted > 0 {
        env.headers.insert(
            RAW_OMITTED.to_string(),
            format!("{omitted} headers ({omitted_bytes} bytes) over the {max_metadata}-byte metadata limit"),
        );
    }
    env
}

/// What a dead-letter copy adds to an undecodable envelope's headers at
/// most: the dead-letter metadata (`dlqerror` up to 1 KiB) and the native
/// properties.
const COPY_RESERVE: usize = 2560;

/// The metadata an undecodable envelope may carry so that its dead-letter
/// copy fits in one frame of a connection with `frame_max` (0: no limit).
pub(crate) fn undecodable_budget(frame_max: u32) -> usize {
    if frame_max == 0 {
        return MAX_METADATA_BYTES;
    }
    let room = usize::try_from(frame_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(8 + COPY_RESERVE);
    room.min(MAX_METADATA_BYTES)
}

/// The envelope header name an AMQP header is carried under.
fn carried_name(name: &str, namespace: Option<&str>) -> String {
    let namespace = match namespace {
        Some(ns) => ns,
        None if is_reserved(name)
            || dlq::is_metadata(name)
            || name.starts_with(PROPERTY_PREFIX)
            || name.len() > MAX_CARRIED_NAME
            || !is_publishable(name) =>
        {
            RAW_HEADER_PREFIX
        }
        None => return name.to_string(),
    };
    let mut carried = format!("{namespace}{name}");
    if carried.len() > MAX_CARRIED_NAME {
        let mut end = MAX_CARRIED_NAME;
        while !carried.is_char_boundary(end) {
            end -= 1;
        }
        carried.truncate(end);
    }
    carried
}

/// The AMQP properties of a message as `(AMQP 0-9-1 name, text)`.
fn property_entries(props: &BasicProperties) -> Vec<(&'static str, String)> {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
    let entries = [
        ("content-type", text(props.content_type())),
        ("content-encoding", text(props.content_encoding())),
        (
            "delivery-mode",
            props.delivery_mode().map(|n| n.to_string()),
        ),
        ("priority", props.priority().map(|n| n.to_string())),
        ("correlation-id", text(props.correlation_id())),
        ("reply-to", text(props.reply_to())),
        ("expiration", text(props.expiration())),
        ("message-id", text(props.message_id())),
        ("timestamp", props.timestamp().map(|n| n.to_string())),
        ("type", text(props.kind())),
        ("user-id", text(props.user_id())),
        ("app-id", text(props.app_id())),
        ("cluster-id", text(props.cluster_id())),
    ];
    entries
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect()
}

/// A header value of an undecodable message as envelope text.
enum Rendered<'a> {
    /// Text that stands for the value.
    Text(Cow<'a, str>),
    /// Bytes that are not UTF-8, base64-encoded.
    Base64(String),
}

fn render(v: &AMQPValue) -> Rendered<'_> {
    let bytes = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) => Rendered::Text(Cow::Owned(s.to_string())),
        Err(_) => Rendered::Base64(base64::engine::general_purpose::STANDARD.encode(b)),
    };
    Rendered::Text(match v {
        AMQPValue::LongString(s) => return bytes(s.as_bytes()),
        AMQPValue::ByteArray(b) => return bytes(b.as_slice()),
        AMQPValue::ShortString(s) => Cow::Borrowed(s.as_str()),
        AMQPValue::Boolean(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        AMQPValue::Timestamp(secs) => {
            Cow::Owned(timestamp_text(*secs).unwrap_or_else(|| secs.to_string()))
        }
        AMQPValue::Float(f) => Cow::Owned(f.to_string()),
        AMQPValue::Double(f) => Cow::Owned(f.to_string()),
        AMQPValue::DecimalValue(d) => Cow::Owned(decimal_text(*d)),
        AMQPValue::Void => Cow::Borrowed(""),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => Cow::Owned(json(v).to_string()),
        other => Cow::Owned(integer_text(other).unwrap_or_default()),
    })
}

/// An AMQP decimal (`value` × 10^-`scale`) in decimal notation.
fn decimal_text(d: DecimalValue) -> String {
    let digits = d.value.to_string();
    let scale = usize::from(d.scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

/// An AMQP value as JSON (nested values of undecodable messages).
fn json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    let bytes = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(b)
        }),
    };
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::String(decimal_text(*d)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => bytes(s.as_bytes()),
        AMQPValue::ByteArray(b) => bytes(b.as_slice()),
        AMQPValue::Timestamp(secs) => timestamp_text(*secs)
            .map(Value::String)
            .unwrap_or_else(|| Value::from(*secs)),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// The AMQP message an undecodable envelope came from (the inverse of
/// [`undecodable_envelope`], up to what text keeps: values go back as long
/// strings): properties from the `amqp:<property>` headers — except
/// `user-id`, which RabbitMQ refuses from any other user — and headers from
/// the rest, the dead-letter and retry metadata left out. Persistent unless
/// the original said otherwise.
pub(crate) fn restore_undecodable(env: &Envelope) -> Result<Encoded, Error> {
    let mut headers = FieldTable::default();
    let mut props = BasicProperties::default();
    for (k, v) in &env.headers {
        if dlq::is_metadata(k) || k == RAW_OMITTED {
            continue;
        }
        let (name, value) = if let Some(name) = k.strip_prefix(RAW_BASE64_PREFIX) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| {
                    Error::new(ErrorKind::Encode, format!("`{k}` is not base64")).with_source(e)
                })?;
            (name, LongString::from(bytes))
        } else if let Some(name) = k.strip_prefix(RAW_HEADER_PREFIX) {
            (name, LongString::from(v.as_str()))
        } else if let Some(name) = k.strip_prefix(PROPERTY_PREFIX) {
            props = restore_property(props, name, v)?;
            continue;
        } else {
            (k.as_str(), LongString::from(v.as_str()))
        };
        headers.insert(short("header name", name)?, AMQPValue::LongString(value));
    }
    if props.delivery_mode().is_none() {
        props = props.with_delivery_mode(2);
    }
    Ok(Encoded {
        properties: props.with_headers(headers),
        body: env.payload.clone(),
    })
}

fn restore_property(
    props: BasicProperties,
    name: &str,
    value: &str,
) -> Result<BasicProperties, Error> {
    let invalid = |e: Option<Box<dyn std::error::Error + Send + Sync>>| {
        let error = Error::new(
            ErrorKind::Encode,
            format!("`{PROPERTY_PREFIX}{name}` = {value:?} is not a valid AMQP property"),
        );
        match e {
            Some(e) => error.with_source(e),
            None => error,
        }
    };
    let s = || short(name, value);
    Ok(match name {
        "content-type" => props.with_content_type(s()?),
        "content-encoding" => props.with_content_encoding(s()?),
        "delivery-mode" => {
            props.with_delivery_mode(value.parse().map_err(|e| invalid(Some(Box::new(e))))?)
        }
        "priority" => props.with_priority(value.parse().map_err(|e| invalid(Some(Box::new(e))))?),
        "correlation-id" => props.with_correlation_id(s()?),
        "reply-to" => props.with_reply_to(s()?),
        "expiration" => props.with_expiration(s()?),
        "message-id" => props.with_message_id(s()?),
        "timestamp" => props.with_timestamp(value.parse().map_err(|e| invalid(Some(Box::new(e))))?),
        "type" => props.with_type(s()?),
        "app-id" => props.with_app_id(s()?),
        "cluster-id" => props.with_cluster_id(s()?),
        "user-id" => props,
        _ => return Err(invalid(None)),
    })
}

/// The queue a message was dead-lettered from by the broker: the `queue` of
/// the most recent `x-death` entry.
pub(crate) fn death_queue(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(last) = deaths.as_slice().first()? else {
        return None;
    };
    match last.inner().get("queue")? {
        AMQPValue::LongString(q) => std::str::from_utf8(q.as_bytes()).ok().map(str::to_string),
        AMQPValue::ShortString(q) => Some(q.as_str().to_string()),
        _ => None,
    }
}

/// The properties of a broker-dead-lettered message without what the broker
/// added (`x-death`, `x-first-death-*`, `x-last-death-*`, `x-delivery-count`).
pub(crate) fn without_death(props: &BasicProperties) -> BasicProperties {
    let Some(headers) = props.headers() else {
        return props.clone();
    };
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        let name = k.as_str();
        let added = name == "x-death"
            || name == DELIVERY_COUNT
            || name.starts_with("x-first-death-")
            || name.starts_with("x-last-death-");
        if !added {
            kept.insert(k.clone(), v.clone());
        }
    }
    props.clone().with_headers(kept)
}

/// `amqp-<16 hex digits>`: FNV-1a over what identifies one message.
fn content_id(props: &BasicProperties, body: &[u8], info: WireInfo<'_>) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
        // Field separator so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    };
    feed(info.exchange.as_bytes());
    feed(info.routing_key.as_bytes());
    feed(&props.timestamp().unwrap_or_default().to_be_bytes());
    feed(
        props
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str())
            .unwrap_or_default()
            .as_bytes(),
    );
    feed(body);
    format!("amqp-{h:016x}")
}

/// When a delayed copy is due, from its [`DUE_HEADER`](postbox_core::delay::DUE_HEADER).
pub(crate) fn due_of(props: &BasicProperties) -> Option<SystemTime> {
    header_u64(props, postbox_core::delay::DUE_HEADER)
        .and_then(postbox_core::delay::due_from_millis)
}

/// The true attempt number: the envelope's `attempt` plus the broker's
/// redeliveries (quorum queues count them in `x-delivery-count`; on a classic
/// queue a redelivered message counts one more — a lower bound).
pub(crate) fn attempt(env_attempt: u32, props: &BasicProperties, redelivered: bool) -> u32 {
    match header_u64(props, DELIVERY_COUNT) {
        Some(n) => env_attempt.saturating_add(u32::try_from(n).unwrap_or(u32::MAX)),
        None if redelivered => env_attempt.saturating_add(1),
        None => env_attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn sample() -> Envelope {
        Envelope::builder("order.placed")
            .source("shop")
            .key("k1")
            .correlation_id("c-1")
            .subject("s")
            .schema_version("2")
            .header("tenant", "acme")
            .content_type("application/octet-stream")
            .payload(vec![0u8, 159, 146, 150, 255])
            .build()
    }

    fn info() -> WireInfo<'static> {
        WireInfo {
            exchange: "ex",
            routing_key: "rk",
            queue: "q",
        }
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    /// Properties of a binary-mode event with the required attributes plus `extra`.
    fn binary_props(extra: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        t.insert("cloudEvents:specversion".into(), text("1.0"));
        t.insert("cloudEvents:id".into(), text("e-1"));
        t.insert("cloudEvents:type".into(), text("t"));
        t.insert("cloudEvents:source".into(), text("/s"));
        for (k, v) in extra {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(t)
    }

    fn round_trip(encoded: &Encoded) -> Envelope {
        decode(&encoded.properties, encoded.body.clone(), info(), "x").unwrap()
    }

    #[test]
    fn round_trip_with_every_prefix_and_both_modes() {
        let modes = [
            (HeaderPrefix::CloudEvents, ContentMode::Binary),
            (HeaderPrefix::CloudEventsUnderscore, ContentMode::Binary),
            (HeaderPrefix::Ce, ContentMode::Binary),
            (HeaderPrefix::CloudEvents, ContentMode::Structured),
        ];
        for (prefix, mode) in modes {
            let env = sample();
            let back = round_trip(&encode(&env, prefix, mode).unwrap());
            assert_eq!(back, env, "{prefix:?} {mode:?}");
        }
    }

    #[test]
    fn native_properties_are_filled_in_both_modes() {
        let env = sample();
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let props = encode(&env, HeaderPrefix::CloudEvents, mode)
                .unwrap()
                .properties;
            assert_eq!(
                props.message_id().as_ref().unwrap().as_str(),
                env.id.as_str()
            );
            assert_eq!(props.kind().as_ref().unwrap().as_str(), "order.placed");
            assert_eq!(props.app_id().as_ref().unwrap().as_str(), "shop");
            assert_eq!(props.delivery_mode(), &Some(2));
            assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "c-1");
            assert!(props.timestamp().is_some());
        }
        let binary = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap();
        assert_eq!(
            binary.properties.content_type().as_ref().unwrap().as_str(),
            "application/octet-stream"
        );
        assert_eq!(binary.body, env.payload);
        let h = binary.properties.headers().as_ref().unwrap();
        assert!(h.contains_key("cloudEvents:id"));
        assert!(h.contains_key("cloudEvents:tenant"));
        let structured = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Structured).unwrap();
        assert_eq!(
            structured
                .properties
                .content_type()
                .as_ref()
                .unwrap()
                .as_str(),
            STRUCTURED_CONTENT_TYPE
        );
        assert!(structured.properties.headers().is_none());
        assert_eq!(
            structured::decode(&structured.body).unwrap(),
            env,
            "the body is the event"
        );
    }

    #[test]
    fn a_binary_message_never_looks_structured() {
        let env = Envelope::builder("t")
            .content_type("application/cloudevents+json")
            .payload(r#"{"specversion":"1.0"}"#)
            .build();
        let encoded = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap();
        assert!(encoded.properties.content_type().is_none());
        let back = round_trip(&encoded);
        assert_eq!(back.content_type, "application/cloudevents+json");
        assert_eq!(back.payload, env.payload);
    }

    #[test]
    fn structured_mode_is_chosen_by_content_type() {
        let env = sample();
        let body = Bytes::from(structured::encode(&env).unwrap());
        for ct in [
            "application/cloudevents+json",
            "Application/CloudEvents+JSON; charset=UTF-8",
        ] {
            let props = BasicProperties::default().with_content_type(ct.into());
            assert_eq!(
                decode(&props, body.clone(), info(), "x").unwrap(),
                env,
                "{ct}"
            );
        }
        // Attribute headers do not matter in structured mode.
        let props = binary_props(&[]).with_content_type("application/cloudevents+json".into());
        assert_eq!(
            decode(&props, body.clone(), info(), "x").unwrap().id,
            env.id
        );
        for (ct, body) in [
            ("application/cloudevents+json", Bytes::new()),
            (
                "application/cloudevents+json",
                Bytes::from_static(b"garbage"),
            ),
            (
                "application/cloudevents+json",
                Bytes::from_static(b"{\"a\":1}"),
            ),
            ("application/cloudevents-batch+json", body.clone()),
            ("application/cloudevents+avro", body),
        ] {
            let props = BasicProperties::default().with_content_type(ct.into());
            let e = decode(&props, body.clone(), info(), "x").unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Decode, "{ct}");
        }
    }

    #[test]
    fn the_content_type_property_is_the_datacontenttype() {
        let props = binary_props(&[]).with_content_type("text/plain; charset=utf-8".into());
        let env = decode(&props, Bytes::from_static(b"hi"), info(), "x").unwrap();
        assert_eq!(env.content_type, "text/plain; charset=utf-8");
        // The property wins over a header of the same attribute.
        let props = binary_props(&[("cloudEvents:datacontenttype", text("application/xml"))])
            .with_content_type("text/plain".into());
        assert_eq!(
            decode(&props, Bytes::new(), info(), "x")
                .unwrap()
                .content_type,
            "text/plain"
        );
        let props = binary_props(&[("cloudEvents:datacontenttype", text("application/xml"))]);
        assert_eq!(
            decode(&props, Bytes::new(), info(), "x")
                .unwrap()
                .content_type,
            "application/xml"
        );
    }

    #[test]
    fn typed_attributes_accept_native_and_string_forms() {
        let props = binary_props(&[
            ("cloudEvents:time", AMQPValue::Timestamp(1_700_000_000)),
            ("cloudEvents:attempt", AMQPValue::ShortShortUInt(4)),
            ("cloudEvents:n", AMQPValue::LongLongInt(-7)),
            ("cloudEvents:flag", AMQPValue::Boolean(false)),
            ("cloudEvents:at", AMQPValue::Timestamp(0)),
            ("cloudEvents:nothing", AMQPValue::Void),
            (
                "cloudEvents:raw",
                AMQPValue::ByteArray(b"utf8 bytes".to_vec().into()),
            ),
        ]);
        let env = decode(&props, Bytes::new(), info(), "x").unwrap();
        assert_eq!(
            env.time,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(env.attempt, 4);
        assert_eq!(env.headers["n"], "-7");
        assert_eq!(env.headers["flag"], "false");
        assert_eq!(env.headers["at"], "1970-01-01T00:00:00Z");
        assert_eq!(env.headers["raw"], "utf8 bytes");
        assert!(!env.headers.contains_key("nothing"));
        let strings = binary_props(&[
            ("cloudEvents:time", text("2023-11-14T22:13:20Z")),
            ("cloudEvents:attempt", text("4")),
        ]);
        let env = decode(&strings, Bytes::new(), info(), "x").unwrap();
        assert_eq!(
            env.time,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(env.attempt, 4);
    }

    #[test]
    fn lossy_or_mistyped_values_are_decode_errors_naming_the_header() {
        let not_utf8 = vec![b'a', 0xff, 0xfe];
        let cases: Vec<(&str, AMQPValue)> = vec![
            (
                "cloudEvents:id",
                AMQPValue::LongString(LongString::from(not_utf8.clone())),
            ),
            (
                "cloudEvents:id",
                AMQPValue::ByteArray(not_utf8.clone().into()),
            ),
            (
                "cloudEvents:tenant",
                AMQPValue::LongString(LongString::from(not_utf8)),
            ),
            (
                "cloudEvents:time",
                AMQPValue::FieldArray(FieldArray::from(vec![text("x")])),
            ),
            ("cloudEvents:time", AMQPValue::LongInt(1_700_000_000)),
            ("cloudEvents:time", AMQPValue::Timestamp(u64::MAX)),
            ("cloudEvents:time", text("yesterday")),
            ("cloudEvents:id", AMQPValue::LongInt(7)),
            ("cloudEvents:attempt", AMQPValue::Boolean(true)),
            ("cloudEvents:attempt", AMQPValue::LongInt(0)),
            ("cloudEvents:score", AMQPValue::Double(0.5)),
            (
                "cloudEvents:nested",
                AMQPValue::FieldTable(FieldTable::default()),
            ),
            ("cloudEvents:specversion", text("0.3")),
        ];
        for (header, value) in cases {
            let props = binary_props(&[(header, value.clone())]);
            let e = decode(&props, Bytes::new(), info(), "x").unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Decode, "{header} = {value:?}");
            let named = e.message().contains(header)
                || e.message()
                    .contains(header.trim_start_matches("cloudEvents:"));
            assert!(named, "{header} = {value:?}: {e}");
        }
    }

    #[test]
    fn metadata_over_the_limit_is_refused_both_ways() {
        let mut env = Envelope::new("t", "{}");
        env.headers
            .insert("big".into(), "x".repeat(MAX_METADATA_BYTES));
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let e = encode(&env, HeaderPrefix::CloudEvents, mode).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Encode);
        }
        let props = binary_props(&[("cloudEvents:big", text(&"x".repeat(MAX_METADATA_BYTES)))]);
        let e = decode(&props, Bytes::new(), info(), "x").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Decode);
        assert!(e.message().contains("metadata"), "{e}");
        // Retry and dead-letter metadata is not counted: a copy fits
        // wherever its original did.
        let mut near = Envelope::new("t", "{}");
        let fill = MAX_METADATA_BYTES - metadata_bytes(&near) - ATTRIBUTE_OVERHEAD - 3;
        near.headers.insert("big".into(), "x".repeat(fill));
        assert_eq!(metadata_bytes(&near), MAX_METADATA_BYTES);
        near.headers.insert(dlq::ERROR.into(), "e".repeat(1024));
        near.headers.insert(dlq::REASON.into(), "decode".into());
        let encoded = encode(&near, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap();
        assert_eq!(round_trip(&encoded), near);
    }

    #[test]
    fn foreign_messages_get_a_stable_envelope() {
        let props = BasicProperties::default().with_timestamp(1_700_000_000);
        let body = Bytes::from_static(b"{\"a\":1}");
        let a = decode(&props, body.clone(), info(), "legacy.event").unwrap();
        let b = decode(&props, body.clone(), info(), "legacy.event").unwrap();
        assert_eq!(a.id, b.id, "id must be stable across redeliveries");
        assert!(a.id.as_str().starts_with("amqp-"));
        assert_eq!(a.event_type, "legacy.event");
        assert_eq!(a.source, "rabbitmq:q");
        assert_eq!(a.payload, body);
        let with_id = props
            .clone()
            .with_message_id("m-7".into())
            .with_type("t".into());
        let c = decode(&with_id, body.clone(), info(), "legacy.event").unwrap();
        assert_eq!(c.id.as_str(), "m-7");
        assert_eq!(c.event_type, "t");
        // Headers without a CloudEvents prefix leave a message foreign.
        let mut other = FieldTable::default();
        other.insert("x-custom".into(), text("v"));
        let d = decode(&props.with_headers(other), body, info(), "legacy.event").unwrap();
        assert_eq!(d.event_type, "legacy.event");
    }

    #[test]
    fn malformed_cloudevents_headers_are_decode_errors() {
        let mut table = FieldTable::default();
        table.insert("ce-specversion".into(), AMQPValue::LongString("1.0".into()));
        table.insert("ce-id".into(), AMQPValue::LongString("1".into()));
        let props = BasicProperties::default().with_headers(table);
        let e = decode(&props, Bytes::new(), info(), "x").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Decode);
        // A marker whose value is void still marks the message.
        let mut table = FieldTable::default();
        table.insert("cloudEvents:id".into(), AMQPValue::Void);
        let props = BasicProperties::default().with_headers(table);
        assert_eq!(
            decode(&props, Bytes::new(), info(), "x")
                .unwrap_err()
                .kind(),
            &ErrorKind::Decode
        );
    }

    #[test]
    fn undecodable_envelopes_carry_what_arrived_and_restore_it() {
        let not_utf8 = vec![0xffu8, 0x00, 0xfe];
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("orders"));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let props = binary_props(&[
            ("cloudEvents:specversion", text("9.9")),
            ("cloudEvents:time", AMQPValue::Timestamp(1_700_000_000)),
            (
                "cloudEvents:bin",
                AMQPValue::ByteArray(not_utf8.clone().into()),
            ),
            ("id", text("a reserved name")),
            ("amqp:content-type", text("a header in the amqp: namespace")),
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            ),
            ("x-n", AMQPValue::ShortInt(-2)),
            (
                "x-d",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 3,
                    value: 12,
                }),
            ),
        ])
        .with_content_type("application/x-thing".into())
        .with_timestamp(1_600_000_000)
        .with_delivery_mode(1)
        .with_user_id("guest".into());
        let body = Bytes::from_static(b"\x00body\xff");
        let env = undecodable_envelope(&props, body.clone(), info(), MAX_METADATA_BYTES);
        assert_eq!(env.payload, body);
        assert_eq!(env.event_type, UNDECODABLE_TYPE);
        assert_eq!(env.source, "rabbitmq:q");
        assert!(env.id.as_str().starts_with("amqp-"));
        assert_eq!(env.content_type, "application/octet-stream");
        let h = &env.headers;
        // Headers named like attributes travel as `amqp:header:`, so the
        // dead-letter copy stays a valid CloudEvent.
        assert_eq!(h["amqp:header:cloudEvents:specversion"], "9.9");
        assert_eq!(h["amqp:header:cloudEvents:id"], "e-1");
        assert_eq!(h["amqp:header:cloudEvents:time"], "2023-11-14T22:13:20Z");
        assert_eq!(
            h["amqp:base64:cloudEvents:bin"],
            base64::engine::general_purpose::STANDARD.encode(&not_utf8)
        );
        assert_eq!(h["amqp:header:id"], "a reserved name");
        assert_eq!(
            h["amqp:header:amqp:content-type"],
            "a header in the amqp: namespace"
        );
        assert_eq!(
            h["amqp:header:x-death"],
            r#"[{"count":1,"queue":"orders"}]"#
        );
        assert_eq!(h["x-n"], "-2");
        assert_eq!(h["x-d"], "0.012");
        assert_eq!(h["amqp:content-type"], "application/x-thing");
        assert_eq!(h["amqp:timestamp"], "1600000000");
        assert_eq!(h["amqp:delivery-mode"], "1");
        // It can always be published (and read back) as a dead-letter copy.
        let mut copy = env.clone();
        copy.headers.insert(dlq::REASON.into(), "decode".into());
        copy.headers.insert(dlq::ORIGIN.into(), "q".into());
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let encoded = encode(&copy, HeaderPrefix::CloudEvents, mode).unwrap();
            assert_eq!(round_trip(&encoded), copy, "{mode:?}");
        }
        let original = restore_undecodable(&copy).unwrap();
        assert_eq!(original.body, body);
        let p = &original.properties;
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/x-thing"
        );
        assert_eq!(p.timestamp(), &Some(1_600_000_000));
        assert_eq!(p.delivery_mode(), &Some(1));
        assert!(
            p.user_id().is_none(),
            "RabbitMQ refuses another user's user-id"
        );
        let headers = p.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("cloudEvents:specversion"), Some(&text("9.9")));
        assert_eq!(
            headers.get("cloudEvents:bin"),
            Some(&AMQPValue::LongString(LongString::from(not_utf8)))
        );
        assert_eq!(headers.get("id"), Some(&text("a reserved name")));
        assert_eq!(
            headers.get("amqp:content-type"),
            Some(&text("a header in the amqp: namespace"))
        );
        assert!(!headers.keys().any(|k| k.as_str().starts_with("dlq")));
    }

    #[test]
    fn undecodable_envelopes_stay_within_the_metadata_limit() {
        let props = binary_props(&[
            (
                "cloudEvents:big",
                text(&"x".repeat(MAX_METADATA_BYTES + 10)),
            ),
            ("cloudEvents:small", text("kept")),
            (&"n".repeat(255), text("long name")),
        ]);
        let env =
            undecodable_envelope(&props, Bytes::from_static(b"b"), info(), MAX_METADATA_BYTES);
        assert!(metadata_bytes(&env) <= MAX_METADATA_BYTES);
        assert!(!env.headers.contains_key("amqp:header:cloudEvents:big"));
        assert_eq!(env.headers["amqp:header:cloudEvents:small"], "kept");
        assert!(
            env.headers[RAW_OMITTED].starts_with("1 headers"),
            "{:?}",
            env.headers
        );
        let long = format!("{RAW_HEADER_PREFIX}{}", "n".repeat(255));
        assert_eq!(env.headers[&long[..MAX_CARRIED_NAME]], "long name");
        let encoded = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap();
        assert_eq!(round_trip(&encoded), env);
    }

    #[test]
    fn a_dead_letter_copy_of_an_undecodable_message_fits_in_a_frame() {
        assert_eq!(undecodable_budget(0), MAX_METADATA_BYTES);
        assert_eq!(undecodable_budget(131_072), MAX_METADATA_BYTES);
        let frame_max = 8192;
        let headers: Vec<(String, AMQPValue)> = (0..40)
            .map(|i| (format!("x-h{i}"), text(&"v".repeat(200))))
            .collect();
        let extra: Vec<(&str, AMQPValue)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let props = binary_props(&extra)
            .with_message_id("m".repeat(255).as_str().into())
            .with_app_id("a".repeat(255).as_str().into());
        let env = undecodable_envelope(&props, Bytes::new(), info(), undecodable_budget(frame_max));
        assert!(env.headers.contains_key(RAW_OMITTED));
        let mut copy = env;
        let t = UNIX_EPOCH;
        postbox_core::DeadLetterMetadata {
            reason: postbox_core::FailureReason::Decode,
            error: "e".repeat(2000),
            error_type: "decode".into(),
            attempts: 1,
            first_failed_at: t,
            last_failed_at: t,
            origin: postbox_core::Origin {
                destination: "q".repeat(255),
                partition: None,
                offset: None,
            },
            consumer: "c".repeat(100),
        }
        .apply(&mut copy);
        let encoded = encode(&copy, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap();
        assert!(header_frame_size(&encoded.properties) <= frame_max as usize - 8);
    }

    #[test]
    fn broker_dead_letters_name_their_queue() {
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("orders"));
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        t.insert("x-first-death-queue".into(), text("orders"));
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        t.insert("tenant".into(), text("acme"));
        let props = BasicProperties::default().with_headers(t);
        assert_eq!(death_queue(&props).as_deref(), Some("orders"));
        let kept = without_death(&props);
        let kept = kept.headers().as_ref().unwrap().inner();
        assert_eq!(
            kept.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["tenant"]
        );
        assert_eq!(death_queue(&BasicProperties::default()), None);
    }

    #[test]
    fn header_frame_size_is_what_the_broker_counts() {
        // RabbitMQ refused this message with `{frame_too_large,6307,4088}`.
        let env = Envelope::builder("t")
            .id("id-1")
            .time(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
            .header("big", "x".repeat(6000))
            .build();
        let encoded = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap();
        assert_eq!(header_frame_size(&encoded.properties), 6307);
    }

    #[test]
    fn destinations_map_to_exchange_and_key() {
        let env = sample();
        assert_eq!(
            route("orders", &env),
            Route {
                exchange: "".into(),
                routing_key: "orders".into()
            }
        );
        assert_eq!(route("queue:orders", &env).routing_key, "orders");
        let r = route("exchange:events/order.placed.eu", &env);
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("events", "order.placed.eu")
        );
        let r = route("exchange:events", &env);
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("events", "k1")
        );
    }

    #[test]
    fn attempts_count_broker_redeliveries() {
        let plain = BasicProperties::default();
        assert_eq!(attempt(1, &plain, false), 1);
        assert_eq!(attempt(2, &plain, true), 3);
        let mut t = FieldTable::default();
        t.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        let quorum = BasicProperties::default().with_headers(t);
        assert_eq!(attempt(2, &quorum, true), 5);
    }

    #[test]
    fn overlong_header_names_are_encode_errors() {
        let mut env = sample();
        env.headers.insert("h".repeat(300), "v".into());
        let e = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Binary).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Encode);
        assert!(e.message().contains(&"h".repeat(60)), "{e}");
    }

    // -----------------------------------------------------------------------
    // The header rule: names that are not attribute names are transport
    // metadata, plain AMQP headers.
    // -----------------------------------------------------------------------

    /// An envelope with a valid-name header and two that are not.
    fn with_transport_headers() -> Envelope {
        Envelope::builder("order.placed")
            .source("shop")
            .header("tenant", "acme")
            .header("x-trace", "t-1")
            .header("traceId", "abc")
            .payload(r#"{"id":1}"#)
            .build()
    }

    #[test]
    fn transport_headers_are_plain_amqp_headers_in_both_modes() {
        let env = with_transport_headers();
        let modes = [
            (HeaderPrefix::CloudEvents, ContentMode::Binary),
            (HeaderPrefix::CloudEventsUnderscore, ContentMode::Binary),
            (HeaderPrefix::Ce, ContentMode::Binary),
            (HeaderPrefix::CloudEvents, ContentMode::Structured),
            (HeaderPrefix::Ce, ContentMode::Structured),
        ];
        for (prefix, mode) in modes {
            let what = format!("{prefix:?} {mode:?}");
            let encoded = encode(&env, prefix, mode).unwrap();
            let table = encoded.properties.headers().as_ref().expect(&what).inner();
            assert_eq!(table.get("x-trace"), Some(&text("t-1")), "{what}");
            assert_eq!(table.get("traceId"), Some(&text("abc")), "{what}");
            // Every prefixed header is a valid attribute name.
            for k in table.keys() {
                let name = DECODE_PREFIXES
                    .iter()
                    .find_map(|p| binary::strip_prefix(k.as_str(), p));
                if let Some(name) = name {
                    assert!(postbox_core::codec::is_attribute_name(name), "{what}: {k}");
                }
            }
            match mode {
                ContentMode::Binary => {
                    let tenant = format!("{}tenant", prefix.as_str());
                    assert_eq!(table.get(tenant.as_str()), Some(&text("acme")), "{what}");
                }
                ContentMode::Structured => {
                    assert_eq!(table.len(), 2, "{what}: only transport headers");
                    let doc: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_slice(&encoded.body).unwrap();
                    assert_eq!(doc["tenant"], "acme", "{what}");
                    assert!(!doc.contains_key("x-trace"), "{what}");
                    assert!(!doc.contains_key("traceId"), "{what}");
                }
            }
            assert_eq!(round_trip(&encoded), env, "{what}");
        }
        // Without transport headers structured mode writes no headers.
        let plain = sample();
        let encoded = encode(&plain, HeaderPrefix::CloudEvents, ContentMode::Structured).unwrap();
        assert!(encoded.properties.headers().is_none());
    }

    #[test]
    fn names_the_transport_reserves_are_refused_naming_the_header() {
        // Not an attribute name (so a plain header), longer than 255 bytes.
        let long = format!("x-{}", "h".repeat(254));
        let names = [
            "cloudEvents:id",
            "cloudEvents:x-trace",
            "CloudEvents:Tenant",
            "cloudevents_x",
            "cloudEvents_id",
            "ce-id",
            "CE-Trace",
            "postbox-due",
            "postbox-delay-tier",
            "Postbox-Anything",
            "x-death",
            "X-Death",
            "x-delivery-count",
            "x-first-death-queue",
            "x-first-death-reason",
            "x-last-death-exchange",
            long.as_str(),
        ];
        for name in names {
            let env = Envelope::builder("t").header(name, "v").build();
            for mode in [ContentMode::Binary, ContentMode::Structured] {
                let e = encode(&env, HeaderPrefix::CloudEvents, mode)
                    .expect_err(&format!("{name} {mode:?}"));
                assert_eq!(e.kind(), &ErrorKind::Encode, "{name} {mode:?}");
                let shown = &name[..name.len().min(40)];
                assert!(e.message().contains(shown), "{name} {mode:?}: {e}");
            }
        }
        // Names near the reserved ones are fine.
        for name in [
            "x-deaths", "x-trace", "cex", "postbox", "x-first", "X-Trace",
        ] {
            let env = Envelope::builder("t").header(name, "v").build();
            let encoded = encode(&env, HeaderPrefix::CloudEvents, ContentMode::Binary)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(round_trip(&encoded), env, "{name}");
        }
    }

    #[test]
    fn plain_headers_of_received_events_become_envelope_headers() {
        let list = AMQPValue::FieldArray(FieldArray::from(vec![text("a"), AMQPValue::LongInt(1)]));
        let plain: Vec<(&str, AMQPValue)> = vec![
            ("x-trace", text("t-1")),
            ("traceId", AMQPValue::ShortString("abc".into())),
            ("x-n", AMQPValue::ShortInt(-2)),
            ("x-flag", AMQPValue::Boolean(true)),
            ("x-when", AMQPValue::Timestamp(1_700_000_000)),
            ("x-list", list),
            ("x-bytes", AMQPValue::ByteArray(b"utf8".to_vec().into())),
            ("x-void", AMQPValue::Void),
            // Named like an envelope field, or like an attribute the event
            // carries: kept under `amqp:header:`.
            ("id", text("plain id")),
            ("tenant", text("plain tenant")),
            // Set by RabbitMQ or postbox: not envelope metadata.
            ("x-death", AMQPValue::FieldArray(FieldArray::default())),
            ("x-first-death-queue", text("q")),
            ("x-last-death-reason", text("expired")),
            (DELIVERY_COUNT, AMQPValue::LongLongInt(2)),
            (postbox_core::delay::DUE_HEADER, AMQPValue::LongLongInt(1)),
            (TIER_HEADER, text("20ms")),
        ];
        let check = |env: &Envelope, what: &str| {
            let h = &env.headers;
            assert_eq!(h["x-trace"], "t-1", "{what}");
            assert_eq!(h["traceId"], "abc", "{what}");
            assert_eq!(h["x-n"], "-2", "{what}");
            assert_eq!(h["x-flag"], "true", "{what}");
            assert_eq!(h["x-when"], "2023-11-14T22:13:20Z", "{what}");
            assert_eq!(h["x-list"], r#"["a",1]"#, "{what}");
            assert_eq!(h["x-bytes"], "utf8", "{what}");
            assert_eq!(h["x-void"], "", "{what}");
            assert_eq!(h["amqp:header:id"], "plain id", "{what}");
            assert_eq!(h["tenant"], "acme", "{what}");
            assert_eq!(h["amqp:header:tenant"], "plain tenant", "{what}");
            for k in h.keys() {
                assert!(!k.starts_with("x-death"), "{what}: {k}");
                assert!(!k.starts_with("x-first-death"), "{what}: {k}");
                assert!(!k.starts_with("x-last-death"), "{what}: {k}");
                assert!(!k.starts_with("postbox-"), "{what}: {k}");
                assert_ne!(k, DELIVERY_COUNT, "{what}");
            }
            assert_eq!(h.len(), 11, "{what}: {h:?}");
            // Whatever was read can be written again, in both modes.
            for mode in [ContentMode::Binary, ContentMode::Structured] {
                let encoded = encode(env, HeaderPrefix::CloudEvents, mode)
                    .unwrap_or_else(|e| panic!("{what} {mode:?}: {e}"));
                assert_eq!(&round_trip(&encoded), env, "{what} {mode:?}");
            }
        };
        // Binary mode.
        let mut extra = plain.clone();
        extra.push(("cloudEvents:tenant", text("acme")));
        let env = decode(&binary_props(&extra), Bytes::new(), info(), "x").unwrap();
        check(&env, "binary");
        // Structured mode: the headers beside the document; attribute
        // headers there are not read.
        let mut event = Envelope::builder("t")
            .id("e-1")
            .source("/s")
            .header("tenant", "acme")
            .build();
        event.time = None;
        let mut table = FieldTable::default();
        for (k, v) in &plain {
            table.insert((*k).into(), v.clone());
        }
        table.insert("cloudEvents:subject".into(), text("ignored"));
        let props = BasicProperties::default()
            .with_content_type(STRUCTURED_CONTENT_TYPE.into())
            .with_headers(table);
        let body = Bytes::from(structured::encode(&event).unwrap());
        let env = decode(&props, body, info(), "x").unwrap();
        assert_eq!(env.subject, None);
        check(&env, "structured");
    }

    #[test]
    fn a_plain_header_that_is_not_text_is_a_decode_failure_naming_it() {
        let not_utf8 = vec![b'a', 0xff, 0xfe];
        for value in [
            AMQPValue::LongString(LongString::from(not_utf8.clone())),
            AMQPValue::ByteArray(not_utf8.clone().into()),
        ] {
            let props = binary_props(&[("x-bin", value.clone())]);
            let e = decode(&props, Bytes::new(), info(), "x").unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Decode, "{value:?}");
            assert!(e.message().contains("x-bin"), "{e}");
            // Its dead-letter copy carries it base64-encoded, and replay
            // puts it back.
            let env = undecodable_envelope(&props, Bytes::new(), info(), MAX_METADATA_BYTES);
            assert_eq!(
                env.headers["amqp:base64:x-bin"],
                base64::engine::general_purpose::STANDARD.encode(&not_utf8)
            );
            let restored = restore_undecodable(&env).unwrap();
            let headers = restored.properties.headers().as_ref().unwrap().inner();
            assert_eq!(
                headers.get("x-bin"),
                Some(&AMQPValue::LongString(LongString::from(not_utf8.clone())))
            );
        }
    }

    #[test]
    fn transport_headers_count_in_the_metadata_limit() {
        let small = with_transport_headers();
        let mut big = small.clone();
        big.headers
            .insert("x-big".into(), "x".repeat(MAX_METADATA_BYTES));
        assert!(metadata_bytes(&big) > metadata_bytes(&small) + MAX_METADATA_BYTES - 1);
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let e = encode(&big, HeaderPrefix::CloudEvents, mode).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Encode, "{mode:?}");
            assert!(e.message().contains("metadata"), "{e}");
        }
        let props = binary_props(&[("x-big", text(&"x".repeat(MAX_METADATA_BYTES)))]);
        let e = decode(&props, Bytes::new(), info(), "x").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Decode);
        assert!(e.message().contains("metadata"), "{e}");
        let structured = BasicProperties::default()
            .with_content_type(STRUCTURED_CONTENT_TYPE.into())
            .with_headers(props.headers().clone().unwrap());
        let body = Bytes::from(structured::encode(&sample()).unwrap());
        let e = decode(&structured, body, info(), "x").unwrap_err();
        assert!(e.message().contains("metadata"), "{e}");
    }

    #[test]
    fn undecodable_copies_are_valid_cloudevents_and_restore_the_original() {
        // Headers that, carried under their own names, would be written
        // back as CloudEvents attributes or as names the transport reserves.
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("orders"));
        let props = binary_props(&[
            ("cloudEvents:specversion", text("0.3")),
            ("CE-Trace", text("ce-dash")),
            ("cloudEvents_x", text("underscore")),
            ("x-trace", text("t-1")),
            ("tenant", text("acme")),
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            ),
            ("x-first-death-queue", text("orders")),
            ("x-delivery-count", text("3")),
            ("postbox-due", text("123")),
            ("dlqreason", text("a plain header named like metadata")),
        ])
        .with_message_id("m-1".into());
        let body = Bytes::from_static(b"\xffbody");
        let env = undecodable_envelope(&props, body.clone(), info(), MAX_METADATA_BYTES);
        let h = &env.headers;
        assert_eq!(h["amqp:header:cloudEvents:specversion"], "0.3");
        assert_eq!(h["amqp:header:cloudEvents:id"], "e-1");
        assert_eq!(h["amqp:header:CE-Trace"], "ce-dash");
        assert_eq!(h["amqp:header:cloudEvents_x"], "underscore");
        assert_eq!(h["amqp:header:x-death"], r#"[{"queue":"orders"}]"#);
        assert_eq!(h["amqp:header:x-first-death-queue"], "orders");
        assert_eq!(h["amqp:header:x-delivery-count"], "3");
        assert_eq!(h["amqp:header:postbox-due"], "123");
        assert_eq!(
            h["amqp:header:dlqreason"],
            "a plain header named like metadata"
        );
        assert_eq!(h["x-trace"], "t-1");
        assert_eq!(h["tenant"], "acme");
        let mut copy = env.clone();
        postbox_core::DeadLetterMetadata {
            reason: postbox_core::FailureReason::Decode,
            error: "bad specversion".into(),
            error_type: "decode".into(),
            attempts: 1,
            first_failed_at: UNIX_EPOCH,
            last_failed_at: UNIX_EPOCH,
            origin: postbox_core::Origin {
                destination: "q".into(),
                partition: None,
                offset: None,
            },
            consumer: "c".into(),
        }
        .apply(&mut copy);
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let encoded = encode(&copy, HeaderPrefix::CloudEvents, mode)
                .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            let table = encoded.properties.headers().as_ref().unwrap().inner();
            for k in table.keys() {
                let k = k.as_str();
                if let Some(name) = DECODE_PREFIXES
                    .iter()
                    .find_map(|p| binary::strip_prefix(k, p))
                {
                    assert!(
                        postbox_core::codec::is_attribute_name(name),
                        "{mode:?}: {k}"
                    );
                }
                assert!(!k.starts_with("x-death"), "{mode:?}: {k}");
                assert!(!k.starts_with("x-first-death-"), "{mode:?}: {k}");
                assert!(!k.starts_with("x-delivery-count"), "{mode:?}: {k}");
                assert!(!k.starts_with("postbox-"), "{mode:?}: {k}");
            }
            let back = round_trip(&encoded);
            assert_eq!(back, copy, "{mode:?}");
            let original = restore_undecodable(&back).unwrap();
            assert_eq!(original.body, body);
            let headers = original.properties.headers().as_ref().unwrap().inner();
            let mut expected = props.headers().as_ref().unwrap().inner().clone();
            // Values go back as long strings.
            expected.insert("x-death".into(), text(r#"[{"queue":"orders"}]"#));
            assert_eq!(headers, &expected, "{mode:?}");
            assert_eq!(
                original.properties.message_id().as_ref().unwrap().as_str(),
                "m-1"
            );
        }
    }

    #[test]
    fn foreign_messages_carry_their_plain_headers() {
        let mut t = FieldTable::default();
        t.insert("X-Trace".into(), text("f-1"));
        t.insert("retries".into(), AMQPValue::LongInt(3));
        t.insert(
            "raw".into(),
            AMQPValue::ByteArray(vec![0xffu8, 0x00].into()),
        );
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        let props = BasicProperties::default().with_headers(t);
        let env = decode(&props, Bytes::from_static(b"{}"), info(), "legacy").unwrap();
        assert_eq!(env.event_type, "legacy");
        // As Kafka and SQS do: every header but the broker's own, a value
        // that is not text base64-encoded.
        assert_eq!(
            env.headers,
            std::collections::BTreeMap::from([
                ("X-Trace".to_string(), "f-1".to_string()),
                ("amqp:base64:raw".to_string(), "/wA=".to_string()),
                ("retries".to_string(), "3".to_string()),
            ])
        );
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let encoded = encode(&env, HeaderPrefix::CloudEvents, mode).unwrap();
            assert_eq!(round_trip(&encoded), env, "{mode:?}");
        }
    }
}
