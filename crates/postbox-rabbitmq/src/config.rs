//! Configuration: an `amqp://` / `amqps://` URL plus lapin's own
//! [`ConnectionProperties`], and the adapter's choices (header prefix, delay
//! tiers, reconnect backoff, what `subscribe` declares). `Debug` never shows
//! the password.

use std::fmt;
use std::time::Duration;

use lapin::ConnectionProperties;
use postbox_core::delay::DelayTiers;
use postbox_core::{ContentMode, Error, ErrorKind};

use crate::topology::{tier_queue, QueueKind};

/// The variable [`RabbitConfig::from_env`] reads: the broker URL.
pub const AMQP_URL_ENV: &str = "AMQP_URL";

/// The URL of [`RabbitConfig::default`]: a local development broker
/// (`guest` / `guest`, vhost `/`).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ's default `max_message_size` (128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// The name of the headers exchange retry copies go through.
pub const DEFAULT_DELAY_EXCHANGE: &str = "postbox.delay";

/// The `basic.qos` prefetch of a subscription whose options give none.
pub const DEFAULT_PREFETCH: u16 = 32;

/// Query parameters lapin reads from the URL itself (passed through).
const LAPIN_PARAMETERS: [&str; 5] = [
    "frame_max",
    "channel_max",
    "heartbeat",
    "connection_timeout",
    "auth_mechanism",
];

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

/// Configuration of a [`RabbitBroker`](crate::RabbitBroker).
///
/// ```
/// use postbox_rabbitmq::{QueueKind, RabbitConfig};
/// let config = RabbitConfig::from_url("amqp://app:s3cret@rabbit:5672/%2f?heartbeat=30")?
///     .queue_kind(QueueKind::Classic)
///     .prefetch(64);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// assert_eq!(config.redacted_url(), "amqp://app:***@rabbit:5672/%2f?heartbeat=30");
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Clone)]
pub struct RabbitConfig {
    pub(crate) url: String,
    pub(crate) properties: ConnectionProperties,
    pub(crate) prefix: HeaderPrefix,
    pub(crate) mode: ContentMode,
    pub(crate) delay_exchange: String,
    /// The delay tiers; `None` when configured without any (no delayed
    /// publishing, retries go straight back).
    pub(crate) tiers: Option<DelayTiers>,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) foreign_type: String,
    pub(crate) declare_delay_tiers: bool,
    pub(crate) max_message_size: usize,
    pub(crate) queue_kind: QueueKind,
    pub(crate) prefetch: u16,
}

impl RabbitConfig {
    /// A configuration for `url` (`amqp://user:pass@host:port/vhost` or
    /// `amqps://…`), taken as it is: lapin reads its own query parameters,
    /// and the URL is checked when connecting. [`RabbitConfig::from_url`]
    /// checks it now and also reads postbox's parameters.
    pub fn new(url: impl Into<String>) -> Self {
        RabbitConfig {
            url: url.into(),
            properties: ConnectionProperties::default()
                .with_connection_name("postbox-rabbitmq".into()),
            prefix: HeaderPrefix::default(),
            mode: ContentMode::default(),
            delay_exchange: DEFAULT_DELAY_EXCHANGE.to_string(),
            tiers: Some(DelayTiers::default()),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            foreign_type: postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE.to_string(),
            declare_delay_tiers: true,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            queue_kind: QueueKind::Quorum,
            prefetch: DEFAULT_PREFETCH,
        }
    }

