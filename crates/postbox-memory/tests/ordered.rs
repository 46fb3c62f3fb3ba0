//! Per-key ordering on a real (in-memory) broker: a key that waits on an
//! in-place retry keeps its order and never stalls the other keys.

use std::time::Duration;

use postbox_core::{Consumer, DeadLetterRouter, Envelope, ProcessingOrder, Publisher};
use postbox_memory::MemoryBroker;
use postbox_testkit::{Behaviour, HandlerSpy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_key_with_a_backlog_does_not_stall_other_keys() {
    let broker = MemoryBroker::new();
    let envs: Vec<Envelope> = (0..4)
        .map(|i| {
            Envelope::builder("t")
                .key("slow")
                .header("seq", i.to_string())
                .build()
        })
        .chain((0..20).map(|i| {
            Envelope::builder("t")
                .key(format!("k{i}"))
                .header("seq", "0")
                .build()
        }))
        .collect();
    let slow_first = envs[0].id.clone();
    let spy = HandlerSpy::new().script(move |env, seen| {
        if env.id == slow_first && seen == 0 {
            Behaviour::RetryAfter(Duration::from_millis(800))
        } else {
            Behaviour::Succeed
        }
    });
    let consumer = Consumer::builder(broker.subscribe("q"), spy.clone())
        .concurrency(8)
        .ordering(ProcessingOrder::PerKey)
        .dead_letter(DeadLetterRouter::new(broker.clone()))
        .build()
        .unwrap()
        .spawn();
    for env in &envs {
        broker.publish("q", env.clone()).await.unwrap();
    }
    spy.wait_for_successes(24, Duration::from_secs(20))
        .await
        .unwrap();
    let report = consumer.shutdown().await.unwrap();
    assert_eq!(report.retried_in_place, 1, "{report:?}");

    let successes = spy.successes();
    let slow: Vec<&str> = successes
        .iter()
        .filter(|c| c.envelope.key.as_deref() == Some("slow"))
        .map(|c| c.envelope.headers["seq"].as_str())
        .collect();
    assert_eq!(slow, ["0", "1", "2", "3"], "the slow key kept its order");
    let retry_done = successes
        .iter()
        .position(|c| c.envelope.key.as_deref() == Some("slow"))
        .unwrap();
    let others_before = successes[..retry_done]
        .iter()
        .filter(|c| c.envelope.key.as_deref() != Some("slow"))
        .count();
    assert!(
        others_before >= 10,
        "only {others_before} messages of other keys were handled while the slow key waited"
    );
}
