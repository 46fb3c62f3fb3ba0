//! Kafka-specific behaviour: offsets under concurrency, restarts, retry
//! topics, dead letters, foreign records, limits, closing (against tansu), a
//! broker process cut off mid-stream (a tansu of the test's own behind a
//! proxy), failures injected on librdkafka's mock cluster (broker down,
//! request errors, rebalance and outage mid-stream), and the broker handle
//! (capabilities, backlog, health, close, connect errors).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postbox_core::dlq::DeadLetterMetadata;
use postbox_core::{
    Broker, Consumer, DeadLetterOps, DeadLetterRouter, Delivery, Envelope, ErrorKind,
    FailureReason, Limit, Publisher, Retry, Source, SubscribeOptions,
};
use postbox_kafka::rdkafka::message::{Header, OwnedHeaders};
use postbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use postbox_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use postbox_kafka::{KafkaBroker, KafkaConfig, KafkaDelivery, KafkaSource};
use postbox_testkit::{Behaviour, HandlerSpy};
use support::{close_on_tansu, tansu_or_skip, test_config, OwnTansu, TestKafka};

const WAIT: Duration = Duration::from_secs(30);

fn topic(test: &str) -> String {
    postbox_testkit::env::unique(test)
}

fn order(seq: usize, key: &str) -> Envelope {
    Envelope::builder("test.order")
        .source("kafka-tests")
        .key(key)
        .header("seq", seq.to_string())
        .payload(format!(r#"{{"seq":{seq}}}"#))
        .build()
}

async fn next(source: &mut KafkaSource) -> KafkaDelivery {
    tokio::time::timeout(WAIT, source.next())
        .await
        .expect("a delivery within the time-out")
        .expect("source open")
        .expect("no receive error")
}

async fn publish(h: &TestKafka, topic: &str, envs: &[Envelope]) {
    let report = h.broker.publish_batch(topic, envs.to_vec()).await;
    assert!(report.is_success(), "{report:?}");
}

/// Acks out of order: the committed offset stops at the first unfinished one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_commit_stops_at_the_first_unfinished_offset() {
    let Some(h) = tansu_or_skip("watermark_commit_stops_at_the_first_unfinished_offset", 1).await
    else {
        return;
    };
    let t = topic("watermark");
    h.create(&t).await.unwrap();
    publish(&h, &t, &[order(0, "k"), order(1, "k"), order(2, "k")]).await;
    let mut source = h.source(&t, "g").await.unwrap();
    let (d0, d1, d2) = (
        next(&mut source).await,
        next(&mut source).await,
        next(&mut source).await,
    );
    assert_eq!((d0.offset(), d1.offset(), d2.offset()), (0, 1, 2));
    // Workers finish 2 and 1 first: nothing can be committed past 0.
    d2.ack().await.unwrap();
    d1.ack().await.unwrap();
    source.commit_now().unwrap();
    assert_eq!(h.committed(&t, "g").await, vec![Some(0)]);
    d0.ack().await.unwrap();
    source.commit_now().unwrap();
    assert_eq!(h.committed(&t, "g").await, vec![Some(3)]);
    let backlog = h
        .broker
        .backlog(&t, Some(&TestKafka::group_id(&t, "g")))
        .await
        .unwrap();
    assert_eq!(backlog.waiting, 0, "{backlog:?}");
    assert_eq!(backlog.partitions[0].lag, 0, "{backlog:?}");
    close_on_tansu(source).await.unwrap();
}

/// A consumer that dies mid-batch (some deliveries never settled, the source
/// dropped without `close`: the safety net) and a new one: nothing is lost,
/// and what was acked below the watermark is not delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_loss_or_duplicates_of_acked_messages() {
    let Some(h) = tansu_or_skip(
        "restart_resumes_without_loss_or_duplicates_of_acked_messages",
        1,
    )
    .await
    else {
        return;
    };
    let t = topic("restart");
    h.create(&t).await.unwrap();
    let envs: Vec<Envelope> = (0..20).map(|i| order(i, "k")).collect();
    publish(&h, &t, &envs).await;
    let mut first = h.source(&t, "g").await.unwrap();
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(next(&mut first).await);
    }
    // Acked out of order: 0..=5 and 7; 6, 8, 9 are in flight when it dies.
    let mut unfinished = Vec::new();
    for d in held.into_iter().rev() {
        if [6, 8, 9].contains(&d.offset()) {
            unfinished.push(d);
        } else {
            d.ack().await.unwrap();
        }
    }
    // The crash: the in-flight deliveries are never settled, the source is
    // not closed (its Drop still commits the watermark and leaves).
    unfinished.into_iter().for_each(std::mem::forget);
    drop(first);
    let mut second = h.source(&t, "g").await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < 14 {
        let d = next(&mut second).await;
        seen.insert(d.offset());
        d.ack().await.unwrap();
    }
    assert_eq!(seen, (6..20).collect::<BTreeSet<i64>>());
    // Nothing else comes (0..=5 were committed).
    let more = tokio::time::timeout(Duration::from_millis(1500), second.next()).await;
    assert!(more.is_err(), "an acked message was delivered again");
    close_on_tansu(second).await.unwrap();
}

