package commands

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"
	"github.com/jmoiron/sqlx"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fixture is an organization with one member on a fresh schema.
type fixture struct {
	t     testing.TB
	db    *sqlx.DB
	store *Store
	org   string
	user  string
	rdb   *redis.Client // set by dispatcher
}

func newFixture(t testing.TB, limits Limits) *fixture {
	t.Helper()
	db := testenv.Postgres(t)
	f := &fixture{t: t, db: db, store: &Store{DB: db, Limits: limits}}
	f.org, f.user = f.newOrg()
	return f
}

// newOrg creates an organization owned by a new user, and returns both ids.
func (f *fixture) newOrg() (org, user string) {
	f.t.Helper()
	org, user = uuid.NewString(), uuid.NewString()
	f.exec(`INSERT INTO entities (id, kind) VALUES ($1, 'user'), ($2, 'organization')`, user, org)
	f.exec(`INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, 'u', 'x')`, user, user+"@example.com")
	f.exec(`INSERT INTO organizations (id, org_id, owner_id, name) VALUES ($1, $1, $2, 'org')`, org, user)
	return org, user
}

// newAgent creates an agent of org with config.
func (f *fixture) newAgent(org string, config map[string]any) string {
	f.t.Helper()
	id := uuid.NewString()
	raw, _ := json.Marshal(config)
	f.exec(`INSERT INTO entities (id, kind) VALUES ($1, 'agent')`, id)
	f.exec(`INSERT INTO agents (id, org_id, owner_id, name, config) VALUES ($1, $2, $2, 'agent', $3)`, id, org, string(raw))
	return id
}

func (f *fixture) exec(query string, args ...any) {
	f.t.Helper()
	if _, err := f.db.Exec(query, args...); err != nil {
		f.t.Fatalf("%s: %v", query, err)
	}
}

// insert stores a queued agent:echo command for agent of org.
func (f *fixture) insert(org, agent string, mod func(c *platform.Command)) *platform.Command {
	f.t.Helper()
	c := &platform.Command{
		Base:    platform.Base{ID: uuid.NewString(), OrgID: org, OwnerID: f.user},
		AgentID: agent, Task: "agent:echo", Payload: json.RawMessage(`{"message":"hi"}`),
		TimeoutS: 60, MaxRetries: 1,
	}
	if mod != nil {
		mod(c)
	}
	out, created, err := f.store.Insert(context.Background(), c)
	if err != nil || !created {
		f.t.Fatalf("insert: created %v, err %v", created, err)
	}
	return out
}

// get reads a command.
func (f *fixture) get(id string) *platform.Command {
	f.t.Helper()
	c := &platform.Command{}
	if err := f.db.Get(c, `SELECT * FROM commands WHERE id = $1`, id); err != nil {
		f.t.Fatalf("get %s: %v", id, err)
	}
	return c
}

func (f *fixture) agentStatus(id string) string {
	f.t.Helper()
	var s string
	if err := f.db.Get(&s, `SELECT status FROM agents WHERE id = $1`, id); err != nil {
		f.t.Fatal(err)
	}
	return s
}

// admit admits agent's backlog and returns the admitted ids in order.
func (f *fixture) admit(agent string) []string {
	f.t.Helper()
	got, err := f.store.AdmitAgent(context.Background(), agent)
	if err != nil {
		f.t.Fatalf("admit: %v", err)
	}
	ids := make([]string, len(got))
	for i, a := range got {
		ids[i] = a.ID
	}
	return ids
}

// claim claims attempt of id and fails the test unless it got it.
func (f *fixture) claim(id string, attempt int) *Claimed {
	f.t.Helper()
	c, err := f.store.Claim(context.Background(), id, attempt, "w1", time.Minute)
	if err != nil || c == nil {
		f.t.Fatalf("claim %s: want the attempt, got %v, err %v", TaskID(id, attempt), c, err)
	}
	return c
}

// running inserts a command for agent, admits it and claims its first
// attempt.
func (f *fixture) running(agent string) *platform.Command {
	f.t.Helper()
	c := f.insert(f.org, agent, nil)
	f.admit(agent)
	f.claim(c.ID, 1)
	return c
}

// finish ends attempt of id with status and fails the test if refused.
func (f *fixture) finish(id string, attempt int, o Outcome) *platform.Command {
	f.t.Helper()
	c, err := f.store.Finish(context.Background(), id, attempt, o)
	if err != nil || c == nil {
		f.t.Fatalf("finish %s: want it recorded, got %v, err %v", TaskID(id, attempt), c, err)
	}
	return &c.Command
}

// eventTypes lists a command's event types, oldest first.
func (f *fixture) eventTypes(id string) []string {
	f.t.Helper()
	evs, err := f.store.Events(context.Background(), id, 0, 1000)
	if err != nil {
		f.t.Fatal(err)
	}
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.Type
	}
	return out
}

var succeeded = Outcome{Status: platform.CommandSucceeded, Event: "succeeded", Result: json.RawMessage(`{}`)}

// dispatcher is a Dispatcher on f's store with a real Asynq queue and event
// bus on a Redis prefix of the test's own.
func (f *fixture) dispatcher() *Dispatcher {
	f.t.Helper()
	rdb, prefix := testenv.Redis(f.t)
	f.rdb = rdb
	client := asynq.NewClientFromRedisClient(rdb)
	return &Dispatcher{
		Store:  f.store,
		Queue:  NewQueue(client, prefix),
		Events: events.NewBus(rdb, prefix, 100),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}
