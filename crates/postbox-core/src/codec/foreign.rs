//! Envelopes for messages that postbox did not produce.
//!
//! A message with no CloudEvents attributes is still consumable: the adapter
//! describes what the broker gave it in a [`Foreign`] (an id from the broker's
//! message id or topic/partition/offset, a configured default type) and gets an
//! envelope whose payload is the raw body.

use std::borrow::Cow;

use bytes::Bytes;

use super::structured;
use crate::envelope::{Envelope, MessageId, Text, JSON};
use crate::error::Error;

/// The default `type` of foreign messages.
pub const DEFAULT_FOREIGN_TYPE: &str = "postbox.foreign";

/// What the adapter knows about a foreign message.
#[derive(Debug, Clone)]
pub struct Foreign {
    /// Id from the broker (message id, or `topic/partition/offset`).
    pub id: MessageId,
    /// The type to give it (configurable per consumer).
    pub event_type: Text,
    /// The source to give it, usually the origin queue or topic.
    pub source: Text,
    /// The content type, when the broker carried one.
    pub content_type: Option<Text>,
}

impl Foreign {
    /// Foreign-message facts with the default type and the given source.
    pub fn new(id: impl Into<MessageId>, source: impl Into<Text>) -> Self {
        Foreign {
            id: id.into(),
            event_type: Cow::Borrowed(DEFAULT_FOREIGN_TYPE),
            source: source.into(),
            content_type: None,
        }
    }
}

/// An envelope around a raw body.
///
/// ```
/// use postbox_core::codec::foreign::{envelope, Foreign};
/// let env = envelope(Foreign::new("orders/0/42", "orders"), "raw body");
/// assert_eq!(env.id.as_str(), "orders/0/42");
/// assert_eq!(env.event_type, "postbox.foreign");
/// assert_eq!(&env.payload[..], b"raw body");
/// ```
pub fn envelope(foreign: Foreign, payload: impl Into<Bytes>) -> Envelope {
    let mut env = Envelope::new(foreign.event_type, payload);
    env.id = foreign.id;
    env.source = foreign.source;
    env.time = None;
    env.content_type = foreign.content_type.unwrap_or(Cow::Borrowed(JSON));
    env
}

/// Decodes a body that is either a structured CloudEvent or a foreign message.
///
/// A JSON object with `specversion` is decoded strictly (a broken CloudEvent is
/// an error); anything else becomes a foreign envelope built by `foreign`.
pub fn structured_or_foreign(
    body: Bytes,
    foreign: impl FnOnce() -> Foreign,
) -> Result<Envelope, Error> {
    if structured::looks_like_cloudevent(&body) {
        structured::decode(&body)
    } else {
        Ok(envelope(foreign(), body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_json_is_foreign_not_an_error() {
        let env = structured_or_foreign(Bytes::from_static(br#"{"order":1}"#), || {
            Foreign::new("m-1", "orders")
        })
        .unwrap();
        assert_eq!(env.id.as_str(), "m-1");
        assert_eq!(&env.payload[..], br#"{"order":1}"#);
    }

    #[test]
    fn broken_cloudevent_is_an_error() {
        let body = Bytes::from_static(br#"{"specversion":"1.0","id":"1"}"#);
        assert!(structured_or_foreign(body, || Foreign::new("m", "q")).is_err());
    }
}
