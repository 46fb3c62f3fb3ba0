//! Topic provisioning through the admin client (idempotent).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use postbox_core::delay::DelayTiers;
use postbox_core::{Error, ErrorKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::{from_kafka, kind_of_code};
use crate::retry::{dlq_topic, retry_topics};

/// What provisioning creates for a topic: the topic, its retry tier topics
/// and its DLQ `<topic>.dlq`, with these partitions, replication and topic
/// configs. Set on the configuration with
/// [`KafkaConfig::topology`](crate::KafkaConfig::topology).
///
/// ```
/// use postbox_kafka::{KafkaConfig, TopologySpec};
/// let spec = TopologySpec::new(6, 3).config("retention.ms", "604800000");
/// let config = KafkaConfig::new("127.0.0.1:9092").topology(spec);
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologySpec {
    /// Partitions of the topic, its retry tiers and its DLQ.
    pub partitions: i32,
    /// Replication factor.
    pub replication: i32,
    /// Topic-level configs (`retention.ms`, …) for every topic created.
    pub configs: Vec<(String, String)>,
    /// Whether to create the retry tier topics.
    pub retry_tiers: bool,
    /// Whether to create the DLQ topic `<topic>.dlq`.
    pub dlq: bool,
}

impl TopologySpec {
    /// `partitions` partitions, replication `replication`, retry tiers and
    /// DLQ. `-1` for either takes the broker's `num.partitions` /
    /// `default.replication.factor` (Kafka 2.4 and later).
    pub fn new(partitions: i32, replication: i32) -> Self {
        TopologySpec {
            partitions,
            replication,
            configs: Vec::new(),
            retry_tiers: true,
            dlq: true,
        }
    }

    /// Adds a topic-level config (`retention.ms`, `min.insync.replicas`, …)
    /// to every topic created.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.configs.push((key.into(), value.into()));
        self
    }
}

impl Default for TopologySpec {
    /// The broker's default partitions and replication (`-1`, `-1`), with
    /// retry tiers and DLQ.
    fn default() -> Self {
        TopologySpec::new(-1, -1)
    }
}

/// The admin client: creates and deletes topics.
pub(crate) struct Admin {
    admin: AdminClient<DefaultClientContext>,
    tiers: DelayTiers,
    timeout: Duration,
}

impl Admin {
    /// An admin client for the configured cluster.
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self, Error> {
        let admin = config
            .client_config()
            .create()
            .map_err(|e| from_kafka("the Kafka admin client could not be created", e))?;
        Ok(Admin {
            admin,
            tiers: config.tiers.clone(),
            timeout: config.request_timeout,
        })
    }

    /// The names `topic` needs under `spec`: itself, its retry tiers, its DLQ.
    pub(crate) fn topic_names(&self, topic: &str, spec: &TopologySpec) -> Vec<String> {
        let mut names = vec![topic.to_string()];
        if spec.retry_tiers {
            names.extend(retry_topics(topic, &self.tiers));
        }
        if spec.dlq {
            names.push(dlq_topic(topic));
        }
        names
    }

    /// The topics of the cluster (a metadata request for all topics, which
    /// never auto-creates one).
    pub(crate) fn existing_topics(&self) -> Result<HashSet<String>, Error> {
        let md = self
            .admin
            .inner()
            .fetch_metadata(None, self.timeout)
            .map_err(|e| from_kafka("fetching the cluster metadata failed", e))?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_string())
            .collect())
    }

    /// Creates those of `names` that do not exist yet. Existing topics are
    /// left as they are, and when all exist no creation is asked for at all,
    /// so a principal without the `CREATE` ACL can provision a topology that
    /// operations created beforehand.
    pub(crate) async fn ensure_topics(
        self: &Arc<Self>,
        names: &[String],
        spec: &TopologySpec,
    ) -> Result<(), Error> {
        let admin = self.clone();
        let existing = tokio::task::spawn_blocking(move || admin.existing_topics())
            .await
            .map_err(|e| Error::new(ErrorKind::Other, "a metadata task failed").with_source(e))??;
        let missing: Vec<&String> = names.iter().filter(|n| !existing.contains(*n)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|n| {
                spec.configs.iter().fold(
                    NewTopic::new(
                        n,
                        spec.partitions,
                        TopicReplication::Fixed(spec.replication),
                    ),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results = self
            .admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| from_kafka("creating topics failed", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::new(
                        kind_of_code(code),
                        format!("creating topic {name} failed: {code}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Deletes topics (missing ones are ignored).
    pub(crate) async fn delete_topics(&self, names: &[&str]) -> Result<(), Error> {
        let options = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results = self
            .admin
            .delete_topics(names, &options)
            .await
            .map_err(|e| from_kafka("deleting topics failed", e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(Error::new(
                        ErrorKind::Rejected,
                        format!("deleting topic {name} failed: {code}"),
                    ))
                }
            }
        }
        Ok(())
    }
}
