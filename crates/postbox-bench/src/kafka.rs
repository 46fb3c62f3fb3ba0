//! `postbox-bench kafka`: raw rdkafka versus postbox-kafka against the same
//! broker, in one run (docs/design.md §12).
//!
//! * **publish**: N records of the same payload to a fresh topic, measured
//!   from the first send to the last delivery report. Raw: `FutureProducer`
//!   `send_result` with the same `ce_*` headers and `content-type` the
//!   envelope produces (computed once with `postbox_core::codec::binary` from
//!   a template envelope, inserted per record), delivery futures pipelined in
//!   chunks of `--chunk`. postbox: `Envelope::new` per message and
//!   `KafkaBroker::publish_batch` of the same chunks. Same `ClientConfig`.
//!   A headerless raw run shows what the headers cost on the wire.
//! * **consume**: each side reads the topic its own publish round wrote (same
//!   record sizes), in a fresh consumer group. The group join happens before
//!   the measured window: the window runs from the first record handed to the
//!   handler to the last one handled. Raw: `StreamConsumer::recv`, black-boxed
//!   decode, offsets stored after processing every `--store-every` records
//!   (`enable.auto.offset.store=false`, auto-commit of stored offsets).
//!   postbox: `KafkaSource` + `Consumer` runtime, the same decode in the
//!   handler, ack → stored watermark → the same auto-commit. Committed offsets
//!   are checked after each round (outside the window).
//! * The raw side's topic is also read by two more raw consumers, to show
//!   where postbox's consume cost goes: one that reads every header (name and
//!   value as UTF-8), and one that decodes the CloudEvents headers into a
//!   struct of its own ([`RawEvent`]: `uuid` id, `time` RFC 3339, owned
//!   strings) — the same decode into the same type as postbox's envelope
//!   (docs/design.md §12), so the consume target is judged against it.
//! * **structured mode** (unless `--no-structured`): the same rounds with the
//!   CloudEvents JSON document as the record value and one `content-type`
//!   header. Raw: the document of a template envelope, computed once, sent
//!   as the value; its consumer parses the JSON into a struct of its own
//!   ([`RawJsonEvent`]: the same fields, `data` borrowed). postbox: a
//!   `KafkaBroker` with `ContentMode::Structured`; the same consumer.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use postbox_core::codec::{attr, binary, structured, ContentMode};
use postbox_core::{
    Broker, Consumer, DeadLetterRouter, Envelope, Handler, HandlerResult, Publisher,
    SubscribeOptions,
};
use postbox_kafka::{KafkaBroker, KafkaConfig, TopologySpec};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::Notify;

use crate::postbox::EVENT_TYPE;
use crate::stats::{fmt_rate, verdict, Rates};
use crate::{env, workload};

const USAGE: &str = "\
postbox-bench kafka: raw rdkafka vs postbox-kafka against KAFKA_BOOTSTRAP_SERVERS

