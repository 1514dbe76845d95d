package commands

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/batch"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// Limits bound what one organization may have in flight.
type Limits struct {
	// OrgMaxInFlight caps an organization's admitted commands (waiting in the
	// queue or running); an organization's own setting overrides it.
	OrgMaxInFlight int
	// OrgMaxQueued caps an organization's admitted commands not yet started,
	// so that one organization's backlog never stands long in front of
	// another's commands in the shared queue.
	OrgMaxQueued int
}

// Store is the pipeline's SQL. Every write that changes a command's status
// also records the event in command_events, in the same statement, and so
// does every one that can change its agent's status (a retry re-queues a
// failed command without changing its agent's: its next claim does).
type Store struct {
	DB     *sqlx.DB
	Limits Limits

	mu    sync.Mutex
	stmts map[string]*sqlx.Stmt

	insertOnce sync.Once
	inserts    *batch.Batcher[*platform.Command, *platform.Command] // Insert's
	admits     *batch.Batcher[*platform.Command, *platform.Command] // InsertAdmitted's
}

// stmt returns query prepared on the pool. The statements a command goes
// through are prepared: PostgreSQL then plans them once per connection, not
// at every call (planning the outcome's statement cost more than running it).
func (s *Store) stmt(ctx context.Context, query string) (*sqlx.Stmt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.stmts[query]; ok {
		return st, nil
	}
	st, err := s.DB.PreparexContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if s.stmts == nil {
		s.stmts = map[string]*sqlx.Stmt{}
	}
	s.stmts[query] = st
	return st, nil
}

// get is GetContext with query prepared.
func (s *Store) get(ctx context.Context, dest any, query string, args ...any) error {
	st, err := s.stmt(ctx, query)
	if err != nil {
		return err
	}
	return st.GetContext(ctx, dest, args...)
}

// sel is SelectContext with query prepared.
func (s *Store) sel(ctx context.Context, dest any, query string, args ...any) error {
	st, err := s.stmt(ctx, query)
	if err != nil {
		return err
	}
	return st.SelectContext(ctx, dest, args...)
}

// Admitted is a command attempt handed to the queue.
type Admitted struct {
	AgentID  string `db:"agent_id"`
	ID       string `db:"id"`
	Attempt  int    `db:"attempt"`
	TimeoutS int    `db:"timeout_s"`
}

// agentStatus sets the status of the agents of done's commands from their
// running commands (done being a CTE of changed commands). It never
// touches a disabled agent, nor disables one: enabling and disabling are
// the API's. (The status it computes is of the statement's snapshot; the
// update's condition is checked again on the row as it is when locked, so
// an agent disabled or enabled meanwhile keeps that.)
// The statement's snapshot still shows done's commands as they were, so
// they are judged by their new status in done, and the others from commands
// (through commands_inflight_idx: a running command is always admitted).
// An agent whose status does not change is neither locked nor written; the
// others are locked in id order (ag_lock), as every statement of the
// pipeline locks agents, so that concurrent batches never deadlock on them.
const agentStatus = `st AS MATERIALIZED (
	SELECT g.id, CASE
			WHEN g.status = 'disabled' THEN 'disabled'
			WHEN EXISTS (SELECT 1 FROM done r WHERE r.agent_id = g.id AND r.status = 'running') THEN 'busy'
			WHEN EXISTS (SELECT 1 FROM commands o WHERE o.org_id = g.org_id AND o.agent_id = g.id AND o.admitted_at IS NOT NULL
				AND o.status = 'running' AND o.id NOT IN (SELECT id FROM done)) THEN 'busy'
			WHEN EXISTS (SELECT 1 FROM done f WHERE f.agent_id = g.id AND f.status = 'failed') THEN 'error'
			ELSE 'idle' END AS status
		FROM agents g WHERE g.id IN (SELECT agent_id FROM done)),
	ag_lock AS MATERIALIZED (
		SELECT a.id FROM agents a JOIN st ON st.id = a.id WHERE a.status <> st.status ORDER BY a.id FOR NO KEY UPDATE OF a),
	ag AS (
		UPDATE agents a SET status = st.status, updated_at = now()
		FROM st, ag_lock l
		WHERE a.id = st.id AND l.id = a.id AND a.status <> st.status
			AND a.status <> 'disabled' AND st.status <> 'disabled'
		RETURNING a.id)`

// Insert stores a new queued command and its first event, leaving its
// admission to AdmitAgents. With an idempotency key already used by the same
// caller within 24 hours it stores nothing and returns the earlier command
// (created false).
func (s *Store) Insert(ctx context.Context, c *platform.Command) (stored *platform.Command, created bool, err error) {
	return s.insert(ctx, c, false)
}

