//! The postbox conformance suite through the `Broker` trait, against tansu
//! (the Kafka-protocol broker `scripts/brokers.sh` runs; topics with 2
//! partitions so consumers of a group can split them, plus the ordering tests
//! on 1 partition) and against librdkafka's in-process mock cluster.
//!
//! Skips, by capability: on 2 partitions the two tests of *global* publish
//! order (`ordered_next_waits_for_ack`, `per_key_order_is_kept`) — Kafka
//! orders per partition only; they run in the `*_single_partition` modules. On 1
//! partition `competing_consumers_split_the_work` (one partition has one
//! owner). `limits_are_typed_errors` runs (size limit = `message.max.bytes`).
//! The mock cluster runs the full suite on 2 partitions and the ordering
//! tests on 1.
//!
//! Every harness writes undecodable input for
//! `undecodable_input_is_dead_lettered_with_reason_decode` with a raw
//! producer (the broker's own client settings, so the mock's bootstrap on the
//! mock cluster): one record with `ce_specversion: 0.3`. That case runs on
//! both partition counts, on tansu and on the mock cluster.
//!
//! For `shutdown_then_disconnect_settles_everything` each harness opens its
//! second handle ([`BrokerHarness::reconnect`]) as a new `KafkaBroker` with
//! the harness broker's configuration (on the mock, the same mock cluster;
//! on tansu wrapped in `OnTansu` like the harness's own). That case runs on
//! both partition counts, on tansu and on the mock cluster.
//!
//! Each harness names its consumer groups uniquely (`<uuid>.<group>`): a
//! Kafka group spans topics, so tests sharing a group name would rebalance
//! each other. On tansu, sources close through `support::close_on_tansu`.

mod support;

use std::time::Duration;

use postbox_core::{AnyBroker, Error, ErrorKind, SubscribeOptions};
use postbox_kafka::rdkafka::message::{Header, OwnedHeaders};
use postbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use postbox_kafka::KafkaBroker;
use postbox_testkit::{env, BrokerHarness};
use support::{testkit_capabilities, MockKafka, OnTansu};

/// One `#[tokio::test]` per conformance test; the tansu variant prints a skip
/// by name (or fails under `CI`/`POSTBOX_REQUIRE_BROKERS`) when the broker is
/// not reachable.
macro_rules! kafka_conformance {
    ($make:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = $make(stringify!($name)).await else { return };
                postbox_testkit::run_one(&harness, stringify!($name), |h| {
                    Box::pin(postbox_testkit::suite::$name(h))
                })
                .await;
            }
        )*
    };
    ($make:path) => {
        postbox_testkit::for_each_conformance_test!(kafka_conformance!($make));
    };
}

/// Groups `<uuid>.<group>`: unique to this harness.
fn unique_groups(harness: BrokerHarness) -> BrokerHarness {
    let prefix = env::unique("g");
    harness.options(move |group| SubscribeOptions::group(format!("{prefix}.{group}")))
}

/// Installs the harness's writer of undecodable input: a raw producer with
/// `broker`'s client settings writes one record that claims to be a
/// CloudEvent in binary mode but has `ce_specversion: 0.3`, key `k` (the key
/// of the suite's `order`s), and returns its value.
fn undecodable(harness: BrokerHarness, broker: &KafkaBroker) -> BrokerHarness {
    let config = broker.config().client_config().clone();
    harness.undecodable(move |topic: String| {
        let config = config.clone();
        Box::pin(async move {
            let other = |e: String| Error::new(ErrorKind::Other, e);
            let producer: FutureProducer = config
                .create()
                .map_err(|e| other(format!("raw producer: {e}")))?;
            let id = env::unique("undecodable");
            let body = format!(r#"{{"undecodable":"{id}"}}"#).into_bytes();
            let headers = [
                ("ce_specversion", "0.3"),
                ("ce_id", id.as_str()),
                ("ce_type", "test.undecodable"),
                ("ce_source", "postbox-testkit"),
                ("content-type", "application/json"),
            ]
            .into_iter()
            .fold(OwnedHeaders::new(), |hs, (key, value)| {
                hs.insert(Header {
                    key,
                    value: Some(value),
                })
            });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key("k")
                        .payload(&body)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| other(format!("raw produce to {topic}: {e}")))?;
            Ok(body)
        })
    })
}

/// Installs the harness's second handle: a new [`KafkaBroker`] connected with
/// `broker`'s configuration (its own producer and clients), made a handle by
/// `wrap` (on tansu [`OnTansu`], as the harness's own).
fn reconnect(
    harness: BrokerHarness,
    broker: &KafkaBroker,
    wrap: fn(KafkaBroker) -> AnyBroker,
) -> BrokerHarness {
    let config = broker.config().clone();
    harness.reconnect(move || {
        let config = config.clone();
        Box::pin(async move { KafkaBroker::connect(config).await.map(wrap) })
    })
}

async fn tansu(test: &'static str, partitions: i32) -> Option<BrokerHarness> {
    let kafka = support::tansu_or_skip(test, partitions).await?;
    let caps = testkit_capabilities(&kafka.broker, partitions);
    let name = if partitions == 1 {
        "kafka-tansu-1p"
    } else {
        "kafka-tansu"
    };
    let harness = BrokerHarness::new(name, OnTansu(kafka.broker.clone()), caps);
    let harness = reconnect(harness, &kafka.broker, |b| AnyBroker::new(OnTansu(b)));
    Some(unique_groups(undecodable(harness, &kafka.broker)))
}

/// The mock cluster has no CreateTopics: a test's topology is created on the
/// mock when the topic is named, and the broker's provisioning finds it.
async fn mock(partitions: i32) -> Option<BrokerHarness> {
    let kafka = support::mock(partitions, |c| c).await;
    let caps = testkit_capabilities(&kafka.broker, partitions);
    let mock: std::sync::Arc<MockKafka> = kafka.mock.expect("a mock cluster");
    let broker: KafkaBroker = kafka.broker;
    let naming = broker.clone();
    let writer = broker.clone();
    let harness = BrokerHarness::new("kafka-mock", broker, caps).topics(move |test| {
        let topic = env::unique(test);
        mock.create_topology(&naming, &topic, partitions)
            .expect("mock topics");
        topic
    });
    let harness = reconnect(harness, &writer, AnyBroker::new);
    Some(unique_groups(undecodable(harness, &writer)))
}

async fn tansu2(test: &'static str) -> Option<BrokerHarness> {
    tansu(test, 2).await
}

async fn tansu1(test: &'static str) -> Option<BrokerHarness> {
    tansu(test, 1).await
}

async fn mock2(_test: &'static str) -> Option<BrokerHarness> {
    mock(2).await
}

async fn mock1(_test: &'static str) -> Option<BrokerHarness> {
    mock(1).await
}

mod tansu {
    use super::*;
    kafka_conformance!(tansu2);
}

mod tansu_single_partition {
    use super::*;
    kafka_conformance!(tansu1;
        ordered_next_waits_for_ack,
        per_key_order_is_kept,
        release_leads_to_redelivery,
        retry_after_delay_is_honoured,
        undecodable_input_is_dead_lettered_with_reason_decode,
        shutdown_then_disconnect_settles_everything,
    );
}

mod mock_cluster_single_partition {
    use super::*;
    kafka_conformance!(mock1;
        ordered_next_waits_for_ack,
        per_key_order_is_kept,
        undecodable_input_is_dead_lettered_with_reason_decode,
        shutdown_then_disconnect_settles_everything,
    );
}

mod mock_cluster {
    use super::*;
    kafka_conformance!(mock2);
}
