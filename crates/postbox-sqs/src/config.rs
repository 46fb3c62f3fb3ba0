//! [`SqsConfig`]: how [`SqsBroker::connect`](crate::SqsBroker::connect)
//! reaches AWS (the default chain with overrides, an `SdkConfig`, or ready
//! clients) and the adapter's defaults; destination addressing and queue-name
//! normalisation.

use std::fmt;
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use postbox_core::envelope::Text;
use postbox_core::{Error, ErrorKind};

use crate::codec;

/// What a destination string addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// An SQS queue: a normalised name, or a URL.
    Queue(String),
    /// An SNS topic: a name or an ARN.
    Topic(String),
}

impl Destination {
    /// Parses a destination string (see the crate docs' addressing table).
    pub(crate) fn parse(destination: &str) -> Destination {
        if let Some(topic) = destination.strip_prefix("sns:") {
            Destination::Topic(topic.to_string())
        } else if destination.starts_with("arn:") && destination.contains(":sns:") {
            Destination::Topic(destination.to_string())
        } else {
            let queue = destination.strip_prefix("sqs:").unwrap_or(destination);
            Destination::Queue(queue_name(queue))
        }
    }

    /// Whether the queue or topic is FIFO (its name ends in `.fifo`).
    pub(crate) fn is_fifo(&self) -> bool {
        match self {
            Destination::Queue(q) | Destination::Topic(q) => q.ends_with(".fifo"),
        }
    }
}

/// The queue of consumer group `group` on SNS topic `topic` (a name or an
/// ARN): `<topic>-<group>`, FIFO when the topic is (`orders.fifo` + `billing`
/// → `orders-billing.fifo`).
pub(crate) fn group_queue(topic: &str, group: &str) -> String {
    let topic = topic.rsplit(':').next().unwrap_or(topic);
    match topic.strip_suffix(".fifo") {
        Some(base) => queue_name(&format!("{base}-{group}.fifo")),
        None => queue_name(&format!("{topic}-{group}")),
    }
}

/// Normalises an SQS queue name (URLs are kept): dots become `-`, and a
/// `.fifo` anywhere in the name becomes the suffix.
///
/// ```
/// use postbox_sqs::queue_name;
/// assert_eq!(queue_name("orders.dlq"), "orders-dlq");
/// assert_eq!(queue_name("orders.fifo.dlq"), "orders-dlq.fifo");
/// assert_eq!(queue_name("orders.fifo"), "orders.fifo");
/// ```
pub fn queue_name(name: &str) -> String {
    if is_url(name) {
        return name.to_string();
    }
    let fifo = name.ends_with(".fifo") || name.contains(".fifo.");
    let base = if fifo {
        name.replace(".fifo.", ".")
            .trim_end_matches(".fifo")
            .to_string()
    } else {
        name.to_string()
    };
    let mut out = base.replace('.', "-");
    if fifo {
        out.push_str(".fifo");
    }
    out
}

pub(crate) fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

/// The queue name of a URL or a name.
pub(crate) fn name_of(queue: &str) -> &str {
    if is_url(queue) {
        queue.rsplit('/').next().unwrap_or(queue)
    } else {
        queue
    }
}

/// How a FIFO destination's `MessageDeduplicationId` is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FifoDeduplication {
    /// The envelope id (default): a republished envelope is dropped by SQS/SNS
    /// within the 5-minute de-duplication window.
    #[default]
    EnvelopeId,
    /// No id is sent: the queue or topic must have content-based
    /// de-duplication enabled.
    ContentBased,
    /// A fresh id per send: every publish is delivered, duplicates included
    /// (leave de-duplication to the consumer's idempotency layer).
    PerSend,
}

