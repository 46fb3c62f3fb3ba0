//! The SQS/SNS wire checked against an independent CloudEvents
//! implementation (`cloudevents-sdk`, the oracle) on the emulator:
//!
//! * what postbox publishes — to a queue, through SNS with raw delivery and
//!   with the SNS JSON wrapper, after a retry, as a retry-metadata carrier and
//!   as a dead-letter copy (of events, of foreign messages, of undecodable
//!   ones) — read raw with the AWS client and parsed by the SDK, with strict
//!   attribute names only: headers that are not attribute names (`x-trace`,
//!   `traceId`) travel as message attributes and come back to a postbox
//!   consumer as headers;
//! * what the SDK writes, sent raw, consumed by postbox with every attribute;
//! * malformed events sent raw (directly and through SNS) end in the DLQ with
//!   reason `decode` and their bytes, without starving good messages, and
//!   replay puts the bytes and the attributes back exactly.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV03, EventBuilderV10};
use postbox_core::codec::is_attribute_name;
use postbox_core::dlq::{DeadLetterMetadata, NAMES};
use postbox_core::{
    handler_fn, BoxSource, Broker, Consumer, DeadLetterOps, DeadLetterRouter, Delivery, Envelope,
    FailureReason, HandlerError, Publisher, Retry, RunReport, RunningConsumer, Source,
    SubscribeOptions,
};
use postbox_sqs::aws_sdk_sqs::types::{Message, MessageAttributeValue};
use postbox_sqs::{QueueSpec, SqsBroker, SubscriptionSpec, ATTRIBUTES_HEADER, UNDECODABLE_TYPE};
use postbox_testkit::env::unique;
use postbox_testkit::interop::{expected_extensions, strict_attribute_name};

const WAIT: Duration = Duration::from_secs(60);

/// A queue and its `-dlq`, both without a redrive policy: whatever reaches
/// the DLQ was put there by postbox, never by SQS.
async fn plain_queue(broker: &SqsBroker, prefix: &str) -> String {
    let name = unique(prefix);
    for q in [name.clone(), format!("{name}-dlq")] {
        broker
            .declare_queue(&QueueSpec::new(q).without_dead_letter_queue())
            .await
            .unwrap();
    }
    name
}

fn dlq(queue: &str) -> String {
    postbox_core::dlq::default_destination(queue)
}

fn existing() -> SubscribeOptions {
    SubscribeOptions::new().provision(false)
}

/// Receives `n` distinct messages raw, then makes them visible again (never
/// deletes them).
async fn receive_raw(broker: &SqsBroker, queue: &str, n: usize) -> Vec<Message> {
    let url = broker.queue_url(queue).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut seen = BTreeSet::new();
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{queue}: {} of {n} messages",
            got.len()
        );
        let out = broker
            .sqs()
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(60)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        for m in out.messages.unwrap_or_default() {
            if seen.insert(m.message_id.clone().unwrap_or_default()) {
                got.push(m);
            }
        }
    }
    for m in &got {
        broker
            .sqs()
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(m.receipt_handle.clone().unwrap_or_default())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
    got
}

fn body(m: &Message) -> &str {
    m.body.as_deref().unwrap_or_default()
}

/// The message attributes as `name → string value`.
fn attributes(m: &Message) -> BTreeMap<String, String> {
    m.message_attributes
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.string_value.clone().unwrap_or_default()))
        .collect()
}

/// The SDK's reading of a structured CloudEvents body.
fn sdk(body: &str) -> Event {
    serde_json::from_str::<Event>(body).unwrap_or_else(|e| panic!("the SDK refuses {body}: {e}"))
}

