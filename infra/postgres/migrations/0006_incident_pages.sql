-- The incident API's pages (GET /v1/incidents, infra/web/api.py): keyset pagination, newest first, in the
-- order (created_at, id) descending - both fixed once an incident exists, so a page boundary never moves
-- when incidents are added. One index for the order, and one each for the two filters a dashboard uses
-- most (status, service), so a filtered page reads only its own rows. Environment and severity have a
-- handful of values each: the order's index, filtered, serves them. (0005 is another branch's.)
-- Built in the migration's transaction (CREATE INDEX CONCURRENTLY cannot run in one); a few seconds of
-- blocked writes at 100,000 incidents, which the worker rides out with its retries.

CREATE INDEX IF NOT EXISTS incidents_page ON incidents (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS incidents_page_by_status ON incidents (status, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS incidents_page_by_service ON incidents (service, created_at DESC, id DESC);
-- An incident's page lists the other incidents of its correlation group.
CREATE INDEX IF NOT EXISTS incidents_page_by_group ON incidents (correlation_group, created_at DESC, id DESC);

-- The title, for `q` (a substring of the title, ILIKE): `doc->>'title'` would parse every document the
-- filter looks at (about 40 ms per 1,000 incidents); a stored column is read as it is. Computed by the
-- server from the document, so the worker's writes do not change. Adding it rewrites the table once.
ALTER TABLE incidents ADD COLUMN IF NOT EXISTS title text GENERATED ALWAYS AS (doc->>'title') STORED;

-- A trigram index makes `q` fast whatever it matches (without it, a text that matches nothing reads every
-- title: 0.6 s at 100,000 incidents). pg_trgm ships with PostgreSQL and is a trusted extension (a user
-- with CREATE on the database may add it); it is installed once per database, in `public`, so the
-- schemas of several deployments (or tests) share it. Where it cannot be installed, `q` still works,
-- scanning the titles, and start-up says nothing worse than a NOTICE.
DO $$
DECLARE
    trgm_schema text;
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public;
    EXCEPTION
        WHEN unique_violation OR duplicate_object THEN NULL;  -- another migration created it meanwhile
        WHEN insufficient_privilege OR undefined_file OR feature_not_supported OR invalid_schema_name THEN
            RAISE NOTICE 'pg_trgm unavailable (%): incident title search scans the titles', SQLERRM;
    END;
    SELECT n.nspname INTO trgm_schema
    FROM pg_extension AS e JOIN pg_namespace AS n ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NOT NULL THEN
        EXECUTE format('CREATE INDEX IF NOT EXISTS incidents_title_trgm ON incidents USING gin (title %I.gin_trgm_ops)',
                       trgm_schema);
    END IF;
END
$$;