/// The adapter's own settings, applied by the broker handle.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Concurrent `ReceiveMessage` long polls per subscription.
    pub(crate) receivers: usize,
    /// Long-polling wait (≤ 20 s).
    pub(crate) wait_time: Duration,
    /// Visibility timeout asked for on receive and kept by the heartbeat.
    pub(crate) visibility_timeout: Duration,
    /// Received messages buffered ahead of the runtime.
    pub(crate) buffer: usize,
    /// The `type` of foreign messages.
    pub(crate) foreign_type: Text,
    pub(crate) fifo_dedup: FifoDeduplication,
    pub(crate) fifo_default_group: Option<String>,
    pub(crate) max_sqs_bytes: usize,
    pub(crate) max_sns_bytes: usize,
    /// `maxReceiveCount` of the redrive policy of provisioned queues.
    pub(crate) max_receive_count: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            receivers: 2,
            wait_time: Duration::from_secs(20),
            visibility_timeout: Duration::from_secs(30),
            buffer: 10,
            foreign_type: Text::Borrowed(postbox_core::codec::foreign::DEFAULT_FOREIGN_TYPE),
            fifo_dedup: FifoDeduplication::default(),
            fifo_default_group: None,
            max_sqs_bytes: codec::SQS_MAX_BYTES,
            max_sns_bytes: codec::SNS_MAX_BYTES,
            max_receive_count: 10,
        }
    }
}

/// Where the AWS clients come from.
#[derive(Clone)]
enum Clients {
    /// The AWS default chain (environment, profile, web identity, container
    /// and instance metadata), with the overrides of [`SqsConfig`].
    Chain,
    /// A shared AWS configuration built by the application.
    Sdk(Box<SdkConfig>),
    /// Ready clients.
    Ready(aws_sdk_sqs::Client, aws_sdk_sns::Client),
}

/// Static credentials (emulators); never printed.
#[derive(Clone)]
struct StaticCredentials {
    access_key_id: String,
    secret_access_key: String,
}

/// How to reach SQS and SNS, and the adapter's defaults: what
/// [`SqsBroker::connect`](crate::SqsBroker::connect) takes.
///
/// * [`SqsConfig::from_env`]: the AWS default chain (`AWS_REGION`,
///   `AWS_ENDPOINT_URL`, credentials from the environment, profile, web
///   identity, container or instance metadata);
/// * [`SqsConfig::from_url`]: the same, with `region` / `endpoint` from an
///   `sqs://?region=…&endpoint=…` URL;
/// * [`SqsConfig::from_sdk_config`] / [`SqsConfig::from_clients`]: your own
///   AWS configuration or clients, passed through untouched.
///
/// The consumer, FIFO and size settings apply to all four. `Debug` never
/// shows credentials, nor the user-info part of an endpoint.
///
/// ```
/// use std::time::Duration;
/// use postbox_sqs::SqsConfig;
/// let config = SqsConfig::from_url("sqs://?region=eu-west-1&endpoint=http://127.0.0.1:4566")?
///     .credentials("test", "test") // emulators only; AWS: the default chain
///     .wait_time(Duration::from_secs(5))
///     .visibility_timeout(Duration::from_secs(60));
/// assert!(!format!("{config:?}").contains("test"));
/// # Ok::<(), postbox_core::Error>(())
/// ```
#[derive(Clone)]
pub struct SqsConfig {
    clients: Clients,
    region: Option<String>,
    endpoint: Option<String>,
    credentials: Option<StaticCredentials>,
    behavior_version: Option<BehaviorVersion>,
    connect_timeout: Option<Duration>,
    operation_timeout: Option<Duration>,
    pub(crate) settings: Settings,
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clients = match &self.clients {
            Clients::Chain => "AWS default chain",
            Clients::Sdk(_) => "SdkConfig",
            Clients::Ready(..) => "ready clients",
        };
        f.debug_struct("SqsConfig")
            .field("clients", &clients)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("settings", &self.settings)
            .finish()
    }
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message.into())
}

