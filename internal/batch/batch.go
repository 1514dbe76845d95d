// Package batch runs concurrent calls together: the calls that arrive while
// a batch runs go in the next one, so one statement does the work of many
// under load, and an idle caller waits for nothing.
package batch

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/lib/pq"
)

// Batcher runs calls together: while a batch is being run, the calls that
// arrive wait and go together in the next one. It adds no delay: an idle
// batcher runs a call at once, alone. Under load, one statement then does
// the work of many, which is what lets a few PostgreSQL connections keep up
// with many concurrent commands.
//
// No goroutine outlives the work: a call runs batches itself when a lane is
// free (up to lanes at a time), a goroutine takes over what is pending when
// its call is done, and it ends when nothing is left to run.
type Batcher[T, R any] struct {
	// run does a batch; its result is in the order of in.
	run   func(ctx context.Context, in []T) ([]R, error)
	lanes int
	max   int
	// Linger, if set before the first call, is how long a batch that is not
	// full waits for more calls before it runs: work that nobody waits on
	// trades that delay for fewer, fuller batches.
	Linger time.Duration

	mu      sync.Mutex
	pending []*batchCall[T, R]
	running int
}

type batchCall[T, R any] struct {
	in   T
	out  R
	err  error
	done chan struct{}
}

// batchTimeout bounds one batch's statement.
const batchTimeout = 30 * time.Second

// New returns a batcher running at most lanes batches at once, of at most
// max calls each. run does a batch; its result is in the order of in. A
// batch that PostgreSQL chose as a deadlock's victim runs again; one that
// PostgreSQL refused for its data runs again call by call, so that a bad
// call fails alone; any other error is every call's.
func New[T, R any](lanes, max int, run func(ctx context.Context, in []T) ([]R, error)) *Batcher[T, R] {
	return &Batcher[T, R]{run: run, lanes: lanes, max: max}
}

// Do runs in with the next batch and returns its result. It takes no
// context: a caller that gave up could not know whether the batch did its
// work, which it must (a claimed attempt is the caller's to run); each
// batch is bounded by its own timeout instead.
//
// A caller that finds a lane free runs batches itself until its own call
// is done, then leaves what is left to a goroutine: an idle batcher costs
// no goroutine (nor the growth of a new goroutine's stack) per call.
func (b *Batcher[T, R]) Do(in T) (R, error) {
	c := &batchCall[T, R]{in: in, done: make(chan struct{})}
	b.mu.Lock()
	b.pending = append(b.pending, c)
	lead := b.running < b.lanes
	if lead {
		b.running++
	}
	b.mu.Unlock()
	if lead {
		b.lead(c)
	}
	<-c.done
	return c.out, c.err
}

// lead runs batches on a lane until c is done, then hands the lane to a
// goroutine if calls are pending, or gives it back.
func (b *Batcher[T, R]) lead(c *batchCall[T, R]) {
	for {
		select {
		case <-c.done:
			b.mu.Lock()
			if len(b.pending) == 0 {
				b.running--
				b.mu.Unlock()
				return
			}
			b.mu.Unlock()
			go b.loop()
			return
		default:
		}
		calls := b.take()
		if calls == nil {
			return // another lane's batch took c: it will tell it
		}
		b.runCalls(calls)
	}
}

// loop runs batches on a lane until nothing is pending.
func (b *Batcher[T, R]) loop() {
	for {
		calls := b.take()
		if calls == nil {
			return
		}
		b.runCalls(calls)
	}
}

// take returns the next batch, after the linger; nil, and the lane given
// back, when nothing is pending.
func (b *Batcher[T, R]) take() []*batchCall[T, R] {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.pending) == 0 {
		b.running--
		return nil
	}
	if b.Linger > 0 && len(b.pending) < b.max {
		b.mu.Unlock()
		time.Sleep(b.Linger)
		b.mu.Lock()
	}
	n := min(len(b.pending), b.max)
	calls := make([]*batchCall[T, R], n)
	copy(calls, b.pending)
	b.pending = append(b.pending[:0], b.pending[n:]...)
	return calls
}

// runCalls runs a batch and tells each call its result.
func (b *Batcher[T, R]) runCalls(calls []*batchCall[T, R]) {
	n := len(calls)
	in := make([]T, n)
	for i, c := range calls {
		in[i] = c.in
	}
	out, err := b.runWithRetry(in)
	if err == nil && len(out) != n {
		err = fmt.Errorf("batch: %d results for %d calls", len(out), n)
	}
	if err != nil && n > 1 && callsFault(err) {
		// One bad call (a command whose agent was just deleted, say)
		// must not fail the others: run each alone.
		for i, c := range calls {
			res, err := b.runWithRetry(in[i : i+1])
			if err == nil && len(res) != 1 {
				err = fmt.Errorf("batch: %d results for 1 call", len(res))
			}
			if err != nil {
				c.err = err
			} else {
				c.out = res[0]
			}
			close(c.done)
		}
		return
	}
	for i, c := range calls {
		if err != nil {
			c.err = err
		} else {
			c.out = out[i]
		}
		close(c.done)
	}
}

// Align puts the rows a batch's statement returned in the order of the
// calls: out[i] is the row whose key is keys[i], or the zero R if there is
// none (a call the statement skipped). A run returns its results so.
func Align[R any, K comparable](rows []R, key func(R) K, keys []K) []R {
	byKey := make(map[K]R, len(rows))
	for _, r := range rows {
		byKey[key(r)] = r
	}
	out := make([]R, len(keys))
	for i, k := range keys {
		out[i] = byKey[k]
	}
	return out
}

// runWithRetry runs a batch, again if PostgreSQL chose it as a deadlock's
// victim or refused it for a serialization failure (the pipeline's
// statements lock agents in id order, but a batch's rows of commands and
// the statements of other callers may still cross).
func (b *Batcher[T, R]) runWithRetry(in []T) ([]R, error) {
	for try := 0; ; try++ {
		ctx, cancel := context.WithTimeout(context.Background(), batchTimeout)
		out, err := b.run(ctx, in)
		cancel()
		if err == nil || try == 3 || !retryable(err) {
			return out, err
		}
	}
}

// callsFault tells an error that one call of the batch may have caused
// (bad data, a broken constraint, a function's exception), as opposed to
// the database being unreachable or refusing all work: those would only
// fail again, once per call.
func callsFault(err error) bool {
	var pqErr *pq.Error
	if !errors.As(err, &pqErr) {
		return false
	}
	switch pqErr.Code.Class() {
	case "22", "23", "P0": // data exception, integrity constraint violation, PL/pgSQL exception
		return true
	}
	return false
}

// retryable tells a statement that failed only because of concurrent
// ones: running it again is safe and will succeed.
func retryable(err error) bool {
	var pqErr *pq.Error
	return errors.As(err, &pqErr) && (pqErr.Code == "40P01" || pqErr.Code == "40001")
}
