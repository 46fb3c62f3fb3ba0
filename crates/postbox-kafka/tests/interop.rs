//! The wire and failure contract against the real broker (tansu, a Kafka
//! protocol broker), checked with an independent CloudEvents implementation
//! (`cloudevents-sdk`) as the oracle: what postbox writes (binary and
//! structured mode, retry and dead-letter copies) is rebuilt from the raw
//! Kafka record by the SDK; what the SDK (or a binding-conformant producer)
//! writes is consumed by postbox with every attribute; malformed input ends
//! in the DLQ with reason `decode` and its value unchanged, through the
//! consumer's own dead-letter router.
//!
//! The raw producer and reader are plain rdkafka clients configured here,
//! not from postbox's configuration.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudevents::{AttributesReader, Data, EventBuilder, EventBuilderV03, EventBuilderV10};
use postbox_core::{
    handler_fn, Broker, Consumer, DeadLetterMetadata, DeadLetterOps, DeadLetterRouter, Delivery,
    Envelope, FailureReason, HandlerError, Origin, Publisher, Retry, RetryPolicy, RunReport,
    RunningConsumer,
};
use postbox_kafka::rdkafka::consumer::{Consumer as _, StreamConsumer};
use postbox_kafka::rdkafka::message::{Header, Headers as _, OwnedHeaders, OwnedMessage};
use postbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use postbox_kafka::rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use postbox_kafka::{
    ContentMode, KafkaBroker, KafkaDelivery, KafkaSource, CE_PREFIX, CONTENT_TYPE,
    STRUCTURED_CONTENT_TYPE, UNDECODABLE_TYPE,
};
use postbox_testkit::env::{self, unique};
use postbox_testkit::interop::{expected_extensions, strict_attribute_name};
use support::{bootstrap, close_on_tansu, test_config, TestKafka};

const WAIT: Duration = Duration::from_secs(30);

/// A broker on the shared tansu that publishes in `mode`, topics of one
/// partition; `None` (skip printed; a failure under
/// `CI`/`POSTBOX_REQUIRE_BROKERS`) when tansu is unreachable.
async fn tansu_in(test: &str, mode: ContentMode) -> Option<TestKafka> {
    let b = bootstrap();
    let connect = KafkaBroker::connect(test_config(&b, true, 1).content_mode(mode));
    let broker = env::connect_or_skip(test, &format!("Kafka (tansu) at {b}"), connect).await?;
    Some(TestKafka {
        broker,
        mock: None,
        partitions: 1,
    })
}

/// A plain rdkafka producer: the independent writer.
struct Raw {
    producer: FutureProducer,
}

impl Raw {
    fn new() -> Raw {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("linger.ms", "1")
            // tansu's "latest offset" is exact only with one record per batch.
            .set("batch.num.messages", "1")
            .create()
            .expect("raw producer");
        Raw { producer }
    }

    /// Produces one record (a header value of `None` is a null value);
    /// returns its offset.
    async fn produce<'a>(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> i64 {
        let headers = headers
            .into_iter()
            .fold(OwnedHeaders::new(), |hs, (key, value)| {
                hs.insert(Header { key, value })
            });
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        let delivered = self
            .producer
            .send(record, WAIT)
            .await
            .map_err(|(e, _)| e)
            .expect("raw produce");
        delivered.offset
    }
}

/// Every record of the one-partition `topic`, read from its beginning with a
/// plain rdkafka consumer (manual assignment, nothing committed) until `n`
/// arrived; the topic holds no more than these.
async fn read_raw(topic: &str, n: usize) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("interop-raw-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("raw reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            // Transient (the topic's metadata not there yet, …): read on.
            Ok(Err(e)) => eprintln!("raw reader of {topic}: {e}"),
            Err(_) => panic!("{topic}: {} of {n} records after {WAIT:?}", out.len()),
        }
    }
    let (_, high) = tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, 0, WAIT))
        .expect("watermarks");
    assert_eq!(high, n as i64, "{topic} holds more records than expected");
    out
}

/// Headers with values, as [`Raw::produce`] takes them.
fn some_values(headers: &[(String, Vec<u8>)]) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_slice())))
}

/// The headers of a record, in order.
fn headers_of(m: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of header `name` as text.
fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    headers_of(m)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8(v.expect("a header value")).expect("UTF-8 header"))
}

/// What the record's headers say at the wire level: in structured mode only
/// `content-type` and postbox's transport headers (`postbox-*`, outside the
/// CloudEvents attribute set); in binary mode, besides those, `ce_<name>`
/// headers whose names pass the strict attribute-name check.
fn assert_wire(m: &OwnedMessage, mode: ContentMode, what: &str) {
    for (name, _) in headers_of(m) {
        if name == CONTENT_TYPE || name.starts_with("postbox-") {
            continue;
        }
        let attribute = name.strip_prefix(CE_PREFIX);
        assert!(
            mode == ContentMode::Binary && attribute.is_some(),
            "{what}: header {name:?} in {mode:?} mode"
        );
        let attribute = attribute.unwrap_or_default();
        assert!(
            strict_attribute_name(attribute),
            "{what}: `{attribute}` (header {name:?}) is not a valid attribute name"
        );
    }
    let content_type = header(m, CONTENT_TYPE);
    if mode == ContentMode::Structured {
        assert_eq!(
            content_type.as_deref(),
            Some(STRUCTURED_CONTENT_TYPE),
            "{what}: content-type"
        );
    }
}

