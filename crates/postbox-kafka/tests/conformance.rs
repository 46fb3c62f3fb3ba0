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
        kafka_conformance!($make;
            publish_before_subscribe_receives_all,
            concurrent_publishers_lose_nothing,
            many_topics_stay_isolated,
            release_leads_to_redelivery,
            ordered_next_waits_for_ack,
            consumer_closed_mid_stream_loses_nothing,
            concurrent_subscribe_and_close_leave_things_working,
            repeated_nacks_neither_lose_nor_wedge,
            per_key_order_is_kept,
            concurrent_publish_then_close_loses_nothing,
            topic_routing_is_isolated,
            cancelled_subscription_stops_and_a_new_one_gets_the_rest,
            each_consumer_group_gets_every_message,
            competing_consumers_split_the_work,
            retry_after_delay_is_honoured,
            attempt_counter_increments,
            dead_letter_after_max_attempts_with_metadata,
            permanent_error_dead_letters_immediately,
            decode_failure_dead_letters_without_calling_the_handler,
            panic_is_retried_and_the_consumer_survives,
            duplicates_are_suppressed_by_the_idempotency_layer,
            duplicates_in_flight_at_once_have_one_effect,
            graceful_shutdown_finishes_in_flight_handlers,
            headers_do_not_grow_across_retries,
            binary_payloads_round_trip,
            limits_are_typed_errors,
            publish_batch_reports_each_message,
            dead_letter_operations,
            in_flight_is_bounded_by_concurrency,
        );
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
