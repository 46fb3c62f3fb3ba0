//! Dead-letter operations on the in-memory broker.

use async_trait::async_trait;
use postbox_core::dlq::{prepare_replay, DeadLetterOps, ReplayFilter, ReplayReport};
use postbox_core::{Envelope, Error, ErrorKind, Publisher};

use crate::broker::MemoryBroker;

#[async_trait]
impl DeadLetterOps for MemoryBroker {
    async fn count(&self, dlq: &str) -> Result<u64, Error> {
        Ok(self
            .existing_queue(dlq)
            .map(|q| q.depth() as u64)
            .unwrap_or(0))
    }

    async fn peek(&self, dlq: &str, limit: usize) -> Result<Vec<Envelope>, Error> {
        Ok(self
            .existing_queue(dlq)
            .map(|q| q.peek(limit))
            .unwrap_or_default())
    }

    async fn replay(
        &self,
        dlq: &str,
        filter: ReplayFilter<'_>,
        limit: usize,
    ) -> Result<ReplayReport, Error> {
        let queue = self.existing_queue(dlq)?;
        let (taken, skipped) = queue.take_matching(filter, limit);
        let mut report = ReplayReport {
            replayed: 0,
            skipped,
        };
        let mut failures = Vec::new();
        for env in taken {
            let Some((origin, replay)) = prepare_replay(env.clone()) else {
                // No origin: it stays in the DLQ.
                queue.push(env);
                report.skipped += 1;
                continue;
            };
            match self.publish(&origin, replay).await {
                Ok(()) => report.replayed += 1,
                Err(e) => {
                    queue.push(env);
                    failures.push(e.error);
                }
            }
        }
        match failures.into_iter().next() {
            Some(first) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "replay stopped short: {} messages replayed; the rest stay in {dlq:?}",
                    report.replayed
                ),
            )
            .with_source(first)),
            None => Ok(report),
        }
    }

    async fn purge(&self, dlq: &str) -> Result<u64, Error> {
        Ok(self
            .existing_queue(dlq)
            .map(|q| q.purge() as u64)
            .unwrap_or(0))
    }
}
