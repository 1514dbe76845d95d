// Package config loads agentry's Settings: built-in defaults, then the
// optional file config/{env}.yaml, then AGENTRY_* environment variables, each
// layer overriding the one before. It is the only package that reads the
// environment. Load validates everything at once and reports every problem in
// one error; secrets never appear in a printed Settings.
package config

import (
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Environments agentry knows. Production refuses insecure defaults.
const (
	Development = "development"
	Test        = "test"
	Production  = "production"
)

// Settings is every knob of the three binaries. The `setting` tag is the
// setting's name: the key in config/{env}.yaml and, upper-cased behind
// AGENTRY_, its environment variable. Fields tagged `secret` are redacted
// whenever Settings are printed or logged.
type Settings struct {
	Env      string `setting:"env"`
	Debug    bool   `setting:"debug"`
	LogLevel string `setting:"log_level"` // debug, info, warn or error

	// HTTP listeners: the API, and the metrics/health endpoints of the worker
	// and the scheduler.
	HTTPAddr        string        `setting:"http_addr"`
	WorkerAddr      string        `setting:"worker_addr"`
	SchedulerAddr   string        `setting:"scheduler_addr"`
	PublicURL       string        `setting:"public_url"`
	MaxBodyBytes    int64         `setting:"max_body_bytes"`
	ShutdownTimeout time.Duration `setting:"shutdown_timeout"`
	AllowedOrigins  []string      `setting:"allowed_origins"`
	// TrustedProxies lists the CIDRs whose X-Forwarded-For is believed when
	// deciding a client's address (login throttling, audit).
	TrustedProxies []string `setting:"trusted_proxies"`

	DatabaseURL       string        `setting:"database_url" secret:"url"`
	DBMaxOpenConns    int           `setting:"db_max_open_conns"`
	DBMaxIdleConns    int           `setting:"db_max_idle_conns"`
	DBConnMaxLifetime time.Duration `setting:"db_conn_max_lifetime"`
	DBConnMaxIdleTime time.Duration `setting:"db_conn_max_idle_time"`

	RedisURL string `setting:"redis_url" secret:"url"`
	// RedisPrefix namespaces every Redis key and queue name, so several
	// installations (or test runs) can share one Redis.
	RedisPrefix string `setting:"redis_prefix"`

	JWTSecret       string        `setting:"jwt_secret" secret:"true"`
	JWTIssuer       string        `setting:"jwt_issuer"`
	JWTAudience     string        `setting:"jwt_audience"`
	AccessTokenTTL  time.Duration `setting:"access_token_ttl"`
	RefreshTokenTTL time.Duration `setting:"refresh_token_ttl"`
	// SecretsKey encrypts environment secrets at rest: 32 bytes, base64.
	SecretsKey string `setting:"secrets_key" secret:"true"`

	// The first platform administrator, created by `api seed-admin`.
	AdminEmail    string `setting:"admin_email"`
	AdminPassword string `setting:"admin_password" secret:"true"`

	// Queue and worker settings.
	WorkerConcurrency     int           `setting:"worker_concurrency"`
	QueuePollInterval     time.Duration `setting:"queue_poll_interval"`
	OrgMaxInFlight        int           `setting:"org_max_in_flight"`
	OrgMaxQueued          int           `setting:"org_max_queued"`
	CommandTimeout        time.Duration `setting:"command_timeout"`
	CommandMaxRetries     int           `setting:"command_max_retries"`
	ReconcileInterval     time.Duration `setting:"reconcile_interval"`
	WorkerHeartbeat       time.Duration `setting:"worker_heartbeat"`
	EventStreamMaxLen     int64         `setting:"event_stream_max_len"`
	EgressAllowCIDRs      []string      `setting:"egress_allow_cidrs"`
	EgressMaxBytes        int64         `setting:"egress_max_bytes"`
	EgressTimeout         time.Duration `setting:"egress_timeout"`
	CacheTTL              time.Duration `setting:"cache_ttl"`
	Cache                 bool          `setting:"cache"`
	CommandRetention      time.Duration `setting:"command_retention"`
	LoginMaxFailures      int           `setting:"login_max_failures"`
	LoginFailureWindow    time.Duration `setting:"login_failure_window"`
	WebSocketSendQueue    int           `setting:"websocket_send_queue"`
	WebSocketPingInterval time.Duration `setting:"websocket_ping_interval"`
}

// Development secrets: fine on a laptop, refused in production.
const (
	devJWTSecret  = "development-only-jwt-secret-not-for-production"
	devSecretsKey = "ZGV2ZWxvcG1lbnQtb25seS1zZWNyZXRzLWtleS0zMmI=" // base64 of 32 bytes
)

// Defaults returns the built-in settings for env: working values for a
// laptop with PostgreSQL and Redis on localhost.
func Defaults(env string) Settings {
	return Settings{
		Env:                   env,
		LogLevel:              "info",
		HTTPAddr:              ":8080",
		WorkerAddr:            ":9091",
		SchedulerAddr:         ":9092",
		PublicURL:             "http://localhost:8080",
		MaxBodyBytes:          1 << 20,
		ShutdownTimeout:       25 * time.Second,
		AllowedOrigins:        []string{"http://localhost:8080", "http://127.0.0.1:8080"},
		DatabaseURL:           "postgres://postgres@127.0.0.1:5432/agentry?sslmode=disable",
		DBMaxOpenConns:        25,
		DBMaxIdleConns:        25,
		DBConnMaxLifetime:     30 * time.Minute,
		DBConnMaxIdleTime:     5 * time.Minute,
		RedisURL:              "redis://127.0.0.1:6379/0",
		RedisPrefix:           "agentry",
		JWTSecret:             devJWTSecret,
		JWTIssuer:             "agentry",
		JWTAudience:           "agentry-api",
		AccessTokenTTL:        15 * time.Minute,
		RefreshTokenTTL:       30 * 24 * time.Hour,
		SecretsKey:            devSecretsKey,
		AdminEmail:            "admin@agentry.local",
		WorkerConcurrency:     20,
		QueuePollInterval:     5 * time.Millisecond,
		OrgMaxInFlight:        100,
		OrgMaxQueued:          20,
		CommandTimeout:        5 * time.Minute,
		CommandMaxRetries:     3,
		ReconcileInterval:     5 * time.Second,
		WorkerHeartbeat:       5 * time.Second,
		EventStreamMaxLen:     1000,
		EgressMaxBytes:        5 << 20,
		EgressTimeout:         15 * time.Second,
		CacheTTL:              5 * time.Minute,
		Cache:                 true,
		CommandRetention:      30 * 24 * time.Hour,
		LoginMaxFailures:      5,
		LoginFailureWindow:    15 * time.Minute,
		WebSocketSendQueue:    256,
		WebSocketPingInterval: 20 * time.Second,
	}
}

// Load builds Settings from defaults, config/{env}.yaml (if present; the
// directory can be moved with AGENTRY_CONFIG_DIR) and AGENTRY_* variables read
// through getenv. AGENTRY_ENV picks the environment (default development).
// The error, if any, lists every bad or missing setting.
func Load(getenv func(string) string) (Settings, error) {
	env := getenv("AGENTRY_ENV")
	if env == "" {
		env = Development
	}
	s := Defaults(env)
	var problems []string
	if env != Development && env != Test && env != Production {
		problems = append(problems, fmt.Sprintf("AGENTRY_ENV: %q is not one of development, test, production", env))
	}
	explicit := map[string]bool{}

	dir := getenv("AGENTRY_CONFIG_DIR")
	if dir == "" {
		dir = "config"
	}
	path := filepath.Join(dir, env+".yaml")
	if data, err := os.ReadFile(path); err == nil {
		problems = append(problems, s.applyFile(path, data, explicit)...)
	} else if !errors.Is(err, os.ErrNotExist) {
		problems = append(problems, fmt.Sprintf("%s: %v", path, err))
	}
	problems = append(problems, s.applyEnv(getenv, explicit)...)
	problems = append(problems, s.validate(explicit)...)
	if len(problems) > 0 {
		sort.Strings(problems)
		return s, &LoadError{Problems: problems}
	}
	return s, nil
}

// LoadError lists every problem Load found.
type LoadError struct{ Problems []string }

func (e *LoadError) Error() string {
	return fmt.Sprintf("invalid settings (%d problems):\n  %s", len(e.Problems), strings.Join(e.Problems, "\n  "))
}

// EnvName returns the environment variable of a setting: AGENTRY_<NAME>.
func EnvName(setting string) string { return "AGENTRY_" + strings.ToUpper(setting) }

// fields calls fn for every setting of s except env, which only AGENTRY_ENV sets.
func (s *Settings) fields(fn func(name string, f reflect.StructField, v reflect.Value)) {
	rv := reflect.ValueOf(s).Elem()
	rt := rv.Type()
	for i := range rt.NumField() {
		f := rt.Field(i)
		name := f.Tag.Get("setting")
		if name == "" || name == "env" {
			continue
		}
		fn(name, f, rv.Field(i))
	}
}

func (s *Settings) applyFile(path string, data []byte, explicit map[string]bool) []string {
	var raw map[string]yaml.Node
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return []string{fmt.Sprintf("%s: %v", path, err)}
	}
	var problems []string
	known := map[string]bool{}
	s.fields(func(name string, _ reflect.StructField, v reflect.Value) {
		known[name] = true
		node, ok := raw[name]
		if !ok {
			return
		}
		var text string
		if node.Kind == yaml.SequenceNode {
			var items []string
			if err := node.Decode(&items); err != nil {
				problems = append(problems, fmt.Sprintf("%s: %s: %v", path, name, err))
				return
			}
			text = strings.Join(items, ",")
		} else if err := node.Decode(&text); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %s: not a scalar or a list", path, name))
			return
		}
		if err := setValue(v, text); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %s: %v", path, name, err))
			return
		}
		explicit[name] = true
	})
	for name := range raw {
		if !known[name] {
			problems = append(problems, fmt.Sprintf("%s: %s: unknown setting", path, name))
		}
	}
	return problems
}

