//! The postbox conformance suite against tansu (the Kafka-protocol broker
//! `scripts/brokers.sh` runs; topics with 2 partitions so consumers of a
//! group can split them, plus the ordering tests on 1 partition) and against
//! librdkafka's in-process mock cluster.
//!
//! Skips, by capability: on 2 partitions the two tests of *global* publish
//! order (`ordered_next_waits_for_ack`, `per_key_order_is_kept`) — Kafka
//! orders per partition only; they run in the `*_single_partition` modules. On 1
//! partition `competing_consumers_split_the_work` (one partition has one
//! owner). `limits_are_typed_errors` runs (size limit = `message.max.bytes`).
//! The mock cluster runs the full suite on 2 partitions and the ordering
//! tests on 1.

mod support;

use support::{tansu_or_skip, KafkaHarness};

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

async fn tansu2(test: &'static str) -> Option<KafkaHarness> {
    tansu_or_skip(test, 2).await
}

async fn tansu1(test: &'static str) -> Option<KafkaHarness> {
    tansu_or_skip(test, 1).await
}

async fn mock2(_test: &'static str) -> Option<KafkaHarness> {
    Some(KafkaHarness::mock(2))
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
    );
}

async fn mock1(_test: &'static str) -> Option<KafkaHarness> {
    Some(KafkaHarness::mock(1))
}

mod mock_cluster_single_partition {
    use super::*;
    kafka_conformance!(mock1;
        ordered_next_waits_for_ack,
        per_key_order_is_kept,
    );
}

mod mock_cluster {
    use super::*;
    kafka_conformance!(mock2);
}
