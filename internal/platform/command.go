package platform

import (
	"encoding/json"
	"time"
)

// Command statuses: queued → running → succeeded | failed | canceled, with
// retries going back to queued.
const (
	CommandQueued    = "queued"
	CommandRunning   = "running"
	CommandSucceeded = "succeeded"
	CommandFailed    = "failed"
	CommandCanceled  = "canceled"
)

// Command is a task dispatched to an agent (the seed's Agent.command).
type Command struct {
	Base
	AgentID           string           `db:"agent_id" json:"agent_id" format:"uuid"`
	Task              string           `db:"task" json:"task"`
	Payload           JSONValue        `db:"payload" json:"payload"`
	Status            string           `db:"status" json:"status" enum:"queued,running,succeeded,failed,canceled"`
	Priority          int              `db:"priority" json:"priority" doc:"Higher runs first among an agent's waiting commands."`
	TimeoutS          int              `db:"timeout_s" json:"timeout_s" doc:"Time limit of one attempt, in seconds."`
	MaxRetries        int              `db:"max_retries" json:"max_retries"`
	Attempt           int              `db:"attempt" json:"attempt" doc:"The current (or last) attempt, from 1."`
	Failures          int              `db:"failures" json:"failures" doc:"Attempts that failed since the command was queued (POST /v1/commands/{id}/retry starts again from 0, with its retries renewed)."`
	Progress          int              `db:"progress" json:"progress" minimum:"0" maximum:"100"`
	Message           string           `db:"message" json:"message"`
	Result            *json.RawMessage `db:"result" json:"result,omitempty"`
	Error             *string          `db:"error" json:"error,omitempty"`
	IdempotencyKey    *string          `db:"idempotency_key" json:"-"`
	RequestHash       *string          `db:"request_hash" json:"-"`
	ScheduleID        *string          `db:"schedule_id" json:"schedule_id,omitempty" format:"uuid" doc:"The schedule that fired the command."`
	FireTime          *time.Time       `db:"fire_time" json:"fire_time,omitempty"`
	AdmittedAt        *time.Time       `db:"admitted_at" json:"admitted_at,omitempty" doc:"When the command left the agent's backlog for the queue."`
	NotBefore         *time.Time       `db:"not_before" json:"not_before,omitempty" doc:"A retry waits until then."`
	WorkerID          *string          `db:"worker_id" json:"worker_id,omitempty"`
	LeaseUntil        *time.Time       `db:"lease_until" json:"-"`
	CancelRequestedAt *time.Time       `db:"cancel_requested_at" json:"cancel_requested_at,omitempty"`
	StartedAt         *time.Time       `db:"started_at" json:"started_at,omitempty" doc:"When its first attempt started (since the last retry by POST /v1/commands/{id}/retry)."`
	FinishedAt        *time.Time       `db:"finished_at" json:"finished_at,omitempty"`
}

// Terminal reports whether the command has ended.
func (c *Command) Terminal() bool {
	return c.Status == CommandSucceeded || c.Status == CommandFailed || c.Status == CommandCanceled
}

// CommandEvent is one entry of a command's history.
type CommandEvent struct {
	ID        int64            `db:"id" json:"id"`
	CommandID string           `db:"command_id" json:"command_id"`
	Type      string           `db:"type" json:"type" doc:"queued, running, progress, log, retrying, succeeded, failed, canceled, cancel_requested"`
	Status    string           `db:"status" json:"status"`
	Attempt   int              `db:"attempt" json:"attempt"`
	Progress  int              `db:"progress" json:"progress"`
	Message   string           `db:"message" json:"message"`
	Data      *json.RawMessage `db:"data" json:"data,omitempty"`
	CreatedAt time.Time        `db:"created_at" json:"created_at"`
}
