//! Binary content mode: the envelope's metadata as an attribute map.
//!
//! [`encode`] yields `(attribute name, value)` pairs without any prefix; each
//! adapter writes them as headers with its broker's prefix (`ce_` for Kafka,
//! `cloudEvents:` for AMQP) and the payload as the body. [`decode`] takes the
//! pairs back (prefix already stripped, see [`strip_prefix`]).

use std::borrow::Cow;

use bytes::Bytes;

use super::{
    attr, check_encodable, decode_error, format_time, is_attribute_name, parse_attempt, parse_time,
    SPEC_VERSION,
};
use crate::envelope::{Envelope, MessageId};
use crate::error::Error;

/// One attribute: its CloudEvents name and its value as text.
pub type Attribute = (Cow<'static, str>, String);

/// The envelope's attributes, `specversion` first, user headers last —
/// those whose name is a valid attribute name; the others are transport
/// metadata ([`transport_headers`](super::transport_headers)).
///
/// ```
/// use postbox_core::{codec::binary, Envelope};
/// let env = Envelope::builder("order.placed").key("c-7").header("tenant", "acme").build();
/// let attrs = binary::encode(&env).unwrap();
/// assert!(attrs.iter().any(|(k, v)| k == "partitionkey" && v == "c-7"));
/// let back = binary::decode(attrs.iter().map(|(k, v)| (k.as_ref(), v.as_str())), env.payload.clone()).unwrap();
/// assert_eq!(back, env);
/// ```
pub fn encode(env: &Envelope) -> Result<Vec<Attribute>, Error> {
    check_encodable(env)?;
    let mut out: Vec<Attribute> = Vec::with_capacity(8 + env.headers.len());
    let mut push = |name: &'static str, value: String| out.push((Cow::Borrowed(name), value));
    push(attr::SPECVERSION, SPEC_VERSION.to_string());
    push(attr::ID, env.id.as_str().to_string());
    push(attr::TYPE, env.event_type.to_string());
    push(attr::SOURCE, env.source.to_string());
    if let Some(t) = env.time {
        push(attr::TIME, format_time(t)?);
    }
    push(attr::DATACONTENTTYPE, env.content_type.to_string());
    for (name, value) in optional_attributes(env) {
        if let Some(v) = value {
            push(name, v.to_string());
        }
    }
    push(attr::ATTEMPT, env.attempt.to_string());
    // Headers that are not valid attribute names are transport metadata
    // (`codec::transport_headers`): the adapter writes them unprefixed.
    for (k, v) in env.headers.iter().filter(|(k, _)| is_attribute_name(k)) {
        out.push((Cow::Owned(k.clone()), v.clone()));
    }
    Ok(out)
}

/// Strips `prefix` from a header name, ASCII case-insensitively; `None` if absent.
///
/// ```
/// use postbox_core::codec::binary::strip_prefix;
/// assert_eq!(strip_prefix("ce_type", "ce_"), Some("type"));
/// assert_eq!(strip_prefix("cloudEvents:id", "cloudevents:"), Some("id"));
/// assert_eq!(strip_prefix("content-type", "ce_"), None);
/// ```
#[inline]
pub fn strip_prefix<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    // The exact spelling first: it is what every binding writes.
    if let Some(rest) = name.strip_prefix(prefix) {
        return Some(rest);
    }
    if name.len() >= prefix.len()
        && name.is_char_boundary(prefix.len())
        && name[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&name[prefix.len()..])
    } else {
        None
    }
}

/// Rebuilds an envelope from attributes and a payload.
///
/// `specversion`, `id`, `type` and `source` are required; unknown attributes
/// become user headers. Errors are [`ErrorKind::Decode`](crate::ErrorKind::Decode).
/// `type`, `source`, `datacontenttype` and `dataversion` come back borrowed
/// from a bounded process-wide intern table (at most 1024 distinct values of
/// at most 128 bytes; others are owned), since a consumer sees the same few
/// values over and over.
pub fn decode<'a>(
    attrs: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload: Bytes,
) -> Result<Envelope, Error> {
    let mut env = blank(payload);
    fill(&mut env, attrs)?;
    Ok(env)
}

/// [`decode`] into a new box: for a consumer that keeps its envelopes boxed,
/// so that the envelope is written once in place instead of being built and
/// then moved (it is a few hundred bytes).
///
/// ```
/// use postbox_core::codec::binary;
/// let attrs = [("specversion", "1.0"), ("id", "1"), ("type", "order.placed"), ("source", "shop")];
/// let env = binary::decode_boxed(attrs, bytes::Bytes::from_static(b"{}")).unwrap();
/// assert_eq!(env.event_type, "order.placed");
/// ```
pub fn decode_boxed<'a>(
    attrs: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload: Bytes,
) -> Result<Box<Envelope>, Error> {
    let mut env = Box::new(blank(payload));
    fill(&mut env, attrs)?;
    Ok(env)
}

