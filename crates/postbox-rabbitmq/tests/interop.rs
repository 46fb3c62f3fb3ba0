//! The wire and failure contract against the real broker, checked with an
//! independent CloudEvents implementation (`cloudevents-sdk`) as the oracle:
//! what postbox writes (binary and structured mode, retry and dead-letter
//! copies) is rebuilt from the raw AMQP message by the SDK; what the SDK (or
//! a binding-conformant producer) writes is consumed by postbox with every
//! attribute; malformed input ends in the DLQ with reason `decode` and its
//! body unchanged, through the consumer's own dead-letter router.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Data, EventBuilder, EventBuilderV10};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use postbox_core::{
    handler_fn, Broker, Consumer, DeadLetterOps, DeadLetterRouter, Envelope, ErrorKind, Publisher,
    RunningConsumer, Source,
};
use postbox_rabbitmq::{
    ContentMode, QueueSpec, RabbitBroker, RabbitConfig, RabbitSource, Topology, MAX_METADATA_BYTES,
    STRUCTURED_CONTENT_TYPE, UNDECODABLE_TYPE,
};
use postbox_testkit::env::unique;

use postbox_testkit::interop::{expected_extensions, strict_attribute_name};

const WAIT: Duration = Duration::from_secs(30);

/// A plain lapin connection: the independent producer and reader.
struct Raw {
    _connection: Connection,
    channel: Channel,
}

impl Raw {
    async fn open() -> Raw {
        let connection = Connection::connect(&common::amqp_url(), Default::default())
            .await
            .expect("raw connection");
        let channel = connection.create_channel().await.expect("raw channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Raw {
            _connection: connection,
            channel,
        }
    }

