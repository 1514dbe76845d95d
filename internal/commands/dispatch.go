package commands

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/batch"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/tasks"
)

// DispatchRequest is a dispatch: POST /v1/agents/{id}/commands.
type DispatchRequest struct {
	Task       string          `json:"task" minLength:"1" maxLength:"100" doc:"A task type from GET /v1/tasks, such as agent:echo."`
	Payload    json.RawMessage `json:"payload,omitempty" doc:"The task's payload; its schema is in GET /v1/tasks."`
	TimeoutS   *int            `json:"timeout_s,omitempty" minimum:"1" maximum:"86400" doc:"Time limit of one attempt; the task's default when absent."`
	MaxRetries *int            `json:"max_retries,omitempty" minimum:"0" maximum:"25" doc:"Retries after a failed attempt; the task's default when absent."`
	Priority   *int            `json:"priority,omitempty" minimum:"-100" maximum:"100" doc:"Higher runs first among the agent's waiting commands (default 0)."`
}

// Metrics is what the pipeline counts (the metrics package implements it).
type Metrics interface {
	Dispatched(task string)
	Started(task string, waited time.Duration)
	Finished(task, outcome string, ran time.Duration)
	// Ended counts a command ended without a worker running it to the end.
	Ended(task, outcome string)
	Retried(task string)
}

// Dispatcher accepts commands: it validates them, stores them and admits
// what the agent's and organization's limits allow.
type Dispatcher struct {
	Store   *Store
	Queue   *Queue
	Events  *events.Bus
	Logger  *slog.Logger
	Metrics Metrics
	// AgentChanged, if set, is told when the pipeline changed an agent's
	// status (the API's cache of agents is made stale).
	AgentChanged func(ctx context.Context, agentID string)

	// AdmitLinger, if set, is how long an admission waits for others to go
	// with (see batch.Batcher.Linger): for a worker's admissions after
	// outcomes, which no request waits on.
	AdmitLinger time.Duration

	admitOnce  sync.Once
	admissions *batch.Batcher[string, []Admitted]
}

func (d *Dispatcher) agentChanged(ctx context.Context, agentID string) {
	if d.AgentChanged != nil {
		d.AgentChanged(ctx, agentID)
	}
}

// Validate checks a request against the task registry and fills in the
// defaults. The error lists the reason.
func Validate(req *DispatchRequest) (*tasks.Definition, error) {
	def, ok := tasks.Lookup(req.Task)
	if !ok {
		names := []string{}
		for _, d := range tasks.All() {
			names = append(names, d.Type)
		}
		return nil, platform.Invalid("unknown task", platform.FieldError{Field: "body.task", Message: "no such task; one of " + strings.Join(names, ", ")})
	}
	if len(req.Payload) == 0 || string(req.Payload) == "null" {
		req.Payload = json.RawMessage("{}")
	}
	if _, err := def.Decode(req.Payload); err != nil {
		msg := strings.TrimPrefix(err.Error(), tasks.ErrBadPayload.Error()+": ")
		return nil, platform.Invalid("the payload does not fit the task", platform.FieldError{Field: "body.payload", Message: msg})
	}
	return def, nil
}

// Dispatch stores a command for agent from p and admits it if it can run
// now. With an idempotency key used before by the same caller within 24
// hours and the same request, it returns the earlier command (created
// false); with a different request, ECONFLICT.
func (d *Dispatcher) Dispatch(ctx context.Context, p *platform.Principal, agent *platform.Agent, req DispatchRequest, idempotencyKey string) (*platform.Command, bool, error) {
	if agent.Status == platform.AgentDisabled {
		return nil, false, platform.Errorf(platform.ECONFLICT, "the agent is disabled; enable it first")
	}
	def, err := Validate(&req)
	if err != nil {
		return nil, false, err
	}
	if !agent.Allows(req.Task) {
		return nil, false, platform.Invalid("task not allowed", platform.FieldError{Field: "body.task", Message: "this agent's config does not allow " + req.Task})
	}
	c := &platform.Command{
		Base:       platform.Base{ID: uuid.NewString(), OrgID: agent.OrgID, OwnerID: p.ID},
		AgentID:    agent.ID,
		Task:       req.Task,
		Payload:    compact(req.Payload),
		TimeoutS:   agent.CommandTimeoutS(int(def.Timeout().Seconds())),
		MaxRetries: def.MaxRetries(),
	}
	if req.TimeoutS != nil {
		c.TimeoutS = *req.TimeoutS
	}
	if req.MaxRetries != nil {
		c.MaxRetries = *req.MaxRetries
	}
	if req.Priority != nil {
		c.Priority = *req.Priority
	}
	if idempotencyKey != "" {
		if len(idempotencyKey) > 200 {
			return nil, false, platform.Invalid("idempotency key too long", platform.FieldError{Field: "header.Idempotency-Key", Message: "at most 200 characters"})
		}
		hash := requestHash(agent.ID, req.Task, req.Payload, c)
		c.IdempotencyKey, c.RequestHash = &idempotencyKey, &hash
	}
	stored, created, err := d.Store.InsertAdmitted(ctx, c)
	if err != nil {
		return nil, false, err
	}
	if !created {
		if stored.RequestHash == nil || c.RequestHash == nil || *stored.RequestHash != *c.RequestHash {
			return nil, false, platform.Errorf(platform.ECONFLICT, "this Idempotency-Key was used for a different request")
		}
		return stored, false, nil
	}
	if d.Metrics != nil {
		d.Metrics.Dispatched(stored.Task)
	}
	// The command is stored: admit it even if the caller has gone, or it
	// would wait for the reconciler.
	ctx = context.WithoutCancel(ctx)
	d.Publish(ctx, "command.queued", stored)
	if stored.AdmittedAt != nil {
		// Admitted as it was stored: straight to the queue.
		d.enqueue(ctx, []Admitted{{AgentID: stored.AgentID, ID: stored.ID, Attempt: stored.Attempt, TimeoutS: stored.TimeoutS}})
	} else {
		d.Admit(ctx, stored.AgentID)
	}
	return stored, true, nil
}

