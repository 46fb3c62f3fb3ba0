//! Retry-after on Kafka: delay-tier retry topics.
//!
//! Kafka has no per-message delay, so in **unordered** mode a retry is a copy
//! of the message published to a delay-tier topic `<topic>.retry.<tier>`:
//! the tiers are a [`DelayTiers`] set and the copy goes to the tier
//! [`DelayTiers::covering`] the delay (the shortest tier not shorter than
//! it; longer delays use the longest), because the consumer, not the tier,
//! times the copy (`docs/design.md` §4 compares this with RabbitMQ's rule).
//! The copy carries its due time ([`DUE_HEADER`](postbox_core::delay::DUE_HEADER),
//! `postbox-due`: Unix milliseconds, rounded up), its attempt number
//! (`ce_attempt`, the retry metadata of the envelope replaced, never
//! appended) and where it was first consumed (`postbox-origin-*`). The
//! original offset is marked done only after the broker acknowledged the
//! copy (delivery report). Older versions wrote the due time as
//! `postbox-retry-due`; the consumer still reads that name, since their
//! copies may still sit in retry topics, and never writes it.
//!
//! The consumer of `<topic>` also subscribes to its tier topics (same group).
//! A copy that is not due yet **pauses its partition** and is held; when it is
//! due the partition is sought just past it and resumed, and the copy goes to
//! the same handler with `Origin.destination = <topic>`. The poll loop never
//! sleeps, so the group session stays alive and every other partition keeps
//! flowing. Due times and attempts live in the records, so they survive
//! restarts: a new consumer reads the same due time and pauses again.
//!
//! In **ordered** mode (`ProcessingOrder::PerKey` in the runtime) retries happen in
//! place: the message is held unacked, its offset is not committed, and its
//! key's lane waits, so order per key (and per partition) holds.

use std::time::Duration;

use postbox_core::delay::DelayTiers;

/// The retry topic of `origin` for `delay`: the tier topic of the tier
/// [`covering`](DelayTiers::covering) `delay`.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::delay::DelayTiers;
/// use postbox_kafka::retry::retry_topic;
/// let tiers = DelayTiers::coarse(); // KafkaConfig's default
/// assert_eq!(retry_topic("orders", &tiers, Duration::from_millis(300)), "orders.retry.1s");
/// assert_eq!(retry_topic("orders", &tiers, Duration::from_secs(42)), "orders.retry.1m");
/// assert_eq!(retry_topic("orders", &tiers, Duration::from_secs(86_400)), "orders.retry.1h");
/// ```
pub fn retry_topic(origin: &str, tiers: &DelayTiers, delay: Duration) -> String {
    tier_topic(origin, tiers.covering(delay))
}

/// Every retry topic of `origin`, shortest tier first.
pub fn retry_topics(origin: &str, tiers: &DelayTiers) -> Vec<String> {
    tiers
        .durations()
        .iter()
        .map(|t| tier_topic(origin, *t))
        .collect()
}

/// `<origin>.retry.<label>` with labels like `500ms`, `1s`, `10m`, `1h`.
pub fn tier_topic(origin: &str, tier: Duration) -> String {
    format!("{origin}.retry.{}", label(tier))
}

fn label(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The dead-letter topic of `origin`: `<origin>.dlq` (core's default route).
pub fn dlq_topic(origin: &str) -> String {
    postbox_core::dlq::default_destination(origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::time::{SystemTime, UNIX_EPOCH};

    use postbox_core::Envelope;

    use crate::codec::{self, RecordRef, RetryInfo};

    #[test]
    fn tiers_and_labels() {
        let t = DelayTiers::new([Duration::from_millis(250), Duration::from_secs(5)]).unwrap();
        assert_eq!(retry_topics("o", &t), vec!["o.retry.250ms", "o.retry.5s"]);
        assert_eq!(retry_topic("o", &t, Duration::ZERO), "o.retry.250ms");
        assert_eq!(retry_topic("o", &t, Duration::from_secs(6)), "o.retry.5s");
        assert_eq!(tier_topic("o", Duration::from_secs(600)), "o.retry.10m");
        assert_eq!(tier_topic("o", Duration::from_secs(7_200)), "o.retry.2h");
        assert_eq!(dlq_topic("o"), "o.dlq");
    }

    /// Decodes a retry copy whose due time is under `due_header`.
    fn due_read_back(due_header: &str, value: &str) -> Option<SystemTime> {
        let env = Envelope::builder("t").key("k").build();
        let enc = codec::encode(&env, None, postbox_core::ContentMode::Binary).unwrap();
        let mut headers: Vec<(String, Vec<u8>)> = rdkafka::message::Headers::iter(&enc.headers)
            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
            .collect();
        headers.push((due_header.to_string(), value.as_bytes().to_vec()));
        let record = RecordRef {
            topic: "o.retry.1s",
            partition: 0,
            offset: 1,
            key: Some(b"k"),
            payload: None,
        };
        let decoded = codec::decode(
            record,
            || {
                headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.as_slice())))
            },
            &Cow::Borrowed("f"),
        );
        assert_eq!(
            *decoded.envelope, env,
            "the due header stays outside the envelope"
        );
        decoded.retry.due
    }

    #[test]
    fn the_due_time_is_written_as_postbox_due_and_the_old_name_still_read() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(due_read_back("postbox-due", "1700000000123"), Some(at));
        // Copies written by older versions.
        assert_eq!(
            due_read_back("postbox-retry-due", "1700000000123"),
            Some(at)
        );
        assert_eq!(due_read_back("postbox-due", "soon"), None);

        let env = Envelope::new("t", "x");
        let info = RetryInfo {
            due: Some(at),
            origin: None,
        };
        let enc = codec::encode(&env, Some(&info), postbox_core::ContentMode::Binary).unwrap();
        let names: Vec<&str> = rdkafka::message::Headers::iter(&enc.headers)
            .map(|h| h.key)
            .collect();
        assert!(
            names.contains(&postbox_core::delay::DUE_HEADER),
            "{names:?}"
        );
        assert!(!names.contains(&"postbox-retry-due"), "{names:?}");
    }
}
