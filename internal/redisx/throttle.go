// Package redisx holds agentry's Redis adapters that are not the cache or
// the event streams: counters for throttling, and locks.
package redisx

import (
	"context"
	"time"

	"github.com/redis/go-redis/v9"
)

// Limit is one throttling counter: at most Max failures per Window.
type Limit struct {
	Key    string
	Max    int
	Window time.Duration
}

// Throttle counts failures in fixed windows that start with the first
// failure, so a lock-out always ends when its window does.
type Throttle struct {
	rdb    redis.UniversalClient
	prefix string
}

// NewThrottle returns a throttle whose keys start with prefix.
func NewThrottle(rdb redis.UniversalClient, prefix string) *Throttle {
	return &Throttle{rdb: rdb, prefix: prefix + ":throttle:"}
}

// Blocked returns, in seconds, how long until every limit over its maximum
// has reset; 0 when none is.
func (t *Throttle) Blocked(ctx context.Context, limits ...Limit) (int, error) {
	pipe := t.rdb.Pipeline()
	gets := make([]*redis.StringCmd, len(limits))
	ttls := make([]*redis.DurationCmd, len(limits))
	for i, l := range limits {
		gets[i] = pipe.Get(ctx, t.prefix+l.Key)
		ttls[i] = pipe.PTTL(ctx, t.prefix+l.Key)
	}
	if _, err := pipe.Exec(ctx); err != nil && err != redis.Nil {
		return 0, err
	}
	wait := 0
	for i, l := range limits {
		n, err := gets[i].Int()
		if err != nil || n < l.Max {
			continue
		}
		secs := int(ttls[i].Val().Seconds()) + 1
		if secs > wait {
			wait = secs
		}
	}
	return wait, nil
}

// incrWithWindow increments KEYS[1] and starts its window (ARGV[1] ms) on
// the first increment. Returns the new count.
var incrWithWindow = redis.NewScript(`
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n`)

// Fail counts one failure against every limit.
func (t *Throttle) Fail(ctx context.Context, limits ...Limit) error {
	for _, l := range limits {
		if err := incrWithWindow.Run(ctx, t.rdb, []string{t.prefix + l.Key}, l.Window.Milliseconds()).Err(); err != nil {
			return err
		}
	}
	return nil
}

// Reset clears the named counters (after a success).
func (t *Throttle) Reset(ctx context.Context, keys ...string) error {
	full := make([]string, len(keys))
	for i, k := range keys {
		full[i] = t.prefix + k
	}
	return t.rdb.Del(ctx, full...).Err()
}
