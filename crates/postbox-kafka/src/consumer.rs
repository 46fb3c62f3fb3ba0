//! Consuming: a consumer-group [`Source`] with commit-after-processing and
//! its [`Delivery`].
//!
//! # Offsets
//! `enable.auto.offset.store=false` always; `enable.auto.commit` stays on (the
//! default) and commits only offsets postbox *stored*. A delivery's offset is
//! marked done when it is acked (or its retry copy was acknowledged by the
//! broker); per partition the source keeps the set of offsets handed out and
//! not yet done, and stores the **contiguous completed watermark** — the first
//! offset not done yet, or one past the last handed out. So with several
//! workers acking out of order, the committed offset never passes a message
//! that is still being processed. Acks only touch this in-memory set (no
//! librdkafka call, no task or channel per message); the source stores the
//! new watermarks when it is polled, at most every 5 ms while records flow
//! (looking at the clock for that every 16 records, and woken for it only if
//! it is waiting for a record). With
//! `enable.auto.commit=false` the source commits the stored offsets itself
//! (asynchronously, at most every 200 ms) and synchronously on revoke/close.
//!
//! # Rebalances
//! A custom `ConsumerContext` handles the revoke *before* librdkafka lets the
//! partitions go: it waits (up to `revoke_timeout`) for in-flight deliveries
//! of the revoked partitions, stores and synchronously commits their
//! watermarks, then forgets them. A delivery of a revoked partition that
//! finishes later is not committed (the partition's next owner processes it
//! again: at-least-once, nothing lost). The wait blocks the thread that polls
//! the source, so it needs the multi-thread tokio runtime (on a
//! current-thread runtime the revoke commits at once without waiting).
//!
//! # Closing
//! [`Source::close`] (which the consumer runtime calls when it stops)
//! commits the watermarks of every partition and waits for the broker to
//! confirm the commit, then unsubscribes, which revokes the assignment and
//! leaves the group, and keeps polling (asynchronously, on the caller's task)
//! until the revoke is served; records fetched meanwhile are not handed out
//! and not committed. All within the configured request time-out. Dropping
//! a source without closing it warns and falls back on librdkafka's blocking
//! close in `Drop`: the revoke commits the watermarks, then the member
//! leaves.
//!
//! # Release
//! [`Delivery::release`] (and dropping a delivery unsettled) re-queues the
//! message **locally**: the next [`Source::next`] hands it out again with
//! `attempt + 1`, and its offset keeps holding the watermark back until it is
//! finally settled. Seeking back would re-read (and re-deliver) every later
//! message of the partition that is already in flight; a local re-queue gives
//! redelivery without duplicates, and if the consumer dies first the
//! uncommitted offset is re-read by the next owner.

use std::collections::{HashMap, VecDeque};
use std::future::Future as _;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use postbox_core::delay::DelayTiers;
use postbox_core::envelope::Text;
use postbox_core::{
    Delivery, Envelope, Error, ErrorKind, Origin, Retry, SettleError, SettleResult, Source,
    StartPosition,
};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::codec::{self, RecordRef, RetryInfo, DECODE_ERROR};
use crate::config::KafkaConfig;
use crate::error::from_kafka;
use crate::publisher::{KafkaPublisher, SYSTEM};
use crate::retry::{retry_topic, retry_topics};

/// A partition of one of the source's topics: the topic as its index in
/// [`Shared::topics`] (0 is the origin topic, then the retry tiers), so a key
/// is copied, compared and hashed without touching a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    topic: u32,
    partition: i32,
}

impl Key {
    /// Whether the partition belongs to a retry tier topic.
    fn is_retry(self) -> bool {
        self.topic != 0
    }
}

/// Offsets of one assigned partition.
#[derive(Debug)]
struct Part {
    /// Changes on every (re)assignment; settles of an older one are ignored.
    gen: u64,
    /// Offsets handed out (or re-queued) and not done yet.
    inflight: Offsets,
    /// One past the highest offset handed out.
    high: i64,
    /// The last watermark stored.
    stored: i64,
    /// Deliveries currently held by handlers.
    outstanding: usize,
}

impl Part {
    fn watermark(&self) -> i64 {
        self.inflight.first().unwrap_or(self.high)
    }
}

/// A set of offsets, ascending: offsets are handed out in order and mostly
/// settled in order, so inserting at the back and removing at the front are
/// the common cases (no allocation per record, unlike a tree's nodes).
#[derive(Debug, Default)]
struct Offsets(VecDeque<i64>);

impl Offsets {
    fn insert(&mut self, offset: i64) {
        match self.0.back() {
            Some(&last) if last >= offset => {
                if let Err(at) = self.0.binary_search(&offset) {
                    self.0.insert(at, offset);
                }
            }
            _ => self.0.push_back(offset),
        }
    }

    fn first(&self) -> Option<i64> {
        self.0.front().copied()
    }

