//! postbox adapter for AWS SQS and SNS (in progress).
