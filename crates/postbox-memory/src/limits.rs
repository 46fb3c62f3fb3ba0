//! Limit profiles: make the in-memory broker reject what a real broker would.

use std::time::Duration;

use postbox_core::{codec, dlq, Envelope, Error, Limit};

/// The limits a broker enforces. [`Limits::none`] is the default; use
/// [`Limits::sqs`] so tests on the memory broker fail where SQS would.
///
/// ```
/// use postbox_memory::{Limits, MemoryBroker};
/// let broker = MemoryBroker::with_limits(Limits::sqs());
/// # let _ = broker;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Limits {
    /// Largest message, measured as the structured CloudEvents JSON body.
    pub max_body_bytes: Option<usize>,
    /// Most message attributes: one for `type` plus one per user header
    /// (postbox's own `dlq…` / `retry…` metadata travels in the body).
    pub max_attributes: Option<usize>,
    /// Longest delivery delay.
    pub max_delay: Option<Duration>,
    /// Longest visibility timeout, i.e. the longest retry delay.
    pub max_visibility: Option<Duration>,
    /// Queues whose name ends in `.fifo` are FIFO queues (SQS naming rule).
    pub fifo_by_name: bool,
}

impl Limits {
    /// No limits.
    pub fn none() -> Self {
        Limits::default()
    }

    /// Amazon SQS: 10 message attributes, 1 MiB body, 15-minute delay,
    /// 12-hour visibility, `.fifo` queues with group and de-duplication rules.
    pub fn sqs() -> Self {
        Limits {
            max_body_bytes: Some(1024 * 1024),
            max_attributes: Some(10),
            max_delay: Some(Duration::from_secs(15 * 60)),
            max_visibility: Some(Duration::from_secs(12 * 3600)),
            fifo_by_name: true,
        }
    }

    /// Checks a message about to be published.
    pub(crate) fn check_message(&self, env: &Envelope) -> Result<(), Error> {
        if let Some(max) = self.max_attributes {
            let actual = 1 + env.headers.keys().filter(|k| !dlq::is_metadata(k)).count();
            if actual > max {
                return Err(Error::limit(Limit::AttributeCount { max, actual }));
            }
        }
        if let Some(max) = self.max_body_bytes {
            // Cheap bound first: the body is at least the payload.
            let actual = if env.payload.len() > max {
                env.payload.len()
            } else {
                codec::structured::encode(env)?.len()
            };
            if actual > max {
                return Err(Error::limit(Limit::BodySize { max, actual }));
            }
        }
        Ok(())
    }

    pub(crate) fn check_delay(&self, requested: Duration) -> Result<(), Error> {
        match self.max_delay {
            Some(max) if requested > max => Err(Error::limit(Limit::Delay { max, requested })),
            _ => Ok(()),
        }
    }

    pub(crate) fn check_visibility(&self, requested: Duration) -> Result<(), Error> {
        match self.max_visibility {
            Some(max) if requested > max => Err(Error::limit(Limit::Visibility { max, requested })),
            _ => Ok(()),
        }
    }
}
