package commands

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/metrics"
)

// Stats reads the queue's sizes with O(1) Redis calls (Asynq 0.26's key
// layout: asynq:{queue}:pending|active are lists, scheduled|retry|archived
// sorted sets; a task hash holds pending_since) and the backlog from
// Postgres.
func Stats(ctx context.Context, rdb redis.UniversalClient, store *Store, queue string) (metrics.QueueStats, error) {
	s := metrics.QueueStats{Queue: queue, Tasks: map[string]int64{}}
	base := "asynq:{" + queue + "}:"
	pipe := rdb.Pipeline()
	pending := pipe.LLen(ctx, base+"pending")
	active := pipe.LLen(ctx, base+"active")
	scheduled := pipe.ZCard(ctx, base+"scheduled")
	retry := pipe.ZCard(ctx, base+"retry")
	archived := pipe.ZCard(ctx, base+"archived")
	oldest := pipe.LIndex(ctx, base+"pending", -1)
	if _, err := pipe.Exec(ctx); err != nil && err != redis.Nil {
		return s, err
	}
	s.Tasks["pending"], s.Tasks["active"] = pending.Val(), active.Val()
	s.Tasks["scheduled"], s.Tasks["retry"], s.Tasks["archived"] = scheduled.Val(), retry.Val(), archived.Val()
	if id := oldest.Val(); id != "" {
		since, err := rdb.HGet(ctx, base+"t:"+id, "pending_since").Result()
		if err == nil {
			if ns, err := strconv.ParseInt(strings.TrimSpace(since), 10, 64); err == nil && ns > 0 {
				s.OldestPending = time.Since(time.Unix(0, ns))
			}
		}
	}
	var err error
	s.InFlight, s.Waiting, err = store.InFlight(ctx)
	return s, err
}