/// A retry copy that is not due pauses its retry partition; the origin topic
/// keeps flowing; the copy comes back when due, attempt 2, origin = the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_topic_pauses_its_partition_until_due_while_others_flow() {
    let Some(h) = tansu_or_skip(
        "retry_topic_pauses_its_partition_until_due_while_others_flow",
        2,
    )
    .await
    else {
        return;
    };
    let t = topic("retrytier");
    h.create(&t).await.unwrap();
    let x = order(0, "x");
    publish(&h, &t, std::slice::from_ref(&x)).await;
    let mut source = h.source(&t, "g").await.unwrap();
    let d = next(&mut source).await;
    assert_eq!(d.envelope().id, x.id);
    let delay = Duration::from_secs(3);
    let retried_at = Instant::now();
    d.retry(Retry {
        delay,
        next_attempt: 2,
        first_failed_at: SystemTime::now(),
        reason: "handler-error",
    })
    .await
    .unwrap();
    // Others flow while the copy waits.
    let others: Vec<Envelope> = (1..6).map(|i| order(i, &format!("k{i}"))).collect();
    publish(&h, &t, &others).await;
    let mut got = BTreeSet::new();
    while got.len() < others.len() {
        let d = next(&mut source).await;
        assert_ne!(d.envelope().id, x.id, "the retry came back early");
        got.insert(d.envelope().id.to_string());
        d.ack().await.unwrap();
    }
    assert!(
        retried_at.elapsed() < delay,
        "the others waited for the retry"
    );
    let again = next(&mut source).await;
    assert_eq!(again.envelope().id, x.id);
    assert!(
        retried_at.elapsed() >= delay,
        "due too early: {:?}",
        retried_at.elapsed()
    );
    assert_eq!(again.attempt(), 2);
    assert_eq!(again.topic(), format!("{t}.retry.10s"));
    let origin = again.origin();
    assert_eq!(origin.destination, t);
    assert_eq!(
        origin.offset,
        Some(0),
        "the first consumed position is kept"
    );
    assert_eq!(
        again.envelope().headers[postbox_core::delivery::LAST_REASON],
        "handler-error"
    );
    again.ack().await.unwrap();
    close_on_tansu(source).await.unwrap();
}

