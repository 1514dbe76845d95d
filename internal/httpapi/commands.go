package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/schedule"
	"github.com/agentry/agentry/tasks"
)

// CommandScope and ScheduleScope are the access scopes of commands and
// schedules.
var (
	CommandScope  = platform.Scope{Type: "Command", ACLAdmins: []string{platform.RoleSuperadmin}, AllowAlways: []string{platform.RoleSuperadmin}}
	ScheduleScope = platform.Scope{Type: "Schedule", ACLAdmins: []string{platform.RoleSuperadmin}, AllowAlways: []string{platform.RoleSuperadmin}}
)

type dispatchInput struct {
	ID             string `path:"id" format:"uuid" doc:"The agent."`
	IdempotencyKey string `header:"Idempotency-Key" maxLength:"200" doc:"Send the same key with the same body within 24 hours to get the same command back (200) instead of a second one; a different body with the key is 409."`
	Body           commands.DispatchRequest
}

type dispatchOutput struct {
	Status   int
	Location string `header:"Location"`
	Body     *platform.Command
}

type commandIDInput struct {
	ID string `path:"id" format:"uuid"`
}

type commandOutput struct {
	Body *platform.Command
}

type eventsInput struct {
	ID    string `path:"id" format:"uuid"`
	After int64  `query:"after" minimum:"0" doc:"Only events after this event id."`
	Limit int    `query:"limit" minimum:"1" maximum:"1000" default:"500"`
}

type eventsOutput struct {
	Body struct {
		Items []platform.CommandEvent `json:"items" nullable:"false"`
	}
}

type agentStatusOutput struct {
	Body struct {
		ID       string `json:"id"`
		Status   string `json:"status" enum:"idle,busy,error,disabled"`
		Waiting  int    `json:"waiting" doc:"Commands in the agent's backlog."`
		Queued   int    `json:"queued" doc:"Commands handed to the workers, not yet started."`
		Running  int    `json:"running"`
		LastTask string `json:"last_task,omitempty"`
	}
}

type agentOutput struct {
	Body *platform.Agent
}

type taskInfo struct {
	Type          string         `json:"type"`
	Description   string         `json:"description"`
	MaxRetries    int            `json:"max_retries"`
	TimeoutS      int            `json:"timeout_s"`
	PayloadSchema map[string]any `json:"payload_schema" doc:"The JSON Schema a payload of the task must fit."`
}

type tasksBody struct {
	Items []taskInfo `json:"items" nullable:"false"`
}

type tasksOutput struct {
	Body tasksBody
}

