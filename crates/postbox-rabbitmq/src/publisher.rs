//! The broker handle and its [`Publisher`] implementation.
//!
//! One [`RabbitBroker`] holds one publishing connection with one channel in
//! confirm mode, shared by every clone. Each publish is `mandatory` and
//! persistent (`delivery_mode = 2`) and returns only after the broker's
//! confirm: an unroutable message comes back as `basic.return` and is an
//! [`ErrorKind::Unroutable`] error, a `basic.nack` is [`ErrorKind::Rejected`].
//! Confirms are pipelined: concurrent publishes share the channel, and
//! [`Publisher::publish_batch`] sends the whole batch before waiting for the
//! confirms, then reports each message.
//!
//! When the connection or channel is lost, publishes in flight fail with a
//! `Connection`/`Closed` error (never success without a confirm) and the next
//! publish reconnects. After [`RabbitBroker::close`](postbox_core::Broker::close)
//! every publish fails with [`ErrorKind::Closed`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use postbox_core::telemetry::PublisherMetrics;
use postbox_core::{BatchReport, Envelope, Error, ErrorKind, Limit, PublishError, Publisher};

use crate::codec::{self, short, Encoded, Route};
use crate::config::RabbitConfig;
use crate::error::from_lapin;
use crate::SYSTEM;

/// How long a publish waits for its confirm before reporting a `Timeout`.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The RabbitMQ broker handle: a [`postbox_core::Broker`] (publish, subscribe,
/// provision, backlog, health, delayed publish, close), dead-letter
/// operations, and topology declaration.
///
/// Cheap to clone; clones share the publishing connection, and closing one
/// closes them all.
#[derive(Clone)]
pub struct RabbitBroker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: RabbitConfig,
    link: Mutex<Option<Link>>,
    reconnect: tokio::sync::Mutex<()>,
    metrics: PublisherMetrics,
    closed: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let link = self.link.get_mut().unwrap_or_else(|p| p.into_inner());
        if !self.closed.load(Ordering::Acquire) && link.as_ref().is_some_and(Link::usable) {
            // lapin still closes the connection when it is dropped.
            tracing::warn!(url = %self.config.redacted_url(), "a RabbitBroker was dropped without close(); closing its connection without waiting for outstanding confirms");
        }
    }
}

