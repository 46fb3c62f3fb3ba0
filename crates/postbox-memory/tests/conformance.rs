//! The postbox conformance suite on the in-memory broker, through the
//! `Broker` trait, twice: with no limits (RabbitMQ-like: unsettled deliveries
//! return when dropped) and with the SQS profile (limits, a visibility
//! timeout).
//!
//! Skips, by capability: `undecodable_input_is_dead_lettered_with_reason_decode`
//! on both — the memory broker carries envelopes, never bytes, so there is no
//! wire format to break and no undecodable input to write (the harness
//! installs no `publish_undecodable` hook); and `limits_are_typed_errors`
//! without limits (the first harness).
//!
//! No second handle ([`BrokerHarness::reconnect`]): the broker is in-process,
//! with no connection to drop, so `shutdown_then_disconnect_settles_everything`
//! runs through the harness itself.

use std::time::Duration;

use postbox_core::Broker;
use postbox_memory::{Limits, MemoryBroker, QueueOptions};
use postbox_testkit::{BrokerHarness, Capabilities};

fn harness(name: &'static str, broker: MemoryBroker) -> BrokerHarness {
    let declared = broker.capabilities();
    let mut caps = Capabilities::all(Duration::from_millis(250));
    caps.header_limit = declared.max_headers;
    caps.size_limit = declared.max_message_bytes;
    BrokerHarness::new(name, broker, caps)
}

mod memory {
    use super::*;
    postbox_testkit::conformance_tests!(async { harness("memory", MemoryBroker::new()) });
}

mod memory_sqs {
    use super::*;
    postbox_testkit::conformance_tests!(async {
        let broker = MemoryBroker::with_limits(Limits::sqs()).with_queue_defaults(
            QueueOptions::default().visibility_timeout(Duration::from_secs(30)),
        );
        harness("memory-sqs", broker)
    });
}