func (s *Settings) applyEnv(getenv func(string) string, explicit map[string]bool) []string {
	var problems []string
	s.fields(func(name string, _ reflect.StructField, v reflect.Value) {
		text := getenv(EnvName(name))
		if text == "" {
			return
		}
		if err := setValue(v, text); err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", EnvName(name), err))
			return
		}
		explicit[name] = true
	})
	return problems
}

// setValue parses text into v according to v's type.
func setValue(v reflect.Value, text string) error {
	switch v.Interface().(type) {
	case string:
		v.SetString(text)
	case bool:
		b, err := strconv.ParseBool(text)
		if err != nil {
			return fmt.Errorf("%q is not a boolean", text)
		}
		v.SetBool(b)
	case int, int64:
		n, err := strconv.ParseInt(text, 10, 64)
		if err != nil {
			return fmt.Errorf("%q is not an integer", text)
		}
		v.SetInt(n)
	case time.Duration:
		d, err := time.ParseDuration(text)
		if err != nil {
			return fmt.Errorf("%q is not a duration such as 30s or 5m", text)
		}
		v.SetInt(int64(d))
	case []string:
		var items []string
		for item := range strings.SplitSeq(text, ",") {
			if item = strings.TrimSpace(item); item != "" {
				items = append(items, item)
			}
		}
		v.Set(reflect.ValueOf(items))
	default:
		return fmt.Errorf("unsupported setting type %s", v.Type())
	}
	return nil
}

