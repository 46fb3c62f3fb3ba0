//! Handlers and the middleware around them.
//!
//! A [`Handler`] is an async function of an envelope that returns
//! `Ok(())` or a classified [`HandlerError`]. Middleware are [`Layer`]s that
//! wrap a handler in another handler, composed with [`HandlerBuilder`] the way
//! tower composes services: decode → upcast → idempotency → timeout → handler.

mod error;
mod panic;
mod telemetry;
mod timeout;
mod typed;
mod upcast;

use std::future::Future;
use std::sync::Arc;

pub use error::{Disposition, FailureReason, HandlerError, HandlerResult, ResultExt};
pub use panic::{CatchPanic, CatchPanicLayer};
pub use telemetry::{Telemetry, TelemetryLayer};
pub use timeout::{Timeout, TimeoutLayer};
pub use typed::{handler_fn, typed, FnHandler, Typed};
pub use upcast::{Upcast, UpcastLayer, Upcasters};

use crate::envelope::Envelope;

/// Processes one message.
///
/// Implement it for your own types, or use [`handler_fn`] / [`typed`] for
/// closures.
///
/// ```
/// use postbox_core::{Envelope, Handler, HandlerError, HandlerResult};
/// struct Audit;
/// impl Handler for Audit {
///     async fn handle(&self, env: &Envelope) -> HandlerResult {
///         if env.payload.is_empty() {
///             return Err(HandlerError::permanent("empty payload"));
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles one envelope.
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send;
}

impl<H: Handler> Handler for Arc<H> {
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        (**self).handle(envelope)
    }
}

/// Wraps a handler in another one (tower's `Layer`, for handlers).
pub trait Layer<H> {
    /// The wrapped handler.
    type Handler;
    /// Wraps `inner`.
    fn layer(&self, inner: H) -> Self::Handler;
}

/// The layer that wraps nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl<H> Layer<H> for Identity {
    type Handler = H;
    fn layer(&self, inner: H) -> H {
        inner
    }
}

/// Two layers, `outer` around `inner`.
#[derive(Debug, Clone)]
pub struct Stack<Inner, Outer> {
    inner: Inner,
    outer: Outer,
}

impl<H, Inner: Layer<H>, Outer: Layer<Inner::Handler>> Layer<H> for Stack<Inner, Outer> {
    type Handler = Outer::Handler;
    fn layer(&self, h: H) -> Self::Handler {
        self.outer.layer(self.inner.layer(h))
    }
}

/// Composes layers around a handler; the first layer added is the outermost.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::{handler_fn, HandlerBuilder, Envelope};
/// let handler = HandlerBuilder::new()
///     .timeout(Duration::from_secs(5))
///     .handler(handler_fn(|_env: Envelope| async { Ok(()) }));
/// # let _ = handler;
/// ```
#[derive(Debug, Clone, Default)]
pub struct HandlerBuilder<L = Identity> {
    layer: L,
}

impl HandlerBuilder<Identity> {
    /// An empty stack.
    pub fn new() -> Self {
        HandlerBuilder { layer: Identity }
    }
}

impl<L> HandlerBuilder<L> {
    /// Adds a layer inside the ones added before.
    pub fn layer<T>(self, layer: T) -> HandlerBuilder<Stack<T, L>> {
        HandlerBuilder {
            layer: Stack {
                inner: layer,
                outer: self.layer,
            },
        }
    }

    /// Adds a [`TimeoutLayer`].
    pub fn timeout(self, limit: std::time::Duration) -> HandlerBuilder<Stack<TimeoutLayer, L>> {
        self.layer(TimeoutLayer::new(limit))
    }

    /// Adds an [`UpcastLayer`].
    pub fn upcast(self, upcasters: Upcasters) -> HandlerBuilder<Stack<UpcastLayer, L>> {
        self.layer(UpcastLayer::new(upcasters))
    }

    /// Adds a [`CatchPanicLayer`] (the consumer runtime always adds one outermost).
    pub fn catch_panic(self) -> HandlerBuilder<Stack<CatchPanicLayer, L>> {
        self.layer(CatchPanicLayer)
    }

    /// Wraps `handler` in the layers.
    pub fn handler<H>(self, handler: H) -> L::Handler
    where
        L: Layer<H>,
    {
        self.layer.layer(handler)
    }
}
