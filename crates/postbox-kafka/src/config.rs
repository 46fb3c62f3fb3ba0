//! Configuration: an `rdkafka::ClientConfig` passed through as-is, plus a
//! bootstrap-servers shortcut and the `KAFKA_BOOTSTRAP_SERVERS` variable.
//!
//! `Debug` never shows secrets: any property whose name mentions a password,
//! secret, key, token or JAAS configuration is printed as `<redacted>`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use postbox_core::{Error, ErrorKind};
use rdkafka::ClientConfig;

use crate::retry::RetryTiers;

/// The environment variable with the bootstrap servers.
pub const BOOTSTRAP_ENV: &str = "KAFKA_BOOTSTRAP_SERVERS";

/// Configuration shared by the publisher, the consumers and the admin/ops
/// clients of one Kafka cluster.
///
/// ```
/// use postbox_kafka::KafkaConfig;
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanism", "SCRAM-SHA-512")
///     .set("sasl.username", "app")
///     .set("sasl.password", "s3cret");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    client: ClientConfig,
    /// Delay tiers of the retry topics (`<topic>.retry.<tier>`).
    pub(crate) tiers: RetryTiers,
    /// How long a revoke waits for in-flight work of the revoked partitions.
    pub(crate) revoke_timeout: Duration,
    /// The consumer group of the DLQ operations (peek/replay/purge).
    pub(crate) ops_group: String,
    /// Time-out of admin and metadata requests.
    pub(crate) request_timeout: Duration,
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
            tiers: RetryTiers::default(),
            revoke_timeout: Duration::from_secs(10),
            ops_group: "postbox-dlq-ops".to_string(),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// A configuration from `KAFKA_BOOTSTRAP_SERVERS`; a [`ErrorKind::Config`]
    /// error when it is unset or empty.
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var(BOOTSTRAP_ENV) {
            Ok(v) if !v.trim().is_empty() => Ok(Self::new(v.trim())),
            _ => Err(Error::new(
                ErrorKind::Config,
                format!("{BOOTSTRAP_ENV} is not set"),
            )),
        }
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

    /// Sets the retry delay tiers (default [`RetryTiers::default`]).
    pub fn retry_tiers(mut self, tiers: RetryTiers) -> Self {
        self.tiers = tiers;
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
    ["password", "secret", "jaas", "token", "key"]
        .iter()
        .any(|s| k.contains(s))
        && !k.ends_with(".location.type")
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
            .field("revoke_timeout", &self.revoke_timeout)
            .field("dlq_ops_group", &self.ops_group)
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
}
