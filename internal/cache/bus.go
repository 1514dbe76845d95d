package cache

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Bus carries cache invalidations to every process through one Redis
// pub/sub channel. Publish drops the keys locally at once and on every
// other replica within milliseconds. When the subscription breaks (Redis
// restarted), every handler is told to drop everything ("*"), since
// invalidations may have been missed.
type Bus struct {
	rdb     redis.UniversalClient
	channel string
	logger  *slog.Logger

	mu       sync.RWMutex
	handlers []func(keys ...string)

	stopOnce sync.Once
	cancel   context.CancelFunc
	sub      *redis.PubSub
	done     chan struct{}
}

// NewBus returns a bus on the channel {prefix}:invalidate.
func NewBus(rdb redis.UniversalClient, prefix string, logger *slog.Logger) *Bus {
	return &Bus{rdb: rdb, channel: prefix + ":invalidate", logger: logger, done: make(chan struct{})}
}

// Handle adds fn to the functions told of every invalidation.
func (b *Bus) Handle(fn func(keys ...string)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.handlers = append(b.handlers, fn)
}

func (b *Bus) dispatch(keys ...string) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for _, fn := range b.handlers {
		fn(keys...)
	}
}

// Publish invalidates keys here and on every replica.
func (b *Bus) Publish(ctx context.Context, keys ...string) {
	if len(keys) == 0 {
		return
	}
	b.dispatch(keys...)
	for _, key := range keys {
		if err := b.rdb.Publish(ctx, b.channel, key).Err(); err != nil {
			b.logger.WarnContext(ctx, "cache invalidation not published; other replicas will expire it", "key", key, "err", err)
		}
	}
}

// Start subscribes and relays invalidations until Stop. It returns once
// the subscription is confirmed.
func (b *Bus) Start(ctx context.Context) error {
	ctx, b.cancel = context.WithCancel(ctx)
	sub := b.rdb.Subscribe(ctx, b.channel)
	if _, err := sub.Receive(ctx); err != nil {
		sub.Close()
		b.cancel()
		close(b.done)
		return err
	}
	b.sub = sub
	go func() {
		defer close(b.done)
		defer sub.Close()
		broken := false
		for {
			msg, err := sub.ReceiveTimeout(ctx, time.Minute)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				if !isTimeout(err) && !broken {
					broken = true
					b.logger.Warn("cache invalidation subscription broken; dropping local caches", "err", err)
					b.dispatch("*")
				}
				continue
			}
			switch m := msg.(type) {
			case *redis.Message:
				b.dispatch(m.Payload)
			case *redis.Subscription:
				if broken {
					broken = false
					b.dispatch("*")
				}
			}
		}
	}()
	return nil
}

// Stop ends the subscription; it is idempotent.
func (b *Bus) Stop() {
	b.stopOnce.Do(func() {
		if b.cancel == nil {
			return // never started
		}
		b.cancel()
		if b.sub != nil {
			_ = b.sub.Close() // wakes the blocked read
		}
		<-b.done
	})
}

func isTimeout(err error) bool {
	type timeout interface{ Timeout() bool }
	t, ok := err.(timeout)
	return ok && t.Timeout()
}