/// The CloudEvent the SDK rebuilds from a raw Kafka record, as the Kafka
/// binding maps it: structured mode (`content-type` starting with
/// `application/cloudevents`) through the SDK's own JSON event format,
/// binary mode from the `ce_` headers, the `content-type` header and the
/// value. In both, the record key is the `partitionkey` extension (the
/// binding's key mapping).
fn oracle(m: &OwnedMessage) -> cloudevents::Event {
    let text = |v: &Option<Vec<u8>>| {
        String::from_utf8(v.clone().expect("a header value")).expect("a UTF-8 header value")
    };
    let headers = headers_of(m);
    let content_type = headers
        .iter()
        .find(|(k, _)| k == CONTENT_TYPE)
        .map(|(_, v)| text(v));
    let value = m.payload().unwrap_or_default();
    let mut event = if let Some(ct) = content_type
        .as_deref()
        .filter(|ct| ct.starts_with("application/cloudevents"))
    {
        assert_eq!(ct, "application/cloudevents+json; charset=UTF-8");
        serde_json::from_slice::<cloudevents::Event>(value)
            .expect("the SDK reads the structured value")
    } else {
        let mut builder = EventBuilderV10::new();
        let mut specversion = None;
        let mut datacontenttype = content_type.clone();
        for (k, v) in &headers {
            let Some(name) = k.strip_prefix(CE_PREFIX) else {
                continue;
            };
            let s = text(v);
            builder = match name {
                "specversion" => {
                    specversion = Some(s);
                    builder
                }
                "id" => builder.id(s),
                "type" => builder.ty(s),
                "source" => builder.source(s),
                "time" => builder.time(s),
                "subject" => builder.subject(s),
                "datacontenttype" => {
                    // Only where `content-type` would make it look structured.
                    assert!(content_type.is_none(), "both content-type and {k}");
                    datacontenttype = Some(s);
                    builder
                }
                _ => builder.extension(name, s),
            };
        }
        assert_eq!(specversion.as_deref(), Some("1.0"));
        if let Some(ct) = datacontenttype {
            builder = builder.data(ct, value.to_vec());
        }
        builder.build().expect("the SDK builds the event")
    };
    if let Some(key) = m.key() {
        let key = std::str::from_utf8(key).expect("a UTF-8 key");
        match event.extension("partitionkey") {
            Some(v) => assert_eq!(v.to_string(), key, "the key is the partition key"),
            None => {
                event.set_extension("partitionkey", key);
            }
        }
    }
    event
}

fn sdk_time(event: &cloudevents::Event) -> Option<SystemTime> {
    event.time().map(|t| {
        UNIX_EPOCH
            + Duration::new(
                u64::try_from(t.timestamp()).unwrap(),
                t.timestamp_subsec_nanos(),
            )
    })
}

/// An RFC 3339 time as the SDK reads it.
fn sdk_parse_time(s: &str) -> SystemTime {
    let event = EventBuilderV10::new()
        .id("t")
        .ty("t")
        .source("/t")
        .time(s)
        .build()
        .unwrap_or_else(|e| panic!("{s:?} is not an RFC 3339 time to the SDK: {e}"));
    sdk_time(&event).unwrap()
}

