//! [`HandlerSpy`]: a handler that records what it sees and does what a test
//! tells it to, for your own tests and for the conformance suite.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postbox_core::{Envelope, Handler, HandlerError, HandlerResult};
use tokio::sync::Notify;

/// What the spy does with one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Behaviour {
    /// Succeed.
    Succeed,
    /// Fail transiently.
    FailTransient,
    /// Fail permanently.
    FailPermanent,
    /// Ask for a retry after this delay.
    RetryAfter(Duration),
    /// Panic.
    Panic,
    /// Sleep, then succeed.
    SleepThenSucceed(Duration),
}

type Script = Arc<dyn Fn(&Envelope, u32) -> Behaviour + Send + Sync>;

/// One call the spy saw.
#[derive(Debug, Clone)]
pub struct Call {
    /// The envelope as the handler received it.
    pub envelope: Envelope,
    /// How many times the spy had seen this id before (0 for the first call).
    pub seen_before: u32,
    /// When the call started.
    pub started: Instant,
    /// When the call finished (`None` while running).
    pub finished: Option<Instant>,
    /// What it did.
    pub behaviour: Behaviour,
}

impl Call {
    /// Whether the call finished successfully.
    pub fn succeeded(&self) -> bool {
        self.finished.is_some()
            && matches!(
                self.behaviour,
                Behaviour::Succeed | Behaviour::SleepThenSucceed(_)
            )
    }
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    per_id: HashMap<String, u32>,
    running: usize,
    max_running: usize,
}

struct Inner {
    state: Mutex<State>,
    changed: Notify,
    script: Mutex<Script>,
}

/// A recording, scriptable handler.
///
/// ```
/// use std::time::Duration;
/// use postbox_testkit::{Behaviour, HandlerSpy};
/// let spy = HandlerSpy::new()
///     .script(|_env, seen_before| if seen_before == 0 { Behaviour::FailTransient } else { Behaviour::Succeed });
/// // hand `spy.clone()` to a consumer, then:
/// # async fn wait(spy: HandlerSpy) -> Result<(), String> {
/// spy.wait_for_successes(10, Duration::from_secs(5)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HandlerSpy {
    inner: Arc<Inner>,
}

impl Default for HandlerSpy {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HandlerSpy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerSpy")
            .field("calls", &self.lock().calls.len())
            .finish()
    }
}

impl HandlerSpy {
    /// A spy that succeeds on everything.
    pub fn new() -> Self {
        HandlerSpy {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                script: Mutex::new(Arc::new(|_, _| Behaviour::Succeed)),
            }),
        }
    }

    /// Decides the behaviour per call from the envelope and how often this id
    /// was seen before.
    pub fn script<F>(self, f: F) -> Self
    where
        F: Fn(&Envelope, u32) -> Behaviour + Send + Sync + 'static,
    {
        *self.inner.script.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(f);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in start order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Number of calls so far.
    pub fn call_count(&self) -> usize {
        self.lock().calls.len()
    }

    /// Calls that finished successfully.
    pub fn successes(&self) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.succeeded())
            .cloned()
            .collect()
    }

    /// Calls for one message id.
    pub fn calls_for(&self, id: &str) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.envelope.id.as_str() == id)
            .cloned()
            .collect()
    }

    /// Most handlers that ran at the same time.
    pub fn max_concurrency(&self) -> usize {
        self.lock().max_running
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Waits until `pred` holds over the calls, or fails after `timeout` with a
    /// message describing what was seen.
    pub async fn wait_until<F>(&self, what: &str, timeout: Duration, pred: F) -> Result<(), String>
    where
        F: Fn(&[Call]) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.lock();
                if pred(&state.calls) {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let state = self.lock();
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; saw {} calls ({} successful)",
                    state.calls.len(),
                    state
                        .calls
                        .iter()
                        .filter(|c| c.finished.is_some()
                            && matches!(
                                c.behaviour,
                                Behaviour::Succeed | Behaviour::SleepThenSucceed(_)
                            ))
                        .count()
                ));
            }
        }
    }

    /// Waits for `n` successful calls.
    pub async fn wait_for_successes(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Call>, String> {
        self.wait_until(&format!("{n} successful calls"), timeout, |calls| {
            calls.iter().filter(|c| c.succeeded()).count() >= n
        })
        .await?;
        Ok(self.successes())
    }

    /// Waits until `n` distinct message ids have succeeded (redeliveries of an
    /// id count once).
    pub async fn wait_for_distinct_successes(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        self.wait_until(
            &format!("{n} distinct messages to succeed"),
            timeout,
            |calls| {
                calls
                    .iter()
                    .filter(|c| c.succeeded())
                    .map(|c| c.envelope.id.as_str())
                    .collect::<std::collections::HashSet<_>>()
                    .len()
                    >= n
            },
        )
        .await
    }

    /// Waits for `n` calls of any outcome.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> Result<Vec<Call>, String> {
        self.wait_until(&format!("{n} calls"), timeout, |calls| calls.len() >= n)
            .await?;
        Ok(self.calls())
    }

    /// Waits for a call with message id `id`.
    pub async fn wait_for_id(&self, id: &str, timeout: Duration) -> Result<Call, String> {
        self.wait_until(&format!("message {id}"), timeout, |calls| {
            calls.iter().any(|c| c.envelope.id.as_str() == id)
        })
        .await?;
        Ok(self.calls_for(id).remove(0))
    }
}

impl Handler for HandlerSpy {
    async fn handle(&self, envelope: &Envelope) -> HandlerResult {
        let script = self
            .inner
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (index, behaviour) = {
            let mut state = self.lock();
            let seen = state.per_id.entry(envelope.id.to_string()).or_insert(0);
            let seen_before = *seen;
            *seen += 1;
            let behaviour = script(envelope, seen_before);
            state.calls.push(Call {
                envelope: envelope.clone(),
                seen_before,
                started: Instant::now(),
                finished: None,
                behaviour: behaviour.clone(),
            });
            state.running += 1;
            state.max_running = state.max_running.max(state.running);
            (state.calls.len() - 1, behaviour)
        };
        self.inner.changed.notify_waiters();
        struct Finish<'a>(&'a HandlerSpy, usize);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock();
                state.running -= 1;
                state.calls[self.1].finished = Some(Instant::now());
                drop(state);
                self.0.inner.changed.notify_waiters();
            }
        }
        let _finish = Finish(self, index);
        match behaviour {
            Behaviour::Succeed => Ok(()),
            Behaviour::FailTransient => Err(HandlerError::transient("scripted transient failure")),
            Behaviour::FailPermanent => Err(HandlerError::permanent("scripted permanent failure")),
            Behaviour::RetryAfter(d) => Err(HandlerError::retry_after(d, "scripted retry-after")),
            Behaviour::Panic => panic!("scripted panic"),
            Behaviour::SleepThenSucceed(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
        }
    }
}