    fn remove(&mut self, offset: i64) {
        if self.0.front() == Some(&offset) {
            self.0.pop_front();
        } else if let Ok(at) = self.0.binary_search(&offset) {
            self.0.remove(at);
        }
    }
}

/// A message waiting to be handed out again (released) or until due (parked).
#[derive(Debug)]
struct Pending {
    key: Key,
    offset: i64,
    envelope: Box<Envelope>,
    /// Partition and offset of the record first consumed from the origin
    /// topic (of this record itself, or the one a retry copy was made of);
    /// the [`Origin`] is built from it only when asked for.
    origin_at: (i32, i64),
}

#[derive(Debug)]
struct Parked {
    pending: Pending,
    due: tokio::time::Instant,
}

/// A hasher for partition keys (two integers) that costs a few instructions
/// instead of SipHash's rounds: the keys are the group's own assignment, not
/// attacker-chosen input.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_i32(&mut self, n: i32) {
        self.add(u64::from(n as u32));
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyMap<V> = HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;

#[derive(Debug, Default)]
struct State {
    parts: KeyMap<Part>,
    requeued: VecDeque<(Pending, u64)>,
    parked: KeyMap<Parked>,
    /// Revokes waiting on [`Shared::settled`] for in-flight work to finish.
    revoke_waiters: usize,
    next_gen: u64,
    last_commit: Option<Instant>,
}

impl State {
    fn part(&mut self, key: Key) -> &mut Part {
        let next_gen = &mut self.next_gen;
        self.parts.entry(key).or_insert_with(|| {
            *next_gen += 1;
            Part {
                gen: *next_gen,
                inflight: Offsets::default(),
                high: -1,
                stored: -1,
                outstanding: 0,
            }
        })
    }

    /// Tracks an offset handed out; returns the generation.
    fn hand_out(&mut self, key: Key, offset: i64) -> u64 {
        let part = self.part(key);
        part.inflight.insert(offset);
        part.high = part.high.max(offset + 1);
        part.outstanding += 1;
        part.gen
    }

    /// Watermarks that advanced since the last store.
    fn advanced(&mut self, topics: &[Arc<str>]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (key, part) in &mut self.parts {
            let w = part.watermark();
            if part.high >= 0 && w > part.stored {
                part.stored = w;
                let topic = &topics[key.topic as usize];
                let _ = tpl.add_partition_offset(topic, key.partition, Offset::Offset(w));
            }
        }
        tpl
    }

    /// How many deliveries wait in `requeued` and `parked`.
    fn queued(&self) -> usize {
        self.requeued.len() + self.parked.len()
    }
}

/// When watermarks were last handed to librdkafka, and how often the source
/// was polled since the clock was last read for that: touched only by the
/// one [`Source::next`] running at a time, so atomics without contention.
#[derive(Debug)]
struct StoreClock {
    base: tokio::time::Instant,
    /// Nanoseconds after `base` of the last store; [`StoreClock::NEVER`] before.
    last_ns: AtomicU64,
    unclocked: AtomicU32,
}

impl StoreClock {
    const NEVER: u64 = u64::MAX;

    fn new() -> Self {
        StoreClock {
            base: tokio::time::Instant::now(),
            last_ns: AtomicU64::new(Self::NEVER),
            unclocked: AtomicU32::new(0),
        }
    }

    /// When the next store may happen (`None` before the first).
    fn next_store(&self) -> Option<tokio::time::Instant> {
        match self.last_ns.load(Ordering::Relaxed) {
            Self::NEVER => None,
            ns => Some(self.base + Duration::from_nanos(ns) + STORE_EVERY),
        }
    }

    fn stored_at(&self, now: tokio::time::Instant) {
        let ns = u64::try_from(now.saturating_duration_since(self.base).as_nanos());
        self.last_ns
            .store(ns.unwrap_or(Self::NEVER - 1), Ordering::Relaxed);
    }
}

struct Shared {
    state: Mutex<State>,
    settled: Condvar,
    wake: tokio::sync::Notify,
    publisher: KafkaPublisher,
    group: String,
    /// The origin topic first (key index 0), then the retry tiers.
    topics: Vec<Arc<str>>,
    tiers: DelayTiers,
    foreign_type: Text,
    revoke_timeout: Duration,
    explicit_commit: bool,
    closing: AtomicBool,
    /// Whether the member holds an assignment: the group's last rebalance
    /// event for it was an assign (of its partitions, possibly none).
    assigned: AtomicBool,
    /// Rebalance events (revokes and assigns) seen.
    rebalance_events: AtomicU64,
    /// The commit [`Source::close`] waits for, and how it went.
    close_commit: Mutex<Option<CloseCommit>>,
    /// Woken when the commit of a close is confirmed or the revoke of a
    /// close was served.
    close_progress: tokio::sync::Notify,
    /// Bounds how long closing waits for the broker.
    request_timeout: Duration,
    /// Whether [`Source::next`] is waiting for a record: only then does a
    /// settle need to wake it (to store a watermark or hand out a re-queued
    /// delivery); otherwise its next call does that work anyway.
    waiting: AtomicBool,
    /// Whether a watermark advanced since the last store (set under the state
    /// lock; read without it while records flow).
    dirty: AtomicBool,
    /// [`State::queued`], kept up to date under the state lock, so that
    /// [`Source::next`] looks at the state only when there is something there.
    queued: AtomicUsize,
    store_clock: StoreClock,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key of a partition of one of the source's topics (`None` for any
    /// other topic: the source never subscribes to one).
    fn key(&self, topic: &str, partition: i32) -> Option<Key> {
        let index = self.topics.iter().position(|t| **t == *topic)?;
        Some(Key {
            topic: u32::try_from(index).ok()?,
            partition,
        })
    }

