//! The postbox conformance suite against the local SQS/SNS emulator, through
//! the `Broker` trait, three times: SNS → SQS fan-out (`sns:<topic>`, each
//! group a queue `<topic>-<group>` subscribed with raw delivery), a standard
//! queue shared by every group, and a FIFO queue (ordered).
//!
//! For `undecodable_input_is_dead_lettered_with_reason_decode` each harness
//! writes its undecodable input with the broker's own AWS clients, bypassing
//! postbox's encoder: a structured CloudEvent with `"specversion":"0.3"`,
//! published to the topic's ARN (SNS, delivered raw to each group's queue)
//! or sent to the queue's URL (on FIFO with group `k`, the key of the
//! suite's `order`s, and a deduplication id of its own).
//!
//! For `shutdown_then_disconnect_settles_everything` each harness opens its
//! second handle ([`BrokerHarness::reconnect`]) with `SqsBroker::connect` and
//! the harness broker's configuration (its own AWS clients).

mod common;

use std::time::Duration;

use postbox_core::{AnyBroker, Broker, Error, ErrorKind, SubscribeOptions};
use postbox_sqs::{FifoDeduplication, SqsBroker, SNS_MAX_BYTES};
use postbox_testkit::{BrokerHarness, Capabilities};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// topic = `sns:<name>`, group = queue `<name>-<group>`.
    Sns,
    /// topic = one standard queue shared by all groups (no fan-out).
    Queue,
    /// topic = one FIFO queue (ordered per group).
    Fifo,
}

/// Writes one message that claims to be a CloudEvent (structured JSON) but
/// has `"specversion":"0.3"` to `topic` (`sns:<name>`: SNS Publish to the
/// topic's ARN; otherwise SendMessage to the queue's URL, on FIFO with a
/// group and deduplication id) and returns the body.
async fn publish_undecodable(broker: SqsBroker, topic: String) -> Result<Vec<u8>, Error> {
    let other = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(ErrorKind::Other, format!("raw {what} ({topic}): {e}"))
    };
    let id = uuid::Uuid::now_v7().simple().to_string();
    let body = format!(
        r#"{{"specversion":"0.3","id":"{id}","type":"test.undecodable","source":"postbox-testkit","datacontenttype":"application/json","data":{{"undecodable":true}}}}"#
    );
    if let Some(name) = topic.strip_prefix("sns:") {
        let arn = broker.topic_arn(name).await?;
        broker
            .sns()
            .publish()
            .topic_arn(arn)
            .message(&body)
            .send()
            .await
            .map_err(|e| other("SNS Publish", &e))?;
    } else {
        let url = broker.queue_url(&topic).await?;
        let mut send = broker
            .sqs()
            .send_message()
            .queue_url(url)
            .message_body(&body);
        if topic.ends_with(".fifo") {
            send = send.message_group_id("k").message_deduplication_id(&id);
        }
        send.send()
            .await
            .map_err(|e| other("SQS SendMessage", &e))?;
    }
    Ok(body.into_bytes())
}

async fn harness(mode: Mode, test: &str) -> Option<BrokerHarness> {
    let mut config = common::config()
        .wait_time(Duration::from_secs(2))
        .visibility_timeout(Duration::from_secs(30))
        // Above every retry policy of the suite: postbox dead-letters first.
        .max_receive_count(20);
    if mode == Mode::Fifo {
        config = config
            // The suite publishes one envelope several times on purpose
            // (idempotency tests): de-duplicating by envelope id at the
            // broker would hide the copies the suite wants the consumer to skip.
            .fifo_deduplication(FifoDeduplication::PerSend)
            // Some suite messages have no key (decode, binary payloads).
            .fifo_default_group("default");
    }
    let again = config.clone();
    let broker = common::broker_with(test, config).await?;
    let declared = broker.capabilities();
    // Retries are visibility changes in whole seconds (rounded up) and the
    // emulator's long polls add their own latency.
    let mut caps = Capabilities::all(Duration::from_secs(3));
    caps.ordered = mode == Mode::Fifo;
    caps.fan_out = mode == Mode::Sns;
    caps.redelivery_on_close = declared.redelivery_on_close;
    caps.header_limit = declared.max_headers;
    caps.size_limit = match mode {
        Mode::Sns => Some(SNS_MAX_BYTES),
        Mode::Queue | Mode::Fifo => declared.max_message_bytes,
    };
    let name = match mode {
        Mode::Sns => "sns-sqs",
        Mode::Queue => "sqs",
        Mode::Fifo => "sqs-fifo",
    };
    let ordered = mode == Mode::Fifo;
    let writer = broker.clone();
    Some(
        BrokerHarness::new(name, broker, caps)
            .topics(move |test| {
                let id = uuid::Uuid::now_v7().simple().to_string();
                // Short names: queue names are limited to 80 characters.
                let test: String = test.chars().take(16).collect();
                match mode {
                    Mode::Sns => format!("sns:pb-{test}-{id}"),
                    Mode::Queue => format!("pb-{test}-{id}"),
                    Mode::Fifo => format!("pb-{test}-{id}.fifo"),
                }
            })
            .options(move |group| SubscribeOptions::group(group).ordered(ordered))
            .undecodable(move |topic| Box::pin(publish_undecodable(writer.clone(), topic)))
            .reconnect(move || {
                let config = again.clone();
                Box::pin(async move { SqsBroker::connect(config).await.map(AnyBroker::new) })
            }),
    )
}

macro_rules! suite {
    ($mode:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let test = concat!(module_path!(), "::", stringify!($name));
                let Some(harness) = harness($mode, test).await else {
                    return;
                };
                postbox_testkit::run_one(&harness, stringify!($name), |h| {
                    Box::pin(postbox_testkit::suite::$name(h))
                })
                .await;
            }
        )*
    };
}

mod sns_sqs {
    use super::*;
    postbox_testkit::for_each_conformance_test!(suite!(Mode::Sns));
}

mod sqs {
    use super::*;
    postbox_testkit::for_each_conformance_test!(suite!(Mode::Queue));
}

mod sqs_fifo {
    use super::*;
    postbox_testkit::for_each_conformance_test!(suite!(Mode::Fifo));
}
