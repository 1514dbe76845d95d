package commands

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/tasks"
)

// stubborn holds test:stubborn's handlers until the tests end.
var stubborn = make(chan struct{})

func init() {
	tasks.Register(tasks.Task[struct{}]{
		Type: "test:panic", MaxRetries: 0,
		Handle: func(context.Context, *tasks.Run, struct{}) (any, error) { panic("kaboom") },
	})
	tasks.Register(tasks.Task[struct{}]{
		Type: "test:stubborn", MaxRetries: 0,
		Handle: func(context.Context, *tasks.Run, struct{}) (any, error) {
			<-stubborn // ignores its context
			return "done", nil
		},
	})
	tasks.Register(tasks.Task[struct{}]{
		Type: "test:nul-result", MaxRetries: 0,
		Handle: func(context.Context, *tasks.Run, struct{}) (any, error) {
			return map[string]string{"body": "a\x00b"}, nil
		},
	})
	tasks.Register(tasks.Task[struct{}]{
		Type: "test:odd-error", MaxRetries: 0,
		Handle: func(context.Context, *tasks.Run, struct{}) (any, error) {
			// A NUL, and a two-byte character across the cut at 4000 bytes.
			return nil, errors.New("nul\x00" + strings.Repeat("x", 3993) + "éé\xff")
		},
	})
}

// newRunner returns a started runner on f's store, stopped when the test ends.
func (f *fixture) newRunner(ctx context.Context, heartbeat time.Duration) (*Runner, *Dispatcher) {
	f.t.Helper()
	d := f.dispatcher()
	r := &Runner{Dispatcher: d, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), WorkerID: "w1",
		Heartbeat: heartbeat, ProgressEvery: 10 * time.Millisecond}
	if err := r.Start(ctx); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(r.Stop)
	return r, d
}

// task is the Asynq task of attempt of a command.
func task(id string, attempt int) *asynq.Task {
	payload, _ := json.Marshal(taskPayload{ID: id, Attempt: attempt})
	return asynq.NewTask(TaskType, payload)
}

// dispatchRaw stores and admits a command of task with payload.
func (f *fixture) dispatchRaw(agent, taskType, payload string, mod func(c *platform.Command)) *platform.Command {
	f.t.Helper()
	c := f.insert(f.org, agent, func(c *platform.Command) {
		c.Task, c.Payload = taskType, json.RawMessage(payload)
		if mod != nil {
			mod(c)
		}
	})
	if got := f.admit(agent); !slices.Contains(got, c.ID) {
		f.t.Fatalf("want %s admitted, got %v", c.ID, got)
	}
	return c
}