// InsertAdmitted is Insert that also admits the command at once if the
// limits allow (its AdmittedAt set): its agent has no older command waiting
// and room for it, and so has its organization. Otherwise it waits for
// AdmitAgents, as after Insert.
func (s *Store) InsertAdmitted(ctx context.Context, c *platform.Command) (stored *platform.Command, created bool, err error) {
	return s.insert(ctx, c, true)
}

func (s *Store) insert(ctx context.Context, c *platform.Command, admit bool) (stored *platform.Command, created bool, err error) {
	// Commands dispatched at once are inserted together.
	s.insertOnce.Do(func() {
		s.inserts = batch.New(2, batchMax, func(ctx context.Context, cs []*platform.Command) ([]*platform.Command, error) {
			return s.InsertMany(ctx, cs, false)
		})
		// One lane: admitting batches of an organization queue on its
		// lock until they commit anyway.
		s.admits = batch.New(1, batchMax, func(ctx context.Context, cs []*platform.Command) ([]*platform.Command, error) {
			return s.InsertMany(ctx, cs, true)
		})
	})
	inserts := s.inserts
	if admit {
		inserts = s.admits
	}
	for range 3 {
		out, err := inserts.Do(c)
		if err == nil && out != nil {
			return out, true, nil
		}
		if err == nil {
			err = sql.ErrNoRows
		}
		if !errors.Is(err, sql.ErrNoRows) {
			var pqErr *pq.Error
			if errors.As(err, &pqErr) && pqErr.Code.Name() == "foreign_key_violation" && pqErr.Constraint == "commands_agent_id_fkey" {
				return nil, false, platform.Errorf(platform.ENOTFOUND, "agent not found") // deleted meanwhile
			}
			return nil, false, sqlq.MapError(err, "command not found")
		}
		if c.IdempotencyKey == nil {
			return nil, false, nil // a schedule fire time that was already fired
		}
		prev := &platform.Command{}
		err = s.DB.GetContext(ctx, prev, `SELECT * FROM commands WHERE org_id = $1 AND owner_id = $2 AND idempotency_key = $3`, c.OrgID, c.OwnerID, *c.IdempotencyKey)
		if errors.Is(err, sql.ErrNoRows) {
			continue // the key was released meanwhile
		}
		if err != nil {
			return nil, false, err
		}
		if time.Since(prev.CreatedAt) < 24*time.Hour {
			return prev, false, nil
		}
		// The key is older than a day: release it and insert again.
		if _, err := s.DB.ExecContext(ctx, "UPDATE commands SET idempotency_key = NULL WHERE id = $1", prev.ID); err != nil {
			return nil, false, err
		}
	}
	return nil, false, platform.Errorf(platform.ECONFLICT, "the idempotency key is in use by a concurrent request; retry")
}

// InsertMany stores new queued commands and their first events in one
// statement, and with admit also admits what the limits allow of them (see
// InsertAdmitted). The result is in the order of cs; a command whose
// idempotency key or schedule fire time is taken is not stored (nil).
func (s *Store) InsertMany(ctx context.Context, cs []*platform.Command, admit bool) ([]*platform.Command, error) {
	n := len(cs)
	ids, orgs, owners, agents := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	task, payload := make([]string, n), make([]string, n)
	priority, timeout, retries := make([]int64, n), make([]int64, n), make([]int64, n)
	key, hash, schedule, fire := make([]sql.NullString, n), make([]sql.NullString, n), make([]sql.NullString, n), make([]sql.NullString, n)
	for i, c := range cs {
		ids[i], orgs[i], owners[i], agents[i], task[i], payload[i] = c.ID, c.OrgID, c.OwnerID, c.AgentID, c.Task, string(c.Payload)
		priority[i], timeout[i], retries[i] = int64(c.Priority), int64(c.TimeoutS), int64(c.MaxRetries)
		key[i] = nullString(c.IdempotencyKey)
		hash[i] = nullString(c.RequestHash)
		schedule[i] = nullString(c.ScheduleID)
		if c.FireTime != nil {
			fire[i] = sql.NullString{String: c.FireTime.UTC().Format(time.RFC3339Nano), Valid: true}
		}
	}
	var rows []*platform.Command
	// Inserts the commands (skipping used idempotency keys and fired
	// schedule times), admitting what it may, with their "queued" events;
	// returns the stored commands.
	err := s.sel(ctx, &rows, `SELECT * FROM insert_commands($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[],
			$7::integer[], $8::integer[], $9::integer[], $10::text[], $11::text[], $12::text[], $13::text[], $14, $15, $16)`,
		pq.Array(ids), pq.Array(orgs), pq.Array(owners), pq.Array(agents), pq.Array(task), pq.Array(payload),
		pq.Array(priority), pq.Array(timeout), pq.Array(retries), pq.Array(key), pq.Array(hash), pq.Array(schedule), pq.Array(fire),
		admit, s.Limits.OrgMaxInFlight, s.Limits.OrgMaxQueued)
	if err != nil {
		return nil, sqlq.MapError(err, "command not found")
	}
	return batch.Align(rows, func(c *platform.Command) string { return c.ID }, ids), nil
}

