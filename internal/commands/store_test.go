package commands

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/platform"
)

func TestAdmitLimits(t *testing.T) {
	t.Parallel()
	type agentSpec struct {
		config   map[string]any
		commands int
	}
	cases := []struct {
		name     string
		limits   Limits
		orgLimit *int // the organization's own org_max_in_flight
		agents   []agentSpec
		disabled bool // the first agent is disabled
		// want is how many of each agent's commands are admitted, admitting
		// the agents in order.
		want []int
	}{
		{name: "max_concurrency defaults to 1", limits: Limits{100, 100},
			agents: []agentSpec{{nil, 3}}, want: []int{1}},
		{name: "max_concurrency 3", limits: Limits{100, 100},
			agents: []agentSpec{{map[string]any{"max_concurrency": 3}, 5}}, want: []int{3}},
		{name: "max_concurrency below 1 counts as 1", limits: Limits{100, 100},
			agents: []agentSpec{{map[string]any{"max_concurrency": 0}, 5}}, want: []int{1}},
		{name: "org_max_in_flight caps agents together", limits: Limits{OrgMaxInFlight: 4, OrgMaxQueued: 100},
			agents: []agentSpec{{map[string]any{"max_concurrency": 3}, 3}, {map[string]any{"max_concurrency": 3}, 3}}, want: []int{3, 1}},
		{name: "the organization's own in-flight limit overrides the default", limits: Limits{OrgMaxInFlight: 100, OrgMaxQueued: 100}, orgLimit: ptr(2),
			agents: []agentSpec{{map[string]any{"max_concurrency": 10}, 5}}, want: []int{2}},
		{name: "org_max_queued caps commands waiting in the queue", limits: Limits{OrgMaxInFlight: 100, OrgMaxQueued: 2},
			agents: []agentSpec{{map[string]any{"max_concurrency": 10}, 5}, {map[string]any{"max_concurrency": 10}, 5}}, want: []int{2, 0}},
		{name: "a disabled agent admits nothing", limits: Limits{100, 100}, disabled: true,
			agents: []agentSpec{{map[string]any{"max_concurrency": 10}, 5}}, want: []int{0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, tc.limits)
			if tc.orgLimit != nil {
				f.exec(`UPDATE organizations SET org_max_in_flight = $2 WHERE id = $1`, f.org, *tc.orgLimit)
			}
			var agents []string
			for _, a := range tc.agents {
				id := f.newAgent(f.org, a.config)
				agents = append(agents, id)
				for range a.commands {
					f.insert(f.org, id, nil)
				}
			}
			if tc.disabled {
				f.exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, agents[0])
			}
			for i, id := range agents {
				if got := len(f.admit(id)); got != tc.want[i] {
					t.Errorf("agent %d: want %d admitted, got %d", i, tc.want[i], got)
				}
				// Admitting again admits nothing more: the limits are full.
				if got := len(f.admit(id)); got != 0 {
					t.Errorf("agent %d admitted again: want 0, got %d", i, got)
				}
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// A queued slot frees when a command starts; an in-flight slot when it ends.
func TestAdmitFreesSlots(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 3, OrgMaxQueued: 2})
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 10})
	for range 6 {
		f.insert(f.org, agent, nil)
	}
	first := f.admit(agent)
	if len(first) != 2 {
		t.Fatalf("want 2 admitted (org_max_queued), got %d", len(first))
	}
	f.claim(first[0], 1)
	if got := f.admit(agent); len(got) != 1 {
		t.Fatalf("after a start: want 1 more admitted (org_max_in_flight 3), got %d", len(got))
	}
	if got := f.admit(agent); len(got) != 0 {
		t.Fatalf("at org_max_in_flight: want none admitted, got %d", len(got))
	}
	f.finish(first[0], 1, succeeded)
	if got := f.admit(agent); len(got) != 0 {
		t.Fatalf("2 still queued: want none admitted (org_max_queued), got %d", len(got))
	}
	f.claim(first[1], 1)
	if got := f.admit(agent); len(got) != 1 {
		t.Fatalf("after a finish and a start: want 1 admitted, got %d", len(got))
	}
}