/// `url` with any user-info (`user:password@`) replaced, for messages and `Debug`.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let rest = match rest[..end].rfind('@') {
        Some(at) => format!("<redacted>@{}", &rest[at + 1..]),
        None => rest.to_string(),
    };
    match scheme {
        Some(s) => format!("{s}://{rest}"),
        None => rest,
    }
}

/// Decodes `%XX` escapes of a URL query component.
fn percent_decode(s: &str, what: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| config_error(format!("bad %-escape in sqs:// URL {what}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| config_error(format!("sqs:// URL {what} is not UTF-8 once decoded")))
}

fn check_endpoint(endpoint: &str, name: &str) -> Result<(), Error> {
    if is_url(endpoint) && endpoint.len() > "https://".len() {
        Ok(())
    } else {
        Err(config_error(format!(
            "{name} must be an http:// or https:// URL, got {:?}",
            redact_url(endpoint)
        )))
    }
}

impl SqsConfig {
    fn with_clients(clients: Clients) -> Self {
        SqsConfig {
            clients,
            region: None,
            endpoint: None,
            credentials: None,
            behavior_version: None,
            connect_timeout: None,
            operation_timeout: None,
            settings: Settings::default(),
        }
    }

    /// The AWS default chain: region from `AWS_REGION` (or the profile, or
    /// instance metadata), endpoint from `AWS_ENDPOINT_URL` when set
    /// (LocalStack and other emulators), credentials from the environment,
    /// profile, web identity, container or instance metadata.
    ///
    /// The chain is resolved by [`SqsBroker::connect`](crate::SqsBroker::connect),
    /// which fails with [`ErrorKind::Config`] naming `AWS_REGION` when no
    /// region can be found. A set `AWS_ENDPOINT_URL` that is not an
    /// `http(s)://` URL is a [`ErrorKind::Config`] error here.
    pub fn from_env() -> Result<SqsConfig, Error> {
        if let Some(endpoint) = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|v| !v.is_empty())
        {
            check_endpoint(&endpoint, "AWS_ENDPOINT_URL")?;
        }
        Ok(Self::with_clients(Clients::Chain))
    }

    /// The default chain (see [`SqsConfig::from_env`]) with the overrides of
    /// an `sqs://` URL: `sqs://`, `sqs://?region=eu-west-1`,
    /// `sqs://?endpoint=http://127.0.0.1:4566&region=us-east-1` (values may be
    /// %-encoded). Credentials always come from the chain, never from the URL.
    ///
    /// Another scheme, a host or path, or an unknown, repeated or empty
    /// parameter is an [`ErrorKind::Config`] error naming it.
    ///
    /// ```
    /// use postbox_core::ErrorKind;
    /// use postbox_sqs::SqsConfig;
    /// assert!(SqsConfig::from_url("sqs://?region=eu-west-1").is_ok());
    /// let e = SqsConfig::from_url("sqs://?regoin=eu-west-1").unwrap_err();
    /// assert_eq!(e.kind(), &ErrorKind::Config);
    /// assert!(e.message().contains("regoin"));
    /// ```
    pub fn from_url(url: &str) -> Result<SqsConfig, Error> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            config_error(format!(
                "{:?} is not an sqs:// URL (sqs://?region=…&endpoint=…)",
                redact_url(url)
            ))
        })?;
        if !scheme.eq_ignore_ascii_case("sqs") {
            return Err(config_error(format!(
                "the URL scheme {scheme:?} is not sqs (sqs://?region=…&endpoint=…)"
            )));
        }
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !location.is_empty() && location != "/" {
            return Err(config_error(format!(
                "an sqs:// URL has no host or path (got {:?}): give the endpoint as ?endpoint=http://…",
                redact_url(location)
            )));
        }
        let mut config = Self::with_clients(Clients::Chain);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key, "parameter name")?;
            let value = percent_decode(value, &format!("parameter {key:?}"))?;
            let slot = match key.as_str() {
                "region" => &mut config.region,
                "endpoint" => {
                    check_endpoint(&value, "the sqs:// URL parameter \"endpoint\"")?;
                    &mut config.endpoint
                }
                other => {
                    return Err(config_error(format!(
                        "unknown sqs:// URL parameter {other:?} (known: region, endpoint)"
                    )))
                }
            };
            if value.is_empty() {
                return Err(config_error(format!(
                    "the sqs:// URL parameter {key:?} is empty"
                )));
            }
            if slot.replace(value).is_some() {
                return Err(config_error(format!(
                    "the sqs:// URL parameter {key:?} is given twice"
                )));
            }
        }
        Ok(config)
    }

    /// Clients built from a shared AWS configuration (native passthrough:
    /// region, endpoint, credentials, retry and timeouts are yours).
    pub fn from_sdk_config(config: &SdkConfig) -> SqsConfig {
        Self::with_clients(Clients::Sdk(Box::new(config.clone())))
    }

    /// Ready clients (native passthrough: any configuration).
    pub fn from_clients(sqs: aws_sdk_sqs::Client, sns: aws_sdk_sns::Client) -> SqsConfig {
        Self::with_clients(Clients::Ready(sqs, sns))
    }

    /// The AWS region (overrides the chain's). Default chain only.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// The endpoint of SQS and SNS, e.g. an emulator's `http://127.0.0.1:4566`
    /// (overrides `AWS_ENDPOINT_URL`). Default chain only.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Static credentials, for emulators (AWS: leave them to the default
    /// chain). Never printed. Default chain only.
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some(StaticCredentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        });
        self
    }

    /// The SDK behavior version (default: the latest this build knows).
    /// Default chain only.
    pub fn behavior_version(mut self, version: BehaviorVersion) -> Self {
        self.behavior_version = Some(version);
        self
    }

    /// How long opening a connection may take (SDK default 3.1 s). Default
    /// chain only.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long one operation may take, retries included (SDK default: no
    /// limit). Keep it above [`SqsConfig::wait_time`]: a long poll is an
    /// operation. Default chain only.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = Some(timeout);
        self
    }

    /// Concurrent `ReceiveMessage` long polls per subscription (default 2,
    /// at least 1).
    ///
    /// An ack returns once SQS confirmed the delete, so a consumer worker is
    /// held for that round trip too: for throughput, give the consumer a
    /// concurrency of about twice `receivers × prefetch`.
    pub fn receivers(mut self, n: usize) -> Self {
        self.settings.receivers = n.max(1);
        self
    }

    /// The long-polling wait (default 20 s; at most 20 s, whole seconds).
    pub fn wait_time(mut self, wait: Duration) -> Self {
        self.settings.wait_time = wait.min(Duration::from_secs(20));
        self
    }

    /// The visibility timeout asked for on receive, and what the heartbeat
    /// extends a slow handler's message to (default 30 s; 1 s to 12 h).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.settings.visibility_timeout =
            timeout.clamp(Duration::from_secs(1), crate::retry::MAX_VISIBILITY);
        self
    }

    /// Received messages buffered ahead of the consumer runtime (default 10,
    /// at least 1). The buffer is bounded: receivers wait when it is full.
    pub fn buffer(mut self, n: usize) -> Self {
        self.settings.buffer = n.max(1);
        self
    }

    /// The `type` of foreign messages (default `postbox.foreign`).
    pub fn foreign_type(mut self, event_type: impl Into<Text>) -> Self {
        self.settings.foreign_type = event_type.into();
        self
    }

    /// How FIFO de-duplication ids are chosen (default: the envelope id).
    pub fn fifo_deduplication(mut self, dedup: FifoDeduplication) -> Self {
        self.settings.fifo_dedup = dedup;
        self
    }

    /// The message group of FIFO messages without a partition key (default:
    /// none, such a message is refused with
    /// [`Limit::FifoGroupRequired`](postbox_core::Limit::FifoGroupRequired)).
    pub fn fifo_default_group(mut self, group: impl Into<String>) -> Self {
        self.settings.fifo_default_group = Some(group.into());
        self
    }

    /// Overrides the size limits checked before sending (default 1 MiB for
    /// SQS, 256 KiB for SNS).
    pub fn max_bytes(mut self, sqs: usize, sns: usize) -> Self {
        self.settings.max_sqs_bytes = sqs;
        self.settings.max_sns_bytes = sns;
        self
    }

    /// The redrive policy's `maxReceiveCount` of the queues that
    /// provisioning declares (default 10, at least 1). Keep it above the
    /// retry policy's attempts: postbox dead-letters with metadata first; the
    /// redrive policy is the safety net.
    pub fn max_receive_count(mut self, n: u32) -> Self {
        self.settings.max_receive_count = n.max(1);
        self
    }

    /// The SQS and SNS clients this configuration describes, and the settings.
    pub(crate) async fn into_parts(
        self,
    ) -> Result<(aws_sdk_sqs::Client, aws_sdk_sns::Client, Settings), Error> {
        let chain_only = [
            ("region", self.region.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("credentials", self.credentials.is_some()),
            ("behavior_version", self.behavior_version.is_some()),
            ("connect_timeout", self.connect_timeout.is_some()),
            ("operation_timeout", self.operation_timeout.is_some()),
        ];
        let (sqs, sns) = match self.clients {
            Clients::Chain => {
                let sdk = load_chain(
                    self.behavior_version,
                    self.region,
                    self.endpoint,
                    self.credentials,
                    self.connect_timeout,
                    self.operation_timeout,
                )
                .await;
                (
                    aws_sdk_sqs::Client::new(&sdk),
                    aws_sdk_sns::Client::new(&sdk),
                )
            }
            Clients::Sdk(sdk) => {
                refuse_chain_settings(&chain_only)?;
                (
                    aws_sdk_sqs::Client::new(&sdk),
                    aws_sdk_sns::Client::new(&sdk),
                )
            }
            Clients::Ready(sqs, sns) => {
                refuse_chain_settings(&chain_only)?;
                (sqs, sns)
            }
        };
        if sqs.config().region().is_none() || sns.config().region().is_none() {
            return Err(config_error(
                "no AWS region found: set AWS_REGION (or a region in the AWS profile, ?region= in an sqs:// URL, or SqsConfig::region)",
            ));
        }
        Ok((sqs, sns, self.settings))
    }
}

