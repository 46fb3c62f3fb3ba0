//! Configuration: an `rdkafka::ClientConfig` passed through as-is, plus a
//! bootstrap-servers shortcut, the `kafka://` URL form and the
//! `KAFKA_BOOTSTRAP_SERVERS` variable.
//!
//! `Debug` never shows secrets: any property whose name mentions a password,
//! secret, key, token, credentials or a JAAS/OAUTHBEARER configuration is
//! printed as `<redacted>`, and errors about such a property never quote its
//! value.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use postbox_core::delay::DelayTiers;
use postbox_core::envelope::Text;
use postbox_core::{ContentMode, Error, ErrorKind};
use rdkafka::ClientConfig;

use crate::topology::TopologySpec;

/// The environment variable with the bootstrap servers.
pub const BOOTSTRAP_ENV: &str = "KAFKA_BOOTSTRAP_SERVERS";

/// The one URL query parameter that is postbox's, not a librdkafka property
/// (librdkafka has no property of that name).
const CONTENT_MODE_PARAM: &str = "content_mode";

/// The configuration of a [`KafkaBroker`](crate::KafkaBroker): the
/// librdkafka properties its producer, consumers and admin client share, and
/// postbox's own settings.
///
/// ```
/// use postbox_kafka::KafkaConfig;
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512")
///     .set("sasl.username", "app")
///     .set("sasl.password", "s3cret");
/// assert!(!format!("{config:?}").contains("s3cret"));
///
/// // The same as a URL (what `postbox::connect` takes):
/// let config = KafkaConfig::from_url(
///     "kafka://b1:9092,b2:9092?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512\
///      &sasl.username=app&sasl.password=s3cret",
/// )?;
/// assert_eq!(config.get("bootstrap.servers"), Some("b1:9092,b2:9092"));
/// assert_eq!(config.get("sasl.password"), Some("s3cret"));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    client: ClientConfig,
    /// Delay tiers of the retry topics (`<topic>.retry.<tier>`).
    pub(crate) tiers: DelayTiers,
    /// What `provision` (and `subscribe`, unless told not to) creates.
    pub(crate) topology: TopologySpec,
    /// The `type` of envelopes synthesized for foreign records.
    pub(crate) foreign_type: Text,
    /// Whether sources consume the retry tier topics of their topic.
    pub(crate) retry_topics: bool,
    /// How long a revoke waits for in-flight work of the revoked partitions.
    pub(crate) revoke_timeout: Duration,
    /// The consumer group of the DLQ operations (peek/replay/purge).
    pub(crate) ops_group: String,
    /// Time-out of admin and metadata requests.
    pub(crate) request_timeout: Duration,
    /// How envelopes are published.
    pub(crate) mode: ContentMode,
}

impl KafkaConfig {
    /// A configuration for the cluster at `bootstrap_servers` (`host:port,…`).
    pub fn new(bootstrap_servers: &str) -> Self {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", bootstrap_servers);
        Self::from_client_config(client)
    }

    /// Uses a native `rdkafka::ClientConfig` as-is (every property passes
    /// through to librdkafka).
    pub fn from_client_config(client: ClientConfig) -> Self {
        KafkaConfig {
            client,
            tiers: DelayTiers::coarse(),
            topology: TopologySpec::default(),
            foreign_type: Text::Borrowed(postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE),
            retry_topics: true,
            revoke_timeout: Duration::from_secs(10),
            ops_group: "postbox-dlq-ops".to_string(),
            request_timeout: Duration::from_secs(10),
            mode: ContentMode::Binary,
        }
    }

