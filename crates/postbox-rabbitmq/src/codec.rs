//! The envelope on the wire: AMQP 0-9-1 binary content mode.
//!
//! * CloudEvents attributes and user headers go into the headers table as
//!   long strings, prefixed `cloudEvents:` (configurable: `cloudEvents_`,
//!   `ce-`); decoding accepts all three prefixes, case-insensitively.
//! * The native properties are filled too: `message_id` = id, `type` = type,
//!   `app_id` = source, `timestamp` = time (seconds), `content_type`,
//!   `correlation_id`, `delivery_mode` = 2 (persistent).
//! * The payload is the body, byte for byte.
//! * A **foreign** message (no CloudEvents header) gets a synthesized
//!   envelope: id = the `message_id` property, or else `amqp-<hash>` — a
//!   64-bit FNV-1a hash of exchange, routing key, `timestamp`, `correlation_id`
//!   and body, which is stable across redeliveries of one message (two
//!   byte-identical messages without `message_id`/`timestamp` share it);
//!   type = the `type` property or the configured default; source = `app_id` or
//!   `rabbitmq:<queue>`; content type = `content_type` or JSON.
//!
//! Destinations (see [`route`]): `orders` is the queue `orders` (through the
//! default exchange); `queue:orders` is the same; `exchange:events` is the
//! exchange `events` with the envelope's key (or `""`) as routing key;
//! `exchange:events/order.placed.eu` gives the routing key explicitly.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use postbox_core::codec::{binary, foreign};
use postbox_core::{Envelope, Error, ErrorKind, MessageId};

use crate::config::HeaderPrefix;

/// The prefixes accepted when decoding, in order.
pub(crate) const DECODE_PREFIXES: [&str; 3] = ["cloudEvents:", "cloudEvents_", "ce-"];

/// Header carrying when a delayed retry copy is due (Unix milliseconds).
pub(crate) const DUE_HEADER: &str = "postbox-due";
/// Header the delay exchange routes on to pick a tier queue.
pub(crate) const TIER_HEADER: &str = "postbox-delay-tier";
/// Header quorum queues set on redeliveries.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";

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

/// Encodes the envelope's metadata as AMQP properties + headers (the body is `env.payload`).
pub(crate) fn encode(env: &Envelope, prefix: HeaderPrefix) -> Result<BasicProperties, Error> {
    let headers = encode_headers(env, prefix)?;
    Ok(properties(env, headers))
}

/// The headers table of an envelope (CloudEvents attributes and user headers).
pub(crate) fn encode_headers(env: &Envelope, prefix: HeaderPrefix) -> Result<FieldTable, Error> {
    let attrs = binary::encode(env)?;
    let mut table = FieldTable::default();
    let p = prefix.as_str();
    for (name, value) in attrs {
        let key = short("header name", &format!("{p}{name}"))?;
        table.insert(key, AMQPValue::LongString(LongString::from(value)));
    }
    Ok(table)
}

fn properties(env: &Envelope, headers: FieldTable) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Ok(id) = ShortString::try_new(env.id.as_str()) {
        props = props.with_message_id(id);
    }
    if let Ok(t) = ShortString::try_new(env.event_type.as_ref()) {
        props = props.with_type(t);
    }
    if let Ok(s) = ShortString::try_new(env.source.as_ref()) {
        props = props.with_app_id(s);
    }
    if let Ok(ct) = ShortString::try_new(env.content_type.as_ref()) {
        props = props.with_content_type(ct);
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

/// A header value as text (strings, numbers, booleans, timestamps); `None` for tables/arrays.
pub(crate) fn value_text(v: &AMQPValue) -> Option<Cow<'_, str>> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()),
        AMQPValue::ShortString(s) => Cow::Borrowed(s.as_str()),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()),
        AMQPValue::Boolean(b) => Cow::Owned(b.to_string()),
        AMQPValue::ShortShortInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::ShortShortUInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::ShortInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::ShortUInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::LongInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::LongUInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::LongLongInt(n) => Cow::Owned(n.to_string()),
        AMQPValue::Timestamp(n) => Cow::Owned(n.to_string()),
        AMQPValue::Float(n) => Cow::Owned(n.to_string()),
        AMQPValue::Double(n) => Cow::Owned(n.to_string()),
        _ => return None,
    })
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
        other => value_text(other)?.trim().parse().ok(),
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