func TestAdmitOrder(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	// Created in this order, oldest first; priority decides before age.
	specs := []struct {
		name     string
		priority int
	}{{"old-low", 0}, {"old-high", 5}, {"new-low", 0}, {"new-high", 5}, {"urgent", 9}, {"negative", -1}}
	byID := map[string]string{}
	for i, s := range specs {
		c := f.insert(f.org, agent, func(c *platform.Command) { c.Priority = s.priority })
		f.exec(`UPDATE commands SET created_at = now() - $2 * interval '1 second' WHERE id = $1`, c.ID, 100-i)
		byID[c.ID] = s.name
	}
	var got []string
	for range specs {
		ids := f.admit(agent)
		if len(ids) != 1 {
			t.Fatalf("want one admitted at a time (max_concurrency 1), got %d", len(ids))
		}
		got = append(got, byID[ids[0]])
		f.claim(ids[0], 1)
		f.finish(ids[0], 1, succeeded)
	}
	want := []string{"urgent", "old-high", "new-high", "old-low", "new-low", "negative"}
	if !slices.Equal(got, want) {
		t.Fatalf("admission order:\nwant %v\n got %v", want, got)
	}
}

// Concurrent admissions of one organization's agents never exceed its limits.
func TestAdmitConcurrentRespectsLimits(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 5, OrgMaxQueued: 100})
	var agents []string
	for range 4 {
		a := f.newAgent(f.org, map[string]any{"max_concurrency": 4})
		agents = append(agents, a)
		for range 4 {
			f.insert(f.org, a, nil)
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for range 3 {
		for _, a := range agents {
			wg.Go(func() {
				got, err := f.store.AdmitAgent(context.Background(), a)
				if err != nil {
					t.Error(err)
				}
				mu.Lock()
				total += len(got)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if total != 5 {
		t.Fatalf("want 5 admitted in all (org_max_in_flight), got %d", total)
	}
}

func TestClaimFencing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 5})
	ctx := context.Background()
	refused := func(what, id string, attempt int) {
		t.Helper()
		c, err := f.store.Claim(ctx, id, attempt, "w2", time.Minute)
		if err != nil || c != nil {
			t.Fatalf("%s: want nothing to claim, got %v, err %v", what, c, err)
		}
	}

	waiting := f.insert(f.org, agent, nil)
	refused("a command not admitted", waiting.ID, 1)

	c := f.insert(f.org, agent, nil)
	f.admit(agent)
	refused("a future attempt", c.ID, 2)
	claimed := f.claim(c.ID, 1)
	if claimed.Status != platform.CommandRunning || claimed.Attempt != 1 || claimed.WorkerID == nil || *claimed.WorkerID != "w1" {
		t.Fatalf("claimed: want running attempt 1 on w1, got %s attempt %d worker %v", claimed.Status, claimed.Attempt, claimed.WorkerID)
	}
	if claimed.AgentConfig["max_concurrency"] != float64(5) {
		t.Fatalf("claimed: want the agent's config, got %v", claimed.AgentConfig)
	}
	refused("a second claim of the same attempt", c.ID, 1)

	// A retry: attempt 1's task delivered again is stale; attempt 2 runs.
	at := time.Now().Add(time.Second)
	f.finish(c.ID, 1, Outcome{Status: platform.CommandQueued, Event: "retrying", Failed: true, NotBefore: &at, Error: ptr("boom")})
	refused("a stale attempt", c.ID, 1)
	f.claim(c.ID, 2)
	f.finish(c.ID, 2, succeeded)
	refused("a finished command", c.ID, 3)

	canceled := f.insert(f.org, agent, nil)
	f.admit(agent)
	if _, err := f.store.Cancel(ctx, canceled.ID); err != nil {
		t.Fatal(err)
	}
	refused("a canceled command", canceled.ID, 1)

	if got, want := f.eventTypes(c.ID), []string{"queued", "running", "retrying", "running", "succeeded"}; !slices.Equal(got, want) {
		t.Fatalf("events: want %v, got %v", want, got)
	}
}

// Many deliveries of one task at once: exactly one claims the attempt.
func TestClaimConcurrent(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	c := f.insert(f.org, agent, nil)
	f.admit(agent)
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	for range 8 {
		wg.Go(func() {
			got, err := f.store.Claim(context.Background(), c.ID, 1, "w", time.Minute)
			if err != nil {
				t.Error(err)
			}
			if got != nil {
				mu.Lock()
				won++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if won != 1 {
		t.Fatalf("want exactly one claim, got %d", won)
	}
	var running int
	if err := f.db.Get(&running, `SELECT count(*) FROM command_events WHERE command_id = $1 AND type = 'running'`, c.ID); err != nil || running != 1 {
		t.Fatalf("want one running event, got %d (%v)", running, err)
	}
}

func TestFinishFencing(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	ctx := context.Background()
	c := f.insert(f.org, agent, func(c *platform.Command) { c.MaxRetries = 3 })
	f.admit(agent)
	f.claim(c.ID, 1)

	// The worker of attempt 1 stops renewing; its lease expires and the
	// command goes back to the queue.
	f.exec(`UPDATE commands SET lease_until = now() - interval '1 second' WHERE id = $1`, c.ID)
	if _, err := f.store.ExpireLeases(ctx, 100); err != nil {
		t.Fatal(err)
	}
	if got, err := f.store.Finish(ctx, c.ID, 1, succeeded); err != nil || got != nil {
		t.Fatalf("a stale worker's outcome after its lease expired: want refused, got %v, err %v", got, err)
	}
	f.claim(c.ID, 2)
	if got, err := f.store.Finish(ctx, c.ID, 1, succeeded); err != nil || got != nil {
		t.Fatalf("a stale worker's outcome while attempt 2 runs: want refused, got %v, err %v", got, err)
	}
	if ok, err := f.store.Progress(ctx, c.ID, 1, 50, "stale", nil); err != nil || ok {
		t.Fatalf("a stale worker's progress: want refused, got %v, err %v", ok, err)
	}
	// The holder's progress is a change: the version (the ETag) moves.
	before := f.get(c.ID).Version
	if ok, err := f.store.Progress(ctx, c.ID, 2, 50, "half", nil); err != nil || !ok {
		t.Fatalf("the holder's progress: want recorded, got %v, err %v", ok, err)
	}
	if after := f.get(c.ID).Version; after != before+1 {
		t.Fatalf("progress: version %d, then %d; want it bumped", before, after)
	}
	done := f.finish(c.ID, 2, succeeded)
	if done.Status != platform.CommandSucceeded || done.Attempt != 2 || done.Failures != 1 || done.Progress != 100 || done.FinishedAt == nil {
		t.Fatalf("want succeeded at attempt 2 after 1 failure, got %s attempt %d failures %d progress %d", done.Status, done.Attempt, done.Failures, done.Progress)
	}
	if got, err := f.store.Finish(ctx, c.ID, 2, succeeded); err != nil || got != nil {
		t.Fatalf("a second outcome of the same attempt: want refused, got %v, err %v", got, err)
	}
}

func TestExpireLeases(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name         string
		maxRetries   int
		cancel       bool
		wantStatus   string
		wantEvent    string
		wantAgent    string
		wantFinished bool
	}{
		{name: "re-queued while retries remain", maxRetries: 1, wantStatus: platform.CommandQueued, wantEvent: "retrying", wantAgent: "idle"},
		{name: "failed when out of retries", maxRetries: 0, wantStatus: platform.CommandFailed, wantEvent: "failed", wantAgent: "error", wantFinished: true},
		{name: "canceled when its cancellation was asked", maxRetries: 3, cancel: true, wantStatus: platform.CommandCanceled, wantEvent: "canceled", wantAgent: "idle", wantFinished: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, Limits{100, 100})
			ctx := context.Background()
			agent := f.newAgent(f.org, map[string]any{"max_concurrency": 2})
			c := f.insert(f.org, agent, func(c *platform.Command) { c.MaxRetries = tc.maxRetries })
			alive := f.insert(f.org, f.newAgent(f.org, nil), nil)
			f.admit(agent)
			f.admit(alive.AgentID)
			f.claim(c.ID, 1)
			f.claim(alive.ID, 1)
			if tc.cancel {
				if _, err := f.store.Cancel(ctx, c.ID); err != nil {
					t.Fatal(err)
				}
			}
			f.exec(`UPDATE commands SET lease_until = now() - interval '1 second' WHERE id = $1`, c.ID)
			got, err := f.store.ExpireLeases(ctx, 100)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || got[0].ID != c.ID {
				t.Fatalf("want only the lapsed command expired, got %d", len(got))
			}
			after := f.get(c.ID)
			if after.Status != tc.wantStatus || after.Failures != 1 || after.Attempt != 1 || after.WorkerID != nil {
				t.Fatalf("want %s with 1 failure at attempt 1 and no worker, got %s, %d failures, attempt %d, worker %v",
					tc.wantStatus, after.Status, after.Failures, after.Attempt, after.WorkerID)
			}
			if (after.FinishedAt != nil) != tc.wantFinished {
				t.Fatalf("finished_at: want set %v, got %v", tc.wantFinished, after.FinishedAt)
			}
			if after.Error == nil || !strings.Contains(*after.Error, "was lost") {
				t.Fatalf("want the error to say the worker was lost, got %v", after.Error)
			}
			if types := f.eventTypes(c.ID); types[len(types)-1] != tc.wantEvent {
				t.Fatalf("want last event %s, got %v", tc.wantEvent, types)
			}
			if s := f.agentStatus(agent); s != tc.wantAgent {
				t.Fatalf("agent status: want %s, got %s", tc.wantAgent, s)
			}
			if s := f.get(alive.ID).Status; s != platform.CommandRunning {
				t.Fatalf("a command with a live lease: want running, got %s", s)
			}
		})
	}
}

// Two commands of one agent whose worker died together: the agent is not
// left busy.
func TestExpireLeasesAgentStatus(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 2})
	a := f.insert(f.org, agent, nil)
	b := f.insert(f.org, agent, nil)
	f.admit(agent)
	f.claim(a.ID, 1)
	f.claim(b.ID, 1)
	if s := f.agentStatus(agent); s != "busy" {
		t.Fatalf("running: want busy, got %s", s)
	}
	f.exec(`UPDATE commands SET lease_until = now() - interval '1 second' WHERE agent_id = $1`, agent)
	if got, err := f.store.ExpireLeases(context.Background(), 100); err != nil || len(got) != 2 {
		t.Fatalf("want 2 expired, got %d (%v)", len(got), err)
	}
	if s := f.agentStatus(agent); s != "idle" {
		t.Fatalf("nothing runs: want idle, got %s", s)
	}
}

func TestInsertIdempotency(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	key := func(k string) func(c *platform.Command) {
		return func(c *platform.Command) { c.IdempotencyKey, c.RequestHash = &k, ptr("hash-"+k) }
	}
	first := f.insert(f.org, agent, key("k1"))

	again := &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: f.user},
		AgentID: agent, Task: "agent:echo", Payload: []byte(`{}`), TimeoutS: 1, IdempotencyKey: ptr("k1"), RequestHash: ptr("other")}
	got, created, err := f.store.Insert(ctx, again)
	if err != nil || created || got == nil || got.ID != first.ID || *got.RequestHash != "hash-k1" {
		t.Fatalf("same key: want the first command back, not created; got %v, created %v, err %v", got, created, err)
	}

	otherKey := f.insert(f.org, agent, key("k2"))
	noKey1 := f.insert(f.org, agent, nil)
	noKey2 := f.insert(f.org, agent, nil)
	if otherKey.ID == first.ID || noKey1.ID == noKey2.ID {
		t.Fatal("want distinct commands for another key and for no key")
	}

	// Another caller (owner) has its own keys.
	otherOrg, otherUser := f.newOrg()
	otherAgent := f.newAgent(otherOrg, nil)
	c := &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: otherOrg, OwnerID: otherUser},
		AgentID: otherAgent, Task: "agent:echo", Payload: []byte(`{}`), TimeoutS: 1, IdempotencyKey: ptr("k1")}
	if _, created, err := f.store.Insert(ctx, c); err != nil || !created {
		t.Fatalf("another caller's same key: want created, got %v (%v)", created, err)
	}

	// A key older than a day is released and used again.
	f.exec(`UPDATE commands SET created_at = now() - interval '25 hours' WHERE id = $1`, first.ID)
	fresh := &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: f.user},
		AgentID: agent, Task: "agent:echo", Payload: []byte(`{}`), TimeoutS: 1, IdempotencyKey: ptr("k1")}
	if got, created, err := f.store.Insert(ctx, fresh); err != nil || !created || got.ID != fresh.ID {
		t.Fatalf("expired key: want a new command, got %v, created %v, err %v", got, created, err)
	}
	if f.get(first.ID).IdempotencyKey != nil {
		t.Fatal("the old command should have lost its key")
	}
}