/// The live publishing connection and its confirm channel.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) connection: Arc<Connection>,
    pub(crate) channel: Channel,
    pub(crate) tiers_ready: Arc<AtomicBool>,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl std::fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl RabbitBroker {
    /// Connects with `config` (the publishing connection is opened now, so a
    /// wrong URL or credentials fail here).
    pub async fn connect(config: RabbitConfig) -> Result<Self, Error> {
        let broker = Self::lazy(config)?;
        broker.link().await?;
        Ok(broker)
    }

    /// Connects to the URL in `AMQP_URL` ([`RabbitConfig::from_env`]): an
    /// unset variable is an [`ErrorKind::Config`] error that names it.
    pub async fn from_env() -> Result<Self, Error> {
        Self::connect(RabbitConfig::from_env()?).await
    }

    /// A handle that connects on first use.
    pub fn lazy(config: RabbitConfig) -> Result<Self, Error> {
        config.check()?;
        Ok(RabbitBroker {
            inner: Arc::new(Inner {
                config,
                link: Mutex::new(None),
                reconnect: tokio::sync::Mutex::new(()),
                metrics: PublisherMetrics::new(SYSTEM),
                closed: AtomicBool::new(false),
            }),
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn closed_error(&self) -> Error {
        Error::new(
            ErrorKind::Closed,
            format!(
                "the RabbitMQ broker handle for {} is closed",
                self.inner.config.redacted_url()
            ),
        )
    }

    /// Closes the publishing connection once every outstanding confirm is in
    /// (idempotent); afterwards publishing fails with [`ErrorKind::Closed`].
    pub(crate) async fn shut(&self) -> Result<(), Error> {
        let _one_at_a_time = self.inner.reconnect.lock().await;
        self.inner.closed.store(true, Ordering::Release);
        let link = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(link) = link else {
            return Ok(());
        };
        let mut result = Ok(());
        if link.channel.status().connected() {
            match tokio::time::timeout(CONFIRM_TIMEOUT, link.channel.wait_for_confirms()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => result = Err(from_lapin("waiting for outstanding confirms", e)),
                Err(_) => {
                    result = Err(Error::new(
                        ErrorKind::Timeout,
                        format!("outstanding confirms did not arrive within {CONFIRM_TIMEOUT:?}"),
                    ))
                }
            }
            let _ = link.channel.close(200, "closed".into()).await;
        }
        if link.connection.status().connected() {
            if let Err(e) = link.connection.close(200, "closed".into()).await {
                result = result.and(Err(from_lapin("closing the connection", e)));
            }
        }
        result
    }

    /// The configuration.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.config
    }

    /// Opens a new connection with the handle's configuration.
    pub(crate) async fn open_connection(&self) -> Result<Connection, Error> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let cfg = &self.inner.config;
        match tokio::time::timeout(
            cfg.connect_timeout,
            Connection::connect(&cfg.url, cfg.properties.clone()),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(from_lapin(
                format!("connecting to {}", cfg.redacted_url()),
                e,
            )),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "connecting to {} took longer than {:?}",
                    cfg.redacted_url(),
                    cfg.connect_timeout
                ),
            )),
        }
    }

    fn current(&self) -> Option<Link> {
        let guard = self.inner.link.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|l| l.usable()).cloned()
    }

    /// The publishing link, (re)connecting if it is gone.
    pub(crate) async fn link(&self) -> Result<Link, Error> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if let Some(l) = self.current() {
            return Ok(l);
        }
        let _one_at_a_time = self.inner.reconnect.lock().await;
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if let Some(l) = self.current() {
            return Ok(l);
        }
        let old = self
            .inner
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let connection = match old {
            Some(l) if l.connection.status().connected() => l.connection,
            _ => {
                tracing::debug!(url = %self.inner.config.redacted_url(), "opening the publishing connection");
                Arc::new(self.open_connection().await?)
            }
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| from_lapin("opening a publishing channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| from_lapin("enabling publisher confirms", e))?;
        let link = Link {
            connection,
            channel,
            tiers_ready: Arc::new(AtomicBool::new(false)),
        };
        *self.inner.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
        Ok(link)
    }

    /// A fresh channel on the publishing connection (for declarations and
    /// operations whose errors must not close the confirm channel).
    pub(crate) async fn side_channel(&self) -> Result<Channel, Error> {
        let link = self.link().await?;
        link.connection
            .create_channel()
            .await
            .map_err(|e| from_lapin("opening a channel", e))
    }

    /// Sends one message; the returned confirm resolves when the broker answers.
    pub(crate) async fn send(
        &self,
        link: &Link,
        route: &Route,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<PublisherConfirm, Error> {
        let exchange = short("exchange name", &route.exchange)?;
        let key = short("routing key", &route.routing_key)?;
        // The broker closes the whole connection (FRAME_ERROR) on a content
        // header larger than a frame, failing every publish in flight: refuse
        // it here instead.
        let frame_max = link.connection.configuration().frame_max();
        if frame_max > 0 {
            let room = usize::try_from(frame_max)
                .unwrap_or(usize::MAX)
                .saturating_sub(8);
            let size = codec::header_frame_size(&properties);
            if size > room {
                return Err(Error::new(
                    ErrorKind::Encode,
                    format!(
                        "the properties and headers of a message to {} take {size} bytes, more than one AMQP frame holds ({room} bytes with frame_max {frame_max})",
                        describe(route)
                    ),
                ));
            }
        }
        link.channel
            .basic_publish(
                exchange,
                key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                properties,
            )
            .await
            .map_err(|e| from_lapin(format!("publishing to {}", describe(route)), e))
    }

    /// Publishes raw properties + payload to a route and waits for the confirm.
    pub(crate) async fn publish_raw(
        &self,
        route: &Route,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), Error> {
        let link = self.link().await?;
        let confirm = self.send(&link, route, payload, properties).await?;
        confirmed(route, confirm).await
    }

    /// Encodes `env` in the configured content mode, checking the body
    /// limit before (the payload) and after (the body, which in structured
    /// mode is the whole event).
    pub(crate) fn encode(&self, env: &Envelope) -> Result<Encoded, Error> {
        let max = self.inner.config.max_message_size;
        let too_big = |actual: usize| Error::limit(Limit::BodySize { max, actual });
        if env.payload.len() > max {
            return Err(too_big(env.payload.len()));
        }
        let cfg = &self.inner.config;
        let encoded = codec::encode(env, cfg.prefix, cfg.mode)?;
        if encoded.body.len() > max {
            return Err(too_big(encoded.body.len()));
        }
        Ok(encoded)
    }
}

fn describe(route: &Route) -> String {
    if route.exchange.is_empty() {
        format!("queue {}", route.routing_key)
    } else {
        format!("exchange {} (key {:?})", route.exchange, route.routing_key)
    }
}

/// Waits for a confirm and maps it: ack = ok, return = `Unroutable`, nack = `Rejected`.
pub(crate) async fn confirmed(route: &Route, confirm: PublisherConfirm) -> Result<(), Error> {
    let answer = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(from_lapin(
                format!(
                    "waiting for the confirm of a publish to {}",
                    describe(route)
                ),
                e,
            ))
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "no confirm for a publish to {} within {CONFIRM_TIMEOUT:?}",
                    describe(route)
                ),
            ))
        }
    };
    match answer {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(Error::new(
            ErrorKind::Unroutable,
            format!(
                "message to {} was returned by the broker: {} {}",
                describe(route),
                returned.reply_code,
                returned.reply_text
            ),
        )),
        Confirmation::Nack(None) => Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "the broker refused (nacked) a message to {}",
                describe(route)
            ),
        )),
        Confirmation::NotRequested => Err(Error::new(
            ErrorKind::Other,
            "publisher confirms are not enabled on the channel",
        )),
    }
}