/// A dead letter keeps the partition key (record key) and carries the
/// bounded metadata, origin partition and offset included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_the_key_and_carry_the_metadata() {
    let Some(h) = tansu_or_skip("dead_letters_keep_the_key_and_carry_the_metadata", 2).await else {
        return;
    };
    let t = topic("dlqmeta");
    h.create(&t).await.unwrap();
    let sent = order(0, "customer-7");
    publish(&h, &t, std::slice::from_ref(&sent)).await;
    let spy = HandlerSpy::new().script(|_, _| Behaviour::FailPermanent);
    let source = h.source(&t, "g").await.unwrap();
    let running = Consumer::builder(source, spy.clone())
        .name("billing")
        .dead_letter(DeadLetterRouter::new(h.broker.clone()))
        .build()
        .unwrap()
        .spawn();
    let dlq = format!("{t}.dlq");
    let deadline = Instant::now() + WAIT;
    while h.broker.count(&dlq).await.unwrap() < 1 {
        assert!(Instant::now() < deadline, "nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();
    let dead = h.broker.peek(&dlq, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let env = &dead[0];
    assert_eq!(env.id, sent.id);
    assert_eq!(env.key.as_deref(), Some("customer-7"), "record key lost");
    let m = DeadLetterMetadata::read(env).expect("metadata");
    assert_eq!(m.reason, FailureReason::HandlerError);
    assert_eq!(m.origin.destination, t);
    assert!(m.origin.partition.is_some());
    assert_eq!(m.origin.offset, Some(0));
    assert_eq!(m.consumer, "billing");
    assert_eq!(m.attempts, 1);
    // Peek did not consume.
    assert_eq!(h.broker.count(&dlq).await.unwrap(), 1);
}

/// Produces a record as a non-postbox producer would; returns its partition
/// and offset.
async fn produce_raw(
    h: &TestKafka,
    topic: &str,
    key: &str,
    payload: &str,
    headers: &[(&str, &str)],
) -> (i32, i64) {
    let producer: FutureProducer = h.broker.config().client_config().create().unwrap();
    let headers = headers
        .iter()
        .fold(OwnedHeaders::new(), |hs, (key, value)| {
            hs.insert(Header {
                key,
                value: Some(*value),
            })
        });
    let delivered = producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers),
            WAIT,
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    (delivered.partition, delivered.offset)
}

/// Records without `ce_` headers are consumed with a synthesized envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_records_are_consumed_with_a_synthesized_envelope() {
    let Some(h) = tansu_or_skip(
        "foreign_records_are_consumed_with_a_synthesized_envelope",
        1,
    )
    .await
    else {
        return;
    };
    let t = topic("foreign");
    h.create(&t).await.unwrap();
    let (partition, offset) = produce_raw(
        &h,
        &t,
        "legacy-key",
        r#"{"legacy":true}"#,
        &[("x-trace", "abc")],
    )
    .await;
    let mut source = h.source(&t, "g").await.unwrap();
    let d = next(&mut source).await;
    let env = d.envelope();
    assert_eq!(env.id.as_str(), format!("{t}/{partition}/{offset}"));
    assert_eq!(env.event_type, "postbox.foreign");
    assert_eq!(env.source, t.as_str());
    assert_eq!(env.key.as_deref(), Some("legacy-key"));
    assert_eq!(env.headers["x-trace"], "abc");
    assert_eq!(&env.payload[..], br#"{"legacy":true}"#);
    assert_eq!(env.attempt, 1);
    d.ack().await.unwrap();
    close_on_tansu(source).await.unwrap();
}

/// A record whose `ce_` headers break the format (here: no `ce_type`) never
/// reaches the handler: the runtime dead-letters it with reason `decode`,
/// with the record's value and its other headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_dead_lettered_without_the_handler() {
    let Some(h) = tansu_or_skip(
        "undecodable_records_are_dead_lettered_without_the_handler",
        1,
    )
    .await
    else {
        return;
    };
    let t = topic("undecodable");
    h.create(&t).await.unwrap();
    produce_raw(
        &h,
        &t,
        "k",
        r#"{"broken":true}"#,
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "broken-1"),
            ("ce_source", "legacy"),
            ("x-trace", "abc"),
        ],
    )
    .await;
    let good = order(1, "k");
    publish(&h, &t, std::slice::from_ref(&good)).await;
    let spy = HandlerSpy::new();
    let source = h.source(&t, "g").await.unwrap();
    let running = Consumer::builder(source, spy.clone())
        .name("billing")
        .dead_letter(DeadLetterRouter::new(h.broker.clone()))
        .build()
        .unwrap()
        .spawn();
    let dlq = format!("{t}.dlq");
    let deadline = Instant::now() + WAIT;
    while h.broker.count(&dlq).await.unwrap() < 1 || spy.calls().is_empty() {
        assert!(
            Instant::now() < deadline,
            "nothing dead-lettered or handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let handled: Vec<String> = spy
        .calls()
        .iter()
        .map(|c| c.envelope.id.to_string())
        .collect();
    assert_eq!(
        handled,
        vec![good.id.to_string()],
        "only the good record was handled"
    );
    let dead = h.broker.peek(&dlq, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let m = DeadLetterMetadata::read(&dead[0]).expect("metadata");
    assert_eq!(m.reason, FailureReason::Decode);
    assert_eq!(m.error_type, "decode");
    assert!(m.error.contains("type"), "{}", m.error);
    assert_eq!(m.consumer, "billing");
    assert_eq!(dead[0].event_type, postbox_kafka::UNDECODABLE_TYPE);
    assert_eq!(&dead[0].payload[..], br#"{"broken":true}"#);
    // Every header as it arrived, the broken `ce_` ones included (under
    // `kafka:header:`: the binding reserves `ce_` for attributes).
    assert_eq!(dead[0].headers["x-trace"], "abc");
    assert_eq!(dead[0].headers["kafka:header:ce_id"], "broken-1");
    assert_eq!(dead[0].headers["kafka:header:ce_source"], "legacy");
    assert_eq!(dead[0].key.as_deref(), Some("k"));
    assert!(
        !dead[0].headers.contains_key(postbox_kafka::DECODE_ERROR),
        "the carrier header does not travel"
    );
    // A replay puts the original record back: read raw, the copy at the end
    // of the topic has the first record's key, value and headers.
    let report = h
        .broker
        .replay(&dlq, &|_: &Envelope| true, 10)
        .await
        .unwrap();
    assert_eq!(report.replayed, 1, "{report:?}");
    assert_eq!(h.broker.count(&dlq).await.unwrap(), 0);
    let records = h.broker.peek(&t, 10).await.unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    let (first, replayed) = (&records[0], &records[2]);
    assert_eq!(replayed.event_type, postbox_kafka::UNDECODABLE_TYPE);
    assert_eq!(replayed.payload, first.payload);
    assert_eq!(replayed.key, first.key);
    assert_eq!(replayed.headers, first.headers);
}

/// Records larger than `message.max.bytes` fail before sending, typed, with
/// the envelope handed back; in a batch only that one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_fail_before_sending_with_a_typed_error() {
    let Some(h) = tansu_or_skip(
        "oversized_records_fail_before_sending_with_a_typed_error",
        1,
    )
    .await
    else {
        return;
    };
    let t = topic("size");
    h.create(&t).await.unwrap();
    let config = h.broker.config().clone().set("message.max.bytes", "10000");
    let publisher = KafkaBroker::connect(config).await.unwrap();
    assert_eq!(publisher.capabilities().max_message_bytes, Some(10_000));
    let big = Envelope::builder("big").payload(vec![1u8; 20_000]).build();
    let id = big.id.clone();
    let e = publisher.publish(&t, big).await.unwrap_err();
    match e.error.kind() {
        ErrorKind::LimitExceeded(Limit::BodySize { max, actual }) => {
            assert_eq!(*max, 10_000);
            assert!(*actual > 20_000);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(e.envelope.id, id);
    let mut batch: Vec<Envelope> = (0..5).map(|i| order(i, "k")).collect();
    batch[2] = Envelope::builder("big").payload(vec![1u8; 20_000]).build();
    let report = publisher.publish_batch(&t, batch).await;
    let failed: Vec<usize> = report.failures().map(|(i, _)| i).collect();
    assert_eq!(failed, vec![2]);
    assert_eq!(report.succeeded(), 4);
}

/// The health check and the backlog (lag per partition) see the broker; an
/// unreachable cluster is a retryable error at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_lag() {
    let Some(h) = tansu_or_skip("health_and_lag", 2).await else {
        return;
    };
    let health = h.broker.health().await.unwrap();
    assert_eq!(health.system, "kafka");
    assert!(health.detail.contains("brokers"), "{health:?}");
    let t = topic("lag");
    h.create(&t).await.unwrap();
    let envs: Vec<Envelope> = (0..6).map(|i| order(i, &format!("k{i}"))).collect();
    publish(&h, &t, &envs).await;
    let backlog = h.broker.backlog(&t, Some("nobody")).await.unwrap();
    assert_eq!(backlog.partitions.len(), 2);
    assert_eq!(backlog.waiting, 6, "{backlog:?}");
    assert!(backlog.partitions.iter().all(|p| p.committed.is_none()));
    let down = KafkaConfig::new("127.0.0.1:1").request_timeout(Duration::from_secs(2));
    let e = KafkaBroker::connect(down).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
}

/// Closing a source commits what was processed (confirmed by the broker)
/// and leaves the group: the next member starts after it, nothing is
/// redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_close_commits_and_leaves_the_group() {
    let Some(h) = tansu_or_skip("source_close_commits_and_leaves_the_group", 1).await else {
        return;
    };
    let t = topic("close");
    h.create(&t).await.unwrap();
    publish(&h, &t, &(0..5).map(|i| order(i, "k")).collect::<Vec<_>>()).await;
    let mut source = h.source(&t, "g").await.unwrap();
    assert_eq!(source.rebalances(), 0, "assigned before polling");
    for _ in 0..5 {
        next(&mut source).await.ack().await.unwrap();
    }
    assert!(source.is_assigned());
    assert!(source.rebalances() >= 1);
    // No commit_now, and auto-commit has had no time: close commits.
    source.close().await.unwrap();
    assert_eq!(h.committed(&t, "g").await, vec![Some(5)]);
    let after = order(5, "k");
    publish(&h, &t, std::slice::from_ref(&after)).await;
    let mut next_member = h.source(&t, "g").await.unwrap();
    let d = next(&mut next_member).await;
    assert_eq!(d.envelope().id, after.id, "an acked message came again");
    d.ack().await.unwrap();
    close_on_tansu(next_member).await.unwrap();
    assert_eq!(h.committed(&t, "g").await, vec![Some(6)]);
}

// ---- librdkafka's mock cluster: fault injection ----

async fn mock_harness(partitions: i32, extra: &[(&str, &str)]) -> TestKafka {
    support::mock(partitions, |mut c| {
        for (k, v) in extra {
            c = c.set(k, *v);
        }
        c
    })
    .await
}

/// Broker down: the publish fails (retryable) and hands the envelope back;
/// once the broker is back the same envelope publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_hands_the_envelope_back() {
    let h = mock_harness(1, &[("message.timeout.ms", "1500")]).await;
    let mock = h.mock.clone().unwrap();
    let t = topic("down");
    h.create(&t).await.unwrap();
    h.broker.publish(&t, order(0, "k")).await.unwrap();
    mock.broker_down(1);
    let env = order(1, "k");
    let id = env.id.clone();
    let e = h.broker.publish(&t, env).await.unwrap_err();
    assert!(e.error.is_retryable(), "{:?}", e.error);
    assert_eq!(e.envelope.id, id);
    mock.broker_up(1);
    // The caller retries the handed-back envelope until the broker is back.
    let (_, mut env) = e.into_parts();
    let deadline = Instant::now() + WAIT;
    while let Err(e) = h.broker.publish(&t, env).await {
        assert!(e.error.is_retryable() && Instant::now() < deadline, "{e:?}");
        env = e.into_parts().1;
    }
    let mut source = h.source(&t, "g").await.unwrap();
    let ids: BTreeSet<String> = [next(&mut source).await, next(&mut source).await]
        .iter()
        .map(|d| d.envelope().id.to_string())
        .collect();
    assert!(ids.contains(id.as_str()));
}

/// Produce request errors are retried by the idempotent producer: one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_request_errors_are_retried_without_duplicates() {
    let h = mock_harness(1, &[]).await;
    let mock = h.mock.clone().unwrap();
    let t = topic("produce-errors");
    h.create(&t).await.unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 3],
    );
    let env = order(0, "k");
    h.broker.publish(&t, env.clone()).await.unwrap();
    mock.clear(RDKafkaApiKey::Produce);
    let mut source = h.source(&t, "g").await.unwrap();
    let d = next(&mut source).await;
    assert_eq!(d.envelope().id, env.id);
    d.ack().await.unwrap();
    let more = tokio::time::timeout(Duration::from_millis(1500), source.next()).await;
    assert!(more.is_err(), "a produce retry duplicated the record");
}

