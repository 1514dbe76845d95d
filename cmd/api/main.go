// Command api serves agentry's HTTP API and WebSocket gateway, and runs the
// database migrations.
//
//	api                 serve the API (same as `api serve`)
//	api migrate up      apply pending migrations (creating the database in development)
//	api migrate down    roll back the latest migration
//	api migrate status  list migrations and whether each is applied
//	api seed-admin      create the first superadmin (AGENTRY_ADMIN_EMAIL, AGENTRY_ADMIN_PASSWORD)
//	api settings        print the effective settings, secrets redacted
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/jmoiron/sqlx"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/cache"
	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/redisx"
	"github.com/agentry/agentry/internal/secrets"
	"github.com/agentry/agentry/internal/templates"

	"github.com/agentry/agentry/internal/app"
	"github.com/agentry/agentry/internal/config"
	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/notify"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/realtime"
	"github.com/agentry/agentry/internal/sqlq"
	"github.com/agentry/agentry/tasks"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "api:", err)
		os.Exit(1)
	}
}

const usage = `usage: api [serve | migrate up|down|status | seed-admin | settings]`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	settings, err := config.Load(getenv)
	if err != nil {
		return err
	}
	tasks.SetDefaults(settings.CommandTimeout, settings.CommandMaxRetries)
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
	case "seed-admin":
		return seedAdmin(ctx, settings, stdout, logger)
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

// services are what the API is built from.
type services struct {
	db       *sqlx.DB
	rdb      *redis.Client
	bus      *cache.Bus
	identity *postgres.IdentityStore
	audit    *access.Audit
	authn    *access.Authenticator
	accounts *access.Service
}

