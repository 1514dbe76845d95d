// Command scheduler fires cron schedules as commands and runs the reconciler that
// heals what Redis lost. Any number of replicas may run; one leads at a time.
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

	"github.com/agentry/agentry/internal/app"
	"github.com/agentry/agentry/internal/config"
	"github.com/agentry/agentry/internal/metrics"
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
	return app.Serve(ctx, logger, stdout, "scheduler", s.SchedulerAddr, app.OpsHandler(reg, app.Ready(db, rdb)), s.ShutdownTimeout, nil)
}
