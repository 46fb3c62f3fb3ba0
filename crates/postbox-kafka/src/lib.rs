//! postbox adapter for Apache Kafka (in progress).
