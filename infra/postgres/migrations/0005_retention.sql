-- Incident retention (infra/maintenance.py) looks for resolved incidents by their last event, oldest
-- first; this partial index holds only resolved ones, so it stays out of the way of the hot path (open
-- incidents) and keeps each archive batch an index range scan however many incidents are kept.
-- processed_messages already has its index on processed_at (0001) for pruning.

CREATE INDEX incidents_resolved_by_last_event ON incidents (last_event_at, seq) WHERE status = 'resolved';
