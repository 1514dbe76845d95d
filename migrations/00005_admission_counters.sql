-- +goose Up
-- org_load counts each organization's admitted commands, so that admission
-- reads the organization's load in a few rows instead of counting its
-- commands. The counts are kept by triggers on commands, in the same
-- transaction as every change, so they are exact whatever writes commands
-- (the pipeline, a cascade delete, an operator's UPDATE).
--
-- An organization's counts are spread over 16 shard rows (by command id):
-- a claim or an outcome updates one of them and holds its row lock until it
-- commits, so concurrent commands of one organization rarely wait on each
-- other. An organization's load is the sum of its rows.
CREATE TABLE IF NOT EXISTS org_load (
    org_id   uuid NOT NULL,
    shard    smallint NOT NULL,
    -- admitted commands queued or running
    inflight integer NOT NULL DEFAULT 0,
    -- admitted commands queued (handed to the queue, not started)
    queued   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, shard)
);

-- org_load_apply adds what a statement changed to org_load, once per
-- statement, from its transition tables. It updates the shard rows in
-- order, so two statements never wait on each other's shards in a cycle.
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

DROP TRIGGER IF EXISTS commands_load_insert ON commands;
CREATE TRIGGER commands_load_insert AFTER INSERT ON commands
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION org_load_apply();
DROP TRIGGER IF EXISTS commands_load_update ON commands;
CREATE TRIGGER commands_load_update AFTER UPDATE ON commands
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION org_load_apply();
DROP TRIGGER IF EXISTS commands_load_delete ON commands;
CREATE TRIGGER commands_load_delete AFTER DELETE ON commands
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION org_load_apply();

-- The counts of what is already there.
DELETE FROM org_load;
INSERT INTO org_load (org_id, shard, inflight, queued)
SELECT org_id, hashtext(id::text) & 15, count(*), count(*) FILTER (WHERE status = 'queued')
  FROM commands WHERE admitted_at IS NOT NULL AND status IN ('queued', 'running')
 GROUP BY 1, 2;

-- admit_pick chooses what may be admitted of the backlogs of p_agents, all
-- of organization p_org, in that order: for each agent as many of its
-- waiting commands (highest priority, then oldest, first) as its
-- max_concurrency and the organization's limits (p_org_limit in flight,
-- p_org_queued waiting in the queue) allow. It takes the organization's
-- admission lock, held until the caller's transaction ends, so limits hold
-- across concurrent callers, and locks the chosen commands (a command
-- locked by another transaction, such as a cancellation, is skipped). The
-- caller marks them admitted in one statement. Returns their ids.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION admit_pick(p_org uuid, p_agents uuid[], p_org_limit integer, p_org_queued integer)
RETURNS uuid[] LANGUAGE plpgsql AS $$
DECLARE
    v_agent record;
    v_org_busy integer;
    v_org_waiting integer;
    v_agent_busy integer;
    v_free integer;
    v_pick uuid[];
    v_out uuid[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('agentry:admit:' || p_org::text, 0));
    SELECT COALESCE(sum(l.inflight), 0), COALESCE(sum(l.queued), 0) INTO v_org_busy, v_org_waiting
      FROM org_load l WHERE l.org_id = p_org;
    FOR v_agent IN
        SELECT g.id, GREATEST(COALESCE((g.config->>'max_concurrency')::integer, 1), 1) AS max
          FROM unnest(p_agents) WITH ORDINALITY AS a(id, n) JOIN agents g ON g.id = a.id
         WHERE g.org_id = p_org AND g.status <> 'disabled'
         ORDER BY a.n
    LOOP
        v_free := LEAST(p_org_limit - v_org_busy, p_org_queued - v_org_waiting);
        EXIT WHEN v_free <= 0;
        -- Stops at the agent's limit: bounded by max_concurrency.
        SELECT count(*) INTO v_agent_busy FROM (SELECT 1 FROM commands c
         WHERE c.org_id = p_org AND c.agent_id = v_agent.id AND c.admitted_at IS NOT NULL AND c.status IN ('queued', 'running') LIMIT v_agent.max) busy;
        v_free := LEAST(v_free, v_agent.max - v_agent_busy);
        CONTINUE WHEN v_free <= 0;
        SELECT array_agg(w.id) INTO v_pick FROM (SELECT w.id FROM commands w
                     WHERE w.agent_id = v_agent.id AND w.status = 'queued' AND w.admitted_at IS NULL
                     ORDER BY w.priority DESC, w.created_at, w.id
                     LIMIT v_free
                     FOR NO KEY UPDATE SKIP LOCKED) w;
        CONTINUE WHEN v_pick IS NULL;
        v_out := v_out || v_pick;
        v_org_busy := v_org_busy + cardinality(v_pick);
        v_org_waiting := v_org_waiting + cardinality(v_pick);
    END LOOP;
    RETURN v_out;
END;
$$;
-- +goose StatementEnd

