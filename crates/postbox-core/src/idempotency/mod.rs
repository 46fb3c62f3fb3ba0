//! Idempotency: claim a message before handling it, so duplicates delivered
//! under at-least-once semantics have no second effect.
//!
//! `claim → Acquired(lease) | AlreadyDone | InFlight`, then `complete` on
//! success or `release` on failure. A lease expires, so a crashed holder does
//! not block a message forever.

mod layer;
mod memory;

use std::time::Duration;

use async_trait::async_trait;

pub use layer::{IdempotencyLayer, Idempotent, KeyFn};
pub use memory::MemoryIdempotencyStore;

use crate::error::Error;

/// Proof of a claim: only its holder may complete or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The claimed key.
    pub key: String,
    /// A token unique to this claim (a stale holder's token no longer matches).
    pub token: u64,
    /// How long the claim holds if neither completed nor released.
    pub ttl: Duration,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the key; run the handler, then complete or release.
    Acquired(Lease),
    /// The key was processed already: skip (ack) the duplicate.
    AlreadyDone,
    /// Another holder is processing the key right now (its lease is live).
    InFlight {
        /// Time left on the other holder's lease.
        remaining: Duration,
    },
}

/// Stores which message keys are in flight or done.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `key` for `lease` (insert, or take over an expired lease, atomically).
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, Error>;
    /// Marks the leased key done, remembered for `retention`.
    async fn complete(&self, lease: &Lease, retention: Duration) -> Result<(), Error>;
    /// Gives the leased key up after a failure, so a redelivery can claim it.
    async fn release(&self, lease: &Lease) -> Result<(), Error>;
}