func nullString(p *string) sql.NullString {
	if p == nil {
		return sql.NullString{}
	}
	return sql.NullString{String: *p, Valid: true}
}

// AdmitAgent admits what it can of an agent's backlog.
func (s *Store) AdmitAgent(ctx context.Context, agentID string) ([]Admitted, error) {
	return s.AdmitAgents(ctx, []string{agentID})
}

// AdmitAgents admits what it can of the backlogs of agents, in one
// transaction.
func (s *Store) AdmitAgents(ctx context.Context, agentIDs []string) ([]Admitted, error) {
	var out []Admitted
	// Admits the agents' waiting commands within their and their
	// organizations' limits; returns them with their timeouts.
	err := s.sel(ctx, &out, `SELECT agent_id, id, attempt, timeout_s FROM admit_agents($1::uuid[], $2, $3)`,
		pq.Array(agentIDs), s.Limits.OrgMaxInFlight, s.Limits.OrgMaxQueued)
	return out, err
}

// AdmitOrg admits what it can of the backlogs of an organization's agents,
// in one transaction.
func (s *Store) AdmitOrg(ctx context.Context, orgID string) ([]Admitted, error) {
	var out []Admitted
	// Admits the waiting commands of the organization's agents within the
	// limits; returns them with their timeouts.
	err := s.sel(ctx, &out, `SELECT agent_id, id, attempt, timeout_s
		FROM admit_org($1, COALESCE((SELECT o.org_max_in_flight FROM organizations o WHERE o.id = $1), $2), $3)`,
		orgID, s.Limits.OrgMaxInFlight, s.Limits.OrgMaxQueued)
	return out, err
}

// WaitingAgents lists agents with a backlog: of one organization, or of all
// when orgID is "".
func (s *Store) WaitingAgents(ctx context.Context, orgID string, limit int) ([]string, error) {
	var out []string
	if orgID == "" {
		// The longest waiting first, and not the backlogs of disabled
		// agents, which wait for them: a pass over many backlogs that
		// cannot move must not starve the others.
		err := s.DB.SelectContext(ctx, &out, `SELECT w.agent_id FROM commands w JOIN agents a ON a.id = w.agent_id
			WHERE w.status = 'queued' AND w.admitted_at IS NULL AND a.status <> 'disabled'
			GROUP BY w.agent_id ORDER BY min(w.created_at) LIMIT $1`, limit)
		return out, err
	}
	err := s.DB.SelectContext(ctx, &out, `SELECT DISTINCT agent_id FROM commands WHERE org_id = $1 AND status = 'queued' AND admitted_at IS NULL LIMIT $2`, orgID, limit)
	return out, err
}

// Claim makes attempt of command id running on worker, if the command is
// queued for exactly that attempt and not cancelled. It returns the command
// with its agent's config and environment, or nil when there is nothing to
// run (already claimed, cancelled, finished).
func (s *Store) Claim(ctx context.Context, id string, attempt int, worker string, lease time.Duration) (*Claimed, error) {
	out, err := s.ClaimMany(ctx, []Attempt{{ID: id, Attempt: attempt}}, worker, lease)
	if err != nil {
		return nil, err
	}
	return out[0], nil
}

// Attempt names an attempt of a command.
type Attempt struct {
	ID      string
	Attempt int
}

