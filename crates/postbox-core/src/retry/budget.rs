use std::sync::Mutex;

use tokio::time::Instant;

/// A retry budget: stops retry storms when most messages fail.
///
/// Every first attempt deposits `ratio` tokens; every retry withdraws one;
/// `min_per_sec` tokens are added each second so a quiet system can still
/// retry. When the budget is empty the runtime does not drop or dead-letter the
/// message: it schedules the retry at the policy's maximum delay instead,
/// slowing the storm without losing anything.
///
/// ```
/// use postbox_core::RetryBudget;
/// let budget = RetryBudget::new(0.5, 0, 10);
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.try_withdraw());   // 2 × 0.5 = 1 token
/// assert!(!budget.try_withdraw());  // empty
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    max_tokens: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    refilled: Instant,
}

impl Default for RetryBudget {
    /// Retries up to 20 % of traffic, at least 10 per second, at most 1000 banked.
    fn default() -> Self {
        RetryBudget::new(0.2, 10, 1000)
    }
}

impl RetryBudget {
    /// A budget of `ratio` retries per first attempt, `min_per_sec` always
    /// allowed, and at most `max_tokens` banked.
    pub fn new(ratio: f64, min_per_sec: u32, max_tokens: u32) -> Self {
        let max_tokens = f64::from(max_tokens.max(1));
        RetryBudget {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            min_per_sec: f64::from(min_per_sec),
            max_tokens,
            state: Mutex::new(State {
                tokens: f64::from(min_per_sec).min(max_tokens),
                refilled: Instant::now(),
            }),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.min_per_sec).min(self.max_tokens);
        state.refilled = now;
        f(&mut state)
    }

    /// Records a first attempt.
    pub fn deposit(&self) {
        let (ratio, max) = (self.ratio, self.max_tokens);
        self.with_state(|s| s.tokens = (s.tokens + ratio).min(max));
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.with_state(|s| {
            if s.tokens >= 1.0 {
                s.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn refills_over_time() {
        let budget = RetryBudget::new(0.0, 2, 10);
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    #[test]
    fn a_storm_is_capped_by_the_ratio() {
        let budget = RetryBudget::new(0.1, 0, 1000);
        let mut allowed = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.try_withdraw() {
                allowed += 1;
            }
        }
        assert!((95..=100).contains(&allowed), "{allowed}");
    }
}
