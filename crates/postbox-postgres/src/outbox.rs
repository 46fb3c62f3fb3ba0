//! The transactional outbox and its relay (docs/design.md §6).
//!
//! [`Outbox::enqueue`] writes an envelope, as a structured CloudEvents JSON
//! document, into `postbox_outbox` inside the application's transaction: the
//! event exists if and only if the business change committed. A [`Relay`]
//! publishes pending rows through any [`Publisher`] and marks them sent (or
//! deletes them, see [`SentRows`]) only after the publisher confirmed.
//!
//! **Order and many relays.** Rows of one partition key (the envelope's
//! `key`; rows without one form one stream of their own) are published in
//! insertion (`id`) order. Relays lock a key before reading its rows
//! (`pg_try_advisory_xact_lock` on a hash of the key, held until the relay
//! commits the rows it published), so two relays never publish one key's rows
//! at once or out of order, and a row is never published by two relays; keys
//! are spread across relays. Rows whose key another relay holds are skipped
//! (the `SKIP LOCKED` idea, per key).
//!
//! **Failure.** A publish that fails leaves the row pending (its `attempts`
//! and `last_error` are recorded), stops that key for the round (so later
//! rows do not overtake it), and the relay backs off exponentially with full
//! jitter before trying again: nothing is lost while the broker is down. A
//! crash between the broker's confirmation and the commit republishes those
//! rows later: the outbox is at-least-once, which an idempotent consumer turns
//! into an exactly-once effect.
//!
//! **Wake-ups.** An insert trigger sends `NOTIFY`; a relay `LISTEN`s on a
//! dedicated connection and also polls every
//! [`poll_interval`](Relay::poll_interval), so it makes progress without
//! notifications too.
//!
//! **Observability.** Gauges `postbox_outbox_backlog` (pending rows) and
//! `postbox_outbox_oldest_pending_seconds`, counters
//! `postbox_outbox_relayed_total` and `postbox_outbox_relay_failed_total`
//! (label `schema`); [`Outbox::backlog`] gives the same on demand.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use postbox_core::codec::structured;
use postbox_core::{CancellationToken, Envelope, Error, Publisher};
use tokio::sync::Notify;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::error::pg;
use crate::migrations::notify_channel;
use crate::Postgres;

/// Gauge: rows waiting to be published.
pub const BACKLOG: &str = "postbox_outbox_backlog";
/// Gauge: age in seconds of the oldest pending row (0 when none).
pub const OLDEST_PENDING: &str = "postbox_outbox_oldest_pending_seconds";
/// Counter: rows published and marked.
pub const RELAYED: &str = "postbox_outbox_relayed_total";
/// Counter: failed publish attempts.
pub const RELAY_FAILED: &str = "postbox_outbox_relay_failed_total";

#[derive(Debug)]
struct Sql {
    insert: String,
    insert_many: String,
    scan_keys: String,
    lock_keys: String,
    fetch: String,
    mark_sent: String,
    delete_sent: String,
    mark_failed: String,
    backlog: String,
    purge: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        Sql {
            insert: format!(
                "INSERT INTO {t} (destination, partition_key, message_id, event) \
                 VALUES ($1, $2, $3, $4::text::json) RETURNING id"
            ),
            // `ORDER BY ord` keeps the ids (bigserial) in slice order.
            insert_many: format!(
                "INSERT INTO {t} (destination, partition_key, message_id, event) \
                 SELECT $1, k, m, e::json FROM unnest($2::text[], $3::text[], $4::text[]) \
                 WITH ORDINALITY AS u(k, m, e, ord) ORDER BY ord RETURNING id"
            ),
            scan_keys: format!(
                "SELECT DISTINCT coalesce(partition_key, '') FROM \
                 (SELECT partition_key FROM {t} WHERE sent_at IS NULL ORDER BY id LIMIT $1) c"
            ),
            lock_keys: "SELECT k FROM unnest($1::text[]) AS k \
                        WHERE pg_try_advisory_xact_lock($2::int4, hashtext(k))"
                .to_string(),
            fetch: format!(
                "SELECT id, destination, coalesce(partition_key, ''), event::text FROM {t} \
                 WHERE sent_at IS NULL AND coalesce(partition_key, '') = ANY($1) \
                 ORDER BY id LIMIT $2 FOR UPDATE"
            ),
            mark_sent: format!(
                "UPDATE {t} SET sent_at = now(), attempts = attempts + 1 WHERE id = ANY($1)"
            ),
            delete_sent: format!("DELETE FROM {t} WHERE id = ANY($1)"),
            mark_failed: format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = $2 WHERE id = $1"
            ),
            backlog: format!(
                "SELECT count(*), coalesce(extract(epoch FROM (now() - min(created_at)))::float8, 0) \
                 FROM {t} WHERE sent_at IS NULL"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE sent_at IS NOT NULL AND sent_at < now() - $1::bigint * interval '1 millisecond'"
            ),
        }
    }
}