options:
  --messages N       messages per round and side (default 300000)
  --rounds R         measured rounds per variant, at least 3 (default 3)
  --payload BYTES    payload size, at least 24 (default 100)
  --chunk C          publish pipelining: records enqueued before their delivery
                     reports are awaited (both sides; default 10000)
  --store-every S    raw consumer: store the offset every S records (default 1000)
  --linger-ms L      producer linger.ms (default 5)
  --no-headerless    skip the headerless raw runs (the envelope's wire cost)
  --no-structured    skip the structured-mode runs (JSON document as the value)
";

#[derive(Debug, Clone)]
struct Options {
    bootstrap: String,
    messages: u64,
    rounds: usize,
    payload: usize,
    chunk: usize,
    store_every: u64,
    linger_ms: u32,
    headerless: bool,
    structured: bool,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let bootstrap = std::env::var(postbox_kafka::BOOTSTRAP_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "127.0.0.1:9092".to_string());
    let mut o = Options {
        bootstrap,
        messages: 300_000,
        rounds: 3,
        payload: 100,
        chunk: 10_000,
        store_every: 1_000,
        linger_ms: 5,
        headerless: true,
        structured: true,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a valid number"))
        }
        match arg.as_str() {
            "--messages" => o.messages = num("--messages", value("--messages")?)?,
            "--rounds" => o.rounds = num("--rounds", value("--rounds")?)?,
            "--payload" => o.payload = num("--payload", value("--payload")?)?,
            "--chunk" => o.chunk = num("--chunk", value("--chunk")?)?,
            "--store-every" => o.store_every = num("--store-every", value("--store-every")?)?,
            "--linger-ms" => o.linger_ms = num("--linger-ms", value("--linger-ms")?)?,
            "--no-headerless" => o.headerless = false,
            "--no-structured" => o.structured = false,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.rounds < 3 {
        return Err("--rounds must be at least 3 (docs/design.md §12)".into());
    }
    if o.payload < 24 {
        return Err("--payload must be at least 24 bytes".into());
    }
    if o.messages == 0 || o.chunk == 0 || o.store_every == 0 {
        return Err("--messages, --chunk and --store-every must be positive".into());
    }
    Ok(o)
}

/// Producer settings, identical on both sides.
fn producer_config(o: &Options) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &o.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", o.linger_ms.to_string())
        .set("batch.num.messages", "10000")
        .set("compression.type", "none");
    c
}

/// Consumer settings, identical on both sides (postbox sets
/// `enable.auto.offset.store=false` and `group.id` itself; they are set here
/// for the raw side). tansu: a short session time-out keeps the first join
/// at about 3 s (docs/testing.md); `fetch.queue.backoff.ms=10` avoids librdkafka's
/// 1 s stall on long reads.
fn consumer_config(o: &Options) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &o.bootstrap)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("fetch.wait.max.ms", "100")
        .set("fetch.queue.backoff.ms", "10");
    c
}

/// The record headers the envelope produces (CloudEvents binary mode).
fn ce_headers(template: &Envelope) -> Vec<(String, String)> {
    binary::encode(template)
        .expect("template envelope encodes")
        .into_iter()
        .map(|(name, value)| {
            let key = if name == attr::DATACONTENTTYPE {
                postbox_kafka::CONTENT_TYPE.to_string()
            } else {
                format!("{}{name}", postbox_kafka::CE_PREFIX)
            };
            (key, value)
        })
        .collect()
}

/// What the raw consumer does with a record's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderWork {
    /// Nothing: only the payload is decoded.
    Ignore,
    /// Reads every name and value (as UTF-8), black-boxed.
    Read,
    /// Decodes the CloudEvents attributes into a struct of its own, the way a
    /// hand-written CloudEvents consumer does ([`RawEvent`]).
    Decode,
    /// Structured mode: parses the value, a CloudEvents JSON document, into
    /// a struct of its own ([`RawJsonEvent`]) and hands `data` to the work.
    DecodeJson,
}

impl HeaderWork {
    fn label(self) -> &'static str {
        match self {
            HeaderWork::Ignore => "raw rdkafka",
            HeaderWork::Read => "raw, reads headers",
            HeaderWork::Decode => "raw, decodes CE",
            HeaderWork::DecodeJson => "raw structured",
        }
    }
}

/// What a hand-written consumer of CloudEvents binary-mode records decodes
/// the headers into (the fields postbox's envelope has, with the crates a
/// careful engineer reaches for: `uuid` for the id, `time` for RFC 3339).
#[derive(Debug, Default)]
struct RawEvent {
    id: Option<uuid::Uuid>,
    event_type: String,
    source: String,
    time: Option<time::OffsetDateTime>,
    content_type: Option<String>,
    extensions: Vec<(String, String)>,
}