fn extensions(event: &cloudevents::Event) -> BTreeMap<String, String> {
    event
        .iter_extensions()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The SDK's event says what `env` says, attribute by attribute, and every
/// extension name passes the specification's strict check.
fn assert_same(event: &cloudevents::Event, env: &Envelope, what: &str) {
    assert_eq!(event.id(), env.id.as_str(), "{what}: id");
    assert_eq!(event.ty(), env.event_type, "{what}: type");
    assert_eq!(event.source().as_str(), env.source, "{what}: source");
    assert_eq!(sdk_time(event), env.time, "{what}: time");
    assert_eq!(event.subject(), env.subject.as_deref(), "{what}: subject");
    assert_eq!(
        event.datacontenttype(),
        Some(env.content_type.as_ref()),
        "{what}: datacontenttype"
    );
    let extensions = extensions(event);
    assert_eq!(extensions, expected_extensions(env), "{what}: extensions");
    for name in extensions.keys() {
        assert!(
            strict_attribute_name(name),
            "{what}: `{name}` is not a valid attribute name"
        );
    }
    assert_data(event.data(), env, what);
}

fn assert_data(data: Option<&Data>, env: &Envelope, what: &str) {
    match data {
        Some(Data::Json(v)) => assert_eq!(
            v,
            &serde_json::from_slice::<serde_json::Value>(&env.payload).unwrap(),
            "{what}: data"
        ),
        Some(Data::String(s)) => assert_eq!(s.as_bytes(), &env.payload[..], "{what}: data"),
        Some(Data::Binary(b)) => assert_eq!(&b[..], &env.payload[..], "{what}: data"),
        None => assert!(env.payload.is_empty(), "{what}: data missing"),
    }
}

async fn next(source: &mut KafkaSource) -> KafkaDelivery {
    postbox_testkit::suite::next_within(source, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Envelopes a consumer's handler saw.
type Seen = Arc<Mutex<Vec<Envelope>>>;

/// A consumer runtime named `name` on `topic` (group `g`) whose handler
/// records what it sees and answers with `outcome`, dead-lettering through
/// the broker's default route.
async fn consumer(
    h: &TestKafka,
    topic: &str,
    name: &str,
    outcome: fn(&Envelope) -> Result<(), HandlerError>,
) -> (RunningConsumer, Seen) {
    let seen: Seen = Default::default();
    let record = seen.clone();
    let running = Consumer::builder(
        h.source(topic, "g").await.expect("source"),
        handler_fn(move |env: Envelope| {
            let result = outcome(&env);
            record.lock().unwrap().push(env);
            async move { result }
        }),
    )
    .name(name)
    .concurrency(4)
    .retry_policy(RetryPolicy::exponential(RETRY_DELAY).without_jitter())
    .dead_letter(DeadLetterRouter::new(h.broker.clone()))
    .build()
    .expect("consumer")
    .spawn();
    (running, seen)
}

/// The delay of a first retry (the runtime's policy, no jitter): the 1 s
/// tier of the test tiers.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// Waits until `done` holds.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the DLQ `dlq` holds `n` records (never more).
async fn wait_count(broker: &KafkaBroker, dlq: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = broker.count(dlq).await.expect("count");
        if count >= n {
            assert_eq!(count, n, "{dlq} holds more than expected");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dlq} holds {count} of {n} records after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Interop: postbox writes, the SDK reads.
// ---------------------------------------------------------------------------

/// A failure worth retrying.
#[derive(Debug)]
struct Unavailable;

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("inventory unavailable")
    }
}

impl std::error::Error for Unavailable {}

/// A failure no retry fixes.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("order refused by the handler")
    }
}

impl std::error::Error for Refused {}

const RETRIED: &str = "com.example.order.placed";
const REFUSED: &str = "com.example.order.cancelled";

/// Fails `RETRIED` transiently on its first attempt and `REFUSED` for good.
fn retry_once_refuse_one(env: &Envelope) -> Result<(), HandlerError> {
    match &*env.event_type {
        RETRIED if env.attempt == 1 => Err(HandlerError::transient(Unavailable)),
        REFUSED => Err(HandlerError::permanent(Refused)),
        _ => Ok(()),
    }
}

/// An envelope with every attribute the wire carries.
fn full(event_type: &str, key: &str) -> Envelope {
    Envelope::builder(event_type.to_string())
        .source("/shop/orders")
        .time(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789))
        .subject("order-7")
        .schema_version("2")
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .key(key)
        .trace_context(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("vendor=1".into()),
        )
        .header("tenant", "acme")
        .header("region", "eu")
        .payload(r#"{"id":7,"total":12.5,"lines":[{"sku":"a"}]}"#)
        .build()
}

/// The transport headers of a retry copy: postbox's own, outside the
/// attribute set (no `ce_` prefix).
fn assert_retry_transport(copy: &OwnedMessage, origin: &str, offset: i64) {
    assert_eq!(
        header(copy, "postbox-origin-topic").as_deref(),
        Some(origin)
    );
    assert_eq!(
        header(copy, "postbox-origin-partition").as_deref(),
        Some("0")
    );
    assert_eq!(
        header(copy, "postbox-origin-offset"),
        Some(offset.to_string())
    );
    let due = header(copy, postbox_core::delay::DUE_HEADER).expect("a due time");
    assert!(due.parse::<u64>().is_ok(), "due time {due:?}");
}

