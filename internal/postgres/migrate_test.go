package postgres_test

import (
	"bytes"
	"context"
	"io"
	"io/fs"
	"strings"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/testenv"
	"github.com/agentry/agentry/migrations"
)

func tables(t *testing.T, db *sqlx.DB) []string {
	t.Helper()
	var names []string
	if err := db.Select(&names, "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() AND table_name <> 'schema_migrations' ORDER BY 1"); err != nil {
		t.Fatal(err)
	}
	return names
}

func TestMigrationsUpDownUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, err := postgres.Open(ctx, testenv.Schema(t), postgres.PoolOptions{MaxOpenConns: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	m, err := postgres.NewMigrator(db.DB, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Up(ctx, io.Discard); err != nil {
		t.Fatal(err)
	}
	up := tables(t, db)
	if len(up) == 0 {
		t.Fatal("no tables after migrate up")
	}
	var out bytes.Buffer
	if err := m.Up(ctx, &out); err != nil || !strings.Contains(out.String(), "up to date") {
		t.Fatalf("second up: %v %q", err, out.String())
	}
	if pending, err := m.Pending(ctx); err != nil || pending {
		t.Fatalf("pending after up: %v %v", pending, err)
	}
	if err := m.Reset(ctx, io.Discard); err != nil {
		t.Fatalf("down to zero: %v", err)
	}
	if left := tables(t, db); len(left) != 0 {
		t.Fatalf("tables left after every down: %v", left)
	}
	if err := m.Up(ctx, io.Discard); err != nil {
		t.Fatalf("up after down: %v", err)
	}
	if again := tables(t, db); strings.Join(again, ",") != strings.Join(up, ",") {
		t.Fatalf("second up made %v, first %v", again, up)
	}
	out.Reset()
	if err := m.Status(ctx, &out); err != nil || strings.Contains(out.String(), "pending") {
		t.Fatalf("status: %v\n%s", err, out.String())
	}
}

// Each migration's Up section can run again on a migrated database without
// error: an operator re-running one by hand breaks nothing.
func TestMigrationsAreIdempotent(t *testing.T) {
	t.Parallel()
	db := testenv.Postgres(t)
	files, err := fs.Glob(migrations.FS, "*.sql")
	if err != nil || len(files) == 0 {
		t.Fatalf("no migrations: %v", err)
	}
	for _, name := range files {
		data, _ := fs.ReadFile(migrations.FS, name)
		text := string(data)
		start := strings.Index(text, "-- +goose Up")
		end := strings.Index(text, "-- +goose Down")
		if start < 0 || end < 0 {
			t.Fatalf("%s: missing Up or Down section", name)
		}
		up := strings.ReplaceAll(text[start:end], "-- +goose StatementBegin", "")
		up = strings.ReplaceAll(up, "-- +goose StatementEnd", "")
		if _, err := db.Exec(up); err != nil {
			t.Errorf("%s: re-running Up failed: %v", name, err)
		}
	}
}
