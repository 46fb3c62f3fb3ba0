//! The postbox conformance suite on the in-memory broker, twice: with no
//! limits (RabbitMQ-like: unsettled deliveries return when dropped) and with
//! the SQS profile (limits, a visibility timeout).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{BoxSource, DeadLetterOps, Error, Publisher};
use postbox_memory::{Limits, MemoryBroker, QueueOptions};
use postbox_testkit::{Capabilities, Harness};

struct MemoryHarness {
    broker: MemoryBroker,
    name: &'static str,
    visibility: Option<Duration>,
}

impl MemoryHarness {
    fn plain() -> Self {
        MemoryHarness {
            broker: MemoryBroker::new(),
            name: "memory",
            visibility: None,
        }
    }

    fn sqs() -> Self {
        MemoryHarness {
            broker: MemoryBroker::with_limits(Limits::sqs()),
            name: "memory-sqs",
            visibility: Some(Duration::from_secs(30)),
        }
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::all(Duration::from_millis(250));
        if self.visibility.is_some() {
            let limits = Limits::sqs();
            caps.header_limit = limits.max_attributes;
            caps.size_limit = limits.max_body_bytes;
        }
        caps
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.broker.clone())
    }

    fn dead_letters(&self) -> Arc<dyn DeadLetterOps> {
        Arc::new(self.broker.clone())
    }

    async fn provision(&self, topic: &str, groups: &[&str]) -> Result<(), Error> {
        for group in groups {
            let queue = format!("{topic}:{group}");
            let mut options = QueueOptions::default();
            if let Some(v) = self.visibility {
                options = options.visibility_timeout(v);
            }
            self.broker.declare_queue_with(&queue, options);
            self.broker.bind(topic, &queue);
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<BoxSource, Error> {
        self.provision(topic, &[group]).await?;
        Ok(Box::new(self.broker.subscribe_group(topic, group)))
    }
}

mod memory {
    use super::*;
    postbox_testkit::conformance_tests!(async { MemoryHarness::plain() });
}

mod memory_sqs {
    use super::*;
    postbox_testkit::conformance_tests!(async { MemoryHarness::sqs() });
}
