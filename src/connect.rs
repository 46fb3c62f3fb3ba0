//! `connect(url)`: a broker handle from a URL, so a service's code names no
//! broker and switching broker is changing the URL.

use postbox_core::{AnyBroker, Error, ErrorKind};

/// The variable [`connect_from_env`] reads.
pub const URL_ENV: &str = "POSTBOX_URL";

/// Connects to the broker a URL names and returns its handle.
///
/// | URL | broker | cargo feature |
/// |---|---|---|
/// | `memory://` | a new in-process broker | `memory` (default) |
/// | `memory://<name>` | the in-process broker of that name, shared by every `connect` in this process | `memory` |
/// | `kafka://host:port[,host:port][?librdkafka.property=value…]` | Apache Kafka; every query parameter is a librdkafka property | `kafka` |
/// | `amqp://user:pass@host:port/vhost`, `amqps://…` | RabbitMQ | `rabbitmq` |
/// | `sqs://[?region=…&endpoint=…]` | AWS SQS and SNS (the AWS default credential chain; `sns:<topic>` destinations) | `sqs` |
///
/// `memory://?limits=sqs` makes the in-process broker reject what SQS would.
/// An unknown scheme, or one whose feature is off, is an
/// [`ErrorKind::Config`] error that names it (and the feature to enable).
/// Passwords in the URL never appear in errors, `Debug` output or logs.
///
/// ```
/// use postbox::{Broker, Envelope, Publisher, SubscribeOptions};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), postbox::Error> {
/// let broker = postbox::connect("memory://").await?;
/// broker.provision("orders", &SubscribeOptions::group("billing")).await?;
/// broker.publish("orders", Envelope::new("order.placed", r#"{"id":1}"#)).await?;
/// assert_eq!(broker.backlog("orders", Some("billing")).await?.waiting, 1);
/// broker.close().await?;
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<AnyBroker, Error> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "`{}` is not a broker URL: expected one of memory://, kafka://host:port, amqp://host, amqps://host, sqs://",
                redact(url)
            ),
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "memory" => memory(url),
        "kafka" => kafka(url).await,
        "amqp" | "amqps" => rabbitmq(url).await,
        "sqs" => sqs(url).await,
        other => Err(Error::new(
            ErrorKind::Config,
            format!(
                "unknown broker URL scheme `{other}://` in `{}`: expected memory, kafka, amqp, amqps or sqs",
                redact(url)
            ),
        )),
    }
}

/// [`connect`] to the URL in the `POSTBOX_URL` variable; an unset or empty
/// variable is an [`ErrorKind::Config`] error that names it.
pub async fn connect_from_env() -> Result<AnyBroker, Error> {
    connect_to(std::env::var(URL_ENV).ok()).await
}

async fn connect_to(url: Option<String>) -> Result<AnyBroker, Error> {
    match url {
        Some(url) if !url.trim().is_empty() => connect(url.trim()).await,
        _ => Err(Error::new(
            ErrorKind::Config,
            format!("{URL_ENV} is not set: set it to a broker URL such as memory://, kafka://127.0.0.1:9092, amqp://127.0.0.1:5672 or sqs://"),
        )),
    }
}

#[cfg(not(all(
    feature = "memory",
    feature = "kafka",
    feature = "rabbitmq",
    feature = "sqs"
)))]
fn feature_off(scheme: &str, feature: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "`{scheme}://` URLs need the `{feature}` feature of postbox: postbox = {{ version = \"…\", features = [\"{feature}\"] }}"
        ),
    )
}

#[cfg(feature = "memory")]
fn memory(url: &str) -> Result<AnyBroker, Error> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use postbox_memory::{Limits, MemoryBroker};

    static NAMED: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();

    let rest = &url[url.find("://").map_or(0, |i| i + 3)..];
    let (name, query) = rest.split_once('?').unwrap_or((rest, ""));
    let name = name.trim_end_matches('/');
    let mut limits = Limits::none();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limits", "sqs")) => limits = Limits::sqs(),
            Some(("limits", "none")) => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                    "memory:// does not understand `{pair}`: the only parameter is limits=sqs|none"
                ),
                ))
            }
        }
    }
    if name.is_empty() {
        return Ok(AnyBroker::new(MemoryBroker::with_limits(limits)));
    }
    let mut named = NAMED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let broker = named
        .entry(name.to_string())
        .or_insert_with(|| MemoryBroker::with_limits(limits.clone()));
    if broker.limits() != &limits {
        return Err(Error::new(
            ErrorKind::Config,
            format!("the in-process broker `{name}` already exists with other limits"),
        ));
    }
    Ok(AnyBroker::new(broker.clone()))
}

#[cfg(not(feature = "memory"))]
fn memory(_url: &str) -> Result<AnyBroker, Error> {
    Err(feature_off("memory", "memory"))
}

