use std::time::Duration;

/// Exponential backoff with full jitter.
///
/// `delay(attempt)` is a value in `[0, min(max, base · factor^(attempt-1))]`.
/// Defaults: base 100 ms, factor 2, max 30 s, 5 attempts.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::RetryPolicy;
/// let p = RetryPolicy::default();
/// assert_eq!(p.ceiling(1), Duration::from_millis(100));
/// assert_eq!(p.ceiling(3), Duration::from_millis(400));
/// assert_eq!(p.ceiling(20), Duration::from_secs(30));
/// // Same message, same attempt: same delay, in any process.
/// assert_eq!(p.delay(3, "msg-1"), p.delay(3, "msg-1"));
/// assert!(p.delay(3, "msg-1") <= Duration::from_millis(400));
/// assert!(p.should_retry(4) && !p.should_retry(5));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    base: Duration,
    factor: f64,
    max_delay: Duration,
    max_attempts: u32,
    jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_secs(30),
            max_attempts: 5,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The default policy with another base delay.
    pub fn exponential(base: Duration) -> Self {
        RetryPolicy {
            base,
            ..Self::default()
        }
    }

    /// Sets the growth factor (values below 1 are treated as 1).
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        self
    }

    /// Sets the largest delay.
    pub fn with_max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Sets how many attempts a message gets in all (1 = no retries).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Turns jitter off: every delay is its ceiling (useful in tests).
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// How many attempts a message gets in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The largest delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Whether a message whose attempt `attempt` just failed may be tried again.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The ceiling `min(max, base · factor^(attempt-1))` for attempt `attempt` (≥ 1).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1024) as i32;
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        let max = self.max_delay.as_secs_f64();
        if !secs.is_finite() || secs >= max {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }

    /// The delay after failed attempt `attempt`, with full jitter derived from
    /// `seed` (use the message id) and the attempt: deterministic, so every
    /// consumer instance gives the same schedule.
    pub fn delay(&self, attempt: u32, seed: &str) -> Duration {
        let ceiling = self.ceiling(attempt);
        if !self.jitter {
            return ceiling;
        }
        ceiling.mul_f64(unit_interval(seed, attempt))
    }

    /// The delay after failed attempt `attempt` with random full jitter.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if !self.jitter {
            return ceiling;
        }
        ceiling.mul_f64(fastrand::f64())
    }
}

/// A number in `[0, 1]` from `(seed, attempt)`: FNV-1a, then a SplitMix64 finaliser.
fn unit_interval(seed: &str, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes().chain(attempt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / ((1u64 << 53) - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_match_the_contract() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(9), Duration::from_millis(25_600));
        assert_eq!(p.ceiling(10), Duration::from_secs(30));
        assert_eq!(p.max_attempts(), 5);
        assert!(p.should_retry(1));
        assert!(!p.should_retry(5));
    }

    #[test]
    fn jitter_spreads_over_the_interval() {
        let p = RetryPolicy::default();
        let delays: Vec<Duration> = (0..1000).map(|i| p.delay(4, &format!("m{i}"))).collect();
        let ceiling = p.ceiling(4);
        assert!(delays.iter().all(|d| *d <= ceiling));
        let low = delays.iter().filter(|d| **d < ceiling / 2).count();
        assert!((350..650).contains(&low), "{low} of 1000 below the middle");
    }

    #[test]
    fn no_jitter_gives_the_ceiling() {
        let p = RetryPolicy::exponential(Duration::from_millis(10)).without_jitter();
        assert_eq!(p.delay(3, "x"), Duration::from_millis(40));
        assert_eq!(p.delay_random(3), Duration::from_millis(40));
    }

    proptest! {
        #[test]
        fn delay_is_bounded_and_pure(attempt in 0u32..10_000, seed in ".*", base_ms in 0u64..10_000, factor in 1.0f64..10.0, max_ms in 0u64..100_000) {
            let p = RetryPolicy::exponential(Duration::from_millis(base_ms))
                .with_factor(factor)
                .with_max_delay(Duration::from_millis(max_ms));
            let d = p.delay(attempt, &seed);
            prop_assert!(d <= p.ceiling(attempt));
            prop_assert!(p.ceiling(attempt) <= Duration::from_millis(max_ms));
            prop_assert_eq!(d, p.delay(attempt, &seed));
        }

        #[test]
        fn ceiling_never_decreases(attempt in 1u32..200) {
            let p = RetryPolicy::default();
            prop_assert!(p.ceiling(attempt) <= p.ceiling(attempt + 1));
        }
    }
}
