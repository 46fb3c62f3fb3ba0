//! Topic provisioning through the admin client (opt-in, idempotent).

use postbox_core::{Error, ErrorKind};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::error::kind_of_code;
use crate::retry::{dlq_topic, RetryTiers};

/// Partitions, replication and topic configs of the topics to create.
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
    /// `partitions` partitions, replication `replication`, retry tiers and DLQ.
    pub fn new(partitions: i32, replication: i32) -> Self {
        TopologySpec {
            partitions,
            replication,
            configs: Vec::new(),
            retry_tiers: true,
            dlq: true,
        }
    }
}

impl Default for TopologySpec {
    /// One partition, replication 1, with retry tiers and DLQ.
    fn default() -> Self {
        TopologySpec::new(1, 1)
    }
}

/// Creates topics (idempotent: existing topics are left as they are).
pub struct Topology {
    admin: AdminClient<DefaultClientContext>,
    tiers: RetryTiers,
    timeout: std::time::Duration,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology").finish_non_exhaustive()
    }
}

impl Topology {
    /// An admin client for the configured cluster.
    pub fn new(config: &KafkaConfig) -> Result<Self, Error> {
        let admin = config.client_config().create().map_err(|e| {
            crate::error::from_kafka("the Kafka admin client could not be created", e)
        })?;
        Ok(Topology {
            admin,
            tiers: config.tiers.clone(),
            timeout: config.request_timeout,
        })
    }

    /// The names `topic` needs under `spec`: itself, its retry tiers, its DLQ.
    pub fn topic_names(&self, topic: &str, spec: &TopologySpec) -> Vec<String> {
        let mut names = vec![topic.to_string()];
        if spec.retry_tiers {
            names.extend(self.tiers.topics(topic));
        }
        if spec.dlq {
            names.push(dlq_topic(topic));
        }
        names
    }

    /// Creates `topic`, its retry tiers and its DLQ as `spec` says.
    pub async fn ensure_consumer_topology(
        &self,
        topic: &str,
        spec: &TopologySpec,
    ) -> Result<(), Error> {
        let names = self.topic_names(topic, spec);
        self.ensure_topics(&names, spec).await
    }

    /// Creates the topics that do not exist yet.
    pub async fn ensure_topics(&self, names: &[String], spec: &TopologySpec) -> Result<(), Error> {
        let topics: Vec<NewTopic<'_>> = names
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
            .map_err(|e| crate::error::from_kafka("creating topics failed", e))?;
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
    pub async fn delete_topics(&self, names: &[&str]) -> Result<(), Error> {
        let options = AdminOptions::new().operation_timeout(Some(self.timeout));
        let results = self
            .admin
            .delete_topics(names, &options)
            .await
            .map_err(|e| crate::error::from_kafka("deleting topics failed", e))?;
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
