//! Delay tiers and the due-time header: how brokers without a per-message
//! delay (Kafka, RabbitMQ) make a message wait (`docs/design.md` §4).
//!
//! A broker like that keeps a fixed set of **tiers**, one waiting place per
//! duration (a retry topic on Kafka, a TTL queue on RabbitMQ), and a delayed
//! copy carries its **due time** in the [`DUE_HEADER`] transport header. The
//! tier set is one type, [`DelayTiers`], cleaned and validated once; the due
//! time has one encoding, Unix milliseconds rounded up ([`due_to_millis`],
//! [`due_from_millis`], [`format_due`], [`parse_due`]).
//!
//! Which tier a delay goes to depends on how the broker's tier holds a
//! message, so there are two rules, side by side:
//!
//! * [`DelayTiers::covering`] — the **shortest tier not shorter than the
//!   delay** (the longest when none is). For brokers whose consumer waits
//!   until the copy is due (Kafka: a copy that is not due pauses its retry
//!   partition until it is). The consumer times the copy, so one tier serves
//!   the whole delay and no copy needs a second hop; the tier only groups
//!   copies. A partition is read in order, so a copy can be held behind an
//!   earlier one that is due later; in the covering tier every copy was
//!   written no earlier and with a delay of at most that tier, which bounds
//!   that wait by the tier (and names it: what waits in the 10 s tier is due
//!   within 10 s of being written, up to the longest tier).
//! * [`DelayTiers::hop`] — the **longest tier not longer than the delay**
//!   (the shortest when none is), then hop again for the rest. For TTL queues
//!   that hold every message for their whole TTL (RabbitMQ: a tier queue
//!   dead-letters a copy back to its origin only when the TTL expires, and
//!   the consumer there re-delays what is not due yet). A tier longer than
//!   the delay would deliver late, so the copy takes the longest tier that
//!   fits and hops until the rest is shorter than the adapter's slack.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use postbox_core::delay::{self, DelayTiers};
//!
//! let tiers = DelayTiers::new([1, 10, 60].map(Duration::from_secs))?;
//! let ask = Duration::from_secs(4);
//! assert_eq!(tiers.covering(ask), Duration::from_secs(10)); // wait in 10 s, consumer holds until due
//! assert_eq!(tiers.hop(ask), Duration::from_secs(1)); // TTL 1 s, then hop again
//!
//! // The due time a copy carries, and what a reader gets back.
//! let due = SystemTime::now() + ask;
//! let header = delay::format_due(due);
//! let back = delay::parse_due(&header).unwrap();
//! assert!(back >= due, "never due before the time asked for");
//! assert!(back.duration_since(due).unwrap() < Duration::from_millis(1));
//! # Ok::<(), postbox_core::Error>(())
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Error, ErrorKind};

/// The transport header a delayed copy carries its due time in: Unix
/// milliseconds, rounded up ([`due_to_millis`]). A broker header outside the
/// CloudEvents attribute set (not `ce_`/`cloudEvents:` prefixed), so it never
/// becomes part of the envelope.
pub const DUE_HEADER: &str = "postbox-due";

/// The default tiers in milliseconds: a 1-2-5 series from 20 ms to 1 h.
const SERIES_MS: [u64; 18] = [
    20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 120_000, 300_000,
    600_000, 1_200_000, 1_800_000, 3_600_000,
];

/// The coarse tiers in milliseconds: 1 s, 10 s, 1 min, 10 min, 1 h.
const COARSE_MS: [u64; 5] = [1_000, 10_000, 60_000, 600_000, 3_600_000];

/// A set of delay tiers: non-empty, whole milliseconds, sorted, no
/// duplicates. See the [module docs](self) for the two ways a delay picks a
/// tier.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::delay::DelayTiers;
/// use postbox_core::ErrorKind;
///
/// let ms = Duration::from_millis;
/// let tiers = DelayTiers::new([ms(500), ms(100), Duration::ZERO, ms(100)])?;
/// assert_eq!(tiers.durations(), &[ms(100), ms(500)]);
/// assert_eq!(DelayTiers::new([]).unwrap_err().kind(), &ErrorKind::Config);
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DelayTiers {
    tiers: Vec<Duration>,
}

