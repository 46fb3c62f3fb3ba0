//! One queue: ready messages, in-flight deliveries, delays, FIFO groups.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use postbox_core::Envelope;

use crate::limits::Limits;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a FIFO queue remembers message ids for de-duplication (SQS: 5 minutes).
pub(crate) const DEDUP_WINDOW: Duration = Duration::from_secs(300);

/// Options of a queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// SQS-style visibility timeout: an unsettled delivery becomes visible
    /// again after it (a consumer that crashed or hangs). `None` (the default,
    /// RabbitMQ-style): a delivery stays with its consumer until settled or
    /// dropped; dropping it requeues it.
    pub visibility_timeout: Option<Duration>,
    /// FIFO: messages need a partition key (group); a group with a message in
    /// flight delivers nothing else; duplicate ids within 5 minutes are dropped
    /// at publish (SQS de-duplication).
    pub fifo: bool,
}

impl QueueOptions {
    /// Sets the visibility timeout.
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }
    /// Makes the queue FIFO.
    pub fn fifo(mut self) -> Self {
        self.fifo = true;
        self
    }
}

#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) envelope: Envelope,
    /// Deliveries so far (the next delivery is attempt `receive_count + 1`).
    pub(crate) receive_count: u32,
}

#[derive(Debug)]
struct InFlight {
    deadline: Instant,
    stored: Stored,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<Stored>,
    /// Only with a visibility timeout: copies of unsettled deliveries.
    in_flight: HashMap<u64, InFlight>,
    /// FIFO: groups with a message in flight or waiting for a retry.
    busy_groups: HashSet<String>,
    /// FIFO: ids seen recently.
    dedup: HashMap<String, Instant>,
    delayed: usize,
}

/// A queue shared by its publishers and competing consumers.
///
/// Publishers and consumers run on different cores: what each side writes
/// on every message sits on its own cache lines (the state lock, the
/// publishers' wake-up, the consumers' counters), so one side's writes do not
/// evict what the other side is using.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) name: String,
    pub(crate) options: QueueOptions,
    pub(crate) limits: Limits,
    state: CachePadded<Mutex<State>>,
    pub(crate) notify: CachePadded<Notify>,
    next_tag: CachePadded<AtomicU64>,
    /// Deliveries handed out and not yet settled.
    pub(crate) unacked: CachePadded<AtomicU64>,
}

/// Aligns `T` to 128 bytes (two cache lines: x86 prefetches lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// What [`Queue::pop`] found.
#[allow(clippy::large_enum_variant)] // boxing would cost an allocation per delivery
pub(crate) enum Pop {
    Got { tag: u64, stored: Stored },
    Empty { wake_at: Option<Instant> },
}