#[async_trait]
impl Publisher for RabbitBroker {
    async fn publish(&self, destination: &str, envelope: Envelope) -> Result<(), PublishError> {
        let result = async {
            let encoded = self.encode(&envelope)?;
            let route = codec::route(destination, &envelope);
            self.publish_raw(&route, &encoded.body, encoded.properties)
                .await
        }
        .await;
        match result {
            Ok(()) => {
                self.inner.metrics.published.increment(1);
                Ok(())
            }
            Err(e) => {
                self.inner.metrics.failed.increment(1);
                Err(PublishError::new(e, envelope))
            }
        }
    }

    async fn publish_batch(&self, destination: &str, envelopes: Vec<Envelope>) -> BatchReport {
        // Send everything first (confirms pipelined), then collect the confirms.
        let link = self.link().await;
        let mut pending: Vec<(Envelope, Result<(Route, PublisherConfirm), Error>)> =
            Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let sent = async {
                let link = link.as_ref().map_err(clone_error)?;
                let encoded = self.encode(&env)?;
                let route = codec::route(destination, &env);
                let confirm = self
                    .send(link, &route, &encoded.body, encoded.properties)
                    .await?;
                Ok((route, confirm))
            }
            .await;
            pending.push((env, sent));
        }
        let waits = pending.into_iter().map(|(env, sent)| async move {
            let r = match sent {
                Ok((route, confirm)) => confirmed(&route, confirm).await,
                Err(e) => Err(e),
            };
            r.map_err(|e| PublishError::new(e, env))
        });
        let results = futures_util::future::join_all(waits).await;
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.inner.metrics.published.increment(ok);
        self.inner
            .metrics
            .failed
            .increment(results.len() as u64 - ok);
        BatchReport::new(results)
    }
}

fn clone_error(e: &Error) -> Error {
    Error::new(e.kind().clone(), e.message().to_string())
}