impl DelayTiers {
    /// The tiers of `durations`, cleaned: zero durations dropped, a
    /// sub-millisecond part rounded up to the next millisecond (brokers name
    /// and time tiers in whole milliseconds, and a tier must hold at least
    /// what it says), sorted, duplicates removed.
    ///
    /// An [`ErrorKind::Config`] error when nothing is left (its only
    /// error): a broker that delays through tiers needs at least one.
    pub fn new(durations: impl IntoIterator<Item = Duration>) -> Result<Self, Error> {
        let mut tiers: Vec<Duration> = durations
            .into_iter()
            .filter(|d| !d.is_zero())
            .map(whole_millis)
            .collect();
        tiers.sort_unstable();
        tiers.dedup();
        if tiers.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "no delay tiers: give at least one non-zero duration",
            ));
        }
        Ok(DelayTiers { tiers })
    }

    /// The coarse set: 1 s, 10 s, 1 min, 10 min, 1 h. Kafka's default,
    /// where every tier is a retry topic (with partitions) per subscribed
    /// topic; a subset of the [default](DelayTiers::default) series.
    pub fn coarse() -> Self {
        from_ms(&COARSE_MS)
    }

    /// The tier durations, shortest first.
    pub fn durations(&self) -> &[Duration] {
        &self.tiers
    }

    /// The shortest tier.
    pub fn shortest(&self) -> Duration {
        self.tiers[0]
    }

    /// The longest tier.
    pub fn longest(&self) -> Duration {
        self.tiers[self.tiers.len() - 1]
    }

    /// The shortest tier not shorter than `delay`, or the longest tier when
    /// `delay` is longer than every tier.
    ///
    /// For brokers whose consumer holds a copy until it is due (Kafka's
    /// retry topics): the copy waits the whole delay in one tier, and the
    /// tier's consumer, not the tier, decides when it is delivered. Every
    /// copy in a tier asked for at most that tier (up to the longest), which
    /// bounds how long a copy is held behind an earlier one due later.
    pub fn covering(&self, delay: Duration) -> Duration {
        self.tiers
            .iter()
            .copied()
            .find(|t| *t >= delay)
            .unwrap_or_else(|| self.longest())
    }

    /// The longest tier not longer than `delay`, or the shortest tier when
    /// `delay` is shorter than every tier: one hop of a chain.
    ///
    /// For TTL queues, which hold every copy for their whole TTL (RabbitMQ's
    /// tier queues): a longer tier would deliver late, so the copy waits in
    /// the longest tier that fits, comes back early, and is delayed again by
    /// the rest (`hop(rest)`) until it is due. Only a delay shorter than every
    /// tier overshoots, by less than the shortest tier.
    pub fn hop(&self, delay: Duration) -> Duration {
        self.tiers
            .iter()
            .rev()
            .copied()
            .find(|t| *t <= delay)
            .unwrap_or_else(|| self.shortest())
    }
}

impl Default for DelayTiers {
    /// A 1-2-5 series from 20 ms to 1 h (18 tiers): RabbitMQ's default,
    /// where a delay is a chain of hops and at most about three hops serve a
    /// decade.
    fn default() -> Self {
        from_ms(&SERIES_MS)
    }
}

/// A built-in set (already sorted, unique, non-empty).
fn from_ms(ms: &[u64]) -> DelayTiers {
    DelayTiers {
        tiers: ms.iter().map(|&m| Duration::from_millis(m)).collect(),
    }
}

/// `d` rounded up to a whole number of milliseconds (down only at the very
/// end of `Duration`'s range).
fn whole_millis(d: Duration) -> Duration {
    let rest = d.subsec_nanos() % 1_000_000;
    if rest == 0 {
        return d;
    }
    d.checked_add(Duration::from_nanos(u64::from(1_000_000 - rest)))
        .unwrap_or_else(|| d - Duration::from_nanos(u64::from(rest)))
}