func (s *Server) commandRoutes(d Deps, res *Resources) {
	res.Commands = crud.Register(d.Registry, crud.Resource[platform.Command, struct{}]{
		Scope: CommandScope, Path: "/v1/commands", Table: "commands", Tag: "Commands",
		Ops:         crud.OpRead | crud.OpList | crud.OpACL,
		Description: "Commands dispatched to agents, with their status, progress, result and timings. Dispatch with POST /v1/agents/{id}/commands.",
		Sort:        []string{"status", "task", "priority"},
		Filters: []crud.Filter{
			{Param: "agent_id", Column: "agent_id"}, {Param: "status", Column: "status"}, {Param: "task", Column: "task"},
			{Param: "schedule_id", Column: "schedule_id"},
			{Param: "created_after", Column: "created_at", Op: ">=", Doc: "Only commands created at or after this time (RFC 3339)."},
			{Param: "created_before", Column: "created_at", Op: "<", Doc: "Only commands created before this time (RFC 3339)."},
		},
	})

	op := s.op(http.MethodPost, "/v1/agents/{id}/commands", "dispatch-command", "Commands", "Dispatch a command",
		"Queues a command for the agent and answers 202 with it; watch it on GET /v1/commands/{id} or the WebSocket topic command:{id}. Needs `Agent.command` on the agent. An unknown task or a payload that does not fit the task is 400; a disabled agent 409. The agent runs one command at a time unless its config's max_concurrency allows more; the rest wait in order.",
		http.StatusAccepted, true, http.StatusNotFound, http.StatusForbidden, http.StatusConflict)
	op.Responses = map[string]*huma.Response{"200": {
		Description: "The command an earlier request with the same Idempotency-Key and body created, within 24 hours.",
		Content:     map[string]*huma.MediaType{"application/json": {Schema: &huma.Schema{Ref: "#/components/schemas/Command"}}},
	}}
	huma.Register(s.API, op, func(ctx context.Context, in *dispatchInput) (*dispatchOutput, error) {
		// The agent's status flips with each command it runs; a dispatch
		// needs the rest of it (and its access), which stays cached.
		agent, p, err := res.Agents.GetDefinition(ctx, in.ID, "command")
		if err != nil {
			return nil, err
		}
		c, created, err := d.Dispatcher.Dispatch(ctx, p, agent, in.Body, in.IdempotencyKey)
		if err != nil {
			return nil, err
		}
		status := http.StatusAccepted
		if !created {
			status = http.StatusOK
		}
		return &dispatchOutput{Status: status, Location: "/v1/commands/" + c.ID, Body: c}, nil
	})

	huma.Register(s.API, s.op(http.MethodGet, "/v1/commands/{id}/events", "list-command-events", "Commands", "A command's history",
		"Every transition and progress report of the command, oldest first.", http.StatusOK, true, http.StatusNotFound),
		func(ctx context.Context, in *eventsInput) (*eventsOutput, error) {
			if _, _, err := res.Commands.Get(ctx, in.ID, crud.ActionRead); err != nil {
				return nil, err
			}
			items, err := d.Dispatcher.Store.Events(ctx, in.ID, in.After, in.Limit)
			if err != nil {
				return nil, err
			}
			out := &eventsOutput{}
			out.Body.Items = items
			return out, nil
		})

	huma.Register(s.API, s.op(http.MethodPost, "/v1/commands/{id}/cancel", "cancel-command", "Commands", "Cancel a command",
		"A queued command is canceled at once; a running one is stopped as soon as its worker hears (its handler's context is cancelled) and ends canceled. A canceled command is never retried. A finished command is 409. Needs `Command.cancel`.",
		http.StatusOK, true, http.StatusNotFound, http.StatusForbidden, http.StatusConflict),
		func(ctx context.Context, in *commandIDInput) (*commandOutput, error) {
			c, _, err := res.Commands.Get(ctx, in.ID, "cancel")
			if err != nil {
				return nil, err
			}
			out, err := d.Dispatcher.Cancel(ctx, c)
			if err != nil {
				return nil, err
			}
			return &commandOutput{Body: out}, nil
		})

	huma.Register(s.API, s.op(http.MethodPost, "/v1/commands/{id}/retry", "retry-command", "Commands", "Retry a failed command",
		"Puts a failed command back in its agent's backlog with its retries renewed. Needs `Command.retry`; only failed commands, on an agent that is enabled and still allows the task (409 otherwise).",
		http.StatusOK, true, http.StatusNotFound, http.StatusForbidden, http.StatusConflict),
		func(ctx context.Context, in *commandIDInput) (*commandOutput, error) {
			c, _, err := res.Commands.Get(ctx, in.ID, "retry")
			if err != nil {
				return nil, err
			}
			out, err := d.Dispatcher.Retry(ctx, c)
			if err != nil {
				return nil, err
			}
			return &commandOutput{Body: out}, nil
		})

	huma.Register(s.API, s.op(http.MethodGet, "/v1/agents/{id}/status", "get-agent-status", "Agents", "An agent's status",
		"The agent's status (the seed's get_status) and its commands waiting, queued and running.", http.StatusOK, true, http.StatusNotFound),
		func(ctx context.Context, in *commandIDInput) (*agentStatusOutput, error) {
			a, _, err := res.Agents.Get(ctx, in.ID, crud.ActionRead)
			if err != nil {
				return nil, err
			}
			out := &agentStatusOutput{}
			out.Body.ID, out.Body.Status = a.ID, a.Status
			// Counts the agent's unfinished commands by stage.
			err = d.DB.QueryRowxContext(ctx, `SELECT
					count(*) FILTER (WHERE status = 'queued' AND admitted_at IS NULL),
					count(*) FILTER (WHERE status = 'queued' AND admitted_at IS NOT NULL),
					count(*) FILTER (WHERE status = 'running'),
					COALESCE((SELECT task FROM commands WHERE agent_id = $1 ORDER BY created_at DESC LIMIT 1), '')
				FROM commands WHERE agent_id = $1 AND status IN ('queued', 'running')`, a.ID).
				Scan(&out.Body.Waiting, &out.Body.Queued, &out.Body.Running, &out.Body.LastTask)
			return out, err
		})

	setStatus := func(disable bool) func(ctx context.Context, in *commandIDInput) (*agentOutput, error) {
		return func(ctx context.Context, in *commandIDInput) (*agentOutput, error) {
			tx, err := d.DB.BeginTxx(ctx, nil)
			if err != nil {
				return nil, err
			}
			defer tx.Rollback()
			a, _, err := res.Agents.GetForUpdate(ctx, tx, in.ID, crud.ActionUpdate)
			if err != nil {
				return nil, err
			}
			if err := d.Dispatcher.Store.SetDisabled(ctx, tx, a, disable); err != nil {
				return nil, err
			}
			if err := tx.Commit(); err != nil {
				return nil, err
			}
			res.Agents.Notify(ctx, crud.OpUpdate, a)
			if !disable {
				d.Dispatcher.Admit(ctx, a.ID)
			}
			action := "agent.enable"
			if disable {
				action = "agent.disable"
			}
			d.Audit.Record(ctx, platform.AuditEvent{Action: action, ResourceType: "Agent", ResourceID: &a.ID, Outcome: "ok"})
			return &agentOutput{Body: res.Agents.Render(ctx, a)}, nil
		}
	}
	huma.Register(s.API, s.op(http.MethodPost, "/v1/agents/{id}/disable", "disable-agent", "Agents", "Disable an agent",
		"A disabled agent refuses new commands (409); its running commands finish and its backlog waits. Needs `Agent.update`.",
		http.StatusOK, true, http.StatusNotFound, http.StatusForbidden), setStatus(true))
	huma.Register(s.API, s.op(http.MethodPost, "/v1/agents/{id}/enable", "enable-agent", "Agents", "Enable an agent",
		"Takes commands again; its backlog resumes. Needs `Agent.update`.",
		http.StatusOK, true, http.StatusNotFound, http.StatusForbidden), setStatus(false))

	// The tasks and their payload schemas, worked out once: the schema
	// registry is not for concurrent use, and the tasks are fixed at start.
	var taskList tasksBody
	reg := huma.NewMapRegistry("#/components/schemas/", huma.DefaultSchemaNamer)
	for _, def := range tasks.All() {
		schema := reg.Schema(def.PayloadType, true, "")
		if schema.Ref != "" {
			if resolved := reg.SchemaFromRef(schema.Ref); resolved != nil {
				schema = resolved
			}
		}
		var generic map[string]any
		raw, err := json.Marshal(schema)
		if err == nil {
			err = json.Unmarshal(raw, &generic)
		}
		if err != nil {
			panic("tasks: the payload schema of " + def.Type + ": " + err.Error()) // a programming error, found at start-up
		}
		taskList.Items = append(taskList.Items, taskInfo{Type: def.Type, Description: def.Description,
			MaxRetries: def.MaxRetries(), TimeoutS: int(def.Timeout().Seconds()), PayloadSchema: generic})
	}
	huma.Register(s.API, s.op(http.MethodGet, "/v1/tasks", "list-tasks", "Commands", "List tasks",
		"The tasks agents can run, with their payload schemas, default retries and timeouts.", http.StatusOK, true),
		func(ctx context.Context, _ *struct{}) (*tasksOutput, error) {
			return &tasksOutput{Body: taskList}, nil
		})

	s.scheduleRoutes(d, res)
}

