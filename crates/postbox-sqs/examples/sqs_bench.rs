//! Raw aws-sdk-sqs versus postbox-sqs, in one run, against the same endpoint:
//! batched send, and receive + delete, with the same batch
//! size (10), the same concurrency, the same bytes on the wire (the raw side
//! sends the very CloudEvents body and `type` attribute postbox sends), the
//! same decode (`serde_json` into the same struct, `black_box`ed), and the
//! delete after the handler on both sides. Rounds are interleaved (raw,
//! postbox, …) after a discarded warm-up; each round uses a fresh queue.
//!
//! ```sh
//! eval "$(scripts/brokers.sh env)"
//! cargo run -p postbox-sqs --example sqs_bench [messages] [concurrency] [rounds]
//! ```

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, SendMessageBatchRequestEntry,
};
use postbox_core::{
    handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions,
};
use postbox_sqs::{QueueSpec, SqsBroker, SqsConfig};

#[derive(serde::Deserialize)]
struct Order {
    #[allow(dead_code)]
    order: u64,
    #[allow(dead_code)]
    note: String,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The raw side's client, and postbox's configuration on the same endpoint
/// and credentials (`receivers` long polls of 1 s, a buffer of one batch
/// each).
fn clients(receivers: usize) -> (aws_sdk_sqs::Client, SqsConfig) {
    let creds = Credentials::new(
        env_or("AWS_ACCESS_KEY_ID", "test"),
        env_or("AWS_SECRET_ACCESS_KEY", "test"),
        None,
        None,
        "bench",
    );
    let endpoint = env_or("AWS_ENDPOINT_URL", "http://127.0.0.1:4566");
    let region = env_or("AWS_REGION", "us-east-1");
    let sqs = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.clone()))
        .endpoint_url(&endpoint)
        .credentials_provider(creds.clone())
        .build();
    let sns = aws_sdk_sns::Config::builder()
        .behavior_version(aws_sdk_sns::config::BehaviorVersion::latest())
        .region(aws_sdk_sns::config::Region::new(region))
        .endpoint_url(&endpoint)
        .credentials_provider(creds)
        .build();
    // One client for both sides (the same connection pool).
    let sqs = aws_sdk_sqs::Client::from_conf(sqs);
    let config = SqsConfig::from_clients(sqs.clone(), aws_sdk_sns::Client::from_conf(sns))
        .receivers(receivers)
        .buffer(receivers * 10)
        .wait_time(Duration::from_secs(1));
    (sqs, config)
}

fn envelope(i: usize) -> Envelope {
    // ~100-byte JSON payload.
    let note = "x".repeat(70);
    Envelope::json(
        "bench.order",
        &serde_json::json!({ "order": i, "note": note }),
    )
    .unwrap()
}

async fn fresh_queue(broker: &SqsBroker, tag: &str) -> String {
    let name = format!("bench-{tag}-{}", uuid_like());
    broker
        .declare_queue(&QueueSpec::new(&name).without_dead_letter_queue())
        .await
        .unwrap()
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}")
}

