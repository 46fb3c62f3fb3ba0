-- postbox idempotency store: claims (leases) and processed marks.
-- `{schema}` is the configured schema (default `public`).
CREATE TABLE IF NOT EXISTS {schema}.postbox_idempotency (
    key        text        PRIMARY KEY,
    token      bigint      NOT NULL,
    state      text        NOT NULL CHECK (state IN ('in_flight', 'done')),
    expires_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS postbox_idempotency_expires_at
    ON {schema}.postbox_idempotency (expires_at);