/// Commit request errors: the commit fails, nothing is lost — the next
/// consumer gets the message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_errors_leave_the_message_for_redelivery() {
    let h = mock_harness(1, &[]).await;
    let mock = h.mock.clone().unwrap();
    let t = topic("commit-errors");
    h.create(&t).await.unwrap();
    let env = order(0, "k");
    publish(&h, &t, std::slice::from_ref(&env)).await;
    let mut source = h.source(&t, "g").await.unwrap();
    let d = next(&mut source).await;
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 50],
    );
    d.ack().await.unwrap();
    assert!(
        source.commit_now().is_err(),
        "the injected commit error was hidden"
    );
    let closed = source.close().await;
    assert!(closed.is_err(), "close hid the refused commit");
    mock.clear(RDKafkaApiKey::OffsetCommit);
    let mut again = h.source(&t, "g").await.unwrap();
    let d = next(&mut again).await;
    assert_eq!(d.envelope().id, env.id, "the uncommitted message was lost");
    d.ack().await.unwrap();
    again.close().await.unwrap();
}

async fn wait_distinct(spy: &HandlerSpy, n: usize, timeout: Duration) {
    spy.wait_for_distinct_successes(n, timeout).await.unwrap();
}

/// A second consumer joins and leaves while 10,000 messages flow: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_mid_stream_loses_nothing() {
    let h = Arc::new(mock_harness(4, &[]).await);
    let t = topic("rebalance");
    h.create(&t).await.unwrap();
    let spy = HandlerSpy::new();
    let router = DeadLetterRouter::new(h.broker.clone());
    let first = Consumer::builder(h.source(&t, "g").await.unwrap(), spy.clone())
        .concurrency(8)
        .dead_letter(router.clone())
        .build()
        .unwrap()
        .spawn();
    let total = 10_000;
    let producer = {
        let (h, t) = (h.clone(), t.clone());
        tokio::spawn(async move {
            for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
                let envs: Vec<Envelope> = chunk
                    .iter()
                    .map(|i| order(*i, &format!("k{}", i % 64)))
                    .collect();
                publish(&h, &t, &envs).await;
            }
        })
    };
    wait_distinct(&spy, 2_000, Duration::from_secs(60)).await;
    let second = Consumer::builder(h.source(&t, "g").await.unwrap(), spy.clone())
        .concurrency(8)
        .dead_letter(router)
        .build()
        .unwrap()
        .spawn();
    wait_distinct(&spy, 6_000, Duration::from_secs(60)).await;
    second.shutdown().await.unwrap();
    producer.await.unwrap();
    wait_distinct(&spy, total, Duration::from_secs(90)).await;
    first.shutdown().await.unwrap();
    let seen: BTreeSet<String> = spy
        .successes()
        .iter()
        .map(|c| c.envelope.headers["seq"].clone())
        .collect();
    assert_eq!(seen.len(), total);
}

