//! Configuration: an `amqp://` / `amqps://` URL (or `AMQP_URL`) plus lapin's
//! own [`ConnectionProperties`], and the adapter's choices (header prefix,
//! delay tiers, reconnect backoff). `Debug` never shows the password.

use std::fmt;
use std::time::Duration;

use lapin::ConnectionProperties;
use postbox_core::{Error, ErrorKind};

/// Default URL when neither a URL nor `AMQP_URL` is given.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ's default `max_message_size` (128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// The name of the headers exchange retry copies go through.
pub const DEFAULT_DELAY_EXCHANGE: &str = "postbox.delay";

/// Which prefix CloudEvents attributes get in the AMQP headers table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderPrefix {
    /// `cloudEvents:` — the CloudEvents AMQP binding (default).
    #[default]
    CloudEvents,
    /// `cloudEvents_` — the AMQP binding's alternative for JMS-style brokers.
    CloudEventsUnderscore,
    /// `ce-` — the knative RabbitMQ binding (CloudEvents Python SDK 2.x).
    Ce,
}

impl HeaderPrefix {
    /// The prefix text.
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderPrefix::CloudEvents => "cloudEvents:",
            HeaderPrefix::CloudEventsUnderscore => "cloudEvents_",
            HeaderPrefix::Ce => "ce-",
        }
    }
}

/// The default delay tiers: a 1-2-5 series from 20 ms to 1 h.
pub fn default_tiers() -> Vec<Duration> {
    let ms = [
        20u64, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 120_000,
        300_000, 600_000, 1_200_000, 1_800_000, 3_600_000,
    ];
    ms.iter().map(|&m| Duration::from_millis(m)).collect()
}

/// Configuration of a [`RabbitMq`](crate::RabbitMq) client.
#[derive(Clone)]
pub struct RabbitConfig {
    pub(crate) url: String,
    pub(crate) properties: ConnectionProperties,
    pub(crate) prefix: HeaderPrefix,
    pub(crate) delay_exchange: String,
    pub(crate) tiers: Vec<Duration>,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) foreign_type: String,
    pub(crate) declare_delay_tiers: bool,
    pub(crate) max_message_size: usize,
}

impl RabbitConfig {
    /// A configuration for `url` (`amqp://user:pass@host:port/vhost` or `amqps://…`).
    pub fn new(url: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            properties: ConnectionProperties::default()
                .with_connection_name("postbox-rabbitmq".into()),
            prefix: HeaderPrefix::default(),
            delay_exchange: DEFAULT_DELAY_EXCHANGE.to_string(),
            tiers: default_tiers(),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            foreign_type: postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE.to_string(),
            declare_delay_tiers: true,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// From `AMQP_URL`, or [`DEFAULT_URL`] when it is unset or empty.
    pub fn from_env() -> Self {
        let url = std::env::var("AMQP_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        Self::new(url)
    }

    /// lapin connection properties (client properties, auth provider, …), passed through.
    pub fn connection_properties(mut self, properties: ConnectionProperties) -> Self {
        self.properties = properties;
        self
    }

    /// The prefix used when *publishing* CloudEvents attributes (decoding accepts all three).
    pub fn header_prefix(mut self, prefix: HeaderPrefix) -> Self {
        self.prefix = prefix;
        self
    }

    /// The headers exchange retry copies are published through (default `postbox.delay`);
    /// the tier queues are named `<exchange>.<milliseconds>ms`.
    pub fn delay_exchange(mut self, name: impl Into<String>) -> Self {
        self.delay_exchange = name.into();
        self
    }

    /// The delay tiers (each one queue with one `x-message-ttl`). Sorted and
    /// de-duplicated; zero durations are ignored.
    pub fn delay_tiers(mut self, tiers: impl IntoIterator<Item = Duration>) -> Self {
        let mut t: Vec<Duration> = tiers.into_iter().filter(|d| !d.is_zero()).collect();
        t.sort();
        t.dedup();
        self.tiers = t;
        self
    }

    /// Whether the delay exchange and tier queues are declared on first use (default true).
    pub fn declare_delay_tiers(mut self, declare: bool) -> Self {
        self.declare_delay_tiers = declare;
        self
    }

    /// How long one connection attempt may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnect backoff bounds of consumers (default 100 ms doubling up to 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// The envelope type given to foreign messages without a `type` property
    /// (default `postbox.foreign`).
    pub fn foreign_type(mut self, event_type: impl Into<String>) -> Self {
        self.foreign_type = event_type.into();
        self
    }

    /// The largest body published; larger ones fail before sending with
    /// `LimitExceeded(BodySize)` (default 128 MiB, RabbitMQ's own `max_message_size`).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        let lower = self.url.to_ascii_lowercase();
        if lower.starts_with("amqps://") && !cfg!(feature = "tls") {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{} needs the `tls` feature of postbox-rabbitmq",
                    self.redacted_url()
                ),
            ));
        }
        if !lower.starts_with("amqp://") && !lower.starts_with("amqps://") {
            return Err(Error::new(
                ErrorKind::Config,
                format!("not an amqp:// or amqps:// URL: {}", self.redacted_url()),
            ));
        }
        Ok(())
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self::from_env()
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("delay_exchange", &self.delay_exchange)
            .field("tiers", &self.tiers.len())
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("foreign_type", &self.foreign_type)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    let masked = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_string()
    };
    format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = RabbitConfig::new("amqp://app:s3cr3t@rabbit:5672/%2f");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("app:***@rabbit:5672"), "{dbg}");
        assert_eq!(redact_url("amqp://host/vh"), "amqp://host/vh");
        assert_eq!(redact_url("amqp://u@host"), "amqp://u@host");
    }

    #[test]
    fn tiers_are_sorted_and_urls_checked() {
        let c = RabbitConfig::new("amqp://h").delay_tiers([
            Duration::from_secs(2),
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(1),
        ]);
        assert_eq!(
            c.tiers,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert!(RabbitConfig::new("http://x").check().is_err());
        assert!(RabbitConfig::new("amqp://x").check().is_ok());
    }
}
