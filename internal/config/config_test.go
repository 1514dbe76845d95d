package config_test

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/config"
)

func getenv(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestDefaultsWorkInDevelopment(t *testing.T) {
	t.Parallel()
	s, err := config.Load(getenv(map[string]string{"AGENTRY_CONFIG_DIR": t.TempDir()}))
	if err != nil {
		t.Fatalf("development defaults refused: %v", err)
	}
	if s.Env != config.Development || s.HTTPAddr != ":8080" || !strings.Contains(s.DatabaseURL, "127.0.0.1") {
		t.Fatalf("unexpected defaults: %v", s)
	}
}

func TestLayering(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := "http_addr: \":9000\"\nlog_level: debug\nworker_concurrency: 7\nallowed_origins:\n  - https://a.example\n  - https://b.example\n"
	if err := os.WriteFile(filepath.Join(dir, "development.yaml"), []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := config.Load(getenv(map[string]string{
		"AGENTRY_CONFIG_DIR":       dir,
		"AGENTRY_HTTP_ADDR":        ":9100", // env beats file
		"AGENTRY_SHUTDOWN_TIMEOUT": "3s",
	}))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, got, want string }{
		{"env over file", s.HTTPAddr, ":9100"},
		{"file over default", s.LogLevel, "debug"},
		{"file integer", fmt.Sprint(s.WorkerConcurrency), "7"},
		{"file list", strings.Join(s.AllowedOrigins, " "), "https://a.example https://b.example"},
		{"env duration", s.ShutdownTimeout.String(), (3 * time.Second).String()},
		{"default kept", s.RedisPrefix, "agentry"},
	}
	for _, tc := range tests {
		if tc.got != tc.want {
			t.Errorf("%s: want %q, got %q", tc.name, tc.want, tc.got)
		}
	}
}

func TestOneErrorListsEveryProblem(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "development.yaml"), []byte("colour: blue\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := config.Load(getenv(map[string]string{
		"AGENTRY_CONFIG_DIR":         dir,
		"AGENTRY_LOG_LEVEL":          "loud",
		"AGENTRY_WORKER_CONCURRENCY": "many",
		"AGENTRY_SHUTDOWN_TIMEOUT":   "soon",
		"AGENTRY_DEBUG":              "maybe",
		"AGENTRY_DATABASE_URL":       "not a url",
		"AGENTRY_SECRETS_KEY":        "short",
	}))
	var le *config.LoadError
	if !errors.As(err, &le) {
		t.Fatalf("want a LoadError, got %v", err)
	}
	for _, want := range []string{"colour: unknown setting", "AGENTRY_LOG_LEVEL", "AGENTRY_WORKER_CONCURRENCY", "AGENTRY_SHUTDOWN_TIMEOUT", "AGENTRY_DEBUG", "AGENTRY_DATABASE_URL", "AGENTRY_SECRETS_KEY"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
	if len(le.Problems) != 7 {
		t.Errorf("want 7 problems, got %d:\n%v", len(le.Problems), err)
	}
}

func TestProductionRefusesImplicitSecrets(t *testing.T) {
	t.Parallel()
	_, err := config.Load(getenv(map[string]string{"AGENTRY_ENV": "production", "AGENTRY_CONFIG_DIR": t.TempDir()}))
	if err == nil {
		t.Fatal("production started with development secrets")
	}
	for _, want := range []string{"AGENTRY_JWT_SECRET", "AGENTRY_SECRETS_KEY", "AGENTRY_DATABASE_URL", "AGENTRY_REDIS_URL"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
	s, err := config.Load(getenv(map[string]string{
		"AGENTRY_ENV":          "production",
		"AGENTRY_CONFIG_DIR":   t.TempDir(),
		"AGENTRY_JWT_SECRET":   strings.Repeat("k", 40),
		"AGENTRY_SECRETS_KEY":  "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=",
		"AGENTRY_DATABASE_URL": "postgres://app:pa55word@db:5432/agentry",
		"AGENTRY_REDIS_URL":    "redis://:redispass@redis:6379/0",
	}))
	if err != nil {
		t.Fatalf("explicit production settings refused: %v", err)
	}
	if s.Env != config.Production {
		t.Fatalf("env: %s", s.Env)
	}
}

func TestUnknownEnvironment(t *testing.T) {
	t.Parallel()
	if _, err := config.Load(getenv(map[string]string{"AGENTRY_ENV": "staging", "AGENTRY_CONFIG_DIR": t.TempDir()})); err == nil || !strings.Contains(err.Error(), "AGENTRY_ENV") {
		t.Fatalf("unknown environment accepted: %v", err)
	}
}

func TestSecretsAreRedacted(t *testing.T) {
	t.Parallel()
	s := config.Defaults(config.Development)
	s.JWTSecret = "super-secret-jwt-value-that-must-not-leak"
	s.AdminPassword = "admin-pass-must-not-leak"
	s.DatabaseURL = "postgres://app:db-pass-must-not-leak@db:5432/agentry"
	s.RedisURL = "redis://:redis-pass-must-not-leak@redis:6379/0"
	var logged strings.Builder
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("settings", "settings", s)
	for _, out := range []string{s.String(), fmt.Sprintf("%v", s), fmt.Sprintf("%+v", s), fmt.Sprintf("%#v", s), logged.String()} {
		for _, secret := range []string{"super-secret-jwt", "admin-pass", "db-pass", "redis-pass"} {
			if strings.Contains(out, secret) {
				t.Fatalf("printed settings reveal %q:\n%s", secret, out)
			}
		}
	}
	if !strings.Contains(s.String(), "db:5432") {
		t.Fatalf("redaction hid the database host too:\n%s", s)
	}
}
