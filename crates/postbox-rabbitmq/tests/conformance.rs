//! The postbox conformance suite against the real RabbitMQ through the
//! `Broker` trait, three times: with quorum queues (the default), with
//! classic queues, and with quorum queues publishing in structured mode.
//!
//! Topics are `exchange:<unique>` destinations, so each group gets its own
//! queue `<exchange>.<group>` (with `<queue>.dlq`) bound to the fanout
//! exchange, declared by `provision` / `subscribe`.
//!
//! For `undecodable_input_is_dead_lettered_with_reason_decode` each harness
//! writes its undecodable input with a plain lapin connection: one message
//! published to the test's exchange (routing key `k`, the key of the suite's
//! `order`s, as postbox's own publish would route it) in binary mode with
//! `cloudEvents:specversion` = `0.3`, confirmed by the broker.
//!
//! For `shutdown_then_disconnect_settles_everything` each harness opens its
//! second handle ([`BrokerHarness::reconnect`]) with `RabbitBroker::connect`
//! and the harness broker's configuration: its own connection, which the case
//! closes right after `shutdown()`.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use postbox_core::{AnyBroker, Broker, Error, ErrorKind, SubscribeOptions};
use postbox_rabbitmq::{ContentMode, QueueKind, RabbitBroker, RabbitConfig};
use postbox_testkit::{env, BrokerHarness, Capabilities};

/// The configured body limit (RabbitMQ's own default is 128 MiB; smaller here
/// so the limit test does not allocate that much).
const MAX_BODY: usize = 1024 * 1024;

/// Exchanges and groups a test named, so their queues can be deleted after
/// it passed (a test broker would otherwise keep every test's queues).
#[derive(Default)]
struct Names {
    exchanges: BTreeSet<String>,
    groups: BTreeSet<String>,
}

/// Publishes one message that claims to be a CloudEvent in binary mode but
/// has `cloudEvents:specversion` = `0.3` to the exchange of `topic`
/// (`exchange:<name>`) with a plain lapin connection, bypassing postbox's
/// encoder; waits for the broker's confirm and returns the body.
async fn publish_undecodable(topic: String) -> Result<Vec<u8>, Error> {
    let other = |what: &str, e: &dyn std::fmt::Display| {
        Error::new(ErrorKind::Other, format!("raw {what} ({topic}): {e}"))
    };
    let exchange = topic
        .strip_prefix("exchange:")
        .ok_or_else(|| other("publish", &"not an `exchange:<name>` topic"))?;
    let connection = Connection::connect(&common::amqp_url(), Default::default())
        .await
        .map_err(|e| other("connection", &e))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| other("channel", &e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| other("confirm.select", &e))?;
    let id = env::unique("undecodable");
    let body = format!(r#"{{"undecodable":"{id}"}}"#).into_bytes();
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("cloudEvents:specversion", "0.3"),
        ("cloudEvents:id", id.as_str()),
        ("cloudEvents:type", "test.undecodable"),
        ("cloudEvents:source", "postbox-testkit"),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            exchange.into(),
            "k".into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &body,
            properties,
        )
        .await
        .map_err(|e| other("publish", &e))?
        .await
        .map_err(|e| other("confirm", &e))?;
    if !confirm.is_ack() || confirm.take_message().is_some() {
        return Err(other("publish", &"not routed to a queue"));
    }
    connection
        .close(200, "done".into())
        .await
        .map_err(|e| other("close", &e))?;
    Ok(body)
}

struct Run {
    harness: BrokerHarness,
    broker: RabbitBroker,
    names: Arc<Mutex<Names>>,
}

impl Run {
    async fn new(test: &str, (kind, mode): (QueueKind, ContentMode)) -> Option<Run> {
        let config = RabbitConfig::new(common::amqp_url())
            .max_message_size(MAX_BODY)
            .queue_kind(kind)
            .content_mode(mode);
        let broker = common::broker_with(test, config).await?;
        let declared = broker.capabilities();
        // Delays are served by TTL tiers (a chain of broker hops): generous tolerance.
        let mut caps = Capabilities::all(Duration::from_millis(1000));
        caps.size_limit = declared.max_message_bytes;
        caps.header_limit = declared.max_headers;
        let name = match (kind, mode) {
            (QueueKind::Quorum, ContentMode::Binary) => "rabbitmq-quorum",
            (QueueKind::Classic, ContentMode::Binary) => "rabbitmq-classic",
            (_, ContentMode::Structured) => "rabbitmq-structured",
        };
        let names = Arc::new(Mutex::new(Names::default()));
        let again = broker.config().clone();
        let (topics, groups) = (names.clone(), names.clone());
        let harness = BrokerHarness::new(name, broker.clone(), caps)
            .topics(move |test| {
                let exchange = env::unique(&format!("pb-{test}"));
                topics.lock().unwrap().exchanges.insert(exchange.clone());
                format!("exchange:{exchange}")
            })
            .options(move |group| {
                groups.lock().unwrap().groups.insert(group.to_string());
                SubscribeOptions::group(group).prefetch(16)
            })
            .undecodable(|topic| Box::pin(publish_undecodable(topic)))
            .reconnect(move || {
                let config = again.clone();
                Box::pin(async move { RabbitBroker::connect(config).await.map(AnyBroker::new) })
            });
        Some(Run {
            harness,
            broker,
            names,
        })
    }

    async fn cleanup(self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap());
        for exchange in &names.exchanges {
            for group in &names.groups {
                let queue = format!("{exchange}.{group}");
                let _ = self.broker.delete_queue(&queue).await;
                let _ = self.broker.delete_queue(&format!("{queue}.dlq")).await;
            }
        }
        self.broker
            .close()
            .await
            .expect("closing the broker handle");
    }
}

macro_rules! suite {
    ($kind:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(run) = Run::new(stringify!($name), $kind).await else {
                    return;
                };
                postbox_testkit::run_one(&run.harness, stringify!($name), |h| {
                    Box::pin(postbox_testkit::suite::$name(h))
                })
                .await;
                run.cleanup().await;
            }
        )*
    };
}

mod quorum {
    use super::*;
    postbox_testkit::for_each_conformance_test!(suite!((QueueKind::Quorum, ContentMode::Binary)));
}

mod classic {
    use super::*;
    postbox_testkit::for_each_conformance_test!(suite!((QueueKind::Classic, ContentMode::Binary)));
}

mod structured {
    use super::*;
    postbox_testkit::for_each_conformance_test!(suite!((
        QueueKind::Quorum,
        ContentMode::Structured
    )));
}