/// Decodes the `ce_*` headers and `content-type` of a record.
fn raw_event(headers: &rdkafka::message::BorrowedHeaders) -> RawEvent {
    let mut event = RawEvent::default();
    for h in headers.iter() {
        let Some(Ok(value)) = h.value.map(std::str::from_utf8) else {
            continue;
        };
        match h.key {
            "ce_specversion" => assert_eq!(value, "1.0", "CloudEvents 1.0"),
            "ce_id" => event.id = uuid::Uuid::parse_str(value).ok(),
            "ce_type" => event.event_type = value.to_string(),
            "ce_source" => event.source = value.to_string(),
            "ce_time" => {
                event.time = time::OffsetDateTime::parse(
                    value,
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            }
            "content-type" => event.content_type = Some(value.to_string()),
            name => {
                if let Some(ext) = name.strip_prefix("ce_") {
                    event.extensions.push((ext.to_string(), value.to_string()));
                }
            }
        }
    }
    event
}

/// What a hand-written consumer of structured-mode records parses the value
/// into: the fields of [`RawEvent`], `data` borrowed from the value.
#[derive(Debug, serde::Deserialize)]
// The fields are only black-boxed: what is measured is the parse.
#[allow(dead_code)]
struct RawJsonEvent<'a> {
    specversion: &'a str,
    /// Parsed as a UUID after deserializing (as [`RawEvent`] does).
    id: &'a str,
    #[serde(rename = "type")]
    event_type: String,
    source: String,
    /// RFC 3339, parsed after deserializing (as [`RawEvent`] does).
    time: Option<&'a str>,
    datacontenttype: Option<String>,
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    /// The bench payload is binary: it travels base64-encoded.
    data_base64: Option<&'a str>,
    #[serde(flatten)]
    extensions: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Raw,
    RawHeaderless,
    Postbox,
    RawStructured,
    PostboxStructured,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Raw => "raw rdkafka",
            Side::RawHeaderless => "raw, no headers",
            Side::Postbox => "postbox-kafka",
            Side::RawStructured => "raw structured",
            Side::PostboxStructured => "postbox structured",
        }
    }
}

struct Bench {
    o: Options,
    payload: Bytes,
    headers: Vec<(String, String)>,
    raw_producer: FutureProducer,
    /// Publishes, and creates the topics (1 partition, no retry tiers or DLQ).
    publisher: KafkaBroker,
    /// Publishes in structured mode (otherwise the same settings).
    structured_publisher: KafkaBroker,
    /// The raw side's structured-mode value: the template's JSON document.
    structured_value: Bytes,
    /// Consumes (the consumer settings; no retry tier topics).
    consumer: KafkaBroker,
    run_id: String,
    names: u64,
}

impl Bench {
    fn fresh(&mut self, what: &str) -> String {
        self.names += 1;
        format!("bench.{}.{what}.{}", self.run_id, self.names)
    }

    async fn create_topic(&self, topic: &str) {
        self.publisher
            .provision(topic, &SubscribeOptions::group("bench"))
            .await
            .expect("create topic");
    }

    /// Publishes `n` records to a new topic; returns the topic and the time.
    async fn publish(&mut self, side: Side, n: u64) -> (String, Duration) {
        let topic = self.fresh(match side {
            Side::Raw => "raw",
            Side::RawHeaderless => "bare",
            Side::Postbox => "postbox",
            Side::RawStructured => "raw-structured",
            Side::PostboxStructured => "postbox-structured",
        });
        self.create_topic(&topic).await;
        let started = Instant::now();
        match side {
            Side::Raw | Side::RawHeaderless => {
                let headers = (side == Side::Raw).then_some(&self.headers[..]);
                raw_publish(
                    &self.raw_producer,
                    &topic,
                    n,
                    &self.payload,
                    headers,
                    self.o.chunk,
                )
                .await
            }
            Side::Postbox => {
                postbox_publish(&self.publisher, &topic, n, &self.payload, self.o.chunk).await
            }
            Side::RawStructured => {
                let headers = [(
                    postbox_kafka::CONTENT_TYPE.to_string(),
                    postbox_kafka::STRUCTURED_CONTENT_TYPE.to_string(),
                )];
                raw_publish(
                    &self.raw_producer,
                    &topic,
                    n,
                    &self.structured_value,
                    Some(&headers),
                    self.o.chunk,
                )
                .await
            }
            Side::PostboxStructured => {
                postbox_publish(
                    &self.structured_publisher,
                    &topic,
                    n,
                    &self.payload,
                    self.o.chunk,
                )
                .await
            }
        }
        (topic, started.elapsed())
    }