// ClaimMany claims attempts for worker, as Claim does, in one statement
// (two if a command comes twice). The result is in the order of attempts.
func (s *Store) ClaimMany(ctx context.Context, attempts []Attempt, worker string, lease time.Duration) ([]*Claimed, error) {
	out := make([]*Claimed, len(attempts))
	for _, round := range rounds(len(attempts), func(i int) string { return attempts[i].ID }) {
		ids, nums, want := make([]string, len(round)), make([]int64, len(round)), make([]Attempt, len(round))
		for k, i := range round {
			ids[k], nums[k], want[k] = attempts[i].ID, int64(attempts[i].Attempt), attempts[i]
		}
		var rows []*Claimed
		// Fences each attempt: only a queued command at attempt-1 becomes
		// running; records the events and makes the agents busy. Returns the
		// claimed commands with their agents' config and environment ids,
		// and whether the slot a claim freed in the organization's queue has
		// a command to take it. (c.id = ANY(...) keeps the plan on the
		// primary key: a cached generic plan may otherwise scan by status.
		// Agents are locked in id order: see agentStatus.)
		err := s.sel(ctx, &rows, `WITH req AS (SELECT * FROM unnest($1::uuid[], $2::integer[]) AS r(id, attempt)),
			done AS (
				UPDATE commands c SET status = 'running', attempt = r.attempt, worker_id = $3, lease_until = now() + $4 * interval '1 millisecond',
					started_at = COALESCE(c.started_at, now()), not_before = NULL, updated_at = now(), version = c.version + 1
				FROM req r
				WHERE c.id = ANY($1::uuid[]) AND c.id = r.id AND c.status = 'queued' AND c.attempt = r.attempt - 1 AND c.cancel_requested_at IS NULL AND c.admitted_at IS NOT NULL
				RETURNING c.*),
			ev AS (INSERT INTO command_events (command_id, type, status, attempt) SELECT id, 'running', status, attempt FROM done),
			ag_lock AS MATERIALIZED (SELECT a.id FROM agents a
				WHERE a.id IN (SELECT agent_id FROM done) AND a.status NOT IN ('busy', 'disabled')
				ORDER BY a.id FOR NO KEY UPDATE),
			ag AS (UPDATE agents a SET status = 'busy', updated_at = now()
				FROM ag_lock l WHERE a.id = l.id AND a.status NOT IN ('busy', 'disabled')
				RETURNING a.id)
			SELECT done.*, g.config AS agent_config, g.environment_id AS agent_environment_id, `+orgQueuedFull+` AS org_full,
				done.agent_id IN (SELECT id FROM ag) AS agent_changed
			FROM done JOIN agents g ON g.id = done.agent_id`,
			pq.Array(ids), pq.Array(nums), worker, lease.Milliseconds(), s.Limits.OrgMaxQueued)
		if err != nil {
			return nil, err
		}
		for k, c := range batch.Align(rows, func(c *Claimed) Attempt { return Attempt{c.ID, c.Attempt} }, want) {
			out[round[k]] = c
		}
	}
	return out, nil
}

// rounds splits the indexes 0..n-1 into rounds in which no key comes
// twice, in order: one statement updates a row once.
func rounds(n int, key func(int) string) [][]int {
	var out [][]int
	seen := []map[string]bool{}
	for i := range n {
		k := key(i)
		r := 0
		for r < len(seen) && seen[r][k] {
			r++
		}
		if r == len(seen) {
			seen = append(seen, map[string]bool{})
			out = append(out, nil)
		}
		seen[r][k] = true
		out[r] = append(out[r], i)
	}
	return out
}

// Claimed is a command a worker runs, with what the handler needs.
type Claimed struct {
	platform.Command
	AgentConfig        platform.JSONObject `db:"agent_config"`
	AgentEnvironmentID *string             `db:"agent_environment_id"`
	// OrgFull tells that the organization's queue was full and a command
	// waits: the slot the claim freed is for it.
	OrgFull bool `db:"org_full"`
	// AgentChanged tells that the claim changed the agent's status.
	AgentChanged bool `db:"agent_changed"`

	// announced is closed once the running event is published.
	announced chan struct{}
	// after takes the recorded outcome to the goroutine that published the
	// running event (see Runner.finish).
	after chan *afterward
}

// orgQueuedFull tells whether the organization's queue was full ($5 its
// limit), in the claim's snapshot, which still shows the claimed command
// queued, and a command waits: the slot the claim freed is for it. A
// command merely on its way (inserted, its own dispatch not yet admitting
// it) does not count. The snapshot may miss a command its dispatch found
// the queue full for just now; the claimed command's finish admits it.
const orgQueuedFull = `(EXISTS (SELECT 1 FROM commands w WHERE w.org_id = done.org_id AND w.status = 'queued' AND w.admitted_at IS NULL)
	AND (SELECT COALESCE(sum(l.queued), 0) FROM org_load l WHERE l.org_id = done.org_id) >= $5)`

// orgFull tells whether the organization was at one of its limits ($11 the
// default in-flight limit, $12 the queued limit) in the outcome's snapshot,
// which still counts the finished command, and a command waits: the slot
// the outcome freed may be for another agent's command.
const orgFull = `(EXISTS (SELECT 1 FROM commands w WHERE w.org_id = done.org_id AND w.status = 'queued' AND w.admitted_at IS NULL)
	AND EXISTS (SELECT 1 FROM org_load l WHERE l.org_id = done.org_id GROUP BY l.org_id
		HAVING sum(l.inflight) >= COALESCE((SELECT o.org_max_in_flight FROM organizations o WHERE o.id = done.org_id), $11)
			OR sum(l.queued) >= $12))`

