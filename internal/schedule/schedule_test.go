package schedule

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hibiken/asynq"
	"github.com/jmoiron/sqlx"
	"go.uber.org/goleak"

	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

func times(ss ...string) []time.Time {
	out := []time.Time{}
	for _, s := range ss {
		out = append(out, at(s))
	}
	return out
}

func TestPlan(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name       string
		cron, tz   string
		policy     string
		nextRun    string
		now        string
		wantFire   []time.Time
		wantNext   string
		wantMissed int
	}{
		{name: "on time", cron: "*/5 * * * *", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:00:00.3Z",
			wantFire: times("2026-01-01T10:00:00Z"), wantNext: "2026-01-01T10:05:00Z"},
		{name: "late within the grace fires under skip", cron: "*/5 * * * *", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:00:50Z",
			wantFire: times("2026-01-01T10:00:00Z"), wantNext: "2026-01-01T10:05:00Z"},
		{name: "late past the grace is skipped under skip", cron: "*/5 * * * *", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:02:00Z",
			wantFire: times(), wantNext: "2026-01-01T10:05:00Z", wantMissed: 1},
		{name: "late past the grace runs under run_once", cron: "*/5 * * * *", policy: MisfireRunOnce, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:02:00Z",
			wantFire: times("2026-01-01T10:00:00Z"), wantNext: "2026-01-01T10:05:00Z"},
		{name: "several missed, the latest within the grace, skip fires the latest", cron: "*/5 * * * *", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:15:30Z",
			wantFire: times("2026-01-01T10:15:00Z"), wantNext: "2026-01-01T10:20:00Z", wantMissed: 3},
		{name: "several missed, all past the grace, skip fires none", cron: "*/5 * * * *", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:17:00Z",
			wantFire: times(), wantNext: "2026-01-01T10:20:00Z", wantMissed: 4},
		{name: "several missed, run_once fires the latest once", cron: "*/5 * * * *", policy: MisfireRunOnce, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:17:00Z",
			wantFire: times("2026-01-01T10:15:00Z"), wantNext: "2026-01-01T10:20:00Z", wantMissed: 3},
		{name: "a day missed under run_once", cron: "@hourly", policy: MisfireRunOnce, nextRun: "2026-01-01T00:00:00Z", now: "2026-01-02T00:30:00Z",
			wantFire: times("2026-01-02T00:00:00Z"), wantNext: "2026-01-02T01:00:00Z", wantMissed: 24},
		{name: "seconds field", cron: "*/10 * * * * *", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:00:01Z",
			wantFire: times("2026-01-01T10:00:00Z"), wantNext: "2026-01-01T10:00:10Z"},
		{name: "every second", cron: "@every 1s", policy: MisfireSkip, nextRun: "2026-01-01T10:00:00Z", now: "2026-01-01T10:00:00.5Z",
			wantFire: times("2026-01-01T10:00:00Z"), wantNext: "2026-01-01T10:00:01Z"},
		{name: "hours of every second missed under run_once fire the latest", cron: "@every 1s", policy: MisfireRunOnce, nextRun: "2026-01-01T00:00:00Z", now: "2026-01-01T05:00:00.5Z",
			wantFire: times("2026-01-01T05:00:00Z"), wantNext: "2026-01-01T05:00:01Z", wantMissed: 18000},
		{name: "in a time zone across a DST change", cron: "0 9 * * *", tz: "Europe/Paris", policy: MisfireSkip, nextRun: "2026-03-28T08:00:00Z", now: "2026-03-28T08:00:01Z",
			wantFire: times("2026-03-28T08:00:00Z"), wantNext: "2026-03-29T07:00:00Z"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tz := tc.tz
			if tz == "" {
				tz = "UTC"
			}
			next := at(tc.nextRun)
			s := &Schedule{Cron: tc.cron, Timezone: tz, MisfirePolicy: tc.policy, NextRunAt: &next}
			fire, gotNext, missed, err := plan(s, at(tc.now))
			if err != nil {
				t.Fatal(err)
			}
			if !slices.EqualFunc(fire, tc.wantFire, time.Time.Equal) {
				t.Errorf("fire: want %v, got %v", tc.wantFire, fire)
			}
			if !gotNext.Equal(at(tc.wantNext)) {
				t.Errorf("next: want %s, got %s", tc.wantNext, gotNext)
			}
			if missed != tc.wantMissed {
				t.Errorf("missed: want %d, got %d", tc.wantMissed, missed)
			}
		})
	}
}