    /// A raw consumer that does more with the headers (`work`): reads the
    /// raw side's topic again in a fresh group.
    async fn consume_raw_with(&mut self, work: HeaderWork, topic: &str, n: u64) -> Duration {
        let group = self.fresh("group");
        let took = raw_consume(&self.o, topic, &group, n, work).await;
        let committed = committed_offset(&self.o, topic, &group).await;
        assert_eq!(
            committed,
            n as i64,
            "{}: committed offset of {topic}",
            work.label()
        );
        took
    }

    /// Consumes `n` records of `topic` in a fresh group; returns the time
    /// from the first record handed out to the last one handled.
    async fn consume(&mut self, side: Side, topic: &str, n: u64) -> Duration {
        let group = self.fresh("group");
        let took = match side {
            Side::Raw | Side::RawHeaderless => {
                raw_consume(&self.o, topic, &group, n, HeaderWork::Ignore).await
            }
            Side::RawStructured => {
                raw_consume(&self.o, topic, &group, n, HeaderWork::DecodeJson).await
            }
            Side::Postbox | Side::PostboxStructured => {
                postbox_consume(&self.consumer, &self.publisher, topic, &group, n).await
            }
        };
        // Outside the window: the group's committed offset covers everything.
        let committed = committed_offset(&self.o, topic, &group).await;
        assert_eq!(
            committed,
            n as i64,
            "{}: committed offset of {topic}",
            side.label()
        );
        let _ = self.publisher.delete_topics(&[topic]).await;
        took
    }
}

/// Raw publish: enqueue a chunk (waiting while librdkafka's queue is full),
/// then await its delivery reports in order.
async fn raw_publish(
    producer: &FutureProducer,
    topic: &str,
    n: u64,
    payload: &Bytes,
    headers: Option<&[(String, String)]>,
    chunk: usize,
) {
    let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(chunk);
    let mut sent = 0;
    while sent < n {
        let step = (chunk as u64).min(n - sent);
        for _ in 0..step {
            let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).payload(payload);
            if let Some(hs) = headers {
                let mut h = OwnedHeaders::new_with_capacity(hs.len());
                for (k, v) in hs {
                    h = h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    });
                }
                record = record.headers(h);
            }
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => panic!("raw enqueue failed: {e}"),
                }
            }
        }
        for f in pending.drain(..) {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => panic!("raw delivery failed: {e}"),
                Err(_) => panic!("raw producer closed"),
            }
        }
        sent += step;
    }
}

/// postbox publish: a new envelope per message, `publish_batch` per chunk.
async fn postbox_publish(
    publisher: &KafkaBroker,
    topic: &str,
    n: u64,
    payload: &Bytes,
    chunk: usize,
) {
    let mut sent = 0;
    while sent < n {
        let step = (chunk as u64).min(n - sent);
        let batch: Vec<Envelope> = (0..step)
            .map(|_| Envelope::new(EVENT_TYPE, payload.clone()))
            .collect();
        let report = publisher.publish_batch(topic, batch).await;
        if let Some((_, e)) = report.failures().next() {
            panic!("postbox publish failed: {}", e.error);
        }
        sent += step;
    }
}

/// Raw consume: recv, decode (black-boxed), store the offset after
/// processing every `--store-every` records and at the end; auto-commit
/// commits what was stored. `work`: what is done with the headers besides.
async fn raw_consume(o: &Options, topic: &str, group: &str, n: u64, work: HeaderWork) -> Duration {
    let store_every = o.store_every;
    let mut config = consumer_config(o);
    config
        .set("group.id", group)
        .set("enable.auto.offset.store", "false");
    let consumer: StreamConsumer = config.create().expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = 0u64;
    let mut started = None;
    let mut last: Option<(i32, i64)> = None;
    while seen < n {
        let msg = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("raw consumer error (librdkafka recovers): {e}");
                continue;
            }
        };
        if started.is_none() {
            started = Some(Instant::now());
        }
        match (work, msg.headers()) {
            (HeaderWork::Read, Some(headers)) => {
                for h in headers.iter() {
                    black_box(h.key);
                    black_box(h.value.map(std::str::from_utf8));
                }
            }
            (HeaderWork::Decode, Some(headers)) => {
                black_box(raw_event(headers));
            }
            _ => {}
        }
        if work == HeaderWork::DecodeJson {
            let event: RawJsonEvent<'_> =
                serde_json::from_slice(msg.payload().unwrap_or_default()).expect("a CloudEvent");
            assert_eq!(event.specversion, "1.0", "CloudEvents 1.0");
            black_box(uuid::Uuid::parse_str(event.id).ok());
            black_box(event.time.map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            }));
            let data = match (event.data, event.data_base64) {
                (_, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("data_base64"),
                (Some(json), None) => json.get().as_bytes().to_vec(),
                (None, None) => panic!("an event without data"),
            };
            workload::handle(&data);
            black_box(event);
        } else {
            workload::handle(msg.payload().unwrap_or_default());
        }
        black_box(msg.offset());
        seen += 1;
        last = Some((msg.partition(), msg.offset()));
        if seen.is_multiple_of(store_every) {
            store(&consumer, topic, msg.partition(), msg.offset());
        }
    }
    if let Some((p, off)) = last {
        store(&consumer, topic, p, off);
    }
    let took = started.expect("a record was consumed").elapsed();
    // Outside the window: commit what was stored, then leave.
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("final raw commit");
    drop(consumer);
    took
}

