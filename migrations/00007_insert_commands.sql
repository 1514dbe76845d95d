-- +goose Up
-- insert_commands stores new queued commands and their "queued" events in
-- one call, skipping those whose idempotency key or schedule fire time is
-- taken, and returns those stored. With p_admit it also admits, in the same
-- transaction, what the limits allow of them right away (admitted_at set):
-- for each of their agents without an older command waiting, as many of
-- its new commands (highest priority, then in the order given) as its
-- max_concurrency and its organization's limits (p_org_limit in flight for
-- an organization without its own, p_org_queued waiting in the queue)
-- allow, under the organization's admission lock. A command is then written
-- once, not inserted and updated, and a dispatch makes one round trip, not
-- two. What it leaves waiting is admitted later by admit_agents.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION insert_commands(
    p_id uuid[], p_org uuid[], p_owner uuid[], p_agent uuid[], p_task text[], p_payload text[],
    p_priority integer[], p_timeout integer[], p_retries integer[], p_key text[], p_hash text[],
    p_schedule text[], p_fire text[], p_admit boolean, p_org_limit integer, p_org_queued integer)
RETURNS SETOF commands LANGUAGE plpgsql AS $$
DECLARE
    v_org record;
    v_agent record;
    v_busy integer;
    v_waiting integer;
    v_agent_busy integer;
    v_free integer;
    v_pick uuid[];
    v_admit uuid[] := '{}';
BEGIN
    IF p_admit THEN
        -- Organizations in id order, as admit_agents takes their locks; only
        -- those with an agent here that has no backlog (checked again under
        -- the lock): behind a backlog, a dispatch takes no lock.
        FOR v_org IN
            SELECT o.id, COALESCE(o.org_max_in_flight, p_org_limit) AS lim
              FROM organizations o
             WHERE o.id IN (SELECT r.org FROM unnest(p_agent, p_org) AS r(agent, org)
                             WHERE NOT EXISTS (SELECT 1 FROM commands w WHERE w.agent_id = r.agent AND w.status = 'queued' AND w.admitted_at IS NULL))
             ORDER BY o.id
        LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('agentry:admit:' || v_org.id::text, 0));
            SELECT COALESCE(sum(l.inflight), 0), COALESCE(sum(l.queued), 0) INTO v_busy, v_waiting
              FROM org_load l WHERE l.org_id = v_org.id;
            FOR v_agent IN
                SELECT g.id, GREATEST(COALESCE((g.config->>'max_concurrency')::integer, 1), 1) AS max
                  FROM agents g
                 WHERE g.id IN (SELECT r.agent FROM unnest(p_agent, p_org) AS r(agent, org) WHERE r.org = v_org.id)
                   AND g.org_id = v_org.id AND g.status <> 'disabled'
                   -- An agent's backlog goes first: its new commands wait behind it.
                   AND NOT EXISTS (SELECT 1 FROM commands w WHERE w.agent_id = g.id AND w.status = 'queued' AND w.admitted_at IS NULL)
                 ORDER BY g.id
            LOOP
                v_free := LEAST(v_org.lim - v_busy, p_org_queued - v_waiting);
                EXIT WHEN v_free <= 0;
                -- Stops at the agent's limit: bounded by max_concurrency.
                SELECT count(*) INTO v_agent_busy FROM (SELECT 1 FROM commands c
                 WHERE c.org_id = v_org.id AND c.agent_id = v_agent.id AND c.admitted_at IS NOT NULL
                   AND c.status IN ('queued', 'running') LIMIT v_agent.max) busy;
                v_free := LEAST(v_free, v_agent.max - v_agent_busy);
                CONTINUE WHEN v_free <= 0;
                SELECT array_agg(r.id) INTO v_pick FROM (
                    SELECT r.id FROM unnest(p_id, p_agent, p_org, p_priority) WITH ORDINALITY AS r(id, agent, org, priority, n)
                     WHERE r.agent = v_agent.id AND r.org = v_org.id
                     ORDER BY r.priority DESC, r.n LIMIT v_free) r;
                CONTINUE WHEN v_pick IS NULL;
                v_admit := v_admit || v_pick;
                v_busy := v_busy + cardinality(v_pick);
                v_waiting := v_waiting + cardinality(v_pick);
            END LOOP;
        END LOOP;
    END IF;
    -- Stamped in order (clock_timestamp), so that an agent's commands of
    -- one call keep their order.
    RETURN QUERY WITH done AS (
            INSERT INTO commands (id, org_id, owner_id, agent_id, task, payload, priority, timeout_s, max_retries,
                idempotency_key, request_hash, schedule_id, fire_time, created_at, admitted_at)
            SELECT r.id, r.org_id, r.owner_id, r.agent_id, r.task, r.payload::jsonb, r.priority, r.timeout_s, r.max_retries,
                r.idempotency_key, r.request_hash, r.schedule_id::uuid, r.fire_time::timestamptz, clock_timestamp(),
                CASE WHEN r.id = ANY(v_admit) THEN clock_timestamp() END
            FROM unnest(p_id, p_org, p_owner, p_agent, p_task, p_payload, p_priority, p_timeout, p_retries,
                p_key, p_hash, p_schedule, p_fire)
                AS r(id, org_id, owner_id, agent_id, task, payload, priority, timeout_s, max_retries, idempotency_key, request_hash, schedule_id, fire_time)
            ON CONFLICT DO NOTHING
            RETURNING *),
        ev AS (INSERT INTO command_events (command_id, type, status) SELECT d.id, 'queued', d.status FROM done d)
        SELECT * FROM done;
END;
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION IF EXISTS insert_commands(uuid[], uuid[], uuid[], uuid[], text[], text[], integer[], integer[], integer[], text[], text[], text[], text[], boolean, integer, integer);
