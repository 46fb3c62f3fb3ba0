//! SQS/SNS-specific behaviour and failure paths against the local emulator.
//!
//! Where the emulator (LocalStack, or moto) deviates from AWS the test says
//! so; `postbox-memory`'s SQS profile covers the real limits too.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postbox_core::{
    handler_fn, BoxDelivery, BoxSource, Broker, Consumer, DeadLetterMetadata, DeadLetterOps,
    DeadLetterRouter, Delivery, Envelope, Error, ErrorKind, Limit, Publisher, Retry, Source,
    SubscribeOptions,
};
use postbox_sqs::{QueueSpec, SqsBroker, SubscriptionSpec, UNDECODABLE_TYPE};
use postbox_testkit::env::unique;

const WAIT: Duration = Duration::from_secs(30);

/// Subscribes to a queue the test declared itself (provisioning would bring
/// it back to the broker's defaults).
fn existing() -> SubscribeOptions {
    SubscribeOptions::new().provision(false)
}

async fn next(source: &mut BoxSource) -> BoxDelivery {
    tokio::time::timeout(WAIT, source.next())
        .await
        .expect("a delivery within the time-out")
        .expect("source open")
        .expect("receive ok")
}

/// A fresh queue (and its DLQ), provisioned through the `Broker` trait.
async fn queue(broker: &SqsBroker, prefix: &str) -> String {
    let name = unique(prefix);
    broker
        .provision(&name, &SubscribeOptions::new())
        .await
        .unwrap();
    name
}

async fn total(broker: &SqsBroker, queue: &str) -> u64 {
    broker.backlog(queue, None).await.unwrap().total()
}

