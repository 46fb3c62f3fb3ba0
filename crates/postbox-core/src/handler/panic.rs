use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;

use super::{Handler, HandlerError, HandlerResult, Layer};
use crate::envelope::Envelope;

/// Catches a panic in the inner handler and turns it into a transient
/// [`HandlerError`] with reason `panic`, so it never kills the consumer.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanicLayer;

impl<H> Layer<H> for CatchPanicLayer {
    type Handler = CatchPanic<H>;
    fn layer(&self, inner: H) -> CatchPanic<H> {
        CatchPanic { inner }
    }
}

/// The handler made by [`CatchPanicLayer`].
#[derive(Debug, Clone)]
pub struct CatchPanic<H> {
    inner: H,
}

impl<H> CatchPanic<H> {
    /// Wraps `inner`.
    pub fn new(inner: H) -> Self {
        CatchPanic { inner }
    }
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl<H: Handler> Handler for CatchPanic<H> {
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        // A panic while *creating* the future is caught too.
        let fut = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.handle(envelope)));
        async move {
            match fut {
                Ok(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(result) => result,
                    Err(payload) => Err(HandlerError::panic(panic_message(&*payload))),
                },
                Err(payload) => Err(HandlerError::panic(panic_message(&*payload))),
            }
        }
    }
}
