package commands

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/platform"
)

func (f *fixture) reconciler(d *Dispatcher) *Reconciler {
	return &Reconciler{Dispatcher: d, Redis: f.rdb, Inspector: asynq.NewInspectorFromRedisClient(f.rdb),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Interval: time.Second, Retention: time.Hour}
}

// taskState is the Asynq state of attempt of command id, "" if Redis does
// not hold it.
func (f *fixture) taskState(d *Dispatcher, id string, attempt int) string {
	f.t.Helper()
	s, err := f.rdb.HGet(context.Background(), d.Queue.TaskKey(id, attempt), "state").Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		f.t.Fatal(err)
	}
	return s
}

func TestReconcilerRequeuesWhatRedisLost(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	rec := f.reconciler(d)
	ctx := context.Background()
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 3})
	lost := f.insert(f.org, agent, nil)
	archived := f.insert(f.org, agent, nil)
	fresh := f.insert(f.org, agent, nil)
	if n := d.Admit(ctx, agent); n != 3 {
		t.Fatalf("want 3 admitted, got %d", n)
	}
	for _, c := range []*platform.Command{lost, archived, fresh} {
		if s := f.taskState(d, c.ID, 1); s != "pending" {
			t.Fatalf("after admission: want the task pending, got %q", s)
		}
	}
	// Redis loses one task, and one died in the archive; the third was
	// admitted too recently to judge.
	f.rdb.Del(ctx, d.Queue.TaskKey(lost.ID, 1))
	if err := rec.Inspector.ArchiveTask(d.Queue.Name(), TaskID(archived.ID, 1)); err != nil {
		t.Fatal(err)
	}
	if s := f.taskState(d, archived.ID, 1); s != "archived" {
		t.Fatalf("want the task archived, got %q", s)
	}
	f.rdb.Del(ctx, d.Queue.TaskKey(fresh.ID, 1))
	f.exec(`UPDATE commands SET admitted_at = now() - interval '1 minute' WHERE id IN ($1, $2)`, lost.ID, archived.ID)

	rep, err := rec.Pass(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Requeued != 2 {
		t.Fatalf("want 2 re-enqueued, got %d", rep.Requeued)
	}
	for _, c := range []*platform.Command{lost, archived} {
		if s := f.taskState(d, c.ID, 1); s != "pending" {
			t.Fatalf("want the task pending again, got %q", s)
		}
	}
	if s := f.taskState(d, fresh.ID, 1); s != "" {
		t.Fatalf("a command admitted just now: want it left alone, got %q", s)
	}
	// A second pass finds nothing to do.
	if rep, err := rec.Pass(ctx); err != nil || rep.Requeued != 0 {
		t.Fatalf("second pass: want nothing re-enqueued, got %d (%v)", rep.Requeued, err)
	}
}

