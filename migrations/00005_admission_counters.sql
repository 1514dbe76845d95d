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

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION org_load_track() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_inflight integer := 0;
    v_queued integer := 0;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.admitted_at IS NOT NULL THEN
        IF OLD.status IN ('queued', 'running') THEN
            v_inflight := v_inflight - 1;
        END IF;
        IF OLD.status = 'queued' THEN
            v_queued := v_queued - 1;
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.admitted_at IS NOT NULL THEN
        IF NEW.status IN ('queued', 'running') THEN
            v_inflight := v_inflight + 1;
        END IF;
        IF NEW.status = 'queued' THEN
            v_queued := v_queued + 1;
        END IF;
    END IF;
    IF v_inflight <> 0 OR v_queued <> 0 THEN
        INSERT INTO org_load AS l (org_id, shard, inflight, queued)
        VALUES (COALESCE(NEW.org_id, OLD.org_id), hashtext(COALESCE(NEW.id, OLD.id)::text) & 15, v_inflight, v_queued)
        ON CONFLICT (org_id, shard) DO UPDATE SET inflight = l.inflight + EXCLUDED.inflight, queued = l.queued + EXCLUDED.queued;
    END IF;
    RETURN NULL;
END;
$$;
-- +goose StatementEnd

-- Only changes that can move a count call the function: progress reports
-- and lease renewals do not.
DROP TRIGGER IF EXISTS commands_load_insert ON commands;
CREATE TRIGGER commands_load_insert AFTER INSERT ON commands
    FOR EACH ROW WHEN (NEW.admitted_at IS NOT NULL) EXECUTE FUNCTION org_load_track();
DROP TRIGGER IF EXISTS commands_load_update ON commands;
CREATE TRIGGER commands_load_update AFTER UPDATE OF status, admitted_at, org_id ON commands
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR (OLD.admitted_at IS NULL) <> (NEW.admitted_at IS NULL))
    EXECUTE FUNCTION org_load_track();
DROP TRIGGER IF EXISTS commands_load_delete ON commands;
CREATE TRIGGER commands_load_delete AFTER DELETE ON commands
    FOR EACH ROW WHEN (OLD.admitted_at IS NOT NULL AND OLD.status IN ('queued', 'running'))
    EXECUTE FUNCTION org_load_track();

-- The counts of what is already there.
DELETE FROM org_load;
INSERT INTO org_load (org_id, shard, inflight, queued)
SELECT org_id, hashtext(id::text) & 15, count(*), count(*) FILTER (WHERE status = 'queued')
  FROM commands WHERE admitted_at IS NOT NULL AND status IN ('queued', 'running')
 GROUP BY 1, 2;

-- admit_commands admits waiting commands of one agent: as many as the
-- agent's max_concurrency, the organization's in-flight limit and its limit
-- of commands waiting in the queue allow, oldest (highest priority) first.
-- Takes the agent id and the two organization limits; returns the admitted
-- commands' ids, attempts and timeouts. Serialised per organization (an
-- advisory lock), which covers its agents too, so limits hold across
-- concurrent callers; the organization's load is read from org_load, the
-- agent's counted (at most its max_concurrency rows). A waiting command
-- locked by another transaction (a cancellation) is skipped.
-- It returns what the caller enqueues, timeout included: a query joining
-- its result to commands would miss the commands inserted after that
-- query's snapshot, which the function's own statements see and admit.
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
    -- Nothing waits (the common case): done, without a lock. A command
    -- inserted meanwhile is admitted by its own dispatch, after it commits.
    IF NOT EXISTS (SELECT 1 FROM commands w WHERE w.agent_id = p_agent AND w.status = 'queued' AND w.admitted_at IS NULL) THEN
        RETURN;
    END IF;
    SELECT a.org_id, GREATEST(COALESCE((a.config->>'max_concurrency')::integer, 1), 1), a.status
      INTO v_org, v_max, v_status
      FROM agents a WHERE a.id = p_agent;
    IF NOT FOUND OR v_status = 'disabled' THEN
        RETURN;
    END IF;
    -- The organization's admissions queue on this lock until each commits:
    -- commit without waiting for the WAL flush, or the flush paces them all.
    -- An admission lost in a crash is harmless: the command is admitted
    -- again, and a task of the lost admission finds nothing to claim.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('agentry:admit:' || v_org::text, 0));
    SELECT count(*) INTO v_agent_busy FROM (SELECT 1 FROM commands c
     WHERE c.org_id = v_org AND c.agent_id = p_agent AND c.admitted_at IS NOT NULL AND c.status IN ('queued', 'running') LIMIT v_max) busy;
    IF v_agent_busy >= v_max THEN
        RETURN;
    END IF;
    SELECT COALESCE(sum(l.inflight), 0), COALESCE(sum(l.queued), 0) INTO v_org_busy, v_org_waiting
      FROM org_load l WHERE l.org_id = v_org;
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

-- admit_org admits what it can of the backlogs of an organization's agents
-- (at most 200 of them, the one whose command waited longest first) in one
-- transaction, under the organization's admission lock taken once, with
-- the organization's load read once. The same limits as admit_commands.
-- Takes the organization and its two limits; returns what admit_commands
-- returns.
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
    -- Nothing waits (the common case): done, without a lock.
    IF NOT EXISTS (SELECT 1 FROM commands w WHERE w.org_id = p_org AND w.status = 'queued' AND w.admitted_at IS NULL) THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtextextended('agentry:admit:' || p_org::text, 0));
    SELECT COALESCE(sum(l.inflight), 0), COALESCE(sum(l.queued), 0) INTO v_org_busy, v_org_waiting
      FROM org_load l WHERE l.org_id = p_org;
    IF v_org_busy >= p_org_limit OR v_org_waiting >= p_org_queued THEN
        RETURN;
    END IF;
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

-- +goose Down
DROP TRIGGER IF EXISTS commands_load_insert ON commands;
DROP TRIGGER IF EXISTS commands_load_update ON commands;
DROP TRIGGER IF EXISTS commands_load_delete ON commands;
DROP FUNCTION IF EXISTS org_load_track();
DROP TABLE IF EXISTS org_load;
-- admit_commands and admit_org read org_load: back to counting commands.
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