// ScheduleInput is what a client sets of a schedule.
type ScheduleInput struct {
	AgentID       string              `json:"agent_id" format:"uuid" doc:"Needs Agent.command on it."`
	Name          string              `json:"name,omitempty" maxLength:"100"`
	Task          string              `json:"task" minLength:"1" maxLength:"100"`
	Payload       platform.JSONObject `json:"payload,omitempty"`
	Cron          string              `json:"cron" minLength:"1" maxLength:"200" doc:"Five fields (six with seconds first), or @hourly, @daily, @every 10m …"`
	Timezone      string              `json:"timezone,omitempty" maxLength:"64" doc:"IANA time zone (default UTC)."`
	Enabled       *bool               `json:"enabled,omitempty" crud:"-" doc:"Default true."`
	MisfirePolicy string              `json:"misfire_policy,omitempty" enum:"skip,run_once" doc:"Default skip."`
}

func (s *Server) scheduleRoutes(d Deps, res *Resources) {
	configure := func(ctx context.Context, in *ScheduleInput, sc *schedule.Schedule, agentChanged, taskChanged bool) error {
		if sc.Timezone == "" {
			sc.Timezone = "UTC"
		}
		if sc.MisfirePolicy == "" {
			sc.MisfirePolicy = schedule.MisfireSkip
		}
		if sc.Payload == nil {
			sc.Payload = platform.JSONObject{}
		}
		if in.Enabled != nil {
			sc.Enabled = *in.Enabled
		}
		var bad []platform.FieldError
		var next time.Time
		if loc, err := time.LoadLocation(sc.Timezone); err != nil || sc.Timezone == "Local" || loc == nil {
			bad = append(bad, platform.FieldError{Field: "body.timezone", Message: "unknown time zone; use an IANA name such as Europe/Paris or UTC"})
		} else if next, err = schedule.Next(sc.Cron, sc.Timezone, time.Now()); err != nil {
			bad = append(bad, platform.FieldError{Field: "body.cron", Message: err.Error()})
		}
		raw, _ := json.Marshal(map[string]any(sc.Payload))
		req := commands.DispatchRequest{Task: sc.Task, Payload: raw}
		if _, err := commands.Validate(&req); err != nil {
			var perr *platform.Error
			if !errors.As(err, &perr) {
				return err
			}
			bad = append(bad, perr.Fields...)
		}
		if len(bad) > 0 {
			return platform.Invalid("invalid schedule", bad...)
		}
		if agentChanged || taskChanged {
			a, _, err := res.Agents.Get(ctx, sc.AgentID, "command")
			if platform.ErrorCode(err) == platform.ENOTFOUND {
				return platform.Invalid("unknown agent", platform.FieldError{Field: "body.agent_id", Message: "no agent you can command has this id"})
			}
			if err != nil {
				return err
			}
			if a.OrgID != sc.OrgID {
				return platform.Invalid("unknown agent", platform.FieldError{Field: "body.agent_id", Message: "no agent you can command has this id"})
			}
			if !a.Allows(sc.Task) {
				return platform.Invalid("task not allowed", platform.FieldError{Field: "body.task", Message: "this agent's config does not allow " + sc.Task})
			}
		}
		if sc.Enabled {
			sc.NextRunAt = &next
		} else {
			sc.NextRunAt = nil
		}
		return nil
	}
	crud.Register(d.Registry, crud.Resource[schedule.Schedule, ScheduleInput]{
		Scope: ScheduleScope, Path: "/v1/schedules", Table: "schedules", Tag: "Schedules",
		Ops:         crud.AllOps,
		Description: "Schedules fire a command on a cron expression, in a time zone. Each fire time becomes exactly one command, however many schedulers run. Fire times missed while no scheduler ran are skipped, or run once (misfire_policy).",
		Sort:        []string{"name", "task"},
		Filters:     []crud.Filter{{Param: "agent_id", Column: "agent_id"}, {Param: "enabled", Column: "enabled"}, {Param: "task", Column: "task"}},
		BeforeCreate: func(ctx context.Context, tx *sqlx.Tx, in *ScheduleInput, sc *schedule.Schedule) error {
			sc.Enabled = true
			return configure(ctx, in, sc, true, true)
		},
		BeforeUpdate: func(ctx context.Context, tx *sqlx.Tx, in *ScheduleInput, old, sc *schedule.Schedule) error {
			if err := configure(ctx, in, sc, sc.AgentID != old.AgentID, sc.Task != old.Task); err != nil {
				return err
			}
			if sc.Enabled && old.Enabled && sc.Cron == old.Cron && sc.Timezone == old.Timezone && old.NextRunAt != nil {
				sc.NextRunAt = old.NextRunAt // unchanged timing keeps its next run
			}
			return nil
		},
	})
}