    /// Parses a broker URL: `amqp://user:pass@host:port/vhost?…` or
    /// `amqps://…` (any other scheme is an [`ErrorKind::Config`] error naming
    /// it; `amqps://` needs the `tls` feature).
    ///
    /// Query parameters: lapin's own (`heartbeat`, `frame_max`,
    /// `channel_max`, `connection_timeout`, `auth_mechanism`) are passed
    /// through; postbox reads `queue_kind` (`quorum` | `classic`), `prefetch`,
    /// `header_prefix` (`cloudEvents:` | `cloudEvents_` | `ce-`),
    /// `content_mode` (`binary` | `structured`) and `max_message_size`
    /// (bytes). Any other parameter is a `Config` error, so
    /// a typo does not go unnoticed. Errors never show the password.
    pub fn from_url(url: &str) -> Result<RabbitConfig, Error> {
        let redacted = redact_url(url);
        let config_error = |what: String| Error::new(ErrorKind::Config, what);
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(config_error(format!(
                "`{redacted}` is not a RabbitMQ URL: expected amqp://host or amqps://host"
            )));
        };
        if !matches!(scheme.to_ascii_lowercase().as_str(), "amqp" | "amqps") {
            return Err(config_error(format!(
                "unsupported scheme `{scheme}://` in `{redacted}`: a RabbitMQ URL is amqp:// or amqps://"
            )));
        }
        let (head, query) = url.split_once('?').unwrap_or((url, ""));
        let mut config = RabbitConfig::new(head);
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let invalid = || {
                config_error(format!(
                    "invalid value `{value}` of the `{key}` parameter in `{redacted}`"
                ))
            };
            match key {
                "queue_kind" => {
                    config.queue_kind = match value.to_ascii_lowercase().as_str() {
                        "quorum" => QueueKind::Quorum,
                        "classic" => QueueKind::Classic,
                        _ => return Err(invalid()),
                    }
                }
                "prefetch" => config = config.prefetch(value.parse().map_err(|_| invalid())?),
                "header_prefix" => {
                    config.prefix = match value {
                        "cloudEvents:" | "cloudEvents%3A" | "cloudEvents%3a" => {
                            HeaderPrefix::CloudEvents
                        }
                        "cloudEvents_" => HeaderPrefix::CloudEventsUnderscore,
                        "ce-" => HeaderPrefix::Ce,
                        _ => return Err(invalid()),
                    }
                }
                "content_mode" => {
                    config.mode = value.parse().map_err(|_| invalid())?;
                }
                "max_message_size" => {
                    config.max_message_size = value.parse().map_err(|_| invalid())?
                }
                k if LAPIN_PARAMETERS.contains(&k) => passed.push(pair),
                _ => {
                    return Err(config_error(format!(
                        "unknown parameter `{key}` in `{redacted}`: expected one of queue_kind, prefetch, header_prefix, content_mode, max_message_size, {}",
                        LAPIN_PARAMETERS.join(", ")
                    )))
                }
            }
        }
        if !passed.is_empty() {
            config.url = format!("{head}?{}", passed.join("&"));
        }
        if let Err(e) = config.url.parse::<lapin::uri::AMQPUri>() {
            // lapin's message may quote the URL: only ever show it redacted.
            let why = e.replace(&config.url, &config.redacted_url());
            return Err(config_error(format!(
                "`{redacted}` is not a valid AMQP URL: {why}"
            )));
        }
        config.check()?;
        Ok(config)
    }

    /// The URL in the `AMQP_URL` variable ([`RabbitConfig::from_url`]); an
    /// unset or empty variable is an [`ErrorKind::Config`] error that names it.
    pub fn from_env() -> Result<RabbitConfig, Error> {
        match std::env::var(AMQP_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Self::from_url(url.trim()),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!("{AMQP_URL_ENV} is not set: set it to the broker URL, e.g. amqp://user:password@host:5672/%2f"),
            )),
        }
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

    /// How messages are published: [`ContentMode::Binary`] (default) or
    /// [`ContentMode::Structured`]; retry and dead-letter copies are written
    /// the same way. Decoding reads both, whatever this says.
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }

    /// The headers exchange retry copies are published through (default `postbox.delay`);
    /// the tier queues are named `<exchange>.<milliseconds>ms`.
    pub fn delay_exchange(mut self, name: impl Into<String>) -> Self {
        self.delay_exchange = name.into();
        self
    }

    /// The delay tiers, each one queue with one `x-message-ttl` (default
    /// [`DelayTiers::default`]: a 1-2-5 series from 20 ms to 1 h), cleaned
    /// as [`DelayTiers::new`] cleans them. A delay waits in the tier
    /// [`hop`](DelayTiers::hop) picks, again and again until it is due.
    ///
    /// No durations (or only zeros) means no tiers: `publish_delayed` is
    /// then `Unsupported` and a retry goes straight back to its queue.
    pub fn delay_tiers(mut self, tiers: impl IntoIterator<Item = Duration>) -> Self {
        // An empty set is the only thing `DelayTiers::new` refuses; here it
        // means "no tiers".
        self.tiers = DelayTiers::new(tiers).ok();
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

    /// The queue type `subscribe` and `provision` declare (default
    /// [`QueueKind::Quorum`]; their DLQs are always classic).
    pub fn queue_kind(mut self, kind: QueueKind) -> Self {
        self.queue_kind = kind;
        self
    }

    /// The `basic.qos` prefetch of subscriptions whose options give no
    /// prefetch hint (default 32, at least 1).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// The delay tier queues (`<delay exchange>.<milliseconds>ms`, shortest
    /// first): what waits in them is scheduled for later, e.g. for monitoring.
    pub fn delay_queues(&self) -> Vec<String> {
        self.tier_durations()
            .iter()
            .map(|&t| tier_queue(&self.delay_exchange, t))
            .collect()
    }

    /// The delay tier durations, shortest first (none without tiers).
    pub(crate) fn tier_durations(&self) -> &[Duration] {
        self.tiers.as_ref().map_or(&[], DelayTiers::durations)
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

/// A local development broker: [`DEFAULT_URL`] (never the environment; see
/// [`RabbitConfig::from_env`]).
impl Default for RabbitConfig {
    fn default() -> Self {
        Self::new(DEFAULT_URL)
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("mode", &self.mode)
            .field("delay_exchange", &self.delay_exchange)
            .field("tiers", &self.tier_durations().len())
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("foreign_type", &self.foreign_type)
            .field("max_message_size", &self.max_message_size)
            .field("queue_kind", &self.queue_kind)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
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
        assert_eq!(
            redact_url("amqp://u:p@host?heartbeat=5"),
            "amqp://u:***@host?heartbeat=5"
        );
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
            c.tier_durations(),
            [Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(
            c.delay_queues(),
            vec!["postbox.delay.1000ms", "postbox.delay.2000ms"]
        );
        assert_eq!(
            RabbitConfig::new("amqp://h").tiers,
            Some(DelayTiers::default())
        );
        for none in [vec![], vec![Duration::ZERO]] {
            let c = RabbitConfig::new("amqp://h").delay_tiers(none);
            assert_eq!(c.tiers, None);
            assert!(c.delay_queues().is_empty());
        }
        assert!(RabbitConfig::new("http://x").check().is_err());
        assert!(RabbitConfig::new("amqp://x").check().is_ok());
    }

    #[test]
    fn from_url_reads_postbox_parameters_and_passes_lapins_through() {
        let c = RabbitConfig::from_url(
            "amqp://app:pw@rabbit:5672/%2f?heartbeat=30&queue_kind=classic&prefetch=0&header_prefix=ce-&content_mode=structured&max_message_size=1024&frame_max=8192",
        )
        .unwrap();
        assert_eq!(
            c.url,
            "amqp://app:pw@rabbit:5672/%2f?heartbeat=30&frame_max=8192"
        );
        assert_eq!(c.queue_kind, QueueKind::Classic);
        assert_eq!(c.prefetch, 1, "prefetch is at least 1");
        assert_eq!(c.prefix, HeaderPrefix::Ce);
        assert_eq!(c.mode, ContentMode::Structured);
        assert_eq!(c.max_message_size, 1024);
        let plain = RabbitConfig::from_url("AMQP://rabbit").unwrap();
        assert_eq!(plain.url, "AMQP://rabbit");
        assert_eq!(plain.queue_kind, QueueKind::Quorum);
        assert_eq!(plain.prefetch, DEFAULT_PREFETCH);
        assert_eq!(plain.mode, ContentMode::Binary);
    }

    #[test]
    fn from_url_errors_are_config_errors_without_the_password() {
        for (url, says) in [
            ("http://app:hunter2@rabbit", "`http://`"),
            ("kafka://app:hunter2@rabbit:9092", "`kafka://`"),
            ("rabbit:5672", "not a RabbitMQ URL"),
            ("amqp://app:hunter2@rabbit?heartbaet=5", "`heartbaet`"),
            (
                "amqp://app:hunter2@rabbit?queue_kind=stream",
                "`queue_kind`",
            ),
            ("amqp://app:hunter2@rabbit?prefetch=many", "`prefetch`"),
            (
                "amqp://app:hunter2@rabbit?content_mode=batch",
                "`content_mode`",
            ),
            (
                "amqp://app:hunter2@rabbit?heartbeat=soon",
                "not a valid AMQP URL",
            ),
        ] {
            let e = RabbitConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config, "{url}: {e}");
            assert!(e.message().contains(says), "{url}: {e}");
            assert!(!format!("{e}{e:?}").contains("hunter2"), "{url}: {e:?}");
        }
        if !cfg!(feature = "tls") {
            let e = RabbitConfig::from_url("amqps://app:hunter2@rabbit").unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config);
            assert!(e.message().contains("`tls` feature"), "{e}");
            assert!(!e.message().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn from_env_names_the_variable_and_default_reads_no_environment() {
        // The only test of this binary that touches AMQP_URL.
        let saved = std::env::var(AMQP_URL_ENV).ok();
        std::env::remove_var(AMQP_URL_ENV);
        let e = RabbitConfig::from_env().unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config);
        assert!(e.message().contains(AMQP_URL_ENV), "{e}");
        std::env::set_var(AMQP_URL_ENV, "amqp://app:pw@elsewhere:5672/%2f");
        assert_eq!(
            RabbitConfig::from_env().unwrap().redacted_url(),
            "amqp://app:***@elsewhere:5672/%2f"
        );
        assert_eq!(RabbitConfig::default().url, DEFAULT_URL);
        match saved {
            Some(v) => std::env::set_var(AMQP_URL_ENV, v),
            None => std::env::remove_var(AMQP_URL_ENV),
        }
    }
}
