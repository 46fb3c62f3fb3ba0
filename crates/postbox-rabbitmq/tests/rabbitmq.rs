//! RabbitMQ-specific behaviour against the real broker: unroutable publishes,
//! delay tiers, a killed consumer, a broker restart mid-stream, the quorum
//! delivery limit, exchange types, foreign messages, operations.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use postbox_core::{
    handler_fn, Consumer, DeadLetterOps, DeadLetterRouter, Delivery, Envelope, ErrorKind,
    Publisher, Retry, Source,
};
use postbox_rabbitmq::{
    ExchangeKind, HeaderPrefix, QueueSpec, RabbitConfig, RabbitMq, RabbitSource, SubscribeOptions,
    Topology,
};

const WAIT: Duration = Duration::from_secs(30);

/// The restart test takes this for writing; every other test for reading, so
/// no test runs while the broker restarts.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn next(source: &mut RabbitSource) -> postbox_rabbitmq::RabbitDelivery {
    match tokio::time::timeout(WAIT, source.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("receive failed: {e}"),
        Ok(None) => panic!("source closed"),
        Err(_) => panic!("no delivery within {WAIT:?}"),
    }
}

async fn queue(client: &RabbitMq, name: &str) -> RabbitSource {
    client
        .subscribe(
            name,
            SubscribeOptions::new()
                .prefetch(50)
                .declare_queue(QueueSpec::quorum(name)),
        )
        .await
        .expect("subscribe")
}

#[tokio::test]
async fn unroutable_publish_is_a_typed_error() {
    let Some(client) = common::client("unroutable_publish_is_a_typed_error").await else {
        return;
    };
    let _shared = BROKER.read().await;
    // No queue of that name: the default exchange returns it.
    let env = Envelope::new("t", "x");
    let id = env.id.clone();
    let e = client
        .publish(&common::unique("missing-queue"), env)
        .await
        .expect_err("an unroutable publish must fail");
    assert_eq!(e.error.kind(), &ErrorKind::Unroutable, "{:?}", e.error);
    assert_eq!(e.envelope.id, id, "the envelope is handed back");
    // An exchange with no matching binding.
    let e = client
        .publish(
            "exchange:amq.direct/nobody-binds-this",
            Envelope::new("t", "x"),
        )
        .await
        .expect_err("unroutable through an exchange");
    assert_eq!(e.error.kind(), &ErrorKind::Unroutable);
    // A batch reports the unroutable one alone.
    let name = common::unique("batch");
    client
        .declare(&Topology::new().queue(QueueSpec::classic(&name)))
        .await
        .unwrap();
    let report = client
        .publish_batch(
            &name,
            vec![Envelope::new("t", "1"), Envelope::new("t", "2")],
        )
        .await;
    assert!(report.is_success());
    // A missing exchange closes the confirm channel (404): a typed error, and
    // the next publish opens a new channel.
    let e = client
        .publish(
            &format!("exchange:{}/k", common::unique("no-exchange")),
            Envelope::new("t", "x"),
        )
        .await
        .expect_err("publishing to a missing exchange");
    assert_eq!(e.error.kind(), &ErrorKind::NotFound, "{:?}", e.error);
    // The publisher still works after a return and a channel error.
    client
        .publish(&name, Envelope::new("t", "3"))
        .await
        .unwrap();
    assert_eq!(client.queue_depth(&name).await.unwrap().messages, 3);
}

#[tokio::test]
async fn delay_tiers_honour_delays_without_head_of_line_blocking() {
    let Some(client) = common::client("delay_tiers_honour_delays").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = common::unique("delays");
    let mut source = queue(&client, &name).await;
    // One message per delay, all retried at once; each must come back on time
    // whatever the others wait (the long one must not block the short ones).
    let delays_ms = [3_000u64, 0, 30, 250, 700, 1_300];
    for (i, _) in delays_ms.iter().enumerate() {
        client
            .publish(
                &name,
                Envelope::builder("t").header("i", i.to_string()).build(),
            )
            .await
            .unwrap();
    }
    let start = Instant::now();
    for _ in 0..delays_ms.len() {
        let d = next(&mut source).await;
        let i: usize = d.envelope().headers["i"].parse().unwrap();
        let retry = Retry {
            delay: Duration::from_millis(delays_ms[i]),
            next_attempt: 2,
            first_failed_at: SystemTime::now(),
            reason: "handler-error",
        };
        d.retry(retry).await.expect("retry");
    }
    let mut seen = Vec::new();
    for _ in 0..delays_ms.len() {
        let d = next(&mut source).await;
        let at = start.elapsed();
        let i: usize = d.envelope().headers["i"].parse().unwrap();
        assert_eq!(d.attempt(), 2, "attempt of the retry copy");
        assert_eq!(d.envelope().headers.len(), 3, "i + retry headers only");
        seen.push((delays_ms[i], at));
        d.ack().await.unwrap();
    }
    let tolerance = Duration::from_millis(400);
    for (delay, at) in &seen {
        let delay = Duration::from_millis(*delay);
        assert!(
            *at + Duration::from_millis(10) >= delay,
            "delay {delay:?} served after only {at:?}"
        );
        assert!(
            *at <= delay + tolerance,
            "delay {delay:?} served after {at:?} (tolerance {tolerance:?})"
        );
    }
    let order: Vec<u64> = seen.iter().map(|(d, _)| *d).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "retries came back in delay order");
}