// waitStatus polls until the command has status.
func (f *fixture) waitStatus(id, status string, within time.Duration) *platform.Command {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		c := f.get(id)
		if c.Status == status {
			return c
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("command %s: want %s within %s, got %s", id, status, within, c.Status)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRunnerOutcomes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, task, payload string
		timeoutS, retries   int
		wantStatus          string
		wantEvent           string
		wantError           string
		wantResult          string // the result's message
		wantRetryEnqueued   bool
	}{
		{name: "succeeded with its result", task: "agent:echo", payload: `{"message":"hi"}`, retries: 1,
			wantStatus: "succeeded", wantEvent: "succeeded", wantResult: "hi"},
		{name: "a failure with retries left is retried", task: "agent:echo", payload: `{"fail":"boom"}`, retries: 1,
			wantStatus: "queued", wantEvent: "retrying", wantError: "boom", wantRetryEnqueued: true},
		{name: "a failure out of retries fails", task: "agent:echo", payload: `{"fail":"boom"}`, retries: 0,
			wantStatus: "failed", wantEvent: "failed", wantError: "boom"},
		{name: "a bad payload fails without retries", task: "agent:echo", payload: `{"nope":1}`, retries: 3,
			wantStatus: "failed", wantEvent: "failed", wantError: "bad payload"},
		{name: "a timeout is retried", task: "agent:sleep", payload: `{"milliseconds":5000}`, timeoutS: 1, retries: 1,
			wantStatus: "queued", wantEvent: "retrying", wantError: "timed out after 1s", wantRetryEnqueued: true},
		{name: "a panic fails the attempt", task: "test:panic", payload: `{}`, retries: 0,
			wantStatus: "failed", wantEvent: "failed", wantError: "the task panicked: kaboom"},
		{name: "an unknown task fails", task: "test:unknown", payload: `{}`, retries: 3,
			wantStatus: "failed", wantEvent: "failed", wantError: "no task"},
		{name: "a result the database cannot hold fails, saying why", task: "test:nul-result", payload: `{}`,
			wantStatus: "failed", wantEvent: "failed", wantError: "NUL character"},
		{name: "an error of any bytes is stored, cut on a character", task: "test:odd-error", payload: `{}`,
			wantStatus: "failed", wantEvent: "failed", wantError: "nulxxx"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, Limits{100, 100})
			r, d := f.newRunner(context.Background(), time.Second)
			agent := f.newAgent(f.org, nil)
			c := f.dispatchRaw(agent, tc.task, tc.payload, func(c *platform.Command) {
				c.MaxRetries = tc.retries
				if tc.timeoutS > 0 {
					c.TimeoutS = tc.timeoutS
				}
			})
			if err := r.ProcessTask(context.Background(), task(c.ID, 1)); err != nil {
				t.Fatalf("ProcessTask: %v", err)
			}
			got := f.get(c.ID)
			if got.Status != tc.wantStatus || got.Attempt != 1 {
				t.Fatalf("want %s at attempt 1, got %s at %d (error %v)", tc.wantStatus, got.Status, got.Attempt, got.Error)
			}
			if tc.wantError != "" && (got.Error == nil || !strings.Contains(*got.Error, tc.wantError)) {
				t.Fatalf("error: want %q in it, got %v", tc.wantError, got.Error)
			}
			if tc.wantResult != "" {
				var res tasks.EchoResult
				if got.Result == nil || json.Unmarshal(*got.Result, &res) != nil || res.Message != tc.wantResult || res.Attempt != 1 || res.Agent != agent {
					t.Fatalf("result: want message %q of attempt 1 by the agent, got %s", tc.wantResult, *got.Result)
				}
			}
			if types := f.eventTypes(c.ID); types[len(types)-1] != tc.wantEvent {
				t.Fatalf("events: want the last %s, got %v", tc.wantEvent, types)
			}
			exists := redisHas(t, f, d, c.ID, 2)
			if exists != tc.wantRetryEnqueued {
				t.Fatalf("attempt 2 in the queue: want %v, got %v", tc.wantRetryEnqueued, exists)
			}
			if tc.wantRetryEnqueued && (got.NotBefore == nil || time.Until(*got.NotBefore) <= 0) {
				t.Fatalf("a retry waits its backoff: not_before %v", got.NotBefore)
			}
		})
	}
}

// redisHas reports whether attempt of command id is in the queue.
func redisHas(t *testing.T, f *fixture, d *Dispatcher, id string, attempt int) bool {
	t.Helper()
	n, err := f.rdb.Exists(context.Background(), d.Queue.TaskKey(id, attempt)).Result()
	if err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// Cancelling a running command stops its handler at once, and it ends
// canceled, never retried.
func TestRunnerCancel(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, d := f.newRunner(context.Background(), time.Second)
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "agent:sleep", `{"milliseconds":30000}`, func(c *platform.Command) { c.MaxRetries = 3 })
	done := make(chan error, 1)
	go func() { done <- r.ProcessTask(context.Background(), task(c.ID, 1)) }()
	running := f.waitStatus(c.ID, "running", 5*time.Second)
	start := time.Now()
	if _, err := d.Cancel(context.Background(), running); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler did not stop within 5s of the cancellation")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("cancellation took %s; want it heard at once (pub/sub)", took)
	}
	got := f.get(c.ID)
	if got.Status != platform.CommandCanceled || got.Failures != 0 || redisHas(t, f, d, c.ID, 2) {
		t.Fatalf("want canceled, no failure, no retry; got %s, %d failures", got.Status, got.Failures)
	}
}

// A worker told to shut down keeps renewing the leases of the commands it
// drains: the reconciler must not take them from it.
func TestRunnerHeartbeatOutlivesShutdownSignal(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	ctx, sigterm := context.WithCancel(context.Background())
	r, _ := f.newRunner(ctx, 50*time.Millisecond)
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "agent:sleep", `{"milliseconds":1000}`, nil)
	done := make(chan error, 1)
	go func() { done <- r.ProcessTask(context.Background(), task(c.ID, 1)) }()
	f.waitStatus(c.ID, "running", 5*time.Second)
	sigterm()
	// Three leases (150ms each) pass while the command drains.
	deadline := time.Now().Add(600 * time.Millisecond)
	for time.Now().Before(deadline) {
		expired, err := f.store.ExpireLeases(context.Background(), 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(expired) > 0 {
			t.Fatalf("the lease of a draining command expired: %s", expired[0].Status)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := f.get(c.ID); got.Status != platform.CommandSucceeded || got.Attempt != 1 {
		t.Fatalf("want succeeded at attempt 1, got %s at %d", got.Status, got.Attempt)
	}
}

// At shutdown a command that did not finish in time is handed back untried:
// no failure is counted and its next attempt is queued.
func TestRunnerHandBack(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, d := f.newRunner(context.Background(), time.Second)
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "agent:sleep", `{"milliseconds":30000}`, nil)
	ctx, abort := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.ProcessTask(ctx, task(c.ID, 1)) }()
	f.waitStatus(c.ID, "running", 5*time.Second)
	abort() // what Asynq does to handlers still running at the shutdown timeout
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := f.get(c.ID)
	if got.Status != platform.CommandQueued || got.Failures != 0 || got.Attempt != 1 || got.NotBefore != nil {
		t.Fatalf("want queued untried (no failure, no backoff), got %s, %d failures, attempt %d", got.Status, got.Failures, got.Attempt)
	}
	if !redisHas(t, f, d, c.ID, 2) {
		t.Fatal("want attempt 2 queued")
	}
	if types := f.eventTypes(c.ID); types[len(types)-1] != "requeued" {
		t.Fatalf("want the last event requeued, got %v", types)
	}
}