func TestParse(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, cron, tz string
		ok             bool
	}{
		{"five fields", "0 9 * * 1-5", "UTC", true},
		{"six fields", "*/5 * * * * *", "UTC", true},
		{"descriptor", "@daily", "America/New_York", true},
		{"every", "@every 90s", "UTC", true},
		{"every zero", "@every 0s", "UTC", false},
		{"every negative", "@every -1m", "UTC", false},
		{"every under a second", "@every 1ns", "UTC", false},
		{"every part of a second", "@every 1500ms", "UTC", false},
		{"garbage", "every day at nine", "UTC", false},
		{"too many fields", "* * * * * * *", "UTC", false},
		{"unknown time zone", "@daily", "Mars/Olympus", false},
		{"empty time zone", "@daily", "", false},
		{"Local is not a zone", "@daily", "Local", false},
		{"time zone in the expression", "CRON_TZ=UTC 0 9 * * *", "UTC", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := Parse(tc.cron, tc.tz)
			if (err == nil) != tc.ok {
				t.Fatalf("Parse(%q, %q): want ok %v, got %v", tc.cron, tc.tz, tc.ok, err)
			}
		})
	}
}

// firerFixture is a schema with a user, its organization and an agent.
type firerFixture struct {
	db               *sqlx.DB
	dispatcher       *commands.Dispatcher
	org, user, agent string
}