    /// A configuration from `KAFKA_BOOTSTRAP_SERVERS`; an [`ErrorKind::Config`]
    /// error naming the variable when it is unset or empty.
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var(BOOTSTRAP_ENV) {
            Ok(v) if !v.trim().is_empty() => Ok(Self::new(v.trim())),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!(
                    "{BOOTSTRAP_ENV} is not set: set it to the bootstrap servers (host:port,…)"
                ),
            )),
        }
    }

    /// A configuration from a URL:
    /// `kafka://host:port[,host:port…][/][?property=value&…]`.
    ///
    /// The authority is the bootstrap server list; every query parameter is
    /// a librdkafka property, passed through as-is after percent-decoding
    /// (`%2B` for `+`, `%26` for `&`; a `+` stays a `+`), e.g.
    /// `?security.protocol=SASL_SSL&sasl.username=u&sasl.password=p`.
    /// Credentials go in those properties, not in a `user:pass@` authority.
    ///
    /// A wrong scheme, an empty server list, a server without a host or
    /// with a bad port, a path, a parameter without a name or `=`, a bad
    /// percent escape, or `bootstrap.servers` as a parameter is an
    /// [`ErrorKind::Config`] error saying which; it never quotes a value
    /// (the URL may carry a password). Unknown properties are reported by
    /// librdkafka when [`KafkaBroker::connect`](crate::KafkaBroker::connect)
    /// creates the clients.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| url_error("it has no scheme: expected kafka://host:port"))?;
        if !scheme.eq_ignore_ascii_case("kafka") {
            return Err(url_error(&format!(
                "the scheme is `{scheme}://`: expected kafka://host:port"
            )));
        }
        let (head, query) = rest.split_once('?').unwrap_or((rest, ""));
        if head.contains('#') || query.contains('#') {
            return Err(url_error("it has a fragment (`#…`)"));
        }
        let (authority, path) = head.split_once('/').unwrap_or((head, ""));
        if !path.is_empty() {
            return Err(url_error(&format!(
                "it has a path (`/{path}`): a kafka:// URL is servers and ?properties only"
            )));
        }
        if authority.contains('@') {
            return Err(url_error(
                "it has user info (`…@`): pass credentials as properties, \
                 ?sasl.username=…&sasl.password=…",
            ));
        }
        let servers = bootstrap_servers(authority)?;
        let mut config = KafkaConfig::new(&servers);
        for (n, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
            // Not quoted: a stray `&` in an unescaped password would put
            // part of it here.
            let Some((key, value)) = pair.split_once('=') else {
                return Err(url_error(&format!(
                    "query parameter {} has no `=`: expected property=value",
                    n + 1
                )));
            };
            let key = percent_decode(key)
                .map_err(|why| url_error(&format!("a query parameter name {why}")))?;
            if key.is_empty() {
                return Err(url_error("a query parameter has no name"));
            }
            if key == CONTENT_MODE_PARAM {
                let mode = percent_decode(value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        url_error("`content_mode` is neither `binary` nor `structured`")
                    })?;
                config = config.content_mode(mode);
                continue;
            }
            if key == "bootstrap.servers" {
                return Err(url_error(
                    "it sets bootstrap.servers as a parameter: the servers are the URL's host:port list",
                ));
            }
            let value = percent_decode(value)
                .map_err(|why| url_error(&format!("the value of `{key}` {why}")))?;
            config = config.set(&key, value);
        }
        Ok(config)
    }

    /// How records are published: [`ContentMode::Binary`] (default: `ce_`
    /// headers, the payload as the value) or [`ContentMode::Structured`]
    /// (the CloudEvents JSON document as the value). Retry and dead-letter
    /// copies are written the same way; consumers read both modes whatever
    /// this says. In a URL: `?content_mode=structured`.
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets a librdkafka property (passed through).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.client.set(key, value);
        self
    }

    /// A librdkafka property, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.client.get(key)
    }

    /// The native configuration.
    pub fn client_config(&self) -> &ClientConfig {
        &self.client
    }

    /// The native configuration, to change (e.g. `set_log_level`).
    pub fn client_config_mut(&mut self) -> &mut ClientConfig {
        &mut self.client
    }

    /// Sets the delay tiers of the retry topics `<topic>.retry.<tier>`
    /// (default [`DelayTiers::coarse`]: 1 s, 10 s, 1 min, 10 min, 1 h). A
    /// retry goes to the tier [`covering`](DelayTiers::covering) its delay.
    pub fn retry_tiers(mut self, tiers: DelayTiers) -> Self {
        self.tiers = tiers;
        self
    }

    /// What provisioning creates for a topic: partitions, replication, topic
    /// configs, retry tiers, DLQ (default [`TopologySpec::default`]). Used by
    /// `Broker::provision` and by `subscribe` unless its options turn
    /// provisioning off.
    pub fn topology(mut self, spec: TopologySpec) -> Self {
        self.topology = spec;
        self
    }

    /// The `type` given to envelopes synthesized for foreign records (default
    /// `postbox.foreign`).
    pub fn foreign_type(mut self, event_type: impl Into<Text>) -> Self {
        self.foreign_type = event_type.into();
        self
    }

    /// Whether sources also consume the retry tier topics of their topic
    /// (default true). Without them, retry copies are written but nobody
    /// handles them: turn it off only where nothing retries.
    pub fn consume_retry_topics(mut self, yes: bool) -> Self {
        self.retry_topics = yes;
        self
    }

    /// How long a rebalance waits for in-flight messages of revoked
    /// partitions to finish before it commits and lets them go (default 10 s).
    /// Work still running after it is abandoned: its offset is not committed,
    /// so the partition's next owner processes it again.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// The consumer group whose committed offsets mark what DLQ operations
    /// have consumed (default `postbox-dlq-ops`).
    pub fn dlq_ops_group(mut self, group: impl Into<String>) -> Self {
        self.ops_group = group.into();
        self
    }

    /// Time-out of admin, metadata and offset requests (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// `message.max.bytes` as librdkafka will use it (default 1,000,000).
    pub fn max_message_bytes(&self) -> usize {
        self.get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1_000_000)
    }

    /// A copy of the native config with `defaults` set where the user did not
    /// set them.
    pub(crate) fn with_defaults(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = self.client.clone();
        for (k, v) in defaults {
            if c.get(k).is_none() {
                c.set(*k, *v);
            }
        }
        c
    }
}

