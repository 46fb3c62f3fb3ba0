use std::future::Future;
use std::time::Duration;

use super::{Handler, HandlerError, HandlerResult, Layer};
use crate::envelope::Envelope;

/// Fails a handler that runs longer than a limit: transient, reason `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// A time-out of `limit`.
    pub fn new(limit: Duration) -> Self {
        TimeoutLayer { limit }
    }
}

impl<H> Layer<H> for TimeoutLayer {
    type Handler = Timeout<H>;
    fn layer(&self, inner: H) -> Timeout<H> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// The handler made by [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<H> {
    inner: H,
    limit: Duration,
}

impl<H: Handler> Handler for Timeout<H> {
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        let limit = self.limit;
        let fut = self.inner.handle(envelope);
        async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => Err(HandlerError::timeout(limit)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{handler_fn, Disposition, FailureReason, HandlerBuilder};

    #[tokio::test(start_paused = true)]
    async fn slow_handler_times_out_as_transient() {
        let handler = HandlerBuilder::new()
            .timeout(Duration::from_secs(1))
            .handler(handler_fn(|_env: Envelope| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            }));
        let err = handler.handle(&Envelope::new("t", "{}")).await.unwrap_err();
        assert_eq!(err.disposition(), Disposition::Transient);
        assert_eq!(err.reason(), FailureReason::Timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn fast_handler_is_untouched() {
        let handler = HandlerBuilder::new()
            .timeout(Duration::from_secs(1))
            .handler(handler_fn(|_env: Envelope| async { Ok(()) }));
        handler.handle(&Envelope::new("t", "{}")).await.unwrap();
    }
}