/// The attributes of one message, borrowed from its headers, one slot per
/// CloudEvents attribute: what an adapter's walk over the headers fills in a
/// single pass (a slot by its name where it knows it, [`Attributes::set`]
/// otherwise), without a list of pairs in between, and
/// [`Attributes::decode_boxed`] turns into an envelope (the same rules as
/// [`decode`]). A repeated attribute keeps its last value.
///
/// ```
/// use postbox_core::codec::binary::Attributes;
/// let mut a = Attributes::default();
/// a.specversion = Some("1.0");
/// a.id = Some("1");
/// a.set("type", "order.placed");
/// a.set("source", "shop");
/// a.set("tenant", "acme"); // not an attribute: a user header
/// let env = a.decode_boxed(bytes::Bytes::new()).unwrap();
/// assert_eq!(env.headers["tenant"], "acme");
/// ```
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Attributes<'a> {
    /// `specversion`.
    pub specversion: Option<&'a str>,
    /// `id`.
    pub id: Option<&'a str>,
    /// `type`.
    pub event_type: Option<&'a str>,
    /// `source`.
    pub source: Option<&'a str>,
    /// `time`.
    pub time: Option<&'a str>,
    /// `datacontenttype`.
    pub datacontenttype: Option<&'a str>,
    /// `subject`.
    pub subject: Option<&'a str>,
    /// `dataversion`.
    pub dataversion: Option<&'a str>,
    /// `correlationid`.
    pub correlationid: Option<&'a str>,
    /// `causationid`.
    pub causationid: Option<&'a str>,
    /// `partitionkey`.
    pub partitionkey: Option<&'a str>,
    /// `traceparent`.
    pub traceparent: Option<&'a str>,
    /// `tracestate`.
    pub tracestate: Option<&'a str>,
    /// `attempt`.
    pub attempt: Option<&'a str>,
    /// Anything else: user headers.
    pub extensions: Vec<(&'a str, &'a str)>,
}

impl<'a> Attributes<'a> {
    /// Sets the attribute `name` (prefix already stripped); a name that is
    /// not an envelope attribute is a user header.
    #[inline]
    pub fn set(&mut self, name: &'a str, value: &'a str) {
        let slot = match name {
            attr::SPECVERSION => &mut self.specversion,
            attr::ID => &mut self.id,
            attr::TYPE => &mut self.event_type,
            attr::SOURCE => &mut self.source,
            attr::TIME => &mut self.time,
            attr::DATACONTENTTYPE => &mut self.datacontenttype,
            attr::SUBJECT => &mut self.subject,
            attr::DATAVERSION => &mut self.dataversion,
            attr::CORRELATIONID => &mut self.correlationid,
            attr::CAUSATIONID => &mut self.causationid,
            attr::PARTITIONKEY => &mut self.partitionkey,
            attr::TRACEPARENT => &mut self.traceparent,
            attr::TRACESTATE => &mut self.tracestate,
            attr::ATTEMPT => &mut self.attempt,
            _ => {
                self.extensions.push((name, value));
                return;
            }
        };
        *slot = Some(value);
    }

    /// The envelope, in a new box (written in place, see [`decode_boxed`]).
    pub fn decode_boxed(&self, payload: Bytes) -> Result<Box<Envelope>, Error> {
        let mut env = Box::new(blank(payload));
        self.apply(&mut env)?;
        Ok(env)
    }

