use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Claim, IdempotencyStore, Lease};
use crate::error::{Error, ErrorKind};

#[derive(Debug)]
enum State {
    InFlight { token: u64, until: Instant },
    Done { until: Instant },
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, State>,
    /// Keys in insertion order, for eviction; may hold keys already removed.
    order: VecDeque<String>,
    next_token: u64,
}

/// An in-memory [`IdempotencyStore`]: bounded, with TTLs. Protects one process
/// until it restarts; use a shared store (e.g. PostgreSQL) across replicas.
///
/// When full, expired entries go first, then the oldest completed ones; a live
/// lease is never evicted (a claim on a full store of live leases fails with a
/// retryable error rather than forgetting one).
///
/// ```
/// use std::time::Duration;
/// use postbox_core::{Claim, IdempotencyStore, MemoryIdempotencyStore};
/// # tokio_test_block_on(async {
/// let store = MemoryIdempotencyStore::new(10_000);
/// let Claim::Acquired(lease) = store.claim("msg-1", Duration::from_secs(30)).await.unwrap() else { panic!() };
/// assert!(matches!(store.claim("msg-1", Duration::from_secs(30)).await.unwrap(), Claim::InFlight { .. }));
/// store.complete(&lease, Duration::from_secs(3600)).await.unwrap();
/// assert_eq!(store.claim("msg-1", Duration::from_secs(30)).await.unwrap(), Claim::AlreadyDone);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryIdempotencyStore {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl MemoryIdempotencyStore {
    /// A store remembering at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        MemoryIdempotencyStore {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Keys currently remembered (in flight or done, expired ones included
    /// until evicted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn make_room(&mut self, capacity: usize, now: Instant) -> bool {
        if self.entries.len() < capacity {
            return true;
        }
        // Drop expired entries and stale order slots first.
        self.entries.retain(|_, s| match s {
            State::InFlight { until, .. } | State::Done { until } => *until > now,
        });
        let entries = &self.entries;
        self.order.retain(|k| entries.contains_key(k));
        if self.entries.len() < capacity {
            return true;
        }
        // Then the oldest completed entry.
        let victim = self
            .order
            .iter()
            .position(|k| matches!(self.entries.get(k), Some(State::Done { .. })));
        match victim {
            Some(i) => {
                if let Some(k) = self.order.remove(i) {
                    self.entries.remove(&k);
                }
                true
            }
            None => false,
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, Error> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.next_token += 1;
        let token = inner.next_token;
        let acquired = Claim::Acquired(Lease {
            key: key.to_string(),
            token,
            ttl: lease,
        });
        match inner.entries.get_mut(key) {
            Some(State::Done { until }) if *until > now => Ok(Claim::AlreadyDone),
            Some(State::InFlight { until, .. }) if *until > now => Ok(Claim::InFlight {
                remaining: *until - now,
            }),
            Some(state) => {
                // Expired: take it over.
                *state = State::InFlight {
                    token,
                    until: now + lease,
                };
                Ok(acquired)
            }
            None => {
                if !inner.make_room(self.capacity, now) {
                    return Err(Error::new(
                        ErrorKind::Rejected,
                        format!("idempotency store is full of {} live leases", self.capacity),
                    ));
                }
                inner.entries.insert(
                    key.to_string(),
                    State::InFlight {
                        token,
                        until: now + lease,
                    },
                );
                inner.order.push_back(key.to_string());
                Ok(acquired)
            }
        }
    }

    async fn complete(&self, lease: &Lease, retention: Duration) -> Result<(), Error> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.entries.get_mut(&lease.key) {
            Some(state @ State::InFlight { .. }) => {
                if matches!(state, State::InFlight { token, .. } if *token == lease.token) {
                    *state = State::Done {
                        until: now + retention,
                    };
                    Ok(())
                } else {
                    Err(lost_lease(lease))
                }
            }
            _ => Err(lost_lease(lease)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let mut inner = self.lock();
        if matches!(inner.entries.get(&lease.key), Some(State::InFlight { token, .. }) if *token == lease.token)
        {
            inner.entries.remove(&lease.key);
        }
        Ok(())
    }
}

fn lost_lease(lease: &Lease) -> Error {
    Error::new(
        ErrorKind::Settle,
        format!(
            "the lease on {:?} expired and was taken over before completion",
            lease.key
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    async fn acquire(store: &MemoryIdempotencyStore, key: &str) -> Lease {
        match store.claim(key, LEASE).await.unwrap() {
            Claim::Acquired(l) => l,
            other => panic!("expected a lease on {key}, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expires_and_is_taken_over() {
        let store = MemoryIdempotencyStore::new(100);
        let stale = acquire(&store, "k").await;
        assert!(
            matches!(store.claim("k", LEASE).await.unwrap(), Claim::InFlight { remaining } if remaining == LEASE)
        );
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let fresh = acquire(&store, "k").await;
        // The crashed holder cannot complete any more; the new one can.
        assert_eq!(
            store.complete(&stale, LEASE).await.unwrap_err().kind(),
            &ErrorKind::Settle
        );
        store
            .complete(&fresh, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::AlreadyDone);
        tokio::time::advance(Duration::from_secs(61)).await;
        acquire(&store, "k").await;
    }

    #[tokio::test(start_paused = true)]
    async fn release_lets_a_redelivery_claim() {
        let store = MemoryIdempotencyStore::new(100);
        let lease = acquire(&store, "k").await;
        store.release(&lease).await.unwrap();
        acquire(&store, "k").await;
    }

    #[tokio::test(start_paused = true)]
    async fn stale_release_does_not_free_a_new_lease() {
        let store = MemoryIdempotencyStore::new(100);
        let stale = acquire(&store, "k").await;
        tokio::time::advance(LEASE * 2).await;
        let _fresh = acquire(&store, "k").await;
        store.release(&stale).await.unwrap();
        assert!(matches!(
            store.claim("k", LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_evicts_done_before_live_leases() {
        let store = MemoryIdempotencyStore::new(3);
        let a = acquire(&store, "a").await;
        store.complete(&a, Duration::from_secs(3600)).await.unwrap();
        let _b = acquire(&store, "b").await;
        let _c = acquire(&store, "c").await;
        let _d = acquire(&store, "d").await; // evicts done "a"
        assert_eq!(store.len(), 3);
        let err = store.claim("e", LEASE).await.unwrap_err(); // only live leases left
        assert!(err.is_retryable());
        tokio::time::advance(LEASE * 2).await;
        acquire(&store, "e").await; // expired leases are evicted
    }

    #[tokio::test]
    async fn exactly_one_of_many_concurrent_claimers_wins() {
        let store = std::sync::Arc::new(MemoryIdempotencyStore::new(1000));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.claim("same", LEASE).await.unwrap()
            }));
        }
        let mut acquired = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Claim::Acquired(_)) {
                acquired += 1;
            }
        }
        assert_eq!(acquired, 1);
    }
}