fn extensions(event: &Event) -> BTreeMap<String, String> {
    event
        .iter_extensions()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every extension of `event` has a strict CloudEvents attribute name
/// (lower-case letters and digits, at most 20).
fn assert_strict(event: &Event) {
    for name in extensions(event).keys() {
        assert!(
            strict_attribute_name(name),
            "extension {name:?} of {}",
            event.id()
        );
    }
}

/// The extensions `env` travels with in the document: transport headers
/// (names that are not attribute names) are message attributes instead.
fn document_extensions(env: &Envelope) -> BTreeMap<String, String> {
    expected_extensions(env)
        .into_iter()
        .filter(|(k, _)| is_attribute_name(k))
        .collect()
}

fn unix(t: SystemTime) -> (i64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    (d.as_secs() as i64, d.subsec_nanos())
}

/// The SDK read `event` as `env` says: every context attribute, every
/// extension, the data.
fn assert_same(event: &Event, env: &Envelope) {
    assert_eq!(event.id(), env.id.as_str());
    assert_eq!(event.ty(), env.event_type);
    assert_eq!(event.source().as_str(), env.source);
    assert_eq!(
        event
            .time()
            .map(|t| (t.timestamp(), t.timestamp_subsec_nanos())),
        env.time.map(unix),
        "time of {}",
        env.id
    );
    assert_eq!(event.subject(), env.subject.as_deref());
    assert_eq!(event.datacontenttype(), Some(&*env.content_type));
    assert_eq!(extensions(event), document_extensions(env), "{}", env.id);
    assert_strict(event);
    assert_data(event.data(), env);
}

fn assert_data(data: Option<&Data>, env: &Envelope) {
    match data {
        Some(Data::Json(v)) => {
            let published: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
            assert_eq!(v, &published);
        }
        Some(Data::Binary(b)) => assert_eq!(&b[..], &env.payload[..]),
        Some(Data::String(s)) => assert_eq!(s.as_bytes(), &env.payload[..]),
        None => assert!(env.payload.is_empty()),
    }
}

/// An envelope using every field the wire carries.
fn full(event_type: &str) -> Envelope {
    Envelope::builder(event_type.to_string())
        .source("https://shop.example/orders")
        .subject("order-7")
        .schema_version("2")
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .key("customer-3")
        .trace_context(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("vendor=1".to_string()),
        )
        .header("tenant", "acme")
        .header("region", "eu")
        .header("x-trace", "abc-123")
        .header("traceId", "t-9")
        .payload(r#"{"order":7,"items":[1,2]}"#)
        .build()
}

/// The transport headers of [`full`].
const TRANSPORT: [&str; 2] = ["x-trace", "traceId"];

fn binary(event_type: &str) -> Envelope {
    Envelope::builder(event_type.to_string())
        .content_type("application/octet-stream")
        .payload(vec![0u8, 159, 146, 150, 255])
        .build()
}

fn text(event_type: &str) -> Envelope {
    Envelope::builder(event_type.to_string())
        .content_type("text/plain")
        .header("lang", "fr")
        .payload("héllo \"wörld\"")
        .build()
}

/// The attributes postbox sends with `env`: `type` plus its user headers
/// (the transport headers among them).
fn expected_attributes(env: &Envelope) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = env
        .headers
        .iter()
        .filter(|(k, _)| !postbox_core::dlq::is_metadata(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert("type".into(), env.event_type.to_string());
    out
}

/// Consumes `n` messages of `queue` with a postbox source (acked), by id.
async fn consume(broker: &SqsBroker, queue: &str, n: usize) -> BTreeMap<String, Envelope> {
    let mut source = broker.subscribe(queue, existing()).await.unwrap();
    let mut got = BTreeMap::new();
    while got.len() < n {
        let d = tokio::time::timeout(WAIT, source.next())
            .await
            .unwrap_or_else(|_| panic!("{queue}: {} of {n} messages", got.len()))
            .unwrap()
            .unwrap();
        assert!(d.decode_error().is_none(), "{:?}", d.decode_error());
        got.insert(d.envelope().id.to_string(), d.envelope().clone());
        d.ack().await.unwrap();
    }
    source.close().await.unwrap();
    got
}

/// `got` is `sent` but for the attempt (the broker's receive count).
fn assert_received(got: &Envelope, sent: &Envelope) {
    let mut got = got.clone();
    got.attempt = sent.attempt;
    assert_eq!(&got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postbox_events_are_read_by_the_sdk_from_a_queue() {
    let broker = broker_or_skip!("postbox_events_are_read_by_the_sdk_from_a_queue");
    let q = plain_queue(&broker, "interop-q").await;
    let one = full("order.placed");
    broker.publish(&q, one.clone()).await.unwrap();
    let batch = vec![binary("blob.stored"), text("note.written")];
    assert!(broker.publish_batch(&q, batch.clone()).await.is_success());
    let sent: BTreeMap<String, Envelope> = std::iter::once(one)
        .chain(batch)
        .map(|e| (e.id.to_string(), e))
        .collect();
    for m in receive_raw(&broker, &q, sent.len()).await {
        let event = sdk(body(&m));
        let env = &sent[event.id()];
        assert_same(&event, env);
        assert_eq!(attributes(&m), expected_attributes(env));
    }
    // A postbox consumer gets every header back, transport ones included.
    let got = consume(&broker, &q, sent.len()).await;
    for (id, env) in &sent {
        assert_received(&got[id], env);
    }
    for name in TRANSPORT {
        assert!(got.values().any(|e| e.headers.contains_key(name)), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postbox_events_are_read_by_the_sdk_through_sns_raw_and_wrapped() {
    let broker = broker_or_skip!("postbox_events_are_read_by_the_sdk_through_sns_raw_and_wrapped");
    let topic = unique("interop-t");
    let (raw, wrapped) = (format!("{topic}-raw"), format!("{topic}-wrapped"));
    broker.declare_topic(&topic).await.unwrap();
    for (q, is_raw) in [(&raw, true), (&wrapped, false)] {
        broker
            .declare_queue(&QueueSpec::new(q.as_str()).without_dead_letter_queue())
            .await
            .unwrap();
        broker
            .declare_subscription(&SubscriptionSpec::new(&topic, q.as_str()).raw(is_raw))
            .await
            .unwrap();
    }
    let sent: BTreeMap<String, Envelope> = [full("order.placed"), binary("blob"), text("note")]
        .into_iter()
        .map(|e| (e.id.to_string(), e))
        .collect();
    let report = broker
        .publish_batch(&format!("sns:{topic}"), sent.values().cloned().collect())
        .await;
    assert!(report.is_success());
    for m in receive_raw(&broker, &raw, sent.len()).await {
        let event = sdk(body(&m));
        let env = &sent[event.id()];
        assert_same(&event, env);
        // Raw delivery turns the SNS attributes into SQS attributes.
        assert_eq!(attributes(&m), expected_attributes(env));
    }
    for m in receive_raw(&broker, &wrapped, sent.len()).await {
        let wrapper: serde_json::Value = serde_json::from_str(body(&m)).unwrap();
        assert_eq!(wrapper["Type"], "Notification");
        let event = sdk(wrapper["Message"].as_str().unwrap());
        let env = &sent[event.id()];
        assert_same(&event, env);
        let attrs = wrapper["MessageAttributes"].as_object().unwrap();
        let got: BTreeMap<String, String> = attrs
            .iter()
            .map(|(k, v)| (k.clone(), v["Value"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(got, expected_attributes(env));
    }
    // Both ways a postbox consumer gets every header back: raw from the
    // message attributes, wrapped from the notification's.
    for q in [&raw, &wrapped] {
        let got = consume(&broker, q, sent.len()).await;
        for (id, env) in &sent {
            assert_received(&got[id], env);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_dead_letter_copies_are_valid_cloudevents() {
    let broker = broker_or_skip!("retry_and_dead_letter_copies_are_valid_cloudevents");

    // A retry on SQS is a visibility change: the message comes back as it
    // was published, still a valid CloudEvent.
    let q = plain_queue(&broker, "interop-retry").await;
    let env = full("order.placed");
    broker.publish(&q, env.clone()).await.unwrap();
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let d = tokio::time::timeout(WAIT, source.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    d.retry(Retry {
        delay: Duration::from_secs(1),
        next_attempt: 2,
        first_failed_at: SystemTime::now(),
        reason: "handler-error",
    })
    .await
    .unwrap();
    source.close().await.unwrap();
    let back = receive_raw(&broker, &q, 1).await;
    assert_same(&sdk(body(&back[0])), &env);
    assert_eq!(attributes(&back[0]), expected_attributes(&env));
    let got = consume(&broker, &q, 1).await;
    assert_received(&got[env.id.as_str()], &env);

    // An envelope carrying retry metadata (what `Retry::next_envelope`
    // makes): the metadata are strict extensions in the body, not attributes.
    let q = plain_queue(&broker, "interop-retrymeta").await;
    let retry = Retry {
        delay: Duration::from_secs(1),
        next_attempt: 3,
        first_failed_at: SystemTime::now(),
        reason: "timeout",
    };
    let copy = retry.next_envelope(&full("order.placed"));
    broker.publish(&q, copy.clone()).await.unwrap();
    let m = &receive_raw(&broker, &q, 1).await[0];
    let event = sdk(body(m));
    assert_same(&event, &copy);
    for name in postbox_core::delivery::RETRY_NAMES {
        assert!(event.extension(name).is_some(), "{name}");
        assert!(strict_attribute_name(name), "{name}");
    }
    assert_eq!(event.extension("attempt").unwrap().to_string(), "3");
    assert_eq!(attributes(m), expected_attributes(&copy));

    // A dead-letter copy of a message already at the attribute budget (9
    // user headers, 2 of them transport headers, + `type`): the metadata
    // travel in the body.
    let q = plain_queue(&broker, "interop-dead").await;
    let mut env = full("order.placed");
    for i in 0..5 {
        env.headers.insert(format!("h{i}"), format!("v{i}"));
    }
    assert_eq!(expected_attributes(&env).len(), 10);
    broker.publish(&q, env.clone()).await.unwrap();
    let source = broker.subscribe(&q, existing()).await.unwrap();
    let running = consumer(&broker, source, |_| {
        Err(HandlerError::permanent("refused by the handler"))
    });
    wait_count(&broker, &dlq(&q), 1).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.dead_lettered, 1);
    let m = &receive_raw(&broker, &dlq(&q), 1).await[0];
    let event = sdk(body(m));
    assert_eq!(
        attributes(m),
        expected_attributes(&env),
        "within the budget"
    );
    let ext = extensions(&event);
    for name in ext.keys() {
        assert!(
            strict_attribute_name(name),
            "extension {name:?} of the dead-letter copy"
        );
    }
    let meta: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| ext.contains_key(*n))
        .collect();
    for name in [
        "dlqreason",
        "dlqerror",
        "dlqerrortype",
        "dlqattempts",
        "dlqorigin",
    ] {
        assert!(meta.contains(&name), "{name} in {meta:?}");
    }
    assert_eq!(ext["dlqreason"], "handler-error");
    assert_eq!(ext["dlqorigin"], q);
    // Apart from the metadata it is the published event.
    let mut without: Event = event.clone();
    for name in meta {
        without.remove_extension(name);
    }
    let mut expected = env.clone();
    expected.attempt = 1;
    assert_same(&without, &expected);

    // A postbox reader of the DLQ sees every header, and replay sends the
    // message back with them.
    let peeked = broker.peek(&dlq(&q), 10).await.unwrap();
    assert_eq!(peeked.len(), 1);
    let mut shown = peeked[0].clone();
    assert!(DeadLetterMetadata::read(&shown).is_some());
    shown
        .headers
        .retain(|k, _| !postbox_core::dlq::is_metadata(k));
    assert_received(&shown, &env);
    assert_eq!(
        broker
            .replay(&dlq(&q), &|_| true, 10)
            .await
            .unwrap()
            .replayed,
        1
    );
    let got = consume(&broker, &q, 1).await;
    assert_received(&got[env.id.as_str()], &env);
}

/// A topic with a raw and a wrapped subscription, each queue with its
/// `-dlq` and no redrive policy: `(topic, its arn, raw queue, wrapped queue)`.
async fn topic_with_raw_and_wrapped(
    broker: &SqsBroker,
    prefix: &str,
) -> (String, String, String, String) {
    let topic = unique(prefix);
    let (raw, wrapped) = (format!("{topic}-raw"), format!("{topic}-wrapped"));
    let arn = broker.declare_topic(&topic).await.unwrap();
    for (q, is_raw) in [(&raw, true), (&wrapped, false)] {
        for name in [q.clone(), format!("{q}-dlq")] {
            broker
                .declare_queue(&QueueSpec::new(name).without_dead_letter_queue())
                .await
                .unwrap();
        }
        broker
            .declare_subscription(&SubscriptionSpec::new(&topic, q.as_str()).raw(is_raw))
            .await
            .unwrap();
    }
    (topic, arn, raw, wrapped)
}

/// A dead-letter copy in `queue`'s DLQ, read raw: a valid CloudEvent with
/// strict names only, within the attribute budget, whose attributes hold
/// `transport` (name → value); returns the SDK's reading.
async fn check_dead_letter_copy(
    broker: &SqsBroker,
    queue: &str,
    transport: &BTreeMap<String, String>,
) -> Event {
    let m = &receive_raw(broker, &dlq(queue), 1).await[0];
    let event = sdk(body(m));
    assert_strict(&event);
    assert_eq!(event.extension("dlqorigin").unwrap().to_string(), queue);
    let attrs = attributes(m);
    assert!(attrs.len() <= postbox_sqs::MAX_ATTRIBUTES, "{attrs:?}");
    for (name, value) in transport {
        assert_eq!(attrs.get(name), Some(value), "{name} of {attrs:?}");
        assert!(
            event.extension(name).is_none(),
            "{name} is not in the document"
        );
    }
    event
}

/// Dead-letter copies of events consumed through SNS, raw and wrapped, keep
/// their transport headers as attributes; peek shows them, replay sends
/// them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_copies_through_sns_keep_transport_headers() {
    let broker = broker_or_skip!("dead_letter_copies_through_sns_keep_transport_headers");
    let (topic, _, raw, wrapped) = topic_with_raw_and_wrapped(&broker, "interop-snsdead").await;
    let env = full("order.placed");
    broker
        .publish(&format!("sns:{topic}"), env.clone())
        .await
        .unwrap();
    let transport: BTreeMap<String, String> = TRANSPORT
        .iter()
        .map(|k| (k.to_string(), env.headers[*k].clone()))
        .collect();
    for q in [&raw, &wrapped] {
        let source = broker.subscribe(q, existing()).await.unwrap();
        let running = consumer(&broker, source, |env| {
            // The handler sees the transport headers (or refuses otherwise).
            if env.headers.get("x-trace").map(String::as_str) == Some("abc-123")
                && env.headers.get("traceId").map(String::as_str) == Some("t-9")
            {
                Err(HandlerError::permanent("refused by the handler"))
            } else {
                Err(HandlerError::permanent("transport headers missing"))
            }
        });
        wait_count(&broker, &dlq(q), 1).await;
        assert_eq!(running.shutdown().await.unwrap().dead_lettered, 1);
        let event = check_dead_letter_copy(&broker, q, &transport).await;
        let error = event.extension("dlqerror").unwrap().to_string();
        assert!(error.contains("refused by the handler"), "{q}: {error}");
        let mut without = event.clone();
        for name in NAMES {
            without.remove_extension(name);
        }
        let mut expected = env.clone();
        expected.attempt = 1;
        assert_same(&without, &expected);
        let peeked = broker.peek(&dlq(q), 10).await.unwrap();
        assert_eq!(peeked.len(), 1);
        let mut shown = peeked[0].clone();
        shown
            .headers
            .retain(|k, _| !postbox_core::dlq::is_metadata(k));
        assert_received(&shown, &env);
        assert_eq!(
            broker
                .replay(&dlq(q), &|_| true, 10)
                .await
                .unwrap()
                .replayed,
            1
        );
        let got = consume(&broker, q, 1).await;
        assert_received(&got[env.id.as_str()], &env);
    }
}

/// The attributes of a foreign message: `type` and `id` (named like
/// envelope fields), transport names, a number and bytes.
fn foreign_attributes() -> Vec<(&'static str, MessageAttributeValue)> {
    let text = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    vec![
        ("type", text("legacy.order")),
        ("id", text("legacy-7")),
        ("tenant", text("acme")),
        ("Tenant-Id", text("7")),
        ("x-trace", text("abc")),
        ("traceId", text("t-9")),
        ("sqs.type", text("escaped")),
        (
            "count",
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value("42")
                .build()
                .unwrap(),
        ),
        (
            "blob",
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(postbox_sqs::aws_sdk_sqs::primitives::Blob::new(vec![
                    0u8, 255,
                ]))
                .build()
                .unwrap(),
        ),
        ("region", text("eu")),
    ]
}

/// The headers a foreign message with [`foreign_attributes`] gets.
fn foreign_headers() -> BTreeMap<String, String> {
    [
        ("sqs.type", "legacy.order"),
        ("sqs.id", "legacy-7"),
        ("tenant", "acme"),
        ("Tenant-Id", "7"),
        ("x-trace", "abc"),
        ("traceId", "t-9"),
        ("sqs.sqs.type", "escaped"),
        ("count", "42"),
        ("blob", "AP8="),
        ("region", "eu"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A foreign message with 10 attributes (the most SQS takes) reaches the
/// handler with them as headers; its dead-letter copy is a valid CloudEvent
/// within the budget that a postbox reader sees with the same headers. On a
/// queue, and through SNS raw and wrapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_keep_their_attributes_into_the_dead_letter_copy() {
    let broker =
        broker_or_skip!("foreign_messages_keep_their_attributes_into_the_dead_letter_copy");
    let q = plain_queue(&broker, "interop-foreign").await;
    let url = broker.queue_url(&q).await.unwrap();
    let mut send = broker
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body("plain text, not an event");
    for (k, v) in foreign_attributes() {
        send = send.message_attributes(k, v);
    }
    send.send().await.unwrap();
    let (_, arn, raw, wrapped) = topic_with_raw_and_wrapped(&broker, "interop-foreignsns").await;
    let mut publish = broker
        .sns()
        .publish()
        .topic_arn(&arn)
        .message("plain text, not an event");
    for (k, v) in foreign_attributes() {
        let mut b = postbox_sqs::aws_sdk_sns::types::MessageAttributeValue::builder()
            .data_type(v.data_type.clone())
            .set_string_value(v.string_value.clone());
        if let Some(blob) = &v.binary_value {
            b = b.binary_value(postbox_sqs::aws_sdk_sns::primitives::Blob::new(
                blob.as_ref().to_vec(),
            ));
        }
        publish = publish.message_attributes(k, b.build().unwrap());
    }
    publish.send().await.unwrap();

    let expected = foreign_headers();
    let transport: BTreeMap<String, String> = expected
        .iter()
        .filter(|(k, _)| !is_attribute_name(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(transport.len(), 6);
    for queue in [&q, &raw, &wrapped] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let source = broker.subscribe(queue, existing()).await.unwrap();
        let running = Consumer::builder(
            source,
            handler_fn(move |env: Envelope| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(env);
                    Err::<(), _>(HandlerError::permanent("not for us"))
                }
            }),
        )
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();
        wait_count(&broker, &dlq(queue), 1).await;
        assert_eq!(running.shutdown().await.unwrap().dead_lettered, 1);
        let handled = seen.lock().unwrap()[0].clone();
        assert_eq!(handled.event_type, "postbox.foreign");
        assert_eq!(handled.headers, expected, "{queue}: the handler's headers");

        let event = check_dead_letter_copy(&broker, queue, &transport).await;
        assert_eq!(event.ty(), "postbox.foreign");
        let peeked = broker.peek(&dlq(queue), 10).await.unwrap();
        assert_eq!(peeked.len(), 1);
        let mut shown = peeked[0].clone();
        assert_eq!(
            DeadLetterMetadata::read(&shown).unwrap().origin.destination,
            **queue
        );
        shown
            .headers
            .retain(|k, _| !postbox_core::dlq::is_metadata(k));
        assert_received(&shown, &handled);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_by_the_sdk_are_consumed_with_every_attribute() {
    let broker = broker_or_skip!("events_written_by_the_sdk_are_consumed_with_every_attribute");
    let q = plain_queue(&broker, "interop-sdk").await;
    let json = EventBuilderV10::new()
        .id("sdk-json")
        .ty("com.example.order.placed")
        .source("https://example.com/orders")
        .subject("order-7")
        .time("2024-05-06T07:08:09.123456789Z")
        .extension("tenant", "acme")
        .extension("priority", 5i64)
        .extension("urgent", true)
        .data(
            "application/json",
            serde_json::json!({"order": 7, "items": [1, 2], "note": "é"}),
        )
        .build()
        .unwrap();
    let bin = EventBuilderV10::new()
        .id("sdk-binary")
        .ty("com.example.blob")
        .source("/blobs")
        .data("application/octet-stream", vec![0u8, 1, 2, 254, 255])
        .build()
        .unwrap();
    let txt = EventBuilderV10::new()
        .id("sdk-text")
        .ty("com.example.note")
        .source("urn:notes")
        .time("2024-05-06T09:08:09+02:00")
        .data("text/plain", "hello \"there\"")
        .build()
        .unwrap();
    let url = broker.queue_url(&q).await.unwrap();
    let events = [json, bin, txt];
    for event in &events {
        broker
            .sqs()
            .send_message()
            .queue_url(&url)
            .message_body(serde_json::to_string(event).unwrap())
            .send()
            .await
            .unwrap();
    }
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let mut got = BTreeMap::new();
    while got.len() < events.len() {
        let d = tokio::time::timeout(WAIT, source.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(d.decode_error().is_none(), "{:?}", d.decode_error());
        got.insert(d.envelope().id.to_string(), d.envelope().clone());
        d.ack().await.unwrap();
    }
    source.close().await.unwrap();
    for event in &events {
        let env = &got[event.id()];
        assert_eq!(env.event_type, event.ty());
        assert_eq!(env.source, event.source().as_str());
        assert_eq!(env.subject.as_deref(), event.subject());
        assert_eq!(Some(&*env.content_type), event.datacontenttype());
        assert_eq!(
            env.time.map(unix),
            event
                .time()
                .map(|t| (t.timestamp(), t.timestamp_subsec_nanos()))
        );
        assert_eq!(env.headers, extensions(event), "every extension arrives");
        assert_data(event.data(), env);
    }
    assert_eq!(got["sdk-json"].headers["priority"], "5");
    assert_eq!(got["sdk-json"].headers["urgent"], "true");
    assert_eq!(
        got["sdk-json"].time.map(unix),
        Some((1_714_979_289, 123_456_789))
    );
    assert_eq!(&got["sdk-binary"].payload[..], &[0u8, 1, 2, 254, 255]);
}

/// A malformed event: what it is, its body, and what the decoder must say.
struct Case {
    name: &'static str,
    body: String,
    why: &'static str,
}

/// Malformed events, built from the SDK's own output where there is one to
/// break.
fn malformed() -> Vec<Case> {
    let valid = EventBuilderV10::new()
        .id("bad-1")
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
        serde_json::to_string(&d).unwrap()
    };
    let v03 = EventBuilderV03::new()
        .id("old-1")
        .ty("com.example.old")
        .source("/old")
        .data("application/json", serde_json::json!({"a": 1}))
        .build()
        .unwrap();
    let full_text = serde_json::to_string(&valid).unwrap();
    let case = |name, body, why| Case { name, body, why };
    vec![
        case(
            "specversion 0.3",
            serde_json::to_string(&v03).unwrap(),
            "unsupported CloudEvents specversion \"0.3\"",
        ),
        case(
            "missing id",
            with(&|m| {
                m.remove("id");
            }),
            "`id` is missing",
        ),
        case(
            "missing type",
            with(&|m| {
                m.remove("type");
            }),
            "`type` is missing",
        ),
        case(
            "bad time",
            with(&|m| {
                m.insert("time".into(), "yesterday at noon".into());
            }),
            "not an RFC 3339 timestamp",
        ),
        case(
            "number id",
            with(&|m| {
                m.insert("id".into(), 42.into());
            }),
            "`id` must be a string",
        ),
        case(
            "bad data_base64",
            with(&|m| {
                m.remove("data");
                m.insert("datacontenttype".into(), "application/octet-stream".into());
                m.insert("data_base64".into(), "%%% not base64".into());
            }),
            "`data_base64` is not valid base64",
        ),
        case(
            "truncated",
            full_text[..full_text.find("\"id\"").unwrap_or(20)].to_string(),
            "not a CloudEvents JSON document",
        ),
    ]
}

/// Every malformed body is refused by the SDK too, but 0.3 (which postbox
/// does not speak): the oracle agrees they are broken.
fn check_the_oracle_refuses(cases: &[Case]) {
    for Case { name, body, .. } in cases {
        assert!(
            body.contains("\"specversion\""),
            "{name} claims to be an event"
        );
        let parsed = serde_json::from_str::<Event>(body);
        if *name == "specversion 0.3" {
            assert!(parsed.is_ok(), "{name}");
        } else {
            assert!(parsed.is_err(), "the SDK accepts {name}: {body}");
        }
    }
}

/// A running consumer whose handler answers with `outcome` and counts its
/// calls (in `calls`).
fn consumer_counting(
    broker: &SqsBroker,
    source: BoxSource,
    calls: Arc<AtomicUsize>,
    outcome: fn(&Envelope) -> Result<(), HandlerError>,
) -> RunningConsumer {
    Consumer::builder(
        source,
        handler_fn(move |env: Envelope| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                outcome(&env)
            }
        }),
    )
    .concurrency(8)
    .dead_letter(DeadLetterRouter::new(broker.clone()))
    .build()
    .unwrap()
    .spawn()
}

fn consumer(
    broker: &SqsBroker,
    source: BoxSource,
    outcome: fn(&Envelope) -> Result<(), HandlerError>,
) -> RunningConsumer {
    consumer_counting(broker, source, Arc::new(AtomicUsize::new(0)), outcome)
}

/// Waits until `queue` holds `n` messages.
async fn wait_count(broker: &SqsBroker, queue: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let count = broker.count(queue).await.unwrap();
        if count >= n {
            assert_eq!(count, n, "{queue}");
            return;
        }
        assert!(Instant::now() < deadline, "{queue}: {count} of {n}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The dead letters of `queue` are the cases' bodies (by bytes), each with
/// reason `decode`, the decoder's word on it and origin `queue`; returns them
/// by body.
async fn check_decode_dead_letters(
    broker: &SqsBroker,
    queue: &str,
    cases: &[Case],
) -> BTreeMap<Vec<u8>, Envelope> {
    let peeked = broker.peek(&dlq(queue), 100).await.unwrap();
    assert_eq!(peeked.len(), cases.len());
    let by_body: BTreeMap<Vec<u8>, Envelope> = peeked
        .into_iter()
        .map(|e| (e.payload.to_vec(), e))
        .collect();
    for case in cases {
        let env = by_body
            .get(case.body.as_bytes())
            .unwrap_or_else(|| panic!("{}: the original bytes are not in the DLQ", case.name));
        assert_eq!(env.event_type, UNDECODABLE_TYPE);
        let meta = DeadLetterMetadata::read(env).expect("dead-letter metadata");
        assert_eq!(meta.reason, FailureReason::Decode);
        assert_eq!(meta.error_type, "decode");
        assert_eq!(meta.attempts, 1);
        assert_eq!(meta.origin.destination, queue);
        assert!(
            meta.error.contains(case.why),
            "{}: {}",
            case.name,
            meta.error
        );
    }
    by_body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_with_their_bytes_and_replayed_as_they_were() {
    let broker = broker_or_skip!(
        "malformed_events_are_dead_lettered_with_their_bytes_and_replayed_as_they_were"
    );
    let q = plain_queue(&broker, "interop-bad").await;
    let url = broker.queue_url(&q).await.unwrap();
    let cases = malformed();
    check_the_oracle_refuses(&cases);
    // SQS refuses an empty body itself: it never reaches a consumer.
    let empty = broker
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body("")
        .send()
        .await;
    assert!(empty.is_err(), "SQS took an empty body");
    for (i, Case { body, .. }) in cases.iter().enumerate() {
        let mut send = broker
            .sqs()
            .send_message()
            .queue_url(&url)
            .message_body(body);
        if i == 0 {
            // Ten attributes (the most SQS takes), named like CloudEvents
            // attributes and not like any, a number and bytes.
            for (k, v) in foreign_attributes() {
                send = send.message_attributes(k, v);
            }
        }
        send.send().await.unwrap();
    }
    let bodies: Vec<String> = cases.iter().map(|c| c.body.clone()).collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let source = broker.subscribe(&q, existing()).await.unwrap();
    let running = consumer_counting(&broker, source, calls.clone(), |_| Ok(()));
    wait_count(&broker, &dlq(&q), bodies.len() as u64).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
    assert_eq!(
        report,
        RunReport {
            received: bodies.len() as u64,
            dead_lettered: bodies.len() as u64,
            ..RunReport::default()
        }
    );
    assert_eq!(broker.count(&q).await.unwrap(), 0, "nothing left behind");
    let dead = check_decode_dead_letters(&broker, &q, &cases).await;
    // The attributes, exactly, in one header.
    let with_attrs = &dead[bodies[0].as_bytes()];
    let carried: serde_json::Value =
        serde_json::from_str(&with_attrs.headers[ATTRIBUTES_HEADER]).unwrap();
    assert_eq!(
        carried,
        serde_json::json!({
            "type": "legacy.order",
            "id": "legacy-7",
            "tenant": "acme",
            "Tenant-Id": "7",
            "x-trace": "abc",
            "traceId": "t-9",
            "sqs.type": "escaped",
            "count": {"DataType": "Number", "StringValue": "42"},
            "blob": {"DataType": "Binary", "BinaryValue": "AP8="},
            "region": "eu",
        })
    );

    // The copies themselves are valid CloudEvents with strict names only,
    // with `type` as their only attribute.
    for m in receive_raw(&broker, &dlq(&q), bodies.len()).await {
        let event = sdk(body(&m));
        assert_eq!(event.ty(), UNDECODABLE_TYPE);
        assert_strict(&event);
        assert_eq!(
            attributes(&m).into_keys().collect::<Vec<_>>(),
            vec!["type".to_string()]
        );
    }

    // Replay puts the bodies back as they arrived, attributes included.
    let report = broker.replay(&dlq(&q), &|_| true, 100).await.unwrap();
    assert_eq!(report.replayed, bodies.len());
    assert_eq!(broker.count(&dlq(&q)).await.unwrap(), 0);
    let back = receive_raw(&broker, &q, bodies.len()).await;
    let got: BTreeSet<&str> = back.iter().map(body).collect();
    assert_eq!(got, bodies.iter().map(String::as_str).collect());
    let m = back.iter().find(|m| body(m) == bodies[0]).unwrap();
    let sent: BTreeMap<String, MessageAttributeValue> = foreign_attributes()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(
        m.message_attributes.clone().unwrap_or_default(),
        sent.into_iter().collect(),
        "names, data types and values as they arrived"
    );
    for m in &back {
        if body(m) != bodies[0] {
            assert_eq!(attributes(m), BTreeMap::new(), "none arrived, none back");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_through_sns_are_dead_lettered_the_same_way() {
    let broker = broker_or_skip!("malformed_events_through_sns_are_dead_lettered_the_same_way");
    let topic = unique("interop-badsns");
    let (raw, wrapped) = (format!("{topic}-raw"), format!("{topic}-wrapped"));
    let arn = broker.declare_topic(&topic).await.unwrap();
    for (q, is_raw) in [(&raw, true), (&wrapped, false)] {
        for name in [q.clone(), format!("{q}-dlq")] {
            broker
                .declare_queue(&QueueSpec::new(name).without_dead_letter_queue())
                .await
                .unwrap();
        }
        broker
            .declare_subscription(&SubscriptionSpec::new(&topic, q.as_str()).raw(is_raw))
            .await
            .unwrap();
    }
    let cases = malformed();
    check_the_oracle_refuses(&cases);
    let tenant = || {
        postbox_sqs::aws_sdk_sns::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value("acme")
            .build()
            .unwrap()
    };
    // SNS refuses an empty message itself.
    let empty = broker
        .sns()
        .publish()
        .topic_arn(&arn)
        .message("")
        .send()
        .await;
    assert!(empty.is_err(), "SNS took an empty message");
    for Case { body, .. } in &cases {
        broker
            .sns()
            .publish()
            .topic_arn(&arn)
            .message(body)
            .message_attributes("tenant", tenant())
            .message_attributes("x-trace", tenant())
            .send()
            .await
            .unwrap();
    }
    let bodies: Vec<String> = cases.iter().map(|c| c.body.clone()).collect();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut running = Vec::new();
    for q in [&raw, &wrapped] {
        let source = broker.subscribe(q, existing()).await.unwrap();
        running.push(consumer_counting(
            &broker,
            source,
            calls.clone(),
            |_| Ok(()),
        ));
    }
    for q in [&raw, &wrapped] {
        wait_count(&broker, &dlq(q), bodies.len() as u64).await;
    }
    for r in running {
        let report = r.shutdown().await.unwrap();
        assert_eq!(report.dead_lettered, bodies.len() as u64);
        assert_eq!(report.acked, 0);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");

    // Raw delivery: the body as published, the SNS attributes carried.
    let dead = check_decode_dead_letters(&broker, &raw, &cases).await;
    for env in dead.values() {
        assert_eq!(
            env.headers[ATTRIBUTES_HEADER],
            r#"{"tenant":"acme","x-trace":"acme"}"#
        );
    }
    // The copies are valid CloudEvents with strict names only, either way.
    for q in [&raw, &wrapped] {
        for m in receive_raw(&broker, &dlq(q), bodies.len()).await {
            let event = sdk(body(&m));
            assert_strict(&event);
            assert_eq!(
                attributes(&m).into_keys().collect::<Vec<_>>(),
                vec!["type".to_string()]
            );
        }
    }
    // The SNS wrapper: what arrived is the notification, holding the body.
    let peeked = broker.peek(&dlq(&wrapped), 100).await.unwrap();
    assert_eq!(peeked.len(), bodies.len());
    let mut inner = BTreeSet::new();
    for env in &peeked {
        assert_eq!(env.event_type, UNDECODABLE_TYPE);
        assert!(env.source.ends_with(&format!(":{topic}")), "{}", env.source);
        let meta = DeadLetterMetadata::read(env).unwrap();
        assert_eq!(meta.reason, FailureReason::Decode);
        assert_eq!(meta.origin.destination, wrapped);
        let wrapper: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
        assert_eq!(wrapper["Type"], "Notification");
        assert_eq!(wrapper["MessageAttributes"]["tenant"]["Value"], "acme");
        assert_eq!(wrapper["MessageAttributes"]["x-trace"]["Value"], "acme");
        assert!(env
            .headers
            .keys()
            .all(|k| postbox_core::dlq::is_metadata(k)));
        let message = wrapper["Message"].as_str().unwrap();
        let case = cases.iter().find(|c| c.body == message).unwrap();
        assert!(
            meta.error.contains(case.why),
            "{}: {}",
            case.name,
            meta.error
        );
        inner.insert(message.to_string());
    }
    assert_eq!(inner, bodies.iter().cloned().collect(), "every body, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_do_not_starve_good_ones() {
    let broker = broker_or_skip!(
        "malformed_events_do_not_starve_good_ones",
        common::quick().visibility_timeout(Duration::from_secs(3))
    );
    let q = unique("interop-starve");
    for name in [q.clone(), format!("{q}-dlq")] {
        broker
            .declare_queue(
                &QueueSpec::new(name)
                    .visibility_timeout(Duration::from_secs(3))
                    .without_dead_letter_queue(),
            )
            .await
            .unwrap();
    }
    let url = broker.queue_url(&q).await.unwrap();
    let cases = malformed();
    // 21 malformed first (3 of each kind), so every early receive meets them.
    let bad: Vec<String> = (0..21)
        .map(|i| cases[i % cases.len()].body.clone())
        .collect();
    for chunk in bad.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, b)| {
                postbox_sqs::aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(b)
                    .build()
                    .unwrap()
            })
            .collect();
        let out = broker
            .sqs()
            .send_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(out.failed.is_empty());
    }
    let good: Vec<Envelope> = (0..200)
        .map(|i| Envelope::new("order.placed", format!(r#"{{"seq":{i}}}"#)))
        .collect();
    assert!(broker.publish_batch(&q, good.clone()).await.is_success());

    let handled = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = handled.clone();
    let started = Instant::now();
    let source = broker.subscribe(&q, existing()).await.unwrap();
    let running = Consumer::builder(
        source,
        handler_fn(move |env: Envelope| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().insert(env.id.to_string());
                Ok(())
            }
        }),
    )
    .concurrency(16)
    .dead_letter(DeadLetterRouter::new(broker.clone()))
    .build()
    .unwrap()
    .spawn();
    // Seconds here; before undecodable messages were dead-lettered, the 21
    // went round their visibility timeout for ever and this never finished.
    let deadline = started + Duration::from_secs(30);
    loop {
        let done = handled.lock().unwrap().len();
        let dead = broker.count(&dlq(&q)).await.unwrap();
        if done == good.len() && dead == bad.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {:?}: {done} of {} handled, {dead} of {} dead-lettered",
            started.elapsed(),
            good.len(),
            bad.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.dead_lettered, bad.len() as u64, "{report:?}");
    assert!(report.acked >= good.len() as u64, "{report:?}");
    assert_eq!(
        *handled.lock().unwrap(),
        good.iter()
            .map(|e| e.id.to_string())
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(broker.count(&q).await.unwrap(), 0, "all settled");
    eprintln!("221 messages settled in {elapsed:?}");
}