/// Decodes a received message. Messages without CloudEvents headers are foreign
/// and get a synthesized envelope; malformed CloudEvents headers are a `Decode` error.
pub(crate) fn decode(
    props: &BasicProperties,
    body: Bytes,
    info: WireInfo<'_>,
    foreign_type: &str,
) -> Result<Envelope, Error> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    if let Some(headers) = props.headers() {
        for (k, v) in headers.inner() {
            let name = DECODE_PREFIXES
                .iter()
                .find_map(|p| binary::strip_prefix(k.as_str(), p));
            if let Some(name) = name {
                if let Some(text) = value_text(v) {
                    attrs.push((name.to_string(), text.into_owned()));
                }
            }
        }
    }
    if attrs.is_empty() {
        return Ok(foreign_envelope(props, body, info, foreign_type));
    }
    binary::decode(attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())), body)
}

/// The envelope of a message postbox did not produce (see the module docs).
pub(crate) fn foreign_envelope(
    props: &BasicProperties,
    body: Bytes,
    info: WireInfo<'_>,
    foreign_type: &str,
) -> Envelope {
    let id = match props.message_id() {
        Some(id) if !id.as_str().is_empty() => MessageId::from(id.as_str()),
        _ => MessageId::from(content_id(props, &body, info)),
    };
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
    let mut f = foreign::Foreign::new(id, source);
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

/// When a delayed copy is due, from its [`DUE_HEADER`].
pub(crate) fn due_of(props: &BasicProperties) -> Option<SystemTime> {
    header_u64(props, DUE_HEADER).map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Unix milliseconds of a time (0 before the epoch).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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

    #[test]
    fn round_trip_with_every_prefix() {
        for prefix in [
            HeaderPrefix::CloudEvents,
            HeaderPrefix::CloudEventsUnderscore,
            HeaderPrefix::Ce,
        ] {
            let env = sample();
            let props = encode(&env, prefix).unwrap();
            let back = decode(&props, env.payload.clone(), info(), "x").unwrap();
            assert_eq!(back.id, env.id);
            assert_eq!(back.event_type, env.event_type);
            assert_eq!(back.source, env.source);
            assert_eq!(back.key, env.key);
            assert_eq!(back.headers, env.headers);
            assert_eq!(back.payload, env.payload);
            assert_eq!(back.time, env.time);
            assert_eq!(back.subject, env.subject);
            assert_eq!(back.schema_version, env.schema_version);
        }
    }

    #[test]
    fn native_properties_are_filled() {
        let env = sample();
        let props = encode(&env, HeaderPrefix::CloudEvents).unwrap();
        assert_eq!(
            props.message_id().as_ref().unwrap().as_str(),
            env.id.as_str()
        );
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "order.placed");
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/octet-stream"
        );
        assert!(props.timestamp().is_some());
        let h = props.headers().as_ref().unwrap();
        assert!(h.contains_key("cloudEvents:id"));
        assert!(h.contains_key("cloudEvents:tenant"));
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
        let c = decode(&with_id, body, info(), "legacy.event").unwrap();
        assert_eq!(c.id.as_str(), "m-7");
        assert_eq!(c.event_type, "t");
    }

    #[test]
    fn malformed_cloudevents_headers_are_decode_errors() {
        let mut table = FieldTable::default();
        table.insert("ce-specversion".into(), AMQPValue::LongString("1.0".into()));
        table.insert("ce-id".into(), AMQPValue::LongString("1".into()));
        let props = BasicProperties::default().with_headers(table);
        let e = decode(&props, Bytes::new(), info(), "x").unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Decode);
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
        assert_eq!(
            encode(&env, HeaderPrefix::CloudEvents).unwrap_err().kind(),
            &ErrorKind::Encode
        );
    }
}