// Admit admits what it can of an agent's backlog and enqueues it. Failures
// are logged: the command is safe in Postgres and the reconciler will retry.
func (d *Dispatcher) Admit(ctx context.Context, agentID string) int {
	// Admissions of agents at once go together: one transaction, one
	// organization lock for all.
	d.admitOnce.Do(func() {
		d.admissions = batch.New(1, batchMax, func(ctx context.Context, agents []string) ([][]Admitted, error) {
			admitted, err := d.Store.AdmitAgents(ctx, agents)
			if err != nil {
				return nil, err
			}
			out := make([][]Admitted, len(agents))
			first := make(map[string]int, len(agents))
			for i := len(agents) - 1; i >= 0; i-- {
				first[agents[i]] = i
			}
			for _, a := range admitted {
				i := first[a.AgentID]
				out[i] = append(out[i], a)
			}
			return out, nil
		})
		d.admissions.Linger = d.AdmitLinger
	})
	admitted, err := d.admissions.Do(agentID)
	if err != nil {
		d.Logger.WarnContext(ctx, "admission failed; the reconciler will retry", "agent_id", agentID, "err", err)
		return 0
	}
	d.enqueue(ctx, admitted)
	return len(admitted)
}

// enqueue hands admitted commands to the queue. Failures are logged: the
// reconciler re-enqueues what Redis does not hold.
func (d *Dispatcher) enqueue(ctx context.Context, admitted []Admitted) {
	for _, a := range admitted {
		if err := d.Queue.Enqueue(ctx, a.ID, a.Attempt+1, time.Duration(a.TimeoutS)*time.Second, 0); err != nil {
			d.Logger.WarnContext(ctx, "enqueue failed; the reconciler will retry", "command_id", a.ID, "err", err)
		}
	}
}

// AdmitOrg admits what it can of the backlogs of an organization's agents
// (or of every organization's, with orgID "": up to 200 agents with a
// backlog, in one transaction).
func (d *Dispatcher) AdmitOrg(ctx context.Context, orgID string) int {
	if orgID != "" {
		admitted, err := d.Store.AdmitOrg(ctx, orgID)
		if err != nil {
			d.Logger.WarnContext(ctx, "admission failed; the reconciler will retry", "org_id", orgID, "err", err)
			return 0
		}
		d.enqueue(ctx, admitted)
		return len(admitted)
	}
	agents, err := d.Store.WaitingAgents(ctx, orgID, 200)
	if err != nil {
		d.Logger.WarnContext(ctx, "listing backlogs failed", "err", err)
		return 0
	}
	if len(agents) == 0 {
		return 0
	}
	admitted, err := d.Store.AdmitAgents(ctx, agents)
	if err != nil {
		d.Logger.WarnContext(ctx, "admission failed; the reconciler will retry", "err", err)
		return 0
	}
	d.enqueue(ctx, admitted)
	return len(admitted)
}