-- admit_mark marks the commands p_ids admitted (admit_pick chose and
-- locked them) and returns them with their agents, attempts and timeouts.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION admit_mark(p_ids uuid[])
RETURNS TABLE (agent_id uuid, id uuid, attempt integer, timeout_s integer) LANGUAGE sql AS $$
    UPDATE commands c SET admitted_at = now(), updated_at = now()
     WHERE c.id = ANY(p_ids)
    RETURNING c.agent_id, c.id, c.attempt, c.timeout_s;
$$;
-- +goose StatementEnd

-- admit_agents admits what it can of the backlogs of the agents p_agents,
-- organization by organization (in id order, so two callers never wait on
-- each other's locks in a cycle), in one transaction. p_org_limit is the
-- in-flight limit of an organization without its own, p_org_queued the
-- limit of admitted commands waiting in the queue. Returns the admitted
-- commands with their agents, attempts and timeouts: what the caller
-- enqueues. (A query joining its result to commands would miss commands
-- inserted after that query's snapshot, which the function's own
-- statements see and admit.)
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION admit_agents(p_agents uuid[], p_org_limit integer, p_org_queued integer)
RETURNS TABLE (agent_id uuid, id uuid, attempt integer, timeout_s integer) LANGUAGE plpgsql AS $$
DECLARE
    v_org record;
    v_ids uuid[] := '{}';
BEGIN
    FOR v_org IN
        -- Agents with nothing waiting (the common case) take no lock.
        SELECT g.org_id, COALESCE(o.org_max_in_flight, p_org_limit) AS lim, array_agg(g.id ORDER BY g.id) AS agents
          FROM agents g JOIN organizations o ON o.id = g.org_id
         WHERE g.id = ANY(p_agents) AND g.status <> 'disabled'
           AND EXISTS (SELECT 1 FROM commands w WHERE w.agent_id = g.id AND w.status = 'queued' AND w.admitted_at IS NULL)
         GROUP BY g.org_id, o.org_max_in_flight
         ORDER BY g.org_id
    LOOP
        -- The organization's admissions queue on its lock until each
        -- commits: commit without waiting for the WAL flush, or the flush
        -- paces them all. An admission lost in a crash is harmless: the
        -- command is admitted again, and a task of the lost admission
        -- finds nothing to claim.
        PERFORM set_config('synchronous_commit', 'off', true);
        v_ids := v_ids || admit_pick(v_org.org_id, v_org.agents, v_org.lim, p_org_queued);
    END LOOP;
    IF cardinality(v_ids) > 0 THEN
        RETURN QUERY SELECT * FROM admit_mark(v_ids);
    END IF;
END;
$$;
-- +goose StatementEnd

-- admit_org admits what it can of the backlogs of an organization's agents
-- (at most 200 of them, the one whose command waited longest first) in one
-- transaction. The same limits and result as admit_agents (p_org_limit
-- being this organization's limit).
DROP FUNCTION IF EXISTS admit_org(uuid, integer, integer);
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION admit_org(p_org uuid, p_org_limit integer, p_org_queued integer)
RETURNS TABLE (agent_id uuid, id uuid, attempt integer, timeout_s integer) LANGUAGE plpgsql AS $$
DECLARE
    v_agents uuid[];
    v_ids uuid[];
BEGIN
    SELECT array_agg(b.agent_id ORDER BY b.since) INTO v_agents
      FROM (SELECT w.agent_id, min(w.created_at) AS since FROM commands w
             WHERE w.org_id = p_org AND w.status = 'queued' AND w.admitted_at IS NULL
             GROUP BY w.agent_id ORDER BY since LIMIT 200) b;
    -- Nothing waits (the common case): done, without a lock.
    IF v_agents IS NULL THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    v_ids := admit_pick(p_org, v_agents, p_org_limit, p_org_queued);
    IF cardinality(v_ids) > 0 THEN
        RETURN QUERY SELECT * FROM admit_mark(v_ids);
    END IF;
END;
$$;
-- +goose StatementEnd

DROP FUNCTION IF EXISTS admit_commands(uuid, integer, integer);

-- +goose Down
DROP FUNCTION IF EXISTS admit_org(uuid, integer, integer);
DROP FUNCTION IF EXISTS admit_agents(uuid[], integer, integer);
DROP FUNCTION IF EXISTS admit_mark(uuid[]);
DROP FUNCTION IF EXISTS admit_pick(uuid, uuid[], integer, integer);
DROP TRIGGER IF EXISTS commands_load_insert ON commands;
DROP TRIGGER IF EXISTS commands_load_update ON commands;
DROP TRIGGER IF EXISTS commands_load_delete ON commands;
DROP FUNCTION IF EXISTS org_load_apply();
DROP TABLE IF EXISTS org_load;
-- Back to 00003's admission, which counts commands.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION admit_commands(p_agent uuid, p_org_limit integer, p_org_queued integer)
RETURNS TABLE (id uuid, attempt integer, timeout_s integer) LANGUAGE plpgsql AS $$
DECLARE
    v_org uuid;
    v_max integer;
    v_status text;
    v_agent_busy integer;
    v_org_busy integer;
    v_org_waiting integer;
    v_free integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM commands w WHERE w.agent_id = p_agent AND w.status = 'queued' AND w.admitted_at IS NULL) THEN
        RETURN;
    END IF;
    SELECT a.org_id, GREATEST(COALESCE((a.config->>'max_concurrency')::integer, 1), 1), a.status
      INTO v_org, v_max, v_status
      FROM agents a WHERE a.id = p_agent;
    IF NOT FOUND OR v_status = 'disabled' THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('agentry:admit:' || v_org::text, 0));
    SELECT count(*) INTO v_agent_busy FROM (SELECT 1 FROM commands c
     WHERE c.org_id = v_org AND c.agent_id = p_agent AND c.admitted_at IS NOT NULL AND c.status IN ('queued', 'running') LIMIT v_max) busy;
    IF v_agent_busy >= v_max THEN
        RETURN;
    END IF;
    SELECT count(*) INTO v_org_busy FROM (SELECT 1 FROM commands c
     WHERE c.org_id = v_org AND c.admitted_at IS NOT NULL AND c.status IN ('queued', 'running') LIMIT GREATEST(p_org_limit, 0)) busy;
    SELECT count(*) INTO v_org_waiting FROM (SELECT 1 FROM commands c
     WHERE c.org_id = v_org AND c.admitted_at IS NOT NULL AND c.status = 'queued' LIMIT GREATEST(p_org_queued, 0)) waiting;
    v_free := LEAST(v_max - v_agent_busy, p_org_limit - v_org_busy, p_org_queued - v_org_waiting);
    IF v_free <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE commands c SET admitted_at = now(), updated_at = now()
     WHERE c.id IN (SELECT w.id FROM commands w
                     WHERE w.agent_id = p_agent AND w.status = 'queued' AND w.admitted_at IS NULL
                     ORDER BY w.priority DESC, w.created_at, w.id
                     LIMIT v_free
                     FOR NO KEY UPDATE SKIP LOCKED)
    RETURNING c.id, c.attempt, c.timeout_s;
