-- Lock-then-read in one round trip. A VOLATILE function takes a fresh snapshot for each statement, so
-- the read after the locks sees everything committed while this transaction waited for them - the same
-- as two separate statements from the client, one network round trip fewer.

CREATE FUNCTION incidentd_latest(keys text[], namespace integer) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(namespace, h)
        FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(keys) AS k ORDER BY 1) AS ordered;
    RETURN QUERY
        SELECT DISTINCT ON (i.dedup_key) i.doc::text FROM incidents AS i
        WHERE i.dedup_key = ANY(keys) ORDER BY i.dedup_key, i.seq DESC;
END
$$;

CREATE FUNCTION incidentd_open_groups(keys text[], namespace integer, services text[], environments text[])
RETURNS TABLE (correlation_group text, service text, environment text, first_opened timestamptz,
               last_event_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(namespace, h)
        FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(keys) AS k ORDER BY 1) AS ordered;
    RETURN QUERY
        SELECT i.correlation_group, i.service, i.environment, min(i.created_at), max(i.last_event_at)
        FROM incidents AS i
        WHERE i.status <> 'resolved'
          AND (i.service, i.environment) IN (SELECT * FROM unnest(services, environments))
        GROUP BY 1, 2, 3;
END
$$;
