use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use super::{Handler, HandlerError, HandlerResult, Layer};
use crate::envelope::Envelope;
use crate::error::{BoxError, Error, ErrorKind};

type UpcastFn = Arc<dyn Fn(Envelope) -> Result<Envelope, BoxError> + Send + Sync>;

/// Most upcasting steps applied to one message (guards against cycles).
const MAX_STEPS: usize = 32;

/// A chain of upcasters keyed by (type, schema version).
///
/// Each step turns a message of one schema version into the next; the chain
/// applies steps until none matches. A message without a schema version has
/// version `""`.
///
/// ```
/// use postbox_core::{Envelope, Upcasters};
/// let upcasters = Upcasters::new().json("order.placed", "1", "2", |mut v| {
///     // v1 called it `total`, v2 calls it `amount`
///     let total = v.as_object_mut().and_then(|o| o.remove("total")).unwrap_or_default();
///     v["amount"] = total;
///     Ok(v)
/// });
/// let old = Envelope::builder("order.placed").schema_version("1").payload(r#"{"total":5}"#).build();
/// let new = upcasters.apply(&old).unwrap().into_owned();
/// assert_eq!(new.schema_version.as_deref(), Some("2"));
/// assert_eq!(&new.payload[..], br#"{"amount":5}"#);
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, String), (String, UpcastFn)>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upcasters")
            .field("steps", &self.steps.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Upcasters {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a step from `from` to `to` for `event_type` on the whole envelope.
    pub fn step<F>(mut self, event_type: &str, from: &str, to: &str, f: F) -> Self
    where
        F: Fn(Envelope) -> Result<Envelope, BoxError> + Send + Sync + 'static,
    {
        self.steps.insert(
            (event_type.to_string(), from.to_string()),
            (to.to_string(), Arc::new(f)),
        );
        self
    }

    /// Adds a step that rewrites the JSON payload.
    pub fn json<F>(self, event_type: &str, from: &str, to: &str, f: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync + 'static,
    {
        self.step(event_type, from, to, move |mut env| {
            let value: serde_json::Value = serde_json::from_slice(&env.payload)?;
            env.payload = serde_json::to_vec(&f(value)?)?.into();
            Ok(env)
        })
    }

    fn find(&self, env: &Envelope) -> Option<&(String, UpcastFn)> {
        if self.steps.is_empty() {
            return None;
        }
        let version = env.schema_version.as_deref().unwrap_or("");
        self.steps
            .get(&(env.event_type.to_string(), version.to_string()))
    }

    /// Brings `env` to the newest known version; borrowed when nothing applies.
    pub fn apply<'a>(&self, env: &'a Envelope) -> Result<Cow<'a, Envelope>, Error> {
        if self.find(env).is_none() {
            return Ok(Cow::Borrowed(env));
        }
        let mut current = env.clone();
        for _ in 0..MAX_STEPS {
            let Some((to, f)) = self.find(&current) else {
                return Ok(Cow::Owned(current));
            };
            let from = current.schema_version.as_deref().unwrap_or("").to_string();
            let to = to.clone();
            current = f(current).map_err(|e| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "upcasting {} from schema version {from:?} to {to:?} failed",
                        env.event_type
                    ),
                )
                .with_source(e)
            })?;
            current.schema_version = Some(Cow::Owned(to));
        }
        Err(Error::new(
            ErrorKind::Decode,
            format!(
                "upcasting {} did not settle after {MAX_STEPS} steps (a cycle in the chain?)",
                env.event_type
            ),
        ))
    }
}

/// Upcasts every message before the inner handler sees it; an upcast failure
/// is permanent with reason `decode`, and the inner handler is not called.
#[derive(Debug, Clone)]
pub struct UpcastLayer {
    upcasters: Arc<Upcasters>,
}

impl UpcastLayer {
    /// A layer applying `upcasters`.
    pub fn new(upcasters: Upcasters) -> Self {
        UpcastLayer {
            upcasters: Arc::new(upcasters),
        }
    }
}

impl<H> Layer<H> for UpcastLayer {
    type Handler = Upcast<H>;
    fn layer(&self, inner: H) -> Upcast<H> {
        Upcast {
            inner,
            upcasters: self.upcasters.clone(),
        }
    }
}

/// The handler made by [`UpcastLayer`].
#[derive(Debug, Clone)]
pub struct Upcast<H> {
    inner: H,
    upcasters: Arc<Upcasters>,
}

impl<H: Handler> Handler for Upcast<H> {
    #[allow(clippy::manual_async_fn)]
    fn handle(&self, envelope: &Envelope) -> impl Future<Output = HandlerResult> + Send {
        async move {
            match self.upcasters.apply(envelope) {
                Ok(Cow::Borrowed(env)) => self.inner.handle(env).await,
                Ok(Cow::Owned(env)) => self.inner.handle(&env).await,
                Err(e) => Err(HandlerError::decode(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{handler_fn, Disposition, FailureReason, HandlerBuilder};

    fn v1() -> Envelope {
        Envelope::builder("order.placed")
            .schema_version("1")
            .payload(r#"{"total":5}"#)
            .build()
    }

    #[tokio::test]
    async fn chain_applies_every_step_before_the_handler() {
        let upcasters = Upcasters::new()
            .json("order.placed", "1", "2", |mut v| {
                v["step1"] = true.into();
                Ok(v)
            })
            .json("order.placed", "2", "3", |mut v| {
                v["step2"] = true.into();
                Ok(v)
            });
        let handler = HandlerBuilder::new().upcast(upcasters).handler(handler_fn(
            |env: Envelope| async move {
                assert_eq!(env.schema_version.as_deref(), Some("3"));
                let v: serde_json::Value = serde_json::from_slice(&env.payload).unwrap();
                assert_eq!(
                    v,
                    serde_json::json!({"total": 5, "step1": true, "step2": true})
                );
                Ok(())
            },
        ));
        handler.handle(&v1()).await.unwrap();
    }

    #[tokio::test]
    async fn failing_step_is_a_permanent_decode_error_and_skips_the_handler() {
        let upcasters =
            Upcasters::new().step("order.placed", "1", "2", |_| Err("field missing".into()));
        let handler =
            HandlerBuilder::new()
                .upcast(upcasters)
                .handler(handler_fn(|_env: Envelope| async {
                    panic!("must not run")
                }));
        let err = handler.handle(&v1()).await.unwrap_err();
        assert_eq!(err.disposition(), Disposition::Permanent);
        assert_eq!(err.reason(), FailureReason::Decode);
        assert!(
            err.message().contains("from schema version \"1\" to \"2\""),
            "{}",
            err.message()
        );
    }

    #[test]
    fn a_cycle_is_an_error_not_a_hang() {
        let upcasters = Upcasters::new()
            .step("t", "1", "2", Ok)
            .step("t", "2", "1", Ok);
        let env = Envelope::builder("t").schema_version("1").build();
        assert_eq!(
            upcasters.apply(&env).unwrap_err().kind(),
            &ErrorKind::Decode
        );
    }

    #[test]
    fn other_types_pass_through_borrowed() {
        let upcasters = Upcasters::new().step("t", "1", "2", Ok);
        let env = Envelope::builder("other").schema_version("1").build();
        assert!(matches!(upcasters.apply(&env).unwrap(), Cow::Borrowed(_)));
    }
}