// Outcome is how an attempt ended.
type Outcome struct {
	Status string // succeeded, failed, canceled, or queued (retry or hand-back)
	Event  string // the event type: succeeded, failed, canceled, retrying, requeued
	Result json.RawMessage
	Error  *string
	// Progress and Message, if set, are the handler's last report, not yet
	// written (a success is 100% whatever it said).
	Progress *int
	Message  *string
	// Failed counts the attempt as a failure.
	Failed bool
	// NotBefore delays a retry.
	NotBefore *time.Time
}

// Finish records the outcome of the attempt a worker holds. It returns nil
// when the worker no longer holds it (the fence: a stale worker's late
// write is refused). A command whose cancellation was asked is never
// retried nor handed back: such an outcome ends it canceled.
func (s *Store) Finish(ctx context.Context, id string, attempt int, o Outcome) (*Finished, error) {
	out, err := s.FinishMany(ctx, []Ending{{Attempt: Attempt{ID: id, Attempt: attempt}, Outcome: o}})
	if err != nil {
		return nil, err
	}
	return out[0], nil
}

// Ending is the outcome of an attempt.
type Ending struct {
	Attempt
	Outcome Outcome
}

// FinishMany records outcomes, as Finish does, in one statement (two if a
// command comes twice). The result is in the order of endings.
func (s *Store) FinishMany(ctx context.Context, endings []Ending) ([]*Finished, error) {
	out := make([]*Finished, len(endings))
	for _, round := range rounds(len(endings), func(i int) string { return endings[i].ID }) {
		n := len(round)
		ids, nums, failed, want := make([]string, n), make([]int64, n), make([]int64, n), make([]Attempt, n)
		status, event := make([]string, n), make([]string, n)
		result, errs, notBefore, progress, message := make([]sql.NullString, n), make([]sql.NullString, n), make([]sql.NullString, n), make([]sql.NullString, n), make([]sql.NullString, n)
		for k, i := range round {
			e := endings[i]
			o := e.Outcome
			ids[k], nums[k], status[k], event[k], want[k] = e.ID, int64(e.Attempt.Attempt), o.Status, o.Event, e.Attempt
			if o.Failed {
				failed[k] = 1
			}
			if o.Result != nil {
				result[k] = sql.NullString{String: string(o.Result), Valid: true}
			}
			if o.Error != nil {
				errs[k] = sql.NullString{String: *o.Error, Valid: true}
			}
			if o.NotBefore != nil {
				notBefore[k] = sql.NullString{String: o.NotBefore.UTC().Format(time.RFC3339Nano), Valid: true}
			}
			if o.Progress != nil {
				progress[k] = sql.NullString{String: strconv.Itoa(*o.Progress), Valid: true}
			}
			if o.Message != nil {
				message[k] = sql.NullString{String: *o.Message, Valid: true}
			}
		}
		var rows []*Finished
		// Writes each outcome only for the attempt the worker holds (a retry
		// of a command being cancelled ends it canceled); records the events
		// and recomputes the agents' statuses. Returns the commands. (c.id =
		// ANY(...): see ClaimMany.)
		err := s.sel(ctx, &rows, `WITH req AS (
				SELECT * FROM unnest($1::uuid[], $2::integer[], $3::text[], $4::text[], $5::text[], $6::integer[], $7::text[], $8::text[], $9::text[], $10::text[])
					AS r(id, attempt, status, result, error, failed, not_before, event, progress, message)),
			done AS (
				UPDATE commands c SET
					status = CASE WHEN r.status = 'queued' AND c.cancel_requested_at IS NOT NULL THEN 'canceled' ELSE r.status END,
					result = COALESCE(r.result::jsonb, c.result), error = COALESCE(r.error, c.error), failures = c.failures + r.failed,
					progress = CASE WHEN r.status = 'succeeded' THEN 100 ELSE COALESCE(r.progress::integer, c.progress) END,
					message = COALESCE(r.message, c.message),
					finished_at = CASE WHEN r.status IN ('succeeded', 'failed', 'canceled') OR c.cancel_requested_at IS NOT NULL THEN now() END,
					not_before = CASE WHEN c.cancel_requested_at IS NULL THEN r.not_before::timestamptz END,
					worker_id = NULL, lease_until = NULL, updated_at = now(), version = c.version + 1
				FROM req r
				WHERE c.id = ANY($1::uuid[]) AND c.id = r.id AND c.attempt = r.attempt AND c.status = 'running'
				RETURNING c.*),
			ev AS (INSERT INTO command_events (command_id, type, status, attempt, progress, message, data)
				SELECT d.id, CASE WHEN d.status <> r.status THEN d.status ELSE r.event END, d.status, d.attempt, d.progress, COALESCE(d.error, ''), d.result
				FROM done d JOIN req r ON r.id = d.id),
			`+agentStatus+`
			SELECT done.*, `+orgFull+` AS org_full, done.agent_id IN (SELECT id FROM ag) AS agent_changed FROM done`,
			pq.Array(ids), pq.Array(nums), pq.Array(status), pq.Array(result), pq.Array(errs), pq.Array(failed),
			pq.Array(notBefore), pq.Array(event), pq.Array(progress), pq.Array(message),
			s.Limits.OrgMaxInFlight, s.Limits.OrgMaxQueued)
		if err != nil {
			return nil, err
		}
		for k, c := range batch.Align(rows, func(c *Finished) Attempt { return Attempt{c.ID, c.Attempt} }, want) {
			out[round[k]] = c
		}
	}
	return out, nil
}

