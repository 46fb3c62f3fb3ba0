//! The endpoint unreachable for a while: publishers get retryable errors,
//! consumers back off and resume when it answers again, nothing crashes.
//!
//! The outage is made by a TCP proxy in front of the emulator that this test
//! stops and starts (connections refused, open ones cut), so the emulator
//! itself — shared with other tests — keeps running. The topology is
//! provisioned again after the outage, as an application would on restart.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postbox_core::{handler_fn, Consumer, DeadLetterRouter, Envelope, Publisher};
use postbox_sqs::aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use postbox_sqs::{ConsumerOptions, QueueSpec, SqsBroker};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

struct Proxy {
    port: u16,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    fn bind(port: u16) -> tokio::net::TcpListener {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(format!("127.0.0.1:{port}").parse().unwrap())
            .unwrap();
        socket.listen(128).unwrap()
    }

    fn start_on(port: u16, upstream: String) -> Proxy {
        let listener = Self::bind(port);
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            task: Some(task),
        }
    }

    /// Refuses new connections and cuts the open ones.
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

fn upstream() -> String {
    let endpoint = common::endpoint();
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

fn broker_via(port: u16) -> SqsBroker {
    let creds = || {
        Credentials::new(
            common::env_or("AWS_ACCESS_KEY_ID", "test"),
            common::env_or("AWS_SECRET_ACCESS_KEY", "test"),
            None,
            None,
            "outage-test",
        )
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let region = common::env_or("AWS_REGION", "us-east-1");
    let timeouts = postbox_sqs::aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(10))
        .build();
    let sqs = postbox_sqs::aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.clone()))
        .endpoint_url(&endpoint)
        .credentials_provider(creds())
        .timeout_config(timeouts.clone())
        .build();
    let sns = postbox_sqs::aws_sdk_sns::Config::builder()
        .behavior_version(postbox_sqs::aws_sdk_sns::config::BehaviorVersion::latest())
        .region(postbox_sqs::aws_sdk_sns::config::Region::new(region))
        .endpoint_url(&endpoint)
        .credentials_provider(creds())
        .timeout_config(timeouts)
        .build();
    SqsBroker::new(
        postbox_sqs::aws_sdk_sqs::Client::from_conf(sqs),
        postbox_sqs::aws_sdk_sns::Client::from_conf(sns),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_unreachable_for_a_while() {
    if common::broker("endpoint_unreachable_for_a_while")
        .await
        .is_none()
    {
        return;
    }
    let mut proxy = Proxy::start_on(0, upstream());
    let port = proxy.port;
    let broker = broker_via(port);
    let q = common::unique("outage");
    let spec = QueueSpec::new(&q);
    broker.declare_queue(&spec).await.unwrap();

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let record = seen.clone();
    let handler = handler_fn(move |env: Envelope| {
        let record = record.clone();
        async move {
            record.lock().unwrap().insert(env.id.to_string());
            Ok(())
        }
    });
    let options = ConsumerOptions::default().wait_time(Duration::from_secs(1));
    let source = broker.subscribe_with(&q, options).await.unwrap();
    let running = Consumer::builder(source, handler)
        .dead_letter(DeadLetterRouter::new(Arc::new(broker.clone())))
        .build()
        .unwrap()
        .spawn();

    let before: Vec<Envelope> = (0..5).map(|i| Envelope::new("t", format!("{i}"))).collect();
    assert!(broker.publish_batch(&q, before.clone()).await.is_success());
    wait_for(&seen, 5).await;
    // Their deletes confirmed too (an ack cut by the outage would mean a
    // redelivery after the visibility timeout, which is correct but slow).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.depth(&q).await.unwrap().total() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "acks not confirmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.stop().await;
    let e = broker
        .publish(&q, Envelope::new("t", "{}"))
        .await
        .unwrap_err();
    assert!(
        e.error.is_retryable(),
        "an unreachable endpoint must be retryable: {:?}",
        e.error
    );
    let report = broker
        .publish_batch(&q, vec![Envelope::new("t", "{}"), Envelope::new("t", "{}")])
        .await;
    assert_eq!(report.failures().count(), 2);
    assert!(report.failures().all(|(_, e)| e.error.is_retryable()));
    assert!(broker.health().await.is_err());
    // The consumer's receivers fail meanwhile and back off.
    tokio::time::sleep(Duration::from_secs(3)).await;

    proxy = Proxy::start_on(port, upstream());
    broker.health().await.unwrap();
    broker.declare_queue(&spec).await.unwrap(); // re-provision (idempotent)
    let after: Vec<Envelope> = (0..5).map(|i| Envelope::new("t", format!("{i}"))).collect();
    assert!(broker.publish_batch(&q, after.clone()).await.is_success());
    wait_for(&seen, 10).await;
    let report = running.shutdown().await.unwrap();
    assert_eq!(report.acked, 10, "{report:?}");
    let expected: BTreeSet<String> = before
        .iter()
        .chain(&after)
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(*seen.lock().unwrap(), expected);
    proxy.stop().await;
}

async fn wait_for(seen: &Mutex<BTreeSet<String>>, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} messages handled",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
