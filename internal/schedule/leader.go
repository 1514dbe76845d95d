package schedule

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// Leader elects one scheduler replica through a Redis lease. The leader
// runs the work given to Run; when it loses the lease (Redis unreachable,
// process paused past the lease) it stops the work before another replica
// can take over, and every takeover increments a fencing epoch.
type Leader struct {
	rdb    redis.UniversalClient
	key    string
	epoch  string
	id     string
	ttl    time.Duration
	logger *slog.Logger
	// OnChange is told when this replica gains (true) or loses leadership.
	OnChange func(leading bool, epoch int64)

	mu      sync.Mutex
	leading bool
	current int64
}

// NewLeader returns an elector on the installation's prefix with a lease of ttl.
func NewLeader(rdb redis.UniversalClient, prefix string, ttl time.Duration, logger *slog.Logger) *Leader {
	return &Leader{rdb: rdb, key: prefix + ":scheduler:leader", epoch: prefix + ":scheduler:epoch", id: uuid.NewString(), ttl: ttl, logger: logger}
}

// acquire takes the lease KEYS[1] for ARGV[1] (ms ARGV[2]) if free or
// already ours, and returns the fencing epoch (KEYS[2], incremented on every
// takeover), or 0 when another replica holds it.
var acquire = redis.NewScript(`
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])`)

// release drops the lease KEYS[1] if ARGV[1] holds it.
var release = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// Leading reports whether this replica leads, and its epoch.
func (l *Leader) Leading() (bool, int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.leading, l.current
}

// Run campaigns until ctx ends. While leading it runs work with a context
// that is cancelled as soon as leadership is in doubt; work must return
// when its context ends.
func (l *Leader) Run(ctx context.Context, work func(ctx context.Context)) {
	renew := l.ttl / 3
	var (
		workCancel context.CancelFunc
		workDone   chan struct{}
		lastRenew  time.Time
	)
	stopWork := func() {
		if workCancel != nil {
			workCancel()
			<-workDone
			workCancel = nil
			l.set(false, 0)
		}
	}
	defer func() {
		stopWork()
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		release.Run(rctx, l.rdb, []string{l.key}, l.id)
	}()
	t := time.NewTicker(renew)
	defer t.Stop()
	for {
		epoch, err := acquire.Run(ctx, l.rdb, []string{l.key, l.epoch}, l.id, l.ttl.Milliseconds()).Int64()
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			// Without Redis the lease cannot be known to be ours: stop before
			// it can have passed to someone else.
			if workCancel != nil && time.Since(lastRenew) > l.ttl-renew {
				l.logger.Warn("leadership in doubt: stopping", "err", err)
				stopWork()
			}
		case epoch == 0:
			stopWork()
		default:
			lastRenew = time.Now()
			if workCancel == nil {
				wctx, cancel := context.WithCancel(ctx)
				workCancel = cancel
				workDone = make(chan struct{})
				l.set(true, epoch)
				l.logger.Info("leading the schedulers", "epoch", epoch)
				go func() {
					defer close(workDone)
					work(wctx)
				}()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (l *Leader) set(leading bool, epoch int64) {
	l.mu.Lock()
	l.leading, l.current = leading, epoch
	l.mu.Unlock()
	if l.OnChange != nil {
		l.OnChange(leading, epoch)
	}
}
