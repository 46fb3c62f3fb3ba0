//! The postbox conformance suite against the real RabbitMQ through the
//! `Broker` trait, three times: with quorum queues (the default), with
//! classic queues, and with quorum queues publishing in structured mode.
//!
//! Topics are `exchange:<unique>` destinations, so each group gets its own
//! queue `<exchange>.<group>` (with `<queue>.dlq`) bound to the fanout
//! exchange, declared by `provision` / `subscribe`.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postbox_core::{Broker, SubscribeOptions};
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