// Finished is a command as an outcome left it.
type Finished struct {
	platform.Command
	// OrgFull tells that the organization was at a limit and a command
	// waits: the slot the outcome freed may be for another agent's.
	OrgFull bool `db:"org_full"`
	// AgentChanged tells that the outcome changed the agent's status.
	AgentChanged bool `db:"agent_changed"`
}

// Progress records a progress report of the attempt a worker holds; false
// when it no longer holds it.
func (s *Store) Progress(ctx context.Context, id string, attempt, percent int, message string, logLines []string) (bool, error) {
	var data any
	typ := "progress"
	if len(logLines) > 0 {
		raw, _ := json.Marshal(map[string]any{"lines": logLines})
		data, typ = string(raw), "log"
	}
	var n int
	// Updates the progress of the held attempt and records the event;
	// returns how many commands changed (0 or 1).
	err := s.get(ctx, &n, `WITH done AS (
			UPDATE commands SET progress = $3, message = $4, updated_at = now(), version = version + 1
			WHERE id = $1 AND attempt = $2 AND status = 'running' RETURNING id, status, attempt, progress, message),
		ev AS (INSERT INTO command_events (command_id, type, status, attempt, progress, message, data)
			SELECT id, $5, status, attempt, progress, message, $6::jsonb FROM done)
		SELECT count(*) FROM done`, id, attempt, percent, message, typ, data)
	return n == 1, err
}

// Heartbeat extends the leases of the attempts a worker runs. It returns
// the ids of those whose cancellation was requested, and the attempts the
// worker no longer holds (their lease lapsed and the command went on
// without it, or the command is gone), whose handlers must stop.
func (s *Store) Heartbeat(ctx context.Context, worker string, held []Attempt, lease time.Duration) (cancel []string, lost []Attempt, err error) {
	ids, nums := make([]string, len(held)), make([]int64, len(held))
	for i, a := range held {
		ids[i], nums[i] = a.ID, int64(a.Attempt)
	}
	var rows []struct {
		ID      string `db:"id"`
		Attempt int    `db:"attempt"`
		Cancel  bool   `db:"cancel"`
		Lost    bool   `db:"lost"`
	}
	// Extends the leases the worker holds, and says which it no longer
	// holds. A command another transaction holds (its outcome being
	// recorded, a cancel) is skipped, not waited for: its lease has two
	// more heartbeats to go, and waiting could deadlock with a batch of
	// outcomes; it is judged lost only from what is committed.
	err = s.sel(ctx, &rows, `WITH req AS (SELECT * FROM unnest($2::uuid[], $3::integer[]) AS r(id, attempt)),
		mine AS (SELECT c.id FROM commands c JOIN req r ON r.id = c.id
			WHERE c.id = ANY($2::uuid[]) AND c.worker_id = $1 AND c.status = 'running' AND c.attempt = r.attempt
			FOR NO KEY UPDATE OF c SKIP LOCKED),
		upd AS (UPDATE commands SET lease_until = now() + $4 * interval '1 millisecond'
			WHERE id IN (SELECT id FROM mine)
			RETURNING id, attempt, cancel_requested_at IS NOT NULL AS cancel)
		SELECT id, attempt, cancel, false AS lost FROM upd
		UNION ALL
		SELECT r.id, r.attempt, false, true FROM req r
			WHERE NOT EXISTS (SELECT 1 FROM commands c WHERE c.id = r.id AND c.worker_id = $1 AND c.status = 'running' AND c.attempt = r.attempt)`,
		worker, pq.Array(ids), pq.Array(nums), lease.Milliseconds())
	for _, r := range rows {
		switch {
		case r.Lost:
			lost = append(lost, Attempt{ID: r.ID, Attempt: r.Attempt})
		case r.Cancel:
			cancel = append(cancel, r.ID)
		}
	}
	return cancel, lost, err
}

// Cancel cancels a queued command at once, or asks the worker running it
// to stop. It returns the command as it now is, nil when it already ended
// (see CancelOnce).
func (s *Store) Cancel(ctx context.Context, id string) (*platform.Command, error) {
	out, _, err := s.CancelOnce(ctx, id)
	return out, err
}