END;
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION admit_org(p_org uuid, p_org_limit integer, p_org_queued integer)
RETURNS TABLE (id uuid, attempt integer, timeout_s integer) LANGUAGE plpgsql AS $$
DECLARE
    v_agent record;
    v_org_busy integer;
    v_org_waiting integer;
    v_agent_busy integer;
    v_free integer;
    v_n integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM commands w WHERE w.org_id = p_org AND w.status = 'queued' AND w.admitted_at IS NULL) THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('agentry:admit:' || p_org::text, 0));
    SELECT count(*) INTO v_org_busy FROM (SELECT 1 FROM commands c
     WHERE c.org_id = p_org AND c.admitted_at IS NOT NULL AND c.status IN ('queued', 'running') LIMIT GREATEST(p_org_limit, 0)) busy;
    SELECT count(*) INTO v_org_waiting FROM (SELECT 1 FROM commands c
     WHERE c.org_id = p_org AND c.admitted_at IS NOT NULL AND c.status = 'queued' LIMIT GREATEST(p_org_queued, 0)) waiting;
    FOR v_agent IN
        SELECT g.id, GREATEST(COALESCE((g.config->>'max_concurrency')::integer, 1), 1) AS max
          FROM (SELECT w.agent_id, min(w.created_at) AS since FROM commands w
                 WHERE w.org_id = p_org AND w.status = 'queued' AND w.admitted_at IS NULL
                 GROUP BY w.agent_id ORDER BY since LIMIT 200) b
          JOIN agents g ON g.id = b.agent_id
         WHERE g.status <> 'disabled'
         ORDER BY b.since
    LOOP
        v_free := LEAST(p_org_limit - v_org_busy, p_org_queued - v_org_waiting);
        EXIT WHEN v_free <= 0;
        SELECT count(*) INTO v_agent_busy FROM (SELECT 1 FROM commands c
         WHERE c.org_id = p_org AND c.agent_id = v_agent.id AND c.admitted_at IS NOT NULL AND c.status IN ('queued', 'running') LIMIT v_agent.max) busy;
        v_free := LEAST(v_free, v_agent.max - v_agent_busy);
        CONTINUE WHEN v_free <= 0;
        RETURN QUERY
        UPDATE commands c SET admitted_at = now(), updated_at = now()
         WHERE c.id IN (SELECT w.id FROM commands w
                         WHERE w.agent_id = v_agent.id AND w.status = 'queued' AND w.admitted_at IS NULL
                         ORDER BY w.priority DESC, w.created_at, w.id
                         LIMIT v_free
                         FOR NO KEY UPDATE SKIP LOCKED)
        RETURNING c.id, c.attempt, c.timeout_s;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_org_busy := v_org_busy + v_n;
        v_org_waiting := v_org_waiting + v_n;
    END LOOP;
END;
$$;
-- +goose StatementEnd
