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

// incrWithWindow increments KEYS[1] and starts its window (ARGV[1] ms) on
// the first increment. Returns the new count.
var incrWithWindow = redis.NewScript(`
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n`)

// Take counts an attempt against every limit before it is made, and
// returns, in seconds, how long until every limit it went over resets (0:
// go ahead). Counting first makes concurrent attempts take turns: of many
// sent at once, only as many as a limit allows go ahead (checking, then
// counting failures afterwards, let a burst through whole). An attempt
// that succeeds gives its count back with Return.
func (t *Throttle) Take(ctx context.Context, limits ...Limit) (int, error) {
	wait := 0
	for _, l := range limits {
		key := t.prefix + l.Key
		n, err := incrWithWindow.Run(ctx, t.rdb, []string{key}, l.Window.Milliseconds()).Int()
		if err != nil {
			return 0, err
		}
		if n <= l.Max {
			continue
		}
		ttl, err := t.rdb.PTTL(ctx, key).Result()
		if err != nil {
			return 0, err
		}
		wait = max(wait, int(ttl.Seconds())+1)
	}
	return wait, nil
}

// Return gives back an attempt Take counted, once it succeeded.
func (t *Throttle) Return(ctx context.Context, limits ...Limit) error {
	for _, l := range limits {
		if err := decrToZero.Run(ctx, t.rdb, []string{t.prefix + l.Key}).Err(); err != nil {
			return err
		}
	}
	return nil
}

// decrToZero decrements KEYS[1] if it is above zero, keeping its window.
var decrToZero = redis.NewScript(`
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return n`)

// Reset clears the named counters (after a success).
func (t *Throttle) Reset(ctx context.Context, keys ...string) error {
	full := make([]string, len(keys))
	for i, k := range keys {
		full[i] = t.prefix + k
	}
	return t.rdb.Del(ctx, full...).Err()
}
