package commands

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/platform"
)

// Repairs counts what one reconciliation pass healed.
type Repairs struct {
	LeasesExpired int // running commands whose worker died
	Requeued      int // admitted commands Redis no longer held
	Admitted      int // backlog admitted
	Swept         int64
}

// ReconcileMetrics is told of every repair.
type ReconcileMetrics interface {
	Repaired(kind string, n int)
}

// Reconciler heals what Redis lost or a crash left behind. It runs in the
// scheduler's leader: commands whose worker stopped renewing its lease are
// retried (or ended); admitted commands whose queue task is gone are
// re-enqueued; backlogs are admitted; old commands are swept.
type Reconciler struct {
	Dispatcher *Dispatcher
	Redis      redis.UniversalClient
	Inspector  *asynq.Inspector
	Logger     *slog.Logger
	Metrics    ReconcileMetrics
	Interval   time.Duration
	Retention  time.Duration
	// OnFinish is told of commands a pass ended (their worker died).
	OnFinish func(ctx context.Context, c *platform.Command)

	stopOnce sync.Once
	cancel   context.CancelFunc
	done     chan struct{}
	lastSwep time.Time
}

// Start reconciles every Interval until Stop.
func (r *Reconciler) Start(ctx context.Context) error {
	ctx, r.cancel = context.WithCancel(ctx)
	r.done = make(chan struct{})
	go func() {
		defer close(r.done)
		t := time.NewTicker(r.Interval)
		defer t.Stop()
		for {
			if _, err := r.Pass(ctx); err != nil && ctx.Err() == nil {
				r.Logger.WarnContext(ctx, "reconciliation pass failed", "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// Stop ends the loop; it is idempotent.
func (r *Reconciler) Stop() {
	r.stopOnce.Do(func() {
		if r.cancel == nil {
			return
		}
		r.cancel()
		<-r.done
	})
}

// Pass runs one reconciliation.
func (r *Reconciler) Pass(ctx context.Context) (Repairs, error) {
	var rep Repairs
	d := r.Dispatcher
	expired, err := d.Store.ExpireLeases(ctx, 1000)
	if err != nil {
		return rep, err
	}
	rep.LeasesExpired = len(expired)
	for _, c := range expired {
		d.agentChanged(ctx, c.AgentID)
		if d.Metrics != nil {
			if c.Status == platform.CommandQueued {
				d.Metrics.Retried(c.Task)
			} else {
				d.Metrics.Ended(c.Task, c.Status)
			}
		}
		typ := "command." + c.Status
		if c.Status == platform.CommandQueued {
			typ = "command.retrying"
			if err := d.Queue.Enqueue(ctx, c.ID, c.Attempt+1, time.Duration(c.TimeoutS)*time.Second, 0); err != nil {
				r.Logger.WarnContext(ctx, "re-enqueue failed", "command_id", c.ID, "err", err)
			}
		} else if r.OnFinish != nil {
			r.OnFinish(ctx, c)
		}
		d.Publish(ctx, typ, c)
		if c.Status != platform.CommandQueued {
			d.Admit(ctx, c.AgentID)
		}
	}

	lost, err := r.requeueLost(ctx)
	if err != nil {
		return rep, err
	}
	rep.Requeued = lost
	rep.Admitted = d.AdmitOrg(ctx, "")
	if time.Since(r.lastSwep) > time.Minute {
		r.lastSwep = time.Now()
		if rep.Swept, err = d.Store.Sweep(ctx, r.Retention); err != nil {
			return rep, err
		}
		fixed, err := d.Store.FixAgentStatuses(ctx)
		if err != nil {
			return rep, err
		}
		for _, id := range fixed {
			d.agentChanged(ctx, id)
		}
	}
	if r.Metrics != nil {
		r.Metrics.Repaired("lease_expired", rep.LeasesExpired)
		r.Metrics.Repaired("requeued", rep.Requeued)
		r.Metrics.Repaired("admitted", rep.Admitted)
	}
	if rep.LeasesExpired+rep.Requeued > 0 {
		r.Logger.InfoContext(ctx, "reconciled", "leases_expired", rep.LeasesExpired, "requeued", rep.Requeued, "admitted", rep.Admitted)
	}
	return rep, nil
}

// requeueLost re-enqueues admitted commands whose next attempt's task is
// not in Redis (flushed, or enqueued after a crash that never happened),
// those whose task died in Asynq's archive, and those whose task a worker
// dequeued and died with before it claimed the attempt.
func (r *Reconciler) requeueLost(ctx context.Context) (int, error) {
	d := r.Dispatcher
	waiting, err := d.Store.Unqueued(ctx, 2*time.Second, 5000)
	if err != nil || len(waiting) == 0 {
		return 0, err
	}
	pipe := r.Redis.Pipeline()
	states := make([]*redis.StringCmd, len(waiting))
	for i, c := range waiting {
		// The task's state field: pending, active, scheduled, retry, archived, completed.
		states[i] = pipe.HGet(ctx, d.Queue.TaskKey(c.ID, c.Attempt+1), "state")
	}
	if _, err := pipe.Exec(ctx); err != nil && err != redis.Nil {
		return 0, err
	}
	n := 0
	for i, c := range waiting {
		state, err := states[i].Result()
		switch {
		case err == redis.Nil:
		case err != nil:
			continue
		case state == "archived" || state == "completed":
			// Its id must be free again, or the enqueue below would be a
			// silent no-op (the queue deduplicates by id).
			if r.Inspector == nil {
				continue
			}
			if err := r.Inspector.DeleteTask(d.Queue.Name(), TaskID(c.ID, c.Attempt+1)); err != nil {
				r.Logger.WarnContext(ctx, "a finished queue task could not be removed; retrying next pass", "command_id", c.ID, "err", err)
				continue
			}
		case state == "active":
			// Dequeued but never claimed: if the worker's Asynq lease
			// lapsed, it died in between. Take the task back.
			taken, err := d.Queue.takeBackLapsed(ctx, r.Redis, TaskID(c.ID, c.Attempt+1))
			if err != nil || !taken {
				continue
			}
		default:
			continue
		}
		var delay time.Duration
		if c.NotBefore != nil {
			delay = time.Until(*c.NotBefore)
		}
		if err := d.Queue.Enqueue(ctx, c.ID, c.Attempt+1, time.Duration(c.TimeoutS)*time.Second, delay); err != nil {
			r.Logger.WarnContext(ctx, "re-enqueue failed", "command_id", c.ID, "err", err)
			continue
		}
		n++
	}
	return n, nil
}