/// While 1,000 messages flow (500 published before, 500 during), the broker
/// is out for `lasts` (`down` .. `up`): checks that nothing of the second
/// half got through the outage, then that all 1,000 are handled. Returns the
/// topic (the consumer group is `g`, closed by then).
async fn outage_mid_stream(
    h: &Arc<TestKafka>,
    name: &str,
    lasts: Duration,
    down: impl FnOnce(),
    up: impl FnOnce(),
) -> String {
    let t = topic(name);
    h.create(&t).await.unwrap();
    let spy = HandlerSpy::new();
    let running = Consumer::builder(h.source(&t, "g").await.unwrap(), spy.clone())
        .concurrency(4)
        .dead_letter(DeadLetterRouter::new(h.broker.clone()))
        .build()
        .unwrap()
        .spawn();
    let first: Vec<Envelope> = (0..500).map(|i| order(i, &format!("k{i}"))).collect();
    publish(h, &t, &first).await;
    wait_distinct(&spy, 200, WAIT).await;
    down();
    let producer = {
        let (h, t) = (h.clone(), t.clone());
        tokio::spawn(async move {
            let second: Vec<Envelope> = (500..1000).map(|i| order(i, &format!("k{i}"))).collect();
            publish(&h, &t, &second).await;
        })
    };
    tokio::time::sleep(lasts).await;
    // The outage is real: nothing of the second half got through it.
    assert!(!producer.is_finished(), "published through the outage");
    let seq = |c: &postbox_testkit::Call| c.envelope.headers["seq"].parse::<usize>().unwrap();
    let through = spy
        .successes()
        .iter()
        .map(seq)
        .filter(|s| *s >= 500)
        .count();
    assert_eq!(through, 0, "consumed through the outage");
    up();
    producer.await.unwrap();
    wait_distinct(&spy, 1000, Duration::from_secs(90)).await;
    running.shutdown().await.unwrap();
    let seen: BTreeSet<usize> = spy.successes().iter().map(seq).collect();
    assert_eq!(seen.len(), 1000);
    t
}