    /// Brings [`Shared::queued`] in step with the state (call under its lock
    /// after changing `requeued` or `parked`).
    fn note_queued(&self, st: &State) {
        self.queued.store(st.queued(), Ordering::SeqCst);
    }

    /// The topic this source consumes (retry tiers aside).
    fn origin_topic(&self) -> &str {
        &self.topics[0]
    }

    /// The name of a key's topic.
    fn topic_of(&self, key: Key) -> &str {
        &self.topics[key.topic as usize]
    }

    /// Marks an offset done.
    fn complete(&self, key: Key, offset: i64, gen: u64) {
        let mut st = self.lock();
        let mut advanced = false;
        if let Some(part) = st.parts.get_mut(&key) {
            if part.gen == gen {
                part.outstanding = part.outstanding.saturating_sub(1);
                advanced = part.inflight.first() == Some(offset);
                part.inflight.remove(offset);
            } else {
                tracing::debug!(
                    topic = self.topic_of(key),
                    partition = key.partition,
                    offset,
                    "settled after its partition was revoked; not committed"
                );
            }
        }
        if advanced {
            self.dirty.store(true, Ordering::SeqCst);
        }
        let revoke_waits = st.revoke_waiters > 0;
        drop(st);
        if revoke_waits {
            self.settled.notify_all();
        }
        if advanced {
            self.wake_if_waiting();
        }
    }

    /// Wakes [`Source::next`] if it waits for a record. `next` raises the
    /// flag *before* it looks at the state under the lock, so a settle that
    /// sees it down changed the state before `next` looked.
    fn wake_if_waiting(&self) {
        if self.waiting.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Re-queues a delivery for local redelivery.
    fn requeue(&self, pending: Pending, gen: u64) {
        let mut st = self.lock();
        let current = match st.parts.get_mut(&pending.key) {
            Some(part) if part.gen == gen => {
                part.outstanding = part.outstanding.saturating_sub(1);
                true
            }
            _ => false,
        };
        if current {
            st.requeued.push_back((pending, gen));
            self.note_queued(&st);
        }
        let revoke_waits = st.revoke_waiters > 0;
        drop(st);
        if revoke_waits {
            self.settled.notify_all();
        }
        if current {
            self.wake_if_waiting();
        }
    }

    /// The revoke half of a rebalance (and of closing): wait for in-flight work
    /// of the revoked partitions (bounded), store and commit their watermarks,
    /// forget them.
    fn revoke(&self, consumer: &BaseConsumer<Ctx>, revoked: &TopicPartitionList) {
        let keys: Vec<Key> = revoked
            .elements()
            .iter()
            .filter_map(|e| self.key(e.topic(), e.partition()))
            .collect();
        let closing = self.closing.load(Ordering::SeqCst);
        // On a current-thread runtime no handler can finish while this thread
        // waits: do not wait there.
        let single_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        let bound = if closing || single_threaded {
            Duration::ZERO
        } else {
            self.revoke_timeout
        };
        let deadline = Instant::now() + bound;
        let mut st = self.lock();
        loop {
            let busy: usize = keys
                .iter()
                .filter_map(|k| st.parts.get(k))
                .map(|p| p.outstanding)
                .sum();
            if busy == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                if !closing {
                    tracing::warn!(group = %self.group, in_flight = busy, "revoke time-out: abandoning in-flight messages of revoked partitions (their next owner processes them again)");
                }
                break;
            }
            // Settles notify the condvar only while someone waits on it
            // (a `notify_all` is a system call).
            st.revoke_waiters += 1;
            st = self
                .settled
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.revoke_waiters -= 1;
        }
        let mut tpl = TopicPartitionList::new();
        let mut paused = TopicPartitionList::new();
        for key in &keys {
            let topic = self.topic_of(*key);
            if st.parked.remove(key).is_some() {
                paused.add_partition(topic, key.partition);
            }
            if let Some(part) = st.parts.remove(key) {
                if part.high >= 0 {
                    let at = Offset::Offset(part.watermark());
                    let _ = tpl.add_partition_offset(topic, key.partition, at);
                }
            }
        }
        st.requeued.retain(|(p, _)| !keys.contains(&p.key));
        self.note_queued(&st);
        drop(st);
        self.settled.notify_all();
        if paused.count() > 0 {
            // A held retry copy is re-read by whoever owns the partition next;
            // an application pause must not outlive the assignment.
            let _ = consumer.resume(&paused);
        }
        if tpl.count() > 0 {
            // Stored too, so librdkafka's own final commit cannot go backwards.
            let _ = consumer.store_offsets(&tpl);
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(group = %self.group, error = %e, "committing revoked partitions failed; their next owner re-reads from the last commit");
            }
        }
    }
}