/// The encoding of a due time: Unix milliseconds, **rounded up**, so a copy
/// read back is never due before the time asked for. A time before the epoch
/// is 0; one beyond `u64` milliseconds saturates.
pub fn due_to_millis(due: SystemTime) -> u64 {
    let since = due.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = since.as_millis() + u128::from(!since.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The due time of an encoded value ([`due_to_millis`]); `None` when the
/// platform's clock cannot represent it.
pub fn due_from_millis(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The text form of [`DUE_HEADER`] for brokers whose headers are bytes
/// (Kafka): the decimal [`due_to_millis`].
pub fn format_due(due: SystemTime) -> String {
    due_to_millis(due).to_string()
}

/// Parses the text form of [`DUE_HEADER`] ([`format_due`]; surrounding
/// whitespace allowed); `None` for anything else.
pub fn parse_due(text: &str) -> Option<SystemTime> {
    text.trim().parse().ok().and_then(due_from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn cleaning_sorts_dedups_drops_zero_and_rounds_up_to_milliseconds() {
        let t = DelayTiers::new([
            ms(500),
            Duration::ZERO,
            ms(20),
            ms(500),
            Duration::from_micros(1_500),
            Duration::from_nanos(1),
        ])
        .unwrap();
        assert_eq!(t.durations(), &[ms(1), ms(2), ms(20), ms(500)]);
        assert_eq!((t.shortest(), t.longest()), (ms(1), ms(500)));
        // Sub-millisecond parts that round to the same tier collapse.
        let t = DelayTiers::new([Duration::from_micros(1_200), ms(2)]).unwrap();
        assert_eq!(t.durations(), &[ms(2)]);
        // The end of the range does not overflow.
        let t = DelayTiers::new([Duration::MAX]).unwrap();
        assert_eq!(t.longest().subsec_nanos() % 1_000_000, 0);
    }

    #[test]
    fn an_empty_set_is_a_config_error() {
        for empty in [vec![], vec![Duration::ZERO, Duration::ZERO]] {
            let e = DelayTiers::new(empty).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config);
            assert!(e.message().contains("no delay tiers"), "{e}");
        }
    }

    #[test]
    fn built_in_sets_are_clean() {
        let series = DelayTiers::default();
        assert_eq!(
            DelayTiers::new(series.durations().to_vec()).unwrap(),
            series
        );
        assert_eq!(series.durations().len(), 18);
        assert_eq!(
            (series.shortest(), series.longest()),
            (ms(20), ms(3_600_000))
        );
        let coarse = DelayTiers::coarse();
        assert_eq!(
            DelayTiers::new(coarse.durations().to_vec()).unwrap(),
            coarse
        );
        assert!(coarse
            .durations()
            .iter()
            .all(|t| series.durations().contains(t)));
    }

    #[test]
    fn covering_is_the_shortest_tier_not_shorter_than_the_delay() {
        let t = DelayTiers::new([ms(250), ms(5_000)]).unwrap();
        assert_eq!(t.covering(Duration::ZERO), ms(250));
        assert_eq!(t.covering(ms(1)), ms(250));
        assert_eq!(t.covering(ms(250)), ms(250));
        assert_eq!(t.covering(ms(251)), ms(5_000));
        assert_eq!(t.covering(ms(5_000)), ms(5_000));
        assert_eq!(t.covering(ms(6_000)), ms(5_000), "longer: the longest");
        let coarse = DelayTiers::coarse();
        assert_eq!(coarse.covering(ms(300)), ms(1_000));
        assert_eq!(coarse.covering(ms(42_000)), ms(60_000));
        assert_eq!(coarse.covering(Duration::from_secs(86_400)), ms(3_600_000));
    }

    #[test]
    fn hop_is_the_longest_tier_not_longer_than_the_delay() {
        let t = DelayTiers::default();
        assert_eq!(t.hop(Duration::ZERO), ms(20), "shorter: the shortest");
        assert_eq!(t.hop(ms(12)), ms(20));
        assert_eq!(t.hop(ms(20)), ms(20));
        assert_eq!(t.hop(ms(500)), ms(500));
        assert_eq!(t.hop(ms(990)), ms(500));
        assert_eq!(t.hop(Duration::from_secs(7_200)), ms(3_600_000));
    }

    #[test]
    fn a_chain_of_hops_never_overshoots_more_than_the_shortest_tier() {
        let t = DelayTiers::default();
        for delay in [1u64, 19, 20, 21, 990, 1_300, 7_777, 86_400_000] {
            let mut rest = ms(delay);
            let mut waited = Duration::ZERO;
            let mut hops = 0;
            while !rest.is_zero() {
                let tier = t.hop(rest);
                waited += tier;
                rest = rest.saturating_sub(tier);
                hops += 1;
            }
            assert!(waited >= ms(delay), "{delay} ms");
            assert!(waited < ms(delay) + t.shortest(), "{delay} ms: {waited:?}");
            assert!(hops <= 30, "{delay} ms: {hops} hops");
        }
    }

    #[test]
    fn due_times_round_up_to_the_next_millisecond() {
        let at = |nanos: u64| UNIX_EPOCH + Duration::from_nanos(nanos);
        assert_eq!(
            due_to_millis(at(1_700_000_000_123_000_000)),
            1_700_000_000_123
        );
        assert_eq!(
            due_to_millis(at(1_700_000_000_123_000_001)),
            1_700_000_000_124
        );
        assert_eq!(
            due_to_millis(at(1_700_000_000_123_999_999)),
            1_700_000_000_124
        );
        assert_eq!(due_to_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        for nanos in [0, 1, 999_999, 1_000_000, 1_700_000_000_123_456_789] {
            let due = at(nanos);
            let back = parse_due(&format_due(due)).unwrap();
            assert!(back >= due, "{back:?} is before {due:?}");
            assert!(back.duration_since(due).unwrap() < ms(1));
        }
    }

    #[test]
    fn parse_due_reads_only_decimal_milliseconds() {
        assert_eq!(
            parse_due(" 1700000000123 "),
            Some(UNIX_EPOCH + ms(1_700_000_000_123))
        );
        assert_eq!(due_from_millis(0), Some(UNIX_EPOCH));
        for bad in ["", "-1", "1.5", "soon", "0x10", "18446744073709551616"] {
            assert_eq!(parse_due(bad), None, "{bad:?}");
        }
    }
}
