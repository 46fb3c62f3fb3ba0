//! Retry-after on Kafka: delay-tier retry topics.
//!
//! Kafka has no per-message delay, so in **unordered** mode a retry is a copy
//! of the message published to a delay-tier topic `<topic>.retry.<tier>`
//! (the smallest tier not shorter than the delay; longer delays use the
//! last tier). The copy carries its due time (`postbox-retry-due`, epoch
//! milliseconds), its attempt number (`ce_attempt`, the retry metadata of the
//! envelope replaced, never appended) and where it was first consumed
//! (`postbox-origin-*`). The original offset is marked done only after the
//! broker acknowledged the copy (delivery report).
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

/// The delay tiers of the retry topics.
///
/// ```
/// use std::time::Duration;
/// use postbox_kafka::RetryTiers;
/// let tiers = RetryTiers::default();
/// assert_eq!(tiers.topic_for("orders", Duration::from_millis(300)), "orders.retry.1s");
/// assert_eq!(tiers.topic_for("orders", Duration::from_secs(42)), "orders.retry.1m");
/// assert_eq!(tiers.topic_for("orders", Duration::from_secs(86_400)), "orders.retry.1h");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTiers {
    tiers: Vec<Duration>,
}

impl Default for RetryTiers {
    /// 1 s, 10 s, 1 min, 10 min, 1 h.
    fn default() -> Self {
        RetryTiers::new([1, 10, 60, 600, 3600].map(Duration::from_secs))
    }
}

impl RetryTiers {
    /// Tiers of the given durations (sorted, duplicates removed; none means
    /// the default set).
    pub fn new(tiers: impl IntoIterator<Item = Duration>) -> Self {
        let mut tiers: Vec<Duration> = tiers.into_iter().filter(|d| !d.is_zero()).collect();
        tiers.sort();
        tiers.dedup();
        if tiers.is_empty() {
            return RetryTiers::default();
        }
        RetryTiers { tiers }
    }

    /// The tier durations, shortest first.
    pub fn durations(&self) -> &[Duration] {
        &self.tiers
    }

    /// The tier serving `delay`: the shortest one not shorter than it, or the
    /// longest.
    pub fn tier_for(&self, delay: Duration) -> Duration {
        self.tiers
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .unwrap_or(self.tiers[self.tiers.len() - 1])
    }

    /// The retry topic of `origin` for `delay`.
    pub fn topic_for(&self, origin: &str, delay: Duration) -> String {
        tier_topic(origin, self.tier_for(delay))
    }

    /// Every retry topic of `origin`.
    pub fn topics(&self, origin: &str) -> Vec<String> {
        self.tiers.iter().map(|t| tier_topic(origin, *t)).collect()
    }
}

/// `<origin>.retry.<label>` with labels like `500ms`, `1s`, `10m`, `1h`.
pub fn tier_topic(origin: &str, tier: Duration) -> String {
    format!("{origin}.retry.{}", label(tier))
}

fn label(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
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

    #[test]
    fn tiers_and_labels() {
        let t = RetryTiers::new([Duration::from_millis(250), Duration::from_secs(5)]);
        assert_eq!(t.topics("o"), vec!["o.retry.250ms", "o.retry.5s"]);
        assert_eq!(t.tier_for(Duration::ZERO), Duration::from_millis(250));
        assert_eq!(t.tier_for(Duration::from_secs(6)), Duration::from_secs(5));
        assert_eq!(RetryTiers::new([]), RetryTiers::default());
        assert_eq!(dlq_topic("o"), "o.dlq");
    }
}