/// What postbox writes in `mode` — records with every attribute, JSON and
/// other payloads, with and without a key, the retry copy of a message whose
/// handler failed transiently once and the dead-letter copy of a message it
/// refused — is the same CloudEvent to the SDK.
async fn postbox_writes_what_the_sdk_reads(test: &str, mode: ContentMode) {
    let Some(h) = tansu_in(test, mode).await else {
        return;
    };
    let t = unique(&format!("interop-out-{mode:?}").to_lowercase());
    h.create(&t).await.unwrap();
    let messages = [
        full(RETRIED, "customer-3"),
        full(REFUSED, "customer-4"),
        Envelope::builder("com.example.note")
            .source("https://example.com/notes")
            .content_type("text/plain; charset=utf-8")
            .key("note-1")
            .payload("héllo \"world\"")
            .build(),
        Envelope::builder("com.example.blob")
            .source("urn:example:blobs")
            .content_type("application/octet-stream")
            .header("checksum", "abc123")
            .payload(vec![0u8, 159, 146, 150, 255])
            .build(),
    ];
    let started = SystemTime::now();
    for env in &messages {
        h.broker.publish(&t, env.clone()).await.unwrap();
    }
    let records = read_raw(&t, messages.len()).await;
    for (m, env) in records.iter().zip(&messages) {
        let what = format!("{mode:?} {}", env.event_type);
        assert_wire(m, mode, &what);
        assert_eq!(
            m.key(),
            env.key.as_deref().map(str::as_bytes),
            "{what}: the record key is the partition key"
        );
        if mode == ContentMode::Binary {
            assert_eq!(
                m.payload().unwrap_or_default(),
                &env.payload[..],
                "{what}: binary: the value is the payload"
            );
            assert_eq!(
                header(m, CONTENT_TYPE).as_deref(),
                Some(env.content_type.as_ref()),
                "{what}: binary: content-type is datacontenttype"
            );
        }
        assert_same(&oracle(m), env, &what);
    }

    // A retry copy and a dead-letter copy, made by a consumer.
    let (running, seen) = consumer(&h, &t, "billing", retry_once_refuse_one).await;
    let dlq = format!("{t}.dlq");
    wait_until("the retried message handled again", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|e| e.id == messages[0].id && e.attempt == 2)
    })
    .await;
    wait_count(&h.broker, &dlq, 1).await;
    let report: RunReport = running.shutdown().await.unwrap();
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (3, 1, 1),
        "{report:?}"
    );

    let tier = format!("{t}.retry.1s");
    let copy = &read_raw(&tier, 1).await[0];
    assert_wire(copy, mode, "retry copy");
    assert_retry_transport(copy, &t, records[0].offset());
    assert_eq!(copy.key(), Some(&b"customer-3"[..]), "retry copy key");
    let event = oracle(copy);
    let first_failed_at = sdk_parse_time(
        &event
            .extension("retryfirstfailedat")
            .expect("retryfirstfailedat")
            .to_string(),
    );
    assert!(started <= first_failed_at && first_failed_at <= SystemTime::now());
    let retry = Retry {
        delay: RETRY_DELAY,
        next_attempt: 2,
        first_failed_at,
        reason: "handler-error",
    };
    let expected = retry.next_envelope(&messages[0]);
    assert_eq!(expected.headers["retryreason"], "handler-error");
    assert_same(&event, &expected, &format!("{mode:?} retry copy"));

    let dead = &read_raw(&dlq, 1).await[0];
    assert_wire(dead, mode, "dead-letter copy");
    assert_eq!(dead.key(), Some(&b"customer-4"[..]), "dead-letter copy key");
    let event = oracle(dead);
    let time = |name: &str| {
        let t = sdk_parse_time(
            &event
                .extension(name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .to_string(),
        );
        assert!(started <= t && t <= SystemTime::now(), "{name}");
        t
    };
    let metadata = DeadLetterMetadata {
        reason: FailureReason::HandlerError,
        error: Refused.to_string(),
        error_type: std::any::type_name::<Refused>().to_string(),
        attempts: 1,
        first_failed_at: time("dlqfirstfailedat"),
        last_failed_at: time("dlqlastfailedat"),
        origin: Origin {
            destination: t.clone(),
            partition: Some(0),
            offset: Some(records[1].offset()),
        },
        consumer: "billing".into(),
    };
    let mut expected = messages[1].clone();
    metadata.apply(&mut expected);
    assert_eq!(expected.headers["dlqreason"], "handler-error");
    assert_eq!(expected.headers["dlqerrortype"], "interop::Refused");
    assert_same(&event, &expected, &format!("{mode:?} dead-letter copy"));
    for name in postbox_core::dlq::NAMES {
        assert!(event.extension(name).is_some(), "{name}");
    }
    h.broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_is_read_by_the_sdk() {
    postbox_writes_what_the_sdk_reads("binary_mode_is_read_by_the_sdk", ContentMode::Binary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_is_read_by_the_sdk() {
    postbox_writes_what_the_sdk_reads(
        "structured_mode_is_read_by_the_sdk",
        ContentMode::Structured,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Interop: the SDK writes, postbox reads.
// ---------------------------------------------------------------------------

/// A record as a binding-conformant producer writes an SDK event.
struct RawRecord {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

/// The partition key of an SDK event: the record key (the binding's key
/// mapping).
fn partition_key(event: &cloudevents::Event) -> Option<Vec<u8>> {
    event
        .extension("partitionkey")
        .map(|v| v.to_string().into_bytes())
}

/// Structured mode: the SDK's JSON serialization as the value,
/// `content-type: application/cloudevents+json; charset=UTF-8`.
fn structured_record(event: &cloudevents::Event) -> RawRecord {
    RawRecord {
        key: partition_key(event),
        value: serde_json::to_vec(event).unwrap(),
        headers: vec![(CONTENT_TYPE.into(), STRUCTURED_CONTENT_TYPE.into())],
    }
}

/// Binary mode as the Kafka binding has it: every attribute a `ce_` header
/// (its canonical string form), `datacontenttype` the `content-type` header,
/// the data the value.
fn binary_record(event: &cloudevents::Event) -> RawRecord {
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        ("ce_specversion".into(), b"1.0".to_vec()),
        ("ce_id".into(), event.id().into()),
        ("ce_type".into(), event.ty().into()),
        ("ce_source".into(), event.source().as_str().into()),
    ];
    if let Some(s) = event.subject() {
        headers.push(("ce_subject".into(), s.into()));
    }
    if let Some(t) = event.time() {
        headers.push(("ce_time".into(), t.to_rfc3339().into_bytes()));
    }
    if let Some(ct) = event.datacontenttype() {
        headers.push((CONTENT_TYPE.into(), ct.into()));
    }
    for (name, value) in event.iter_extensions() {
        headers.push((format!("ce_{name}"), value.to_string().into_bytes()));
    }
    let value = match event.data() {
        Some(Data::Json(v)) => serde_json::to_vec(v).unwrap(),
        Some(Data::String(s)) => s.clone().into_bytes(),
        Some(Data::Binary(b)) => b.clone(),
        None => Vec::new(),
    };
    RawRecord {
        key: partition_key(event),
        value,
        headers,
    }
}

/// Events written by the SDK — structured (its own JSON serialization) and
/// binary (its attributes as `ce_` headers) — arrive in postbox with every
/// attribute: the context attributes, every extension (typed ones in their
/// canonical string form, `partitionkey` as the key, the ones postbox has
/// fields for in those fields), the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_sdk_writes_arrive_with_every_attribute() {
    let Some(h) = tansu_in(
        "events_the_sdk_writes_arrive_with_every_attribute",
        ContentMode::Binary,
    )
    .await
    else {
        return;
    };
    let t = unique("interop-in");
    h.create(&t).await.unwrap();
    let json = EventBuilderV10::new()
        .id("sdk-json-1")
        .ty("com.example.order.placed")
        .source("https://example.com/shop")
        .subject("order-7")
        .time("2024-05-06T07:08:09.123456Z")
        .extension("tenant", "acme")
        .extension("priority", 5i64)
        .extension("urgent", true)
        .extension("partitionkey", "customer-3")
        .extension("correlationid", "corr-9")
        .extension("dataversion", "2")
        .extension(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .data(
            "application/json",
            serde_json::json!({"id": 7, "lines": [1, 2], "note": "é"}),
        )
        .build()
        .unwrap();
    let text = EventBuilderV10::new()
        .id("sdk-text-1")
        .ty("com.example.note")
        .source("/notes")
        .time("2024-05-06T09:08:09+02:00")
        .extension("tenant", "acme")
        .data("text/plain; charset=utf-8", "héllo \"there\"")
        .build()
        .unwrap();
    let blob = EventBuilderV10::new()
        .id("sdk-blob-1")
        .ty("com.example.blob")
        .source("urn:example:blobs")
        .data("application/octet-stream", vec![0u8, 159, 146, 150, 255])
        .build()
        .unwrap();
    let events = [json, text, blob];
    let raw = Raw::new();
    for event in &events {
        for record in [structured_record(event), binary_record(event)] {
            raw.produce(
                &t,
                record.key.as_deref(),
                Some(&record.value),
                some_values(&record.headers),
            )
            .await;
        }
    }
    let mut source = h.source(&t, "g").await.unwrap();
    for event in &events {
        for mode in ["structured", "binary"] {
            let d = next(&mut source).await;
            assert!(d.decode_error().is_none(), "{:?}", d.decode_error());
            let env = d.envelope().clone();
            d.ack().await.unwrap();
            let what = format!("{mode} {}", event.id());
            assert_eq!(env.id.as_str(), event.id(), "{what}");
            assert_eq!(env.event_type, event.ty(), "{what}");
            assert_eq!(env.source, event.source().as_str(), "{what}");
            assert_eq!(env.subject.as_deref(), event.subject(), "{what}");
            assert_eq!(env.time, sdk_time(event), "{what}");
            assert_eq!(
                Some(env.content_type.as_ref()),
                event.datacontenttype(),
                "{what}"
            );
            assert_eq!(
                env.key.as_deref().map(str::as_bytes),
                partition_key(event).as_deref(),
                "{what}: key"
            );
            assert_eq!(env.attempt, 1, "{what}");
            let mut got = expected_extensions(&env);
            got.remove("attempt");
            assert_eq!(got, extensions(event), "{what}: extensions");
            assert_data(event.data(), &env, &what);
        }
    }
    close_on_tansu(source).await.unwrap();
    assert_eq!(h.broker.count(&format!("{t}.dlq")).await.unwrap(), 0);
    h.broker.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Malformed input: dead-lettered with reason `decode`, value unchanged.
// ---------------------------------------------------------------------------

/// A malformed record: its name (also its key), value, headers, and what the
/// decode error must say.
struct Bad {
    name: &'static str,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    says: &'static str,
}

/// Malformed records, in both modes; the structured ones made from the SDK's
/// own output where there is one to break.
fn malformed() -> Vec<Bad> {
    let binary = |set: &[(&str, &[u8])], remove: &str| {
        let mut headers: Vec<(String, Vec<u8>)> = [
            ("ce_specversion", &b"1.0"[..]),
            ("ce_id", b"bad-1"),
            ("ce_type", b"com.example.bad"),
            ("ce_source", b"/bad"),
            (CONTENT_TYPE, b"application/json"),
            ("x-trace", b"abc"),
        ]
        .iter()
        .filter(|(k, _)| *k != remove)
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
        for (k, v) in set {
            headers.retain(|(name, _)| name != k);
            headers.push((k.to_string(), v.to_vec()));
        }
        headers
    };
    let structured = |ct: &str| vec![(CONTENT_TYPE.to_string(), ct.as_bytes().to_vec())];
    let valid = EventBuilderV10::new()
        .id("bad-2")
        .ty("com.example.bad")
        .source("/bad")
        .time("2024-05-06T07:08:09Z")
        .data("application/json", serde_json::json!({"a": 1}))
        .build()
        .unwrap();
    let doc = serde_json::to_value(&valid).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut d = doc.clone();
        f(d.as_object_mut().unwrap());
        serde_json::to_vec(&d).unwrap()
    };
    let v03 = EventBuilderV03::new()
        .id("old-1")
        .ty("com.example.old")
        .source("/old")
        .data("application/json", serde_json::json!({"a": 1}))
        .build()
        .unwrap();
    let not_utf8: &[u8] = &[0xc3, 0x28, 0xff];
    vec![
        Bad {
            name: "binary-bad-specversion",
            value: b"body 1".to_vec(),
            headers: binary(&[("ce_specversion", b"0.1")], ""),
            says: "specversion",
        },
        Bad {
            name: "binary-missing-id",
            value: b"body 2".to_vec(),
            headers: binary(&[], "ce_id"),
            says: "`id`",
        },
        Bad {
            name: "binary-bad-time",
            value: b"body 3".to_vec(),
            headers: binary(&[("ce_time", b"half past noon")], ""),
            says: "RFC 3339",
        },
        Bad {
            name: "binary-non-utf8-extension",
            value: b"body 4".to_vec(),
            headers: binary(&[("ce_tenant", not_utf8)], ""),
            says: "UTF-8",
        },
        Bad {
            name: "binary-non-utf8-id",
            value: b"body 5".to_vec(),
            headers: binary(&[("ce_id", not_utf8)], ""),
            says: "UTF-8",
        },
        Bad {
            name: "binary-non-utf8-content-type",
            value: b"\x00body 6\xff".to_vec(),
            headers: binary(&[(CONTENT_TYPE, not_utf8)], ""),
            says: "UTF-8",
        },
        Bad {
            name: "structured-bad-specversion",
            value: serde_json::to_vec(&v03).unwrap(),
            headers: structured(STRUCTURED_CONTENT_TYPE),
            says: "specversion",
        },
        Bad {
            name: "structured-missing-id",
            value: with(&|m| {
                m.remove("id");
            }),
            headers: structured(STRUCTURED_CONTENT_TYPE),
            says: "`id`",
        },
        Bad {
            name: "structured-bad-time",
            value: with(&|m| {
                m.insert("time".into(), "yesterday at noon".into());
            }),
            headers: structured(STRUCTURED_CONTENT_TYPE),
            says: "RFC 3339",
        },
        Bad {
            name: "structured-garbage",
            value: b"{not json at all".to_vec(),
            headers: structured(STRUCTURED_CONTENT_TYPE),
            says: "JSON",
        },
        Bad {
            name: "structured-empty",
            value: Vec::new(),
            headers: structured("application/cloudevents+json"),
            says: "JSON",
        },
        Bad {
            name: "structured-avro",
            value: serde_json::to_vec(&valid).unwrap(),
            headers: structured("application/cloudevents+avro"),
            says: "application/cloudevents+avro",
        },
    ]
}

/// Every malformed structured value but 0.3 (which postbox does not speak)
/// is refused by the SDK too: the oracle agrees they are broken.
fn check_the_oracle_refuses(cases: &[Bad]) {
    for Bad {
        name,
        value,
        headers,
        ..
    } in cases
    {
        if !name.starts_with("structured-") || headers[0].1.ends_with(b"avro") {
            continue;
        }
        let parsed = serde_json::from_slice::<cloudevents::Event>(value);
        if *name == "structured-bad-specversion" {
            assert!(parsed.is_ok(), "{name}");
        } else {
            assert!(parsed.is_err(), "the SDK accepts {name}");
        }
    }
}

/// The handler of the malformed-input test: every good record is handled.
fn accept(_: &Envelope) -> Result<(), HandlerError> {
    Ok(())
}

/// Each malformed record ends in the DLQ with reason `decode` and its
/// original value, key and headers, through the consumer's router; none
/// reaches the handler, nothing stalls (the good records mixed in are all
/// handled), nothing is dropped (the DLQ holds every one of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inputs_are_dead_lettered_with_reason_decode() {
    let Some(h) = tansu_in(
        "malformed_inputs_are_dead_lettered_with_reason_decode",
        ContentMode::Binary,
    )
    .await
    else {
        return;
    };
    let t = unique("interop-malformed");
    let dlq = format!("{t}.dlq");
    h.create(&t).await.unwrap();
    let cases = malformed();
    check_the_oracle_refuses(&cases);
    let raw = Raw::new();
    let good: Vec<Envelope> = (0..3)
        .map(|i| Envelope::new("com.example.ok", format!(r#"{{"n":{i}}}"#)))
        .collect();
    let mut offsets = BTreeMap::new();
    for (i, case) in cases.iter().enumerate() {
        if i % 5 == 0 {
            h.broker.publish(&t, good[i / 5].clone()).await.unwrap();
        }
        let offset = raw
            .produce(
                &t,
                Some(case.name.as_bytes()),
                Some(&case.value),
                some_values(&case.headers),
            )
            .await;
        offsets.insert(case.name, offset);
    }
    let (running, seen) = consumer(&h, &t, "malformed", accept).await;
    wait_count(&h.broker, &dlq, cases.len() as u64).await;
    wait_until("every good record handled", || {
        seen.lock().unwrap().len() >= good.len()
    })
    .await;
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.dead_lettered, cases.len() as u64, "{report:?}");
    assert_eq!(report.acked, good.len() as u64, "{report:?}");
    let handled: BTreeSet<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    let expected: BTreeSet<String> = good.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(handled, expected, "only the good records are handled");

    // What DeadLetterOps shows: every one, reason `decode`, what arrived.
    let dead: BTreeMap<String, Envelope> = h
        .broker
        .peek(&dlq, 100)
        .await
        .expect("peek")
        .into_iter()
        .map(|e| (e.key.clone().unwrap_or_default(), e))
        .collect();
    assert_eq!(dead.len(), cases.len(), "{:?}", dead.keys());
    for case in &cases {
        let name = case.name;
        let env = &dead[name];
        let m = DeadLetterMetadata::read(env).expect("metadata");
        assert_eq!(m.reason, FailureReason::Decode, "{name}");
        assert_eq!(m.error_type, "decode", "{name}");
        assert!(m.error.contains(case.says), "{name}: {}", m.error);
        assert_eq!(m.consumer, "malformed", "{name}");
        assert_eq!(m.origin.destination, t, "{name}");
        assert_eq!(m.origin.offset, Some(offsets[name]), "{name}");
        assert_eq!(env.event_type, UNDECODABLE_TYPE, "{name}");
        assert_eq!(&env.payload[..], &case.value[..], "{name}: the value");
    }
    assert_eq!(
        h.broker.count(&dlq).await.unwrap(),
        cases.len() as u64,
        "peek took nothing"
    );
    // The raw DLQ records carry the original value and key byte for byte.
    for m in read_raw(&dlq, cases.len()).await {
        let key = std::str::from_utf8(m.key().expect("a key")).unwrap();
        let case = cases.iter().find(|c| c.name == key).expect("a case");
        assert_eq!(
            m.payload().unwrap_or_default(),
            &case.value[..],
            "{key}: the value is unchanged"
        );
    }
    // A replay puts back each record as it arrived: key, value and headers.
    let report = h
        .broker
        .replay(&dlq, &|_: &Envelope| true, 100)
        .await
        .unwrap();
    assert_eq!(report.replayed, cases.len(), "{report:?}");
    assert_eq!(h.broker.count(&dlq).await.unwrap(), 0);
    let records = read_raw(&t, good.len() + 2 * cases.len()).await;
    let replayed = &records[good.len() + cases.len()..];
    for m in replayed {
        let key = std::str::from_utf8(m.key().expect("a key")).unwrap();
        let case = cases.iter().find(|c| c.name == key).expect("a case");
        assert_eq!(m.payload().unwrap_or_default(), &case.value[..], "{key}");
        let mut got = headers_of(m);
        let mut want: Vec<(String, Option<Vec<u8>>)> = case
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{key}: the headers as they arrived");
    }
    h.broker.close().await.unwrap();
}

// ---------------------------------------------------------------------------
// Findings: each test fails until its fix.
// ---------------------------------------------------------------------------

/// A `ce_` header without a value (null) is not an attribute value (the
/// binding's header values are UTF-8 strings): a decode failure, dead-lettered
/// with reason `decode` like a value that is not UTF-8 — never handled with
/// the attribute silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_attribute_header_values_are_decode_failures() {
    let Some(h) = tansu_in(
        "null_attribute_header_values_are_decode_failures",
        ContentMode::Binary,
    )
    .await
    else {
        return;
    };
    let t = unique("interop-null-header");
    let dlq = format!("{t}.dlq");
    h.create(&t).await.unwrap();
    let raw = Raw::new();
    let base: [(&str, Option<&[u8]>); 4] = [
        ("ce_specversion", Some(b"1.0")),
        ("ce_type", Some(b"com.example.order")),
        ("ce_source", Some(b"/shop")),
        (CONTENT_TYPE, Some(b"application/json")),
    ];
    let cases = ["ce_time", "ce_subject", "ce_tenant"];
    for (i, null) in cases.iter().enumerate() {
        let id = format!("null-{i}");
        let headers = base
            .iter()
            .copied()
            .chain([("ce_id", Some(id.as_bytes())), (*null, None)]);
        raw.produce(&t, Some(null.as_bytes()), Some(b"{}"), headers)
            .await;
    }
    let good = Envelope::new("com.example.ok", "{}");
    h.broker.publish(&t, good.clone()).await.unwrap();
    let (running, seen) = consumer(&h, &t, "nulls", accept).await;
    // Each one is either handled or dead-lettered; wait for all of them.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let handled = seen.lock().unwrap().len() as u64;
        let dead = h.broker.count(&dlq).await.unwrap();
        // Every null case and the good record.
        if handled + dead > cases.len() as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{handled} handled, {dead} dead-lettered after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();
    let handled: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.id != good.id)
        .map(|e| format!("{} {e:?}", e.id))
        .collect();
    assert!(
        handled.is_empty(),
        "handled with a null attribute header dropped: {handled:#?}"
    );
    let dead: BTreeMap<String, Envelope> = h
        .broker
        .peek(&dlq, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.key.clone().unwrap_or_default(), e))
        .collect();
    for null in cases {
        let m = DeadLetterMetadata::read(&dead[null]).expect("metadata");
        assert_eq!(m.reason, FailureReason::Decode, "{null}");
        assert!(m.error.contains(null), "{null}: {}", m.error);
    }
    h.broker.close().await.unwrap();
}

/// The names of a record's attribute headers (`ce_…`) and the SDK's
/// extensions that break the strict attribute-name rule. Plain headers
/// (`content-type`, postbox's `postbox-*`, and headers whose names are not
/// attribute names, such as `x-trace`) are outside the attribute set.
fn invalid_names(m: &OwnedMessage) -> Vec<String> {
    let mut out: Vec<String> = headers_of(m)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| {
            name.get(..CE_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(CE_PREFIX))
        })
        .filter(|name| !strict_attribute_name(&name[CE_PREFIX.len()..]))
        .map(|name| format!("header {name:?}"))
        .collect();
    out.extend(
        extensions(&oracle(m))
            .into_keys()
            .filter(|name| !strict_attribute_name(name))
            .map(|name| format!("extension {name:?}")),
    );
    out
}

/// A foreign record's type is refused by this handler.
fn refuse_foreign(env: &Envelope) -> Result<(), HandlerError> {
    if env.event_type == "postbox.foreign" {
        Err(HandlerError::permanent(Refused))
    } else {
        Ok(())
    }
}

/// Every dead letter postbox writes is a valid CloudEvent, in both modes,
/// also when what it carries came from outside: the dead letter of an
/// undecodable record (whose headers — `ce_id`, `content-type`, `x-trace`,
/// one that is not UTF-8 — it keeps for replay) and of a foreign record
/// (whose `x-trace` header is a user header of its envelope). Headers whose
/// names are not attribute names travel outside the attribute set, as plain
/// headers, and come back as envelope headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_undecodable_and_foreign_records_are_valid_cloudevents() {
    let mut found = Vec::new();
    for mode in [ContentMode::Binary, ContentMode::Structured] {
        let Some(h) = tansu_in(
            "dead_letters_of_undecodable_and_foreign_records_are_valid_cloudevents",
            mode,
        )
        .await
        else {
            return;
        };
        let t = unique("interop-dlq-names");
        let dlq = format!("{t}.dlq");
        h.create(&t).await.unwrap();
        let raw = Raw::new();
        let undecodable: [(&str, Option<&[u8]>); 7] = [
            ("ce_specversion", Some(b"0.1")),
            ("ce_id", Some(b"bad-1")),
            ("ce_type", Some(b"com.example.bad")),
            ("ce_source", Some(b"/bad")),
            (CONTENT_TYPE, Some(b"application/json")),
            ("x-trace", Some(b"abc")),
            ("x-bytes", Some(&[0xc3, 0x28, 0xff])),
        ];
        raw.produce(&t, Some(b"undecodable"), Some(b"{}"), undecodable)
            .await;
        let foreign: [(&str, Option<&[u8]>); 1] = [("x-trace", Some(b"abc"))];
        raw.produce(&t, Some(b"foreign"), Some(b"legacy"), foreign)
            .await;
        let (running, _) = consumer(&h, &t, "names", refuse_foreign).await;
        wait_count(&h.broker, &dlq, 2).await;
        let report = running.shutdown().await.unwrap();
        assert_eq!(report.dead_lettered, 2, "{report:?}");
        for m in read_raw(&dlq, 2).await {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            for name in invalid_names(&m) {
                found.push(format!("{mode:?} dead letter of the {key} record: {name}"));
            }
        }
        // ... and the plain headers come back as envelope headers.
        for d in h.broker.peek(&dlq, 10).await.unwrap() {
            assert_eq!(
                d.headers.get("x-trace").map(String::as_str),
                Some("abc"),
                "{mode:?}: {:?}",
                d.headers
            );
        }
        h.broker.close().await.unwrap();
    }
    assert!(
        found.is_empty(),
        "not valid CloudEvents attribute names:\n{}",
        found.join("\n")
    );
}