// Progress reports are written as events, in order, while the command runs.
func TestRunnerProgress(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, _ := f.newRunner(context.Background(), time.Second)
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "agent:sleep", `{"milliseconds":300,"steps":5}`, nil)
	if err := r.ProcessTask(context.Background(), task(c.ID, 1)); err != nil {
		t.Fatal(err)
	}
	evs, err := f.store.Events(context.Background(), c.ID, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	last := -1
	progress := 0
	for _, e := range evs {
		if e.Type != "progress" {
			continue
		}
		progress++
		if e.Progress < last {
			t.Fatalf("progress went back: %d after %d", e.Progress, last)
		}
		last = e.Progress
	}
	if progress < 2 {
		t.Fatalf("want several progress events, got %d", progress)
	}
	// The last report is written with the outcome, not on its own.
	final := evs[len(evs)-1]
	if final.Type != "succeeded" || final.Progress != 100 {
		t.Fatalf("want the last event succeeded at 100%%, got %s at %d", final.Type, final.Progress)
	}
	if got := f.get(c.ID); got.Message != "step 5 of 5" || got.Progress != 100 {
		t.Fatalf("want the last report kept (step 5 of 5, 100%%), got %q at %d", got.Message, got.Progress)
	}
}

func init() {
	tasks.Register(tasks.Task[struct{}]{
		Type: "test:log", MaxRetries: 0,
		Handle: func(_ context.Context, run *tasks.Run, _ struct{}) (any, error) {
			run.Progress.Report(40, "logging")
			run.Progress.Log("one")
			run.Progress.Log("two")
			return nil, errors.New("gave up")
		},
	})
}

// Log lines still pending when the handler returns are written before the
// outcome, and a failure keeps the last progress reported.
func TestRunnerLogLinesAtTheEnd(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, _ := f.newRunner(context.Background(), time.Second)
	r.ProgressEvery = time.Hour
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "test:log", `{}`, func(c *platform.Command) { c.MaxRetries = 0 })
	if err := r.ProcessTask(context.Background(), task(c.ID, 1)); err != nil {
		t.Fatal(err)
	}
	evs, err := f.store.Events(context.Background(), c.ID, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	types := make([]string, len(evs))
	for i, e := range evs {
		types[i] = e.Type
	}
	if want := []string{"queued", "running", "log", "failed"}; !slices.Equal(types, want) {
		t.Fatalf("events: want %v, got %v", want, types)
	}
	if data := evs[2].Data; data == nil || !strings.Contains(string(*data), "two") {
		t.Fatalf("the log event: want its lines, got %v", data)
	}
	if got := f.get(c.ID); got.Progress != 40 || got.Message != "logging" {
		t.Fatalf("want the last progress kept on failure (40, logging), got %d %q", got.Progress, got.Message)
	}
}

// A task of a stale attempt, or of a command that ended, does nothing.
func TestRunnerStaleTask(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, _ := f.newRunner(context.Background(), time.Second)
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "agent:echo", `{"message":"x"}`, nil)
	if err := r.ProcessTask(context.Background(), task(c.ID, 1)); err != nil {
		t.Fatal(err)
	}
	before := f.eventTypes(c.ID)
	if err := r.ProcessTask(context.Background(), task(c.ID, 1)); err != nil {
		t.Fatal(err)
	}
	if after := f.eventTypes(c.ID); !slices.Equal(before, after) {
		t.Fatalf("a second delivery changed the command: %v → %v", before, after)
	}
	err := r.ProcessTask(context.Background(), asynq.NewTask(TaskType, []byte("nonsense")))
	if !errors.Is(err, asynq.SkipRetry) {
		t.Fatalf("a malformed task: want SkipRetry, got %v", err)
	}
}

