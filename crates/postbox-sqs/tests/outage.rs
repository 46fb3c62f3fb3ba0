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

use postbox_core::{
    handler_fn, Broker, Consumer, DeadLetterRouter, Envelope, Publisher, SubscribeOptions,
};
use postbox_sqs::SqsBroker;
use postbox_testkit::env::unique;
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

/// A broker reaching the emulator through the proxy on `port`, with short
/// time-outs and long polls.
async fn broker_via(port: u16) -> SqsBroker {
    let config = common::config_at(&format!("http://127.0.0.1:{port}"))
        .connect_timeout(Duration::from_secs(1))
        .operation_timeout(Duration::from_secs(10))
        .wait_time(Duration::from_secs(1));
    SqsBroker::connect(config).await.unwrap()
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
    let broker = broker_via(port).await;
    let q = unique("outage");
    broker
        .provision(&q, &SubscribeOptions::new())
        .await
        .unwrap();

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let record = seen.clone();
    let handler = handler_fn(move |env: Envelope| {
        let record = record.clone();
        async move {
            record.lock().unwrap().insert(env.id.to_string());
            Ok(())
        }
    });
    let options = SubscribeOptions::new().provision(false);
    let source = broker.subscribe(&q, options).await.unwrap();
    let running = Consumer::builder(source, handler)
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();

    let before: Vec<Envelope> = (0..5).map(|i| Envelope::new("t", format!("{i}"))).collect();
    assert!(broker.publish_batch(&q, before.clone()).await.is_success());
    wait_for(&seen, 5).await;
    // Their deletes confirmed too (an ack cut by the outage would mean a
    // redelivery after the visibility timeout, which is correct but slow).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.backlog(&q, None).await.unwrap().total() > 0 {
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
    // Re-provision (idempotent).
    broker
        .provision(&q, &SubscribeOptions::new())
        .await
        .unwrap();
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
