// Command worker runs agent commands: an Asynq server executing the task
// handlers registered in tasks/, reporting progress to Postgres and Redis.
// It serves /healthz, /readyz and /metrics on the worker address, and on
// SIGTERM it drains: it takes no new work, lets running commands finish
// within the shutdown timeout and hands the rest back to the queue.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/internal/app"
	"github.com/agentry/agentry/internal/cache"
	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/config"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/egress"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/notify"
	"github.com/agentry/agentry/internal/secrets"
	"github.com/agentry/agentry/internal/sqlq"
	"github.com/agentry/agentry/tasks"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 1 {
		return errors.New("usage: worker (no arguments; settings come from AGENTRY_* variables)")
	}
	s, err := config.Load(getenv)
	if err != nil {
		return err
	}
	tasks.SetDefaults(s.CommandTimeout, s.CommandMaxRetries)
	logger := app.Logger(stderr, s, "worker")
	db, err := app.Postgres(ctx, s)
	if err != nil {
		return err
	}
	defer db.Close()
	rdb, err := app.Redis(ctx, s)
	if err != nil {
		return err
	}
	defer rdb.Close()
	key, err := s.SecretsKeyBytes()
	if err != nil {
		return err
	}
	sealer, err := secrets.New(key)
	if err != nil {
		return err
	}
	guard, err := egress.New(s.EgressAllowCIDRs, s.EgressMaxBytes, s.EgressTimeout)
	if err != nil {
		return err
	}

	reg := metrics.New("worker", app.Version)
	reg.RegisterDB(db.DB)
	cmdMetrics := metrics.NewCommands(reg)
	cmdMetrics.Init(taskTypes())
	commands.SetTransient(sqlq.IsUnavailable)
	queue := commands.NewQueue(asynq.NewClientFromRedisClient(rdb), s.RedisPrefix)
	bus := events.NewBus(rdb, s.RedisPrefix, s.EventStreamMaxLen)
	// A worker's events and notifications are on nobody's way (a command's
	// handler does not wait for them): they wait a moment for others to go
	// together, which spares Redis and PostgreSQL round trips under load.
	bus.Linger = 2 * time.Millisecond
	// A person reads notifications: 20 ms more is nothing to them, and
	// under load one statement stores dozens.
	notifications := &notify.Service{DB: db, Events: bus, Logger: logger, Linger: 20 * time.Millisecond}
	dispatcher := &commands.Dispatcher{
		Store:  &commands.Store{DB: db, Limits: commands.Limits{OrgMaxInFlight: s.OrgMaxInFlight, OrgMaxQueued: s.OrgMaxQueued}},
		Queue:  queue,
		Events: bus,
		Logger: logger,
		// The API caches agents; their status changes here.
		AgentChanged: agentChanged(cache.NewVersioned(rdb, s.RedisPrefix, s.CacheTTL, 1, logger)),
		Metrics:      cmdMetrics,
		// The admissions after outcomes: on no request's way.
		AdmitLinger: 2 * time.Millisecond,
	}
	runner := &commands.Runner{
		Dispatcher: dispatcher,
		Sealer:     sealer,
		Egress:     guard,
		Logger:     logger,
		Metrics:    cmdMetrics,
		WorkerID:   workerID(),
		Heartbeat:  s.WorkerHeartbeat,
		// An outcome waits up to 3 ms to be recorded with others: a command
		// ends that much later, for far fewer statements under load.
		RecordLinger: 3 * time.Millisecond,
		OnFinish:     notifications.CommandFinished,
	}
	if err := runner.Start(ctx); err != nil {
		return err
	}
	defer runner.Stop()

	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency:       s.WorkerConcurrency,
		Queues:            map[string]int{queue.Name(): 1},
		TaskCheckInterval: s.QueuePollInterval,
		ShutdownTimeout:   s.ShutdownTimeout,
		Logger:            app.AsynqLogger{L: logger},
		LogLevel:          asynq.WarnLevel,
		// Only an unreachable Postgres makes a command task fail in Asynq:
		// retry it soon. Commands' own retries are the pipeline's.
		RetryDelayFunc: func(n int, _ error, _ *asynq.Task) time.Duration {
			return min(time.Duration(n)*time.Second, 10*time.Second)
		},
	})
	mux := asynq.NewServeMux()
	mux.HandleFunc(commands.TaskType, runner.ProcessTask)
	if err := srv.Start(mux); err != nil {
		return fmt.Errorf("asynq: %w", err)
	}
	logger.Info("started", "worker_id", runner.WorkerID, "concurrency", s.WorkerConcurrency, "queue", queue.Name())
	return app.Serve(ctx, logger, stdout, "worker", s.WorkerAddr, app.OpsHandler(reg, app.Ready(db, rdb)), s.ShutdownTimeout+5*time.Second,
		func(context.Context) {
			logger.Info("draining: no new commands; waiting for running ones", "timeout", s.ShutdownTimeout.String())
			srv.Shutdown()
			runner.Stop()
		})
}

// workerID names this process in the commands it runs.
func workerID() string {
	host, _ := os.Hostname()
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

// agentChanged makes the API's cached copy of an agent's status stale.
func agentChanged(rows *cache.Versioned) func(context.Context, string) {
	return func(ctx context.Context, agentID string) {
		_ = crud.StateChanged(ctx, rows, "Agent", agentID)
	}
}

// taskTypes lists the registered tasks.
func taskTypes() []string {
	var out []string
	for _, d := range tasks.All() {
		out = append(out, d.Type)
	}
	return out
}
