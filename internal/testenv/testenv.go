// Package testenv gives tests real, isolated dependencies: each test gets
// its own PostgreSQL schema (migrated, dropped afterwards) and its own Redis
// key prefix, so the suite runs in parallel against the one local
// PostgreSQL and Redis. AGENTRY_TEST_DATABASE_URL and AGENTRY_TEST_REDIS_URL
// point it elsewhere.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"net/url"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jmoiron/sqlx"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/postgres"
)

// DatabaseURL is the server tests create their schemas on.
func DatabaseURL() string {
	if u := os.Getenv("AGENTRY_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
}

// RedisURL is the Redis tests use, each under its own prefix.
func RedisURL() string {
	if u := os.Getenv("AGENTRY_TEST_REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

// Name returns a random lower-case name with the given prefix.
func Name(prefix string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// Schema creates an empty schema for t, dropped when t ends, and returns a
// database URL whose connections use it.
func Schema(t testing.TB) string {
	t.Helper()
	ctx := context.Background()
	admin, err := sqlx.Open("postgres", DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	schema := Name("t_")
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("testenv: PostgreSQL at %s: %v (is it running? `make test` starts it)", DatabaseURL(), err)
	}
	t.Cleanup(func() {
		db, err := sqlx.Open("postgres", DatabaseURL())
		if err != nil {
			return
		}
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = db.ExecContext(ctx, "DROP SCHEMA "+schema+" CASCADE")
	})
	u, err := url.Parse(DatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String()
}

// Postgres returns a pool on a fresh, migrated schema for t.
func Postgres(t testing.TB) *sqlx.DB {
	t.Helper()
	db, _ := PostgresURL(t)
	return db
}

// PostgresURL is Postgres and the URL of the schema, for starting binaries.
func PostgresURL(t testing.TB) (*sqlx.DB, string) {
	t.Helper()
	dsn := Schema(t)
	ctx := context.Background()
	db, err := postgres.Open(ctx, dsn, postgres.PoolOptions{MaxOpenConns: 10, MaxIdleConns: 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	m, err := postgres.NewMigrator(db.DB, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Up(ctx, io.Discard); err != nil {
		t.Fatal(err)
	}
	return db, dsn
}

// Redis returns a client and a key prefix of t's own; the prefix's keys,
// and those of the command queue named after it (commands.QueueName), are
// deleted when t ends.
func Redis(t testing.TB) (*redis.Client, string) {
	t.Helper()
	opts, err := redis.ParseURL(RedisURL())
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	if err := rdb.Ping(context.Background()).Err(); err != nil {
		t.Fatalf("testenv: Redis at %s: %v (is it running? `make test` starts it)", RedisURL(), err)
	}
	prefix := Name("test")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// The prefix's own keys, and the Asynq keys of its queue.
		DeleteKeys(ctx, rdb, prefix+"*", "asynq:{"+prefix+"-commands}*")
		rdb.SRem(ctx, "asynq:queues", prefix+"-commands")
		rdb.Close()
	})
	return rdb, prefix
}

// DeleteKeys deletes the Redis keys matching any of patterns, found with
// SCAN (never KEYS), 500 at a time.
func DeleteKeys(ctx context.Context, rdb redis.UniversalClient, patterns ...string) {
	var keys []string
	for _, pattern := range patterns {
		iter := rdb.Scan(ctx, 0, pattern, 1000).Iterator()
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
	}
	for len(keys) > 0 {
		n := min(len(keys), 500)
		rdb.Del(ctx, keys[:n]...)
		keys = keys[n:]
	}
}

// SmallBufferDialer dials WebSockets with a 4 KiB receive buffer, set
// before connecting so that TCP's window is small from the start: a client
// that reads nothing fills it at once (slow-client tests).
func SmallBufferDialer() *websocket.Dialer {
	small := *websocket.DefaultDialer
	small.NetDialContext = (&net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		_ = rc.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		return err
	}}).DialContext
	return &small
}
