//! Consuming: the source of a queue and its deliveries.

use std::sync::Arc;

use postbox_core::{
    Delivery, Envelope, Error, ErrorKind, Origin, Retry, SettleError, SettleResult, Source,
};

use crate::broker::SYSTEM;
use crate::queue::{Pop, Queue, Stored};

/// Deliveries of one queue. Several sources on one queue compete.
#[derive(Debug)]
pub struct MemorySource {
    queue: Arc<Queue>,
}

impl MemorySource {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        MemorySource { queue }
    }

    /// The next delivery if one is ready now, without waiting.
    pub fn try_next(&mut self) -> Option<MemoryDelivery> {
        match self.queue.pop() {
            Pop::Got { tag, stored } => Some(MemoryDelivery::new(self.queue.clone(), tag, stored)),
            Pop::Empty { .. } => None,
        }
    }
}

impl Source for MemorySource {
    type Delivery = MemoryDelivery;

    async fn next(&mut self) -> Option<Result<MemoryDelivery, Error>> {
        // Fast path: a message is ready, no need to register for a wake-up.
        if let Pop::Got { tag, stored } = self.queue.pop() {
            return Some(Ok(MemoryDelivery::new(self.queue.clone(), tag, stored)));
        }
        loop {
            // Register before looking again, so a push in between is not missed.
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The popped value is not kept across the wait below (a match
            // scrutinee would be), which keeps this future small and cheap to move.
            let wake_at = match self.queue.pop() {
                Pop::Got { tag, stored } => {
                    return Some(Ok(MemoryDelivery::new(self.queue.clone(), tag, stored)));
                }
                Pop::Empty { wake_at } => wake_at,
            };
            match wake_at {
                Some(at) => {
                    // Boxed: a timer is large and only this rare wait needs one.
                    let timer = Box::pin(tokio::time::sleep_until(at));
                    tokio::select! {
                        _ = notified => {}
                        _ = timer => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn system(&self) -> &'static str {
        SYSTEM
    }

    fn destination(&self) -> &str {
        &self.queue.name
    }
}

/// A message handed to one consumer.
///
/// Dropping it unsettled gives it back: at once on a queue without a
/// visibility timeout (like a closed AMQP channel), after the timeout on one
/// with (like SQS).
#[derive(Debug)]
pub struct MemoryDelivery {
    queue: Arc<Queue>,
    tag: u64,
    stored: Option<Stored>,
}

impl MemoryDelivery {
    fn new(queue: Arc<Queue>, tag: u64, mut stored: Stored) -> Self {
        // The broker's own receive count is the attempt number.
        stored.envelope.attempt = stored.receive_count;
        MemoryDelivery {
            queue,
            tag,
            stored: Some(stored),
        }
    }

    fn stored(&self) -> &Stored {
        self.stored
            .as_ref()
            .expect("a delivery holds its message until settled")
    }

    fn expired(self) -> SettleError<Self> {
        let error = Error::new(
            ErrorKind::Settle,
            format!(
                "the receipt of message {} expired (visibility timeout); it was redelivered",
                self.stored().envelope.id
            ),
        );
        SettleError::new(error, self)
    }
}

impl Delivery for MemoryDelivery {
    fn envelope(&self) -> &Envelope {
        &self.stored().envelope
    }

    fn attempt(&self) -> u32 {
        self.stored().receive_count
    }

    fn origin(&self) -> Origin {
        Origin {
            destination: self.queue.name.clone(),
            partition: None,
            offset: None,
        }
    }

    async fn ack(mut self) -> SettleResult<Self> {
        if self.queue.ack(self.tag, &self.stored().envelope) {
            // Settled: dropped in place (no move), so `Drop` gives nothing back.
            self.stored = None;
            Ok(())
        } else {
            Err(self.expired())
        }
    }

    async fn retry(mut self, retry: Retry) -> SettleResult<Self> {
        if let Err(e) = self.queue.limits.check_visibility(retry.delay) {
            return Err(SettleError::new(e, self));
        }
        let mut stored = self.stored.take().expect("unsettled");
        retry.apply(&mut stored.envelope);
        let envelope = stored.envelope.clone();
        if self.queue.retry_later(self.tag, stored, retry.delay) {
            Ok(())
        } else {
            self.stored = Some(Stored {
                envelope,
                receive_count: 0,
            });
            Err(self.expired())
        }
    }

    async fn release(mut self) -> SettleResult<Self> {
        let stored = self.stored.take().expect("unsettled");
        let copy = stored.envelope.clone();
        let count = stored.receive_count;
        if self.queue.requeue(self.tag, stored) {
            Ok(())
        } else {
            self.stored = Some(Stored {
                envelope: copy,
                receive_count: count,
            });
            Err(self.expired())
        }
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if let Some(stored) = self.stored.take() {
            if self.queue.options.visibility_timeout.is_none() {
                // Like a closed channel: the unsettled message goes back.
                self.queue.requeue(self.tag, stored);
            }
            // With a visibility timeout it reappears when the timeout expires.
        }
    }
}
