//! RabbitMQ-specific behaviour against the real broker: unroutable publishes,
//! delay tiers, a killed consumer, a consumer process exiting right after its
//! shutdown, a broker restart mid-stream, the quorum delivery limit, exchange
//! types, foreign messages, operations, and the `Broker` surface (provision,
//! subscribe, backlog, health, delayed publish, close).

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
    handler_fn, Broker, Consumer, DeadLetterOps, DeadLetterRouter, Delivery, Envelope, ErrorKind,
    Publisher, Retry, Source,
};
use postbox_rabbitmq::{
    ExchangeKind, HeaderPrefix, QueueSpec, RabbitBroker, RabbitConfig, RabbitSource, Topology,
};
use postbox_testkit::env::unique;

const WAIT: Duration = Duration::from_secs(30);

/// The restart test takes this for writing; every other test for reading, so
/// no test runs while the broker restarts.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn next(source: &mut RabbitSource) -> postbox_rabbitmq::RabbitDelivery {
    postbox_testkit::suite::next_within(source, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn queue(client: &RabbitBroker, name: &str) -> RabbitSource {
    client
        .consume(name, Topology::new().queue(QueueSpec::quorum(name)), 50)
        .await
        .expect("subscribe")
}

/// Ready messages of a queue.
async fn ready(client: &RabbitBroker, queue: &str) -> u64 {
    client.backlog(queue, None).await.unwrap().waiting
}

#[tokio::test]
async fn unroutable_publish_is_a_typed_error() {
    let Some(client) = common::broker("unroutable_publish_is_a_typed_error").await else {
        return;
    };
    let _shared = BROKER.read().await;
    // No queue of that name: the default exchange returns it.
    let env = Envelope::new("t", "x");
    let id = env.id.clone();
    let e = client
        .publish(&unique("pb-missing-queue"), env)
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
    let name = unique("pb-batch");
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
            &format!("exchange:{}/k", unique("pb-no-exchange")),
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
    assert_eq!(ready(&client, &name).await, 3);
}

#[tokio::test]
async fn delay_tiers_honour_delays_without_head_of_line_blocking() {
    let Some(client) = common::broker("delay_tiers_honour_delays").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-delays");
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
    let client = RabbitBroker::connect(RabbitConfig::new(common::amqp_url()))
        .await
        .unwrap();
    let mut source = client
        .consume(queue_name, Topology::new(), 100)
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
    let Some(client) = common::broker("killed_consumer_gets_all_unacked").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-killed");
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
    let holding = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("HOLDING 20"))
    });
    let holding = tokio::time::timeout(WAIT, holding).await;
    assert!(
        matches!(holding, Ok(Ok(true))),
        "the child consumer did not take the messages"
    );
    assert_eq!(ready(&client, &name).await, 0);
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
    let Some(client) = common::broker("quorum_delivery_limit").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-limit");
    let mut source = client
        .consume(
            &name,
            Topology::new().queue(QueueSpec::quorum(&name).delivery_limit(Some(2))),
            32,
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
    let Some(client) = common::broker("exchanges_of_every_type").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let p = unique("pb-x");
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
        assert_eq!(ready(&client, &q(queue)).await, n, "queue {queue}");
    }
}