    /// Publishes to a queue through the default exchange and waits for the confirm.
    async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties,
            )
            .await
            .expect("raw publish")
            .await
            .expect("raw confirm");
    }

    /// Takes one message off `queue` without acking it (the caller nacks it
    /// back), waiting for it.
    async fn get_unacked(&self, queue: &str) -> lapin::message::Delivery {
        self.take(queue, false).await
    }

    /// Takes one message off `queue` (auto-ack), waiting for it.
    async fn get(&self, queue: &str) -> lapin::message::Delivery {
        self.take(queue, true).await
    }

    async fn take(&self, queue: &str, no_ack: bool) -> lapin::message::Delivery {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack })
                .await
                .expect("basic.get");
            if let Some(m) = got {
                return m.delivery;
            }
            assert!(Instant::now() < deadline, "nothing arrived on {queue}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The headers of a binary-mode CloudEvent: `specversion`, `id`, `type`,
/// `source`, plus `extra`.
fn ce_headers(id: &str, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("cloudEvents:specversion".into(), text("1.0"));
    t.insert("cloudEvents:id".into(), text(id));
    t.insert("cloudEvents:type".into(), text("com.example.order"));
    t.insert("cloudEvents:source".into(), text("/shop"));
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// A classic queue with its `.dlq`.
async fn declare(broker: &RabbitBroker, queue: &str) {
    broker
        .declare(&Topology::new().queue(QueueSpec::classic(queue)))
        .await
        .expect("declare");
}

async fn source(broker: &RabbitBroker, queue: &str) -> RabbitSource {
    broker
        .consume(queue, Topology::new().queue(QueueSpec::classic(queue)), 16)
        .await
        .expect("consume")
}

async fn next(source: &mut RabbitSource) -> postbox_rabbitmq::RabbitDelivery {
    postbox_testkit::suite::next_within(source, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Envelopes a consumer's handler saw.
type Seen = Arc<Mutex<Vec<Envelope>>>;

/// A consumer runtime named `name` on `queue` whose handler records what it
/// sees, dead-lettering through `router`.
async fn consumer(
    broker: &RabbitBroker,
    queue: &str,
    name: &str,
    router: DeadLetterRouter,
) -> (RunningConsumer, Seen) {
    let seen: Seen = Default::default();
    let record = seen.clone();
    let running = Consumer::builder(
        source(broker, queue).await,
        handler_fn(move |env: Envelope| {
            record.lock().unwrap().push(env);
            async { Ok(()) }
        }),
    )
    .name(name)
    .concurrency(4)
    .dead_letter(router)
    .build()
    .expect("consumer")
    .spawn();
    (running, seen)
}

/// Waits until `queue` holds `n` ready messages.
async fn wait_count(broker: &RabbitBroker, queue: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let count = broker.count(queue).await.expect("count");
        if count >= n {
            assert_eq!(count, n, "{queue} holds more than expected");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {count} of {n} messages after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dead letters of a DLQ by their id.
async fn peek_by_id(broker: &RabbitBroker, dlq: &str) -> BTreeMap<String, Envelope> {
    broker
        .peek(dlq, 100)
        .await
        .expect("peek")
        .into_iter()
        .map(|e| (e.id.to_string(), e))
        .collect()
}

// ---------------------------------------------------------------------------
// Findings: each test failed before its fix.
// ---------------------------------------------------------------------------

/// A structured-mode message (content type `application/cloudevents+json`,
/// the event as the body) is a CloudEvent, not a foreign message.
#[tokio::test]
async fn structured_mode_messages_are_decoded_as_cloudevents() {
    let Some(broker) = common::broker("structured_mode_messages_are_decoded").await else {
        return;
    };
    let q = unique("pb-structured-in");
    let mut source = source(&broker, &q).await;
    let event = EventBuilderV10::new()
        .id("sdk-structured-1")
        .ty("com.example.order.placed")
        .source("/sdk/tests")
        .subject("order-7")
        .time("2024-05-06T07:08:09.123Z")
        .extension("tenant", "acme")
        .extension("priority", 5i64)
        .extension("urgent", true)
        .data(
            "application/json",
            serde_json::json!({"n": 1, "items": [1, 2]}),
        )
        .build()
        .unwrap();
    let raw = Raw::open().await;
    raw.publish(
        &q,
        &serde_json::to_vec(&event).unwrap(),
        BasicProperties::default()
            .with_content_type("application/cloudevents+json; charset=UTF-8".into()),
    )
    .await;
    let d = next(&mut source).await;
    let env = postbox_core::Delivery::envelope(&d).clone();
    postbox_core::Delivery::ack(d).await.unwrap();
    source.close().await.unwrap();
    assert_eq!(env.id.as_str(), "sdk-structured-1");
    assert_eq!(env.event_type, "com.example.order.placed");
    assert_eq!(env.source, "/sdk/tests");
    assert_eq!(env.subject.as_deref(), Some("order-7"));
    assert_eq!(
        env.time,
        Some(UNIX_EPOCH + Duration::from_millis(1_714_979_289_123))
    );
    assert_eq!(env.content_type, "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&env.payload).unwrap(),
        serde_json::json!({"n": 1, "items": [1, 2]})
    );
    assert_eq!(env.headers["tenant"], "acme");
    assert_eq!(env.headers["priority"], "5");
    assert_eq!(env.headers["urgent"], "true");
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dlq")).await.unwrap();
}

/// Binary mode: the `content_type` property is the `datacontenttype`.
#[tokio::test]
async fn binary_mode_reads_datacontenttype_from_the_content_type_property() {
    let Some(broker) = common::broker("binary_mode_reads_datacontenttype").await else {
        return;
    };
    let q = unique("pb-content-type");
    let mut source = source(&broker, &q).await;
    let raw = Raw::open().await;
    raw.publish(
        &q,
        b"hello",
        BasicProperties::default()
            .with_headers(ce_headers("ct-1", &[]))
            .with_content_type("text/plain; charset=utf-8".into()),
    )
    .await;
    let d = next(&mut source).await;
    let env = postbox_core::Delivery::envelope(&d).clone();
    postbox_core::Delivery::ack(d).await.unwrap();
    source.close().await.unwrap();
    assert_eq!(env.id.as_str(), "ct-1");
    assert_eq!(env.content_type, "text/plain; charset=utf-8");
    assert_eq!(&env.payload[..], b"hello");
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dlq")).await.unwrap();
}

/// Typed attributes in their native AMQP types: a timestamp `time`, an
/// integer `attempt`, integer and boolean extensions.
#[tokio::test]
async fn native_amqp_types_of_typed_attributes_are_accepted() {
    let Some(broker) = common::broker("native_amqp_types_are_accepted").await else {
        return;
    };
    let q = unique("pb-native-types");
    let mut source = source(&broker, &q).await;
    let raw = Raw::open().await;
    let headers = ce_headers(
        "native-1",
        &[
            ("cloudEvents:time", AMQPValue::Timestamp(1_700_000_000)),
            ("cloudEvents:attempt", AMQPValue::LongInt(3)),
            ("cloudEvents:priority", AMQPValue::ShortShortUInt(5)),
            ("cloudEvents:urgent", AMQPValue::Boolean(true)),
        ],
    );
    raw.publish(&q, b"{}", BasicProperties::default().with_headers(headers))
        .await;
    let d = tokio::time::timeout(Duration::from_secs(10), source.next())
        .await
        .expect("the message never reached the consumer (dead-lettered?)")
        .unwrap()
        .unwrap();
    let env = postbox_core::Delivery::envelope(&d).clone();
    assert_eq!(postbox_core::Delivery::attempt(&d), 3);
    postbox_core::Delivery::ack(d).await.unwrap();
    source.close().await.unwrap();
    assert_eq!(
        env.time,
        Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    );
    assert_eq!(env.attempt, 3);
    assert_eq!(env.headers["priority"], "5");
    assert_eq!(env.headers["urgent"], "true");
    assert_eq!(broker.count(&format!("{q}.dlq")).await.unwrap(), 0);
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dlq")).await.unwrap();
}

/// A header that is not UTF-8 text, or a `time` of the wrong AMQP type, is a
/// decode failure: dead-lettered with reason `decode`, never handled with
/// replacement characters or with the attribute dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_or_mistyped_headers_are_decode_failures() {
    let Some(broker) = common::broker("lossy_or_mistyped_headers").await else {
        return;
    };
    let q = unique("pb-lossy");
    let dlq = format!("{q}.dlq");
    declare(&broker, &q).await;
    let (running, seen) =
        consumer(&broker, &q, "lossy", DeadLetterRouter::new(broker.clone())).await;
    let raw = Raw::open().await;
    let not_utf8: &[u8] = &[b'i', b'd', 0xff, 0xfe];
    let cases = [
        (
            "long-string-id",
            AMQPValue::LongString(LongString::from(not_utf8.to_vec())),
            "cloudEvents:id",
        ),
        (
            "byte-array-id",
            AMQPValue::ByteArray(not_utf8.to_vec().into()),
            "cloudEvents:id",
        ),
        (
            "array-time",
            AMQPValue::FieldArray(FieldArray::from(vec![text("2024-01-01T00:00:00Z")])),
            "cloudEvents:time",
        ),
    ];
    for (name, value, header) in &cases {
        let mut headers = ce_headers(name, &[]);
        headers.insert((*header).into(), value.clone());
        raw.publish(
            &q,
            name.as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_message_id((*name).into()),
        )
        .await;
    }
    wait_count(&broker, &dlq, cases.len() as u64).await;
    running.shutdown().await.unwrap();
    assert!(
        seen.lock().unwrap().is_empty(),
        "handled: {:?}",
        seen.lock().unwrap()
    );
    let dead = peek_by_id(&broker, &dlq).await;
    for (name, _, header) in &cases {
        let env = &dead[*name];
        assert_eq!(env.headers["dlqreason"], "decode", "{name}");
        assert!(
            env.headers["dlqerror"].contains(header),
            "{name}: {}",
            env.headers["dlqerror"]
        );
        assert_eq!(&env.payload[..], name.as_bytes(), "{name}");
    }
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&dlq).await.unwrap();
}

/// An undecodable message is dead-lettered by the consumer's own router (its
/// route, its consumer name), with what arrived: the body unchanged and the
/// AMQP headers (subject and partition key kept) — its attribute headers
/// under `amqp:header:`, so the copy is a valid CloudEvent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_go_through_the_consumers_router() {
    let Some(broker) = common::broker("undecodable_messages_router").await else {
        return;
    };
    let q = unique("pb-router");
    let custom = format!("{q}.custom");
    declare(&broker, &q).await;
    broker
        .declare(&Topology::new().queue(QueueSpec::classic(&custom).without_dlq()))
        .await
        .unwrap();
    let route = custom.clone();
    let router = DeadLetterRouter::new(broker.clone()).with_route(move |_, _| route.clone());
    let (running, seen) = consumer(&broker, &q, "billing", router).await;
    let raw = Raw::open().await;
    let mut headers = ce_headers(
        "r-1",
        &[
            ("cloudEvents:subject", text("order-9")),
            ("cloudEvents:partitionkey", text("customer-3")),
            ("x-custom", text("kept")),
        ],
    );
    headers.insert("cloudEvents:specversion".into(), text("7.0"));
    let body = b"\x00raw body\xff";
    raw.publish(
        &q,
        body,
        BasicProperties::default()
            .with_headers(headers)
            .with_app_id("legacy-app".into()),
    )
    .await;
    wait_count(&broker, &custom, 1).await;
    running.shutdown().await.unwrap();
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(broker.count(&format!("{q}.dlq")).await.unwrap(), 0);
    let dead = broker.peek(&custom, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let env = &dead[0];
    assert_eq!(&env.payload[..], body);
    let h = &env.headers;
    assert_eq!(h["dlqreason"], "decode");
    assert_eq!(h["dlqconsumer"], "billing");
    assert_eq!(h["dlqorigin"], q);
    assert!(h["dlqerror"].contains("specversion"), "{}", h["dlqerror"]);
    assert_eq!(h["amqp:header:cloudEvents:specversion"], "7.0");
    assert_eq!(h["amqp:header:cloudEvents:id"], "r-1");
    assert_eq!(h["amqp:header:cloudEvents:source"], "/shop");
    assert_eq!(h["amqp:header:cloudEvents:subject"], "order-9");
    assert_eq!(h["amqp:header:cloudEvents:partitionkey"], "customer-3");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["amqp:app-id"], "legacy-app");
    for name in [&q, &format!("{q}.dlq"), &custom] {
        broker.delete_queue(name).await.unwrap();
    }
}

/// count, peek, replay and purge see undecodable dead letters: those the
/// router wrote (raw, with their metadata; replay puts the original message
/// back) and those the broker dead-lettered itself (with `x-death`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_operations_show_undecodable_dead_letters() {
    let Some(broker) = common::broker("dead_letter_operations_undecodable").await else {
        return;
    };
    let raw = Raw::open().await;
    let mut bad = ce_headers("bad-1", &[("cloudEvents:subject", text("s"))]);
    bad.insert("cloudEvents:specversion".into(), text("2.0"));
    let body = b"original \xfe bytes";

    // Dead-lettered by the consumer's router.
    let q = unique("pb-dlqops");
    let dlq = format!("{q}.dlq");
    declare(&broker, &q).await;
    let (running, seen) = consumer(&broker, &q, "ops", DeadLetterRouter::new(broker.clone())).await;
    raw.publish(
        &q,
        body,
        BasicProperties::default()
            .with_headers(bad.clone())
            .with_message_id("m-1".into())
            .with_content_type("application/x-custom".into()),
    )
    .await;
    wait_count(&broker, &dlq, 1).await;
    running.shutdown().await.unwrap();
    assert!(seen.lock().unwrap().is_empty());
    let peeked = broker.peek(&dlq, 10).await.unwrap();
    assert_eq!(peeked.len(), 1);
    let env = &peeked[0];
    assert_eq!(&env.payload[..], body);
    assert_eq!(env.headers["dlqreason"], "decode");
    assert_eq!(env.headers["amqp:header:cloudEvents:specversion"], "2.0");
    assert_eq!(env.headers["amqp:content-type"], "application/x-custom");
    assert_eq!(broker.count(&dlq).await.unwrap(), 1, "peek took nothing");
    let report = broker.replay(&dlq, &|_| true, 10).await.unwrap();
    assert_eq!((report.replayed, report.skipped), (1, 0));
    // Replay puts the original message back, as it arrived.
    let back = raw.get(&q).await;
    assert_eq!(&back.data[..], body);
    let props = &back.properties;
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m-1");
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/x-custom"
    );
    let headers = props.headers().as_ref().unwrap().inner();
    assert_eq!(headers.get("cloudEvents:specversion"), Some(&text("2.0")));
    assert_eq!(headers.get("cloudEvents:subject"), Some(&text("s")));
    assert!(
        !headers.keys().any(|k| k.as_str().contains("dlq")),
        "{headers:?}"
    );
    assert_eq!(broker.count(&dlq).await.unwrap(), 0);

    // Dead-lettered by the broker (a reject): only `x-death` says why.
    let q2 = unique("pb-dlqops-broker");
    let dlq2 = format!("{q2}.dlq");
    declare(&broker, &q2).await;
    raw.publish(
        &q2,
        body,
        BasicProperties::default()
            .with_headers(bad)
            .with_message_id("m-2".into()),
    )
    .await;
    let got = raw
        .channel
        .basic_get(q2.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("the message");
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    wait_count(&broker, &dlq2, 1).await;
    let peeked = broker.peek(&dlq2, 10).await.unwrap();
    assert_eq!(peeked.len(), 1);
    let env = &peeked[0];
    assert_eq!(env.id.as_str(), "m-2");
    assert_eq!(&env.payload[..], body);
    assert_eq!(env.headers["amqp:header:cloudEvents:specversion"], "2.0");
    assert!(
        env.headers["amqp:header:x-death"].contains(&q2),
        "{:?}",
        env.headers
    );
    // Replay sends it back to the queue it died in (from `x-death`).
    let report = broker.replay(&dlq2, &|_| true, 10).await.unwrap();
    assert_eq!((report.replayed, report.skipped), (1, 0));
    let back = raw.get(&q2).await;
    assert_eq!(&back.data[..], body);
    let headers = back.properties.headers().as_ref().unwrap().inner();
    assert_eq!(headers.get("cloudEvents:specversion"), Some(&text("2.0")));
    assert!(!headers.contains_key("x-death"));
    // Purge removes what is there, and says how many.
    raw.publish(&dlq2, body, BasicProperties::default()).await;
    assert_eq!(broker.purge(&dlq2).await.unwrap(), 1);
    for name in [&q, &dlq, &q2, &dlq2] {
        broker.delete_queue(name).await.unwrap();
    }
}

/// Headers too large for one AMQP frame are refused before sending: the
/// broker would close the whole publishing connection (`FRAME_ERROR`) and
/// fail every publish in flight with it.
#[tokio::test]
async fn headers_larger_than_a_frame_fail_alone_before_sending() {
    let url = format!("{}?frame_max=4096", common::amqp_url());
    let Some(broker) = common::broker_with(
        "headers_larger_than_a_frame",
        RabbitConfig::from_url(&url).unwrap(),
    )
    .await
    else {
        return;
    };
    let q = unique("pb-frame");
    declare(&broker, &q).await;
    let mut batch: Vec<Envelope> = (0..21)
        .map(|i| Envelope::new("t", format!("{i}")))
        .collect();
    batch[10] = Envelope::builder("t")
        .header("big", "x".repeat(6000))
        .build();
    let report = broker.publish_batch(&q, batch).await;
    let failures: Vec<(usize, ErrorKind)> = report
        .failures()
        .map(|(i, e)| (i, e.error.kind().clone()))
        .collect();
    assert_eq!(failures, [(10, ErrorKind::Encode)], "{report:?}");
    assert_eq!(broker.count(&q).await.unwrap(), 20);
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dlq")).await.unwrap();
}

// ---------------------------------------------------------------------------
// Interop: postbox writes, the SDK reads.
// ---------------------------------------------------------------------------

/// The CloudEvent the SDK rebuilds from a raw AMQP message: structured mode
/// (`application/cloudevents…`) through the SDK's own JSON event format,
/// binary mode from the `cloudEvents:` headers and the `content_type`
/// property, as the AMQP binding maps them.
fn oracle(d: &lapin::message::Delivery) -> cloudevents::Event {
    let content_type = d
        .properties
        .content_type()
        .as_ref()
        .map(|c| c.as_str().to_string());
    if let Some(ct) = content_type
        .as_deref()
        .filter(|ct| ct.starts_with("application/cloudevents"))
    {
        assert_eq!(ct, "application/cloudevents+json; charset=UTF-8");
        return serde_json::from_slice(&d.data).expect("the SDK reads the structured body");
    }
    let headers = d
        .properties
        .headers()
        .as_ref()
        .expect("binary mode: headers");
    let mut builder = EventBuilderV10::new();
    let mut specversion = None;
    for (k, v) in headers.inner() {
        let Some(name) = k.as_str().strip_prefix("cloudEvents:") else {
            continue;
        };
        let AMQPValue::LongString(s) = v else {
            panic!("{k} is {v:?}, not a string");
        };
        let s = std::str::from_utf8(s.as_bytes())
            .expect("UTF-8 attribute")
            .to_string();
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
                // The binding carries it in the property; the header agrees.
                assert_eq!(Some(&s), content_type.as_ref(), "datacontenttype header");
                builder
            }
            _ => builder.extension(name, s),
        };
    }
    assert_eq!(specversion.as_deref(), Some("1.0"));
    if let Some(ct) = content_type {
        builder = builder.data(ct, d.data.clone());
    }
    builder.build().expect("the SDK builds the event")
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
    let extensions: BTreeMap<String, String> = event
        .iter_extensions()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(extensions, expected_extensions(env), "{what}: extensions");
    for name in extensions.keys() {
        assert!(
            strict_attribute_name(name),
            "{what}: `{name}` is not a valid attribute name"
        );
    }
    match event.data() {
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

/// What postbox writes in `mode` — a message, its retry copy, its
/// dead-letter copy — is the same CloudEvent to the SDK.
async fn postbox_writes_what_the_sdk_reads(test: &str, mode: ContentMode) {
    // A delay exchange of this test's own, so its retry copy waits in a tier
    // queue nobody else writes to.
    let delay = format!("pb-interop-delay-{mode:?}").to_lowercase();
    let tier = format!("{delay}.60000ms");
    let config = RabbitConfig::new(common::amqp_url())
        .content_mode(mode)
        .delay_exchange(&delay)
        .delay_tiers([Duration::from_secs(60)]);
    let Some(broker) = common::broker_with(test, config).await else {
        return;
    };
    broker.declare_delay_tiers().await.unwrap();
    broker.purge(&tier).await.unwrap();
    let q = unique("pb-interop-out");
    let dlq = format!("{q}.dlq");
    declare(&broker, &q).await;
    let raw = Raw::open().await;
    let time = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    let messages = [
        Envelope::builder("com.example.order.placed")
            .source("/shop/orders")
            .time(time)
            .subject("order-7")
            .schema_version("2")
            .correlation_id("corr-1")
            .causation_id("cause-1")
            .key("customer-3")
            .trace_context(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                Some("vendor=1".into()),
            )
            .header("tenant", "acme")
            .payload(r#"{"id":7,"total":12.5,"lines":[{"sku":"a"}]}"#)
            .build(),
        Envelope::builder("com.example.note")
            .source("https://example.com/notes")
            .content_type("text/plain; charset=utf-8")
            .payload("héllo \"world\"")
            .build(),
        Envelope::builder("com.example.blob")
            .source("urn:example:blobs")
            .content_type("application/octet-stream")
            .payload(vec![0u8, 159, 146, 150, 255])
            .build(),
    ];
    for env in &messages {
        broker.publish(&q, env.clone()).await.unwrap();
        let got = raw.get(&q).await;
        assert_eq!(got.properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            got.properties.message_id().as_ref().unwrap().as_str(),
            env.id.as_str()
        );
        assert_eq!(
            got.properties.kind().as_ref().unwrap().as_str(),
            env.event_type
        );
        if let Some(t) = env.time {
            let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
            assert_eq!(got.properties.timestamp(), &Some(secs));
        }
        if mode == ContentMode::Binary {
            assert_eq!(
                &got.data[..],
                &env.payload[..],
                "binary: the body is the payload"
            );
        }
        assert_same(&oracle(&got), env, &format!("{mode:?} {}", env.event_type));
    }

    // The retry and dead-letter copies of the first message.
    let original = &messages[0];
    broker.publish(&q, original.clone()).await.unwrap();
    broker.publish(&q, original.clone()).await.unwrap();
    let mut source = source(&broker, &q).await;
    let first = next(&mut source).await;
    let retry = postbox_core::Retry {
        delay: Duration::from_secs(60),
        next_attempt: 2,
        first_failed_at: UNIX_EPOCH + Duration::from_secs(1_700_000_100),
        reason: "handler-error",
    };
    postbox_core::Delivery::retry(first, retry.clone())
        .await
        .unwrap();
    let second = next(&mut source).await;
    let metadata = postbox_core::DeadLetterMetadata {
        reason: postbox_core::FailureReason::RetriesExhausted,
        error: "db down".into(),
        error_type: "transient".into(),
        attempts: 5,
        first_failed_at: UNIX_EPOCH + Duration::from_secs(1_700_000_100),
        last_failed_at: UNIX_EPOCH + Duration::from_secs(1_700_000_200),
        origin: postbox_core::Delivery::origin(&second),
        consumer: "billing".into(),
    };
    DeadLetterRouter::new(broker.clone())
        .dead_letter(second, &metadata)
        .await
        .unwrap();
    source.close().await.unwrap();

    let copy = raw.get(&tier).await;
    let expected = retry.next_envelope(original);
    assert_eq!(expected.headers["retryreason"], "handler-error");
    assert_same(&oracle(&copy), &expected, &format!("{mode:?} retry copy"));

    let dead = raw.get(&dlq).await;
    let mut expected = original.clone();
    metadata.apply(&mut expected);
    assert_eq!(expected.headers["dlqreason"], "retries-exhausted");
    assert_same(
        &oracle(&dead),
        &expected,
        &format!("{mode:?} dead-letter copy"),
    );

    for name in [&q, &dlq, &tier] {
        broker.delete_queue(name).await.unwrap();
    }
    broker.close().await.unwrap();
}

#[tokio::test]
async fn binary_mode_is_read_by_the_sdk() {
    postbox_writes_what_the_sdk_reads("binary_mode_is_read_by_the_sdk", ContentMode::Binary).await;
}

#[tokio::test]
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

/// Events written by the SDK — structured (its own JSON serialization) and
/// binary (its attributes as `cloudEvents:` headers in their native AMQP
/// types: a timestamp `time`, integer and boolean extensions) — arrive in
/// postbox with every attribute.
#[tokio::test]
async fn events_the_sdk_writes_arrive_with_every_attribute() {
    let Some(broker) = common::broker("events_the_sdk_writes_arrive").await else {
        return;
    };
    let q = unique("pb-interop-in");
    let mut source = source(&broker, &q).await;
    let raw = Raw::open().await;
    let json = EventBuilderV10::new()
        .id("sdk-json-1")
        .ty("com.example.order.placed")
        .source("https://example.com/shop")
        .subject("order-7")
        .time("2024-05-06T07:08:09.123456Z")
        .extension("tenant", "acme")
        .extension("priority", 5i64)
        .extension("urgent", true)
        .data(
            "application/json",
            serde_json::json!({"id": 7, "lines": [1, 2]}),
        )
        .build()
        .unwrap();
    let text = EventBuilderV10::new()
        .id("sdk-text-1")
        .ty("com.example.note")
        .source("/notes")
        .time("2024-05-06T07:08:09Z")
        .extension("tenant", "acme")
        .data("text/plain; charset=utf-8", "héllo")
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
    for event in &events {
        raw.publish(
            &q,
            &serde_json::to_vec(event).unwrap(),
            BasicProperties::default().with_content_type(STRUCTURED_CONTENT_TYPE.into()),
        )
        .await;
        let (headers, content_type, body) = binary_message(event);
        let mut props = BasicProperties::default().with_headers(headers);
        if let Some(ct) = content_type {
            props = props.with_content_type(ct.as_str().into());
        }
        raw.publish(&q, &body, props).await;
    }
    for event in &events {
        for mode in ["structured", "binary"] {
            let d = next(&mut source).await;
            let env = postbox_core::Delivery::envelope(&d).clone();
            postbox_core::Delivery::ack(d).await.unwrap();
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
            let extensions: BTreeMap<String, String> = event
                .iter_extensions()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(
                env.headers.clone().into_iter().collect::<BTreeMap<_, _>>(),
                extensions,
                "{what}"
            );
            match event.data().unwrap() {
                Data::Json(v) => assert_eq!(
                    &serde_json::from_slice::<serde_json::Value>(&env.payload).unwrap(),
                    v,
                    "{what}"
                ),
                Data::String(s) => assert_eq!(&env.payload[..], s.as_bytes(), "{what}"),
                Data::Binary(b) => assert_eq!(&env.payload[..], &b[..], "{what}"),
            }
        }
    }
    source.close().await.unwrap();
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dlq")).await.unwrap();
}

/// An SDK event in binary mode as a binding-conformant AMQP producer writes
/// it: attributes as `cloudEvents:` headers in their native AMQP types,
/// `datacontenttype` as the `content_type` property, the data as the body.
fn binary_message(event: &cloudevents::Event) -> (FieldTable, Option<String>, Vec<u8>) {
    let mut headers = FieldTable::default();
    headers.insert("cloudEvents:specversion".into(), text("1.0"));
    headers.insert("cloudEvents:id".into(), text(event.id()));
    headers.insert("cloudEvents:type".into(), text(event.ty()));
    headers.insert("cloudEvents:source".into(), text(event.source().as_str()));
    if let Some(s) = event.subject() {
        headers.insert("cloudEvents:subject".into(), text(s));
    }
    if let Some(t) = event.time() {
        // An AMQP timestamp holds whole seconds; finer times go as the
        // canonical string (both forms must be read).
        let value = if t.timestamp_subsec_nanos() == 0 {
            AMQPValue::Timestamp(u64::try_from(t.timestamp()).unwrap())
        } else {
            text(&t.to_rfc3339())
        };
        headers.insert("cloudEvents:time".into(), value);
    }
    for (name, value) in event.iter_extensions() {
        let value = match value {
            ExtensionValue::String(s) => text(s),
            ExtensionValue::Integer(n) => AMQPValue::LongLongInt(*n),
            ExtensionValue::Boolean(b) => AMQPValue::Boolean(*b),
        };
        headers.insert(format!("cloudEvents:{name}").into(), value);
    }
    let body = match event.data() {
        Some(Data::Json(v)) => serde_json::to_vec(v).unwrap(),
        Some(Data::String(s)) => s.clone().into_bytes(),
        Some(Data::Binary(b)) => b.clone(),
        None => Vec::new(),
    };
    (headers, event.datacontenttype().map(str::to_string), body)
}

// ---------------------------------------------------------------------------
// Malformed input: dead-lettered with reason `decode`, body unchanged.
// ---------------------------------------------------------------------------

/// Each malformed message ends in the DLQ with reason `decode` and its
/// original body, through the consumer's router; none reaches the handler,
/// nothing panics or stalls (a good message after them is handled), nothing
/// is dropped (the queue is empty, the DLQ holds every one of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inputs_are_dead_lettered_with_reason_decode() {
    let Some(broker) = common::broker("malformed_inputs_are_dead_lettered").await else {
        return;
    };
    let q = unique("pb-malformed");
    let dlq = format!("{q}.dlq");
    declare(&broker, &q).await;
    let (running, seen) = consumer(
        &broker,
        &q,
        "malformed",
        DeadLetterRouter::new(broker.clone()),
    )
    .await;
    let raw = Raw::open().await;
    let binary = |extra: &[(&str, AMQPValue)], remove: &str| {
        let mut h = ce_headers("x", extra);
        let mut kept = FieldTable::default();
        for (k, v) in h.inner() {
            if k.as_str() != remove {
                kept.insert(k.clone(), v.clone());
            }
        }
        h = kept;
        BasicProperties::default().with_headers(h)
    };
    let structured =
        || BasicProperties::default().with_content_type(STRUCTURED_CONTENT_TYPE.into());
    let not_utf8: &[u8] = &[0xc3, 0x28, 0xff];
    let cases: Vec<(&str, BasicProperties, Vec<u8>, &str)> = vec![
        (
            "bad-specversion",
            binary(&[("cloudEvents:specversion", text("0.1"))], ""),
            b"body 1".to_vec(),
            "specversion",
        ),
        (
            "missing-id",
            binary(&[], "cloudEvents:id"),
            b"body 2".to_vec(),
            "`id`",
        ),
        (
            "bad-time",
            binary(&[("cloudEvents:time", text("half past noon"))], ""),
            b"body 3".to_vec(),
            "RFC 3339",
        ),
        (
            "non-utf8-header",
            binary(
                &[(
                    "cloudEvents:tenant",
                    AMQPValue::LongString(LongString::from(not_utf8.to_vec())),
                )],
                "",
            ),
            b"body 4".to_vec(),
            "UTF-8",
        ),
        (
            "garbage-structured",
            structured(),
            b"{not json at all".to_vec(),
            "JSON",
        ),
        ("empty-structured", structured(), Vec::new(), "JSON"),
        (
            "oversized-header",
            binary(
                &[("cloudEvents:big", text(&"x".repeat(MAX_METADATA_BYTES + 1)))],
                "",
            ),
            b"body 7".to_vec(),
            "metadata",
        ),
    ];
    for (name, props, body, _) in &cases {
        raw.publish(&q, body, props.clone().with_message_id((*name).into()))
            .await;
    }
    let good = Envelope::new("com.example.ok", "{}");
    broker.publish(&q, good.clone()).await.unwrap();
    wait_count(&broker, &dlq, cases.len() as u64).await;
    let deadline = Instant::now() + WAIT;
    while seen.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the good message was not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();
    let handled: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(
        handled,
        [good.id.to_string()],
        "only the good message is handled"
    );
    assert_eq!(broker.count(&q).await.unwrap(), 0, "nothing left behind");
    let dead = peek_by_id(&broker, &dlq).await;
    assert_eq!(dead.len(), cases.len());
    for (name, _, body, says) in &cases {
        let env = &dead[*name];
        assert_eq!(env.headers["dlqreason"], "decode", "{name}");
        assert_eq!(env.headers["dlqconsumer"], "malformed", "{name}");
        assert_eq!(env.headers["dlqorigin"], q, "{name}");
        assert!(
            env.headers["dlqerror"].contains(says),
            "{name}: {}",
            env.headers["dlqerror"]
        );
        assert_eq!(&env.payload[..], &body[..], "{name}: the body is unchanged");
        assert_eq!(env.event_type, UNDECODABLE_TYPE, "{name}");
    }
    // The raw DLQ messages carry the original body byte for byte too.
    for _ in 0..cases.len() {
        let d = raw.get(&dlq).await;
        let id = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_string();
        let (_, _, body, _) = cases.iter().find(|c| c.0 == id).unwrap();
        assert_eq!(&d.data[..], &body[..], "{id}");
    }
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&dlq).await.unwrap();
}

// ---------------------------------------------------------------------------
// The header rule: every copy postbox writes is a valid CloudEvent.
// ---------------------------------------------------------------------------

/// The names RabbitMQ adds when it dead-letters or redelivers.
fn is_broker_header(name: &str) -> bool {
    name == "x-death"
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// A raw message postbox wrote is a valid CloudEvent carrying `env`: every
/// header with a CloudEvents prefix (any case) is a strict attribute name,
/// the SDK reads the event with exactly the strict-named headers as
/// extensions, the other headers of `env` ride as plain long-string AMQP
/// headers, and nothing RabbitMQ added on the way is carried along.
fn assert_valid_copy(d: &lapin::message::Delivery, env: &Envelope, what: &str) {
    let table = d.properties.headers().clone().unwrap_or_default();
    for k in table.inner().keys() {
        let k = k.as_str();
        for prefix in ["cloudEvents:", "cloudEvents_", "ce-"] {
            if let Some(head) = k.get(..prefix.len()) {
                if head.eq_ignore_ascii_case(prefix) {
                    let name = &k[prefix.len()..];
                    assert!(
                        strict_attribute_name(name),
                        "{what}: header `{k}` is not a strict attribute name"
                    );
                }
            }
        }
        assert!(!is_broker_header(k), "{what}: `{k}` carried along");
    }
    let mut attributes = env.clone();
    attributes.headers.retain(|k, _| strict_attribute_name(k));
    for (k, v) in &env.headers {
        if !strict_attribute_name(k) {
            assert_eq!(
                table.inner().get(k.as_str()),
                Some(&text(v)),
                "{what}: `{k}` as a plain header"
            );
        }
    }
    assert_same(&oracle(d), &attributes, what);
}

/// An envelope with headers that are not attribute names, a foreign message
/// with an `X-Trace` header and an undecodable message, each retried (a copy
/// waiting in a delay tier; a copy back through a tier, with the `x-death`
/// RabbitMQ adds) and dead-lettered: every copy, read raw, is a valid
/// CloudEvent to the SDK with strict extension names only; transport
/// headers survive each hop; replay of the undecodable dead letter restores
/// the original message.
async fn copies_are_valid_cloudevents(test: &str, mode: ContentMode) {
    let delay = format!("pb-interop-hdr-delay-{mode:?}").to_lowercase();
    let short_tier = format!("{delay}.200ms");
    let long_tier = format!("{delay}.60000ms");
    let config = RabbitConfig::new(common::amqp_url())
        .content_mode(mode)
        .delay_exchange(&delay)
        .delay_tiers([Duration::from_millis(200), Duration::from_secs(60)]);
    let Some(broker) = common::broker_with(test, config).await else {
        return;
    };
    broker.declare_delay_tiers().await.unwrap();
    broker.purge(&short_tier).await.unwrap();
    broker.purge(&long_tier).await.unwrap();
    let q = unique("pb-interop-headers");
    let dlq = format!("{q}.dlq");
    declare(&broker, &q).await;
    let raw = Raw::open().await;

    let envelope = Envelope::builder("com.example.order.placed")
        .source("/shop/orders")
        .subject("order-7")
        .header("tenant", "acme")
        .header("x-trace", "t-1")
        .header("traceId", "abc")
        .header("X-Request-Id", "r-9")
        .payload(r#"{"id":7}"#)
        .build();
    let mut foreign_headers = FieldTable::default();
    foreign_headers.insert("X-Trace".into(), text("f-trace"));
    let foreign = BasicProperties::default()
        .with_message_id("foreign-1".into())
        .with_content_type("application/json".into())
        .with_headers(foreign_headers);
    let foreign_body: &[u8] = br#"{"legacy":true}"#;
    let not_utf8 = vec![b'b', 0xff, 0xfe];
    let mut undecodable_headers = ce_headers(
        "bad-1",
        &[
            ("cloudEvents:specversion", text("0.3")),
            ("cloudEvents:subject", text("s")),
            (
                "cloudEvents:bin",
                AMQPValue::LongString(LongString::from(not_utf8)),
            ),
            ("x-custom", text("kept")),
            ("X-Trace", text("u-trace")),
        ],
    );
    undecodable_headers.insert("ce-id".into(), text("dash"));
    let undecodable = BasicProperties::default()
        .with_message_id("undecodable-1".into())
        .with_content_type("application/x-thing".into())
        .with_timestamp(1_600_000_000)
        .with_delivery_mode(1)
        .with_headers(undecodable_headers.clone());
    let undecodable_body: &[u8] = b"\x00raw \xff body";

    // What postbox publishes.
    broker.publish(&q, envelope.clone()).await.unwrap();
    let got = raw.get(&q).await;
    assert_eq!(
        got.properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-trace"),
        Some(&text("t-1"))
    );
    assert_valid_copy(&got, &envelope, &format!("{mode:?} published"));

    let publish_all = || async {
        broker.publish(&q, envelope.clone()).await.unwrap();
        raw.publish(&q, foreign_body, foreign.clone()).await;
        raw.publish(&q, undecodable_body, undecodable.clone()).await;
    };
    let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let retry = |delay: Duration| postbox_core::Retry {
        delay,
        next_attempt: 2,
        first_failed_at: t0,
        reason: "handler-error",
    };
    let metadata = |d: &postbox_rabbitmq::RabbitDelivery| postbox_core::DeadLetterMetadata {
        reason: match postbox_core::Delivery::decode_error(d) {
            Some(_) => postbox_core::FailureReason::Decode,
            None => postbox_core::FailureReason::RetriesExhausted,
        },
        error: "it failed".into(),
        error_type: "test".into(),
        attempts: postbox_core::Delivery::attempt(d),
        first_failed_at: t0,
        last_failed_at: t0 + Duration::from_secs(1),
        origin: postbox_core::Delivery::origin(d),
        consumer: "headers".into(),
    };
    let router = DeadLetterRouter::new(broker.clone());
    let mut source = source(&broker, &q).await;

    // Retry copies waiting in the 60 s tier, read raw there.
    publish_all().await;
    let mut expected: BTreeMap<String, Envelope> = BTreeMap::new();
    for _ in 0..3 {
        let d = next(&mut source).await;
        let env = postbox_core::Delivery::envelope(&d).clone();
        expected.insert(
            env.id.to_string(),
            retry(Duration::ZERO).next_envelope(&env),
        );
        // The longest tier that fits the remaining delay: 60 s.
        postbox_core::Delivery::retry(d, retry(Duration::from_secs(90)))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let copy = raw.get(&long_tier).await;
        let id = copy.properties.message_id().as_ref().unwrap().to_string();
        let headers = copy.properties.headers().as_ref().unwrap().inner();
        assert!(headers.contains_key("postbox-due"), "{id}");
        assert!(headers.contains_key("postbox-delay-tier"), "{id}");
        if id == "foreign-1" {
            // A foreign message's headers travel on, as plain headers.
            assert_eq!(
                headers.get("X-Trace"),
                Some(&text("f-trace")),
                "{mode:?} retry copy of a foreign message"
            );
        }
        assert_valid_copy(
            &copy,
            &expected[&id],
            &format!("{mode:?} retry copy of {id}"),
        );
    }

    // Dead-letter copies: the undecodable message right away (as the
    // runtime does), the others after a retry through the 200 ms tier,
    // which brings them back with RabbitMQ's `x-death`.
    publish_all().await;
    let mut expected: BTreeMap<String, Envelope> = BTreeMap::new();
    for _ in 0..3 {
        let d = next(&mut source).await;
        if postbox_core::Delivery::decode_error(&d).is_some() {
            let mut copy = postbox_core::Delivery::envelope(&d).clone();
            let m = metadata(&d);
            m.apply(&mut copy);
            expected.insert(copy.id.to_string(), copy);
            router.dead_letter(d, &m).await.unwrap();
        } else {
            postbox_core::Delivery::retry(d, retry(Duration::from_millis(200)))
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        let d = next(&mut source).await;
        let env = postbox_core::Delivery::envelope(&d).clone();
        assert_eq!(env.attempt, 2, "{}", env.id);
        assert!(
            !env.headers
                .keys()
                .any(|k| is_broker_header(k) || k.starts_with("postbox-")),
            "{}: {:?}",
            env.id,
            env.headers
        );
        if env.id == envelope.id {
            // Transport headers survive the retry.
            assert_eq!(env.headers["x-trace"], "t-1");
            assert_eq!(env.headers["traceId"], "abc");
            assert_eq!(env.headers["X-Request-Id"], "r-9");
        } else {
            // The foreign message's own header, and the retry metadata.
            assert!(
                env.headers
                    .keys()
                    .all(|k| k.starts_with("retry") || k == "X-Trace"),
                "{:?}",
                env.headers
            );
        }
        let mut copy = env.clone();
        let m = metadata(&d);
        m.apply(&mut copy);
        expected.insert(copy.id.to_string(), copy);
        router.dead_letter(d, &m).await.unwrap();
    }
    source.close().await.unwrap();
    wait_count(&broker, &dlq, 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let dead = raw.get_unacked(&dlq).await;
        let id = dead.properties.message_id().as_ref().unwrap().to_string();
        if id == "foreign-1" {
            // A foreign message's headers travel on, as plain headers.
            let headers = dead.properties.headers().clone().unwrap_or_default();
            assert_eq!(
                headers.inner().get("X-Trace"),
                Some(&text("f-trace")),
                "{mode:?} dead-letter copy of a foreign message"
            );
        }
        assert_valid_copy(
            &dead,
            &expected[&id],
            &format!("{mode:?} dead-letter copy of {id}"),
        );
        held.push(dead);
    }
    assert_eq!(
        expected["undecodable-1"].headers["amqp:header:cloudEvents:specversion"],
        "0.3"
    );
    for dead in held {
        dead.acker
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Replay of the undecodable dead letter restores the original message.
    wait_count(&broker, &dlq, 3).await;
    let report = broker
        .replay(&dlq, &|env| env.event_type == UNDECODABLE_TYPE, 10)
        .await
        .unwrap();
    assert_eq!((report.replayed, report.skipped), (1, 2));
    let back = raw.get(&q).await;
    assert_eq!(&back.data[..], undecodable_body);
    let p = &back.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "undecodable-1");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/x-thing"
    );
    assert_eq!(p.timestamp(), &Some(1_600_000_000));
    assert_eq!(p.delivery_mode(), &Some(1));
    assert_eq!(p.headers().as_ref().unwrap(), &undecodable_headers);

    for name in [&q, &dlq, &short_tier, &long_tier] {
        broker.delete_queue(name).await.unwrap();
    }
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_copies_are_valid_cloudevents() {
    copies_are_valid_cloudevents(
        "binary_mode_copies_are_valid_cloudevents",
        ContentMode::Binary,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_copies_are_valid_cloudevents() {
    copies_are_valid_cloudevents(
        "structured_mode_copies_are_valid_cloudevents",
        ContentMode::Structured,
    )
    .await;
}