/// Whether a property holds a secret.
pub(crate) fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "key",
        "credential",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| k.contains(s))
        && !k.ends_with(".location.type")
}

fn url_error(why: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("not a valid kafka:// URL: {why}"),
    )
}

/// The bootstrap list of a URL authority: `host[:port]` entries separated by
/// commas (`[v6]:port` for IPv6 addresses).
fn bootstrap_servers(authority: &str) -> Result<String, Error> {
    if authority.trim().is_empty() {
        return Err(url_error(
            "it names no server: expected kafka://host:port[,host:port]",
        ));
    }
    let mut servers = Vec::new();
    for server in authority.split(',') {
        let server =
            percent_decode(server.trim()).map_err(|why| url_error(&format!("a server {why}")))?;
        let (host, port) = if let Some(v6) = server.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| url_error(&format!("the server `{server}` has no closing `]`")))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    url_error(&format!("the server `{server}` has junk after `]`"))
                })?),
            };
            (host, port)
        } else {
            match server.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (server.as_str(), None),
            }
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(url_error(&format!(
                "the server `{server}` has no valid host (expected host:port)"
            )));
        }
        if let Some(port) = port {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(url_error(&format!(
                    "the server `{server}` has an invalid port `{port}`"
                )));
            }
        }
        servers.push(server);
    }
    Ok(servers.join(","))
}

