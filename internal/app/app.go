// Package app holds the pieces the three binaries wire themselves from:
// the logger, the Postgres and Redis clients built from Settings, and an
// HTTP server that shuts down gracefully. Each cmd/*/main.go composes them;
// nothing here decides what a binary does.
package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/config"
	"github.com/agentry/agentry/internal/metrics"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/postgres"
)

// Version is the build's version, set with -ldflags "-X …/internal/app.Version=v1.2.3".
var Version = "dev"

// Logger returns the JSON logger of a binary, at the settings' level.
func Logger(w io.Writer, s config.Settings, binary string) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(s.LogLevel))
	if s.Debug {
		level = slog.LevelDebug
	}
	h := slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level})
	return slog.New(platform.ContextHandler(h)).With("binary", binary)
}

// Postgres opens the pool the settings describe.
func Postgres(ctx context.Context, s config.Settings) (*sqlx.DB, error) {
	return postgres.Open(ctx, s.DatabaseURL, postgres.PoolOptions{
		MaxOpenConns:    s.DBMaxOpenConns,
		MaxIdleConns:    s.DBMaxIdleConns,
		ConnMaxLifetime: s.DBConnMaxLifetime,
		ConnMaxIdleTime: s.DBConnMaxIdleTime,
	})
}

// RedisOptions parses the settings' Redis URL.
func RedisOptions(s config.Settings) (*redis.Options, error) {
	opts, err := redis.ParseURL(s.RedisURL)
	if err != nil {
		return nil, fmt.Errorf("redis: bad url: %w", err)
	}
	return opts, nil
}

// Redis connects to Redis and checks it answers.
func Redis(ctx context.Context, s config.Settings) (*redis.Client, error) {
	opts, err := RedisOptions(s)
	if err != nil {
		return nil, err
	}
	rdb := redis.NewClient(opts)
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rdb.Ping(pctx).Err(); err != nil {
		rdb.Close()
		return nil, fmt.Errorf("redis: cannot reach %s: %w", opts.Addr, err)
	}
	return rdb, nil
}

// Serve serves h on addr until ctx is done, then shuts down gracefully
// within timeout. Once listening it writes "<name> listening on
// http://host:port" to out (tests started with port 0 read the port there).
// beforeShutdown, if set, runs when ctx is done, before the listener closes
// (the WebSocket gateway tells its clients to go elsewhere).
func Serve(ctx context.Context, logger *slog.Logger, out io.Writer, name, addr string, h http.Handler, timeout time.Duration, beforeShutdown func(context.Context)) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("%s: listen on %s: %w", name, addr, err)
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	fmt.Fprintf(out, "%s listening on %s\n", name, URL(ln.Addr()))
	logger.Info("listening", "server", name, "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if beforeShutdown != nil {
		beforeShutdown(sctx)
	}
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
		return fmt.Errorf("%s: shutdown: %w", name, err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// URL returns http://host:port for a listener address, with a wildcard host
// shown as 127.0.0.1.
func URL(a net.Addr) string {
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return "http://" + a.String()
	}
	if host == "" || host == "::" || host == "0.0.0.0" {
		host = "127.0.0.1"
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return "http://" + host + ":" + port
}

// OpsHandler serves /healthz, /readyz and /metrics for the worker and the
// scheduler. ready reports whether the binary's dependencies answer.
func OpsHandler(reg *metrics.Registry, ready func(context.Context) error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"ok"}`+"\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		w.Header().Set("Content-Type", "application/json")
		if err := ready(ctx); err != nil {
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, `{"type":"about:blank","title":"Service Unavailable","status":503,"code":"unavailable","detail":%q}`+"\n", "not ready: "+err.Error())
			return
		}
		io.WriteString(w, `{"status":"ok"}`+"\n")
	})
	mux.Handle("GET /metrics", reg.Handler())
	return mux
}

// Ready checks the database and Redis answer.
func Ready(db *sqlx.DB, rdb redis.UniversalClient) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := db.PingContext(ctx); err != nil {
			return fmt.Errorf("postgres unreachable")
		}
		if err := rdb.Ping(ctx).Err(); err != nil {
			return fmt.Errorf("redis unreachable")
		}
		return nil
	}
}
