//! postbox on PostgreSQL: idempotency store and outbox (in progress).