/// The child half of `killed_consumer_gets_all_unacked_messages_redelivered`.
async fn child_consumer(queue_name: &str, n: usize) {
    let client = RabbitMq::connect(RabbitConfig::new(common::amqp_url()))
        .await
        .unwrap();
    let mut source = client
        .subscribe(queue_name, SubscribeOptions::new().prefetch(100))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(next(&mut source).await);
    }
    // stderr: libtest leaves it alone.
    eprintln!("HOLDING {}", held.len());
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn killed_consumer_gets_all_unacked_messages_redelivered() {
    if let Ok(q) = std::env::var("POSTBOX_RABBIT_CHILD_QUEUE") {
        return child_consumer(&q, 20).await;
    }
    let Some(client) = common::client("killed_consumer_gets_all_unacked").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = common::unique("killed");
    client
        .declare(&Topology::new().queue(QueueSpec::quorum(&name)))
        .await
        .unwrap();
    let envs: Vec<Envelope> = (0..20)
        .map(|i| Envelope::new("t", format!("{i}")))
        .collect();
    assert!(client.publish_batch(&name, envs.clone()).await.is_success());
    // A separate process takes all 20 without acking, then is SIGKILLed.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_consumer_gets_all_unacked_messages_redelivered",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("POSTBOX_RABBIT_CHILD_QUEUE", &name)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("HOLDING 20"))
    });
    let ready = tokio::time::timeout(WAIT, ready).await;
    assert!(
        matches!(ready, Ok(Ok(true))),
        "the child consumer did not take the messages"
    );
    assert_eq!(client.queue_depth(&name).await.unwrap().messages, 0);
    child.kill().unwrap();
    let _ = child.wait();
    let mut source = queue(&client, &name).await;
    let mut got = BTreeSet::new();
    while got.len() < 20 {
        let d = next(&mut source).await;
        assert_eq!(d.attempt(), 2, "a redelivery counts as an attempt");
        got.insert(d.envelope().id.to_string());
        d.ack().await.unwrap();
    }
    let sent: BTreeSet<String> = envs.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(got, sent);
}

#[tokio::test]
async fn quorum_delivery_limit_dead_letters_a_poison_message() {
    let Some(client) = common::client("quorum_delivery_limit").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = common::unique("limit");
    let mut source = client
        .subscribe(
            &name,
            SubscribeOptions::new().declare_queue(QueueSpec::quorum(&name).delivery_limit(Some(2))),
        )
        .await
        .unwrap();
    let env = Envelope::new("t", "poison");
    client.publish(&name, env.clone()).await.unwrap();
    let mut deliveries = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), source.next()).await {
            Ok(Some(Ok(d))) => {
                deliveries += 1;
                assert!(
                    deliveries <= 3,
                    "delivered {deliveries} times despite the limit"
                );
                d.release().await.unwrap();
            }
            Ok(other) => panic!("unexpected {:?}", other.map(|r| r.map(|_| ()))),
            Err(_) => break,
        }
    }
    assert_eq!(
        deliveries, 3,
        "limit 2 allows the first delivery and 2 redeliveries"
    );
    let dlq = format!("{name}.dlq");
    assert_eq!(client.count(&dlq).await.unwrap(), 1);
    let dead = client.peek(&dlq, 10).await.unwrap();
    assert_eq!(dead[0].id, env.id, "the DLQ copy keeps the id");
}

