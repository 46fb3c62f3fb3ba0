//! The postbox conformance suite against the local SQS/SNS emulator, three
//! times: SNS → SQS fan-out (each group is a queue subscribed to the topic
//! with raw delivery), SQS standard (publishing straight to the queue), and
//! SQS FIFO (ordered).

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use postbox_core::{BoxSource, DeadLetterOps, Error, Publisher};
use postbox_sqs::{ConsumerOptions, FifoDeduplication, QueueSpec, SqsBroker, SubscriptionSpec};
use postbox_testkit::{Capabilities, Harness};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// topic = SNS topic, group = queue `<topic>-<group>` subscribed raw.
    Sns,
    /// topic = one standard queue shared by all groups (no fan-out).
    Queue,
    /// topic = one FIFO queue (ordered per group).
    Fifo,
}

struct SqsHarness {
    broker: SqsBroker,
    mode: Mode,
}

impl SqsHarness {
    async fn new(mode: Mode, test: &str) -> Option<Self> {
        let mut broker = common::broker(test).await?;
        if mode == Mode::Fifo {
            // The suite publishes one envelope several times on purpose
            // (idempotency tests): de-duplicating by envelope id at the broker
            // would hide the copies the suite wants the consumer to skip.
            broker = broker
                .with_fifo_deduplication(FifoDeduplication::PerSend)
                // Some suite messages have no key (decode, binary payloads).
                .with_fifo_default_group("default");
        }
        Some(SqsHarness { broker, mode })
    }

    fn queue_of(&self, topic: &str, group: &str) -> String {
        match self.mode {
            Mode::Sns => format!("{}-{group}", topic.trim_start_matches("sns:")),
            Mode::Queue | Mode::Fifo => topic.to_string(),
        }
    }

    fn options() -> ConsumerOptions {
        ConsumerOptions::default()
            .wait_time(Duration::from_secs(2))
            .visibility_timeout(Duration::from_secs(30))
    }
}

#[async_trait]
impl Harness for SqsHarness {
    fn name(&self) -> &'static str {
        match self.mode {
            Mode::Sns => "sns-sqs",
            Mode::Queue => "sqs",
            Mode::Fifo => "sqs-fifo",
        }
    }

    fn capabilities(&self) -> Capabilities {
        // Retries are visibility changes in whole seconds (rounded up) and the
        // emulator's long polls add their own latency.
        let mut caps = Capabilities::all(Duration::from_secs(3));
        caps.ordered = self.mode == Mode::Fifo;
        caps.fan_out = self.mode == Mode::Sns;
        caps.header_limit = Some(postbox_sqs::codec::MAX_ATTRIBUTES);
        caps.size_limit = Some(match self.mode {
            Mode::Sns => postbox_sqs::codec::SNS_MAX_BYTES,
            Mode::Queue | Mode::Fifo => postbox_sqs::codec::SQS_MAX_BYTES,
        });
        caps
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.broker.clone())
    }

    fn dead_letters(&self) -> Arc<dyn DeadLetterOps> {
        Arc::new(self.broker.clone())
    }

    async fn provision(&self, topic: &str, groups: &[&str]) -> Result<(), Error> {
        if self.mode == Mode::Sns {
            self.broker
                .declare_topic(topic.trim_start_matches("sns:"))
                .await?;
        }
        for group in groups {
            let queue = self.queue_of(topic, group);
            // Above every retry policy of the suite: postbox dead-letters first.
            let spec = QueueSpec::new(&queue).max_receive_count(20);
            self.broker.declare_queue(&spec).await?;
            if self.mode == Mode::Sns {
                self.broker
                    .declare_subscription(&SubscriptionSpec::new(
                        topic.trim_start_matches("sns:"),
                        &queue,
                    ))
                    .await?;
            }
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<BoxSource, Error> {
        self.provision(topic, &[group]).await?;
        let source = self
            .broker
            .subscribe_with(&self.queue_of(topic, group), Self::options())
            .await?;
        Ok(Box::new(source))
    }

    fn topic(&self, test: &str) -> String {
        let id = uuid::Uuid::now_v7().simple().to_string();
        // Short names: queue names are limited to 80 characters.
        let test: String = test.chars().take(16).collect();
        match self.mode {
            Mode::Sns => format!("sns:pb-{test}-{id}"),
            Mode::Queue => format!("pb-{test}-{id}"),
            Mode::Fifo => format!("pb-{test}-{id}.fifo"),
        }
    }
}

macro_rules! suite {
    ($mode:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = SqsHarness::new($mode, concat!(module_path!(), "::", stringify!($name))).await else {
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

macro_rules! all_tests {
    ($mode:expr) => {
        postbox_testkit::for_each_conformance_test!(suite!($mode));
    };
}

mod sns_sqs {
    use super::*;
    all_tests!(Mode::Sns);
}

mod sqs {
    use super::*;
    all_tests!(Mode::Queue);
}

mod sqs_fifo {
    use super::*;
    all_tests!(Mode::Fifo);
}