/// Pending work in the outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Rows not published yet.
    pub pending: u64,
    /// Age of the oldest of them (`None` when there are none).
    pub oldest: Option<Duration>,
}

/// The outbox table of one schema; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    pg: Postgres,
    sql: Arc<Sql>,
    /// Namespace of the relay's advisory locks (a hash of the table name).
    lock_space: i32,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("schema", &self.pg.schema())
            .finish_non_exhaustive()
    }
}

fn encode(envelope: &Envelope) -> Result<String, Error> {
    // Storage, not the wire: every header is kept.
    let doc = structured::encode_lossless(envelope)?;
    Ok(String::from_utf8(doc).expect("JSON is UTF-8"))
}

/// FNV-1a, stable across builds and processes.
fn lock_space(table: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in table.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

impl Outbox {
    /// The outbox of `pg`'s schema (run [`Postgres::migrate`] first).
    pub fn new(pg: &Postgres) -> Self {
        let table = pg.table("postbox_outbox");
        Outbox {
            pg: pg.clone(),
            lock_space: lock_space(&table),
            sql: Arc::new(Sql::new(&table)),
        }
    }

    /// Writes `envelope` for `destination` inside `tx`, the application's own
    /// transaction: it is published once `tx` commits, and never if it rolls
    /// back. Returns the row id.
    ///
    /// Fails with an `Encode` error if the envelope cannot be written as a
    /// CloudEvent (e.g. a reserved header name); the transaction is still
    /// usable then.
    pub async fn enqueue(
        &self,
        tx: &Transaction<'_>,
        destination: &str,
        envelope: &Envelope,
    ) -> Result<i64, Error> {
        let doc = encode(envelope)?;
        // Unnamed statement with declared types: one round trip.
        let row = tx
            .query_typed_one(
                &self.sql.insert,
                &[
                    (&destination, Type::TEXT),
                    (&envelope.key, Type::TEXT),
                    (&envelope.id.as_str(), Type::TEXT),
                    (&doc, Type::TEXT),
                ],
            )
            .await
            .map_err(|e| pg("inserting into the outbox", e))?;
        Ok(row.get(0))
    }

    /// Writes many envelopes for `destination` inside `tx` in one statement,
    /// in slice order (which is their publish order per key). Returns the
    /// row ids in the same order.
    pub async fn enqueue_many(
        &self,
        tx: &Transaction<'_>,
        destination: &str,
        envelopes: &[Envelope],
    ) -> Result<Vec<i64>, Error> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::with_capacity(envelopes.len());
        let mut ids = Vec::with_capacity(envelopes.len());
        let mut docs = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            keys.push(env.key.as_deref());
            ids.push(env.id.as_str());
            docs.push(encode(env)?);
        }
        let rows = tx
            .query_typed(
                &self.sql.insert_many,
                &[
                    (&destination, Type::TEXT),
                    (&keys, Type::TEXT_ARRAY),
                    (&ids, Type::TEXT_ARRAY),
                    (&docs, Type::TEXT_ARRAY),
                ],
            )
            .await
            .map_err(|e| pg("inserting into the outbox", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Pending rows and the age of the oldest (also exported as gauges by
    /// running relays).
    pub async fn backlog(&self) -> Result<Backlog, Error> {
        let client = self.pg.client().await?;
        let row = client
            .query_one(self.sql.backlog.as_str(), &[])
            .await
            .map_err(|e| pg("reading the outbox backlog", e))?;
        let pending: i64 = row.get(0);
        let age: f64 = row.get(1);
        Ok(Backlog {
            pending: pending.max(0) as u64,
            oldest: (pending > 0).then(|| Duration::from_secs_f64(age.max(0.0))),
        })
    }

    /// Deletes rows marked sent more than `older_than` ago (with
    /// [`SentRows::Mark`]); returns how many.
    pub async fn purge_sent(&self, older_than: Duration) -> Result<u64, Error> {
        let client = self.pg.client().await?;
        client
            .execute(
                self.sql.purge.as_str(),
                &[&crate::idempotency::millis(older_than)],
            )
            .await
            .map_err(|e| pg("purging sent outbox rows", e))
    }

    /// A relay publishing through `publisher` (configure, then
    /// [`run`](Relay::run) or [`spawn`](Relay::spawn)).
    pub fn relay(&self, publisher: Arc<dyn Publisher>) -> Relay {
        Relay {
            outbox: self.clone(),
            publisher,
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            sent: SentRows::Mark,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(30),
            listen: true,
            metrics_interval: Duration::from_secs(5),
            concurrency: 16,
        }
    }
}

/// What the relay does with a row once the broker confirmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentRows {
    /// Set `sent_at` (keeps an audit trail; purge with [`Outbox::purge_sent`]).
    Mark,
    /// Delete the row.
    Delete,
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows read (locked) this round.
    pub fetched: usize,
    /// Rows published and marked.
    pub published: usize,
    /// Publish attempts that failed (their rows stay pending).
    pub failed: usize,
    /// Rows not attempted because an earlier row of their key failed.
    pub held_back: usize,
}

/// A row to publish: id, destination, CloudEvents JSON.
type Pending = (i64, String, String);

#[derive(Default)]
struct LaneOutcome {
    sent: Vec<i64>,
    failed: Vec<(i64, String)>,
    held_back: usize,
}

/// Totals of a relay's [`run`](Relay::run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rounds run.
    pub rounds: u64,
    /// Rows published and marked.
    pub published: u64,
    /// Failed publish attempts.
    pub failed: u64,
}

/// Publishes the outbox (see the [module docs](self)).
#[derive(Clone)]
pub struct Relay {
    outbox: Outbox,
    publisher: Arc<dyn Publisher>,
    batch_size: usize,
    poll_interval: Duration,
    sent: SentRows,
    backoff_base: Duration,
    backoff_max: Duration,
    publish_timeout: Duration,
    listen: bool,
    metrics_interval: Duration,
    concurrency: usize,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.outbox)
            .field("batch_size", &self.batch_size)
            .field("poll_interval", &self.poll_interval)
            .field("sent", &self.sent)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Rows per round (default 256).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How often to look for rows without a notification (default 1 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every;
        self
    }

    /// Mark or delete published rows (default [`SentRows::Mark`]).
    pub fn sent_rows(mut self, sent: SentRows) -> Self {
        self.sent = sent;
        self
    }

    /// Backoff after a failed round: full jitter in `[0, min(max, base·2^n)]`
    /// (defaults 100 ms, 30 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Longest wait for the broker's confirmation of one row (default 30 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How many partition keys are published concurrently in a round
    /// (default 16; rows of one key are always published one after the other).
    pub fn concurrency(mut self, keys: usize) -> Self {
        self.concurrency = keys.max(1);
        self
    }

    /// Whether to `LISTEN` for inserts (default true); polling always runs.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// How often the backlog gauges are refreshed (default 5 s).
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        self.metrics_interval = every;
        self
    }

    /// One round: lock keys, publish up to `batch_size` of their pending
    /// rows in order, mark the confirmed ones, commit.
    pub async fn relay_once(&self) -> Result<RelayReport, Error> {
        let sql = &self.outbox.sql;
        let mut client = self.outbox.pg.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg("starting a relay transaction", e))?;
        let scan = i64::try_from(self.batch_size.saturating_mul(4)).unwrap_or(i64::MAX);
        let keys: Vec<String> = tx
            .query(sql.scan_keys.as_str(), &[&scan])
            .await
            .map_err(|e| pg("scanning the outbox", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if keys.is_empty() {
            return Ok(RelayReport::default());
        }
        // Lock keys first, then read their rows in a new statement (a new
        // snapshot), so what a previous holder committed is seen.
        let locked: Vec<String> = tx
            .query(sql.lock_keys.as_str(), &[&keys, &self.outbox.lock_space])
            .await
            .map_err(|e| pg("locking outbox keys", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if locked.is_empty() {
            return Ok(RelayReport::default());
        }
        let limit = i64::try_from(self.batch_size).unwrap_or(i64::MAX);
        let rows = tx
            .query(sql.fetch.as_str(), &[&locked, &limit])
            .await
            .map_err(|e| pg("reading outbox rows", e))?;
        let mut report = RelayReport {
            fetched: rows.len(),
            ..RelayReport::default()
        };
        // One lane per key, in id order; keys are published concurrently.
        let mut lanes: Vec<Vec<Pending>> = Vec::new();
        let mut lane_of: HashMap<String, usize> = HashMap::new();
        for row in &rows {
            let key: String = row.get(2);
            let lane = *lane_of.entry(key).or_insert_with(|| {
                lanes.push(Vec::new());
                lanes.len() - 1
            });
            lanes[lane].push((row.get(0), row.get(1), row.get(3)));
        }
        drop(rows);
        let outcomes: Vec<LaneOutcome> = futures_util::stream::iter(lanes)
            .map(|lane| self.publish_lane(lane))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut sent: Vec<i64> = Vec::with_capacity(report.fetched);
        let mut failed: Vec<(i64, String)> = Vec::new();
        for o in outcomes {
            sent.extend(o.sent);
            failed.extend(o.failed);
            report.held_back += o.held_back;
        }
        if !sent.is_empty() {
            let stmt = match self.sent {
                SentRows::Mark => sql.mark_sent.as_str(),
                SentRows::Delete => sql.delete_sent.as_str(),
            };
            tx.execute(stmt, &[&sent])
                .await
                .map_err(|e| pg("marking outbox rows sent", e))?;
        }
        for (id, error) in &failed {
            tx.execute(sql.mark_failed.as_str(), &[id, error])
                .await
                .map_err(|e| pg("recording an outbox failure", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| pg("committing relayed outbox rows", e))?;
        report.published = sent.len();
        report.failed = failed.len();
        let labels = [("schema", self.outbox.pg.schema().to_string())];
        metrics::counter!(RELAYED, &labels).increment(sent.len() as u64);
        metrics::counter!(RELAY_FAILED, &labels).increment(failed.len() as u64);
        Ok(report)
    }

    /// Publishes one key's rows in order, stopping at the first failure.
    async fn publish_lane(&self, lane: Vec<Pending>) -> LaneOutcome {
        let mut out = LaneOutcome::default();
        let total = lane.len();
        for (i, (id, destination, doc)) in lane.into_iter().enumerate() {
            let result = match structured::decode(doc.as_bytes()) {
                Err(e) => Err(e),
                Ok(env) => match tokio::time::timeout(
                    self.publish_timeout,
                    self.publisher.publish(&destination, env),
                )
                .await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.error),
                    Err(_) => Err(Error::new(
                        postbox_core::ErrorKind::Timeout,
                        format!("no confirmation within {:?}", self.publish_timeout),
                    )),
                },
            };
            match result {
                Ok(()) => out.sent.push(id),
                Err(e) => {
                    tracing::warn!(row = id, destination, error = %e, "outbox publish failed; will retry");
                    out.failed.push((id, e.to_string()));
                    out.held_back = total - i - 1;
                    break;
                }
            }
        }
        out
    }

    fn backoff_delay(&self, failures: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)));
        let cap = exp.min(self.backoff_max);
        let jittered = cap.mul_f64(fastrand::f64());
        jittered.max(Duration::from_millis(10))
    }

    async fn refresh_metrics(&self) {
        match self.outbox.backlog().await {
            Ok(b) => {
                let labels = [("schema", self.outbox.pg.schema().to_string())];
                metrics::gauge!(BACKLOG, &labels).set(b.pending as f64);
                metrics::gauge!(OLDEST_PENDING, &labels)
                    .set(b.oldest.map_or(0.0, |d| d.as_secs_f64()));
            }
            Err(e) => tracing::debug!(error = %e, "reading the outbox backlog failed"),
        }
    }

    /// Relays until `shutdown` is cancelled. A round in progress finishes
    /// (its confirmed rows are marked) before it returns. Database and broker
    /// errors are retried with backoff, never returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RelayStats, Error> {
        let wake = Arc::new(Notify::new());
        let listener = self.listen.then(|| {
            tokio::spawn(listen(
                self.outbox.pg.config().pg.clone(),
                notify_channel(self.outbox.pg.schema()),
                wake.clone(),
                shutdown.child_token(),
            ))
        });
        let mut stats = RelayStats::default();
        let mut failures: u32 = 0;
        let mut last_metrics: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            if last_metrics.is_none_or(|t| t.elapsed() >= self.metrics_interval) {
                self.refresh_metrics().await;
                last_metrics = Some(tokio::time::Instant::now());
            }
            stats.rounds += 1;
            let wait = match self.relay_once().await {
                Ok(r) => {
                    stats.published += r.published as u64;
                    stats.failed += r.failed as u64;
                    if r.failed > 0 && r.published == 0 {
                        failures += 1;
                        Some(self.backoff_delay(failures))
                    } else {
                        failures = 0;
                        if r.fetched >= self.batch_size || r.failed > 0 {
                            None // more to do right away
                        } else {
                            Some(self.poll_interval)
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "outbox relay round failed; backing off");
                    Some(self.backoff_delay(failures))
                }
            };
            if let Some(wait) = wait {
                let notified = wake.notified();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                    // A notification only cuts a normal wait short, not a backoff.
                    _ = notified, if failures == 0 => {}
                }
            }
        }
        self.refresh_metrics().await;
        if let Some(l) = listener {
            l.abort();
        }
        Ok(stats)
    }

    /// Runs the relay on a task.
    pub fn spawn(
        self,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<RelayStats, Error>> {
        tokio::spawn(self.run(shutdown))
    }
}

/// Keeps a `LISTEN` connection open (reconnecting with backoff) and turns
/// notifications into wake-ups.
async fn listen(
    config: tokio_postgres::Config,
    channel: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let wake2 = wake.clone();
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let driver = tokio::spawn(async move {
                    while let Some(msg) = messages.next().await {
                        match msg {
                            Ok(tokio_postgres::AsyncMessage::Notification(_)) => wake2.notify_one(),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "outbox LISTEN connection failed");
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                    Ok(()) => {
                        delay = Duration::from_millis(200);
                        wake.notify_one(); // catch up on anything missed while away
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = driver => {}
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN failed");
                    }
                }
                drop(client);
            }
            Err(e) => tracing::debug!(error = %e, "outbox LISTEN connection could not be opened"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
