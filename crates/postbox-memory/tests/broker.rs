//! Behaviour specific to the in-memory broker: limit profiles, FIFO rules,
//! visibility timeouts, delays, routing errors.

use std::time::Duration;

use postbox_core::{Broker, Delivery, Envelope, ErrorKind, Limit, Publisher, Retry, Source};
use postbox_memory::{Limits, MemoryBroker, MemorySource, QueueOptions};

async fn next(source: &mut MemorySource) -> postbox_memory::MemoryDelivery {
    tokio::time::timeout(Duration::from_secs(120), source.next())
        .await
        .expect("a delivery in time")
        .expect("source open")
        .expect("no receive error")
}

fn retry(delay: Duration, next_attempt: u32) -> Retry {
    Retry {
        delay,
        next_attempt,
        first_failed_at: std::time::SystemTime::now(),
        reason: "handler-error",
    }
}

#[tokio::test]
async fn sqs_profile_rejects_eleven_attributes_and_hands_the_message_back() {
    let broker = MemoryBroker::with_limits(Limits::sqs());
    let mut env = Envelope::new("t", "{}");
    for i in 0..9 {
        env.headers.insert(format!("h{i}"), "v".into());
    }
    broker
        .publish("q", env.clone())
        .await
        .expect("type + 9 headers = 10 attributes fit");
    env.headers.insert("h9".into(), "v".into());
    let err = broker.publish("q", env.clone()).await.unwrap_err();
    assert_eq!(
        err.error.kind(),
        &ErrorKind::LimitExceeded(Limit::AttributeCount {
            max: 10,
            actual: 11
        })
    );
    assert_eq!(err.envelope.id, env.id);
    // Dead-letter and retry metadata travel in the body and do not count.
    let mut dead = Envelope::new("t", "{}");
    for name in postbox_core::dlq::NAMES
        .iter()
        .chain(&postbox_core::delivery::RETRY_NAMES)
    {
        dead.headers.insert(name.to_string(), "v".into());
    }
    broker
        .publish("q", dead)
        .await
        .expect("dlq metadata is not an attribute");
}