// CancelOnce is Cancel that also tells whether this call changed anything:
// asking again to stop a running command whose cancellation was asked
// already returns it unchanged (asked false), with no second event.
func (s *Store) CancelOnce(ctx context.Context, id string) (out *platform.Command, asked bool, err error) {
	out = &platform.Command{}
	// Cancels a queued command outright (event, agent status); a running
	// one not yet asked is marked for its worker. Returns the command as it
	// now is.
	err = s.DB.GetContext(ctx, out, `WITH done AS (
			UPDATE commands SET
				status = CASE WHEN status = 'queued' THEN 'canceled' ELSE status END,
				finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
				cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now(), version = version + 1
			WHERE id = $1 AND (status = 'queued' OR status = 'running' AND cancel_requested_at IS NULL)
			RETURNING *),
		ev AS (INSERT INTO command_events (command_id, type, status, attempt, progress)
			SELECT id, CASE WHEN status = 'canceled' THEN 'canceled' ELSE 'cancel_requested' END, status, attempt, progress FROM done),
		`+agentStatus+`
		SELECT * FROM done`, id)
	if err == nil {
		return out, true, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return nil, false, err
	}
	// Ended, or running with its cancellation asked already.
	err = s.DB.GetContext(ctx, out, `SELECT * FROM commands WHERE id = $1 AND status = 'running' AND cancel_requested_at IS NOT NULL`, id)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return out, false, nil
}

// Retry puts a failed command back in its agent's backlog, forgetting a
// cancellation asked before it failed.
func (s *Store) Retry(ctx context.Context, id string) (*platform.Command, error) {
	out := &platform.Command{}
	// Re-queues a failed command with its failures forgotten; records the
	// event. Returns the command, or no row if it is not failed.
	err := s.DB.GetContext(ctx, out, `WITH done AS (
			UPDATE commands SET status = 'queued', failures = 0, error = NULL, result = NULL, progress = 0, message = '',
				admitted_at = NULL, not_before = NULL, started_at = NULL, finished_at = NULL, cancel_requested_at = NULL,
				updated_at = now(), version = version + 1
			WHERE id = $1 AND status = 'failed'
			RETURNING *),
		ev AS (INSERT INTO command_events (command_id, type, status, attempt) SELECT id, 'queued', status, attempt FROM done)
		SELECT * FROM done`, id)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	return out, err
}

// ExpireLeases ends or re-queues the running commands whose worker stopped
// renewing their lease: cancelled ones end canceled, ones out of retries end
// failed, the rest go back to the queue for their next attempt.
func (s *Store) ExpireLeases(ctx context.Context, limit int) ([]*platform.Command, error) {
	var out []*platform.Command
	// Takes running commands whose lease passed; returns them as changed.
	err := s.DB.SelectContext(ctx, &out, `WITH expired AS (
			SELECT id FROM commands WHERE status = 'running' AND lease_until < now() FOR UPDATE SKIP LOCKED LIMIT $1),
		done AS (
			UPDATE commands c SET
				status = CASE WHEN c.cancel_requested_at IS NOT NULL THEN 'canceled'
					WHEN c.failures + 1 > c.max_retries THEN 'failed' ELSE 'queued' END,
				failures = c.failures + 1,
				error = 'the worker running attempt ' || c.attempt || ' was lost',
				finished_at = CASE WHEN c.cancel_requested_at IS NOT NULL OR c.failures + 1 > c.max_retries THEN now() END,
				worker_id = NULL, lease_until = NULL, updated_at = now(), version = c.version + 1
			FROM expired WHERE c.id = expired.id
			RETURNING c.*),
		ev AS (INSERT INTO command_events (command_id, type, status, attempt, progress, message)
			SELECT id, CASE status WHEN 'queued' THEN 'retrying' ELSE status END, status, attempt, progress, error FROM done),
		`+agentStatus+`
		SELECT * FROM done`, limit)
	return out, err
}

// Unqueued lists admitted, queued commands older than age, whose queue task
// the reconciler should check still exists.
func (s *Store) Unqueued(ctx context.Context, age time.Duration, limit int) ([]*platform.Command, error) {
	var out []*platform.Command
	err := s.DB.SelectContext(ctx, &out, `SELECT * FROM commands WHERE status = 'queued' AND admitted_at IS NOT NULL
		AND admitted_at < now() - $1 * interval '1 millisecond' AND cancel_requested_at IS NULL
		ORDER BY admitted_at LIMIT $2`, age.Milliseconds(), limit)
	return out, err
}

