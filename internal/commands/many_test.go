package commands

import (
	"context"
	"encoding/json"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/platform"
)

// Two deliveries of one attempt in one batch: exactly one claims it; and a
// batch of outcomes records each for its own attempt only.
func TestClaimManyAndFinishMany(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 100, OrgMaxQueued: 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 10})
	a, b, c := f.insert(f.org, agent, nil), f.insert(f.org, agent, nil), f.insert(f.org, agent, nil)
	f.admit(agent)
	got, err := f.store.ClaimMany(ctx, []Attempt{{a.ID, 1}, {a.ID, 1}, {b.ID, 2}, {b.ID, 1}, {c.ID, 1}}, "w1", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	claimed := 0
	for _, g := range got {
		if g != nil {
			claimed++
		}
	}
	if claimed != 3 || (got[0] == nil) == (got[1] == nil) || got[2] != nil || got[3] == nil || got[4] == nil {
		t.Fatalf("want a once, b's attempt 1 and c claimed, got %v", got)
	}
	ended, err := f.store.FinishMany(ctx, []Ending{
		{Attempt{a.ID, 1}, succeeded},
		{Attempt{b.ID, 2}, succeeded}, // not b's attempt: refused
		{Attempt{c.ID, 1}, failure("boom")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if ended[0] == nil || ended[0].Status != "succeeded" || ended[1] != nil || ended[2] == nil || ended[2].Status != "failed" {
		t.Fatalf("want a succeeded, b refused, c failed, got %v", ended)
	}
	if f.get(b.ID).Status != "running" {
		t.Fatal("a refused outcome changed the command")
	}
	f.checkLoad(f.org, "after the batch", [2]int{1, 0})
}

// Commands dispatched at once are stored together, in order, the same
// idempotency key once, and one for a missing agent fails alone.
func TestConcurrentInserts(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 100, OrgMaxQueued: 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, nil)
	key := "same-key"
	var wg sync.WaitGroup
	type result struct {
		c       *platform.Command
		created bool
		err     error
	}
	results := make([]result, 30)
	for i := range 30 {
		wg.Go(func() {
			c := &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: f.user}, AgentID: agent,
				Task: "agent:echo", Payload: json.RawMessage(`{}`), TimeoutS: 60}
			switch {
			case i%10 == 0:
				c.IdempotencyKey = &key
			case i == 7:
				c.AgentID = uuid.NewString() // no such agent
			}
			out, created, err := f.store.Insert(ctx, c)
			results[i] = result{out, created, err}
		})
	}
	wg.Wait()
	var keyed []string
	for i, r := range results {
		switch {
		case i == 7:
			if r.err == nil {
				t.Fatal("a command for a missing agent was stored")
			}
		case r.err != nil:
			t.Fatalf("insert %d: %v", i, r.err)
		case i%10 == 0:
			keyed = append(keyed, r.c.ID)
		case !r.created:
			t.Fatalf("insert %d: not created", i)
		}
	}
	if len(keyed) != 3 || keyed[0] != keyed[1] || keyed[1] != keyed[2] {
		t.Fatalf("want one command for the idempotency key, got %v", keyed)
	}
	var n int
	if err := f.db.Get(&n, `SELECT count(*) FROM commands WHERE agent_id = $1`, agent); err != nil || n != 27 {
		t.Fatalf("want 27 commands stored, got %d (%v)", n, err)
	}
}

// Dispatches admitted as they are stored, concurrently through two API
// replicas (two stores), with claims and outcomes going on, never put an
// agent over its max_concurrency nor its organization over its limit.
func TestConcurrentInsertsAdmitWithinLimits(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 5, OrgMaxQueued: 100})
	ctx := context.Background()
	stores := []*Store{f.store, {DB: f.db, Limits: f.store.Limits}}
	agents := []string{f.newAgent(f.org, map[string]any{"max_concurrency": 3}), f.newAgent(f.org, map[string]any{"max_concurrency": 3})}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var admitted []string
	for i := range 60 {
		wg.Go(func() {
			c := &platform.Command{Base: platform.Base{ID: uuid.NewString(), OrgID: f.org, OwnerID: f.user}, AgentID: agents[i%2],
				Task: "agent:echo", Payload: json.RawMessage(`{}`), TimeoutS: 60}
			out, created, err := stores[i/2%2].InsertAdmitted(ctx, c)
			if err != nil || !created {
				t.Errorf("insert %d: created %v, err %v", i, created, err)
				return
			}
			if out.AdmittedAt != nil {
				mu.Lock()
				admitted = append(admitted, out.ID)
				mu.Unlock()
			}
		})
	}
	// Meanwhile, limits are checked as commands start and end.
	check := func() {
		var perAgent []int
		if err := f.db.Select(&perAgent, `SELECT count(*) FROM commands WHERE org_id = $1 AND admitted_at IS NOT NULL
			AND status IN ('queued', 'running') GROUP BY agent_id`, f.org); err != nil {
			t.Fatal(err)
		}
		total := 0
		for _, n := range perAgent {
			if n > 3 {
				t.Fatalf("an agent has %d commands admitted, over its max_concurrency of 3", n)
			}
			total += n
		}
		if total > 5 {
			t.Fatalf("the organization has %d commands admitted, over its limit of 5", total)
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	finished := 0
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		check()
		mu.Lock()
		batch := slices.Clone(admitted[finished:])
		finished = len(admitted)
		mu.Unlock()
		for _, id := range batch {
			f.claim(id, 1)
			f.finish(id, 1, succeeded)
		}
	}
	check()
	t.Logf("%d of 60 dispatches admitted as stored", len(admitted))
	if len(admitted) < 5 {
		t.Fatalf("only %d of 60 dispatches admitted as stored, want at least the limit's 5", len(admitted))
	}
	if counted, recounted := f.load(f.org); counted != recounted {
		t.Fatalf("org_load says %v in flight/queued, the commands %v", counted, recounted)
	}
}
