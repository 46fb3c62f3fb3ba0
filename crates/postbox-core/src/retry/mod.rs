//! Retry: a pure, attempt-indexed backoff policy and a retry budget.
//!
//! The delay for attempt N is computed from N (and the message id, for the
//! jitter) alone, so any consumer instance in any process computes the same
//! schedule. No hidden state, no `backoff` crate.

mod budget;
mod policy;

pub use budget::RetryBudget;
pub use policy::RetryPolicy;
