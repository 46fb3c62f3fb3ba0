use std::future::Future;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use super::{Handler, HandlerError, HandlerResult};
use crate::envelope::{Envelope, TypedEnvelope};

/// A handler from a closure that takes the envelope by value.
///
/// ```
/// use postbox_core::{handler_fn, Envelope, HandlerError};
/// let h = handler_fn(|env: Envelope| async move {
///     if env.payload.is_empty() { Err(HandlerError::permanent("empty")) } else { Ok(()) }
/// });
/// # let _ = h;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FnHandler { f }
}

/// See [`handler_fn`].
#[derive(Debug, Clone)]
pub struct FnHandler<F> {
    f: F,
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        (self.f)(envelope.clone())
    }
}

/// A handler of typed payloads: the JSON payload is decoded into `T` before
/// the closure runs; a payload that does not decode fails permanently with
/// reason `decode` and the closure is never called.
///
/// ```
/// use postbox_core::{typed, TypedEnvelope};
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
/// let h = typed(|order: TypedEnvelope<Order>| async move {
///     println!("order {}", order.data.id);
///     Ok(())
/// });
/// # let _ = h;
/// ```
pub fn typed<T, F, Fut>(f: F) -> Typed<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(TypedEnvelope<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Typed { f, _t: PhantomData }
}

/// See [`typed`].
pub struct Typed<T, F> {
    f: F,
    _t: PhantomData<fn() -> T>,
}

impl<T, F, Fut> Handler for Typed<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(TypedEnvelope<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        let decoded = envelope.clone().into_typed::<T>();
        let fut = decoded.map(|typed| (self.f)(typed));
        async move {
            match fut {
                Ok(fut) => fut.await,
                Err(e) => Err(HandlerError::decode(e)),
            }
        }
    }
}