/// The broker goes down and comes back mid-stream: publishers retry,
/// consumers resume, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_mid_stream_loses_nothing() {
    let h = Arc::new(mock_harness(2, &[]).await);
    let mock = h.mock.clone().unwrap();
    let (down, up) = (|| mock.broker_down(1), || mock.broker_up(1));
    outage_mid_stream(&h, "outage", Duration::from_secs(3), down, up).await;
}

/// The broker process is cut off mid-stream — every connection closed, new
/// ones refused — for longer than the session time-out (so the group drops
/// the member), then comes back with its storage: the publisher retries, the
/// consumer rejoins and resumes, nothing is lost, and after the close every
/// offset is committed (lag 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_broker_cut_off_mid_stream_loses_nothing() {
    let Some(tansu) = OwnTansu::start("real_broker_cut_off_mid_stream_loses_nothing").await else {
        return;
    };
    let broker = KafkaBroker::connect(test_config(&tansu.bootstrap(), true, 2))
        .await
        .unwrap();
    let h = Arc::new(TestKafka {
        broker,
        mock: None,
        partitions: 2,
    });
    let (cut, restore) = (|| tansu.proxy.cut(), || tansu.proxy.restore());
    // Longer than session.timeout.ms (6 s): the coordinator expires the member.
    let t = outage_mid_stream(&h, "cut-off", Duration::from_secs(8), cut, restore).await;
    let backlog = h
        .broker
        .backlog(&t, Some(&TestKafka::group_id(&t, "g")))
        .await
        .unwrap();
    assert_eq!(backlog.waiting, 0, "{backlog:?}");
    assert!(backlog.partitions.iter().all(|p| p.lag == 0), "{backlog:?}");
}