    /// Sets the attributes on a [`blank`] envelope, in place.
    fn apply(&self, env: &mut Envelope) -> Result<(), Error> {
        match self.specversion {
            Some(SPEC_VERSION) => {}
            Some(other) => {
                return Err(decode_error(format!(
                    "unsupported CloudEvents specversion {other:?}"
                )))
            }
            None => return Err(decode_error("required attribute `specversion` is missing")),
        }
        let nonempty = |v: Option<&'a str>, name: &str| -> Result<&'a str, Error> {
            match v {
                Some(s) if !s.is_empty() => Ok(s),
                Some(_) => Err(decode_error(format!(
                    "required attribute `{name}` is empty"
                ))),
                None => Err(decode_error(format!(
                    "required attribute `{name}` is missing"
                ))),
            }
        };
        let id = nonempty(self.id, attr::ID)?;
        let ty = nonempty(self.event_type, attr::TYPE)?;
        let source = nonempty(self.source, attr::SOURCE)?;
        if let Some(t) = self.time {
            env.time = Some(parse_time(t)?);
        }
        if let Some(a) = self.attempt {
            env.attempt = parse_attempt(a)?;
        }
        match self.datacontenttype {
            None => {}
            Some(crate::envelope::JSON) => {
                env.content_type = Cow::Borrowed(crate::envelope::JSON);
            }
            Some(ct) => env.content_type = super::intern(ct),
        }
        // Only what is there is written: the rest stays as `blank` left it.
        let optional = [
            (self.subject, &mut env.subject),
            (self.correlationid, &mut env.correlation_id),
            (self.causationid, &mut env.causation_id),
            (self.partitionkey, &mut env.key),
            (self.traceparent, &mut env.traceparent),
            (self.tracestate, &mut env.tracestate),
        ];
        for (value, field) in optional {
            if let Some(v) = value {
                *field = Some(v.to_string());
            }
        }
        if let Some(v) = self.dataversion {
            env.schema_version = Some(super::intern(v));
        }
        for (name, value) in &self.extensions {
            env.headers.insert(name.to_string(), value.to_string());
        }
        env.id = MessageId::from(id);
        // Few distinct values, decoded over and over: interned (bounded), so the
        // envelope borrows them instead of allocating two strings per message.
        env.event_type = super::intern(ty);
        env.source = super::intern(source);
        Ok(())
    }
}

/// Sets `(name, value)` pairs on a [`blank`] envelope, in place.
fn fill<'a>(
    env: &mut Envelope,
    attrs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), Error> {
    let mut a = Attributes::default();
    for (name, value) in attrs {
        a.set(name, value);
    }
    a.apply(env)
}

/// What [`Attributes::apply`] starts from: no id, type or source yet (they
/// are required, so it sets them or fails), everything optional unset.
/// An envelope with every field unset, for decoders to fill (no id or
/// time is generated, unlike `Envelope::new`).
pub(super) fn blank(payload: Bytes) -> Envelope {
    Envelope {
        id: MessageId::NIL,
        event_type: Cow::Borrowed(""),
        source: Cow::Borrowed(""),
        time: None,
        schema_version: None,
        content_type: Cow::Borrowed(crate::envelope::JSON),
        subject: None,
        correlation_id: None,
        causation_id: None,
        key: None,
        traceparent: None,
        tracestate: None,
        attempt: 1,
        headers: Default::default(),
        payload,
    }
}

/// The optional string attributes of `env` by CloudEvents name (subject,
/// dataversion, correlation and causation id, partition key, trace context),
/// each `None` when unset: one list for every encoder and size estimate.
pub fn optional_attributes(env: &Envelope) -> [(&'static str, Option<&str>); 7] {
    [
        (attr::SUBJECT, env.subject.as_deref()),
        (attr::DATAVERSION, env.schema_version.as_deref()),
        (attr::CORRELATIONID, env.correlation_id.as_deref()),
        (attr::CAUSATIONID, env.causation_id.as_deref()),
        (attr::PARTITIONKEY, env.key.as_deref()),
        (attr::TRACEPARENT, env.traceparent.as_deref()),
        (attr::TRACESTATE, env.tracestate.as_deref()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn missing_required_attribute_is_named() {
        let err = decode(
            [("specversion", "1.0"), ("id", "1"), ("type", "t")],
            Bytes::new(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Decode);
        assert!(err.message().contains("`source`"));
    }

    #[test]
    fn boxed_decode_is_the_same_decode() {
        let env = Envelope::builder("order.placed")
            .key("k")
            .subject("s")
            .header("tenant", "t1")
            .payload(Bytes::from_static(b"{}"))
            .build();
        let attrs = encode(&env).unwrap();
        let pairs = || attrs.iter().map(|(k, v)| (k.as_ref(), v.as_ref()));
        let boxed = decode_boxed(pairs(), env.payload.clone()).unwrap();
        assert_eq!(*boxed, decode(pairs(), env.payload.clone()).unwrap());
        assert_eq!(*boxed, env);
        let broken = [("specversion", "1.0"), ("id", "1"), ("type", "t")];
        assert_eq!(
            decode_boxed(broken, Bytes::new()).unwrap_err().kind(),
            &ErrorKind::Decode
        );
    }

    #[test]
    fn bad_attempt_is_a_decode_error() {
        let attrs = [
            ("specversion", "1.0"),
            ("id", "1"),
            ("type", "t"),
            ("source", "s"),
            ("attempt", "-1"),
        ];
        assert_eq!(
            decode(attrs, Bytes::new()).unwrap_err().kind(),
            &ErrorKind::Decode
        );
    }
}
