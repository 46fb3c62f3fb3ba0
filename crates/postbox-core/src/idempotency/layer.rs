use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Claim, IdempotencyStore};
use crate::envelope::Envelope;
use crate::handler::{Handler, HandlerError, HandlerResult, Layer};

/// Computes the idempotency key of a message (default: its id).
pub type KeyFn = Arc<dyn Fn(&Envelope) -> String + Send + Sync>;

/// Runs the handler at most once per key.
///
/// A duplicate of a completed message is acked without running the handler
/// (and counted in `postbox_duplicates_skipped_total`); a copy that arrives
/// while another is in flight is retried after the other's lease, so if the
/// first copy fails the second still gets processed.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use postbox_core::{HandlerBuilder, IdempotencyLayer, MemoryIdempotencyStore, handler_fn, Envelope};
/// let store = Arc::new(MemoryIdempotencyStore::new(100_000));
/// let handler = HandlerBuilder::new()
///     .layer(IdempotencyLayer::new(store).lease(Duration::from_secs(60)))
///     .handler(handler_fn(|_env: Envelope| async { Ok(()) }));
/// # let _ = handler;
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    store: Arc<dyn IdempotencyStore>,
    key: Option<KeyFn>,
    lease: Duration,
    retention: Duration,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// Claims message ids in `store`; lease 30 s, retention 24 h.
    pub fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        IdempotencyLayer {
            store,
            key: None,
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
        }
    }

    /// Uses `f` instead of the message id as the key.
    pub fn key_fn<F: Fn(&Envelope) -> String + Send + Sync + 'static>(mut self, f: F) -> Self {
        self.key = Some(Arc::new(f));
        self
    }

    /// How long a claim holds without completion (keep it above the handler time-out).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a completed key is remembered.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }
}

impl<H> Layer<H> for IdempotencyLayer {
    type Handler = Idempotent<H>;
    fn layer(&self, inner: H) -> Idempotent<H> {
        Idempotent {
            inner,
            config: self.clone(),
        }
    }
}

/// The handler made by [`IdempotencyLayer`].
pub struct Idempotent<H> {
    inner: H,
    config: IdempotencyLayer,
}

/// Smallest wait before retrying a copy whose twin is in flight.
const MIN_IN_FLIGHT_WAIT: Duration = Duration::from_millis(50);

impl<H: Handler> Handler for Idempotent<H> {
    #[allow(clippy::manual_async_fn)]
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        async move {
            let c = &self.config;
            let key = match &c.key {
                Some(f) => f(envelope),
                None => envelope.id.to_string(),
            };
            let claim = c
                .store
                .claim(&key, c.lease)
                .await
                .map_err(HandlerError::transient)?;
            match claim {
                Claim::AlreadyDone => {
                    crate::telemetry::duplicate_skipped();
                    tracing::debug!(key = %key, "duplicate skipped");
                    Ok(())
                }
                Claim::InFlight { remaining } => Err(HandlerError::retry_after(
                    remaining.max(MIN_IN_FLIGHT_WAIT),
                    format!("message {key} is being processed by another consumer"),
                )),
                Claim::Acquired(lease) => match self.inner.handle(envelope).await {
                    Ok(()) => c
                        .store
                        .complete(&lease, c.retention)
                        .await
                        .map_err(HandlerError::transient),
                    Err(e) => {
                        if let Err(release) = c.store.release(&lease).await {
                            tracing::warn!(key = %key, error = %release, "releasing an idempotency lease failed; it will expire");
                        }
                        Err(e)
                    }
                },
            }
        }
    }
}