// Concurrent dispatches with one key store one command.
func TestInsertIdempotencyConcurrent(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ids := map[string]int{}
	created := 0
	for range 10 {
		wg.Go(func() {
			c := &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: f.user},
				AgentID: agent, Task: "agent:echo", Payload: []byte(`{}`), TimeoutS: 1, IdempotencyKey: ptr("same")}
			got, ok, err := f.store.Insert(context.Background(), c)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			ids[got.ID]++
			if ok {
				created++
			}
		})
	}
	wg.Wait()
	if created != 1 || len(ids) != 1 {
		t.Fatalf("want one command created and returned to all, got %d created, ids %v", created, ids)
	}
}

// A cancellation asked while the attempt ends in a retry (or a hand-back)
// ends the command canceled: it is never retried, and never left queued
// with a cancellation no claim would get past.
func TestFinishRetryAfterCancelRequested(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		o    Outcome
	}{
		{"retry", Outcome{Status: platform.CommandQueued, Event: "retrying", Failed: true, Error: ptr("boom"), NotBefore: ptr(time.Now().Add(time.Second))}},
		{"hand-back at shutdown", Outcome{Status: platform.CommandQueued, Event: "requeued"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, Limits{100, 100})
			agent := f.newAgent(f.org, nil)
			c := f.insert(f.org, agent, func(c *platform.Command) { c.MaxRetries = 3 })
			f.admit(agent)
			f.claim(c.ID, 1)
			if got, err := f.store.Cancel(context.Background(), c.ID); err != nil || got.CancelRequestedAt == nil {
				t.Fatalf("cancel: %v %v", got, err)
			}
			done := f.finish(c.ID, 1, tc.o)
			if done.Status != platform.CommandCanceled || done.FinishedAt == nil {
				t.Fatalf("want canceled and finished, got %s (finished %v)", done.Status, done.FinishedAt)
			}
			if types := f.eventTypes(c.ID); types[len(types)-1] != "canceled" {
				t.Fatalf("want the last event canceled, got %v", types)
			}
			if s := f.agentStatus(agent); s != "idle" {
				t.Fatalf("agent: want idle, got %s", s)
			}
			// The agent's slot is free again.
			f.insert(f.org, agent, nil)
			if got := f.admit(agent); len(got) != 1 {
				t.Fatalf("want the next command admitted, got %d", len(got))
			}
		})
	}
}