func TestReconcilerExpiresLeasesAndAdmits(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	rec := f.reconciler(d)
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	dead := f.insert(f.org, agent, func(c *platform.Command) { c.MaxRetries = 0 })
	next := f.insert(f.org, agent, nil)
	f.exec(`UPDATE commands SET created_at = now() - interval '1 minute' WHERE id = $1`, dead.ID)
	if got := f.admit(agent); len(got) != 1 || got[0] != dead.ID {
		t.Fatalf("want the oldest admitted, got %v", got)
	}
	f.claim(dead.ID, 1)
	f.exec(`UPDATE commands SET lease_until = now() - interval '1 second' WHERE id = $1`, dead.ID)

	rep, err := rec.Pass(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.LeasesExpired != 1 {
		t.Fatalf("want 1 lease expired, got %d", rep.LeasesExpired)
	}
	if s := f.get(dead.ID).Status; s != platform.CommandFailed {
		t.Fatalf("out of retries: want failed, got %s", s)
	}
	// The agent's slot freed: its next command is admitted and queued.
	if got := f.get(next.ID); got.AdmittedAt == nil || f.taskState(d, next.ID, 1) != "pending" {
		t.Fatalf("want the next command admitted and queued, got admitted %v", got.AdmittedAt)
	}
}

func TestReconcilerStartStop(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	rec := f.reconciler(f.dispatcher())
	rec.Interval = 10 * time.Millisecond
	if err := rec.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	rec.Stop()
	rec.Stop() // idempotent
}

func TestDispatcherCancelAndRetry(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	first := f.insert(f.org, agent, nil)
	second := f.insert(f.org, agent, nil)
	d.Admit(ctx, agent)

	// Cancelling the admitted command frees the agent for the next.
	canceled, err := d.Cancel(ctx, f.get(first.ID))
	if err != nil || canceled.Status != platform.CommandCanceled {
		t.Fatalf("cancel: want canceled, got %v (%v)", canceled, err)
	}
	if f.get(second.ID).AdmittedAt == nil {
		t.Fatal("want the next command admitted after a cancellation")
	}
	if _, err := d.Cancel(ctx, f.get(first.ID)); platform.ErrorCode(err) != platform.ECONFLICT {
		t.Fatalf("cancelling a canceled command: want ECONFLICT, got %v", err)
	}
	if _, err := d.Retry(ctx, f.get(first.ID)); platform.ErrorCode(err) != platform.ECONFLICT {
		t.Fatalf("retrying a canceled command: want ECONFLICT, got %v", err)
	}

	f.claim(second.ID, 1)
	f.finish(second.ID, 1, failure("boom"))
	retried, err := d.Retry(ctx, f.get(second.ID))
	if err != nil || retried.Status != platform.CommandQueued {
		t.Fatalf("retry: %v (%v)", retried, err)
	}
	if s := f.taskState(d, second.ID, 2); s != "pending" {
		t.Fatalf("a retried command is admitted and queued for its next attempt: got %q", s)
	}
}

func TestQueueEnqueueIsIdempotent(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	ctx := context.Background()
	id := "00000000-0000-4000-8000-000000000000"
	for range 2 {
		if err := d.Queue.Enqueue(ctx, id, 1, time.Second, 0); err != nil {
			t.Fatalf("enqueue: %v", err)
		}
	}
	if err := d.Queue.Enqueue(ctx, id, 2, time.Second, time.Minute); err != nil {
		t.Fatal(err)
	}
	if s := f.taskState(d, id, 2); s != "scheduled" {
		t.Fatalf("a delayed attempt: want scheduled, got %q", s)
	}
	cmd, attempt, ok := ParseTaskID(TaskID(id, 7))
	if !ok || cmd != id || attempt != 7 {
		t.Fatalf("ParseTaskID: got %s %d %v", cmd, attempt, ok)
	}
	if _, _, ok := ParseTaskID("no-attempt"); ok {
		t.Fatal("ParseTaskID accepted an id without attempt")
	}
}

// A task a worker dequeued and died with before it claimed the attempt is
// taken back once the worker's Asynq lease lapses; one whose worker still
// renews its lease is left alone.
func TestReconcilerTakesBackTasksOfDeadWorkers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	rec := f.reconciler(d)
	ctx := context.Background()
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 2})
	dead := f.insert(f.org, agent, nil)
	alive := f.insert(f.org, agent, nil)
	if n := d.Admit(ctx, agent); n != 2 {
		t.Fatalf("want 2 admitted, got %d", n)
	}
	base := "asynq:{" + d.Queue.Name() + "}:"
	// What Asynq's dequeue does: pending → active, with a lease.
	for c, lease := range map[string]int64{dead.ID: time.Now().Add(-time.Minute).Unix(), alive.ID: time.Now().Add(time.Minute).Unix()} {
		id := TaskID(c, 1)
		f.rdb.LRem(ctx, base+"pending", 0, id)
		f.rdb.LPush(ctx, base+"active", id)
		f.rdb.HSet(ctx, base+"t:"+id, "state", "active")
		f.rdb.ZAdd(ctx, base+"lease", redis.Z{Score: float64(lease), Member: id})
	}
	f.exec(`UPDATE commands SET admitted_at = now() - interval '1 minute' WHERE agent_id = $1`, agent)
	rep, err := rec.Pass(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Requeued != 1 {
		t.Fatalf("want 1 re-enqueued, got %d", rep.Requeued)
	}
	if s := f.taskState(d, dead.ID, 1); s != "pending" {
		t.Fatalf("the dead worker's task: want pending again, got %q", s)
	}
	if s := f.taskState(d, alive.ID, 1); s != "active" {
		t.Fatalf("a live worker's task: want left active, got %q", s)
	}
	if n, _ := f.rdb.LLen(ctx, base+"active").Result(); n != 1 {
		t.Fatalf("want one task left active, got %d", n)
	}
}

// cancelOnDispatch cancels the dispatch's context once the command is
// stored: the caller hung up.
type cancelOnDispatch struct{ cancel context.CancelFunc }

func (m cancelOnDispatch) Dispatched(string)                      { m.cancel() }
func (m cancelOnDispatch) Started(string, time.Duration)          {}
func (m cancelOnDispatch) Finished(string, string, time.Duration) {}
func (m cancelOnDispatch) Retried(string)                         {}
func (m cancelOnDispatch) Ended(string, string)                   {}

// A caller that hangs up once its command is stored does not leave it
// waiting for the reconciler: it is admitted and queued all the same.
func TestDispatchAdmitsAfterTheCallerLeft(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	ctx, cancel := context.WithCancel(context.Background())
	d.Metrics = cancelOnDispatch{cancel}
	agent := &platform.Agent{Base: platform.Base{ID: f.newAgent(f.org, nil), OrgID: f.org}, Status: "idle", Config: platform.JSONObject{}}
	c, created, err := d.Dispatch(ctx, &platform.Principal{ID: f.user}, agent, DispatchRequest{Task: "agent:echo", Payload: []byte(`{"message":"x"}`)}, "")
	if err != nil || !created {
		t.Fatalf("dispatch: %v (created %v)", err, created)
	}
	if ctx.Err() == nil {
		t.Fatal("the test's caller did not hang up")
	}
	if f.get(c.ID).AdmittedAt == nil || f.taskState(d, c.ID, 1) != "pending" {
		t.Fatal("want the command admitted and queued though its caller left")
	}
}

// A status a crash left wrong is put right, and the cached copy of the
// agent is told (it would show the wrong status until it expired).
func TestReconcilerFixesAgentStatuses(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	d := f.dispatcher()
	var told []string
	d.AgentChanged = func(_ context.Context, id string) { told = append(told, id) }
	rec := f.reconciler(d)
	stuck, fine := f.newAgent(f.org, nil), f.newAgent(f.org, nil)
	f.exec(`UPDATE agents SET status = 'busy' WHERE id = $1`, stuck)
	if _, err := rec.Pass(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := f.agentStatus(stuck); got != "idle" {
		t.Fatalf("an agent busy with nothing running: want idle, got %s", got)
	}
	if f.agentStatus(fine) != "idle" || len(told) != 1 || told[0] != stuck {
		t.Fatalf("want only the fixed agent told, got %v", told)
	}
}