#[tokio::test]
async fn sqs_profile_limits_the_encoded_body_to_one_mebibyte() {
    let broker = MemoryBroker::with_limits(Limits::sqs());
    let fits = Envelope::builder("t")
        .content_type("text/plain")
        .payload("x".repeat(1024 * 1024 - 600))
        .build();
    broker
        .publish("q", fits)
        .await
        .expect("fits with its envelope");
    let too_big = Envelope::builder("t")
        .content_type("text/plain")
        .payload("x".repeat(1024 * 1024 - 100))
        .build();
    let err = broker.publish("q", too_big).await.unwrap_err();
    match err.error.kind() {
        ErrorKind::LimitExceeded(Limit::BodySize { max, actual }) => {
            assert_eq!(*max, 1024 * 1024);
            assert!(*actual > *max);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn sqs_profile_limits_delay_and_visibility() {
    let broker = MemoryBroker::with_limits(Limits::sqs());
    let err = broker
        .publish_delayed("q", Envelope::new("t", "{}"), Duration::from_secs(16 * 60))
        .await
        .unwrap_err();
    assert!(matches!(
        err.error.kind(),
        ErrorKind::LimitExceeded(Limit::Delay { .. })
    ));
    broker.publish("q", Envelope::new("t", "{}")).await.unwrap();
    let mut source = broker.subscribe("q");
    let d = next(&mut source).await;
    let back = d
        .retry(retry(Duration::from_secs(13 * 3600), 2))
        .await
        .unwrap_err();
    assert!(matches!(
        back.error.kind(),
        ErrorKind::LimitExceeded(Limit::Visibility { .. })
    ));
    // The delivery came back unsettled and can still be acked.
    back.delivery.ack().await.unwrap();
}

#[tokio::test]
async fn fifo_queue_needs_a_group_and_refuses_per_message_delays() {
    let broker = MemoryBroker::with_limits(Limits::sqs());
    let err = broker
        .publish("orders.fifo", Envelope::new("t", "{}"))
        .await
        .unwrap_err();
    assert_eq!(
        err.error.kind(),
        &ErrorKind::LimitExceeded(Limit::FifoGroupRequired)
    );
    let keyed = Envelope::builder("t").key("g").build();
    let err = broker
        .publish_delayed("orders.fifo", keyed, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        err.error.kind(),
        &ErrorKind::LimitExceeded(Limit::FifoDelayUnsupported)
    );
}

#[tokio::test]
async fn fifo_group_delivers_one_at_a_time_and_deduplicates() {
    let broker = MemoryBroker::new();
    broker.declare_queue_with("q", QueueOptions::default().fifo());
    let a1 = Envelope::builder("t").key("a").payload("a1").build();
    broker.publish("q", a1.clone()).await.unwrap();
    broker.publish("q", a1.clone()).await.unwrap(); // duplicate id: dropped
    broker
        .publish("q", Envelope::builder("t").key("a").payload("a2").build())
        .await
        .unwrap();
    broker
        .publish("q", Envelope::builder("t").key("b").payload("b1").build())
        .await
        .unwrap();
    assert_eq!(broker.depth("q"), 3);
    let mut source = broker.subscribe("q");
    let first = next(&mut source).await;
    assert_eq!(&first.envelope().payload[..], b"a1");
    // Group a is busy: the next deliverable message is b1, not a2.
    let second = next(&mut source).await;
    assert_eq!(&second.envelope().payload[..], b"b1");
    assert!(source.try_next().is_none(), "a2 must wait for a1");
    first.ack().await.unwrap();
    let third = next(&mut source).await;
    assert_eq!(&third.envelope().payload[..], b"a2");
}

#[tokio::test(start_paused = true)]
async fn visibility_timeout_redelivers_and_expires_the_receipt() {
    let broker = MemoryBroker::new();
    broker.declare_queue_with(
        "q",
        QueueOptions::default().visibility_timeout(Duration::from_secs(30)),
    );
    broker.publish("q", Envelope::new("t", "{}")).await.unwrap();
    let mut source = broker.subscribe("q");
    let stale = next(&mut source).await;
    assert_eq!(stale.attempt(), 1);
    // A consumer that hangs: after the timeout another one gets the message.
    let again = next(&mut source).await;
    assert_eq!(again.attempt(), 2);
    let err = stale.ack().await.unwrap_err();
    assert_eq!(err.error.kind(), &ErrorKind::Settle);
    again.ack().await.unwrap();
    assert_eq!(broker.depth("q") + broker.unacked("q") as usize, 0);
}

#[tokio::test(start_paused = true)]
async fn dropped_delivery_returns_at_once_without_a_visibility_timeout() {
    let broker = MemoryBroker::new();
    broker.publish("q", Envelope::new("t", "{}")).await.unwrap();
    let mut source = broker.subscribe("q");
    drop(next(&mut source).await);
    let again = next(&mut source).await;
    assert_eq!(again.attempt(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_is_held_by_the_broker_until_due() {
    let broker = MemoryBroker::new();
    broker.publish("q", Envelope::new("t", "{}")).await.unwrap();
    let mut source = broker.subscribe("q");
    let d = next(&mut source).await;
    d.retry(retry(Duration::from_secs(10), 2)).await.unwrap();
    assert_eq!(broker.delayed("q"), 1);
    // A consumer that restarts meanwhile does not lose it (the broker holds it).
    drop(source);
    let mut source = broker.subscribe("q");
    assert!(source.try_next().is_none());
    tokio::time::advance(Duration::from_secs(10)).await;
    let back = next(&mut source).await;
    assert_eq!(back.attempt(), 2);
    assert_eq!(
        back.envelope().headers[postbox_core::delivery::LAST_REASON],
        "handler-error"
    );
}

#[tokio::test(start_paused = true)]
async fn delayed_publish_arrives_after_the_delay() {
    let broker = MemoryBroker::new();
    broker.declare_queue("q");
    broker
        .publish_delayed("q", Envelope::new("t", "{}"), Duration::from_secs(60))
        .await
        .unwrap();
    let mut source = broker.subscribe("q");
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(source.try_next().is_none());
    tokio::time::advance(Duration::from_secs(1)).await;
    next(&mut source).await.ack().await.unwrap();
}

#[tokio::test]
async fn unroutable_publish_is_an_error_without_auto_create() {
    let broker = MemoryBroker::new().without_auto_create();
    let err = broker
        .publish("nowhere", Envelope::new("t", "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.error.kind(), &ErrorKind::Unroutable);
    broker.declare_queue("somewhere");
    broker
        .publish("somewhere", Envelope::new("t", "{}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn topic_fans_out_to_every_bound_queue() {
    let broker = MemoryBroker::new();
    broker.bind("events", "audit");
    broker.bind("events", "billing");
    broker
        .publish("events", Envelope::new("t", "{}"))
        .await
        .unwrap();
    assert_eq!(
        (
            broker.depth("audit"),
            broker.depth("billing"),
            broker.depth("events")
        ),
        (1, 1, 0)
    );
}
