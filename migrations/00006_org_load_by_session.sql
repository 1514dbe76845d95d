-- +goose Up
-- org_load's shard rows are chosen by the database session, not by command:
-- a statement adds all it changed of an organization to one row, the one of
-- its own session (its backend's pid, of 16). Sessions then rarely update a
-- row another open transaction holds, so concurrent claims, outcomes and
-- admissions of one organization do not wait on each other's commits (by
-- command, a batch touched most of the 16 rows and every other batch waited
-- for it). The counts are still exact: an organization's load is the sum of
-- its rows, whichever row a change went to.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION org_load_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        SELECT n.org_id, pg_backend_pid() & 15, count(*), count(*) FILTER (WHERE n.status = 'queued')
          FROM new_rows n WHERE n.admitted_at IS NOT NULL AND n.status IN ('queued', 'running')
         GROUP BY 1 ORDER BY 1
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        SELECT o.org_id, pg_backend_pid() & 15, -count(*), -count(*) FILTER (WHERE o.status = 'queued')
          FROM old_rows o WHERE o.admitted_at IS NOT NULL AND o.status IN ('queued', 'running')
         GROUP BY 1 ORDER BY 1
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    ELSE
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        SELECT d.org_id, pg_backend_pid() & 15, sum(d.inflight), sum(d.queued)
          FROM (SELECT n.org_id, 1 AS inflight, CASE WHEN n.status = 'queued' THEN 1 ELSE 0 END AS queued
                  FROM new_rows n WHERE n.admitted_at IS NOT NULL AND n.status IN ('queued', 'running')
                UNION ALL
                SELECT o.org_id, -1, CASE WHEN o.status = 'queued' THEN -1 ELSE 0 END
                  FROM old_rows o WHERE o.admitted_at IS NOT NULL AND o.status IN ('queued', 'running')) d
         GROUP BY 1 HAVING sum(d.inflight) <> 0 OR sum(d.queued) <> 0 ORDER BY 1
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    END IF;
    RETURN NULL;
END;
$$;
-- +goose StatementEnd

-- +goose Down
-- Back to 00005's shards, by command.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION org_load_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        SELECT n.org_id, hashtext(n.id::text) & 15, count(*), count(*) FILTER (WHERE n.status = 'queued')
          FROM new_rows n WHERE n.admitted_at IS NOT NULL AND n.status IN ('queued', 'running')
         GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        SELECT o.org_id, hashtext(o.id::text) & 15, -count(*), -count(*) FILTER (WHERE o.status = 'queued')
          FROM old_rows o WHERE o.admitted_at IS NOT NULL AND o.status IN ('queued', 'running')
         GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    ELSE
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        SELECT d.org_id, d.shard, sum(d.inflight), sum(d.queued)
          FROM (SELECT n.org_id, hashtext(n.id::text) & 15 AS shard, 1 AS inflight, CASE WHEN n.status = 'queued' THEN 1 ELSE 0 END AS queued
                  FROM new_rows n WHERE n.admitted_at IS NOT NULL AND n.status IN ('queued', 'running')
                UNION ALL
                SELECT o.org_id, hashtext(o.id::text) & 15, -1, CASE WHEN o.status = 'queued' THEN -1 ELSE 0 END
                  FROM old_rows o WHERE o.admitted_at IS NOT NULL AND o.status IN ('queued', 'running')) d
         GROUP BY 1, 2 HAVING sum(d.inflight) <> 0 OR sum(d.queued) <> 0 ORDER BY 1, 2
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    END IF;
    RETURN NULL;
END;
$$;
-- +goose StatementEnd