// Retrying a failed command whose cancellation had been asked runs it.
func TestRetryClearsCancelRequest(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	c := f.insert(f.org, agent, func(c *platform.Command) { c.MaxRetries = 0 })
	f.admit(agent)
	f.claim(c.ID, 1)
	if _, err := f.store.Cancel(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	// The handler failed before it heard of the cancellation.
	f.finish(c.ID, 1, failure("boom"))
	if got, err := f.store.Retry(ctx, c.ID); err != nil || got == nil || got.Status != platform.CommandQueued {
		t.Fatalf("retry: want queued, got %v (%v)", got, err)
	}
	if got := f.admit(agent); len(got) != 1 {
		t.Fatalf("want it admitted, got %d", len(got))
	}
	f.claim(c.ID, 2)
}

func TestRetryOnlyFailed(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	c := f.insert(f.org, agent, nil)
	if got, err := f.store.Retry(ctx, c.ID); err != nil || got != nil {
		t.Fatalf("a queued command: want no retry, got %v (%v)", got, err)
	}
	f.admit(agent)
	f.claim(c.ID, 1)
	f.finish(c.ID, 1, failure("boom"))
	got, err := f.store.Retry(ctx, c.ID)
	if err != nil || got == nil {
		t.Fatalf("retry: %v %v", got, err)
	}
	if got.Failures != 0 || got.Error != nil || got.AdmittedAt != nil || got.FinishedAt != nil {
		t.Fatalf("want failures, error, admission and finish forgotten, got %+v", got)
	}
}

func TestCancel(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	queued := f.insert(f.org, agent, nil)
	got, err := f.store.Cancel(ctx, queued.ID)
	if err != nil || got.Status != platform.CommandCanceled || got.FinishedAt == nil {
		t.Fatalf("a queued command: want canceled at once, got %v (%v)", got, err)
	}
	if got, err := f.store.Cancel(ctx, queued.ID); err != nil || got != nil {
		t.Fatalf("a canceled command: want nothing, got %v (%v)", got, err)
	}

	running := f.insert(f.org, agent, nil)
	f.admit(agent)
	f.claim(running.ID, 1)
	got, err = f.store.Cancel(ctx, running.ID)
	if err != nil || got.Status != platform.CommandRunning || got.CancelRequestedAt == nil {
		t.Fatalf("a running command: want still running with the cancellation asked, got %v (%v)", got, err)
	}
	if s := f.agentStatus(agent); s != "busy" {
		t.Fatalf("the agent of a command still running: want busy, got %s", s)
	}
	// Asking again changes nothing and records no second event.
	again, asked, err := f.store.CancelOnce(ctx, running.ID)
	if err != nil || again == nil || asked || !again.CancelRequestedAt.Equal(*got.CancelRequestedAt) || again.Version != got.Version {
		t.Fatalf("a second cancel: want the command unchanged, got %+v asked %v (%v)", again, asked, err)
	}
	var asks int
	if err := f.db.Get(&asks, `SELECT count(*) FROM command_events WHERE command_id = $1 AND type = 'cancel_requested'`, running.ID); err != nil || asks != 1 {
		t.Fatalf("cancel_requested events: want 1, got %d (%v)", asks, err)
	}
	held := []Attempt{{ID: running.ID, Attempt: 1}}
	cancel, lost, err := f.store.Heartbeat(ctx, "w1", held, time.Minute)
	if err != nil || !slices.Equal(cancel, []string{running.ID}) || len(lost) != 0 {
		t.Fatalf("heartbeat: want the cancellation heard, got %v, lost %v (%v)", cancel, lost, err)
	}
	// Another worker, or this one for another attempt, holds nothing: its
	// handler must stop.
	for _, hb := range []struct {
		worker string
		held   []Attempt
	}{{"w2", held}, {"w1", []Attempt{{ID: running.ID, Attempt: 2}}}} {
		cancel, lost, err := f.store.Heartbeat(ctx, hb.worker, hb.held, time.Minute)
		if err != nil || len(cancel) != 0 || !slices.Equal(lost, hb.held) {
			t.Fatalf("%s %v: want it lost, got cancel %v, lost %v (%v)", hb.worker, hb.held, cancel, lost, err)
		}
	}
}

// Every command an admission admits is returned to be enqueued, even one
// inserted while the admission ran: a command admitted but not returned
// would wait for the reconciler (or forever, with no scheduler running).
func TestAdmitReturnsEveryAdmitted(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100000, 100000})
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 100})
	var mu sync.Mutex
	returned := map[string]int{}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 40 {
				f.insert(f.org, agent, nil)
				got, err := f.store.AdmitAgent(context.Background(), agent)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				for _, a := range got {
					returned[a.ID]++
					if a.TimeoutS != 60 {
						t.Errorf("admitted %s: want its timeout 60, got %d", a.ID, a.TimeoutS)
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	var admitted []string
	if err := f.db.Select(&admitted, `SELECT id FROM commands WHERE admitted_at IS NOT NULL`); err != nil {
		t.Fatal(err)
	}
	lost := 0
	for _, id := range admitted {
		if returned[id] != 1 {
			lost++
		}
	}
	if lost > 0 || len(admitted) != len(returned) {
		t.Fatalf("%d of %d admitted commands were not returned exactly once (%d returned)", lost, len(admitted), len(returned))
	}
}

// An organization's backlogs are admitted in one call, within its limits,
// the agent whose command waited longest first.
func TestAdmitOrg(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 4, OrgMaxQueued: 100})
	var agents []string
	for i := range 3 {
		a := f.newAgent(f.org, map[string]any{"max_concurrency": 2})
		agents = append(agents, a)
		for j := range 3 {
			c := f.insert(f.org, a, nil)
			// Agent 2's commands are the oldest, then agent 1's, then agent 0's.
			f.exec(`UPDATE commands SET created_at = now() - $2 * interval '1 second' WHERE id = $1`, c.ID, 100*i+10-j)
		}
	}
	disabled := f.newAgent(f.org, map[string]any{"max_concurrency": 2})
	old := f.insert(f.org, disabled, nil)
	f.exec(`UPDATE commands SET created_at = now() - interval '1 hour' WHERE id = $1`, old.ID)
	f.exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, disabled)
	otherOrg, _ := f.newOrg()
	elsewhere := f.insert(otherOrg, f.newAgent(otherOrg, nil), nil)

	got, err := f.store.AdmitOrg(context.Background(), f.org)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("want 4 admitted (org_max_in_flight), got %d", len(got))
	}
	per := map[string]int{}
	for _, a := range got {
		per[f.get(a.ID).AgentID]++
		if a.TimeoutS != 60 || a.Attempt != 0 {
			t.Fatalf("admitted: want timeout 60 at attempt 0, got %+v", a)
		}
	}
	if per[agents[2]] != 2 || per[agents[1]] != 2 || per[agents[0]] != 0 {
		t.Fatalf("want the two agents with the oldest backlog admitted up to max_concurrency, got %v", per)
	}
	if f.get(old.ID).AdmittedAt != nil {
		t.Fatal("a disabled agent's command was admitted")
	}
	if f.get(elsewhere.ID).AdmittedAt != nil {
		t.Fatal("another organization's command was admitted")
	}
	if got, err := f.store.AdmitOrg(context.Background(), f.org); err != nil || len(got) != 0 {
		t.Fatalf("at the limit: want nothing more, got %d (%v)", len(got), err)
	}
}