/// A consumer joins while a message is in flight on the partition it takes:
/// the revoke waits for the handler (within the bound), commits, then lets
/// go — the message is not processed twice. (On tansu: librdkafka's mock
/// cluster refuses every commit while a group is joining, stricter than
/// Kafka, which accepts the current generation's commits then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_waits_for_in_flight_work_then_commits() {
    let Some(h) = tansu_or_skip("revoke_waits_for_in_flight_work_then_commits", 1).await else {
        return;
    };
    let t = topic("revoke");
    h.create(&t).await.unwrap();
    publish(&h, &t, &[order(0, "k")]).await;
    let mut first = h.source(&t, "g").await.unwrap();
    let d = next(&mut first).await;
    // The handler finishes 1 s later, while the rebalance is under way.
    let handler = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        d.ack().await.unwrap();
    });
    // The first consumer keeps polling (that is where the revoke runs).
    let polling = tokio::spawn(async move {
        let got = tokio::time::timeout(Duration::from_secs(10), first.next()).await;
        (first, got.ok().flatten().map(|r| r.map(|d| d.offset())))
    });
    let mut second = h.source(&t, "g").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(8), second.next()).await;
    handler.await.unwrap();
    let (first, first_got) = polling.await.unwrap();
    assert!(
        got.is_err(),
        "the second consumer got the in-flight message again"
    );
    assert!(
        first_got.is_none(),
        "the first consumer got it again: {first_got:?}"
    );
    close_on_tansu(first).await.unwrap();
    close_on_tansu(second).await.unwrap();
    assert_eq!(h.committed(&t, "g").await, vec![Some(1)]);
}

/// Work that outlives the revoke bound is abandoned uncommitted: the
/// partition's next owner processes it again (nothing lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_abandons_work_past_the_bound_without_losing_it() {
    let h = support::mock(1, |c| c.revoke_timeout(Duration::from_millis(500))).await;
    let t = topic("abandon");
    h.create(&t).await.unwrap();
    let env = order(0, "k");
    publish(&h, &t, std::slice::from_ref(&env)).await;
    let mut first = h.source(&t, "g").await.unwrap();
    let d = next(&mut first).await;
    // The first consumer keeps polling, then closes (still holding `d`;
    // its close may see its commit refused while the mock's group joins).
    let polling = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(4), first.next()).await;
        let _closed = first.close().await;
    });
    let mut second = h.source(&t, "g").await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(20), second.next())
        .await
        .expect("the abandoned message is redelivered")
        .unwrap()
        .unwrap();
    assert_eq!(again.envelope().id, env.id);
    // The late ack of the revoked delivery commits nothing.
    d.ack().await.unwrap();
    again.ack().await.unwrap();
    polling.await.unwrap();
    second.close().await.unwrap();
}

