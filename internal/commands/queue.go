// Package commands is agentry's command pipeline: dispatching commands to
// agents, admitting them from the PostgreSQL backlog to the Asynq queue
// within each agent's and organization's limits, running them on workers
// with progress and reliable cancellation, and reconciling what a crash or
// a Redis flush left behind.
//
// PostgreSQL is the truth. A command is queued in Postgres first; admission
// marks it admitted and enqueues an Asynq task whose id is the command id
// and the attempt it may claim ("id:attempt"). A worker claims an attempt
// with a conditional UPDATE (the fence): it writes progress and the outcome
// only while it holds that attempt, so a stale worker can never end a
// command twice, and two deliveries of one task never run the same attempt.
package commands

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// TaskType is the Asynq task type of every command; the task only names the
// command and attempt, the rest is read from Postgres.
const TaskType = "agentry:command"

// taskPayload is the Asynq task payload.
type taskPayload struct {
	ID      string `json:"id"`
	Attempt int    `json:"attempt"`
}

// Queue enqueues command attempts.
type Queue struct {
	client *asynq.Client
	name   string
}

// QueueName is the Asynq queue of an installation's commands.
func QueueName(prefix string) string { return prefix + "-commands" }

// NewQueue returns a queue on an Asynq client.
func NewQueue(client *asynq.Client, prefix string) *Queue {
	return &Queue{client: client, name: QueueName(prefix)}
}

// Name is the Asynq queue name.
func (q *Queue) Name() string { return q.name }

// TaskID is the Asynq task id of an attempt of a command.
func TaskID(commandID string, attempt int) string { return commandID + ":" + strconv.Itoa(attempt) }

// ParseTaskID splits a task id.
func ParseTaskID(id string) (string, int, bool) {
	cmd, n, ok := strings.Cut(id, ":")
	attempt, err := strconv.Atoi(n)
	return cmd, attempt, ok && err == nil
}

// Enqueue hands attempt of command id to the workers, after delay. A task
// that is already queued is not an error: the queue deduplicates by id.
func (q *Queue) Enqueue(ctx context.Context, id string, attempt int, timeout, delay time.Duration) error {
	payload, _ := json.Marshal(taskPayload{ID: id, Attempt: attempt})
	opts := []asynq.Option{
		asynq.Queue(q.name),
		asynq.TaskID(TaskID(id, attempt)),
		// Asynq retries a task only when its claim could not reach
		// PostgreSQL (the handler's own failures are the pipeline's
		// retries); the claim's fence makes a repeat harmless.
		asynq.MaxRetry(5),
		// The worker enforces the command's timeout; this is a backstop.
		asynq.Timeout(timeout + time.Minute),
	}
	if delay > 0 {
		opts = append(opts, asynq.ProcessIn(delay))
	}
	_, err := q.client.EnqueueContext(ctx, asynq.NewTask(TaskType, payload), opts...)
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("enqueue %s: %w", TaskID(id, attempt), err)
	}
	return nil
}

// TaskKey is the Redis key Asynq keeps a task under (Asynq 0.26's layout:
// asynq:{queue}:t:<id>). The reconciler checks it to find commands Redis
// no longer holds.
func (q *Queue) TaskKey(id string, attempt int) string {
	return "asynq:{" + q.name + "}:t:" + TaskID(id, attempt)
}

// takeBack removes the active task KEYS[1] (id ARGV[1]) from the active
// list KEYS[2] and the lease set KEYS[3] if its lease expired before
// ARGV[2] (unix seconds): the worker that dequeued it stopped renewing the
// lease, so it died. Returns 1 if it took the task back, else 0. (Asynq
// 0.26's layout: the lease set scores task ids by lease expiry.)
var takeBack = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
local lease = redis.call('ZSCORE', KEYS[3], ARGV[1])
if lease and tonumber(lease) >= tonumber(ARGV[2]) then return 0 end
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1])
return 1`)

// takeBackLapsed removes the active task id from Asynq if the worker that
// dequeued it let its lease lapse, so that it can be enqueued again.
func (q *Queue) takeBackLapsed(ctx context.Context, rdb redis.UniversalClient, id string) (bool, error) {
	base := "asynq:{" + q.name + "}:"
	n, err := takeBack.Run(ctx, rdb, []string{base + "t:" + id, base + "active", base + "lease"}, id, time.Now().Unix()).Int()
	return n == 1, err
}
