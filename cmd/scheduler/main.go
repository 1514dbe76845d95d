// Command scheduler fires cron schedules as commands and runs the
// reconciler that heals what Redis lost or a crash left behind. Any number
// of replicas may run; one leads at a time (a Redis lease with a fencing
// epoch), and each fire time becomes exactly one command whoever leads.
// It serves /healthz, /readyz and /metrics on the scheduler address.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/app"
	"github.com/agentry/agentry/internal/cache"
	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/config"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/notify"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/schedule"
	"github.com/agentry/agentry/tasks"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "scheduler:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 1 {
		return errors.New("usage: scheduler (no arguments; settings come from AGENTRY_* variables)")
	}
	s, err := config.Load(getenv)
	if err != nil {
		return err
	}
	tasks.SetDefaults(s.CommandTimeout, s.CommandMaxRetries)
	logger := app.Logger(stderr, s, "scheduler")
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

	reg := metrics.New("scheduler", app.Version)
	reg.RegisterDB(db.DB)
	schedMetrics := metrics.NewScheduler(reg)
	cmdMetrics := metrics.NewCommands(reg)
	queueMetrics := metrics.NewQueue(reg)
	queue := commands.NewQueue(asynq.NewClientFromRedisClient(rdb), s.RedisPrefix)
	bus := events.NewBus(rdb, s.RedisPrefix, s.EventStreamMaxLen)
	dispatcher := &commands.Dispatcher{
		Store:   &commands.Store{DB: db, Limits: commands.Limits{OrgMaxInFlight: s.OrgMaxInFlight, OrgMaxQueued: s.OrgMaxQueued}},
		Queue:   queue,
		Events:  bus,
		Logger:  logger,
		Metrics: cmdMetrics,
		// The API caches agents; their status changes here.
		AgentChanged: agentChanged(cache.NewVersioned(rdb, s.RedisPrefix, s.CacheTTL, 1, logger)),
	}
	notifications := &notify.Service{DB: db, Events: bus, Logger: logger}
	reconciler := &commands.Reconciler{
		Dispatcher: dispatcher,
		Redis:      rdb,
		Inspector:  asynq.NewInspectorFromRedisClient(rdb),
		Logger:     logger,
		Metrics:    schedMetrics,
		Interval:   s.ReconcileInterval,
		Retention:  s.CommandRetention,
		OnFinish:   notifications.CommandFinished,
	}
	identity := &postgres.IdentityStore{DB: db}
	firer := &schedule.Firer{DB: db, Dispatcher: dispatcher, Logger: logger, Metrics: schedMetrics, Tick: time.Second,
		// A fire time runs in its owner's name: only while they may
		// still command the agent, as their own dispatch would.
		MayCommand: func(ctx context.Context, userID string, agent platform.ResourceRef) (bool, error) {
			return access.UserMay(ctx, db, identity, userID, platform.AgentScope, "command", agent)
		}}
	leader := schedule.NewLeader(rdb, s.RedisPrefix, 10*time.Second, logger)
	leader.OnChange = func(leading bool, epoch int64) {
		if leading {
			schedMetrics.Leader.Set(1)
			return
		}
		schedMetrics.Leader.Set(0)
		queueMetrics.Clear()
	}
	campaign := make(chan struct{})
	go func() {
		defer close(campaign)
		leader.Run(ctx, func(ctx context.Context) {
			_ = reconciler.Start(ctx)
			_ = firer.Start(ctx)
			t := time.NewTicker(10 * time.Second)
			defer t.Stop()
			for {
				if stats, err := commands.Stats(ctx, rdb, dispatcher.Store, queue.Name()); err == nil {
					queueMetrics.Set(stats)
				}
				select {
				case <-ctx.Done():
					firer.Stop()
					reconciler.Stop()
					return
				case <-t.C:
				}
			}
		})
	}()
	err = app.Serve(ctx, logger, stdout, "scheduler", s.SchedulerAddr, app.OpsHandler(reg, app.Ready(db, rdb)), s.ShutdownTimeout, nil)
	<-campaign
	return err
}

// agentChanged makes the API's cached copy of an agent's status stale.
func agentChanged(rows *cache.Versioned) func(context.Context, string) {
	return func(ctx context.Context, agentID string) {
		_ = crud.StateChanged(ctx, rows, "Agent", agentID)
	}
}