/// The commit of a closing source: what it committed, and the broker's answer.
#[derive(Debug)]
struct CloseCommit {
    expected: Vec<(Arc<str>, i32, i64)>,
    outcome: Option<Result<(), Error>>,
}

impl Shared {
    /// The watermark of every tracked partition (forgetting them all, so a
    /// settle from now on commits nothing).
    fn take_watermarks(&self) -> Vec<(Arc<str>, i32, i64)> {
        let mut st = self.lock();
        let mut out = Vec::with_capacity(st.parts.len());
        for (key, part) in st.parts.drain() {
            if part.high >= 0 {
                let topic = self.topics[key.topic as usize].clone();
                out.push((topic, key.partition, part.watermark()));
            }
        }
        st.requeued.clear();
        st.parked.clear();
        self.note_queued(&st);
        out
    }

    /// A commit confirmed (or refused) by the broker: settles the close
    /// commit if it covers the same offsets.
    fn commit_done(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let mut pending = self.close_commit.lock().unwrap_or_else(|e| e.into_inner());
        let Some(commit) = pending.as_mut().filter(|c| c.outcome.is_none()) else {
            return;
        };
        let covers = commit.expected.iter().all(|(topic, partition, offset)| {
            offsets
                .find_partition(topic, *partition)
                .is_some_and(|e| e.offset() == Offset::Offset(*offset))
        });
        if !covers {
            return;
        }
        let failed = result
            .err()
            .or_else(|| offsets.elements().iter().find_map(|e| e.error().err()));
        commit.outcome = Some(match failed {
            None => Ok(()),
            Some(e) => Err(from_kafka(
                "committing the offsets of a closing source failed",
                e,
            )),
        });
        drop(pending);
        self.close_progress.notify_one();
    }

    /// The outcome of the close commit, once the broker answered.
    fn close_commit_outcome(&self) -> Option<Result<(), Error>> {
        let mut pending = self.close_commit.lock().unwrap_or_else(|e| e.into_inner());
        pending.as_mut().and_then(|c| c.outcome.take())
    }
}

/// The consumer context: runs the revoke protocol before partitions go.
struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{log_message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.shared.revoke(consumer, tpl);
                self.shared.assigned.store(false, Ordering::SeqCst);
                self.shared.rebalance_events.fetch_add(1, Ordering::SeqCst);
                self.shared.close_progress.notify_one();
            }
            Rebalance::Assign(tpl) => {
                self.shared.assigned.store(true, Ordering::SeqCst);
                self.shared.rebalance_events.fetch_add(1, Ordering::SeqCst);
                tracing::debug!(group = %self.shared.group, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.shared.group, error = %e, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if self.shared.closing.load(Ordering::SeqCst) {
            self.shared.commit_done(result, offsets);
        }
    }
}

impl KafkaSource {
    /// Subscribes consumer group `group` to `topic` and to its retry tier
    /// topics that exist; retry copies go out through `publisher`.
    pub(crate) fn open(
        config: &KafkaConfig,
        topic: &str,
        group: &str,
        start: StartPosition,
        publisher: KafkaPublisher,
    ) -> Result<KafkaSource, Error> {
        let tiers = config.tiers.clone();
        let reset = match start {
            StartPosition::Latest => "latest",
            _ => "earliest",
        };
        let mut native =
            config.with_defaults(&[("auto.offset.reset", reset), ("enable.auto.commit", "true")]);
        native.set("group.id", group);
        // The contract: offsets are stored by postbox after processing only.
        native.set("enable.auto.offset.store", "false");
        let explicit_commit = native.get("enable.auto.commit") == Some("false");
        let mut topics: Vec<Arc<str>> = vec![Arc::from(topic)];
        if config.retry_topics {
            topics.extend(retry_topics(topic, &tiers).into_iter().map(Arc::from));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            publisher,
            group: group.to_string(),
            topics: topics.clone(),
            tiers,
            foreign_type: config.foreign_type.clone(),
            revoke_timeout: config.revoke_timeout,
            explicit_commit,
            closing: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            rebalance_events: AtomicU64::new(0),
            close_commit: Mutex::new(None),
            close_progress: tokio::sync::Notify::new(),
            request_timeout: config.request_timeout,
            waiting: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            store_clock: StoreClock::new(),
        });
        let consumer: StreamConsumer<Ctx> = native
            .create_with_context(Ctx {
                shared: shared.clone(),
            })
            .map_err(|e| from_kafka("the Kafka consumer could not be created", e))?;
        // Subscribe to the retry tiers that exist (a missing topic in a
        // subscription is an error event on every poll).
        let mut subscribe: Vec<&str> = vec![topic];
        if topics.len() > 1 {
            let md = consumer
                .fetch_metadata(None, config.request_timeout)
                .map_err(|e| from_kafka("fetching topic metadata failed", e))?;
            let existing: Vec<&str> = md
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| t.name())
                .collect();
            for t in &topics[1..] {
                if existing.contains(&&**t) {
                    subscribe.push(t);
                } else {
                    tracing::warn!(topic = %t, "retry tier topic does not exist; retries delayed into it will not be consumed (provision the topology)");
                }
            }
        }
        consumer
            .subscribe(&subscribe)
            .map_err(|e| from_kafka("subscribing failed", e))?;
        Ok(KafkaSource {
            consumer: Some(consumer),
            shared,
        })
    }
}

