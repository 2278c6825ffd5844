-- An occurrence (the hot path: most alerts count on an open incident) changes an incident's
-- last_event_at and document only. PostgreSQL updates a row in place ("HOT": no new entry in any of the
-- table's indexes) only when no indexed column changes - and the retention index of 0005 named
-- last_event_at, so every occurrence wrote a new entry into every index of the table (eleven, the
-- title's trigram index included). Retention only looks at resolved incidents: it now reads a column that
-- holds last_event_at for resolved incidents and is NULL while one is open, so an occurrence on an open
-- incident changes no indexed column. Adding the stored column rewrites the table once.

ALTER TABLE incidents ADD COLUMN IF NOT EXISTS resolved_last_event_at timestamptz
    GENERATED ALWAYS AS (CASE WHEN status = 'resolved' THEN last_event_at END) STORED;
CREATE INDEX IF NOT EXISTS incidents_resolved_by_last_event_only
    ON incidents (resolved_last_event_at, seq) WHERE resolved_last_event_at IS NOT NULL;
DROP INDEX IF EXISTS incidents_resolved_by_last_event;
