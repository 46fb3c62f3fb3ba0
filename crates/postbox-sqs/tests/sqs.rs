//! SQS/SNS-specific behaviour and failure paths against the local emulator.
//!
//! Where the emulator (LocalStack, or moto) deviates from AWS the test says
//! so; `postbox-memory`'s SQS profile covers the real limits too.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postbox_core::{
    handler_fn, Consumer, DeadLetterRouter, Delivery, Envelope, ErrorKind, Limit, Publisher, Retry,
    Source,
};
use postbox_sqs::{ConsumerOptions, QueueSpec, SqsBroker, SqsSource, SubscriptionSpec};

const WAIT: Duration = Duration::from_secs(30);

macro_rules! broker_or_skip {
    ($test:expr) => {
        match common::broker($test).await {
            Some(b) => b,
            None => return,
        }
    };
}

fn quick() -> ConsumerOptions {
    ConsumerOptions::default().wait_time(Duration::from_secs(1))
}

async fn next(source: &mut SqsSource) -> postbox_sqs::SqsDelivery {
    tokio::time::timeout(WAIT, source.next())
        .await
        .expect("a delivery within the time-out")
        .expect("source open")
        .expect("receive ok")
}

async fn queue(broker: &SqsBroker, prefix: &str) -> String {
    let name = common::unique(prefix);
    broker.declare_queue(&QueueSpec::new(&name)).await.unwrap();
    name
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
    let mut source = broker.subscribe_with(&q, quick()).await.unwrap();
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
    let missing = common::unique("never-created");
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
    let mut source = broker.subscribe_with(&q, quick()).await.unwrap();
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
    let mut source = broker.subscribe_with(&q, quick()).await.unwrap();
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
    assert_eq!(broker.depth(&q).await.unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_a_visibility_change_and_attempts_come_from_the_receive_count() {
    let broker = broker_or_skip!("retry_is_a_visibility_change");
    let q = queue(&broker, "retry").await;
    let env = Envelope::new("t", "{}");
    broker.publish(&q, env.clone()).await.unwrap();
    let mut source = broker.subscribe_with(&q, quick()).await.unwrap();
    let first = next(&mut source).await;
    assert_eq!(first.attempt(), 1);
    let at = tokio::time::Instant::now();
    first.retry(retry(Duration::from_secs(2))).await.unwrap();
    // Nothing was published: the same message comes back, not a copy.
    assert_eq!(broker.depth(&q).await.unwrap().total(), 1);
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
    let topic = common::unique("wrapped");
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
    let mut source = broker.subscribe_with(&q, quick()).await.unwrap();
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
    let topic = common::unique("filter");
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
    let mut s_all = broker.subscribe_with(&all, quick()).await.unwrap();
    let mut got = BTreeSet::new();
    while got.len() < 2 {
        let d = next(&mut s_all).await;
        got.insert(d.envelope().event_type.to_string());
        d.ack().await.unwrap();
    }
    let mut s_placed = broker.subscribe_with(&placed, quick()).await.unwrap();
    let d = next(&mut s_placed).await;
    assert_eq!(d.envelope().id, placed_env.id);
    d.ack().await.unwrap();
    let more = tokio::time::timeout(Duration::from_secs(2), s_placed.next()).await;
    assert!(more.is_err(), "the filtered queue got an order.paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_slow_handlers_message_invisible() {
    let broker = broker_or_skip!("heartbeat_keeps_a_slow_handlers_message_invisible");
    let q = queue(&broker, "heartbeat").await;
    let env = Envelope::new("t", "{}");
    broker.publish(&q, env.clone()).await.unwrap();
    // Visibility 2 s; the handler takes 7 s.
    let options = quick().visibility_timeout(Duration::from_secs(2));
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
    let source = broker.subscribe_with(&q, options.clone()).await.unwrap();
    let running = Consumer::builder(source, handler)
        .dead_letter(DeadLetterRouter::new(Arc::new(broker.clone())))
        .build()
        .unwrap()
        .spawn();
    // Once the handler runs, a competing consumer must not get the message.
    while calls.load(AtomicOrdering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rival = broker.subscribe_with(&q, options).await.unwrap();
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
    assert_eq!(broker.depth(&q).await.unwrap().total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_consumer_messages_come_back_after_visibility() {
    let broker = broker_or_skip!("crashed_consumer_messages_come_back_after_visibility");
    let q = queue(&broker, "crash").await;
    let envs: Vec<Envelope> = (0..5).map(|i| Envelope::new("t", format!("{i}"))).collect();
    assert!(broker.publish_batch(&q, envs.clone()).await.is_success());
    let options = quick()
        .visibility_timeout(Duration::from_secs(2))
        .receivers(1)
        .buffer(5);
    // The consumer "process": its own runtime, killed with the messages in
    // flight (no settle, no release, its heartbeat and receivers die with it).
    let crashed = broker.clone();
    let crashed_q = q.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut source = crashed.subscribe_with(&crashed_q, options).await.unwrap();
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
    assert_eq!(broker.depth(&q).await.unwrap().in_flight, 5);
    let mut after = broker.subscribe_with(&q, quick()).await.unwrap();
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
    let broker = broker_or_skip!("fifo_group_keeps_order_across_retries");
    let q = format!("{}.fifo", common::unique("fifo"));
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
    let options = quick().batch_size(1).receivers(1);
    let mut source = broker.subscribe_with(&q, options).await.unwrap();
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
    let q = format!("{}.fifo", common::unique("dedup"));
    broker.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    let env = Envelope::builder("t").key("g").payload("{}").build();
    broker.publish(&q, env.clone()).await.unwrap();
    broker.publish(&q, env.clone()).await.unwrap();
    let depth = broker.depth(&q).await.unwrap();
    assert_eq!(
        depth.total(),
        1,
        "republishing one envelope id was not de-duplicated"
    );
}

#[tokio::test]
async fn redrive_policy_is_provisioned_idempotently() {
    let broker = broker_or_skip!("redrive_policy_is_provisioned_idempotently");
    let name = common::unique("redrive");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_redrive_moves_a_poison_message_to_the_dlq() {
    let broker = broker_or_skip!("native_redrive_moves_a_poison_message_to_the_dlq");
    let name = common::unique("poison");
    broker
        .declare_queue(&QueueSpec::new(&name).max_receive_count(2))
        .await
        .unwrap();
    // A broken CloudEvent cannot be decoded into an envelope: the source
    // reports a Decode error and leaves the message to the redrive policy.
    let url = broker.queue_url(&name).await.unwrap();
    broker
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body(r#"{"specversion":"1.0","id":"x"}"#)
        .send()
        .await
        .unwrap();
    let options = quick().visibility_timeout(Duration::from_secs(1));
    let mut source = broker.subscribe_with(&name, options).await.unwrap();
    let mut errors = 0;
    while broker.dlq_depth(&name).await.unwrap().total() == 0 {
        match tokio::time::timeout(Duration::from_secs(3), source.next()).await {
            Ok(Some(Err(e))) => {
                assert_eq!(e.kind(), &ErrorKind::Decode);
                errors += 1;
            }
            Ok(other) => panic!("unexpected {:?}", other.map(|r| r.map(|d| d.attempt()))),
            Err(_) => {}
        }
        assert!(errors <= 5, "not redriven after {errors} receives");
    }
    assert!(errors >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_get_a_synthesized_envelope() {
    let broker = broker_or_skip!("foreign_messages_get_a_synthesized_envelope");
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
    let options = quick().foreign_type("legacy.event");
    let mut source = broker.subscribe_with(&q, options).await.unwrap();
    let d = next(&mut source).await;
    assert_eq!(d.envelope().id.as_str(), out.message_id.unwrap());
    assert_eq!(d.envelope().event_type, "legacy.event");
    assert_eq!(&d.envelope().payload[..], br#"{"legacy":true}"#);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn depth_ops_and_health() {
    let broker = broker_or_skip!("depth_ops_and_health");
    broker.health().await.unwrap();
    let q = queue(&broker, "depth").await;
    assert!(broker
        .publish_batch(&q, (0..3).map(|_| Envelope::new("t", "{}")).collect())
        .await
        .is_success());
    let d = broker.depth(&q).await.unwrap();
    assert_eq!(d.visible, 3, "{d:?}");
    assert_eq!(broker.dlq_depth(&q).await.unwrap().total(), 0);
    // Debug never shows the clients (and so no credentials).
    let shown = format!("{broker:?}");
    assert!(
        !shown.contains("test") && shown.contains("SqsBroker"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_fifo_topic_fans_out_in_group_order() {
    let broker = broker_or_skip!("sns_fifo_topic_fans_out_in_group_order");
    let topic = format!("{}.fifo", common::unique("fifotopic"));
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
        let mut source = broker
            .subscribe_with(q, quick().receivers(1))
            .await
            .unwrap();
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