/// The deliveries of one topic (and its retry tiers) for one consumer group.
///
/// Sources with the same group split the partitions (competing consumers);
/// every group gets every message (fan-out). See the module documentation
/// for how offsets, rebalances, releases and retries work.
pub struct KafkaSource {
    consumer: Option<StreamConsumer<Ctx>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.shared.origin_topic())
            .field("group", &self.shared.group)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    fn consumer(&self) -> &StreamConsumer<Ctx> {
        self.consumer.as_ref().expect("open until closed")
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// Whether this member holds an assignment: its group's last rebalance
    /// handed it its partitions (possibly none, when the group has more
    /// members than partitions) and has not revoked them since. False until
    /// the first group join completes, which takes polling ([`Source::next`]).
    pub fn is_assigned(&self) -> bool {
        self.shared.assigned.load(Ordering::SeqCst)
    }

    /// How many rebalance events (assignments and revocations) this member
    /// has seen: 0 until its first group join completes.
    pub fn rebalances(&self) -> u64 {
        self.shared.rebalance_events.load(Ordering::SeqCst)
    }

    /// The native consumer (for metrics, positions, assignment).
    pub fn native(&self) -> &StreamConsumer<impl ConsumerContext> {
        self.consumer()
    }

    /// Commits the current watermarks now, synchronously (they are otherwise
    /// committed by auto-commit, on revoke and on close).
    pub fn commit_now(&self) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        {
            let mut st = self.shared.lock();
            for (key, part) in &mut st.parts {
                if part.high >= 0 {
                    part.stored = part.watermark();
                    let topic = self.shared.topic_of(*key);
                    let at = Offset::Offset(part.stored);
                    let _ = tpl.add_partition_offset(topic, key.partition, at);
                }
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let _ = self.consumer().store_offsets(&tpl);
        self.consumer()
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| from_kafka("committing offsets failed", e))
    }

    /// Stores advanced watermarks (and commits them when auto-commit is off).
    fn store_advanced(&self) {
        let mut st = self.shared.lock();
        self.shared.dirty.store(false, Ordering::SeqCst);
        let tpl = st.advanced(&self.shared.topics);
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer().store_offsets(&tpl) {
            tracing::debug!(error = %e, "storing offsets failed (partition no longer assigned?)");
        }
        if self.shared.explicit_commit {
            let due = st
                .last_commit
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(200));
            if due {
                st.last_commit = Some(Instant::now());
                if let Err(e) = self.consumer().commit_consumer_state(CommitMode::Async) {
                    tracing::debug!(error = %e, "async commit failed");
                }
            } else {
                self.shared.dirty.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Stores advanced watermarks if a store is due; else returns when it is
    /// (`None`: nothing to store).
    ///
    /// At most every [`STORE_EVERY`] while records flow (a store is a list
    /// allocation and a librdkafka call; auto-commit only picks stored
    /// offsets up every `auto.commit.interval.ms` anyway). `woken`: the
    /// caller waited since its last call (the clock is read then; while
    /// records flow, only every [`CLOCK_EVERY`] calls).
    fn store_if_due(&self, woken: bool) -> Option<tokio::time::Instant> {
        if !self.shared.dirty.load(Ordering::SeqCst) {
            return None;
        }
        let clock = &self.shared.store_clock;
        let next_store = clock.next_store();
        let unclocked = clock.unclocked.load(Ordering::Relaxed) + 1;
        if next_store.is_some() && !woken && unclocked < CLOCK_EVERY {
            // Not looking at the clock this time: the earliest a store can
            // be due is still the wake-up time.
            clock.unclocked.store(unclocked, Ordering::Relaxed);
            return next_store;
        }
        clock.unclocked.store(0, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        if next_store.is_some_and(|due| now < due) {
            return next_store;
        }
        clock.stored_at(now);
        self.store_advanced();
        None
    }

    /// A delivery that is ready without polling (re-queued, or parked and
    /// due), or else when to look again: the next parked one is due, or
    /// advanced watermarks are to be stored. `woken`: see
    /// [`KafkaSource::store_if_due`].
    fn take_ready(&self, woken: bool) -> Result<KafkaDelivery, Option<tokio::time::Instant>> {
        let store_at = self.store_if_due(woken);
        if self.shared.queued.load(Ordering::SeqCst) == 0 {
            return Err(store_at);
        }
        let mut st = self.shared.lock();
        while let Some((pending, gen)) = st.requeued.pop_front() {
            self.shared.note_queued(&st);
            let Some(part) = st.parts.get_mut(&pending.key) else {
                continue;
            };
            if part.gen != gen {
                continue;
            }
            part.outstanding += 1;
            return Ok(self.delivery(pending, gen));
        }
        if st.parked.is_empty() {
            return Err(store_at);
        }
        let now = tokio::time::Instant::now();
        let Some(due_key) = st
            .parked
            .iter()
            .find(|(_, p)| p.due <= now)
            .map(|(k, _)| *k)
        else {
            return Err(earliest(st.parked.values().map(|p| p.due).min(), store_at));
        };
        let parked = st.parked.remove(&due_key).expect("found above");
        self.shared.note_queued(&st);
        let gen = st.hand_out(due_key, parked.pending.offset);
        drop(st);
        // Re-read from just after the held record, then fetch again.
        let consumer = self.consumer();
        let (topic, partition) = (self.shared.topic_of(due_key), due_key.partition);
        let next = Offset::Offset(parked.pending.offset + 1);
        if let Err(e) = consumer.seek(topic, partition, next, Duration::from_secs(5)) {
            tracing::warn!(topic, partition, error = %e, "seek after a retry delay failed");
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(topic, partition, error = %e, "resuming a retry partition failed");
        }
        Ok(self.delivery(parked.pending, gen))
    }

    fn delivery(&self, mut pending: Pending, gen: u64) -> KafkaDelivery {
        // A record whose `ce_` headers did not decode: the runtime
        // dead-letters it with reason `decode` (the header is only the
        // carrier between the codec and here; an empty map costs nothing).
        let decode_error = pending
            .envelope
            .headers
            .remove(DECODE_ERROR)
            .map(|why| Error::new(ErrorKind::Decode, why));
        KafkaDelivery {
            shared: self.shared.clone(),
            key: pending.key,
            offset: pending.offset,
            gen,
            envelope: Some(pending.envelope),
            origin_at: pending.origin_at,
            decode_error,
        }
    }

    /// Takes a polled record: hands it out, parks it, or drops it (its
    /// partition is parked and will be re-read).
    fn accept(&self, msg: &BorrowedMessage<'_>) -> Option<KafkaDelivery> {
        let shared = &self.shared;
        let topic = msg.topic();
        let Some(key) = shared.key(topic, msg.partition()) else {
            // Not tracked, so never committed: whoever subscribes to it reads it.
            tracing::error!(
                topic,
                partition = msg.partition(),
                offset = msg.offset(),
                "record of a topic this source did not subscribe to; not handled"
            );
            return None;
        };
        // Only retry-tier partitions are ever parked.
        let is_retry = key.is_retry();
        if is_retry && self.shared.lock().parked.contains_key(&key) {
            return None;
        }
        let offset = msg.offset();
        let record = RecordRef {
            topic,
            partition: msg.partition(),
            offset,
            key: msg.key(),
            payload: msg.payload(),
        };
        let headers = msg.headers();
        let decoded = codec::decode(
            record,
            || {
                headers
                    .into_iter()
                    .flat_map(|h| h.iter())
                    .map(|h| (h.key, h.value))
            },
            &shared.foreign_type,
        );
        let origin_at = match (&decoded.retry.origin, is_retry) {
            (Some((_, p, o)), true) => (*p, *o),
            _ => (key.partition, offset),
        };
        let pending = Pending {
            key,
            offset,
            envelope: decoded.envelope,
            origin_at,
        };
        if is_retry {
            if let Some(due) = decoded.retry.due {
                if let Ok(wait) = due.duration_since(SystemTime::now()) {
                    if !wait.is_zero() {
                        // Not due: hold it and pause its partition (no sleeping
                        // in the poll loop; other partitions keep flowing).
                        let (topic, partition) = (shared.topic_of(key), key.partition);
                        let mut tpl = TopicPartitionList::new();
                        tpl.add_partition(topic, partition);
                        if let Err(e) = self.consumer().pause(&tpl) {
                            tracing::warn!(topic, partition, error = %e, "pausing a retry partition failed");
                        }
                        let due = tokio::time::Instant::now() + wait;
                        let mut st = self.shared.lock();
                        st.parked.insert(key, Parked { pending, due });
                        self.shared.note_queued(&st);
                        return None;
                    }
                }
            }
        }
        let gen = self.shared.lock().hand_out(key, offset);
        Some(self.delivery(pending, gen))
    }
}

impl Source for KafkaSource {
    type Delivery = KafkaDelivery;

    async fn next(&mut self) -> Option<Result<KafkaDelivery, Error>> {
        let mut woken = false;
        loop {
            let due = match self.take_ready(woken) {
                Ok(d) => return Some(Ok(d)),
                Err(due) => due,
            };
            let this = &*self;
            let mut recv = pin!(this.consumer().recv());
            // A record that is there is taken without arming the wake-up.
            let ready = std::future::poll_fn(|cx| Poll::Ready(recv.as_mut().poll(cx))).await;
            if let Poll::Ready(m) = ready {
                match m {
                    Ok(msg) => match this.accept(&msg) {
                        Some(d) => return Some(Ok(d)),
                        None => continue,
                    },
                    Err(e) => match consume_error(e) {
                        Some(r) => return Some(r),
                        None => continue,
                    },
                }
            }
            // About to wait: settles wake this from now on; one that came
            // before the flag was up did not, so look again first.
            this.shared.waiting.store(true, Ordering::SeqCst);
            let due = match this.take_ready(true) {
                Ok(d) => {
                    this.shared.waiting.store(false, Ordering::SeqCst);
                    return Some(Ok(d));
                }
                Err(again) => earliest(due, again),
            };
            let timer = async move {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // A record that is there wins; a wake-up only matters when idle.
            let accepted = tokio::select! {
                biased;
                m = recv => match m {
                    Ok(msg) => this.accept(&msg).map(Ok),
                    Err(e) => consume_error(e),
                },
                _ = this.shared.wake.notified() => None,
                _ = timer => None,
            };
            this.shared.waiting.store(false, Ordering::SeqCst);
            if let Some(r) = accepted {
                return Some(r);
            }
            woken = true;
        }
    }

    fn system(&self) -> &'static str {
        SYSTEM
    }

    fn destination(&self) -> &str {
        self.shared.origin_topic()
    }

    /// Commits the watermarks, waits for the broker's confirmation, then
    /// leaves the group (see the module documentation). An error says the
    /// commit failed or did not finish in time: the group's next member
    /// then processes again what came after the last commit.
    async fn close(mut self) -> Result<(), Error> {
        let Some(consumer) = self.consumer.take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        shared.closing.store(true, Ordering::SeqCst);
        let left = leave(&consumer, &shared).await;
        // librdkafka's own close: quick now that the member has left.
        drop(consumer);
        left
    }
}

/// Closes a member: commits what was processed (confirmed by the broker),
/// unsubscribes and serves the revoke that follows, polling without handing
/// anything out.
async fn leave(consumer: &StreamConsumer<Ctx>, shared: &Shared) -> Result<(), Error> {
    let watermarks = shared.take_watermarks();
    let committing = !watermarks.is_empty();
    if committing {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &watermarks {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        *shared
            .close_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(CloseCommit {
            expected: watermarks,
            outcome: None,
        });
        // Stored too, so librdkafka's own commit on revoke cannot go back.
        let _ = consumer.store_offsets(&tpl);
        consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| from_kafka("committing the offsets of a closing source failed", e))?;
    }
    let revoking = shared.assigned.load(Ordering::SeqCst);
    consumer.unsubscribe();
    let deadline = tokio::time::Instant::now() + shared.request_timeout;
    let mut committed = !committing;
    loop {
        if !committed {
            if let Some(outcome) = shared.close_commit_outcome() {
                outcome?;
                committed = true;
            }
        }
        let revoked = !revoking || !shared.assigned.load(Ordering::SeqCst);
        if committed && revoked {
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = shared.close_progress.notified() => {}
            // Serves the commit confirmation and the revoke; a record is
            // dropped untracked (never committed: the next owner reads it).
            m = consumer.recv() => {
                if let Err(e) = m {
                    tracing::debug!(error = %e, "Kafka consumer error while closing");
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let what = if committed { "leaving the group" } else { "the commit" };
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "closing the Kafka source of group {}: {what} was not confirmed within {:?}",
                        shared.group, shared.request_timeout
                    ),
                ));
            }
        }
    }
}

/// librdkafka reports most consumer errors as events and recovers by itself
/// (broker down, missing topic, rebalance in progress): they are logged.
/// Only fatal errors end up with the runtime.
fn consume_error(e: KafkaError) -> Option<Result<KafkaDelivery, Error>> {
    let fatal = matches!(
        e.rdkafka_error_code(),
        Some(rdkafka::types::RDKafkaErrorCode::Fatal)
    );
    if fatal {
        Some(Err(from_kafka("the Kafka consumer failed", e)))
    } else {
        tracing::warn!(error = %e, "Kafka consumer error (librdkafka recovers by itself)");
        None
    }
}

/// The earlier of two wake-up times (`None`: no wake-up).
fn earliest(
    a: Option<tokio::time::Instant>,
    b: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// While records flow, advanced watermarks are stored at most this often.
const STORE_EVERY: Duration = Duration::from_millis(5);

/// While records flow, the clock is read for [`STORE_EVERY`] once per this
/// many records (a clock read per record is a measurable share of the
/// consume path); a source that waited reads it at once.
const CLOCK_EVERY: u32 = 16;

impl Drop for KafkaSource {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        tracing::warn!(
            topic = self.shared.origin_topic(),
            group = %self.shared.group,
            "a Kafka source was dropped without Source::close: closing it in Drop (blocking this thread)"
        );
        // The revoke commits the watermarks without waiting (the runtime
        // has finished or abandoned its handlers by now), then the member
        // leaves.
        self.shared.closing.store(true, Ordering::SeqCst);
        drop(consumer);
    }
}

/// One record handed to a handler.
///
/// Dropping it unsettled re-queues it locally (like [`Delivery::release`]).
pub struct KafkaDelivery {
    shared: Arc<Shared>,
    key: Key,
    offset: i64,
    gen: u64,
    envelope: Option<Box<Envelope>>,
    origin_at: (i32, i64),
    /// Why the record's CloudEvents headers did not decode, if they did not.
    decode_error: Option<Error>,
}

impl std::fmt::Debug for KafkaDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDelivery")
            .field("topic", &self.topic())
            .field("partition", &self.key.partition)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl KafkaDelivery {
    /// The topic the record was read from (the origin topic or a retry tier).
    pub fn topic(&self) -> &str {
        self.shared.topic_of(self.key)
    }

    /// The partition the record was read from.
    pub fn partition(&self) -> i32 {
        self.key.partition
    }

    /// The offset of the record.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    fn env(&self) -> &Envelope {
        self.envelope.as_ref().expect("held until settled")
    }

    fn requeue(&mut self) {
        if let Some(mut envelope) = self.envelope.take() {
            envelope.attempt = envelope.attempt.saturating_add(1);
            if let Some(e) = self.decode_error.take() {
                // Still undecodable when it comes back.
                envelope
                    .headers
                    .insert(DECODE_ERROR.to_string(), e.message().to_string());
            }
            let pending = Pending {
                key: self.key,
                offset: self.offset,
                envelope,
                origin_at: self.origin_at,
            };
            self.shared.requeue(pending, self.gen);
        }
    }
}