#[tokio::test]
async fn foreign_and_ce_prefixed_messages_are_consumed() {
    let Some(client) = common::broker("foreign_and_ce_prefixed").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-foreign");
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
    let ce = common::broker_with(
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
    let Some(client) = common::broker("operations_depth_health").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let health = client.health().await.expect("healthy");
    assert_eq!(health.system, "rabbitmq");
    assert!(health.detail.contains("vhost /"), "{health:?}");
    assert!(!health.detail.contains("guest:guest"), "{health:?}");
    let e = client.backlog(&unique("pb-nope"), None).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e:?}");
    // The client still works after a 404 on its side channel.
    let name = unique("pb-ops");
    client
        .declare(&Topology::new().queue(QueueSpec::quorum(&name)))
        .await
        .unwrap();
    client
        .publish(&name, Envelope::new("t", "x"))
        .await
        .unwrap();
    assert_eq!(ready(&client, &name).await, 1);
    assert_eq!(client.count(&format!("{name}.dlq")).await.unwrap(), 0);
    // Re-declaring with other arguments is a configuration error.
    let e = client
        .declare(&Topology::new().queue(QueueSpec::classic(&name)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config, "{e:?}");
    let bad = RabbitConfig::new("amqp://guest:wrongpass@127.0.0.1:1/%2f")
        .connect_timeout(Duration::from_secs(2));
    let e = RabbitBroker::connect(bad).await.unwrap_err();
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
    let Some(client) = common::broker("broker_restart_mid_stream").await else {
        return;
    };
    let _exclusive = BROKER.write().await;
    let name = unique("pb-restart");
    let source = client
        .consume(&name, Topology::new().queue(QueueSpec::quorum(&name)), 8)
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
    .dead_letter(DeadLetterRouter::new(client.clone()))
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
    let Some(client) = common::broker("coalesced_acks_never_cover").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-acks");
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

/// The child half of `shutdown_sends_every_ack_before_returning`: consume
/// everything with the runtime, shut down, and exit the process at once —
/// no task, timer or connection of this process outlives `shutdown()`.
async fn child_shutdown_then_exit(queue_name: &str, n: usize) {
    let broker = RabbitBroker::connect(RabbitConfig::new(common::amqp_url()))
        .await
        .unwrap();
    let source = broker
        .subscribe(queue_name, postbox_core::SubscribeOptions::new())
        .await
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let all_handled = Arc::new(tokio::sync::Notify::new());
    let (counter, done) = (handled.clone(), all_handled.clone());
    let running = Consumer::builder(
        source,
        handler_fn(move |_env: Envelope| {
            if counter.fetch_add(1, AtomicOrdering::SeqCst) + 1 == n {
                done.notify_one();
            }
            async { Ok(()) }
        }),
    )
    .concurrency(8)
    .dead_letter(DeadLetterRouter::new(broker.clone()))
    .build()
    .unwrap()
    .spawn();
    // Shut down the moment the last handler returned: its ack (and the
    // group it belongs to) is still waiting to be sent.
    tokio::time::timeout(WAIT, all_handled.notified())
        .await
        .unwrap_or_else(|_| panic!("the child did not handle {n} messages"));
    let report = running.shutdown().await.unwrap();
    eprintln!("SHUTDOWN {report:?}");
    std::process::exit(0);
}

/// `RunningConsumer::shutdown()` returns only after the broker has every ack
/// the runtime reported: a process that exits right after it (dropping its
/// connections unclosed) gets none of its 100 messages redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_every_ack_before_returning() {
    const N: usize = 100;
    if let Ok(q) = std::env::var("POSTBOX_RABBIT_SHUTDOWN_QUEUE") {
        return child_shutdown_then_exit(&q, N).await;
    }
    let Some(client) = common::broker("shutdown_sends_every_ack").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-shutdown");
    client
        .provision(&name, &postbox_core::SubscribeOptions::new())
        .await
        .unwrap();
    let envs: Vec<Envelope> = (0..N).map(|i| Envelope::new("t", format!("{i}"))).collect();
    assert!(client.publish_batch(&name, envs).await.is_success());
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shutdown_sends_every_ack_before_returning",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("POSTBOX_RABBIT_SHUTDOWN_QUEUE", &name)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.contains("SHUTDOWN"),
        "the child consumer failed: {stderr}"
    );
    // Whatever the child left unacked is requeued once its connection is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.backlog(&name, None).await.unwrap().consumers != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the child's consumer is still attached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ready(&client, &name).await,
        0,
        "acked messages were requeued"
    );
    let mut fresh = queue(&client, &name).await;
    let again = tokio::time::timeout(Duration::from_millis(1500), fresh.next()).await;
    assert!(
        again.is_err(),
        "a fresh consumer got a message the child had acked"
    );
    fresh.close().await.unwrap();
}