/// Raw: `concurrency` tasks, each sending batches of 10 pre-encoded bodies.
async fn raw_send(sqs: &aws_sdk_sqs::Client, url: &str, n: usize, concurrency: usize) -> Duration {
    // The same bytes postbox puts on the wire, encoded outside the clock.
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..n)
            .map(|i| {
                String::from_utf8(postbox_core::codec::structured::encode(&envelope(i)).unwrap())
                    .unwrap()
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (sqs, url, bodies, next) = (sqs.clone(), url.to_string(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(10, Ordering::Relaxed);
                if from >= bodies.len() {
                    return;
                }
                let to = (from + 10).min(bodies.len());
                let entries = (from..to)
                    .map(|i| {
                        SendMessageBatchRequestEntry::builder()
                            .id((i - from).to_string())
                            .message_body(bodies[i].clone())
                            .message_attributes(
                                "type",
                                MessageAttributeValue::builder()
                                    .data_type("String")
                                    .string_value("bench.order")
                                    .build()
                                    .unwrap(),
                            )
                            .build()
                            .unwrap()
                    })
                    .collect();
                let out = sqs
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .unwrap();
                assert!(out.failed.is_empty());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// postbox: `concurrency` tasks, each `publish_batch` of 10 envelopes.
async fn postbox_send(broker: &SqsBroker, url: &str, n: usize, concurrency: usize) -> Duration {
    let envs: Arc<Vec<Envelope>> = Arc::new((0..n).map(envelope).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (broker, url, envs, next) =
            (broker.clone(), url.to_string(), envs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(10, Ordering::Relaxed);
                if from >= envs.len() {
                    return;
                }
                let to = (from + 10).min(envs.len());
                let batch = envs[from..to].to_vec();
                assert!(broker.publish_batch(&url, batch).await.is_success());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// Raw: `concurrency` tasks, each receive 10 (long poll) → decode →
/// DeleteMessageBatch in the background while the task polls again (the
/// pipelining an experienced SQS user writes, and what postbox does); the
/// window ends when every delete has been answered. Receivers still in a
/// long poll then are aborted, as postbox's shutdown stops its receivers.
async fn raw_receive(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    n: usize,
    concurrency: usize,
) -> Duration {
    let received = Arc::new(AtomicUsize::new(0));
    let deleted = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (sqs, url, received) = (sqs.clone(), url.to_string(), received.clone());
        let deleted = deleted.clone();
        tasks.spawn(async move {
            let mut deletes = tokio::task::JoinSet::new();
            while received.load(Ordering::Relaxed) < n {
                let out = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .visibility_timeout(30)
                    .message_system_attribute_names(
                        aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .message_attribute_names("All")
                    .send()
                    .await
                    .unwrap();
                let msgs = out.messages.unwrap_or_default();
                if msgs.is_empty() {
                    continue;
                }
                let mut entries = Vec::with_capacity(msgs.len());
                for (i, m) in msgs.iter().enumerate() {
                    let env = postbox_core::codec::structured::decode(
                        m.body.as_deref().unwrap_or("").as_bytes(),
                    )
                    .unwrap();
                    let order: Order = serde_json::from_slice(&env.payload).unwrap();
                    black_box(order);
                    entries.push(
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle.clone().unwrap())
                            .build()
                            .unwrap(),
                    );
                }
                received.fetch_add(entries.len(), Ordering::Relaxed);
                let (sqs, url, deleted) = (sqs.clone(), url.clone(), deleted.clone());
                deletes.spawn(async move {
                    let k = entries.len();
                    let out = sqs
                        .delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .unwrap();
                    assert!(out.failed.is_empty(), "raw delete failed: {:?}", out.failed);
                    deleted.fetch_add(k, Ordering::Relaxed);
                });
                // Answered deletes are collected as they come (no pile-up).
                while let Some(done) = deletes.try_join_next() {
                    done.unwrap();
                }
            }
            while let Some(done) = deletes.join_next().await {
                done.unwrap();
            }
        });
    }
    while deleted.load(Ordering::Relaxed) < n {
        if let Some(Err(e)) = tasks.try_join_next() {
            panic!("raw receiver failed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    tasks.abort_all();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            assert!(e.is_cancelled(), "raw receiver failed: {e}");
        }
    }
    elapsed
}

/// postbox: a subscription with `concurrency` receivers of 10 feeding the
/// consumer runtime, deletes batched. The window ends when the queue is
/// empty (every delete answered), like the raw side's; the shutdown after it
/// waits for the receivers' last long poll, which the raw side aborts. Handler concurrency = 2 × receivers ×
/// 10: an ack holds its worker until SQS confirmed the delete, so the pool
/// covers what the receivers hand out *and* the deletes in flight (with
/// receivers × 10 the delete round trip, not the endpoint, bounds the rate:
/// 0.84–0.87× here).
async fn postbox_receive(broker: &SqsBroker, url: &str, n: usize, concurrency: usize) -> Duration {
    let done = Arc::new(AtomicUsize::new(0));
    let counter = done.clone();
    let handler = handler_fn(move |env: Envelope| {
        let counter = counter.clone();
        async move {
            let order: Order = env
                .decode_json()
                .map_err(postbox_core::HandlerError::decode)?;
            black_box(order);
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    // The receivers of the broker's configuration (`concurrency`), 10 each.
    let options = SubscribeOptions::new().prefetch(10).provision(false);
    let start = Instant::now();
    let source = broker.subscribe(url, options).await.unwrap();
    let running = Consumer::builder(source, handler)
        .concurrency(concurrency * 20)
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();
    while done.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while broker.backlog(url, None).await.unwrap().total() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.acked as usize, n, "{report:?}");
    elapsed
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| b.partial_cmp(a).unwrap());
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn line(name: &str, raw: Vec<f64>, pb: Vec<f64>) {
    let (rb, rm, rw) = stats(raw);
    let (pbb, pm, pw) = stats(pb);
    let spread = (rb - rw).max(pbb - pw);
    let verdict = if (rm - pm).abs() < spread {
        format!(
            "indistinguishable (|Δ median| {:.0} < spread {:.0})",
            (rm - pm).abs(),
            spread
        )
    } else {
        format!("ratio {:.3}×", pm / rm)
    };
    println!(
        "{name:<16} raw     best {rb:>7.0}  median {rm:>7.0}  worst {rw:>7.0} msg/s\n{:<16} postbox best {pbb:>7.0}  median {pm:>7.0}  worst {pw:>7.0} msg/s   postbox/raw median {:.3}× — {verdict}",
        "", pm / rm
    );
}

fn environment() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let profile = if cfg!(debug_assertions) {
        "dev (unoptimized)"
    } else {
        "release"
    };
    println!("environment: CPU {cpu}, {cores} cores, {rustc}, profile {profile}");
    println!(
        "endpoint {} ({}), tokio multi-thread runtime, both sides on the same runtime and clients",
        env_or("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
        env_or("POSTBOX_AWS_EMULATOR", "unknown emulator")
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(3000);
    let concurrency = args.get(1).copied().unwrap_or(8);
    let rounds = args.get(2).copied().unwrap_or(3);
    environment();
    println!("{n} messages of ~100-byte JSON payload per round, batch 10, concurrency {concurrency}, {rounds} interleaved rounds + 1 warm-up");
    let (sqs, config) = clients(concurrency);
    let broker = SqsBroker::connect(config).await.expect("a region");
    broker.health().await.expect("endpoint reachable");
    let (mut send_raw, mut send_pb, mut recv_raw, mut recv_pb) = (vec![], vec![], vec![], vec![]);
    for round in 0..=rounds {
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let q_raw = fresh_queue(&broker, "raw").await;
        let s_raw = rate(raw_send(&sqs, &q_raw, n, concurrency).await);
        let r_raw = rate(raw_receive(&sqs, &q_raw, n, concurrency).await);
        let q_pb = fresh_queue(&broker, "pb").await;
        let s_pb = rate(postbox_send(&broker, &q_pb, n, concurrency).await);
        let r_pb = rate(postbox_receive(&broker, &q_pb, n, concurrency).await);
        for q in [&q_raw, &q_pb] {
            let _ = sqs.delete_queue().queue_url(q).send().await;
        }
        if round == 0 {
            println!("warm-up: send raw {s_raw:.0} / postbox {s_pb:.0}; receive+delete raw {r_raw:.0} / postbox {r_pb:.0} msg/s (discarded)");
            continue;
        }
        println!("round {round}: send raw {s_raw:.0} / postbox {s_pb:.0}; receive+delete raw {r_raw:.0} / postbox {r_pb:.0} msg/s");
        send_raw.push(s_raw);
        send_pb.push(s_pb);
        recv_raw.push(r_raw);
        recv_pb.push(r_pb);
    }
    line("batched send", send_raw, send_pb);
    line("receive+delete", recv_raw, recv_pb);
}
