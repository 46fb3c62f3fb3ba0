//! The postbox conformance suite against the real RabbitMQ, twice: with
//! quorum queues (the default) and with classic queues.
//!
//! Topology: a *topic* is a fanout exchange (destination `exchange:<name>`),
//! a *group* is a queue `<name>.<group>` bound to it, with its `<queue>.dlq`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{BoxSource, DeadLetterOps, Error, Publisher};
use postbox_rabbitmq::{
    ExchangeKind, QueueKind, QueueSpec, RabbitConfig, RabbitMq, SubscribeOptions, Topology,
};
use postbox_testkit::{Capabilities, Harness};

/// The configured body limit (RabbitMQ's own default is 128 MiB; smaller here
/// so the limit test does not allocate that much).
const MAX_BODY: usize = 1024 * 1024;

struct RabbitHarness {
    client: RabbitMq,
    /// Queues declared by this test, deleted when it passes.
    queues: std::sync::Mutex<std::collections::BTreeSet<String>>,
    kind: QueueKind,
    name: &'static str,
}

impl RabbitHarness {
    async fn new(test: &str, kind: QueueKind) -> Option<Self> {
        let config = RabbitConfig::new(common::amqp_url()).max_message_size(MAX_BODY);
        let client = common::client_with(test, config).await?;
        let name = match kind {
            QueueKind::Quorum => "rabbitmq-quorum",
            QueueKind::Classic => "rabbitmq-classic",
        };
        Some(RabbitHarness {
            client,
            queues: Default::default(),
            kind,
            name,
        })
    }

    fn spec(&self, queue: &str) -> QueueSpec {
        match self.kind {
            QueueKind::Quorum => QueueSpec::quorum(queue),
            QueueKind::Classic => QueueSpec::classic(queue),
        }
    }

    async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        for q in queues {
            let _ = self.client.delete_queue(&q).await;
            let _ = self.client.delete_queue(&format!("{q}.dlq")).await;
        }
    }

    fn topology(&self, topic: &str, groups: &[&str]) -> Topology {
        let exchange = exchange_of(topic);
        let mut t = Topology::new().exchange(exchange, ExchangeKind::Fanout);
        for g in groups {
            let queue = format!("{exchange}.{g}");
            self.queues.lock().unwrap().insert(queue.clone());
            t = t.queue(self.spec(&queue)).bind(&queue, exchange, "");
        }
        t
    }
}

fn exchange_of(topic: &str) -> &str {
    topic.strip_prefix("exchange:").unwrap_or(topic)
}

#[async_trait]
impl Harness for RabbitHarness {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        // Delays are served by TTL tiers (a chain of broker hops): generous tolerance.
        let mut caps = Capabilities::all(Duration::from_millis(1000));
        caps.size_limit = Some(MAX_BODY);
        caps
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.client.clone())
    }

    fn dead_letters(&self) -> Arc<dyn DeadLetterOps> {
        Arc::new(self.client.clone())
    }

    async fn provision(&self, topic: &str, groups: &[&str]) -> Result<(), Error> {
        self.client.declare(&self.topology(topic, groups)).await
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<BoxSource, Error> {
        let queue = format!("{}.{group}", exchange_of(topic));
        let options = SubscribeOptions::new()
            .prefetch(16)
            .declare(self.topology(topic, &[group]));
        Ok(Box::new(self.client.subscribe(&queue, options).await?))
    }

    fn topic(&self, test: &str) -> String {
        format!("exchange:{}", common::unique(test))
    }
}

macro_rules! suite {
    ($kind:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = RabbitHarness::new(stringify!($name), $kind).await else {
                    return;
                };
                postbox_testkit::run_one(&harness, stringify!($name), |h| {
                    Box::pin(postbox_testkit::suite::$name(h))
                })
                .await;
                harness.cleanup().await;
            }
        )*
    };
}

macro_rules! all_tests {
    ($kind:expr) => {
        postbox_testkit::for_each_conformance_test!(suite!($kind));
    };
}

mod quorum {
    use super::*;
    all_tests!(QueueKind::Quorum);
}

mod classic {
    use super::*;
    all_tests!(QueueKind::Classic);
}