/// The `Broker` surface: provision and subscribe map destinations and groups
/// to queues of the configured kind, backlog and health report, and close
/// ends publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_surface_provision_subscribe_backlog_health_close() {
    let config = RabbitConfig::from_url(&format!(
        "{}?heartbeat=20&queue_kind=classic&prefetch=4",
        common::amqp_url()
    ))
    .unwrap();
    let Some(broker) = common::broker_with("broker_surface", config).await else {
        return;
    };
    let _shared = BROKER.read().await;
    let caps = broker.capabilities();
    assert!(!caps.group_fan_out && caps.ordered && caps.redelivery_on_close && caps.backlog);
    assert_eq!(
        caps.max_message_bytes,
        Some(postbox_rabbitmq::DEFAULT_MAX_MESSAGE_SIZE)
    );
    assert!(caps.scheduled_publish.is_some());

    // A plain queue: declared with its DLQ, of the configured (classic) kind.
    let q = unique("pb-surface-q");
    broker
        .provision(&q, &postbox_core::SubscribeOptions::group("ignored"))
        .await
        .unwrap();
    assert_eq!(broker.count(&format!("{q}.dlq")).await.unwrap(), 0);
    let e = broker
        .declare(&Topology::new().queue(QueueSpec::quorum(&q)))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::Config,
        "the queue is not classic: {e}"
    );
    broker.publish(&q, Envelope::new("t", "1")).await.unwrap();
    broker
        .publish(&format!("queue:{q}"), Envelope::new("t", "2"))
        .await
        .unwrap();
    let backlog = broker.backlog(&q, None).await.unwrap();
    assert_eq!((backlog.waiting, backlog.consumers), (2, Some(0)));

    // Two groups on an exchange each get every message.
    let x = unique("pb-surface-x");
    let topic = format!("exchange:{x}");
    for g in ["a", "b"] {
        broker
            .provision(&topic, &postbox_core::SubscribeOptions::group(g))
            .await
            .unwrap();
    }
    let e = broker
        .provision(&topic, &postbox_core::SubscribeOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(e.message().contains("consumer group"), "{e}");
    assert_eq!(
        broker.backlog(&topic, None).await.unwrap_err().kind(),
        &ErrorKind::Config
    );
    let e = broker
        .subscribe(
            &format!("{topic}/key"),
            postbox_core::SubscribeOptions::group("a"),
        )
        .await
        .err()
        .expect("a routing key is refused");
    assert_eq!(e.kind(), &ErrorKind::Config);
    broker
        .publish(&topic, Envelope::new("t", "x"))
        .await
        .unwrap();
    for g in ["a", "b"] {
        assert_eq!(
            broker.backlog(&topic, Some(g)).await.unwrap().waiting,
            1,
            "group {g}"
        );
    }
    let mut source = broker
        .subscribe(&topic, postbox_core::SubscribeOptions::group("a"))
        .await
        .unwrap();
    assert_eq!(source.destination(), format!("{x}.a"));
    let d = tokio::time::timeout(WAIT, source.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    d.ack().await.map_err(|e| e.error).unwrap();
    assert_eq!(
        broker.backlog(&topic, Some("a")).await.unwrap().consumers,
        Some(1)
    );
    source.close().await.unwrap();
    let a = broker.backlog(&topic, Some("a")).await.unwrap();
    assert_eq!(
        (a.waiting, a.consumers),
        (0, Some(0)),
        "the ack was in before close returned"
    );

    // Without provisioning a missing queue is NotFound.
    let e = broker
        .subscribe(
            &unique("pb-surface-missing"),
            postbox_core::SubscribeOptions::new().provision(false),
        )
        .await
        .err()
        .expect("a missing queue");
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");

    let health = broker.health().await.unwrap();
    assert_eq!(health.system, "rabbitmq");
    assert!(health.detail.contains("heartbeat 20 s"), "{health:?}");

    for name in [
        q.clone(),
        format!("{q}.dlq"),
        format!("{x}.a"),
        format!("{x}.a.dlq"),
        format!("{x}.b"),
        format!("{x}.b.dlq"),
    ] {
        broker.delete_queue(&name).await.unwrap();
    }
    let clone = broker.clone();
    broker.close().await.unwrap();
    broker.close().await.expect("closing twice is fine");
    let e = clone
        .publish(&q, Envelope::new("t", "late"))
        .await
        .unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Closed, "{:?}", e.error);
    assert_eq!(clone.health().await.unwrap_err().kind(), &ErrorKind::Closed);
    assert_eq!(
        clone.count(&q).await.unwrap_err().kind(),
        &ErrorKind::Closed
    );
}

/// `publish_delayed` goes through the delay tiers: the message arrives when
/// due, not before; exchanges and a configuration without tiers refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delayed_arrives_when_due() {
    let Some(broker) = common::broker("publish_delayed_arrives_when_due").await else {
        return;
    };
    let _shared = BROKER.read().await;
    let name = unique("pb-delayed");
    let mut source = queue(&broker, &name).await;
    let delay = Duration::from_millis(1_300);
    let env = Envelope::new("t", "later");
    let start = Instant::now();
    broker
        .publish_delayed(&name, env.clone(), delay)
        .await
        .unwrap();
    broker
        .publish(&name, Envelope::new("t", "now"))
        .await
        .unwrap();
    let first = next(&mut source).await;
    assert_eq!(
        &first.envelope().payload[..],
        b"now",
        "the delayed one overtook"
    );
    first.ack().await.unwrap();
    let later = next(&mut source).await;
    let at = start.elapsed();
    assert_eq!(later.envelope().id, env.id);
    assert_eq!(later.attempt(), 1, "a scheduled message is not a retry");
    assert!(
        at + Duration::from_millis(5) >= delay,
        "arrived after {at:?}"
    );
    assert!(
        at <= delay + Duration::from_millis(1_000),
        "arrived after {at:?}"
    );
    later.ack().await.unwrap();
    source.close().await.unwrap();

    let e = broker
        .publish_delayed("exchange:amq.fanout", Envelope::new("t", "x"), delay)
        .await
        .unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Unsupported, "{:?}", e.error);
    let e = broker
        .publish_delayed(&name, Envelope::new("t", "x"), Duration::MAX)
        .await
        .unwrap_err();
    assert!(
        matches!(e.error.kind(), ErrorKind::LimitExceeded(_)),
        "{:?}",
        e.error
    );
    broker.close().await.unwrap();

    let no_tiers = RabbitConfig::new(common::amqp_url()).delay_tiers([]);
    let broker = common::broker_with("publish_delayed_arrives_when_due", no_tiers)
        .await
        .unwrap();
    assert_eq!(broker.capabilities().scheduled_publish, None);
    let e = broker
        .publish_delayed(&name, Envelope::new("t", "x"), delay)
        .await
        .unwrap_err();
    assert_eq!(e.error.kind(), &ErrorKind::Unsupported);
    broker.delete_queue(&name).await.unwrap();
    broker.delete_queue(&format!("{name}.dlq")).await.unwrap();
    broker.close().await.unwrap();
}