func (s *Settings) validate(explicit map[string]bool) []string {
	var p []string
	bad := func(name, format string, args ...any) {
		p = append(p, EnvName(name)+": "+fmt.Sprintf(format, args...))
	}
	switch s.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level", "%q is not one of debug, info, warn, error", s.LogLevel)
	}
	for _, u := range []struct{ name, value string }{{"database_url", s.DatabaseURL}, {"redis_url", s.RedisURL}} {
		if parsed, err := url.Parse(u.value); err != nil || parsed.Scheme == "" || parsed.Host == "" {
			bad(u.name, "not a URL with a scheme and a host")
		}
	}
	positive := []struct {
		name string
		n    int64
	}{
		{"max_body_bytes", s.MaxBodyBytes}, {"db_max_open_conns", int64(s.DBMaxOpenConns)},
		{"worker_concurrency", int64(s.WorkerConcurrency)}, {"org_max_in_flight", int64(s.OrgMaxInFlight)}, {"org_max_queued", int64(s.OrgMaxQueued)},
		{"event_stream_max_len", s.EventStreamMaxLen}, {"egress_max_bytes", s.EgressMaxBytes},
		{"login_max_failures", int64(s.LoginMaxFailures)}, {"websocket_send_queue", int64(s.WebSocketSendQueue)},
		{"shutdown_timeout", int64(s.ShutdownTimeout)}, {"access_token_ttl", int64(s.AccessTokenTTL)},
		{"refresh_token_ttl", int64(s.RefreshTokenTTL)}, {"queue_poll_interval", int64(s.QueuePollInterval)},
		{"command_timeout", int64(s.CommandTimeout)}, {"reconcile_interval", int64(s.ReconcileInterval)},
		{"worker_heartbeat", int64(s.WorkerHeartbeat)}, {"egress_timeout", int64(s.EgressTimeout)},
		{"cache_ttl", int64(s.CacheTTL)}, {"login_failure_window", int64(s.LoginFailureWindow)},
		{"websocket_ping_interval", int64(s.WebSocketPingInterval)}, {"command_retention", int64(s.CommandRetention)},
	}
	for _, f := range positive {
		if f.n <= 0 {
			bad(f.name, "must be greater than zero")
		}
	}
	if s.DBMaxIdleConns < 0 {
		bad("db_max_idle_conns", "must not be negative")
	}
	if s.CommandMaxRetries < 0 {
		bad("command_max_retries", "must not be negative")
	}
	if len(s.JWTSecret) < 32 {
		bad("jwt_secret", "must be at least 32 characters")
	}
	if _, err := s.SecretsKeyBytes(); err != nil {
		bad("secrets_key", "%v", err)
	}
	if s.RedisPrefix == "" || strings.ContainsAny(s.RedisPrefix, " {}") {
		bad("redis_prefix", "must be non-empty, without spaces or braces")
	}
	if s.Env == Production {
		for _, name := range []string{"jwt_secret", "secrets_key", "database_url", "redis_url"} {
			if !explicit[name] {
				bad(name, "must be set explicitly in production")
			}
		}
		if s.JWTSecret == devJWTSecret {
			bad("jwt_secret", "is the development secret; set a real one in production")
		}
		if s.SecretsKey == devSecretsKey {
			bad("secrets_key", "is the development key; set a real one in production")
		}
	}
	return p
}

