// Package cache is agentry's cache: a bounded in-process cache with expiry
// for what every request needs (principals, sessions, keys), a read-through
// Redis cache shared by the API replicas, and a Redis pub/sub bus that
// carries invalidations to every replica.
package cache

import (
	"strings"
	"sync"
	"time"
)

// Local is a bounded in-process cache whose entries expire after a TTL.
// It is safe for concurrent use.
type Local[V any] struct {
	mu    sync.Mutex
	items map[string]localItem[V]
	max   int
	ttl   time.Duration
	now   func() time.Time
}

type localItem[V any] struct {
	v   V
	exp time.Time
}

// NewLocal returns a cache of at most max entries living ttl each.
func NewLocal[V any](max int, ttl time.Duration) *Local[V] {
	return &Local[V]{items: make(map[string]localItem[V]), max: max, ttl: ttl, now: time.Now}
}

// Get returns the live entry for key.
func (c *Local[V]) Get(key string) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	it, ok := c.items[key]
	if !ok || c.now().After(it.exp) {
		var zero V
		return zero, false
	}
	return it.v, true
}

// Set stores v under key. When the cache is full it drops expired entries,
// then, if still full, an arbitrary tenth of the rest.
func (c *Local[V]) Set(key string, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.items) >= c.max {
		now := c.now()
		for k, it := range c.items {
			if now.After(it.exp) {
				delete(c.items, k)
			}
		}
		for k := range c.items {
			if len(c.items) < c.max-c.max/10 {
				break
			}
			delete(c.items, k)
		}
	}
	c.items[key] = localItem[V]{v: v, exp: c.now().Add(c.ttl)}
}

// Delete drops keys. A key ending in "*" drops every key with that prefix;
// "*" alone drops everything.
func (c *Local[V]) Delete(keys ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, key := range keys {
		prefix, wild := strings.CutSuffix(key, "*")
		if !wild {
			delete(c.items, key)
			continue
		}
		for k := range c.items {
			if strings.HasPrefix(k, prefix) {
				delete(c.items, k)
			}
		}
	}
}

// Len returns the number of entries, live or expired.
func (c *Local[V]) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.items)
}
