package httpapi

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/internal/platform"
)

// Admin is what the superadmins' read-only queue views need: the Asynq
// inspector and the name of the commands queue. (asynqmon, Asynq's own web
// UI, builds against Asynq 0.26 but has no authentication of its own, shows
// every queue of the Redis and the commands' payloads, and is unmaintained;
// these views give operators what they need from it, behind the API's own
// authentication, limited to this installation's queue, without payloads.)
type Admin struct {
	Inspector *asynq.Inspector
	Queue     string
}

type queueView struct {
	Queue          string  `json:"queue"`
	Paused         bool    `json:"paused"`
	Size           int     `json:"size" doc:"Tasks in the queue in all states but completed."`
	Pending        int     `json:"pending"`
	Active         int     `json:"active"`
	Scheduled      int     `json:"scheduled" doc:"Retries waiting for their backoff."`
	Retry          int     `json:"retry"`
	Archived       int     `json:"archived"`
	LatencySeconds float64 `json:"latency_seconds" doc:"Age of the oldest pending task."`
	ProcessedToday int     `json:"processed_today"`
	FailedToday    int     `json:"failed_today"`
	MemoryBytes    int64   `json:"memory_bytes" doc:"Redis memory the queue uses (sampled)."`
}

type backlogView struct {
	OrgID    string `json:"org_id" db:"org_id"`
	Waiting  int    `json:"waiting" db:"waiting" doc:"Commands held in Postgres by fairness limits."`
	Admitted int    `json:"admitted" db:"admitted" doc:"Commands handed to the queue, not yet started."`
	Running  int    `json:"running" db:"running"`
}

type queuesOutput struct {
	Body struct {
		Queues  []queueView   `json:"queues" nullable:"false"`
		Backlog []backlogView `json:"backlog" nullable:"false" doc:"Per organization, the commands waiting, admitted and running."`
	}
}

type taskView struct {
	ID            string    `json:"id" doc:"<command id>:<attempt>"`
	Type          string    `json:"type"`
	State         string    `json:"state"`
	Retried       int       `json:"retried"`
	LastError     string    `json:"last_error,omitempty"`
	NextProcessAt time.Time `json:"next_process_at,omitempty"`
}

type tasksListInput struct {
	State    string `query:"state" enum:"pending,active,scheduled,retry,archived" default:"pending"`
	Page     int    `query:"page" minimum:"1" maximum:"100000" default:"1"`
	PageSize int    `query:"page_size" minimum:"1" maximum:"100" default:"20"`
}

type tasksListOutput struct {
	Body struct {
		Items []taskView `json:"items" nullable:"false"`
	}
}

type workerView struct {
	ID          string         `json:"id"`
	Host        string         `json:"host"`
	PID         int            `json:"pid"`
	Concurrency int            `json:"concurrency"`
	Queues      map[string]int `json:"queues"`
	Started     time.Time      `json:"started"`
	Status      string         `json:"status"`
	Active      int            `json:"active" doc:"Tasks it is running now."`
}

type workersOutput struct {
	Body struct {
		Items []workerView `json:"items" nullable:"false"`
	}
}

func (s *Server) adminRoutes(d Deps) {
	a := d.Admin
	huma.Register(s.API, s.op(http.MethodGet, "/v1/admin/queues", "admin-queues", "Operations", "Queues (superadmin)",
		"Read-only view of the command queue (sizes by state, latency, today's throughput) and of each organization's backlog in Postgres. Superadmins only.",
		http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, _ *struct{}) (*queuesOutput, error) {
			if err := requireSuperadmin(ctx, d.Audit, "Queue.read"); err != nil {
				return nil, err
			}
			out := &queuesOutput{}
			info, err := a.Inspector.GetQueueInfo(a.Queue)
			if err == nil {
				out.Body.Queues = []queueView{{Queue: info.Queue, Paused: info.Paused, Size: info.Size, Pending: info.Pending, Active: info.Active,
					Scheduled: info.Scheduled, Retry: info.Retry, Archived: info.Archived, LatencySeconds: info.Latency.Seconds(),
					ProcessedToday: info.Processed, FailedToday: info.Failed, MemoryBytes: info.MemoryUsage}}
			} else {
				out.Body.Queues = []queueView{{Queue: a.Queue}} // not created yet: nothing was ever queued
			}
			out.Body.Backlog = []backlogView{}
			// Counts each organization's unfinished commands by stage.
			err = d.DB.SelectContext(ctx, &out.Body.Backlog, `SELECT org_id,
					count(*) FILTER (WHERE status = 'queued' AND admitted_at IS NULL) AS waiting,
					count(*) FILTER (WHERE status = 'queued' AND admitted_at IS NOT NULL) AS admitted,
					count(*) FILTER (WHERE status = 'running') AS running
				FROM commands WHERE status IN ('queued', 'running') GROUP BY org_id ORDER BY count(*) DESC LIMIT 100`)
			return out, err
		})
	huma.Register(s.API, s.op(http.MethodGet, "/v1/admin/queues/tasks", "admin-queue-tasks", "Operations", "Queue tasks (superadmin)",
		"Read-only list of the command queue's tasks in one state. A task id is the command id and the attempt it may run. Superadmins only.",
		http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *tasksListInput) (*tasksListOutput, error) {
			if err := requireSuperadmin(ctx, d.Audit, "Queue.read"); err != nil {
				return nil, err
			}
			opts := []asynq.ListOption{asynq.PageSize(in.PageSize), asynq.Page(in.Page)}
			var tasks []*asynq.TaskInfo
			var err error
			switch in.State {
			case "active":
				tasks, err = a.Inspector.ListActiveTasks(a.Queue, opts...)
			case "scheduled":
				tasks, err = a.Inspector.ListScheduledTasks(a.Queue, opts...)
			case "retry":
				tasks, err = a.Inspector.ListRetryTasks(a.Queue, opts...)
			case "archived":
				tasks, err = a.Inspector.ListArchivedTasks(a.Queue, opts...)
			default:
				tasks, err = a.Inspector.ListPendingTasks(a.Queue, opts...)
			}
			out := &tasksListOutput{}
			out.Body.Items = []taskView{}
			if err != nil {
				return out, nil // an empty or absent queue
			}
			for _, t := range tasks {
				out.Body.Items = append(out.Body.Items, taskView{ID: t.ID, Type: t.Type, State: t.State.String(), Retried: t.Retried, LastError: t.LastErr, NextProcessAt: t.NextProcessAt})
			}
			return out, nil
		})
	huma.Register(s.API, s.op(http.MethodGet, "/v1/admin/workers", "admin-workers", "Operations", "Workers (superadmin)",
		"Read-only list of the worker processes connected to the queue, with what each runs. Superadmins only.",
		http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, _ *struct{}) (*workersOutput, error) {
			if err := requireSuperadmin(ctx, d.Audit, "Queue.read"); err != nil {
				return nil, err
			}
			servers, err := a.Inspector.Servers()
			if err != nil {
				return nil, platform.Errorf(platform.EUNAVAILABLE, "the queue is unavailable; retry")
			}
			out := &workersOutput{}
			out.Body.Items = []workerView{}
			for _, srv := range servers {
				out.Body.Items = append(out.Body.Items, workerView{ID: srv.ID, Host: srv.Host, PID: srv.PID, Concurrency: srv.Concurrency,
					Queues: srv.Queues, Started: srv.Started, Status: srv.Status, Active: len(srv.ActiveWorkers)})
			}
			return out, nil
		})
}
