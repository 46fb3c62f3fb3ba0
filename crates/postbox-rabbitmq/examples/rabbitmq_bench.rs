//! Raw lapin versus postbox-rabbitmq, in one run, on the same broker:
//! publish with confirms and consume with acks of 100-byte messages.
//!
//! ```sh
//! eval "$(scripts/brokers.sh env)"
//! cargo run -p postbox-rabbitmq --example rabbitmq_bench -- [messages per round] [rounds]
//! ```
//!
//! Both sides: one connection each for publishing and consuming, durable
//! classic queue, persistent messages, `mandatory`, confirms pipelined in
//! windows of 1000, prefetch 500, the same headers on the wire (the raw side
//! builds the `cloudEvents:` headers and native properties of the envelope
//! itself, from core's binary attributes), the body read into the same type
//! (`black_box`, decoded with core's binary codec). Raw acks with `multiple` every 50
//! messages (what a careful engineer writes); postbox acks each message after
//! its handler. Rounds alternate raw, postbox, raw, postbox, … after a
//! discarded warm-up; every round uses a fresh queue. Publish is measured into
//! a queue without consumers; consume drains that backlog.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use postbox_core::codec::binary;
use postbox_core::{
    handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions,
};
use postbox_rabbitmq::{QueueSpec, RabbitBroker, RabbitConfig, Topology, DEFAULT_URL};

const WINDOW: usize = 1000;
const PREFETCH: u16 = 500;

fn url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.into())
}

/// The properties postbox sends for `env`, built the way a raw lapin user
/// would: `cloudEvents:` headers plus the native properties.
fn raw_properties(env: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in binary::encode(env).unwrap() {
        headers.insert(
            format!("cloudEvents:{name}").into(),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_message_id(env.id.as_str().into())
        .with_type(env.event_type.as_ref().into())
        .with_app_id(env.source.as_ref().into())
        .with_content_type(env.content_type.as_ref().into());
    if let Some(t) = env.time {
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        props = props.with_timestamp(secs);
    }
    props
}

/// The envelope of a received message, from its `cloudEvents:` headers.
fn raw_decode(props: &BasicProperties, body: Vec<u8>) -> Envelope {
    let headers = props.headers().as_ref().unwrap();
    let attrs = headers.inner().iter().filter_map(|(k, v)| {
        let name = binary::strip_prefix(k.as_str(), "cloudEvents:")?;
        match v {
            AMQPValue::LongString(s) => Some((name, std::str::from_utf8(s.as_bytes()).ok()?)),
            _ => None,
        }
    });
    binary::decode(attrs, bytes::Bytes::from(body)).unwrap()
}

fn envelopes(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|_| Envelope::new("bench.event", vec![b'x'; 100]))
        .collect()
}

async fn declare(client: &RabbitBroker, name: &str) {
    client
        .declare(&Topology::new().queue(QueueSpec::classic(name).without_dlq()))
        .await
        .unwrap();
}

async fn raw_round(client: &RabbitBroker, n: usize) -> (f64, f64) {
    let queue = format!("bench-raw-{}", uuid_like());
    declare(client, &queue).await;
    let envs = envelopes(n);
    let props: Vec<_> = envs.iter().map(raw_properties).collect();
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let t = Instant::now();
    for (chunk_e, chunk_p) in envs.chunks(WINDOW).zip(props.chunks(WINDOW)) {
        let mut confirms = Vec::with_capacity(WINDOW);
        for (e, p) in chunk_e.iter().zip(chunk_p) {
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &e.payload,
                    p.clone(),
                )
                .await
                .unwrap(),
            );
        }
        for c in futures_util::future::join_all(confirms).await {
            assert!(c.unwrap().is_ack());
        }
    }
    let publish = n as f64 / t.elapsed().as_secs_f64();
    // Consume the backlog.
    let cconn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .unwrap();
    let cch = cconn.create_channel().await.unwrap();
    cch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let t = Instant::now();
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = 0;
    while got < n {
        let d = consumer.next().await.unwrap().unwrap();
        let env = raw_decode(&d.properties, d.data);
        black_box(&env);
        got += 1;
        if got % raw_ack_every() == 0 || got == n {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let consume = n as f64 / t.elapsed().as_secs_f64();
    let _ = cch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "".into()).await;
    let _ = cconn.close(200, "".into()).await;
    (publish, consume)
}