#[tokio::test]
async fn exchanges_of_every_type_route_to_bound_queues() {
    let Some(client) = common::client("exchanges_of_every_type").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let p = common::unique("x");
    let (topic, direct, fanout, headers) = (
        format!("{p}.topic"),
        format!("{p}.direct"),
        format!("{p}.fanout"),
        format!("{p}.headers"),
    );
    let q = |s: &str| format!("{p}.q.{s}");
    let mut match_eu = std::collections::BTreeMap::new();
    match_eu.insert("cloudEvents:region".to_string(), "eu".to_string());
    let topology = Topology::new()
        .exchange(&topic, ExchangeKind::Topic)
        .exchange(&direct, ExchangeKind::Direct)
        .exchange(&fanout, ExchangeKind::Fanout)
        .exchange(&headers, ExchangeKind::Headers)
        .queue(QueueSpec::classic(q("eu")))
        .queue(QueueSpec::classic(q("all")))
        .queue(QueueSpec::classic(q("direct")))
        .queue(QueueSpec::classic(q("fan1")))
        .queue(QueueSpec::classic(q("fan2")))
        .queue(QueueSpec::classic(q("hdr")))
        .bind(q("eu"), &topic, "order.*.eu")
        .bind(q("all"), &topic, "order.#")
        .bind(q("direct"), &direct, "billing")
        .bind(q("fan1"), &fanout, "")
        .bind(q("fan2"), &fanout, "")
        .bind_headers(q("hdr"), &headers, &match_eu, true);
    client.declare(&topology).await.unwrap();
    client
        .declare(&topology)
        .await
        .expect("declaring twice is a no-op");
    let send = |dest: String, env: Envelope| {
        let client = client.clone();
        async move { client.publish(&dest, env).await.map_err(|e| e.error) }
    };
    send(
        format!("exchange:{topic}/order.placed.eu"),
        Envelope::new("t", "1"),
    )
    .await
    .unwrap();
    send(
        format!("exchange:{topic}/order.placed.us.west"),
        Envelope::new("t", "2"),
    )
    .await
    .unwrap();
    // Without an explicit key the envelope key is the routing key.
    send(
        format!("exchange:{direct}"),
        Envelope::builder("t").key("billing").build(),
    )
    .await
    .unwrap();
    send(format!("exchange:{fanout}"), Envelope::new("t", "3"))
        .await
        .unwrap();
    send(
        format!("exchange:{headers}"),
        Envelope::builder("t").header("region", "eu").build(),
    )
    .await
    .unwrap();
    let e = send(
        format!("exchange:{headers}"),
        Envelope::builder("t").header("region", "us").build(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Unroutable);
    for (queue, n) in [
        ("eu", 1),
        ("all", 2),
        ("direct", 1),
        ("fan1", 1),
        ("fan2", 1),
        ("hdr", 1),
    ] {
        assert_eq!(
            client.queue_depth(&q(queue)).await.unwrap().messages,
            n,
            "queue {queue}"
        );
    }
}

#[tokio::test]
async fn foreign_and_ce_prefixed_messages_are_consumed() {
    let Some(client) = common::client("foreign_and_ce_prefixed").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = common::unique("foreign");
    let mut source = queue(&client, &name).await;
    // A plain AMQP message from another producer.
    let conn = lapin::Connection::connect(&common::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        name.as_str().into(),
        BasicPublishOptions::default(),
        br#"{"legacy":true}"#,
        BasicProperties::default()
            .with_message_id("legacy-42".into())
            .with_content_type("application/json".into()),
    )
    .await
    .unwrap();
    // Same without a message id: the synthesized id is stable across redeliveries.
    let mut h = FieldTable::default();
    h.insert("x-custom".into(), AMQPValue::LongString("v".into()));
    ch.basic_publish(
        "".into(),
        name.as_str().into(),
        BasicPublishOptions::default(),
        b"no id",
        BasicProperties::default()
            .with_headers(h)
            .with_timestamp(1_700_000_000),
    )
    .await
    .unwrap();
    let a = next(&mut source).await;
    assert_eq!(a.envelope().id.as_str(), "legacy-42");
    assert_eq!(a.envelope().event_type, "postbox.foreign");
    assert_eq!(&a.envelope().payload[..], br#"{"legacy":true}"#);
    a.ack().await.unwrap();
    let b = next(&mut source).await;
    let first_id = b.envelope().id.clone();
    b.release().await.unwrap();
    let b = next(&mut source).await;
    assert_eq!(
        b.envelope().id,
        first_id,
        "synthesized id changed on redelivery"
    );
    b.ack().await.unwrap();
    // Published with the `ce-` prefix (knative binding) and read back.
    let ce = common::client_with(
        "foreign_and_ce_prefixed",
        RabbitConfig::new(common::amqp_url()).header_prefix(HeaderPrefix::Ce),
    )
    .await
    .unwrap();
    let env = Envelope::builder("order.placed")
        .header("tenant", "acme")
        .build();
    ce.publish(&name, env.clone()).await.unwrap();
    let c = next(&mut source).await;
    assert_eq!(c.envelope().id, env.id);
    assert_eq!(
        c.envelope().headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    c.ack().await.unwrap();
}

#[tokio::test]
async fn operations_depth_health_and_missing_queues() {
    let Some(client) = common::client("operations_depth_health").await else {
        return;
    };
    let _shared = BROKER.read().await;
    client.health().await.expect("healthy");
    let e = client
        .queue_depth(&common::unique("nope"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e:?}");
    // The client still works after a 404 on its side channel.
    let name = common::unique("ops");
    client
        .declare(&Topology::new().queue(QueueSpec::quorum(&name)))
        .await
        .unwrap();
    client
        .publish(&name, Envelope::new("t", "x"))
        .await
        .unwrap();
    assert_eq!(client.queue_depth(&name).await.unwrap().messages, 1);
    assert_eq!(client.dlq_depth(&name).await.unwrap(), 0);
    // Re-declaring with other arguments is a configuration error.
    let e = client
        .declare(&Topology::new().queue(QueueSpec::classic(&name)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config, "{e:?}");
    let bad = RabbitConfig::new("amqp://guest:wrongpass@127.0.0.1:1/%2f")
        .connect_timeout(Duration::from_secs(2));
    let e = RabbitMq::connect(bad).await.unwrap_err();
    assert!(
        !format!("{e:?}{e}").contains("wrongpass"),
        "password leaked: {e:?}"
    );
}

fn brokers_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers.sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let Some(client) = common::client("broker_restart_mid_stream").await else {
        return;
    };
    let _exclusive = BROKER.write().await;
    let name = common::unique("restart");
    let source = client
        .subscribe(
            &name,
            SubscribeOptions::new()
                .prefetch(8)
                .declare_queue(QueueSpec::quorum(&name)),
        )
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let (seen2, done2) = (seen.clone(), done.clone());
    let running = Consumer::builder(
        source,
        handler_fn(move |env: Envelope| {
            seen2.lock().unwrap().insert(env.id.to_string());
            done2.fetch_add(1, AtomicOrdering::SeqCst);
            async { Ok(()) }
        }),
    )
    .concurrency(4)
    .dead_letter(DeadLetterRouter::new(Arc::new(client.clone())))
    .build()
    .unwrap()
    .spawn();
    const N: usize = 300;
    let publisher = client.clone();
    let target = name.clone();
    let publishing = tokio::spawn(async move {
        let mut confirmed = Vec::new();
        let mut errors = 0usize;
        for i in 0..N {
            let mut env = Envelope::new("t", format!("{i}"));
            loop {
                match publisher.publish(&target, env).await {
                    Ok(()) => break,
                    Err(e) => {
                        errors += 1;
                        assert!(e.error.is_retryable(), "not retryable: {:?}", e.error);
                        env = *e.envelope;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            confirmed.push(format!("{}", i));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (confirmed.len(), errors)
    });
    // Let some flow, then restart the broker under load.
    while done.load(AtomicOrdering::SeqCst) < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = tokio::task::spawn_blocking(|| {
        Command::new("bash")
            .arg(brokers_script())
            .args(["restart", "rabbitmq"])
            .status()
    })
    .await
    .unwrap()
    .expect("run brokers.sh");
    assert!(status.success(), "brokers.sh restart rabbitmq failed");
    let (published, errors) = tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .expect("publishing finished after the restart")
        .unwrap();
    assert_eq!(published, N);
    eprintln!("broker_restart_mid_stream: {errors} publish errors during the restart (retried)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} messages consumed after the restart",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await.unwrap();
    // Every confirmed message arrived (duplicates are allowed: at-least-once).
    assert_eq!(seen.lock().unwrap().len(), N);
    client.health().await.expect("publisher reconnected");
}

/// Acks are coalesced into `basic.ack(multiple)` frames; one must never cover
/// a delivery still being handled. Ack 9 of 10 out of order, keep the first
/// unsettled, drop the consumer: exactly that one comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_acks_never_cover_a_delivery_in_hand() {
    let Some(client) = common::client("coalesced_acks_never_cover").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = common::unique("acks");
    let mut source = queue(&client, &name).await;
    let envs: Vec<Envelope> = (0..10)
        .map(|i| Envelope::new("t", format!("{i}")))
        .collect();
    assert!(client.publish_batch(&name, envs.clone()).await.is_success());
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(next(&mut source).await);
    }
    let kept = got.remove(0);
    let kept_id = kept.envelope().id.clone();
    got.reverse();
    let acks = got.into_iter().enumerate().map(|(i, d)| async move {
        tokio::time::sleep(Duration::from_millis(i as u64)).await;
        d.ack().await.map_err(|e| e.error)
    });
    for r in futures_util::future::join_all(acks).await {
        r.unwrap();
    }
    drop(kept);
    drop(source);
    let mut again = queue(&client, &name).await;
    let d = next(&mut again).await;
    assert_eq!(
        d.envelope().id,
        kept_id,
        "only the unsettled one comes back"
    );
    d.ack().await.unwrap();
    let more = tokio::time::timeout(Duration::from_millis(700), again.next()).await;
    assert!(more.is_err(), "an acked message was redelivered");
}
