//! How retry-after is realised on SQS: the received message's visibility
//! timeout.
//!
//! [`Delivery::retry`](postbox_core::Delivery::retry) calls
//! `ChangeMessageVisibility(receipt, d)` on the received message (no copy is
//! published): SQS makes it visible again after `d` (rounded *up* to whole
//! seconds, so never early), and `ApproximateReceiveCount` gives the next
//! attempt number. Delays are therefore durable (invariant 3): they live in
//! SQS, not in the consumer. The longest visibility timeout SQS allows is 12
//! hours; a longer delay is refused with [`Limit::Visibility`] before any
//! call, and the delivery is handed back unsettled.
//!
//! Because the message itself is not rewritten, the retry headers
//! (`retryfirstfailedat`, `retryreason`) are not carried across attempts
//! on SQS; the attempt number comes from the broker's own counter.

use std::time::Duration;

use postbox_core::{Error, Limit};

/// Longest visibility timeout SQS accepts: 12 hours.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// The visibility timeout (whole seconds, rounded up) that realises a retry
/// after `delay`, or a [`Limit::Visibility`] error beyond 12 hours.
pub(crate) fn visibility_for(delay: Duration) -> Result<i32, Error> {
    if delay > MAX_VISIBILITY {
        return Err(Error::limit(Limit::Visibility {
            max: MAX_VISIBILITY,
            requested: delay,
        }));
    }
    Ok(crate::publisher::ceil_secs(delay))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postbox_core::ErrorKind;

    #[test]
    fn visibility_is_bounded_and_rounded_up() {
        assert_eq!(visibility_for(Duration::from_millis(500)).unwrap(), 1);
        assert_eq!(visibility_for(MAX_VISIBILITY).unwrap(), 43_200);
        let e = visibility_for(MAX_VISIBILITY + Duration::from_secs(1)).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::LimitExceeded(Limit::Visibility { .. })
        ));
    }
}