fn store(consumer: &StreamConsumer, topic: &str, partition: i32, offset: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1))
        .expect("offset");
    consumer.store_offsets(&tpl).expect("store offsets");
}

/// The handler: the same decode; marks the first and last record.
struct BenchHandler {
    handled: AtomicU64,
    expected: u64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    done: Arc<Notify>,
}

impl Handler for BenchHandler {
    async fn handle(&self, envelope: &Envelope) -> HandlerResult {
        let handled = self.handled.fetch_add(1, Ordering::Relaxed);
        if handled == 0 {
            *self.first.lock().unwrap() = Some(Instant::now());
        }
        workload::handle(&envelope.payload);
        if handled + 1 == self.expected {
            *self.last.lock().unwrap() = Some(Instant::now());
            self.done.notify_one();
        }
        Ok(())
    }
}

async fn postbox_consume(
    consumer: &KafkaBroker,
    publisher: &KafkaBroker,
    topic: &str,
    group: &str,
    n: u64,
) -> Duration {
    let options = SubscribeOptions::group(group).provision(false);
    let source = consumer
        .source(topic, options)
        .await
        .expect("postbox source");
    let done = Arc::new(Notify::new());
    let handler = Arc::new(BenchHandler {
        handled: AtomicU64::new(0),
        expected: n,
        first: Mutex::new(None),
        last: Mutex::new(None),
        done: done.clone(),
    });
    let consumer = Consumer::builder(source, handler.clone())
        .dead_letter(DeadLetterRouter::new(publisher.clone()))
        .build()
        .expect("consumer config")
        .spawn();
    done.notified().await;
    // Outside the window: shutdown commits the watermark and leaves.
    let report = consumer.shutdown().await.expect("consumer shutdown");
    assert_eq!(report.acked, n, "postbox: every message acked: {report:?}");
    let first = handler.first.lock().unwrap().expect("first");
    let last = handler.last.lock().unwrap().expect("last");
    last - first
}

/// The group's committed offset of partition 0 (read without joining).
async fn committed_offset(o: &Options, topic: &str, group: &str) -> i64 {
    let mut config = consumer_config(o);
    config.set("group.id", group);
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = config.create().expect("check consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        match got.elements().first().map(|e| e.offset()) {
            Some(Offset::Offset(x)) => x,
            other => panic!("no committed offset: {other:?}"),
        }
    })
    .await
    .expect("committed check")
}

