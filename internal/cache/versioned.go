package cache

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/singleflight"
)

// Versioned is the read-through cache of resources, shared by every API
// replica. What is cached depends on version tokens kept in Redis (one per
// resource, one per organization and type for type-wide ACL entries); a
// write replaces the tokens it affects before it answers, so a later read,
// on any replica, cannot match the old entry: no reader sees data older
// than a write it was told of. Entries live in this process (no round trip
// on a hit beyond reading the tokens) and in Redis (so replicas share a
// load), both with bounded TTLs. Concurrent misses of one key in a process
// wait for a single load (no stampede).
type Versioned struct {
	rdb    redis.UniversalClient
	prefix string
	ttl    time.Duration
	local  *Local[versionedEntry]
	group  singleflight.Group
	logger *slog.Logger
}

type versionedEntry struct {
	tokens string
	data   []byte
}

// ErrNoCache tells callers to read from the source: the cache cannot vouch
// for freshness (Redis unreachable).
var ErrNoCache error = bypassError{}

type bypassError struct{}

func (bypassError) Error() string { return "cache unavailable" }

// Bypass marks the error as "read the source instead".
func (bypassError) Bypass() bool { return true }

// NewVersioned returns a cache whose entries live ttl, holding at most
// maxLocal entries in this process.
func NewVersioned(rdb redis.UniversalClient, prefix string, ttl time.Duration, maxLocal int, logger *slog.Logger) *Versioned {
	return &Versioned{rdb: rdb, prefix: prefix + ":cache:", ttl: ttl, local: NewLocal[versionedEntry](maxLocal, ttl), logger: logger}
}

func (v *Versioned) tokenKey(dep string) string { return v.prefix + "v:" + dep }

func newToken() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// tokens reads the version tokens of deps, creating the missing ones.
func (v *Versioned) tokens(ctx context.Context, deps []string) (string, error) {
	keys := make([]string, len(deps))
	for i, d := range deps {
		keys[i] = v.tokenKey(d)
	}
	vals, err := v.rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return "", err
	}
	var missing []int
	for i, val := range vals {
		if val == nil {
			missing = append(missing, i)
		}
	}
	if len(missing) > 0 {
		// Creates each missing token unless another reader just did; the
		// second read returns whichever won.
		pipe := v.rdb.Pipeline()
		for _, i := range missing {
			pipe.SetNX(ctx, keys[i], newToken(), 2*v.ttl)
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return "", err
		}
		if vals, err = v.rdb.MGet(ctx, keys...).Result(); err != nil {
			return "", err
		}
	}
	parts := make([]string, len(vals))
	for i, val := range vals {
		s, ok := val.(string)
		if !ok {
			return "", errors.New("cache: a version token vanished")
		}
		parts[i] = s
	}
	return strings.Join(parts, "."), nil
}

// Get returns the data cached for key under the current tokens of deps,
// calling load on a miss. With Redis unreachable it returns ErrNoCache and
// the caller reads the source itself.
func (v *Versioned) Get(ctx context.Context, key string, deps []string, load func(context.Context) ([]byte, error)) ([]byte, error) {
	toks, err := v.tokens(ctx, deps)
	if err != nil {
		return nil, ErrNoCache
	}
	if e, ok := v.local.Get(key); ok && e.tokens == toks {
		return e.data, nil
	}
	sum := sha256.Sum256([]byte(key + "|" + toks))
	shared := v.prefix + "d:" + hex.EncodeToString(sum[:16])
	data, err, _ := v.group.Do(shared, func() (any, error) {
		if data, err := v.rdb.Get(ctx, shared).Bytes(); err == nil {
			v.local.Set(key, versionedEntry{tokens: toks, data: data})
			return data, nil
		}
		// The tokens were read before the load: a write committed during
		// the load replaces them, so this entry is never served after it.
		data, err := load(context.WithoutCancel(ctx))
		if err != nil {
			return nil, err
		}
		if err := v.rdb.Set(ctx, shared, data, v.ttl).Err(); err != nil {
			v.logger.WarnContext(ctx, "cache entry not shared", "err", err)
		}
		v.local.Set(key, versionedEntry{tokens: toks, data: data})
		return data, nil
	})
	if err != nil {
		return nil, err
	}
	return data.([]byte), nil
}

// Bump replaces the tokens of deps: everything cached under them is stale
// from now on, on every replica.
func (v *Versioned) Bump(ctx context.Context, deps ...string) error {
	pipe := v.rdb.Pipeline()
	for _, d := range deps {
		pipe.Set(ctx, v.tokenKey(d), newToken(), 2*v.ttl)
	}
	_, err := pipe.Exec(ctx)
	if err != nil {
		v.logger.ErrorContext(ctx, "cache versions not bumped: cached reads may be stale until their TTL", "deps", deps, "err", err)
	}
	return err
}