// A worker admits what waited for the slot it freed: the agent's, the
// organization's in flight, the organization's queue.
func TestRunnerAdmitsWhatWaited(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name      string
		limits    Limits
		sameAgent bool // both commands of one agent (else of two)
		max       int  // the agents' max_concurrency
		duringRun bool // the second command is admitted while the first runs (a queue slot)
	}{
		{name: "the agent's slot", limits: Limits{100, 100}, sameAgent: true, max: 1},
		{name: "the organization's in-flight slot", limits: Limits{OrgMaxInFlight: 1, OrgMaxQueued: 100}, max: 5},
		{name: "the organization's queue slot", limits: Limits{OrgMaxInFlight: 100, OrgMaxQueued: 1}, max: 5, duringRun: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, tc.limits)
			r, d := f.newRunner(context.Background(), time.Second)
			first := f.newAgent(f.org, map[string]any{"max_concurrency": tc.max})
			second := first
			if !tc.sameAgent {
				second = f.newAgent(f.org, map[string]any{"max_concurrency": tc.max})
			}
			a := f.insert(f.org, first, func(c *platform.Command) { c.Task, c.Payload = "agent:sleep", json.RawMessage(`{"milliseconds":300}`) })
			b := f.insert(f.org, second, nil)
			if got := f.admit(first); len(got) != 1 || got[0] != a.ID {
				t.Fatalf("want only the first admitted, got %v", got)
			}
			if got := f.admit(second); len(got) != 0 {
				t.Fatalf("want the second held back by the limits, got %v", got)
			}
			done := make(chan error, 1)
			go func() { done <- r.ProcessTask(context.Background(), task(a.ID, 1)) }()
			if tc.duringRun {
				f.waitStatus(a.ID, "running", 5*time.Second)
				deadline := time.Now().Add(5 * time.Second)
				for f.get(b.ID).AdmittedAt == nil {
					if time.Now().After(deadline) {
						t.Fatal("a queue slot freed by the start: the waiting command was not admitted")
					}
					time.Sleep(10 * time.Millisecond)
				}
				if s := f.get(a.ID).Status; s != "running" {
					t.Fatalf("want it admitted while the first ran, the first is %s", s)
				}
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			r.Stop() // the start's admission runs in the background
			if f.get(b.ID).AdmittedAt == nil || !redisHas(t, f, d, b.ID, 1) {
				t.Fatal("want the second command admitted and queued once the first ended")
			}
		})
	}
}

// A worker whose lease on an attempt lapsed, and which another worker now
// runs, stops its handler at its next heartbeat: the command never runs
// twice at once.
func TestRunnerStopsAnAttemptItLost(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, _ := f.newRunner(context.Background(), 100*time.Millisecond)
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "agent:sleep", `{"milliseconds":20000}`, nil)
	done := make(chan error, 1)
	go func() { done <- r.ProcessTask(context.Background(), task(c.ID, 1)) }()
	f.waitStatus(c.ID, "running", 5*time.Second)
	// As the reconciler and another worker would leave it.
	f.exec(`UPDATE commands SET attempt = 2, worker_id = 'w2' WHERE id = $1`, c.ID)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ProcessTask: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler of a lost attempt still runs")
	}
	if got := f.get(c.ID); got.Status != "running" || got.Attempt != 2 || got.WorkerID == nil || *got.WorkerID != "w2" {
		t.Fatalf("the stale worker's outcome changed the command: %s attempt %d", got.Status, got.Attempt)
	}
}

// A handler that ignores its context does not keep its command running: a
// cancel ends it canceled once the handler's grace is over.
func TestRunnerGivesUpOnAHandlerThatIgnoresCancel(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	r, d := f.newRunner(context.Background(), time.Second)
	r.HandlerGrace = 200 * time.Millisecond
	t.Cleanup(func() { close(stubborn) }) // the abandoned handler ends with the test
	agent := f.newAgent(f.org, nil)
	c := f.dispatchRaw(agent, "test:stubborn", `{}`, nil)
	done := make(chan error, 1)
	go func() { done <- r.ProcessTask(context.Background(), task(c.ID, 1)) }()
	running := f.waitStatus(c.ID, "running", 5*time.Second)
	if _, err := d.Cancel(context.Background(), running); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ProcessTask: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the command still runs with its stubborn handler")
	}
	if got := f.get(c.ID); got.Status != "canceled" {
		t.Fatalf("want canceled, got %s", got.Status)
	}
	if s := f.agentStatus(agent); s == "busy" {
		t.Fatalf("the agent stays busy")
	}
}