#[cfg(feature = "kafka")]
async fn kafka(url: &str) -> Result<AnyBroker, Error> {
    let config = postbox_kafka::KafkaConfig::from_url(url)?;
    Ok(AnyBroker::new(
        postbox_kafka::KafkaBroker::connect(config).await?,
    ))
}

#[cfg(not(feature = "kafka"))]
async fn kafka(_url: &str) -> Result<AnyBroker, Error> {
    Err(feature_off("kafka", "kafka"))
}

#[cfg(feature = "rabbitmq")]
async fn rabbitmq(url: &str) -> Result<AnyBroker, Error> {
    let config = postbox_rabbitmq::RabbitConfig::from_url(url)?;
    Ok(AnyBroker::new(
        postbox_rabbitmq::RabbitBroker::connect(config).await?,
    ))
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq(url: &str) -> Result<AnyBroker, Error> {
    let scheme = url.split_once("://").map_or("amqp", |(s, _)| s);
    Err(feature_off(scheme, "rabbitmq"))
}

#[cfg(feature = "sqs")]
async fn sqs(url: &str) -> Result<AnyBroker, Error> {
    let config = postbox_sqs::SqsConfig::from_url(url)?;
    Ok(AnyBroker::new(
        postbox_sqs::SqsBroker::connect(config).await?,
    ))
}

#[cfg(not(feature = "sqs"))]
async fn sqs(_url: &str) -> Result<AnyBroker, Error> {
    Err(feature_off("sqs", "sqs"))
}

/// `url` with the password of its user info and the values of secret-looking
/// query parameters replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let (head, query) = url.split_once('?').unwrap_or((url, ""));
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest
                .split_once('/')
                .map_or((rest, None), |(a, p)| (a, Some(p)));
            let authority = match authority.rsplit_once('@') {
                Some((user_info, host)) => match user_info.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => format!("{user_info}@{host}"),
                },
                None => authority.to_string(),
            };
            match path {
                Some(p) => format!("{scheme}://{authority}/{p}"),
                None => format!("{scheme}://{authority}"),
            }
        }
        None => head.to_string(),
    };
    if !query.is_empty() {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if is_secret(k) => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "key", "jaas", "credential"]
        .iter()
        .any(|s| k.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_secret_parameters() {
        assert_eq!(
            redact("amqp://app:hunter2@rabbit:5672/%2f"),
            "amqp://app:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redact("kafka://b1:9092?sasl.password=hunter2&acks=all&ssl.key.password=x"),
            "kafka://b1:9092?sasl.password=***&acks=all&ssl.key.password=***"
        );
        assert_eq!(redact("sqs://?region=eu-west-1"), "sqs://?region=eu-west-1");
    }

    #[tokio::test]
    async fn unknown_scheme_is_a_config_error_without_the_password() {
        let err = connect("nats://u:hunter2@host").await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.message().contains("`nats://`"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = connect("localhost:9092").await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn named_memory_brokers_are_shared_and_anonymous_ones_are_not() {
        use postbox_core::{Broker, Envelope, Publisher};
        let name = format!("memory://shared-{}", std::process::id());
        let a = connect(&name).await.unwrap();
        let b = connect(&name).await.unwrap();
        a.publish("q", Envelope::new("t", "{}")).await.unwrap();
        assert_eq!(b.backlog("q", None).await.unwrap().waiting, 1);
        let c = connect("memory://").await.unwrap();
        assert_eq!(
            c.backlog("q", None).await.unwrap_err().kind(),
            &ErrorKind::NotFound
        );
        let err = connect("memory://?limits=huge").await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.message().contains("limits=huge"), "{err}");
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_with_sqs_limits_rejects_what_sqs_would() {
        use postbox_core::{Broker, Envelope};
        let broker = connect("memory://?limits=sqs").await.unwrap();
        assert_eq!(broker.capabilities().max_headers, Some(10));
        let err = broker
            .publish_delayed(
                "q",
                Envelope::new("t", "{}"),
                std::time::Duration::from_secs(3600),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err.error.kind(), ErrorKind::LimitExceeded(_)),
            "{err}"
        );
    }

    #[cfg(not(feature = "kafka"))]
    #[tokio::test]
    async fn a_scheme_whose_feature_is_off_names_the_feature() {
        let err = connect("kafka://127.0.0.1:9092").await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.message().contains("`kafka` feature"), "{err}");
    }

    #[tokio::test]
    async fn an_unset_or_empty_variable_is_named() {
        for value in [None, Some(" ".to_string())] {
            let err = connect_to(value).await.unwrap_err();
            assert_eq!(err.kind(), &ErrorKind::Config);
            assert!(err.message().contains(URL_ENV), "{err}");
        }
    }
}