// The reconciler's pass over backlogs takes the longest waiting first and
// skips disabled agents' backlogs, which cannot move: many of them must
// not starve the others.
func TestWaitingAgentsOldestMovableFirst(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	disabled, older, newer := f.newAgent(f.org, nil), f.newAgent(f.org, nil), f.newAgent(f.org, nil)
	f.insert(f.org, disabled, nil)
	f.insert(f.org, older, nil)
	f.insert(f.org, newer, nil)
	f.exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, disabled)
	got, err := f.store.WaitingAgents(context.Background(), "", 1)
	if err != nil || !slices.Equal(got, []string{older}) {
		t.Fatalf("want the oldest movable backlog, %s, got %v (%v)", older, got, err)
	}
}

// Sweeping deletes every finished command past the retention, not 10,000
// a pass.
func TestSweepDeletesAllThatExpired(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	f.exec(`INSERT INTO commands (id, org_id, owner_id, agent_id, task, payload, status, finished_at, timeout_s, max_retries)
		SELECT gen_random_uuid(), $1, $2, $3, 'agent:echo', '{}', 'succeeded', now() - interval '40 days', 60, 0
		FROM generate_series(1, 10050)`, f.org, f.user, agent)
	kept := f.insert(f.org, agent, nil)
	n, err := f.store.Sweep(context.Background(), 30*24*time.Hour)
	if err != nil || n != 10050 {
		t.Fatalf("want 10050 swept, got %d (%v)", n, err)
	}
	if f.get(kept.ID) == nil {
		t.Fatal("a live command was swept")
	}
}

