package e2e

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"
)

// scheduledCommands lists the commands a schedule fired, by fire time.
func scheduledCommands(t *testing.T, c *Client, schedule string) []command {
	t.Helper()
	var page struct {
		Items []struct {
			command
			FireTime *time.Time `json:"fire_time"`
		} `json:"items"`
		Total int `json:"total"`
	}
	if err := json.Unmarshal(c.Must(200, "GET", "/v1/commands?page_size=100&schedule_id="+schedule, nil).Body, &page); err != nil {
		t.Fatal(err)
	}
	out := make([]command, len(page.Items))
	for i, it := range page.Items {
		out[i] = it.command
	}
	return out
}

// Two schedulers, one schedule firing every second: each fire time becomes
// exactly one command, across a change of leader, and disabling stops it.
func TestScheduleFiresOncePerFireTime(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	first := s.Start("scheduler")
	second := s.Start("scheduler")
	u := s.Client(api).NewUser("sched")
	agent := cmdAgent(t, u.Client, map[string]any{"max_concurrency": 5})
	r := u.Must(201, "POST", "/v1/schedules", map[string]any{
		"agent_id": agent, "name": "tick", "task": "agent:echo", "payload": map[string]any{"message": "tick"}, "cron": "@every 1s",
	}).JSON(t)
	id := r["id"].(string)
	if r["enabled"] != true || r["timezone"] != "UTC" || r["misfire_policy"] != "skip" || r["next_run_at"] == nil {
		t.Fatalf("want an enabled schedule in UTC, skip, with a next run; got %v", r)
	}
	db := stackDB(t, s)
	count := func() int {
		var n int
		if err := db.Get(&n, `SELECT count(*) FROM commands WHERE schedule_id = $1`, id); err != nil {
			t.Fatal(err)
		}
		return n
	}
	Eventually(t, 15*time.Second, "4 fires", func() bool { return count() >= 4 })

	// The first scheduler stops (it may have been the leader): firing goes on.
	if err := first.Stop(); err != nil {
		t.Fatalf("scheduler: %v\n%s", err, first.Logs())
	}
	before := count()
	Eventually(t, 20*time.Second, "3 more fires after a scheduler stopped", func() bool { return count() >= before+3 })

	u.Must(200, "PATCH", "/v1/schedules/"+id, map[string]any{"enabled": false})
	stopped := count()
	time.Sleep(2500 * time.Millisecond) // more than two periods
	if n := count(); n > stopped+1 {    // a fire already under way may land
		t.Fatalf("a disabled schedule fired %d more times", n-stopped)
	}

	var rows []struct {
		FireTime time.Time `db:"fire_time"`
		N        int       `db:"n"`
	}
	if err := db.Select(&rows, `SELECT fire_time, count(*) AS n FROM commands WHERE schedule_id = $1 GROUP BY fire_time ORDER BY fire_time`, id); err != nil {
		t.Fatal(err)
	}
	for i, r := range rows {
		if r.N != 1 {
			t.Errorf("fire time %s: %d commands", r.FireTime, r.N)
		}
		if r.FireTime.Nanosecond() != 0 {
			t.Errorf("fire time %s: not on a whole second", r.FireTime)
		}
		if i > 0 && !r.FireTime.After(rows[i-1].FireTime) {
			t.Errorf("fire times out of order: %s after %s", r.FireTime, rows[i-1].FireTime)
		}
	}
	// The commands ran, and the API shows them with their schedule.
	cmds := scheduledCommands(t, u.Client, id)
	if len(cmds) != len(rows) {
		t.Fatalf("the API lists %d commands of the schedule; the database has %d", len(cmds), len(rows))
	}
	Eventually(t, 15*time.Second, "the fired commands succeed", func() bool {
		for _, c := range scheduledCommands(t, u.Client, id) {
			if c.Status != "succeeded" {
				return false
			}
		}
		return true
	})
	// The scheduler still running fired the last ones, and counts them
	// as dispatched.
	if v, ok := sampleValue(scrape(t, second)["agentry_commands_dispatched_total"], map[string]string{"task": "agent:echo"}); !ok || v < 3 {
		t.Errorf("the scheduler counts %v commands dispatched (present %v), want at least 3", v, ok)
	}
}