impl Queue {
    pub(crate) fn new(name: &str, options: QueueOptions, limits: &Limits) -> Arc<Queue> {
        Arc::new(Queue {
            name: name.to_string(),
            options,
            limits: limits.clone(),
            state: CachePadded(Mutex::new(State::default())),
            notify: CachePadded(Notify::new()),
            next_tag: CachePadded(AtomicU64::new(1)),
            unacked: CachePadded(AtomicU64::new(0)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a published message. Returns false for a FIFO duplicate (dropped,
    /// as SQS does within the de-duplication window).
    pub(crate) fn push(&self, envelope: Envelope) -> bool {
        let mut state = self.lock();
        if self.options.fifo {
            let now = Instant::now();
            state
                .dedup
                .retain(|_, seen| now.duration_since(*seen) < DEDUP_WINDOW);
            if state.dedup.insert(envelope.id.to_string(), now).is_some() {
                return false;
            }
        }
        state.ready.push_back(Stored {
            envelope,
            receive_count: 0,
        });
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Takes the next deliverable message.
    pub(crate) fn pop(&self) -> Pop {
        let mut state = self.lock();
        // The clock is read only by queues with a visibility timeout.
        let now = self.options.visibility_timeout.map(|_| Instant::now());
        let mut wake_at = None;
        if let (Some(now), false) = (now, state.in_flight.is_empty()) {
            let expired: Vec<u64> = state
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            for tag in expired {
                if let Some(f) = state.in_flight.remove(&tag) {
                    self.unacked.fetch_sub(1, Ordering::Relaxed);
                    if let Some(g) = group_of(&f.stored.envelope, self.options.fifo) {
                        state.busy_groups.remove(g);
                    }
                    state.ready.push_front(f.stored);
                }
            }
            wake_at = state.in_flight.values().map(|f| f.deadline).min();
        }
        let index = if self.options.fifo {
            let busy = &state.busy_groups;
            state
                .ready
                .iter()
                .position(|s| group_of(&s.envelope, true).is_none_or(|g| !busy.contains(g)))
        } else {
            Some(0)
        };
        let next = match index {
            Some(0) => state.ready.pop_front(),
            Some(i) => state.ready.remove(i),
            None => None,
        };
        let Some(mut stored) = next else {
            return Pop::Empty { wake_at };
        };
        stored.receive_count += 1;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = group_of(&stored.envelope, self.options.fifo) {
            state.busy_groups.insert(g.to_string());
        }
        if let (Some(timeout), Some(now)) = (self.options.visibility_timeout, now) {
            state.in_flight.insert(
                tag,
                InFlight {
                    deadline: now + timeout,
                    stored: Stored {
                        envelope: stored.envelope.clone(),
                        receive_count: stored.receive_count,
                    },
                },
            );
        }
        self.unacked.fetch_add(1, Ordering::Relaxed);
        Pop::Got { tag, stored }
    }

    /// Ends an in-flight delivery. `false` if its receipt is no longer valid
    /// (visibility timeout expired and the message went back to the queue).
    fn finish(&self, state: &mut State, tag: u64, env: &Envelope) -> bool {
        if self.options.visibility_timeout.is_some() && state.in_flight.remove(&tag).is_none() {
            return false;
        }
        self.unacked.fetch_sub(1, Ordering::Relaxed);
        if let Some(g) = group_of(env, self.options.fifo) {
            state.busy_groups.remove(g);
        }
        true
    }

    pub(crate) fn ack(&self, tag: u64, env: &Envelope) -> bool {
        let fifo = self.options.fifo;
        if !fifo && self.options.visibility_timeout.is_none() {
            // Nothing in the state to update (no in-flight copy, no group to
            // free): `finish` would only do this.
            self.unacked.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        let ok = {
            let mut state = self.lock();
            self.finish(&mut state, tag, env)
        };
        if ok && fifo {
            self.notify.notify_one();
        }
        ok
    }

    /// Puts a delivery back at the head of the queue for immediate redelivery.
    pub(crate) fn requeue(&self, tag: u64, stored: Stored) -> bool {
        let mut state = self.lock();
        if !self.finish(&mut state, tag, &stored.envelope) {
            return false;
        }
        state.ready.push_front(stored);
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Makes a delivery visible again after `delay` (a retry). The FIFO group
    /// stays blocked until then, so nothing overtakes the retried message.
    pub(crate) fn retry_later(self: &Arc<Self>, tag: u64, stored: Stored, delay: Duration) -> bool {
        let mut state = self.lock();
        if self.options.visibility_timeout.is_some() && state.in_flight.remove(&tag).is_none() {
            return false;
        }
        self.unacked.fetch_sub(1, Ordering::Relaxed);
        state.delayed += 1;
        drop(state);
        // The deadline counts from now, not from the timer task's first poll.
        let due = Instant::now() + delay;
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            let mut state = queue.lock();
            state.delayed -= 1;
            if let Some(g) = group_of(&stored.envelope, queue.options.fifo) {
                state.busy_groups.remove(g);
            }
            state.ready.push_front(stored);
            drop(state);
            queue.notify.notify_one();
        });
        true
    }

    /// Publishes `envelope` after `delay`.
    pub(crate) fn push_later(self: &Arc<Self>, envelope: Envelope, delay: Duration) {
        self.lock().delayed += 1;
        // The deadline counts from now, not from the timer task's first poll.
        let due = Instant::now() + delay;
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            queue.lock().delayed -= 1;
            queue.push(envelope);
        });
    }

    /// Messages ready for delivery.
    pub(crate) fn depth(&self) -> usize {
        self.lock().ready.len()
    }

    /// Messages waiting for a delay or retry timer.
    pub(crate) fn delayed(&self) -> usize {
        self.lock().delayed
    }

    pub(crate) fn peek(&self, limit: usize) -> Vec<Envelope> {
        self.lock()
            .ready
            .iter()
            .take(limit)
            .map(|s| s.envelope.clone())
            .collect()
    }

    /// Removes up to `limit` ready messages matching `filter`; returns them and
    /// how many were looked at and left.
    pub(crate) fn take_matching(
        &self,
        filter: &dyn Fn(&Envelope) -> bool,
        limit: usize,
    ) -> (Vec<Envelope>, usize) {
        let mut state = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(state.ready.len());
        let mut skipped = 0;
        for s in state.ready.drain(..) {
            if taken.len() < limit && filter(&s.envelope) {
                taken.push(s.envelope);
            } else {
                if taken.len() < limit {
                    skipped += 1;
                }
                kept.push_back(s);
            }
        }
        state.ready = kept;
        (taken, skipped)
    }

    pub(crate) fn purge(&self) -> usize {
        let mut state = self.lock();
        let n = state.ready.len();
        state.ready.clear();
        n
    }
}

fn group_of(env: &Envelope, fifo: bool) -> Option<&str> {
    if fifo {
        env.key.as_deref()
    } else {
        None
    }
}