/// Decodes `%XX` escapes (nothing else: a `+` stays a `+`).
fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has a bad percent escape (expected %XX)")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once percent-decoded")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .client
            .config_map()
            .into_iter()
            .map(|(k, v)| (k, if is_secret(k) { "<redacted>" } else { v }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("properties", &props)
            .field("retry_tiers", &self.tiers)
            .field("topology", &self.topology)
            .field("foreign_type", &self.foreign_type)
            .field("consume_retry_topics", &self.retry_topics)
            .field("revoke_timeout", &self.revoke_timeout)
            .field("dlq_ops_group", &self.ops_group)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let c = KafkaConfig::new("b:9092")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "pw2")
            .set("sasl.oauthbearer.client.secret", "pw3")
            .set("sasl.jaas.config", "pw4");
        let s = format!("{c:?}");
        for secret in ["hunter2", "pw2", "pw3", "pw4"] {
            assert!(!s.contains(secret), "{s}");
        }
        assert!(s.contains("b:9092"));
    }

    #[test]
    fn passthrough_and_defaults() {
        let mut native = ClientConfig::new();
        native.set("bootstrap.servers", "x:1").set("acks", "1");
        let c = KafkaConfig::from_client_config(native);
        let merged = c.with_defaults(&[("acks", "all"), ("linger.ms", "5")]);
        assert_eq!(merged.get("acks"), Some("1"));
        assert_eq!(merged.get("linger.ms"), Some("5"));
        assert_eq!(c.max_message_bytes(), 1_000_000);
    }

    #[test]
    fn url_servers_and_properties() {
        let c = KafkaConfig::from_url(
            "kafka://b1:9092, b2:9093,[::1]:9094/?acks=1&sasl.password=p%40ss%26w+rd%3D&client.id=a%2Fb",
        )
        .unwrap();
        assert_eq!(
            c.get("bootstrap.servers"),
            Some("b1:9092,b2:9093,[::1]:9094")
        );
        assert_eq!(c.get("acks"), Some("1"));
        assert_eq!(c.get("sasl.password"), Some("p@ss&w+rd="));
        assert_eq!(c.get("client.id"), Some("a/b"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("p@ss"), "{shown}");
        let c = KafkaConfig::from_url("KAFKA://localhost").unwrap();
        assert_eq!(c.get("bootstrap.servers"), Some("localhost"));
        assert_eq!(c.mode, ContentMode::Binary);
    }

    #[test]
    fn url_content_mode_is_postboxs_not_a_librdkafka_property() {
        let c = KafkaConfig::from_url("kafka://h:9092?content_mode=Structured&acks=all").unwrap();
        assert_eq!(c.mode, ContentMode::Structured);
        assert_eq!(c.get("content_mode"), None);
        assert_eq!(c.get("acks"), Some("all"));
        let e = KafkaConfig::from_url("kafka://h:9092?content_mode=text").unwrap_err();
        assert!(e.to_string().contains("content_mode"), "{e}");
    }

    #[test]
    fn bad_urls_are_config_errors_that_name_the_problem_and_hide_values() {
        let cases = [
            ("amqp://h:5672", "scheme"),
            ("127.0.0.1:9092", "no scheme"),
            ("kafka://", "names no server"),
            ("kafka://?acks=all", "names no server"),
            ("kafka://a:9092,,b:9092", "no valid host"),
            ("kafka://:9092", "no valid host"),
            ("kafka://a:port", "invalid port"),
            ("kafka://a:0", "invalid port"),
            ("kafka://[::1", "closing"),
            ("kafka://a:9092/orders", "path"),
            ("kafka://u:hunter2@a:9092", "user info"),
            ("kafka://a:9092?hunter2", "no `=`"),
            ("kafka://a:9092?=hunter2", "no name"),
            ("kafka://a:9092?sasl.password=%zzhunter2", "sasl.password"),
            ("kafka://a:9092?bootstrap.servers=b:1", "bootstrap.servers"),
            ("kafka://a:9092?sasl.password=x#hunter2", "fragment"),
        ];
        for (url, says) in cases {
            let e = KafkaConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config, "{url}");
            let text = format!("{e} {e:?}");
            assert!(text.contains(says), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{url} leaked: {text}");
        }
    }
}
