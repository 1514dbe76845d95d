// Package schedule fires cron schedules as commands and elects the one
// scheduler replica that does so (and runs the reconciler). Leadership is a
// Redis lease with a fencing epoch; firing is made exactly-once per
// schedule and fire time by a unique key in Postgres, so even two replicas
// that both believe they lead never fire a time twice.
package schedule

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"
	"github.com/robfig/cron/v3"

	"github.com/agentry/agentry/internal/commands"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/tasks"
)

// Misfire policies: what to do with fire times missed while no scheduler ran.
const (
	MisfireSkip    = "skip"
	MisfireRunOnce = "run_once"
)

// Grace is how late a fire time may be and still fire under the skip policy.
const Grace = time.Minute

var parser = cron.NewParser(cron.SecondOptional | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// Parse checks a cron expression and a time zone.
func Parse(expr, tz string) (cron.Schedule, *time.Location, error) {
	if strings.HasPrefix(strings.TrimSpace(expr), "CRON_TZ=") || strings.HasPrefix(strings.TrimSpace(expr), "TZ=") {
		return nil, nil, errors.New("give the time zone in timezone, not in the expression")
	}
	if d, ok := strings.CutPrefix(strings.TrimSpace(expr), "@every "); ok {
		// The parser would make any of these every second, silently.
		if every, err := time.ParseDuration(strings.TrimSpace(d)); err == nil && (every < time.Second || every%time.Second != 0) {
			return nil, nil, fmt.Errorf("@every takes a whole number of seconds, at least 1s, such as @every 30s or @every 1h; got %s", d)
		}
	}
	sched, err := parser.Parse(expr)
	if err != nil {
		return nil, nil, err
	}
	loc, err := time.LoadLocation(tz)
	if err != nil || tz == "" || tz == "Local" {
		return nil, nil, fmt.Errorf("unknown time zone %q; use an IANA name such as Europe/Paris or UTC", tz)
	}
	if spec, ok := sched.(*cron.SpecSchedule); ok && spec.Hour&everyHour != everyHour {
		sched = wallClock{sched}
	}
	return sched, loc, nil
}

// everyHour is the hour field of a schedule that fires in every hour.
const everyHour = 1<<24 - 1

// wallClock is a schedule at given hours of the day: when the clocks go
// back, a time that comes twice fires once, the first time (as cron does),
// not once an hour apart. Schedules that fire every hour go on in real time
// through the hour that comes twice. (A time the clocks skip going forward
// does not come that day.)
type wallClock struct{ cron.Schedule }

// Next returns the next fire time after t that is not a wall-clock time's
// second coming.
func (w wallClock) Next(t time.Time) time.Time {
	for {
		next := w.Schedule.Next(t)
		if next.IsZero() || !secondComing(next) {
			return next
		}
		t = next
	}
}

// secondComing reports whether t's wall-clock time already came once, just
// before the clocks went back.
func secondComing(t time.Time) bool {
	_, now := t.Zone()
	_, before := t.Add(-3 * time.Hour).Zone()
	back := time.Duration(before-now) * time.Second
	if back <= 0 {
		return false
	}
	const wall = "2006-01-02 15:04:05"
	return t.Add(-back).Format(wall) == t.Format(wall)
}

// Next returns the first fire time of expr in tz after t.
func Next(expr, tz string, t time.Time) (time.Time, error) {
	sched, loc, err := Parse(expr, tz)
	if err != nil {
		return time.Time{}, err
	}
	next := sched.Next(t.In(loc))
	if next.IsZero() {
		return time.Time{}, errors.New("the expression never fires")
	}
	return next.UTC(), nil
}

// Schedule is a stored schedule.
type Schedule struct {
	platform.Base
	AgentID       string              `db:"agent_id" json:"agent_id" format:"uuid"`
	Name          string              `db:"name" json:"name"`
	Task          string              `db:"task" json:"task"`
	Payload       platform.JSONObject `db:"payload" json:"payload"`
	Cron          string              `db:"cron" json:"cron" doc:"A cron expression: five fields (or six with seconds first), or @hourly, @daily, @every 5m …"`
	Timezone      string              `db:"timezone" json:"timezone" doc:"The IANA time zone the expression is read in."`
	Enabled       bool                `db:"enabled" json:"enabled"`
	MisfirePolicy string              `db:"misfire_policy" json:"misfire_policy" enum:"skip,run_once" doc:"For fire times missed while no scheduler ran: skip them, or run once for all of them."`
	NextRunAt     *time.Time          `db:"next_run_at" json:"next_run_at,omitempty"`
	LastRunAt     *time.Time          `db:"last_run_at" json:"last_run_at,omitempty"`
}

// Metrics is told what the firer did.
type Metrics interface {
	Fired(n int)
	Misfired(n int)
}

// Firer turns due schedules into commands.
type Firer struct {
	DB         *sqlx.DB
	Dispatcher *commands.Dispatcher
	Logger     *slog.Logger
	Metrics    Metrics
	// Tick is how often due schedules are looked for.
	Tick time.Duration
	// MayCommand, if set, decides whether a schedule's owner may still
	// command its agent (role, permissions, ACL entries): a fire time whose
	// owner may not is skipped, as a dispatch of theirs would be refused.
	MayCommand func(ctx context.Context, userID string, agent platform.ResourceRef) (bool, error)
	now        func() time.Time

	stopOnce sync.Once
	cancel   context.CancelFunc
	done     chan struct{}
}

// Start fires due schedules every Tick until Stop.
func (f *Firer) Start(ctx context.Context) error {
	if f.now == nil {
		f.now = time.Now
	}
	ctx, f.cancel = context.WithCancel(ctx)
	f.done = make(chan struct{})
	go func() {
		defer close(f.done)
		t := time.NewTicker(f.Tick)
		defer t.Stop()
		for {
			if _, err := f.FireDue(ctx); err != nil && ctx.Err() == nil {
				f.Logger.WarnContext(ctx, "firing schedules failed", "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// Stop ends the loop; it is idempotent.
func (f *Firer) Stop() {
	f.stopOnce.Do(func() {
		if f.cancel == nil {
			return
		}
		f.cancel()
		<-f.done
	})
}

// plan decides which fire times of a due schedule to fire now, and its
// next run: normally the one due; under skip only a due time within Grace;
// under run_once the latest missed time, once.
func plan(s *Schedule, now time.Time) (fire []time.Time, next time.Time, missed int, err error) {
	sched, loc, err := Parse(s.Cron, s.Timezone)
	if err != nil {
		return nil, time.Time{}, 0, err
	}
	due := []time.Time{*s.NextRunAt}
	beyond := 0 // missed times not kept in due
	for t := sched.Next(s.NextRunAt.In(loc)); !t.IsZero() && !t.After(now); t = sched.Next(t) {
		due = append(due, t.UTC())
		if len(due) == 10000 {
			// A long outage of a frequent schedule: what matters is the
			// latest missed time, which is within the last day (it fired
			// 10,000 times in less than the outage). Count the rest
			// without keeping them.
			last := due[len(due)-1]
			for u := sched.Next(maxTime(last, now.Add(-25*time.Hour)).In(loc)); !u.IsZero() && !u.After(now); u = sched.Next(u) {
				last = u.UTC()
				beyond++
			}
			due[len(due)-1] = last
			break
		}
	}
	next = sched.Next(now.In(loc)).UTC()
	latest := due[len(due)-1]
	switch {
	case len(due) == 1 && now.Sub(latest) <= Grace:
		fire = due
	case s.MisfirePolicy == MisfireRunOnce:
		fire, missed = []time.Time{latest}, len(due)-1+beyond
	case now.Sub(latest) <= Grace:
		fire, missed = []time.Time{latest}, len(due)-1+beyond
	default:
		missed = len(due) + beyond
	}
	return fire, next, missed, nil
}

// FireDue fires every due schedule once per due fire time and moves each to
// its next run. It returns how many commands it created.
func (f *Firer) FireDue(ctx context.Context) (int, error) {
	now := f.now().UTC()
	tx, err := f.DB.BeginTxx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback()
	var due []*Schedule
	// Locks up to 100 due schedules no other firer holds.
	if err := tx.SelectContext(ctx, &due, `SELECT * FROM schedules WHERE enabled AND next_run_at <= $1
		ORDER BY next_run_at LIMIT 100 FOR UPDATE SKIP LOCKED`, now); err != nil {
		return 0, err
	}
	var created []*platform.Command
	misfired := 0
	for _, s := range due {
		fire, next, missed, err := plan(s, now)
		if err != nil {
			f.Logger.WarnContext(ctx, "schedule cannot fire; disabling it", "schedule_id", s.ID, "err", err)
			if _, err := tx.ExecContext(ctx, "UPDATE schedules SET enabled = false, updated_at = now(), version = version + 1 WHERE id = $1", s.ID); err != nil {
				return 0, err
			}
			continue
		}
		misfired += missed
		for _, at := range fire {
			c, err := f.command(ctx, tx, s, at)
			if err != nil {
				return 0, err
			}
			if c != nil {
				created = append(created, c)
			}
		}
		last := s.LastRunAt
		if len(fire) > 0 {
			last = &fire[len(fire)-1]
		}
		if _, err := tx.ExecContext(ctx, "UPDATE schedules SET next_run_at = $2, last_run_at = $3, updated_at = now(), version = version + 1 WHERE id = $1", s.ID, next, last); err != nil {
			return 0, err
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, err
	}
	for _, c := range created {
		if f.Dispatcher.Metrics != nil {
			f.Dispatcher.Metrics.Dispatched(c.Task)
		}
		f.Dispatcher.Publish(ctx, "command.queued", c)
		f.Dispatcher.Admit(ctx, c.AgentID)
	}
	if f.Metrics != nil {
		f.Metrics.Fired(len(created))
		f.Metrics.Misfired(misfired)
	}
	return len(created), nil
}

// command inserts the command of one fire time, unless that time already
// fired (the unique key on schedule and fire time), or its owner may no
// longer command the agent (not a member, a role or an ACL entry that
// refuses it), or the agent is disabled or does not allow the task. The
// command takes the agent's command_timeout_s, as a dispatch does.
func (f *Firer) command(ctx context.Context, tx *sqlx.Tx, s *Schedule, at time.Time) (*platform.Command, error) {
	def, ok := tasks.Lookup(s.Task)
	if !ok {
		f.Logger.WarnContext(ctx, "schedule names an unknown task; skipped", "schedule_id", s.ID, "task", s.Task)
		return nil, nil
	}
	agent := &platform.Agent{}
	err := tx.GetContext(ctx, agent, "SELECT id, org_id, owner_id, status, config FROM agents WHERE id = $1", s.AgentID)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil // deleted: its schedules go with it
	}
	if err != nil {
		return nil, err
	}
	skip := func(why string) (*platform.Command, error) {
		f.Logger.WarnContext(ctx, why+"; fire time skipped", "schedule_id", s.ID, "agent_id", s.AgentID, "fire_time", at)
		return nil, nil
	}
	if agent.Status == platform.AgentDisabled {
		return skip("the schedule's agent is disabled")
	}
	if !agent.Allows(s.Task) {
		return skip("the schedule's agent no longer allows its task")
	}
	if f.MayCommand != nil {
		ok, err := f.MayCommand(ctx, s.OwnerID, platform.ResourceRef{Type: platform.AgentScope.Type, ID: agent.ID, OrgID: agent.OrgID, OwnerID: agent.OwnerID})
		if err != nil {
			return nil, err
		}
		if !ok {
			return skip("the schedule's owner may no longer command its agent")
		}
	}
	payload, _ := json.Marshal(map[string]any(s.Payload))
	c := &platform.Command{}
	// Inserts the fire time's command if the owner is still a member; does
	// nothing if this fire time already fired.
	err = tx.GetContext(ctx, c, `WITH done AS (
			INSERT INTO commands (id, org_id, owner_id, agent_id, task, payload, timeout_s, max_retries, schedule_id, fire_time)
			SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
			WHERE EXISTS (SELECT 1 FROM memberships m WHERE m.org_id = $2 AND m.user_id = $3)
			ON CONFLICT DO NOTHING
			RETURNING *),
		ev AS (INSERT INTO command_events (command_id, type, status, data)
			SELECT id, 'queued', status, jsonb_build_object('schedule_id', schedule_id, 'fire_time', fire_time) FROM done)
		SELECT * FROM done`,
		uuid.NewString(), s.OrgID, s.OwnerID, s.AgentID, s.Task, string(payload), agent.CommandTimeoutS(int(def.Timeout().Seconds())), def.MaxRetries(), s.ID, at)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	return c, err
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