func TestScheduleRefused(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("schedbad")
	agent := cmdAgent(t, u.Client, nil)
	other := s.Client(api).NewUser("schedother")
	otherAgent := cmdAgent(t, other.Client, nil)
	base := func(over map[string]any) map[string]any {
		b := map[string]any{"agent_id": agent, "task": "agent:echo", "payload": map[string]any{"message": "x"}, "cron": "*/5 * * * *"}
		for k, v := range over {
			b[k] = v
		}
		return b
	}
	cases := []struct {
		name      string
		body      map[string]any
		wantField string
		skip      string
	}{
		{name: "invalid cron", body: base(map[string]any{"cron": "every day at nine"}), wantField: "body.cron"},
		{name: "too many cron fields", body: base(map[string]any{"cron": "* * * * * * *"}), wantField: "body.cron"},
		{name: "unknown task", body: base(map[string]any{"task": "agent:teleport"}), wantField: "body.task"},
		{name: "bad payload", body: base(map[string]any{"payload": map[string]any{"nope": true}}), wantField: "body.payload"},
		{name: "unknown misfire policy", body: base(map[string]any{"misfire_policy": "sometimes"}), wantField: "misfire_policy"},
		{name: "another user's agent", body: base(map[string]any{"agent_id": otherAgent}), wantField: "body.agent_id"},
		{name: "unknown time zone", body: base(map[string]any{"timezone": "Mars/Olympus_Mons"}), wantField: "body.timezone"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := u.Do("POST", "/v1/schedules", tc.body)
			if r.Status != 400 && r.Status != 422 {
				t.Fatalf("want 400, got %d: %s", r.Status, r.Body)
			}
			fields := problemFields(t, r)
			named := slices.ContainsFunc(fields, func(f string) bool { return strings.Contains(f, tc.wantField) })
			if !named && tc.skip != "" {
				t.Skip(tc.skip)
			}
			if r.Status != 400 {
				t.Fatalf("want 400, got %d: %s", r.Status, r.Body)
			}
			if !named {
				t.Fatalf("want the problem to name %s, got %v: %s", tc.wantField, fields, r.Body)
			}
		})
	}
	// A time zone is read: 09:00 in Paris is not 09:00 UTC.
	r := u.Must(201, "POST", "/v1/schedules", base(map[string]any{"cron": "0 9 * * *", "timezone": "Europe/Paris"})).JSON(t)
	next, err := time.Parse(time.RFC3339, r["next_run_at"].(string))
	if err != nil {
		t.Fatal(err)
	}
	paris, _ := time.LoadLocation("Europe/Paris")
	if h := next.In(paris).Hour(); h != 9 || next.In(paris).Minute() != 0 {
		t.Fatalf("next run %s is not 09:00 in Paris", next)
	}
	// Nothing refused was stored.
	var page struct {
		Items []any `json:"items"`
	}
	_ = json.Unmarshal(u.Must(200, "GET", "/v1/schedules", nil).Body, &page)
	if len(page.Items) != 1 {
		t.Fatalf("want the one valid schedule stored, got %d", len(page.Items))
	}
}