/// The Kafka mode's entry point (`postbox-bench kafka …`).
pub(crate) fn main(args: impl Iterator<Item = String>) {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("postbox-bench kafka: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let workers = env::cores();
    let payload = workload::payload(o.payload);
    let template = Envelope::new(EVENT_TYPE, payload.clone());
    let headers = ce_headers(&template);
    let structured_value =
        Bytes::from(structured::encode(&template).expect("template envelope encodes"));
    let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();

    println!(
        "postbox-bench kafka: raw rdkafka vs postbox-kafka, same broker, one run (docs/design.md §12)"
    );
    println!();
    env::print_base(workers);
    println!(
        "  broker       {} (KAFKA_BOOTSTRAP_SERVERS); tansu, Kafka-protocol, memory:// storage, started by scripts/brokers.sh; single node, topics of 1 partition, replication 1",
        o.bootstrap
    );
    println!(
        "  client       rdkafka 0.39 (bundled librdkafka {}), the same build on both sides",
        rdkafka::util::get_rdkafka_version().1
    );
    println!(
        "  producer     acks=all, enable.idempotence=true, linger.ms={}, batch.num.messages=10000, no compression; {} records enqueued, then their delivery reports awaited (both sides)",
        o.linger_ms, o.chunk
    );
    println!(
        "  consumer     1 member per fresh group, enable.auto.offset.store=false, auto-commit every 1000 ms of stored offsets, session.timeout.ms=6000, fetch.wait.max.ms=100, fetch.queue.backoff.ms=10; raw stores every {} records, postbox stores the acked watermark; postbox concurrency 1",
        o.store_every
    );
    println!(
        "  records      payload {} bytes, no key; {} headers ({} bytes: {}) on raw and postbox; postbox: Envelope::new per message (UUID v7, time), raw: the same header names and value lengths, values computed once",
        o.payload,
        headers.len(),
        header_bytes,
        headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "  windows      publish: first send -> last delivery report; consume: first record handed out -> last handled (group joined before; final commit and leave after, checked: committed offset = N)"
    );
    println!("  messages     {} per round and side", o.messages);
    println!();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");

    rt.block_on(async move {
        let raw_producer: FutureProducer = producer_config(&o).create().expect("raw producer");
        let topics = TopologySpec {
            retry_tiers: false,
            dlq: false,
            ..TopologySpec::new(1, 1)
        };
        let publisher = KafkaBroker::connect(
            KafkaConfig::from_client_config(producer_config(&o)).topology(topics.clone()),
        )
        .await
        .expect("postbox publisher");
        let structured_publisher = KafkaBroker::connect(
            KafkaConfig::from_client_config(producer_config(&o))
                .topology(topics)
                .content_mode(ContentMode::Structured),
        )
        .await
        .expect("postbox structured publisher");
        let consumer = KafkaBroker::connect(
            KafkaConfig::from_client_config(consumer_config(&o)).consume_retry_topics(false),
        )
        .await
        .expect("postbox consumer");
        let run_id = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        let mut bench = Bench {
            o: o.clone(),
            payload,
            headers,
            raw_producer,
            publisher,
            structured_publisher,
            structured_value,
            consumer,
            run_id,
            names: 0,
        };
        let mut sides = vec![Side::Raw, Side::Postbox];
        if o.headerless {
            sides.push(Side::RawHeaderless);
        }
        if o.structured {
            sides.extend([Side::RawStructured, Side::PostboxStructured]);
        }
        let mut publish = vec![Rates::default(); sides.len()];
        let mut consume = vec![Rates::default(); sides.len()];
        // The raw side's topic read again with more work on the headers.
        let mut with_headers = [
            (HeaderWork::Read, Rates::default()),
            (HeaderWork::Decode, Rates::default()),
        ];
        let n = o.messages;
        for round in 0..=o.rounds {
            let tag = if round == 0 {
                "warm-up".to_string()
            } else {
                format!("round {round}")
            };
            for (i, &side) in sides.iter().enumerate() {
                let (topic, took) = bench.publish(side, n).await;
                let rate = n as f64 / took.as_secs_f64();
                println!(
                    "{tag:<8} publish {:<16} {n:>9} msgs {:>7.3} s {:>10} msg/s{}",
                    side.label(),
                    took.as_secs_f64(),
                    fmt_rate(rate),
                    if round == 0 { " (discarded)" } else { "" }
                );
                if side == Side::Raw {
                    for (work, rates) in &mut with_headers {
                        let took_h = bench.consume_raw_with(*work, &topic, n).await;
                        let rate_h = n as f64 / took_h.as_secs_f64();
                        println!(
                            "{tag:<8} consume {:<16} {n:>9} msgs {:>7.3} s {:>10} msg/s{}",
                            work.label(),
                            took_h.as_secs_f64(),
                            fmt_rate(rate_h),
                            if round == 0 { " (discarded)" } else { "" }
                        );
                        if round > 0 {
                            rates.push(rate_h);
                        }
                    }
                }
                let took_c = bench.consume(side, &topic, n).await;
                let rate_c = n as f64 / took_c.as_secs_f64();
                println!(
                    "{tag:<8} consume {:<16} {n:>9} msgs {:>7.3} s {:>10} msg/s{}",
                    side.label(),
                    took_c.as_secs_f64(),
                    fmt_rate(rate_c),
                    if round == 0 { " (discarded)" } else { "" }
                );
                if round > 0 {
                    publish[i].push(rate);
                    consume[i].push(rate_c);
                }
            }
        }
        println!();
        for (what, rates, target) in [
            ("publish", &publish, 0.97),
            ("consume-with-commit", &consume, 0.95),
        ] {
            println!(
                "results, {what}, messages/s over {} interleaved rounds each:",
                o.rounds
            );
            println!(
                "  {:<18} {:>10} {:>10} {:>10} {:>10}",
                "", "best", "median", "worst", "spread"
            );
            let mut rows: Vec<(&str, &Rates)> =
                sides.iter().map(|s| s.label()).zip(rates.iter()).collect();
            if what != "publish" {
                rows.extend(with_headers.iter().map(|(w, r)| (w.label(), r)));
            }
            for (label, r) in rows {
                println!(
                    "  {:<18} {:>10} {:>10} {:>10} {:>10}",
                    label,
                    fmt_rate(r.best()),
                    fmt_rate(r.median()),
                    fmt_rate(r.worst()),
                    fmt_rate(r.spread())
                );
            }
            let (raw, pb) = (&rates[0], &rates[1]);
            if what == "publish" {
                println!(
                    "  postbox / raw (median): {:.3} (target >= {target:.2})  -> {}",
                    pb.median() / raw.median(),
                    verdict(pb, raw)
                );
            } else {
                // Same decode into the same type (docs/design.md §12): the raw
                // consumer that decodes the CloudEvents headers as postbox does.
                let [(_, read), (_, decoded)] = &with_headers;
                println!(
                    "  postbox / raw decoding CE (median): {:.3} (target >= {target:.2})  -> {}   [same decode into the same type]",
                    pb.median() / decoded.median(),
                    verdict(pb, decoded)
                );
                ratio_line("postbox / raw reading headers", pb, read, "");
                ratio_line(
                    "postbox / raw, payload only",
                    pb,
                    raw,
                    "[postbox decodes the envelope, the raw side only the payload]",
                );
                ratio_line(
                    "raw decoding CE / raw",
                    decoded,
                    raw,
                    "[what decoding the headers costs by hand]",
                );
            }
            if o.structured {
                let at = |side| sides.iter().position(|s| *s == side).expect("side");
                let (raw_s, pb_s) = (
                    &rates[at(Side::RawStructured)],
                    &rates[at(Side::PostboxStructured)],
                );
                ratio_line(
                    "structured: postbox / raw",
                    pb_s,
                    raw_s,
                    "[JSON document as the value; raw parses it into its own struct]",
                );
                ratio_line(
                    "structured / binary, postbox",
                    pb_s,
                    pb,
                    "[what the content mode changes for postbox]",
                );
            }
            if o.headerless {
                let bare = &rates[2];
                ratio_line(
                    "raw with headers / raw without",
                    raw,
                    bare,
                    "[the envelope's wire cost]",
                );
                ratio_line(
                    "postbox / raw without headers",
                    pb,
                    bare,
                    "[the envelope's whole cost]",
                );
            }
            println!();
        }
        println!(
            "  the broker and the client share the same {workers} cores: the client's CPU (librdkafka threads + the tokio workers) and tansu compete"
        );
    });
}

/// Prints the median ratio `a / b` with its verdict and a note.
fn ratio_line(label: &str, a: &Rates, b: &Rates, note: &str) {
    println!(
        "  {label} (median): {:.3}  -> {}   {note}",
        a.median() / b.median(),
        verdict(a, b)
    );
}
