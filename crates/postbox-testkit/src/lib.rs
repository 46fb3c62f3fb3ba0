//! # postbox-testkit
//!
//! * The **conformance suite**: one set of behavioural tests every adapter runs
//!   against a real broker through a [`Harness`] (delivery, ordering, fan-out,
//!   competing consumers, redelivery, close/reopen without loss, retries with
//!   delays, attempts, dead-lettering with metadata, decode failures,
//!   undecodable input written raw ([`Harness::publish_undecodable`]),
//!   idempotency, graceful shutdown, settled shutdown then disconnect with
//!   messages in flight ([`Harness::reconnect`]), binary payloads, limits).
//!   Tests an adapter cannot run are skipped *by capability*, and the skip is
//!   printed.
//! * [`HandlerSpy`]: a recording, scriptable handler for your own tests.
//!
//! * [`env`](mod@env): the shared test environment (broker reachability: skip by name,
//!   or fail under `CI` / `POSTBOX_REQUIRE_BROKERS=1`; fresh names).
//!
//! An adapter runs the suite through its broker handle ([`BrokerHarness`])
//! with one line in a test file:
//!
//! ```ignore
//! postbox_testkit::conformance_tests!(async {
//!     BrokerHarness::new("my-broker", MyBroker::connect(config).await.unwrap(), capabilities)
//! });
//! ```

pub mod env;
mod harness;
pub mod interop;
mod spy;
pub mod suite;

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;

pub use harness::{BrokerHarness, Capabilities, Harness};
pub use spy::{Behaviour, Call, HandlerSpy};
pub use suite::{TestResult, Verdict};

/// Runs one conformance test and panics with a clear message if it fails.
/// A skip is written straight to stderr so it shows even under capture.
pub async fn run_one<H, F>(harness: &H, test: &str, f: F)
where
    H: Harness,
    F: for<'a> FnOnce(&'a dyn Harness) -> Pin<Box<dyn Future<Output = TestResult> + Send + 'a>>,
{
    match f(harness).await {
        Ok(Verdict::Passed) => {}
        Ok(Verdict::Skipped(why)) => {
            let _ = writeln!(
                std::io::stderr(),
                "conformance[{}] {test}: SKIPPED ({why})",
                harness.name()
            );
        }
        Err(msg) => panic!("conformance[{}] {test} failed: {msg}", harness.name()),
    }
}

/// Calls `callback!(args; test_a, test_b, …)` with the name of every
/// conformance test, so an adapter that generates its own test functions
/// (another runtime, per-test set-up) never keeps a copy of the list that a
/// new suite test would silently miss.
///
/// ```ignore
/// macro_rules! suite { ($kind:expr; $($name:ident),*) => { /* one test per $name */ } }
/// postbox_testkit::for_each_conformance_test!(suite!(QueueKind::Quorum));
/// ```
#[macro_export]
macro_rules! for_each_conformance_test {
    (@conformance $make:expr) => {
        $crate::for_each_conformance_test!(@call [$crate::conformance_tests] (@each $make));
    };
    ($callback:ident ! ( $($args:tt)* )) => {
        $crate::for_each_conformance_test!(@call [$callback] ($($args)*));
    };
    (@call [$($callback:tt)*] ($($args:tt)*)) => {
        $($callback)*!($($args)*;
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
            undecodable_input_is_dead_lettered_with_reason_decode,
            panic_is_retried_and_the_consumer_survives,
            duplicates_are_suppressed_by_the_idempotency_layer,
            duplicates_in_flight_at_once_have_one_effect,
            graceful_shutdown_finishes_in_flight_handlers,
            shutdown_then_disconnect_settles_everything,
            headers_do_not_grow_across_retries,
            binary_payloads_round_trip,
            limits_are_typed_errors,
            publish_batch_reports_each_message,
            dead_letter_operations,
            in_flight_is_bounded_by_concurrency,
        );
    };
}

/// Generates one `#[tokio::test]` per conformance test, each with a fresh
/// harness from the given `async` expression.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::for_each_conformance_test!(@conformance $make);
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $make.await;
                $crate::run_one(&harness, stringify!($name), |h| Box::pin($crate::suite::$name(h))).await;
            }
        )*
    };
}
