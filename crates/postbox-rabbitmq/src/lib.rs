//! postbox adapter for RabbitMQ (in progress).