/// The error of a call that must fail (a source is not `Debug`).
fn refused<T>(result: Result<T, Error>) -> Error {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

fn retry(delay: Duration) -> Retry {
    Retry {
        delay,
        next_attempt: 2,
        first_failed_at: SystemTime::now(),
        reason: "handler-error",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_failure_is_reported_per_message() {
    let broker = broker_or_skip!("partial_batch_failure_is_reported_per_message");
    let q = queue(&broker, "partial").await;
    let mut envs: Vec<Envelope> = (0..12)
        .map(|i| Envelope::new("t", format!(r#"{{"i":{i}}}"#)))
        .collect();
    // U+FFFF is not a character SQS accepts: the service refuses that entry
    // alone (InvalidMessageContents) and accepts the rest of its batch.
    envs[3] = Envelope::builder("t")
        .header("note", "bad\u{FFFF}")
        .payload("{}")
        .build();
    // An 11-attribute message is refused before sending, also alone.
    for i in 0..10 {
        envs[11].headers.insert(format!("h{i}"), "v".into());
    }
    let report = broker.publish_batch(&q, envs.clone()).await;
    assert_eq!(report.len(), 12);
    assert!(!report.is_success());
    let failed: Vec<(usize, ErrorKind)> = report
        .failures()
        .map(|(i, e)| (i, e.error.kind().clone()))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[0], (3, ErrorKind::Encode));
    assert!(matches!(
        failed[1],
        (
            11,
            ErrorKind::LimitExceeded(Limit::AttributeCount {
                max: 10,
                actual: 11
            })
        )
    ));
    let (_, e) = report.failures().next().unwrap();
    assert_eq!(
        e.envelope.id, envs[3].id,
        "the failed envelope is handed back"
    );
    assert!(
        std::error::Error::source(&e.error)
            .unwrap()
            .to_string()
            .contains("InvalidMessageContents"),
        "the service's entry error is the source"
    );
    // The other ten arrived.
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 10 {
        let d = next(&mut source).await;
        got.insert(d.envelope().id.to_string());
        d.ack().await.unwrap();
    }
    let expected: BTreeSet<String> = envs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 11)
        .map(|(_, e)| e.id.to_string())
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn limits_are_checked_before_sending() {
    let broker = broker_or_skip!("limits_are_checked_before_sending");
    // The queue does not exist: a limit error proves no call was made.
    let missing = unique("never-created");
    let mut env = Envelope::new("t", "{}");
    for i in 0..10 {
        env.headers.insert(format!("h{i}"), "v".into());
    }
    let e = broker.publish(&missing, env).await.unwrap_err();
    assert_eq!(
        e.error.kind(),
        &ErrorKind::LimitExceeded(Limit::AttributeCount {
            max: 10,
            actual: 11
        })
    );
    let big = Envelope::new("t", vec![b'a'; 1024 * 1024]);
    let e = broker.publish(&missing, big).await.unwrap_err();
    assert!(matches!(
        e.error.kind(),
        ErrorKind::LimitExceeded(Limit::BodySize { max: 1_048_576, .. })
    ));
    // SNS: 256 KiB.
    let e = broker
        .publish("sns:never", Envelope::new("t", vec![b'a'; 300 * 1024]))
        .await
        .unwrap_err();
    assert!(matches!(
        e.error.kind(),
        ErrorKind::LimitExceeded(Limit::BodySize { max: 262_144, .. })
    ));
    let e = broker
        .publish_delayed(&missing, Envelope::new("t", "{}"), Duration::from_secs(901))
        .await
        .unwrap_err();
    assert!(matches!(
        e.error.kind(),
        ErrorKind::LimitExceeded(Limit::Delay { .. })
    ));
    let fifo = format!("{missing}.fifo");
    let e = broker
        .publish(&fifo, Envelope::new("t", "{}"))
        .await
        .unwrap_err();
    assert_eq!(
        e.error.kind(),
        &ErrorKind::LimitExceeded(Limit::FifoGroupRequired)
    );
    let keyed = Envelope::builder("t").key("k").payload("{}").build();
    let e = broker
        .publish_delayed(&fifo, keyed, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(
        e.error.kind(),
        &ErrorKind::LimitExceeded(Limit::FifoDelayUnsupported)
    );
    // A queue that does not exist is NotFound (permanent), not a silent drop.
    let e = broker
        .publish(&missing, Envelope::new("t", "{}"))
        .await
        .unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::NotFound, "{:?}", e.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_send_is_held_back() {
    let broker = broker_or_skip!("delayed_send_is_held_back");
    let q = queue(&broker, "delayed").await;
    let env = Envelope::new("t", "{}");
    let sent = tokio::time::Instant::now();
    broker
        .publish_delayed(&q, env.clone(), Duration::from_secs(2))
        .await
        .unwrap();
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let d = next(&mut source).await;
    assert_eq!(d.envelope().id, env.id);
    assert!(
        sent.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        sent.elapsed()
    );
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_beyond_twelve_hours_is_a_typed_error() {
    let broker = broker_or_skip!("visibility_beyond_twelve_hours_is_a_typed_error");
    let q = queue(&broker, "vis").await;
    broker.publish(&q, Envelope::new("t", "{}")).await.unwrap();
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let d = next(&mut source).await;
    let e = d
        .retry(retry(Duration::from_secs(12 * 3600 + 1)))
        .await
        .unwrap_err();
    assert!(matches!(
        e.error.kind(),
        ErrorKind::LimitExceeded(Limit::Visibility { .. })
    ));
    // The delivery came back unsettled and can still be acked.
    e.delivery.ack().await.unwrap();
    assert_eq!(total(&broker, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_a_visibility_change_and_attempts_come_from_the_receive_count() {
    let broker = broker_or_skip!("retry_is_a_visibility_change");
    let q = queue(&broker, "retry").await;
    let env = Envelope::new("t", "{}");
    broker.publish(&q, env.clone()).await.unwrap();
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let first = next(&mut source).await;
    assert_eq!(first.attempt(), 1);
    let at = tokio::time::Instant::now();
    first.retry(retry(Duration::from_secs(2))).await.unwrap();
    // Nothing was published: the same message comes back, not a copy.
    assert_eq!(total(&broker, &q).await, 1);
    let second = next(&mut source).await;
    assert!(at.elapsed() >= Duration::from_millis(1900));
    assert_eq!(second.envelope().id, env.id);
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.envelope().attempt, 2);
    second.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_without_raw_delivery_is_unwrapped() {
    let broker = broker_or_skip!("sns_without_raw_delivery_is_unwrapped");
    let topic = unique("wrapped");
    let q = format!("{topic}-q");
    broker.declare_topic(&topic).await.unwrap();
    broker.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    broker
        .declare_subscription(&SubscriptionSpec::new(&topic, &q).raw(false))
        .await
        .unwrap();
    let env = Envelope::builder("order.placed")
        .header("tenant", "acme")
        .key("k")
        .payload(r#"{"id":1}"#)
        .build();
    broker
        .publish(&format!("sns:{topic}"), env.clone())
        .await
        .unwrap();
    // The raw body really is the SNS notification JSON.
    let url = broker.queue_url(&q).await.unwrap();
    let raw = loop {
        let out = broker
            .sqs()
            .receive_message()
            .queue_url(&url)
            .wait_time_seconds(2)
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
        if let Some(m) = out.messages.unwrap_or_default().into_iter().next() {
            break m.body.unwrap_or_default();
        }
    };
    assert!(
        raw.contains("\"Type\"") && raw.contains("Notification"),
        "{raw}"
    );
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let d = next(&mut source).await;
    assert_eq!(d.envelope(), &{
        let mut e = env.clone();
        e.attempt = d.attempt();
        e
    });
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_filter_policies_route_by_type() {
    let broker = broker_or_skip!("sns_filter_policies_route_by_type");
    let topic = unique("filter");
    let (all, placed) = (format!("{topic}-all"), format!("{topic}-placed"));
    broker.declare_topic(&topic).await.unwrap();
    for q in [&all, &placed] {
        broker.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    broker
        .declare_subscription(&SubscriptionSpec::new(&topic, &all))
        .await
        .unwrap();
    let sub = SubscriptionSpec::new(&topic, &placed).filter_policy(r#"{"type":["order.placed"]}"#);
    broker.declare_subscription(&sub).await.unwrap();
    // Idempotent: declaring everything again changes nothing.
    broker.declare_subscription(&sub).await.unwrap();
    broker
        .declare_queue(&QueueSpec::new(&placed))
        .await
        .unwrap();
    let dest = format!("sns:{topic}");
    let placed_env = Envelope::new("order.placed", "{}");
    let report = broker
        .publish_batch(
            &dest,
            vec![Envelope::new("order.paid", "{}"), placed_env.clone()],
        )
        .await;
    assert!(report.is_success());
    let mut s_all = broker.subscribe(&all, existing()).await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        let d = next(&mut s_all).await;
        got.insert(d.envelope().event_type.to_string());
        d.ack().await.unwrap();
    }
    let mut s_placed = broker.subscribe(&placed, existing()).await.unwrap();
    let d = next(&mut s_placed).await;
    assert_eq!(d.envelope().id, placed_env.id);
    d.ack().await.unwrap();
    let more = tokio::time::timeout(Duration::from_secs(2), s_placed.next()).await;
    assert!(more.is_err(), "the filtered queue got an order.paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_slow_handlers_message_invisible() {
    // Visibility 2 s; the handler takes 7 s.
    let broker = broker_or_skip!(
        "heartbeat_keeps_a_slow_handlers_message_invisible",
        common::quick().visibility_timeout(Duration::from_secs(2))
    );
    let q = queue(&broker, "heartbeat").await;
    let env = Envelope::new("t", "{}");
    broker.publish(&q, env.clone()).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = handler_fn(move |_env: Envelope| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, AtomicOrdering::SeqCst);
            tokio::time::sleep(Duration::from_secs(7)).await;
            Ok(())
        }
    });
    let source = broker.subscribe(&q, existing()).await.unwrap();
    let running = Consumer::builder(source, handler)
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();
    // Once the handler runs, a competing consumer must not get the message.
    while calls.load(AtomicOrdering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rival = broker.subscribe(&q, existing()).await.unwrap();
    let stolen = tokio::time::timeout(Duration::from_secs(8), rival.next()).await;
    if let Ok(Some(Ok(d))) = &stolen {
        eprintln!("stolen attempt {} after {:?}", d.attempt(), d.envelope().id);
    }
    assert!(
        stolen.is_err(),
        "the slow handler's message was redelivered: {:?}",
        stolen.as_ref().map(|o| o
            .as_ref()
            .map(|r| r.as_ref().map(|d| d.attempt()).map_err(|e| e.to_string())))
    );
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 1);
    assert_eq!(total(&broker, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_consumer_messages_come_back_after_visibility() {
    let broker = broker_or_skip!("crashed_consumer_messages_come_back_after_visibility");
    let q = queue(&broker, "crash").await;
    let envs: Vec<Envelope> = (0..5).map(|i| Envelope::new("t", format!("{i}"))).collect();
    assert!(broker.publish_batch(&q, envs.clone()).await.is_success());
    let config = common::quick()
        .visibility_timeout(Duration::from_secs(2))
        .receivers(1)
        .buffer(5);
    // The consumer "process": its own runtime and broker handle, killed with
    // the messages in flight (no settle, no release, no close: its heartbeat
    // and receivers die with it).
    let crashed_q = q.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let crashed = SqsBroker::connect(config).await.unwrap();
            let mut source = crashed.subscribe(&crashed_q, existing()).await.unwrap();
            let mut held = Vec::new();
            for _ in 0..5 {
                held.push(next(&mut source).await);
            }
            std::mem::forget(held);
            std::mem::forget(source);
        });
        rt.shutdown_background();
    })
    .await
    .unwrap();
    let backlog = broker.backlog(&q, None).await.unwrap();
    assert_eq!(backlog.in_flight, Some(5), "{backlog:?}");
    let mut after = broker.subscribe(&q, existing()).await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 5 {
        let d = next(&mut after).await;
        assert!(d.attempt() >= 2, "redelivery with attempt {}", d.attempt());
        got.insert(d.envelope().id.to_string());
        d.ack().await.unwrap();
    }
    let expected: BTreeSet<String> = envs.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_group_keeps_order_across_retries() {
    let broker = broker_or_skip!(
        "fifo_group_keeps_order_across_retries",
        common::quick().receivers(1)
    );
    let q = format!("{}.fifo", unique("fifo"));
    broker.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    let envs: Vec<Envelope> = (0..4)
        .map(|i| {
            Envelope::builder("t")
                .key("g1")
                .payload(format!("{i}"))
                .build()
        })
        .collect();
    assert!(broker.publish_batch(&q, envs.clone()).await.is_success());
    let options = existing().prefetch(1).ordered(true);
    let mut source = broker.subscribe(&q, options).await.unwrap();
    let mut order = Vec::new();
    let mut retried = false;
    while order.len() < 4 {
        let d = next(&mut source).await;
        let payload = String::from_utf8(d.envelope().payload.to_vec()).unwrap();
        if payload == "1" && !retried {
            retried = true;
            d.retry(retry(Duration::from_secs(1))).await.unwrap();
            continue;
        }
        order.push(payload);
        d.ack().await.unwrap();
    }
    assert_eq!(
        order,
        ["0", "1", "2", "3"],
        "a retried message was overtaken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_deduplicates_by_envelope_id() {
    let broker = broker_or_skip!("fifo_deduplicates_by_envelope_id");
    let q = format!("{}.fifo", unique("dedup"));
    broker.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    let env = Envelope::builder("t").key("g").payload("{}").build();
    broker.publish(&q, env.clone()).await.unwrap();
    broker.publish(&q, env.clone()).await.unwrap();
    assert_eq!(
        total(&broker, &q).await,
        1,
        "republishing one envelope id was not de-duplicated"
    );
}

#[tokio::test]
async fn redrive_policy_is_provisioned_idempotently() {
    let broker = broker_or_skip!("redrive_policy_is_provisioned_idempotently");
    let name = unique("redrive");
    let spec = QueueSpec::new(&name)
        .max_receive_count(7)
        .visibility_timeout(Duration::from_secs(45))
        .retention(Duration::from_secs(3600));
    broker.declare_queue(&spec).await.unwrap();
    let (arn, max) = broker.redrive_policy(&name).await.unwrap().unwrap();
    assert!(arn.ends_with(&format!(":{name}-dlq")), "{arn}");
    assert_eq!(max, 7);
    // Again, with another maxReceiveCount: the declared state wins.
    broker
        .declare_queue(&spec.clone().max_receive_count(9))
        .await
        .unwrap();
    assert_eq!(broker.redrive_policy(&name).await.unwrap().unwrap().1, 9);
    // FIFO queues get a FIFO DLQ.
    let fifo = format!("{name}.fifo");
    broker.declare_queue(&QueueSpec::new(&fifo)).await.unwrap();
    let (arn, _) = broker.redrive_policy(&fifo).await.unwrap().unwrap();
    assert!(arn.ends_with(&format!(":{name}-dlq.fifo")), "{arn}");
}

/// An undecodable message is handed out with its decode error and what
/// arrived; one that nobody settles (a source used without the runtime) is
/// still caught by the native redrive policy, and `peek` shows it raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_redrive_still_catches_an_undecodable_message_nobody_settles() {
    let broker = broker_or_skip!(
        "native_redrive_still_catches_an_undecodable_message_nobody_settles",
        common::quick().visibility_timeout(Duration::from_secs(1))
    );
    let name = unique("poison");
    broker
        .declare_queue(&QueueSpec::new(&name).max_receive_count(2))
        .await
        .unwrap();
    let body = r#"{"specversion":"1.0","id":"x"}"#;
    let url = broker.queue_url(&name).await.unwrap();
    broker
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body(body)
        .send()
        .await
        .unwrap();
    let mut source = broker.subscribe(&name, existing()).await.unwrap();
    let mut receives = 0;
    let dlq = postbox_core::dlq::default_destination(&name);
    while total(&broker, &dlq).await == 0 {
        match tokio::time::timeout(Duration::from_secs(3), source.next()).await {
            Ok(Some(Ok(d))) => {
                let e = d.decode_error().expect("a decode error");
                assert_eq!(e.kind(), &ErrorKind::Decode);
                assert!(e.message().contains("`type` is missing"), "{e}");
                assert_eq!(d.envelope().event_type, UNDECODABLE_TYPE);
                assert_eq!(&d.envelope().payload[..], body.as_bytes());
                receives += 1;
                drop(d);
            }
            Ok(other) => panic!("unexpected {:?}", other.map(|r| r.map(|d| d.attempt()))),
            Err(_) => {}
        }
        assert!(receives <= 5, "not redriven after {receives} receives");
    }
    assert!(receives >= 2);
    source.close().await.unwrap();
    let peeked = broker.peek(&dlq, 10).await.unwrap();
    assert_eq!(peeked.len(), 1);
    assert_eq!(peeked[0].event_type, UNDECODABLE_TYPE);
    assert_eq!(&peeked[0].payload[..], body.as_bytes());
    assert!(
        DeadLetterMetadata::read(&peeked[0]).is_none(),
        "SQS wrote no metadata"
    );
}

/// A broken CloudEvent on a FIFO queue is dead-lettered through the router
/// in its message group (the DLQ is FIFO too), and replay puts it back in
/// that group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_on_a_fifo_queue_is_dead_lettered_in_its_group() {
    let broker =
        broker_or_skip!("an_undecodable_message_on_a_fifo_queue_is_dead_lettered_in_its_group");
    let name = format!("{}.fifo", unique("badfifo"));
    broker
        .declare_queue(&QueueSpec::new(&name).max_receive_count(5))
        .await
        .unwrap();
    let body = r#"{"specversion":"1.0","id":"1","type":"t","source":"s","time":"noon"}"#;
    let url = broker.queue_url(&name).await.unwrap();
    broker
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body(body)
        .message_group_id("g1")
        .message_deduplication_id("d1")
        .send()
        .await
        .unwrap();
    let source = broker
        .subscribe(&name, existing().ordered(true))
        .await
        .unwrap();
    let running = Consumer::builder(source, handler_fn(|_env: Envelope| async { Ok(()) }))
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();
    let dlq = postbox_core::dlq::default_destination(&name);
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&dlq).await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let peeked = broker.peek(&dlq, 10).await.unwrap();
    assert_eq!(peeked.len(), 1);
    let meta = DeadLetterMetadata::read(&peeked[0]).unwrap();
    assert_eq!(meta.reason, postbox_core::FailureReason::Decode);
    assert!(meta.error.contains("RFC 3339"), "{}", meta.error);
    assert_eq!(peeked[0].key.as_deref(), Some("g1"));
    assert_eq!(&peeked[0].payload[..], body.as_bytes());
    let replayed = broker.replay(&dlq, &|_| true, 10).await.unwrap();
    assert_eq!(replayed.replayed, 1);
    let out = broker
        .sqs()
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(5)
        .message_system_attribute_names(
            postbox_sqs::aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId,
        )
        .send()
        .await
        .unwrap();
    let m = &out.messages.unwrap()[0];
    assert_eq!(m.body.as_deref(), Some(body));
    let group = m.attributes.as_ref().unwrap()
        [&postbox_sqs::aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId]
        .as_str();
    assert_eq!(group, "g1");
}

/// `count`, `peek`, `replay` and `purge` agree on a DLQ holding postbox's
/// copies and undecodable messages (moved there by the redrive policy, or
/// written by another tool with metadata as attributes): none is invisible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_operations_agree_on_undecodable_dead_letters() {
    let broker = broker_or_skip!("dead_letter_operations_agree_on_undecodable_dead_letters");
    let q = queue(&broker, "dlqops").await;
    let dlq = postbox_core::dlq::default_destination(&q);
    let now = SystemTime::now();
    let copies: Vec<Envelope> = (0..4)
        .map(|i| {
            let mut env = Envelope::new("order.placed", format!(r#"{{"i":{i}}}"#));
            DeadLetterMetadata {
                reason: postbox_core::FailureReason::HandlerError,
                error: "boom".into(),
                error_type: "permanent".into(),
                attempts: 1,
                first_failed_at: now,
                last_failed_at: now,
                origin: postbox_core::Origin {
                    destination: q.clone(),
                    partition: None,
                    offset: None,
                },
                consumer: "test".into(),
            }
            .apply(&mut env);
            env
        })
        .collect();
    assert!(broker
        .publish_batch(&dlq, copies.clone())
        .await
        .is_success());
    let broken = [
        r#"{"specversion":"1.0","id":"x"}"#,
        r#"{"specversion":"1.0""#,
        r#"{"specversion":"0.3","id":"1","type":"t","source":"s"}"#,
        r#"{"specversion":"1.0","id":"1","type":"t","source":"s","data_base64":"%%"}"#,
    ];
    let dlq_url = broker.queue_url(&dlq).await.unwrap();
    for body in broken {
        broker
            .sqs()
            .send_message()
            .queue_url(&dlq_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    let attr = |v: &str| {
        postbox_sqs::aws_sdk_sqs::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    let tagged = r#"{"specversion":"2.0","id":"t"}"#;
    broker
        .sqs()
        .send_message()
        .queue_url(&dlq_url)
        .message_body(tagged)
        .message_attributes("dlqreason", attr("decode"))
        .message_attributes("dlqorigin", attr(&q))
        .message_attributes("tenant", attr("acme"))
        .send()
        .await
        .unwrap();
    let all = copies.len() + broken.len() + 1;
    assert_eq!(broker.count(&dlq).await.unwrap(), all as u64);
    let peeked = broker.peek(&dlq, 200).await.unwrap();
    assert_eq!(peeked.len(), all, "peek shows every dead letter");
    let raw: BTreeSet<&[u8]> = peeked
        .iter()
        .filter(|e| e.event_type == UNDECODABLE_TYPE)
        .map(|e| &e.payload[..])
        .collect();
    let expected: BTreeSet<&[u8]> = broken
        .iter()
        .chain([&tagged])
        .map(|b| b.as_bytes())
        .collect();
    assert_eq!(raw, expected, "shown raw");
    let shown = peeked
        .iter()
        .find(|e| &e.payload[..] == tagged.as_bytes())
        .unwrap();
    assert_eq!(shown.headers["dlqreason"], "decode", "with its metadata");
    assert_eq!(shown.headers["dlqorigin"], q);
    assert_eq!(
        shown.headers[postbox_sqs::ATTRIBUTES_HEADER],
        r#"{"tenant":"acme"}"#,
        "and its other attributes"
    );

    // Replay takes the copies and the tagged message (it names its origin)
    // and leaves the redriven ones, which name none.
    let report = broker.replay(&dlq, &|_| true, 200).await.unwrap();
    assert_eq!(report.replayed, copies.len() + 1, "{report:?}");
    assert_eq!(report.skipped, broken.len(), "{report:?}");
    assert_eq!(broker.count(&dlq).await.unwrap(), broken.len() as u64);
    assert_eq!(broker.peek(&dlq, 200).await.unwrap().len(), broken.len());
    let url = broker.queue_url(&q).await.unwrap();
    let mut back = Vec::new();
    while back.len() < copies.len() + 1 {
        let out = broker
            .sqs()
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(2)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        back.extend(out.messages.unwrap_or_default());
    }
    let m = back
        .iter()
        .find(|m| m.body.as_deref() == Some(tagged))
        .expect("the tagged body, as it was");
    let names: BTreeSet<&str> = m
        .message_attributes
        .iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["tenant"]), "metadata left behind");
    assert_eq!(broker.purge(&dlq).await.unwrap(), broken.len() as u64);
    assert_eq!(broker.count(&dlq).await.unwrap(), 0);
    assert!(broker.peek(&dlq, 200).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_get_a_synthesized_envelope() {
    let broker = broker_or_skip!(
        "foreign_messages_get_a_synthesized_envelope",
        common::quick().foreign_type("legacy.event")
    );
    let q = queue(&broker, "foreign").await;
    let url = broker.queue_url(&q).await.unwrap();
    let out = broker
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body(r#"{"legacy":true}"#)
        .send()
        .await
        .unwrap();
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    let d = next(&mut source).await;
    assert_eq!(d.envelope().id.as_str(), out.message_id.unwrap());
    assert_eq!(d.envelope().event_type, "legacy.event");
    assert_eq!(&d.envelope().payload[..], br#"{"legacy":true}"#);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn backlog_counts_waiting_in_flight_and_delayed() {
    let broker = broker_or_skip!("backlog_counts_waiting_in_flight_and_delayed");
    let q = queue(&broker, "backlog").await;
    assert!(broker
        .publish_batch(&q, (0..3).map(|_| Envelope::new("t", "{}")).collect())
        .await
        .is_success());
    broker
        .publish_delayed(&q, Envelope::new("t", "{}"), Duration::from_secs(600))
        .await
        .unwrap();
    let b = broker.backlog(&q, None).await.unwrap();
    assert_eq!(
        (b.waiting, b.in_flight, b.delayed),
        (3, Some(0), Some(1)),
        "{b:?}"
    );
    let mut source = broker.subscribe(&q, existing().prefetch(1)).await.unwrap();
    let held = next(&mut source).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The receivers may hold a second message in the buffer.
        let b = broker.backlog(&q, None).await.unwrap();
        if b.in_flight >= Some(1) && b.waiting + b.in_flight.unwrap_or(0) == 3 {
            assert_eq!(b.delayed, Some(1), "{b:?}");
            assert_eq!(b.total(), 4);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.ack().await.unwrap();
    source.close().await.unwrap();
    // The queue's dead-letter queue is provisioned, and empty.
    let dlq = broker.backlog(&format!("{q}.dlq"), None).await.unwrap();
    assert_eq!(dlq.total(), 0, "{dlq:?}");
    assert_eq!(broker.count(&format!("{q}.dlq")).await.unwrap(), 0);
    // A queue that does not exist is NotFound.
    let e = broker
        .backlog(&unique("never-created"), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn health_reports_the_system_and_latency() {
    let broker = broker_or_skip!("health_reports_the_system_and_latency");
    let health = broker.health().await.unwrap();
    assert_eq!(health.system, "aws_sqs");
    assert!(health.latency > Duration::ZERO);
    let region = postbox_testkit::env::var_or("AWS_REGION", "us-east-1");
    assert!(health.detail.contains(&region), "{}", health.detail);
    // An endpoint nobody listens on: a retryable connection error, not a hang.
    let dead = SqsBroker::connect(
        common::config_at("http://127.0.0.1:9")
            .connect_timeout(Duration::from_secs(1))
            .operation_timeout(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let e = dead.health().await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
}

/// Keys never show in `Debug` (of the configuration or of the broker: the
/// clients, whose configuration holds the credentials provider, are not
/// printed). No network: connecting sends nothing.
#[tokio::test]
async fn debug_never_shows_credentials() {
    let config = common::config().credentials("AKIDPOSTBOXTEST", "s3cr3t/postbox+key");
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("AKIDPOSTBOXTEST") && !shown.contains("s3cr3t"),
        "{shown}"
    );
    let broker = SqsBroker::connect(config).await.unwrap();
    let shown = format!("{broker:?}");
    assert!(
        shown.contains("SqsBroker")
            && !shown.contains("AKIDPOSTBOXTEST")
            && !shown.contains("s3cr3t"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_fifo_topic_fans_out_in_group_order() {
    let broker = broker_or_skip!(
        "sns_fifo_topic_fans_out_in_group_order",
        common::quick().receivers(1)
    );
    let topic = format!("{}.fifo", unique("fifotopic"));
    broker.declare_topic(&topic).await.unwrap();
    let base = topic.trim_end_matches(".fifo");
    let queues = [format!("{base}-a.fifo"), format!("{base}-b.fifo")];
    for q in &queues {
        broker.declare_queue(&QueueSpec::new(q)).await.unwrap();
        broker
            .declare_subscription(&SubscriptionSpec::new(&topic, q))
            .await
            .unwrap();
    }
    let dest = format!("sns:{topic}");
    let e = broker
        .publish(&dest, Envelope::new("t", "{}"))
        .await
        .unwrap_err();
    assert_eq!(
        e.error.kind(),
        &ErrorKind::LimitExceeded(Limit::FifoGroupRequired)
    );
    let envs: Vec<Envelope> = (0..5)
        .map(|i| {
            Envelope::builder("t")
                .key("g")
                .payload(format!("{i}"))
                .build()
        })
        .collect();
    assert!(broker.publish_batch(&dest, envs.clone()).await.is_success());
    for q in &queues {
        let mut source = broker.subscribe(q, existing()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            let d = next(&mut source).await;
            got.push(d.envelope().id.clone());
            d.ack().await.unwrap();
        }
        let sent: Vec<_> = envs.iter().map(|e| e.id.clone()).collect();
        assert_eq!(got, sent, "queue {q} out of order");
    }
}

// ---------------------------------------------------------------------------
// The `Broker` trait: destinations, groups, provisioning, capabilities, close.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_subscription_provisions_a_queue_per_group() {
    let broker = broker_or_skip!(
        "sns_subscription_provisions_a_queue_per_group",
        common::quick().max_receive_count(7)
    );
    let topic = unique("fan");
    let dest = format!("sns:{topic}");
    let mut a = broker
        .subscribe(&dest, SubscribeOptions::group("a"))
        .await
        .unwrap();
    let mut b = broker
        .subscribe(&dest, SubscribeOptions::group("b.x"))
        .await
        .unwrap();
    // `<topic>-<group>` (dots normalised), with its DLQ and redrive policy.
    assert_eq!(a.destination(), format!("{topic}-a"));
    assert_eq!(b.destination(), format!("{topic}-b-x"));
    let (arn, max) = broker
        .redrive_policy(&format!("{topic}-a"))
        .await
        .unwrap()
        .unwrap();
    assert!(arn.ends_with(&format!(":{topic}-a-dlq")), "{arn}");
    assert_eq!(max, 7);
    let env = Envelope::builder("order.placed")
        .header("tenant", "acme")
        .payload(r#"{"id":1}"#)
        .build();
    broker.publish(&dest, env.clone()).await.unwrap();
    for source in [&mut a, &mut b] {
        // Raw delivery: the envelope as published.
        let d = next(source).await;
        assert_eq!(d.envelope(), &{
            let mut e = env.clone();
            e.attempt = d.attempt();
            e
        });
        d.ack().await.unwrap();
    }
    let backlog = broker.backlog(&dest, Some("a")).await.unwrap();
    assert_eq!(backlog.waiting, 0, "{backlog:?}");
    a.close().await.unwrap();
    b.close().await.unwrap();
    // Provisioning again is harmless.
    broker
        .provision(&dest, &SubscribeOptions::group("a"))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_sns_destination_needs_a_group() {
    let broker = broker_or_skip!("an_sns_destination_needs_a_group");
    let dest = format!("sns:{}", unique("nogroup"));
    let e = refused(broker.subscribe(&dest, SubscribeOptions::new()).await);
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(e.message().contains("consumer group"), "{e}");
    let e = broker
        .provision(&dest, &SubscribeOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    let e = broker.backlog(&dest, None).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_needs_a_fifo_queue() {
    let broker = broker_or_skip!("ordered_needs_a_fifo_queue");
    let q = unique("unordered");
    let e = refused(
        broker
            .subscribe(&q, SubscribeOptions::new().ordered(true))
            .await,
    );
    assert_eq!(e.kind(), &ErrorKind::Unsupported);
    // Refused before anything was declared.
    let e = broker.backlog(&q, None).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
    let fifo = format!("{}.fifo", unique("ordered"));
    let source = broker
        .subscribe(&fifo, SubscribeOptions::group("g").ordered(true))
        .await
        .unwrap();
    source.close().await.unwrap();
    // A queue ignores the group for naming: every group competes on it.
    assert!(broker.backlog(&fifo, Some("other")).await.is_ok());
    let (arn, _) = broker.redrive_policy(&fifo).await.unwrap().unwrap();
    assert!(arn.ends_with("-dlq.fifo"), "{arn}");
}

#[tokio::test]
async fn capabilities_are_declared() {
    let broker = broker_or_skip!("capabilities_are_declared");
    let caps = broker.capabilities();
    assert!(caps.redelivery_on_close && caps.backlog);
    assert!(!caps.ordered && !caps.group_fan_out);
    assert_eq!(caps.scheduled_publish, Some(Duration::from_secs(15 * 60)));
    assert_eq!(caps.max_message_bytes, Some(1024 * 1024));
    assert_eq!(caps.max_headers, Some(10));
    assert_eq!(broker.system(), "aws_sqs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_broker_refuses_work_and_stops_its_sources() {
    let broker = broker_or_skip!("a_closed_broker_refuses_work_and_stops_its_sources");
    let q = queue(&broker, "closed").await;
    let mut source = broker.subscribe(&q, existing()).await.unwrap();
    broker.close().await.unwrap();
    let env = Envelope::new("t", "{}");
    let e = broker.publish(&q, env.clone()).await.unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Closed);
    assert_eq!(e.envelope.id, env.id, "the envelope is handed back");
    let e = broker
        .publish_delayed(&q, env.clone(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Closed);
    let report = broker.publish_batch(&q, vec![env.clone(), env]).await;
    assert_eq!(report.failures().count(), 2);
    assert!(report
        .failures()
        .all(|(_, e)| e.error.kind() == &ErrorKind::Closed));
    let e = refused(broker.subscribe(&q, existing()).await);
    assert_eq!(e.kind(), &ErrorKind::Closed);
    let e = broker
        .provision(&q, &SubscribeOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Closed);
    assert_eq!(
        broker.health().await.unwrap_err().kind(),
        &ErrorKind::Closed
    );
    // The open source ends once its receivers finish their long poll.
    let end = tokio::time::timeout(WAIT, source.next()).await.unwrap();
    assert!(end.is_none());
    source.close().await.unwrap();
}

/// A consumer shut down mid-stream: what it acked is deleted (confirmed)
/// when `shutdown` returns, what it received and did not hand out is
/// visible again at once; a fresh consumer gets exactly the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_confirms_acks_and_gives_back_the_buffer() {
    let config = || common::quick().receivers(2).buffer(20);
    let broker = broker_or_skip!("shutdown_confirms_acks_and_gives_back_the_buffer", config());
    let q = queue(&broker, "shutdown").await;
    let envs: Vec<Envelope> = (0..150)
        .map(|i| Envelope::new("t", format!("{i}")))
        .collect();
    for chunk in envs.chunks(10) {
        assert!(broker.publish_batch(&q, chunk.to_vec()).await.is_success());
    }
    let handled = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let record = handled.clone();
    let handler = handler_fn(move |env: Envelope| {
        let record = record.clone();
        async move {
            record.lock().unwrap().insert(env.id.to_string());
            Ok(())
        }
    });
    let source = broker.subscribe(&q, existing()).await.unwrap();
    let running = Consumer::builder(source, handler)
        .concurrency(4)
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();
    let deadline = tokio::time::Instant::now() + WAIT;
    while handled.lock().unwrap().len() < 100 {
        assert!(tokio::time::Instant::now() < deadline, "too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = running.shutdown().await.unwrap();
    let handled = handled.lock().unwrap().clone();
    assert_eq!(report.acked as usize, handled.len(), "{report:?}");
    assert!(handled.len() < envs.len(), "the test needs some left over");
    // Immediately: the acked are gone, nothing is held invisible.
    let backlog = broker.backlog(&q, None).await.unwrap();
    assert_eq!(backlog.in_flight, Some(0), "{backlog:?}");
    assert_eq!(
        backlog.total() as usize,
        envs.len() - handled.len(),
        "{backlog:?}"
    );
    drop(broker);

    let fresh = broker_or_skip!("shutdown_confirms_acks_and_gives_back_the_buffer", config());
    let mut source = fresh.subscribe(&q, existing()).await.unwrap();
    let mut rest = BTreeSet::new();
    while rest.len() < envs.len() - handled.len() {
        let d = next(&mut source).await;
        let id = d.envelope().id.to_string();
        assert!(!handled.contains(&id), "an acked message came back");
        rest.insert(id);
        d.ack().await.unwrap();
    }
    let more = tokio::time::timeout(Duration::from_secs(2), source.next()).await;
    assert!(more.is_err(), "more than the rest was delivered");
    source.close().await.unwrap();
    assert_eq!(total(&fresh, &q).await, 0);
}
