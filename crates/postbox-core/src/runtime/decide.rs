use std::time::Duration;

use crate::handler::{Disposition, FailureReason, HandlerResult};
use crate::retry::{RetryBudget, RetryPolicy};

/// What the runtime does with a message after its handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Success: ack.
    Ack,
    /// Transient failure with attempts left: deliver again after `delay`.
    Retry {
        /// Delay before the next attempt.
        delay: Duration,
        /// Why this attempt failed.
        reason: FailureReason,
    },
    /// Permanent failure, or no attempts left: dead-letter.
    DeadLetter {
        /// The `dlqreason`.
        reason: FailureReason,
    },
}

/// The outcome → decision mapping, a pure function of the handler result,
/// the attempt number and the message id (for deterministic jitter).
pub(crate) fn decide(
    result: &HandlerResult,
    attempt: u32,
    id: &str,
    policy: &RetryPolicy,
    budget: Option<&RetryBudget>,
) -> Decision {
    let err = match result {
        Ok(()) => return Decision::Ack,
        Err(e) => e,
    };
    let delay = match err.disposition() {
        Disposition::Permanent => {
            return Decision::DeadLetter {
                reason: err.reason(),
            }
        }
        _ if !policy.should_retry(attempt) => {
            return Decision::DeadLetter {
                reason: FailureReason::RetriesExhausted,
            }
        }
        Disposition::RetryAfter(d) => d,
        Disposition::Transient => policy.delay(attempt, id),
    };
    let delay = match budget {
        Some(b) if !b.try_withdraw() => delay.max(policy.max_delay()),
        _ => delay,
    };
    Decision::Retry {
        delay,
        reason: err.reason(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerError;

    #[test]
    fn decode_failure_goes_to_dlq_at_once() {
        let e = HandlerError::decode(crate::Error::new(crate::ErrorKind::Decode, "bad"));
        assert_eq!(
            decide(&Err(e), 1, "m", &RetryPolicy::default(), None),
            Decision::DeadLetter {
                reason: FailureReason::Decode
            }
        );
    }

    #[test]
    fn panic_and_timeout_are_retried_with_their_reason() {
        let p = RetryPolicy::default();
        let d = decide(&Err(HandlerError::panic("boom".into())), 2, "m", &p, None);
        assert!(matches!(
            d,
            Decision::Retry {
                reason: FailureReason::Panic,
                ..
            }
        ));
        let d = decide(
            &Err(HandlerError::timeout(Duration::from_secs(1))),
            2,
            "m",
            &p,
            None,
        );
        assert!(matches!(
            d,
            Decision::Retry {
                reason: FailureReason::Timeout,
                ..
            }
        ));
    }

    #[test]
    fn explicit_delay_is_used_but_attempts_still_bound() {
        let p = RetryPolicy::default();
        let e = || Err(HandlerError::retry_after(Duration::from_secs(7), "later"));
        assert_eq!(
            decide(&e(), 1, "m", &p, None),
            Decision::Retry {
                delay: Duration::from_secs(7),
                reason: FailureReason::HandlerError
            }
        );
        assert!(matches!(
            decide(&e(), 5, "m", &p, None),
            Decision::DeadLetter { .. }
        ));
    }

    #[test]
    fn an_empty_budget_slows_retries_to_the_maximum() {
        let p = RetryPolicy::default();
        let budget = RetryBudget::new(0.0, 0, 1);
        let _ = budget.try_withdraw();
        let d = decide(
            &Err(HandlerError::transient("x")),
            1,
            "m",
            &p,
            Some(&budget),
        );
        assert_eq!(
            d,
            Decision::Retry {
                delay: p.max_delay(),
                reason: FailureReason::HandlerError
            }
        );
    }
}