func wire(ctx context.Context, s config.Settings, logger *slog.Logger) (*services, func(), error) {
	db, err := app.Postgres(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	rdb, err := app.Redis(ctx, s)
	if err != nil {
		db.Close()
		return nil, nil, err
	}
	bus := cache.NewBus(rdb, s.RedisPrefix, logger)
	identity := &postgres.IdentityStore{DB: db}
	audit := &access.Audit{Store: identity, Logger: logger}
	tokens := access.NewTokens(s.JWTSecret, s.JWTIssuer, s.JWTAudience, s.AccessTokenTTL)
	authn := access.NewAuthenticator(tokens, identity, 10*time.Second)
	bus.Handle(authn.Invalidate)
	accounts := &access.Service{
		Accounts:    identity,
		Passwords:   access.NewPasswords(access.DefaultPasswordParams),
		Tokens:      tokens,
		Throttle:    redisx.NewThrottle(rdb, s.RedisPrefix),
		Audit:       audit,
		RefreshTTL:  s.RefreshTokenTTL,
		MaxFailures: s.LoginMaxFailures,
		Window:      s.LoginFailureWindow,
		Invalidate:  bus.Publish,
	}
	closeAll := func() {
		bus.Stop()
		rdb.Close()
		db.Close()
	}
	return &services{db: db, rdb: rdb, bus: bus, identity: identity, audit: audit, authn: authn, accounts: accounts}, closeAll, nil
}

// adminFile keeps a generated development admin password, so that `make
// run` can show it again. Never written outside development.
const adminFile = ".agentry-admin"

func seedAdmin(ctx context.Context, s config.Settings, stdout io.Writer, logger *slog.Logger) error {
	svc, closeAll, err := wire(ctx, s, logger)
	if err != nil {
		return err
	}
	defer closeAll()
	password := s.AdminPassword
	generated := false
	if password == "" {
		if s.Env == config.Production {
			return errors.New("set AGENTRY_ADMIN_PASSWORD to seed the first superadmin in production")
		}
		var b [12]byte
		_, _ = rand.Read(b[:])
		password, generated = base64.RawURLEncoding.EncodeToString(b[:]), true
	}
	u, created, err := svc.accounts.SeedAdmin(ctx, s.AdminEmail, password)
	if err != nil {
		return err
	}
	switch {
	case created && generated:
		_ = os.WriteFile(adminFile, []byte(s.AdminEmail+" "+password+"\n"), 0o600)
		fmt.Fprintf(stdout, "created superadmin %s with password %s (change it with POST /v1/users/me/password)\n", u.Email, password)
	case created:
		fmt.Fprintf(stdout, "created superadmin %s with the password of AGENTRY_ADMIN_PASSWORD\n", u.Email)
	default:
		if data, err := os.ReadFile(adminFile); err == nil && s.Env == config.Development {
			if email, pw, ok := strings.Cut(strings.TrimSpace(string(data)), " "); ok {
				fmt.Fprintf(stdout, "superadmin: %s, password %s (generated at first run; from %s)\n", email, pw, adminFile)
				return nil
			}
		}
		fmt.Fprintln(stdout, "a superadmin already exists; nothing to do")
	}
	return nil
}

func serve(ctx context.Context, s config.Settings, stdout io.Writer, logger *slog.Logger) error {
	svc, closeAll, err := wire(ctx, s, logger)
	if err != nil {
		return err
	}
	defer closeAll()
	db := svc.db
	m, err := postgres.NewMigrator(db.DB, false)
	if err != nil {
		return err
	}
	if pending, err := m.Pending(ctx); err != nil {
		return err
	} else if pending {
		return errors.New("the database schema is behind this binary; run `api migrate up` first")
	}
	if err := svc.bus.Start(ctx); err != nil {
		return fmt.Errorf("cache bus: %w", err)
	}

	reg := metrics.New("api", app.Version)
	reg.RegisterDB(db.DB)
	accessMetrics := metrics.NewAccess(reg)
	httpapi.SetUnavailableClassifier(sqlq.IsUnavailable)
	srv := httpapi.New(httpapi.Options{
		Logger:         logger,
		Metrics:        reg,
		Version:        app.Version,
		MaxBodyBytes:   s.MaxBodyBytes,
		TrustedProxies: s.TrustedProxies,
		Authenticator:  svc.authn,
		OnAuthFailure:  accessMetrics.AuthFailure,
		PublicURL:      s.PublicURL,
		Ready: []httpapi.ReadyCheck{
			{Name: "postgres", Check: db.PingContext},
			{Name: "redis", Check: func(ctx context.Context) error { return svc.rdb.Ping(ctx).Err() }},
		},
	})
	guard := &access.Guard{DB: db, Audit: svc.audit, OnDeny: accessMetrics.Denied}
	svc.accounts.OnFailure = accessMetrics.AuthFailure
	rows := cache.NewVersioned(svc.rdb, s.RedisPrefix, s.CacheTTL, 100_000, logger)
	acl := &access.ACL{DB: db, Audit: svc.audit, OnDeny: accessMetrics.Denied, Changed: func(ctx context.Context, orgID, typ, resourceID string) {
		if resourceID != "" {
			_ = rows.Bump(ctx, crud.ResourceDep(typ, resourceID))
		} else {
			_ = rows.Bump(ctx, crud.TypeDep(orgID, typ))
		}
		svc.bus.Publish(ctx, "acl:"+orgID)
	}}
	registry := &crud.Registry{API: srv.API, DB: db, Guard: guard, ACL: acl, MaxBodyBytes: s.MaxBodyBytes}
	if s.Cache {
		registry.Cache = rows
	}
	// A deleted agent or command takes its topic with it: the WebSocket
	// subscriptions to it end now, not at the next periodic recheck.
	registry.Observe(func(ctx context.Context, c crud.Change) {
		if c.Op == crud.OpDelete && c.Ref.OrgID != "" && (c.Scope.Type == platform.AgentScope.Type || c.Scope.Type == httpapi.CommandScope.Type) {
			svc.bus.Publish(ctx, "acl:"+c.Ref.OrgID)
		}
	})
	bus := events.NewBus(svc.rdb, s.RedisPrefix, s.EventStreamMaxLen)
	gateway := &realtime.Gateway{
		Events:       bus,
		Redis:        svc.rdb,
		Logger:       logger,
		Metrics:      metrics.NewRealtime(reg),
		SendQueue:    s.WebSocketSendQueue,
		PingInterval: s.WebSocketPingInterval,
	}
	if err := gateway.Start(ctx); err != nil {
		return err
	}
	svc.bus.Handle(gateway.Invalidate)
	key, err := s.SecretsKeyBytes()
	if err != nil {
		return err
	}
	sealer, err := secrets.New(key)
	if err != nil {
		return err
	}
	cmdMetrics := metrics.NewCommands(reg)
	cmdMetrics.Init(taskTypes())
	dispatcher := &commands.Dispatcher{
		Store:   &commands.Store{DB: db, Limits: commands.Limits{OrgMaxInFlight: s.OrgMaxInFlight, OrgMaxQueued: s.OrgMaxQueued}},
		Queue:   commands.NewQueue(asynq.NewClientFromRedisClient(svc.rdb), s.RedisPrefix),
		Events:  bus,
		Logger:  logger,
		Metrics: cmdMetrics,
		// A cancel changes the agent's status.
		AgentChanged: func(ctx context.Context, agentID string) { _ = crud.StateChanged(ctx, rows, "Agent", agentID) },
	}
	srv.Routes(httpapi.Deps{
		Dispatcher: dispatcher,
		Kinds:      &templates.Kinds{},
		Sealer:     sealer,
		DB:         db,
		Registry:   registry,
		Accounts:   svc.accounts,
		Identity:   svc.identity,
		Keys:       svc.identity,
		Guard:      guard,
		ACL:        acl,
		Audit:      svc.audit,
		Admin:      &httpapi.Admin{Inspector: asynq.NewInspectorFromRedisClient(svc.rdb), Queue: commands.QueueName(s.RedisPrefix)},
		Realtime: &httpapi.Realtime{
			Gateway:        gateway,
			Tickets:        realtime.NewTickets(svc.rdb, s.RedisPrefix, 30*time.Second),
			Authenticator:  svc.authn,
			AllowedOrigins: s.AllowedOrigins,
			Notify:         &notify.Service{DB: db, Events: bus, Logger: logger},
		},
	})
	logger.Info("starting", "settings", s)
	return app.Serve(ctx, logger, stdout, "api", s.HTTPAddr, srv, s.ShutdownTimeout, gateway.Stop)
}

// taskTypes lists the registered tasks.
func taskTypes() []string {
	var out []string
	for _, d := range tasks.All() {
		out = append(out, d.Type)
	}
	return out
}