/// Settings of the default chain make no sense with native clients: refused,
/// not silently ignored.
fn refuse_chain_settings(settings: &[(&str, bool)]) -> Result<(), Error> {
    match settings.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(config_error(format!(
            "SqsConfig::{name} applies to the AWS default chain; with your own SdkConfig or clients, set it there"
        ))),
        None => Ok(()),
    }
}

async fn load_chain(
    version: Option<BehaviorVersion>,
    region: Option<String>,
    endpoint: Option<String>,
    credentials: Option<StaticCredentials>,
    connect_timeout: Option<Duration>,
    operation_timeout: Option<Duration>,
) -> SdkConfig {
    let mut loader = aws_config::defaults(version.unwrap_or_else(BehaviorVersion::latest));
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(c) = credentials {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            None,
            None,
            "postbox-sqs static credentials",
        ));
    }
    if connect_timeout.is_some() || operation_timeout.is_some() {
        let mut timeouts = aws_config::timeout::TimeoutConfig::builder();
        if let Some(t) = connect_timeout {
            timeouts = timeouts.connect_timeout(t);
        }
        if let Some(t) = operation_timeout {
            timeouts = timeouts.operation_timeout(t);
        }
        loader = loader.timeout_config(timeouts.build());
    }
    loader.load().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        assert_eq!(
            Destination::parse("sns:orders"),
            Destination::Topic("orders".into())
        );
        assert_eq!(
            Destination::parse("arn:aws:sns:us-east-1:1:orders"),
            Destination::Topic("arn:aws:sns:us-east-1:1:orders".into())
        );
        assert_eq!(
            Destination::parse("orders.dlq"),
            Destination::Queue("orders-dlq".into())
        );
        assert_eq!(
            Destination::parse("sqs:a.fifo"),
            Destination::Queue("a.fifo".into())
        );
        assert!(Destination::parse("a.fifo.dlq").is_fifo());
        let url = "http://127.0.0.1:4566/000000000000/q.x";
        assert_eq!(Destination::parse(url), Destination::Queue(url.into()));
        assert_eq!(name_of(url), "q.x");
    }

    #[test]
    fn group_queues() {
        assert_eq!(group_queue("orders", "billing"), "orders-billing");
        assert_eq!(group_queue("orders.fifo", "billing"), "orders-billing.fifo");
        assert_eq!(
            group_queue("arn:aws:sns:us-east-1:1:orders", "a.b"),
            "orders-a-b"
        );
    }

    #[test]
    fn url_parameters() {
        let c =
            SqsConfig::from_url("sqs://?region=eu-west-1&endpoint=http%3A%2F%2F127.0.0.1%3A4566")
                .unwrap();
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        let c =
            SqsConfig::from_url("SQS:///?endpoint=https://sqs.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(c.region, None);
        assert!(SqsConfig::from_url("sqs://").is_ok());
    }

    #[test]
    fn url_errors_name_what_is_wrong() {
        let cases = [
            ("amqp://?region=x", "\"amqp\""),
            ("sqs:region=x", "not an sqs:// URL"),
            ("sqs://?region=x&queue=q", "\"queue\""),
            ("sqs://?region=x&region=y", "twice"),
            ("sqs://?region=", "empty"),
            ("sqs://?endpoint=localhost:4566", "endpoint"),
            ("sqs://?endpoint=http%ZZ", "%-escape"),
            ("sqs://localhost:4566", "no host or path"),
        ];
        for (url, needle) in cases {
            let e = SqsConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config, "{url}");
            assert!(e.message().contains(needle), "{url}: {e}");
        }
    }

    #[test]
    fn secrets_never_reach_debug_or_messages() {
        let c = SqsConfig::from_url("sqs://?endpoint=http://user:hunter2@127.0.0.1:4566")
            .unwrap()
            .credentials("AKIDEXAMPLE", "wJalrXUtnFEMI");
        let shown = format!("{c:?}");
        for secret in ["hunter2", "AKIDEXAMPLE", "wJalrXUtnFEMI"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("127.0.0.1:4566"), "{shown}");
        let e = SqsConfig::from_url("sqs://user:hunter2@host").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = SqsConfig::from_url("sqs://?endpoint=ftp://u:hunter2@h").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn settings_are_clamped() {
        let c = SqsConfig::from_url("sqs://")
            .unwrap()
            .receivers(0)
            .buffer(0)
            .wait_time(Duration::from_secs(60))
            .visibility_timeout(Duration::ZERO)
            .max_receive_count(0);
        assert_eq!(c.settings.receivers, 1);
        assert_eq!(c.settings.buffer, 1);
        assert_eq!(c.settings.wait_time, Duration::from_secs(20));
        assert_eq!(c.settings.visibility_timeout, Duration::from_secs(1));
        assert_eq!(c.settings.max_receive_count, 1);
    }

    #[tokio::test]
    async fn chain_settings_are_refused_with_ready_clients() {
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build();
        let e = SqsConfig::from_sdk_config(&sdk)
            .endpoint("http://127.0.0.1:1")
            .into_parts()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config);
        assert!(e.message().contains("endpoint"), "{e}");
        let no_region = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .build();
        let e = SqsConfig::from_sdk_config(&no_region)
            .into_parts()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Config);
        assert!(e.message().contains("AWS_REGION"), "{e}");
        assert!(SqsConfig::from_sdk_config(&sdk).into_parts().await.is_ok());
    }
}