/// The broker handle through the `Broker` trait: what it declares, the
/// backlog of a group, typed refusals (no group, no topic, scheduled
/// publishing), health, a redacted `Debug`, and close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_handle_declares_reports_refuses_and_closes() {
    let h = mock_harness(2, &[("sasl.password", "hunter2")]).await;
    assert!(!format!("{:?}", h.broker).contains("hunter2"));
    let broker: &dyn Broker = &h.broker;
    assert_eq!(broker.system(), "kafka");
    let caps = broker.capabilities();
    assert!(caps.group_fan_out && caps.ordered && caps.redelivery_on_close && caps.backlog);
    assert_eq!(caps.scheduled_publish, None);
    assert_eq!(caps.max_message_bytes, Some(1_000_000));
    let health = broker.health().await.unwrap();
    assert_eq!(health.system, "kafka");
    assert!(health.detail.contains("1 brokers"), "{health:?}");

    let t = topic("handle");
    h.create(&t).await.unwrap();
    // Every topic exists (created on the mock): provisioning asks for none.
    broker
        .provision(&t, &SubscribeOptions::group("g"))
        .await
        .unwrap();
    let envs: Vec<Envelope> = (0..3).map(|i| order(i, &format!("k{i}"))).collect();
    publish(&h, &t, &envs).await;
    let backlog = broker.backlog(&t, Some("nobody")).await.unwrap();
    assert_eq!(backlog.waiting, 3, "{backlog:?}");
    assert_eq!(backlog.partitions.len(), 2);
    let e = broker.backlog(&t, None).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
    let e = broker
        .backlog(&topic("missing"), Some("g"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
    let Err(e) = broker.subscribe(&t, SubscribeOptions::new()).await else {
        panic!("subscribed without a group");
    };
    assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
    assert!(e.message().contains("consumer group"), "{e}");
    let delayed = order(9, "k");
    let e = broker
        .publish_delayed(&t, delayed.clone(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Unsupported, "{}", e.error);
    assert_eq!(e.envelope.id, delayed.id, "the envelope is handed back");

    let group = TestKafka::group_id(&t, "g");
    let mut source = broker
        .subscribe(&t, SubscribeOptions::group(&*group))
        .await
        .unwrap();
    let mut got = BTreeSet::new();
    while got.len() < envs.len() {
        let d = tokio::time::timeout(WAIT, source.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        got.insert(d.envelope().id.to_string());
        d.ack().await.unwrap();
    }
    source.close().await.unwrap();
    assert_eq!(broker.backlog(&t, Some(&group)).await.unwrap().waiting, 0);

    broker.close().await.unwrap();
    let after = order(10, "k");
    let e = broker.publish(&t, after.clone()).await.unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Closed, "{}", e.error);
    assert_eq!(e.envelope.id, after.id);
    let e = broker.health().await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Closed, "{e}");
    let Err(e) = broker.subscribe(&t, SubscribeOptions::group("late")).await else {
        panic!("subscribed after close");
    };
    assert_eq!(e.kind(), &ErrorKind::Closed, "{e}");
}

/// An unknown librdkafka property in the URL is refused when the clients
/// are created: a typed configuration error naming it.
#[tokio::test]
async fn unknown_properties_fail_connect_with_a_config_error() {
    let config = KafkaConfig::from_url("kafka://127.0.0.1:1?no.such.property=1").unwrap();
    let e = KafkaBroker::connect(config).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
    assert!(e.message().contains("no.such.property"), "{e}");
}

const KILL_CHILD_TOPIC: &str = "POSTBOX_KAFKA_KILL_CHILD_TOPIC";

/// The child half of `consumer_process_killed_mid_batch_loses_nothing`: a
/// consumer that prints what it finished and aborts mid-batch (no close, no
/// final commit; only auto-commits of stored offsets happened).
async fn killed_child(topic: String) -> ! {
    use std::io::Write as _;
    let config = test_config(&support::bootstrap(), true, 2).set("auto.commit.interval.ms", "100");
    let h = TestKafka {
        broker: KafkaBroker::connect(config).await.unwrap(),
        mock: None,
        partitions: 2,
    };
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = done.clone();
    let handler = postbox_core::handler_fn(move |env: Envelope| {
        let counter = counter.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "done {}", env.headers["seq"]);
            let _ = out.flush();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    });
    let _running = Consumer::builder(h.source(&topic, "g").await.unwrap(), handler)
        .concurrency(4)
        .dead_letter(DeadLetterRouter::new(h.broker.clone()))
        .build()
        .unwrap()
        .spawn();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 150 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    std::process::abort();
}

/// A consumer process killed mid-batch (SIGABRT: no close, no final commit),
/// then a new consumer: nothing is lost, and it resumes from the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_process_killed_mid_batch_loses_nothing() {
    if let Ok(topic) = std::env::var(KILL_CHILD_TOPIC) {
        killed_child(topic).await;
    }
    let Some(h) = tansu_or_skip("consumer_process_killed_mid_batch_loses_nothing", 2).await else {
        return;
    };
    let t = topic("killed");
    h.create(&t).await.unwrap();
    let total = 300;
    let envs: Vec<Envelope> = (0..total).map(|i| order(i, &format!("k{i}"))).collect();
    publish(&h, &t, &envs).await;
    let exe = std::env::current_exe().unwrap();
    let child = tokio::task::spawn_blocking({
        let t = t.clone();
        move || {
            std::process::Command::new(exe)
                .args([
                    "--exact",
                    "consumer_process_killed_mid_batch_loses_nothing",
                    "--nocapture",
                ])
                .env(KILL_CHILD_TOPIC, &t)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .output()
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("the child consumer ended")
        .unwrap()
        .unwrap();
    assert!(!out.status.success(), "the child was not killed");
    let by_child: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("done ").map(str::to_string))
        .collect();
    assert!(by_child.len() >= 150, "the child did {}", by_child.len());
    let spy = HandlerSpy::new();
    let running = Consumer::builder(h.source(&t, "g").await.unwrap(), spy.clone())
        .concurrency(4)
        .dead_letter(DeadLetterRouter::new(h.broker.clone()))
        .build()
        .unwrap()
        .spawn();
    spy.wait_until("the rest", Duration::from_secs(60), |calls| {
        let mut all = by_child.clone();
        all.extend(
            calls
                .iter()
                .filter(|c| c.finished.is_some())
                .map(|c| c.envelope.headers["seq"].clone()),
        );
        all.len() >= total
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.shutdown().await.unwrap();
    let again = spy.successes().len();
    assert!(
        again < total,
        "the new consumer started from scratch ({again} of {total}): nothing was committed"
    );
}
