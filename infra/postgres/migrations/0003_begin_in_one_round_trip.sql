-- A transaction's first round trip: record the message's idempotency key and, only when the key is new,
-- lock the dedup keys and read their latest incidents, then - when some key has no unresolved incident,
-- the only case in which one can be opened - lock the correlation scopes and read their groups.
-- The same statements, in the same order, as the client sent one by one before (the key insert, then
-- incidentd_latest, then incidentd_open_groups): a VOLATILE function takes a fresh snapshot for each
-- statement, so every read happens after the locks before it were granted.
--
-- Rows: ('processed') alone when the key was already recorded; else one ('incident', doc) per dedup key
-- that has an incident, then one ('group', ...) per open correlation group when the scopes were locked,
-- then ('scopes') when they were (even if they hold no group).

CREATE FUNCTION incidentd_begin(idempotency_key text, keys text[], scope_keys text[], services text[],
                                environments text[], namespace integer)
RETURNS TABLE (kind text, doc text, correlation_group text, service text, environment text,
               first_opened timestamptz, last_event_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO processed_messages (key) VALUES (idempotency_key) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'processed', NULL::text, NULL::text, NULL::text, NULL::text,
                            NULL::timestamptz, NULL::timestamptz;
        RETURN;
    END IF;
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT 'incident', latest, NULL::text, NULL::text, NULL::text, NULL::timestamptz,
                        NULL::timestamptz
                 FROM incidentd_latest(keys, namespace) AS latest;
    IF cardinality(scope_keys) > 0
       AND (SELECT count(*) FROM incidents AS i WHERE i.dedup_key = ANY(keys) AND i.status <> 'resolved')
           < (SELECT count(DISTINCT k) FROM unnest(keys) AS k) THEN
        RETURN QUERY SELECT 'group', NULL::text, g.*
                     FROM incidentd_open_groups(scope_keys, namespace, services, environments) AS g;
        RETURN QUERY SELECT 'scopes', NULL::text, NULL::text, NULL::text, NULL::text, NULL::timestamptz,
                            NULL::timestamptz;
    END IF;
END
$$;