async fn postbox_round(n: usize) -> (f64, f64) {
    let client = RabbitBroker::connect(RabbitConfig::new(url()))
        .await
        .unwrap();
    let queue = format!("bench-pb-{}", uuid_like());
    declare(&client, &queue).await;
    let envs = envelopes(n);
    let t = Instant::now();
    let mut rest = envs;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(WINDOW));
        let report = client.publish_batch(&queue, rest).await;
        assert!(report.is_success());
        rest = tail;
    }
    let publish = n as f64 / t.elapsed().as_secs_f64();
    let done = Arc::new(AtomicUsize::new(0));
    let (notify_tx, mut notify_rx) = tokio::sync::mpsc::channel::<()>(1);
    let counter = done.clone();
    let t = Instant::now();
    let options = SubscribeOptions::new().prefetch(PREFETCH).provision(false);
    let source = client.subscribe(&queue, options).await.unwrap();
    let running = Consumer::builder(
        source,
        handler_fn(move |env: Envelope| {
            black_box(&env);
            if counter.fetch_add(1, Ordering::Relaxed) + 1 == n {
                let _ = notify_tx.try_send(());
            }
            async { Ok(()) }
        }),
    )
    .concurrency(concurrency())
    .dead_letter(DeadLetterRouter::new(client.clone()))
    .build()
    .unwrap()
    .spawn();
    let _ = tokio::time::timeout(Duration::from_secs(300), notify_rx.recv()).await;
    let consume = n as f64 / t.elapsed().as_secs_f64();
    running.shutdown().await.unwrap();
    let _ = client.delete_queue(&queue).await;
    client.close().await.unwrap();
    (publish, consume)
}

/// The raw side acks with `multiple` every this many messages (`RAW_ACK_EVERY`, default 50).
fn raw_ack_every() -> usize {
    std::env::var("RAW_ACK_EVERY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

/// Runtime concurrency of the postbox consumer (`BENCH_CONCURRENCY`, default 1).
fn concurrency() -> usize {
    std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn summary(name: &str, xs: &mut [f64]) -> (f64, f64, f64) {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (worst, median, best) = (xs[0], xs[xs.len() / 2], xs[xs.len() - 1]);
    println!("{name:<18} best {best:>9.0}  median {median:>9.0}  worst {worst:>9.0} msg/s");
    (best, median, worst)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let admin = RabbitBroker::connect(RabbitConfig::new(url()))
        .await
        .unwrap();
    println!(
        "rabbitmq bench: {n} messages of 100 bytes per round, {rounds} rounds each, interleaved; \
         debug={}, cores={}",
        cfg!(debug_assertions),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // Warm-up, discarded.
    raw_round(&admin, n / 4).await;
    postbox_round(n / 4).await;
    let (mut rp, mut rc, mut pp, mut pc) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (p, c) = raw_round(&admin, n).await;
        rp.push(p);
        rc.push(c);
        let (p, c) = postbox_round(n).await;
        pp.push(p);
        pc.push(c);
    }
    let raw_p = summary("raw publish", &mut rp);
    let pb_p = summary("postbox publish", &mut pp);
    let raw_c = summary("raw consume", &mut rc);
    let pb_c = summary("postbox consume", &mut pc);
    for (what, raw, pb) in [("publish", raw_p, pb_p), ("consume", raw_c, pb_c)] {
        let ratio = pb.1 / raw.1;
        let spread = (raw.0 - raw.2).max(pb.0 - pb.2);
        let verdict = if (pb.1 - raw.1).abs() < spread {
            "indistinguishable (difference below the best-worst spread)"
        } else {
            ""
        };
        println!("{what}: postbox/raw median ratio {ratio:.2} {verdict}");
    }
    admin.close().await.unwrap();
}