// Redacted returns the settings as name → printable value, with secrets
// replaced and passwords removed from URLs.
func (s Settings) Redacted() map[string]string {
	out := map[string]string{"env": s.Env}
	s.fields(func(name string, f reflect.StructField, v reflect.Value) {
		val := v.Interface()
		var text string
		switch x := val.(type) {
		case []string:
			text = strings.Join(x, ",")
		default:
			text = fmt.Sprint(x)
		}
		switch f.Tag.Get("secret") {
		case "true":
			if text != "" {
				text = "[redacted]"
			}
		case "url":
			text = redactURL(text)
		}
		out[name] = text
	})
	return out
}

// LogValue makes a logged Settings print redacted.
func (s Settings) LogValue() slog.Value {
	red := s.Redacted()
	names := make([]string, 0, len(red))
	for name := range red {
		names = append(names, name)
	}
	sort.Strings(names)
	attrs := make([]slog.Attr, 0, len(names))
	for _, name := range names {
		attrs = append(attrs, slog.String(name, red[name]))
	}
	return slog.GroupValue(attrs...)
}

// String prints the settings, redacted, one per line.
func (s Settings) String() string {
	red := s.Redacted()
	names := make([]string, 0, len(red))
	for name := range red {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		fmt.Fprintf(&b, "%s=%s\n", name, red[name])
	}
	return b.String()
}

// GoString keeps %#v from printing secrets.
func (s Settings) GoString() string {
	return "config.Settings{" + strings.ReplaceAll(strings.TrimSpace(s.String()), "\n", ", ") + "}"
}

func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "[redacted]"
	}
	if _, has := u.User.Password(); has {
		u.User = url.UserPassword(u.User.Username(), "redacted")
	}
	q := u.Query()
	for key := range q {
		if strings.Contains(strings.ToLower(key), "password") {
			q.Set(key, "redacted")
		}
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// SecretsKeyBytes decodes SecretsKey, which must be 32 bytes in standard base64.
func (s Settings) SecretsKeyBytes() ([]byte, error) {
	key, err := base64.StdEncoding.DecodeString(s.SecretsKey)
	if err != nil {
		return nil, errors.New("is not standard base64")
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("must decode to 32 bytes, not %d", len(key))
	}
	return key, nil
}