// A schedule runs in its owner's name: only what they may still do, on an
// agent that allows it, as their own dispatch would. Created disabled, it
// stays disabled; its commands take the agent's command timeout. A failed
// command is retried only on an agent that is enabled.
func TestScheduleRunsOnlyAsItsOwnerMay(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	s.Start("scheduler")
	owner := s.Client(api).NewUser("schedowner")
	member := s.Client(api).NewUser("schedmember")
	membership := owner.Must(201, "POST", "/v1/members", map[string]any{"email": member.Email, "role": "member"}).Str(t, "id")
	m := member.As(member.Token, owner.Org)
	agent := cmdAgent(t, owner.Client, map[string]any{"allowed_tasks": []string{"agent:echo"}, "command_timeout_s": 7, "max_concurrency": 5})

	body := map[string]any{"agent_id": agent, "task": "agent:echo", "payload": map[string]any{"message": "x"}, "cron": "@every 1s", "enabled": false}
	r := m.Must(201, "POST", "/v1/schedules", body).JSON(t)
	id := r["id"].(string)
	if r["enabled"] != false || r["next_run_at"] != nil {
		t.Fatalf("created disabled: want enabled false and no next run, got %v", r)
	}
	if got := m.Must(200, "GET", "/v1/schedules/"+id, nil).JSON(t); got["enabled"] != false {
		t.Fatalf("stored: want enabled false, got %v", got)
	}
	sleep := map[string]any{"agent_id": agent, "task": "agent:sleep", "payload": map[string]any{"milliseconds": 1}, "cron": "@every 1s"}
	if r := m.Do("POST", "/v1/schedules", sleep); r.Status != 400 || !slices.Contains(problemFields(t, r), "body.task") {
		t.Fatalf("a task the agent does not allow: want 400 naming body.task, got %d: %s", r.Status, r.Body)
	}

	m.Must(200, "PATCH", "/v1/schedules/"+id, map[string]any{"enabled": true})
	Eventually(t, 15*time.Second, "a fire", func() bool { return len(scheduledCommands(t, m, id)) >= 1 })
	if c := scheduledCommands(t, m, id)[0]; c.TimeoutS != 7 {
		t.Fatalf("a fired command: want the agent's timeout 7 s, got %d", c.TimeoutS)
	}
	// A fire moves next_run_at and last_run_at: a change, with a new ETag.
	if v := m.Must(200, "GET", "/v1/schedules/"+id, nil).JSON(t)["version"].(float64); v < 3 {
		t.Fatalf("after create, enable and a fire: version %v, want at least 3", v)
	}

	// The member becomes a viewer: they may no longer command the agent,
	// and neither may their schedule.
	owner.Must(200, "PATCH", "/v1/members/"+membership, map[string]any{"role": "viewer"})
	if r := m.Do("POST", "/v1/agents/"+agent+"/commands", echo("direct")); r.Status != 403 {
		t.Fatalf("a viewer's dispatch: want 403, got %d", r.Status)
	}
	time.Sleep(1500 * time.Millisecond) // a fire already under way may land
	fired := len(scheduledCommands(t, owner.Client, id))
	time.Sleep(2500 * time.Millisecond)
	if n := len(scheduledCommands(t, owner.Client, id)); n != fired {
		t.Fatalf("the viewer's schedule fired %d more times", n-fired)
	}

	// The owner narrows the agent's tasks: their own echo schedule, made
	// before, stops too.
	mine := owner.Must(201, "POST", "/v1/schedules", map[string]any{"agent_id": agent, "task": "agent:echo", "payload": map[string]any{"message": "y"}, "cron": "@every 1s"}).Str(t, "id")
	Eventually(t, 15*time.Second, "the owner's schedule fires", func() bool { return len(scheduledCommands(t, owner.Client, mine)) >= 1 })
	owner.Must(200, "PATCH", "/v1/agents/"+agent, map[string]any{"params": map[string]any{"allowed_tasks": []string{"agent:sleep"}}})
	time.Sleep(1500 * time.Millisecond)
	fired = len(scheduledCommands(t, owner.Client, mine))
	time.Sleep(2500 * time.Millisecond)
	if n := len(scheduledCommands(t, owner.Client, mine)); n != fired {
		t.Fatalf("a schedule of a task the agent no longer allows fired %d more times", n-fired)
	}

	// Retry runs again on the agent as it is now.
	other := cmdAgent(t, owner.Client, nil)
	failed := cmdDispatch(t, owner.Client, other, map[string]any{"task": "http:request", "payload": map[string]any{"url": "http://127.0.0.1:1/"}, "max_retries": 0})
	cmdWaitStatus(t, owner.Client, failed.ID, "failed", 20*time.Second)
	owner.Must(200, "POST", "/v1/agents/"+other+"/disable", nil)
	if r := owner.Do("POST", "/v1/commands/"+failed.ID+"/retry", nil); r.Status != 409 {
		t.Fatalf("retry on a disabled agent: want 409, got %d: %s", r.Status, r.Body)
	}
	if c := cmdGet(t, owner.Client, failed.ID); c.Status != "failed" {
		t.Fatalf("a refused retry changed the command: %s", c.Status)
	}
}
