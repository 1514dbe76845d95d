package batch

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Concurrent calls share batches, each gets its own result, and no batch
// runs more calls than max or more batches than lanes at once.
func TestBatcherGroupsConcurrentCalls(t *testing.T) {
	t.Parallel()
	var running, most, batches, biggest atomic.Int64
	release := make(chan struct{})
	b := New(2, 8, func(_ context.Context, in []int) ([]string, error) {
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
			out, err := b.Do(i)
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
	b := New(1, 8, func(_ context.Context, in []int) ([]int, error) { return in, nil })
	for i := range 3 {
		if got, err := b.Do(i); err != nil || got != i {
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
	b := New(1, 8, func(_ context.Context, in []int) ([]int, error) {
		if tries.Add(1) < 3 {
			return nil, &pq.Error{Code: "40P01", Message: "deadlock detected"}
		}
		return in, nil
	})
	if got, err := b.Do(7); err != nil || got != 7 || tries.Load() != 3 {
		t.Fatalf("want 7 after 3 tries, got %d, %v after %d", got, err, tries.Load())
	}
	boom := errors.New("boom")
	b = New(1, 8, func(_ context.Context, in []int) ([]int, error) { return nil, boom })
	if _, err := b.Do(1); !errors.Is(err, boom) {
		t.Fatalf("want the batch's error, got %v", err)
	}
}

// A batch that PostgreSQL refused for its data runs again call by call:
// only the bad call fails.
func TestBatcherIsolatesABadCall(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var first atomic.Bool
	b := New(1, 8, func(_ context.Context, in []int) ([]int, error) {
		if first.CompareAndSwap(false, true) {
			<-release // hold the lane so that the next calls batch up
		}
		for _, v := range in {
			if v < 0 {
				return nil, &pq.Error{Code: "23503", Message: "violates foreign key constraint"}
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
			_, errs[i] = b.Do(v)
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

// With a linger, calls that come one after another within it share a
// batch.
func TestBatcherLingers(t *testing.T) {
	t.Parallel()
	var batches atomic.Int64
	b := New(1, 8, func(_ context.Context, in []int) ([]int, error) {
		batches.Add(1)
		return in, nil
	})
	b.Linger = 200 * time.Millisecond
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			time.Sleep(time.Duration(i) * 10 * time.Millisecond)
			if got, err := b.Do(i); err != nil || got != i {
				t.Errorf("Do(%d) = %d, %v", i, got, err)
			}
		})
	}
	wg.Wait()
	if n := batches.Load(); n != 1 {
		t.Fatalf("want the 4 calls in 1 batch, got %d batches", n)
	}
}

// A batch that failed for want of the database is not run again call by
// call: every call gets the error at once.
func TestBatcherDoesNotSplitOutages(t *testing.T) {
	t.Parallel()
	var runs atomic.Int64
	release := make(chan struct{})
	var first atomic.Bool
	down := errors.New("dial tcp 127.0.0.1:5432: connect: connection refused")
	b := New(1, 8, func(_ context.Context, in []int) ([]int, error) {
		if first.CompareAndSwap(false, true) {
			<-release
		}
		runs.Add(1)
		return nil, down
	})
	var wg sync.WaitGroup
	for i := range 5 {
		wg.Go(func() {
			if _, err := b.Do(i); !errors.Is(err, down) {
				t.Errorf("want the outage's error, got %v", err)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	if n := runs.Load(); n > 2 {
		t.Fatalf("want at most 2 runs (never one per call), got %d", n)
	}
}

// A statement's rows come back in the order of the calls, a call it
// skipped getting nothing, whatever order the rows came in.
func TestAlign(t *testing.T) {
	type row struct{ id string }
	rows := []*row{{"c"}, {"a"}}
	got := Align(rows, func(r *row) string { return r.id }, []string{"a", "b", "c"})
	if len(got) != 3 || got[0] != rows[1] || got[1] != nil || got[2] != rows[0] {
		t.Fatalf("want a, nothing, c; got %v", got)
	}
}