// An agent disabled while its command's outcome is being recorded stays
// disabled: the outcome's statement worked the agent's status out from
// its snapshot (busy, so idle now) and wrote it over the disabling.
func TestOutcomeKeepsAConcurrentDisabling(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	ctx := context.Background()
	c := f.running(agent)
	if got := f.agentStatus(agent); got != "busy" {
		t.Fatalf("a running agent is %s", got)
	}
	// The disabling holds the agent's row while the outcome's statement
	// starts, and commits while it waits.
	tx, err := f.db.Beginx()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, agent); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := f.store.Finish(ctx, c.ID, 1, succeeded)
		done <- err
	}()
	time.Sleep(200 * time.Millisecond) // the outcome's statement waits on the row
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := f.agentStatus(agent); got != "disabled" {
		t.Fatalf("an agent disabled while its command ended: %s, want disabled", got)
	}
}

// An agent enabled while its last command's outcome is being recorded is
// idle once both are done: the enabling counted the command as running
// from its snapshot, and the outcome leaves a disabled agent alone, so the
// agent stayed busy with nothing running.
func TestEnablingWaitsForAnOutcome(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	ctx := context.Background()
	c := f.running(agent)
	f.exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, agent)
	// The outcome holds the command's row while the enabling starts, and
	// commits while it waits.
	tx, err := f.db.Beginx()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`UPDATE commands SET status = 'succeeded', finished_at = now() WHERE id = $1`, c.ID); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	a := &platform.Agent{}
	a.ID = agent
	go func() {
		etx, err := f.db.Beginx()
		if err != nil {
			done <- err
			return
		}
		defer etx.Rollback()
		if err := f.store.SetDisabled(ctx, etx, a, false); err != nil {
			done <- err
			return
		}
		done <- etx.Commit()
	}()
	time.Sleep(200 * time.Millisecond) // the enabling waits on the command's row
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := f.agentStatus(agent); got != "idle" || a.Status != "idle" {
		t.Fatalf("an agent enabled as its last command ended: %s (answered %s), want idle", got, a.Status)
	}
}

// A command for an agent deleted meanwhile is "agent not found" (404), not
// a complaint about the request (the foreign key's 400).
func TestInsertForADeletedAgent(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{100, 100})
	agent := f.newAgent(f.org, nil)
	f.exec(`DELETE FROM entities WHERE id = $1`, agent)
	for _, admit := range []bool{false, true} {
		c := &platform.Command{
			Base:    platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: f.user},
			AgentID: agent, Task: "agent:echo", Payload: json.RawMessage(`{}`), TimeoutS: 60,
		}
		insert := f.store.Insert
		if admit {
			insert = f.store.InsertAdmitted
		}
		if _, _, err := insert(context.Background(), c); platform.ErrorCode(err) != platform.ENOTFOUND {
			t.Fatalf("admit %v: a command for a deleted agent: %v (want not found)", admit, err)
		}
	}
}
