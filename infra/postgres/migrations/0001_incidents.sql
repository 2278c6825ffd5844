-- Incidents and the record of processed messages (effectively-once).
-- The incident is stored whole as JSON (doc); the columns beside it are what queries filter on.

CREATE TABLE incidents (
    id                uuid PRIMARY KEY,
    seq               bigserial NOT NULL,          -- insertion order: "the latest incident of a dedup key"
    dedup_key         text NOT NULL,
    status            text NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    severity          text NOT NULL,
    service           text NOT NULL DEFAULT '',
    environment       text NOT NULL DEFAULT '',
    correlation_group text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL,
    last_event_at     timestamptz NOT NULL,
    doc               jsonb NOT NULL
);

CREATE INDEX incidents_latest ON incidents (dedup_key, seq DESC);
-- A safety net under the advisory locks: never two unresolved incidents for one dedup key.
CREATE UNIQUE INDEX incidents_one_unresolved_per_key ON incidents (dedup_key) WHERE status <> 'resolved';
CREATE INDEX incidents_open_by_scope ON incidents (service, environment) WHERE status <> 'resolved';
CREATE INDEX incidents_by_created ON incidents (created_at DESC, seq DESC);

CREATE TABLE processed_messages (
    key          text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_messages_by_time ON processed_messages (processed_at);
