-- +goose Up
-- Commands: what users dispatch to agents. PostgreSQL holds every command
-- and its backlog; only admitted commands (admitted_at set) are handed to
-- the queue, within each agent's concurrency and each organization's limits.
CREATE TABLE IF NOT EXISTS commands (
    id                  uuid PRIMARY KEY,
    org_id              uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id            uuid NOT NULL,
    agent_id            uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    task                text NOT NULL,
    payload             jsonb NOT NULL DEFAULT '{}',
    status              text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    priority            integer NOT NULL DEFAULT 0,
    timeout_s           integer NOT NULL,
    max_retries         integer NOT NULL,
    -- attempt numbers claims: a worker may write only for the attempt it claimed.
    attempt             integer NOT NULL DEFAULT 0,
    failures            integer NOT NULL DEFAULT 0,
    progress            integer NOT NULL DEFAULT 0,
    message             text NOT NULL DEFAULT '',
    result              jsonb,
    error               text,
    idempotency_key     text,
    request_hash        text,
    schedule_id         uuid,
    fire_time           timestamptz,
    admitted_at         timestamptz,
    not_before          timestamptz,
    worker_id           text,
    lease_until         timestamptz,
    cancel_requested_at timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    version             bigint NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX IF NOT EXISTS commands_idempotency_key ON commands (org_id, owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS commands_schedule_fire_key ON commands (schedule_id, fire_time) WHERE schedule_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS commands_waiting_idx ON commands (agent_id, priority DESC, created_at, id) WHERE status = 'queued' AND admitted_at IS NULL;
CREATE INDEX IF NOT EXISTS commands_waiting_org_idx ON commands (org_id) WHERE status = 'queued' AND admitted_at IS NULL;
CREATE INDEX IF NOT EXISTS commands_inflight_idx ON commands (org_id, agent_id, status) WHERE admitted_at IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS commands_lease_idx ON commands (lease_until) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS commands_org_created_idx ON commands (org_id, created_at);
CREATE INDEX IF NOT EXISTS commands_agent_created_idx ON commands (agent_id, created_at);
CREATE INDEX IF NOT EXISTS commands_finished_idx ON commands (finished_at) WHERE finished_at IS NOT NULL;

-- Every transition and progress report of a command, in order.
CREATE TABLE IF NOT EXISTS command_events (
    id         bigserial PRIMARY KEY,
    command_id uuid NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    type       text NOT NULL,
    status     text NOT NULL,
    attempt    integer NOT NULL DEFAULT 0,
    progress   integer NOT NULL DEFAULT 0,
    message    text NOT NULL DEFAULT '',
    data       jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS command_events_command_idx ON command_events (command_id, id);

-- Schedules fire commands on a cron expression in a time zone.
CREATE TABLE IF NOT EXISTS schedules (
    id             uuid PRIMARY KEY,
    org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    owner_id       uuid NOT NULL,
    agent_id       uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    name           text NOT NULL DEFAULT '',
    task           text NOT NULL,
    payload        jsonb NOT NULL DEFAULT '{}',
    cron           text NOT NULL,
    timezone       text NOT NULL DEFAULT 'UTC',
    enabled        boolean NOT NULL DEFAULT true,
    misfire_policy text NOT NULL DEFAULT 'skip' CHECK (misfire_policy IN ('skip', 'run_once')),
    next_run_at    timestamptz,
    last_run_at    timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    version        bigint NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS schedules_due_idx ON schedules (next_run_at) WHERE enabled;

-- admit_commands admits waiting commands of one agent: as many as the
-- agent's max_concurrency, the organization's in-flight limit and its limit
-- of commands waiting in the queue allow, oldest (highest priority) first.
-- Takes the agent id and the two organization limits; returns the admitted
-- commands' ids, attempts and timeouts. Serialised per organization (an
-- advisory lock), which covers its agents too, so limits hold across
-- concurrent callers. The agent's row is not locked: a row lock made the
-- admission wait on every status change of the agent, and, FOR UPDATE,
-- deadlock with the foreign key checks of commands being inserted. A
-- waiting command locked by another transaction (a cancellation) is
-- skipped.
-- It returns what the caller enqueues, timeout included: a query joining
-- its result to commands would miss the commands inserted after that
-- query's snapshot, which the function's own statements see and admit.
DROP FUNCTION IF EXISTS admit_commands(uuid, integer, integer);
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
    -- Counts stop at the limits: their cost is bounded by the limits, not
    -- by the size of the organization's work (commands_inflight_idx).
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

-- admit_org admits what it can of the backlogs of an organization's agents
-- (at most 200 of them, the one whose command waited longest first) in one
-- transaction, under the organization's admission lock taken once, with
-- the organization's counts made once. The same limits as admit_commands.
-- Takes the organization and its two limits; returns what admit_commands
-- returns.
-- (Dropped first: a later migration changes what it returns.)
DROP FUNCTION IF EXISTS admit_org(uuid, integer, integer);
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

-- +goose Down
DROP FUNCTION IF EXISTS admit_org(uuid, integer, integer);
DROP FUNCTION IF EXISTS admit_commands(uuid, integer, integer);
DROP TABLE IF EXISTS schedules;
DROP TABLE IF EXISTS command_events;
DROP TABLE IF EXISTS commands;