func newFirerFixture(t *testing.T) *firerFixture {
	t.Helper()
	db := testenv.Postgres(t)
	rdb, prefix := testenv.Redis(t)
	f := &firerFixture{db: db, org: uuid.NewString(), user: uuid.NewString(), agent: uuid.NewString()}
	role := uuid.NewString()
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{`INSERT INTO entities (id, kind) VALUES ($1, 'user'), ($2, 'organization'), ($3, 'role'), ($4, 'agent')`, []any{f.user, f.org, role, f.agent}},
		{`INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, 'u', 'x')`, []any{f.user, f.user + "@example.com"}},
		{`INSERT INTO organizations (id, org_id, owner_id, name) VALUES ($1, $1, $2, 'org')`, []any{f.org, f.user}},
		{`INSERT INTO roles (id, org_id, owner_id, name) VALUES ($1, $2, $3, 'member')`, []any{role, f.org, f.user}},
		{`INSERT INTO memberships (id, org_id, owner_id, user_id, role_id) VALUES ($1, $2, $3, $3, $4)`, []any{uuid.NewString(), f.org, f.user, role}},
		{`INSERT INTO agents (id, org_id, owner_id, name, config) VALUES ($1, $2, $3, 'a', '{"max_concurrency": 100}')`, []any{f.agent, f.org, f.user}},
	} {
		if _, err := db.Exec(q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
	f.dispatcher = &commands.Dispatcher{
		Store:  &commands.Store{DB: db, Limits: commands.Limits{OrgMaxInFlight: 1000, OrgMaxQueued: 1000}},
		Queue:  commands.NewQueue(asynq.NewClientFromRedisClient(rdb), prefix),
		Events: events.NewBus(rdb, prefix, 100),
		Logger: discard,
	}
	return f
}

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// schedule stores an enabled schedule of agent:echo due at next.
func (f *firerFixture) schedule(t *testing.T, cron string, next time.Time) string {
	t.Helper()
	id := uuid.NewString()
	_, err := f.db.Exec(`INSERT INTO schedules (id, org_id, owner_id, agent_id, task, payload, cron, next_run_at, enabled)
		VALUES ($1, $2, $3, $4, 'agent:echo', '{"message":"tick"}', $5, $6, true)`, id, f.org, f.user, f.agent, cron, next)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func (f *firerFixture) firer(now func() time.Time) *Firer {
	return &Firer{DB: f.db, Dispatcher: f.dispatcher, Logger: discard, Tick: 10 * time.Millisecond, now: now}
}

// Two firers racing on the same due schedules, again and again, and even
// when both believe the same times are due: one command per fire time.
func TestFireDueExactlyOnce(t *testing.T) {
	t.Parallel()
	f := newFirerFixture(t)
	ctx := context.Background()
	base := time.Now().UTC().Truncate(time.Second).Add(-time.Second)
	var ids []string
	for range 20 {
		ids = append(ids, f.schedule(t, "@every 1s", base))
	}
	// Both firers see time move on, one second per round.
	var clock struct {
		sync.Mutex
		now time.Time
	}
	clock.now = base.Add(100 * time.Millisecond)
	now := func() time.Time { clock.Lock(); defer clock.Unlock(); return clock.now }
	a, b := f.firer(now), f.firer(now)
	total := 0
	for round := range 5 {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, fr := range []*Firer{a, b, a, b} {
			wg.Go(func() {
				n, err := fr.FireDue(ctx)
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				total += n
				mu.Unlock()
			})
		}
		wg.Wait()
		if round == 2 {
			// A stale leader's view: the schedules are due again at times
			// that already fired.
			if _, err := f.db.Exec(`UPDATE schedules SET next_run_at = $1`, base); err != nil {
				t.Fatal(err)
			}
			continue
		}
		clock.Lock()
		clock.now = clock.now.Add(time.Second)
		clock.Unlock()
	}
	var rows []struct {
		ScheduleID string    `db:"schedule_id"`
		FireTime   time.Time `db:"fire_time"`
		N          int       `db:"n"`
	}
	if err := f.db.Select(&rows, `SELECT schedule_id, fire_time, count(*) AS n FROM commands GROUP BY 1, 2 ORDER BY 1, 2`); err != nil {
		t.Fatal(err)
	}
	perSchedule := map[string]int{}
	for _, r := range rows {
		if r.N != 1 {
			t.Errorf("schedule %s fired %s %d times", r.ScheduleID, r.FireTime, r.N)
		}
		perSchedule[r.ScheduleID]++
	}
	// Rounds at base+0.1s, +1.1, +2.1, (+2.1 again), +3.1: fire times base .. base+3s.
	for _, id := range ids {
		if perSchedule[id] != 4 {
			t.Errorf("schedule %s: want 4 fire times, got %d", id, perSchedule[id])
		}
	}
	if total != len(rows) {
		t.Errorf("FireDue reported %d commands; %d stored", total, len(rows))
	}
}

// A schedule of an unknown task, a disabled agent, or an owner who left
// fires nothing; a schedule whose expression no longer parses is disabled.
func TestFireDueSkips(t *testing.T) {
	t.Parallel()
	f := newFirerFixture(t)
	ctx := context.Background()
	now := time.Now().UTC()
	due := now.Add(-time.Second)
	fr := f.firer(func() time.Time { return now })

	broken := f.schedule(t, "@every 1s", due)
	if _, err := f.db.Exec(`UPDATE schedules SET cron = 'nonsense' WHERE id = $1`, broken); err != nil {
		t.Fatal(err)
	}
	unknown := f.schedule(t, "@every 1s", due)
	if _, err := f.db.Exec(`UPDATE schedules SET task = 'test:gone' WHERE id = $1`, unknown); err != nil {
		t.Fatal(err)
	}
	if n, err := fr.FireDue(ctx); err != nil || n != 0 {
		t.Fatalf("want nothing fired, got %d (%v)", n, err)
	}
	var enabled bool
	if err := f.db.Get(&enabled, `SELECT enabled FROM schedules WHERE id = $1`, broken); err != nil || enabled {
		t.Fatalf("a schedule that no longer parses: want disabled, got enabled %v (%v)", enabled, err)
	}

	f.schedule(t, "@every 1s", due)
	if _, err := f.db.Exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, f.agent); err != nil {
		t.Fatal(err)
	}
	if n, err := fr.FireDue(ctx); err != nil || n != 0 {
		t.Fatalf("a disabled agent: want nothing fired, got %d (%v)", n, err)
	}
}

func TestFirerStartStop(t *testing.T) {
	t.Parallel()
	f := newFirerFixture(t)
	id := f.schedule(t, "@every 1s", time.Now().Add(-time.Second))
	fr := f.firer(nil)
	if err := fr.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var n int
		if err := f.db.Get(&n, `SELECT count(*) FROM commands WHERE schedule_id = $1`, id); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the firer fired nothing within 5s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	fr.Stop()
	fr.Stop()
}

// When the clocks go back, a wall-clock time that comes twice fires once,
// the first time; schedules of intervals shorter than the shift, and
// @every, go on in real time.
func TestWallClockTimesFireOnceWhenClocksGoBack(t *testing.T) {
	fires := func(expr string, from, to time.Time) []time.Time {
		sched, loc, err := Parse(expr, "Europe/Berlin")
		if err != nil {
			t.Fatal(err)
		}
		var out []time.Time
		for at := sched.Next(from.In(loc)); at.Before(to); at = sched.Next(at) {
			out = append(out, at.UTC())
		}
		return out
	}
	// Berlin goes from 03:00 CEST back to 02:00 CET on 2027-10-31 (01:00 UTC).
	from, to := time.Date(2027, 10, 30, 12, 0, 0, 0, time.UTC), time.Date(2027, 11, 1, 12, 0, 0, 0, time.UTC)
	daily := fires("30 2 * * *", from, to)
	want := []time.Time{time.Date(2027, 10, 31, 0, 30, 0, 0, time.UTC), time.Date(2027, 11, 1, 1, 30, 0, 0, time.UTC)}
	if !slices.Equal(daily, want) {
		t.Fatalf("daily at 02:30: fires %v, want %v", daily, want)
	}
	// Every 30 minutes: through the hour that comes twice, in real time.
	night := fires("*/30 * * * *", time.Date(2027, 10, 30, 23, 59, 0, 0, time.UTC), time.Date(2027, 10, 31, 2, 1, 0, 0, time.UTC))
	if len(night) != 5 {
		t.Fatalf("every 30 minutes from 00:00 to 02:00 UTC: %d fires %v, want 5", len(night), night)
	}
	if every := fires("@every 1h", from, to); len(every) != 47 {
		t.Fatalf("@every 1h between two times 48 hours apart: %d fires, want 47", len(every))
	}
}
