-- postbox transactional outbox: envelopes written inside the application's
-- transaction, published by the relay. `event` is the envelope as a structured
-- CloudEvents 1.0 JSON document (type `json`, not `jsonb`, so the payload is
-- kept byte for byte).
CREATE TABLE IF NOT EXISTS {schema}.postbox_outbox (
    id            bigserial   PRIMARY KEY,
    destination   text        NOT NULL,
    partition_key text,
    message_id    text        NOT NULL,
    event         json        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    sent_at       timestamptz
);
CREATE INDEX IF NOT EXISTS postbox_outbox_pending
    ON {schema}.postbox_outbox (id) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS postbox_outbox_pending_key
    ON {schema}.postbox_outbox (partition_key, id) WHERE sent_at IS NULL;

-- Wakes relays (LISTEN "{channel}") when rows are inserted; delivered on commit.
CREATE OR REPLACE FUNCTION {schema}.postbox_outbox_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;
CREATE TRIGGER postbox_outbox_notify
    AFTER INSERT ON {schema}.postbox_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.postbox_outbox_notify('{channel}');
