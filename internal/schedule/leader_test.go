package schedule

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/testenv"
)

// Two replicas on one prefix: one leads, never both; when it stops, the
// other takes over, with a higher epoch.
func TestLeaderTakeover(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	ttl := 300 * time.Millisecond
	var working, maxWorking atomic.Int32
	type change struct {
		who     int
		leading bool
		epoch   int64
	}
	changes := make(chan change, 16)
	work := func(ctx context.Context) {
		n := working.Add(1)
		for {
			m := maxWorking.Load()
			if n <= m || maxWorking.CompareAndSwap(m, n) {
				break
			}
		}
		<-ctx.Done()
		working.Add(-1)
	}
	leaders := make([]*Leader, 2)
	cancels := make([]context.CancelFunc, 2)
	var wg sync.WaitGroup
	for i := range leaders {
		l := NewLeader(rdb, prefix, ttl, discard)
		l.OnChange = func(leading bool, epoch int64) { changes <- change{i, leading, epoch} }
		leaders[i] = l
		ctx, cancel := context.WithCancel(context.Background())
		cancels[i] = cancel
		wg.Go(func() { l.Run(ctx, work) })
	}
	defer func() {
		for _, c := range cancels {
			c()
		}
		wg.Wait()
	}()

	var first change
	select {
	case first = <-changes:
	case <-time.After(5 * time.Second):
		t.Fatal("nobody leads within 5s")
	}
	if !first.leading || first.epoch < 1 {
		t.Fatalf("want a leader with an epoch, got %+v", first)
	}
	// A few lease periods: the other replica must not lead meanwhile.
	select {
	case c := <-changes:
		t.Fatalf("leadership changed while the leader ran: %+v", c)
	case <-time.After(3 * ttl):
	}
	other := 1 - first.who
	if leading, _ := leaders[other].Leading(); leading {
		t.Fatal("both replicas lead")
	}
	if leading, epoch := leaders[first.who].Leading(); !leading || epoch != first.epoch {
		t.Fatalf("the leader: want leading at epoch %d, got %v at %d", first.epoch, leading, epoch)
	}

	cancels[first.who]()
	var stopped, took change
	deadline := time.After(5 * time.Second)
	for took.epoch == 0 {
		select {
		case c := <-changes:
			if c.leading {
				took = c
			} else {
				stopped = c
			}
		case <-deadline:
			t.Fatal("no takeover within 5s of the leader stopping")
		}
	}
	if stopped.who != first.who || took.who != other || took.epoch <= first.epoch {
		t.Fatalf("want %d to stop and %d to take over with a higher epoch than %d; got stop %+v, takeover %+v", first.who, other, first.epoch, stopped, took)
	}
	if m := maxWorking.Load(); m != 1 {
		t.Fatalf("want the work run by one replica at a time, saw %d at once", m)
	}
}

// A leader whose lease was taken (it paused past the lease) stops its work.
func TestLeaderStepsDownWhenLeaseIsLost(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	l := NewLeader(rdb, prefix, 300*time.Millisecond, discard)
	changes := make(chan bool, 4)
	l.OnChange = func(leading bool, _ int64) {
		if !leading {
			changes <- leading
		}
	}
	started, stopped := make(chan struct{}), make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Run(ctx, func(ctx context.Context) {
			close(started)
			<-ctx.Done()
			close(stopped)
		})
	}()
	defer func() { cancel(); <-done }()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("not leading within 5s")
	}
	// Another replica holds the lease now.
	if err := rdb.Set(context.Background(), prefix+":scheduler:leader", "someone-else", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the work did not stop after the lease passed to another replica")
	}
	select {
	case leading := <-changes:
		if leading {
			t.Fatal("leads again while another replica holds the lease")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not told it stopped leading")
	}
	if leading, _ := l.Leading(); leading {
		t.Fatal("still says it leads")
	}
}
