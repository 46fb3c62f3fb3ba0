//! Configuration: the AWS clients (injected or from the standard chain),
//! destination addressing and consumer options.
//!
//! # Addressing
//!
//! One [`SqsBroker`](crate::SqsBroker) publishes to SQS queues and SNS topics;
//! the destination string says which:
//!
//! | destination | meaning |
//! |---|---|
//! | `orders`, `sqs:orders` | the SQS queue `orders` (URL resolved once and cached) |
//! | `https://sqs.…/123456789012/orders` | the SQS queue at that URL |
//! | `orders.fifo` | the FIFO queue `orders.fifo` |
//! | `sns:orders` | the SNS topic `orders` (ARN resolved once and cached) |
//! | `arn:aws:sns:…:orders` | the SNS topic with that ARN |
//!
//! SQS queue names may not contain dots (except the `.fifo` suffix), so a
//! queue name is normalised: dots become `-` and a `.fifo` anywhere moves to
//! the end. The conventional dead-letter destination `<queue>.dlq` is thus the
//! queue `<queue>-dlq`, and `orders.fifo.dlq` is `orders-dlq.fifo`.

use std::time::Duration;

use postbox_core::envelope::Text;

/// What a destination string addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An SQS queue: a normalised name, or a URL.
    Queue(String),
    /// An SNS topic: a name or an ARN.
    Topic(String),
}

impl Destination {
    /// Parses a destination string (see the [module docs](self)).
    pub fn parse(destination: &str) -> Destination {
        if let Some(topic) = destination.strip_prefix("sns:") {
            Destination::Topic(topic.to_string())
        } else if destination.starts_with("arn:") && destination.contains(":sns:") {
            Destination::Topic(destination.to_string())
        } else {
            let queue = destination.strip_prefix("sqs:").unwrap_or(destination);
            Destination::Queue(queue_name(queue))
        }
    }

    /// Whether the queue or topic is FIFO (its name ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        match self {
            Destination::Queue(q) | Destination::Topic(q) => q.ends_with(".fifo"),
        }
    }
}

/// Normalises an SQS queue name (URLs are kept): dots become `-`, and a
/// `.fifo` anywhere in the name becomes the suffix.
///
/// ```
/// use postbox_sqs::queue_name;
/// assert_eq!(queue_name("orders.dlq"), "orders-dlq");
/// assert_eq!(queue_name("orders.fifo.dlq"), "orders-dlq.fifo");
/// assert_eq!(queue_name("orders.fifo"), "orders.fifo");
/// ```
pub fn queue_name(name: &str) -> String {
    if is_url(name) {
        return name.to_string();
    }
    let fifo = name.ends_with(".fifo") || name.contains(".fifo.");
    let base = if fifo {
        name.replace(".fifo.", ".")
            .trim_end_matches(".fifo")
            .to_string()
    } else {
        name.to_string()
    };
    let mut out = base.replace('.', "-");
    if fifo {
        out.push_str(".fifo");
    }
    out
}

pub(crate) fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

/// The queue name of a URL or a name.
pub(crate) fn name_of(queue: &str) -> &str {
    if is_url(queue) {
        queue.rsplit('/').next().unwrap_or(queue)
    } else {
        queue
    }
}

/// How a FIFO destination's `MessageDeduplicationId` is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FifoDeduplication {
    /// The envelope id (default): a republished envelope is dropped by SQS/SNS
    /// within the 5-minute de-duplication window.
    #[default]
    EnvelopeId,
    /// No id is sent: the queue or topic must have content-based
    /// de-duplication enabled.
    ContentBased,
    /// A fresh id per send: every publish is delivered, duplicates included
    /// (leave de-duplication to the consumer's idempotency layer).
    PerSend,
}

/// Options of a consumer (a [`SqsSource`](crate::SqsSource)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Concurrent `ReceiveMessage` long polls (default 2).
    pub receivers: usize,
    /// Messages per receive, 1–10 (default 10).
    pub batch_size: i32,
    /// Long-polling wait, 0–20 s (default 20 s).
    pub wait_time: Duration,
    /// Visibility timeout asked for on receive, and what the heartbeat
    /// extends a slow handler's message to (default 30 s).
    pub visibility_timeout: Duration,
    /// Received messages buffered ahead of the runtime (default 10). The
    /// buffer is bounded: receivers wait when it is full.
    pub buffer: usize,
    /// The `type` of foreign messages (default `postbox.foreign`).
    pub foreign_type: Text,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            receivers: 2,
            batch_size: 10,
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(30),
            buffer: 10,
            foreign_type: Text::Borrowed(postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE),
        }
    }
}

impl ConsumerOptions {
    /// Sets the number of concurrent receivers (at least 1).
    ///
    /// An ack returns once SQS confirmed the delete, so a consumer worker is
    /// held for that round trip too: for throughput, give the consumer a
    /// concurrency of about twice `receivers × batch_size`.
    pub fn receivers(mut self, n: usize) -> Self {
        self.receivers = n.max(1);
        self
    }
    /// Sets the messages per receive (clamped to 1–10).
    pub fn batch_size(mut self, n: i32) -> Self {
        self.batch_size = n.clamp(1, 10);
        self
    }
    /// Sets the long-polling wait (clamped to 0–20 s, whole seconds).
    pub fn wait_time(mut self, wait: Duration) -> Self {
        self.wait_time = wait.min(Duration::from_secs(20));
        self
    }
    /// Sets the visibility timeout (at least 1 s, at most 12 h).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout =
            timeout.clamp(Duration::from_secs(1), crate::retry::MAX_VISIBILITY);
        self
    }
    /// Sets the bounded buffer size (at least 1).
    pub fn buffer(mut self, n: usize) -> Self {
        self.buffer = n.max(1);
        self
    }
    /// Sets the type of foreign messages.
    pub fn foreign_type(mut self, t: impl Into<Text>) -> Self {
        self.foreign_type = t.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("sns:orders"),
            Destination::Topic("orders".into())
        );
        assert_eq!(
            Destination::parse("arn:aws:sns:us-east-1:1:orders"),
            Destination::Topic("arn:aws:sns:us-east-1:1:orders".into())
        );
        assert_eq!(
            Destination::parse("orders.dlq"),
            Destination::Queue("orders-dlq".into())
        );
        assert_eq!(
            Destination::parse("sqs:a.fifo"),
            Destination::Queue("a.fifo".into())
        );
        assert!(Destination::parse("a.fifo.dlq").is_fifo());
        let url = "http://127.0.0.1:4566/000000000000/q.x";
        assert_eq!(Destination::parse(url), Destination::Queue(url.into()));
        assert_eq!(name_of(url), "q.x");
    }
}
