package commands

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
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