impl Delivery for KafkaDelivery {
    fn envelope(&self) -> &Envelope {
        self.env()
    }

    fn attempt(&self) -> u32 {
        self.env().attempt
    }

    fn decode_error(&self) -> Option<&Error> {
        self.decode_error.as_ref()
    }

    fn origin(&self) -> Origin {
        Origin {
            destination: self.shared.origin_topic().to_string(),
            partition: Some(self.origin_at.0),
            offset: Some(self.origin_at.1),
        }
    }

    async fn ack(mut self) -> SettleResult<Self> {
        self.envelope = None;
        self.shared.complete(self.key, self.offset, self.gen);
        Ok(())
    }

    async fn retry(mut self, retry: Retry) -> SettleResult<Self> {
        let copy = retry.next_envelope(self.env());
        let info = RetryInfo {
            due: Some(SystemTime::now() + retry.delay),
            origin: Some((
                self.shared.origin_topic().to_string(),
                self.origin_at.0,
                self.origin_at.1,
            )),
        };
        let topic = retry_topic(self.shared.origin_topic(), &self.shared.tiers, retry.delay);
        match self.shared.publisher.send(&topic, copy, Some(&info)).await {
            Ok(_) => {
                // The copy is durable: only now is the original done.
                self.envelope = None;
                self.shared.complete(self.key, self.offset, self.gen);
                Ok(())
            }
            Err(e) => {
                let error = Error::new(
                    ErrorKind::Settle,
                    format!("publishing the retry copy to {topic} failed"),
                )
                .with_source(e.error);
                Err(SettleError::new(error, self))
            }
        }
    }

    async fn release(mut self) -> SettleResult<Self> {
        self.requeue();
        Ok(())
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        self.requeue();
    }
}

#[cfg(test)]
mod tests {
    use super::Offsets;

    #[test]
    fn offsets_stay_ascending_and_distinct_in_any_order() {
        let mut o = Offsets::default();
        for x in [5, 6, 9, 7, 6, 1] {
            o.insert(x);
        }
        assert_eq!(o.0, [1, 5, 6, 7, 9]);
        o.remove(7);
        o.remove(1);
        o.remove(42);
        assert_eq!(o.first(), Some(5));
        assert_eq!(o.0, [5, 6, 9]);
        for x in [5, 6, 9] {
            o.remove(x);
        }
        assert_eq!(o.first(), None);
    }
}
