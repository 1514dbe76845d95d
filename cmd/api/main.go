// Command api serves agentry's HTTP API and WebSocket gateway, and runs the
// database migrations.
//
//	api                 serve the API (same as `api serve`)
//	api migrate up      apply pending migrations (creating the database in development)
//	api migrate down    roll back the latest migration
//	api migrate status  list migrations and whether each is applied
//	api settings        print the effective settings, secrets redacted
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/agentry/agentry/internal/app"
	"github.com/agentry/agentry/internal/config"
	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/sqlq"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "api:", err)
		os.Exit(1)
	}
}

const usage = `usage: api [serve | migrate up|down|status | settings]`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	settings, err := config.Load(getenv)
	if err != nil {
		return err
	}
	logger := app.Logger(stderr, settings, "api")
	cmd := ""
	if len(args) > 1 {
		cmd = args[1]
	}
	switch cmd {
	case "", "serve":
		return serve(ctx, settings, stdout, logger)
	case "migrate":
		if len(args) != 3 {
			return errors.New(usage)
		}
		return migrate(ctx, settings, args[2], stdout)
	case "settings":
		_, err := io.WriteString(stdout, settings.String())
		return err
	default:
		return errors.New(usage)
	}
}

func migrate(ctx context.Context, s config.Settings, direction string, stdout io.Writer) error {
	if direction == "up" && s.Env == config.Development {
		created, err := postgres.EnsureDatabase(ctx, s.DatabaseURL)
		if err != nil {
			return err
		}
		if created {
			fmt.Fprintln(stdout, "created database", postgres.RedactDSN(s.DatabaseURL))
		}
	}
	db, err := app.Postgres(ctx, s)
	if err != nil {
		return err
	}
	defer db.Close()
	m, err := postgres.NewMigrator(db.DB, true)
	if err != nil {
		return err
	}
	switch direction {
	case "up":
		return m.Up(ctx, stdout)
	case "down":
		return m.Down(ctx, stdout)
	case "status":
		return m.Status(ctx, stdout)
	default:
		return errors.New(usage)
	}
}

func serve(ctx context.Context, s config.Settings, stdout io.Writer, logger *slog.Logger) error {
	db, err := app.Postgres(ctx, s)
	if err != nil {
		return err
	}
	defer db.Close()
	m, err := postgres.NewMigrator(db.DB, false)
	if err != nil {
		return err
	}
	if pending, err := m.Pending(ctx); err != nil {
		return err
	} else if pending {
		return errors.New("the database schema is behind this binary; run `api migrate up` first")
	}
	rdb, err := app.Redis(ctx, s)
	if err != nil {
		return err
	}
	defer rdb.Close()

	reg := metrics.New("api", app.Version)
	reg.RegisterDB(db.DB)
	httpapi.SetUnavailableClassifier(sqlq.IsUnavailable)
	srv := httpapi.New(httpapi.Options{
		Logger:         logger,
		Metrics:        reg,
		Version:        app.Version,
		MaxBodyBytes:   s.MaxBodyBytes,
		TrustedProxies: s.TrustedProxies,
		Ready: []httpapi.ReadyCheck{
			{Name: "postgres", Check: db.PingContext},
			{Name: "redis", Check: func(ctx context.Context) error { return rdb.Ping(ctx).Err() }},
		},
	})
	srv.Routes(httpapi.Deps{})
	logger.Info("starting", "settings", s)
	return app.Serve(ctx, logger, stdout, "api", s.HTTPAddr, srv, s.ShutdownTimeout, nil)
}