// Events returns a command's history, oldest first.
func (s *Store) Events(ctx context.Context, id string, after int64, limit int) ([]platform.CommandEvent, error) {
	out := []platform.CommandEvent{}
	err := s.DB.SelectContext(ctx, &out, `SELECT id, command_id, type, status, attempt, progress, message, data, created_at
		FROM command_events WHERE command_id = $1 AND id > $2 ORDER BY id LIMIT $3`, id, after, limit)
	return out, err
}

// Agent returns an agent's status and config as they are now.
func (s *Store) Agent(ctx context.Context, id string) (*platform.Agent, error) {
	a := &platform.Agent{}
	err := s.DB.GetContext(ctx, a, `SELECT id, org_id, status, config FROM agents WHERE id = $1`, id)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, platform.Errorf(platform.ENOTFOUND, "agent not found")
	}
	return a, err
}

// Environment returns an environment's variables and sealed secrets.
func (s *Store) Environment(ctx context.Context, id string) (*platform.Environment, error) {
	e := &platform.Environment{}
	err := s.DB.GetContext(ctx, e, `SELECT * FROM environments WHERE id = $1`, id)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	return e, err
}

// Sweep deletes finished commands older than retention and forgets
// idempotency keys older than a day. It returns the rows deleted.
func (s *Store) Sweep(ctx context.Context, retention time.Duration) (int64, error) {
	if _, err := s.DB.ExecContext(ctx, `UPDATE commands SET idempotency_key = NULL
		WHERE idempotency_key IS NOT NULL AND created_at < now() - interval '24 hours'`); err != nil {
		return 0, err
	}
	// In rounds of 10,000 (short transactions), until none is left or the
	// pass has had its time.
	var total int64
	deadline := time.Now().Add(20 * time.Second)
	for {
		res, err := s.DB.ExecContext(ctx, `DELETE FROM commands WHERE id IN (
			SELECT id FROM commands WHERE finished_at < now() - $1 * interval '1 millisecond' LIMIT 10000)`, retention.Milliseconds())
		if err != nil {
			return total, err
		}
		n, err := res.RowsAffected()
		total += n
		if err != nil || n < 10000 || time.Now().After(deadline) {
			return total, err
		}
	}
}

// SetDisabled disables agent a, or enables it back as busy or idle, in tx,
// and sets a's status, version and updated_at. A running command is
// locked to be counted: one whose outcome is being recorded is waited
// for, and counted only if still running (the outcome leaves a disabled
// agent alone, so counting it would leave the agent busy with nothing
// running).
func (s *Store) SetDisabled(ctx context.Context, tx *sqlx.Tx, a *platform.Agent, disable bool) error {
	return tx.QueryRowxContext(ctx, `UPDATE agents a SET status = CASE WHEN $2 THEN 'disabled'
			WHEN EXISTS (SELECT 1 FROM commands c WHERE c.agent_id = a.id AND c.status = 'running' FOR SHARE) THEN 'busy' ELSE 'idle' END,
			updated_at = now(), version = version + 1
		WHERE id = $1 RETURNING status, version, updated_at`, a.ID, disable).Scan(&a.Status, &a.Version, &a.UpdatedAt)
}

// FixAgentStatuses recomputes the statuses a crash left wrong (busy with
// nothing running, idle with a command running) and returns the agents it
// changed.
func (s *Store) FixAgentStatuses(ctx context.Context) ([]string, error) {
	var ids []string
	err := s.DB.SelectContext(ctx, &ids, `UPDATE agents a SET status = s.status
		FROM (SELECT g.id, CASE
				WHEN EXISTS (SELECT 1 FROM commands c WHERE c.agent_id = g.id AND c.status = 'running') THEN 'busy'
				WHEN g.status = 'busy' THEN 'idle' ELSE g.status END AS status
			FROM agents g WHERE g.status <> 'disabled') s
		WHERE a.id = s.id AND a.status <> s.status AND a.status <> 'disabled'
		RETURNING a.id`)
	return ids, err
}

// InFlight counts admitted commands per organization (for metrics).
func (s *Store) InFlight(ctx context.Context) (map[string]int, int, error) {
	var rows []struct {
		OrgID string `db:"org_id"`
		N     int    `db:"n"`
	}
	if err := s.DB.SelectContext(ctx, &rows, `SELECT org_id, count(*) AS n FROM commands WHERE admitted_at IS NOT NULL AND status IN ('queued', 'running') GROUP BY org_id`); err != nil {
		return nil, 0, err
	}
	out := map[string]int{}
	for _, r := range rows {
		out[r.OrgID] = r.N
	}
	var waiting int
	err := s.DB.GetContext(ctx, &waiting, `SELECT count(*) FROM commands WHERE status = 'queued' AND admitted_at IS NULL`)
	return out, waiting, err
}
