package commands

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/platform"
)

// Concurrent calls share batches, each gets its own result, and no batch
// runs more calls than max or more batches than lanes at once.
func TestBatcherGroupsConcurrentCalls(t *testing.T) {
	t.Parallel()
	var running, most, batches, biggest atomic.Int64
	release := make(chan struct{})
	b := newBatcher(2, 8, func(_ context.Context, in []int) ([]string, error) {
		if n := running.Add(1); n > most.Load() {
			most.Store(n)
		}
		defer running.Add(-1)
		batches.Add(1)
		if int64(len(in)) > biggest.Load() {
			biggest.Store(int64(len(in)))
		}
		<-release
		out := make([]string, len(in))
		for i, v := range in {
			out[i] = fmt.Sprint(v * 10)
		}
		return out, nil
	})
	var wg sync.WaitGroup
	results := make([]string, 50)
	for i := range 50 {
		wg.Go(func() {
			out, err := b.do(i)
			if err != nil {
				t.Error(err)
			}
			results[i] = out
		})
	}
	time.Sleep(50 * time.Millisecond) // let the calls pile up behind the first batches
	close(release)
	wg.Wait()
	for i, r := range results {
		if r != fmt.Sprint(i*10) {
			t.Fatalf("call %d got %q", i, r)
		}
	}
	if most.Load() > 2 || biggest.Load() > 8 {
		t.Fatalf("want at most 2 batches at once of at most 8, got %d at once, biggest %d", most.Load(), biggest.Load())
	}
	if batches.Load() >= 50 {
		t.Fatalf("want calls grouped, got %d batches for 50 calls", batches.Load())
	}
}

// An idle batcher runs a call at once, and leaves no goroutine behind.
func TestBatcherRunsAloneWhenIdle(t *testing.T) {
	t.Parallel()
	b := newBatcher(1, 8, func(_ context.Context, in []int) ([]int, error) { return in, nil })
	for i := range 3 {
		if got, err := b.do(i); err != nil || got != i {
			t.Fatalf("do(%d) = %d, %v", i, got, err)
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.running != 0 || len(b.pending) != 0 {
		t.Fatalf("want nothing running or pending, got %d running, %d pending", b.running, len(b.pending))
	}
}

// A batch PostgreSQL chose as a deadlock's victim runs again; any other
// error reaches every call of the batch.
func TestBatcherRetriesDeadlocks(t *testing.T) {
	t.Parallel()
	var tries atomic.Int64
	b := newBatcher(1, 8, func(_ context.Context, in []int) ([]int, error) {
		if tries.Add(1) < 3 {
			return nil, &pq.Error{Code: "40P01", Message: "deadlock detected"}
		}
		return in, nil
	})
	if got, err := b.do(7); err != nil || got != 7 || tries.Load() != 3 {
		t.Fatalf("want 7 after 3 tries, got %d, %v after %d", got, err, tries.Load())
	}
	boom := errors.New("boom")
	b = newBatcher(1, 8, func(_ context.Context, in []int) ([]int, error) { return nil, boom })
	if _, err := b.do(1); !errors.Is(err, boom) {
		t.Fatalf("want the batch's error, got %v", err)
	}
}

// A batch that fails runs again call by call: only the bad call fails.
func TestBatcherIsolatesABadCall(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var first atomic.Bool
	b := newBatcher(1, 8, func(_ context.Context, in []int) ([]int, error) {
		if first.CompareAndSwap(false, true) {
			<-release // hold the lane so that the next calls batch up
		}
		for _, v := range in {
			if v < 0 {
				return nil, errors.New("negative")
			}
		}
		return in, nil
	})
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range 6 {
		wg.Go(func() {
			v := i
			if i == 3 {
				v = -1
			}
			_, errs[i] = b.do(v)
		})
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	for i, err := range errs {
		if (err != nil) != (i == 3) {
			t.Fatalf("call %d: err %v; want an error for call 3 only", i, err)
		}
	}
}

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