// Cancel cancels a command: a queued one at once, a running one as soon as
// its worker hears (within a heartbeat at worst). A finished command is
// ECONFLICT.
func (d *Dispatcher) Cancel(ctx context.Context, c *platform.Command) (*platform.Command, error) {
	if c.Terminal() {
		return nil, platform.Errorf(platform.ECONFLICT, "the command already ended %s", c.Status)
	}
	out, asked, err := d.Store.CancelOnce(ctx, c.ID)
	if err != nil {
		return nil, err
	}
	ctx = context.WithoutCancel(ctx) // done: tell the worker and admit what it freed, whoever waits
	if out == nil {
		return nil, platform.Errorf(platform.ECONFLICT, "the command already ended")
	}
	if out.Status == platform.CommandCanceled {
		if d.Metrics != nil {
			d.Metrics.Ended(out.Task, platform.CommandCanceled)
		}
		d.agentChanged(ctx, out.AgentID)
		d.Publish(ctx, "command.canceled", out)
		d.Admit(ctx, out.AgentID)
		return out, nil
	}
	if !asked {
		return out, nil // asked already: its worker is stopping it
	}
	if err := d.Events.Signal(ctx, CancelChannel, out.ID); err != nil {
		d.Logger.WarnContext(ctx, "cancel signal not sent; the worker will see it at its next heartbeat", "command_id", out.ID, "err", err)
	}
	d.Publish(ctx, "command.cancel_requested", out)
	return out, nil
}

// Retry re-queues a failed command.
func (d *Dispatcher) Retry(ctx context.Context, c *platform.Command) (*platform.Command, error) {
	if c.Status != platform.CommandFailed {
		return nil, platform.Errorf(platform.ECONFLICT, "only a failed command can be retried; this one is %s", c.Status)
	}
	// A retry runs again on the agent as it is now: as a dispatch would be,
	// it is refused by a disabled agent or one that no longer allows the task.
	agent, err := d.Store.Agent(ctx, c.AgentID)
	if err != nil {
		return nil, err
	}
	if agent.Status == platform.AgentDisabled {
		return nil, platform.Errorf(platform.ECONFLICT, "the agent is disabled; enable it first")
	}
	if !agent.Allows(c.Task) {
		return nil, platform.Errorf(platform.ECONFLICT, "the agent's config no longer allows %s", c.Task)
	}
	out, err := d.Store.Retry(ctx, c.ID)
	if err != nil {
		return nil, err
	}
	ctx = context.WithoutCancel(ctx) // re-queued: admit it even if the caller has gone
	if out == nil {
		return nil, platform.Errorf(platform.ECONFLICT, "the command is no longer failed")
	}
	d.Publish(ctx, "command.queued", out)
	d.Admit(ctx, out.AgentID)
	return out, nil
}

// CancelChannel is the pub/sub channel (under the key prefix) on which the
// API tells workers to stop a command.
const CancelChannel = "cancel"

// Snapshot is the data of a command event.
type Snapshot struct {
	ID         string           `json:"id"`
	AgentID    string           `json:"agent_id"`
	Task       string           `json:"task"`
	Status     string           `json:"status"`
	Attempt    int              `json:"attempt"`
	Progress   int              `json:"progress"`
	Message    string           `json:"message,omitempty"`
	Error      *string          `json:"error,omitempty"`
	Result     *json.RawMessage `json:"result,omitempty"`
	UpdatedAt  time.Time        `json:"updated_at"`
	FinishedAt *time.Time       `json:"finished_at,omitempty"`
}

// SnapshotOf returns the event data of c.
func SnapshotOf(c *platform.Command) Snapshot {
	return Snapshot{ID: c.ID, AgentID: c.AgentID, Task: c.Task, Status: c.Status, Attempt: c.Attempt, Progress: c.Progress,
		Message: c.Message, Error: c.Error, Result: c.Result, UpdatedAt: c.UpdatedAt, FinishedAt: c.FinishedAt}
}

// Publish sends a command event to its command and agent topics.
func (d *Dispatcher) Publish(ctx context.Context, typ string, c *platform.Command) {
	publishCommand(ctx, d.Events, d.Logger, typ, c)
}

func publishCommand(ctx context.Context, bus *events.Bus, logger *slog.Logger, typ string, c *platform.Command) {
	if err := bus.Publish(ctx, typ, SnapshotOf(c), events.CommandTopic(c.ID), events.AgentTopic(c.AgentID)); err != nil {
		logger.WarnContext(ctx, "event not published", "type", typ, "command_id", c.ID, "err", err)
	}
}

// requestHash identifies a dispatch request for idempotency: its task,
// payload and the settings the command ends up with, so that a field sent
// with its default value is the same request as one that leaves it out.
func requestHash(agentID, task string, payload json.RawMessage, c *platform.Command) string {
	canon, _ := json.Marshal(struct {
		Agent string          `json:"a"`
		Task  string          `json:"t"`
		Body  json.RawMessage `json:"p"`
		T     int             `json:"ts"`
		R     int             `json:"r"`
		P     int             `json:"pr"`
	}{agentID, task, compact(payload), c.TimeoutS, c.MaxRetries, c.Priority})
	sum := sha256.Sum256(canon)
	return hex.EncodeToString(sum[:])
}

// compact re-encodes JSON canonically (sorted keys), so equal payloads
// compare equal.
func compact(raw json.RawMessage) json.RawMessage {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return raw
	}
	out, err := json.Marshal(v)
	if err != nil {
		return raw
	}
	return out
}
