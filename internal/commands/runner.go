package commands

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/internal/batch"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/secrets"
	"github.com/agentry/agentry/tasks"
)

// Why a command's context ended, as its cause.
var (
	errCanceled  = errors.New("canceled by request")
	errTimeout   = errors.New("timed out")
	errLeaseLost = errors.New("the worker lost the attempt's lease")
)

// maxResult is the largest result a command may return.
const maxResult = 1 << 20

// Runner is the worker side of the pipeline: the Asynq handler of command
// tasks, the heartbeat that keeps its leases and hears cancellations, and
// the progress reporters of the commands it runs.
type Runner struct {
	Dispatcher *Dispatcher
	Sealer     *secrets.Sealer
	Egress     tasks.Egress
	Logger     *slog.Logger
	Metrics    Metrics
	// WorkerID names this worker process in the commands it runs.
	WorkerID string
	// Heartbeat is how often leases are renewed; a lease lasts three.
	Heartbeat time.Duration
	// ProgressEvery throttles progress writes (default 250ms).
	ProgressEvery time.Duration
	// RecordLinger, if set, is how long an outcome waits for others to be
	// recorded with (see batch.Batcher.Linger).
	RecordLinger time.Duration
	// OnFinish is told of every command that ended (notifications).
	OnFinish func(ctx context.Context, c *platform.Command)
	// HandlerGrace is how long a handler may go on after its context ended
	// (cancel, timeout, shutdown) before the attempt ends without it
	// (default 10s).
	HandlerGrace time.Duration

	batchOnce sync.Once
	claims    *batch.Batcher[Attempt, *Claimed]
	endings   *batch.Batcher[Ending, *Finished]

	mu      sync.Mutex
	running map[string]*execution
	wg      sync.WaitGroup

	stopOnce sync.Once
	cancel   context.CancelFunc
	done     chan struct{}
}

type execution struct {
	attempt int
	cancel  context.CancelCauseFunc
}

func (r *Runner) store() *Store { return r.Dispatcher.Store }

// Claims and outcomes of the commands running at once go to PostgreSQL
// together, a statement for many (see batcher).
const (
	batchLanes = 1
	batchMax   = 64
)

func (r *Runner) batchers() {
	r.batchOnce.Do(func() {
		r.claims = batch.New(batchLanes, batchMax, func(ctx context.Context, in []Attempt) ([]*Claimed, error) {
			return r.store().ClaimMany(ctx, in, r.WorkerID, r.lease())
		})
		r.endings = batch.New(batchLanes, batchMax, r.store().FinishMany)
		r.endings.Linger = r.RecordLinger
	})
}

// claim claims an attempt, with the claims of other commands starting now.
func (r *Runner) claim(id string, attempt int) (*Claimed, error) {
	r.batchers()
	return r.claims.Do(Attempt{ID: id, Attempt: attempt})
}

// record records an outcome, with those of other commands ending now.
func (r *Runner) record(id string, attempt int, o Outcome) (*Finished, error) {
	r.batchers()
	return r.endings.Do(Ending{Attempt: Attempt{ID: id, Attempt: attempt}, Outcome: o})
}

func (r *Runner) lease() time.Duration { return 3 * r.Heartbeat }

// Start runs the heartbeat and the cancellation listener until Stop. They
// outlive ctx: a worker told to shut down keeps renewing the leases of the
// commands it drains, and keeps hearing their cancellations, until Stop.
func (r *Runner) Start(ctx context.Context) error {
	r.mu.Lock()
	if r.running == nil {
		r.running = map[string]*execution{}
	}
	r.mu.Unlock()
	if r.ProgressEvery == 0 {
		r.ProgressEvery = 250 * time.Millisecond
	}
	ctx, r.cancel = context.WithCancel(context.WithoutCancel(ctx))
	r.done = make(chan struct{})
	signals, err := r.Dispatcher.Events.Signals(ctx, CancelChannel)
	if err != nil {
		r.cancel()
		close(r.done)
		return fmt.Errorf("cancel signals: %w", err)
	}
	go func() {
		defer close(r.done)
		t := time.NewTicker(r.Heartbeat)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case id, ok := <-signals:
				if !ok {
					signals = nil
					continue
				}
				r.stop(id)
			case <-t.C:
				r.heartbeat(ctx)
			}
		}
	}()
	return nil
}

// Stop ends the heartbeat, after the commands still running have been
// handed back (Asynq's shutdown waits for them first). It is idempotent.
func (r *Runner) Stop() {
	r.stopOnce.Do(func() {
		r.wg.Wait()
		if r.cancel != nil {
			r.cancel()
			<-r.done
		}
	})
}

// stop cancels a command this worker runs.
func (r *Runner) stop(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.running[id]; ok {
		e.cancel(errCanceled)
	}
}

func (r *Runner) heartbeat(ctx context.Context) {
	r.mu.Lock()
	held := make([]Attempt, 0, len(r.running))
	for id, e := range r.running {
		held = append(held, Attempt{ID: id, Attempt: e.attempt})
	}
	r.mu.Unlock()
	if len(held) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, r.Heartbeat)
	defer cancel()
	stop, lost, err := r.store().Heartbeat(ctx, r.WorkerID, held, r.lease())
	if err != nil {
		r.Logger.WarnContext(ctx, "heartbeat failed", "err", err)
		return
	}
	for _, id := range stop {
		r.stop(id)
	}
	// An attempt whose lease lapsed (the reconciler gave the command to
	// another worker) must not run on: its handler is stopped.
	for _, a := range lost {
		r.mu.Lock()
		if e, ok := r.running[a.ID]; ok && e.attempt == a.Attempt {
			e.cancel(errLeaseLost)
		}
		r.mu.Unlock()
	}
}

// ProcessTask is the Asynq handler of command tasks. It returns an error
// only when Postgres cannot be reached, so that Asynq tries again; every
// outcome of the command itself is recorded in Postgres.
func (r *Runner) ProcessTask(ctx context.Context, t *asynq.Task) error {
	var p taskPayload
	if err := json.Unmarshal(t.Payload(), &p); err != nil || p.ID == "" {
		return fmt.Errorf("malformed command task: %w", asynq.SkipRetry)
	}
	c, err := r.claim(p.ID, p.Attempt)
	if err != nil {
		return fmt.Errorf("claim %s: %w", TaskID(p.ID, p.Attempt), err)
	}
	if c == nil {
		return nil // not this attempt's to run: claimed, cancelled or finished already
	}
	r.wg.Add(1)
	defer r.wg.Done()
	if r.Metrics != nil {
		since := c.CreatedAt
		if c.AdmittedAt != nil && c.Attempt > 1 {
			since = *c.AdmittedAt
		}
		r.Metrics.Started(c.Task, time.Since(since))
	}
	// The claim started the command; telling the world is not on the way
	// to its handler. Later events of the command wait for this one, so
	// that they keep their order: one goroutine publishes it, then does
	// what follows the outcome once finish hands it over.
	c.announced = make(chan struct{})
	c.after = make(chan *afterward, 1)
	running := c.Command // the handler's progress changes c as this goes
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		actx := context.WithoutCancel(ctx)
		if c.AgentChanged {
			r.Dispatcher.agentChanged(actx, c.AgentID)
		}
		publishCommand(actx, r.Dispatcher.Events, r.Logger, "command.running", &running)
		close(c.announced)
		if a := <-c.after; a != nil {
			r.followUp(actx, c, a.done, a.outcome, a.ran)
		}
	}()
	if c.OrgFull {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.Dispatcher.AdmitOrg(context.WithoutCancel(ctx), c.OrgID) // a slot of the organization's queue freed
		}()
	}

	started := time.Now()
	outcome := r.execute(ctx, c)
	r.finish(ctx, c, outcome, time.Since(started))
	return nil
}

// execute runs the handler of a claimed command and says how it ended.
func (r *Runner) execute(ctx context.Context, c *Claimed) Outcome {
	def, ok := tasks.Lookup(c.Task)
	if !ok {
		return failure(fmt.Sprintf("this worker has no task %q", c.Task))
	}
	run := &tasks.Run{CommandID: c.ID, AgentID: c.AgentID, OrgID: c.OrgID, Attempt: c.Attempt,
		Config: c.AgentConfig, Variables: map[string]string{}, Secrets: map[string]string{}, Egress: r.Egress}
	if c.AgentEnvironmentID != nil {
		if err := r.loadEnvironment(ctx, *c.AgentEnvironmentID, run); err != nil {
			r.Logger.WarnContext(ctx, "environment not loaded", "command_id", c.ID, "err", err)
			return failure("the agent's environment could not be loaded")
		}
	}

	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	runCtx, cancelTimeout := context.WithTimeoutCause(runCtx, time.Duration(c.TimeoutS)*time.Second, errTimeout)
	defer cancelTimeout()
	mine := &execution{attempt: c.Attempt, cancel: cancel}
	r.mu.Lock()
	if old, ok := r.running[c.ID]; ok {
		old.cancel(errLeaseLost) // an older attempt still here lost its lease
	}
	r.running[c.ID] = mine
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		if r.running[c.ID] == mine {
			delete(r.running, c.ID)
		}
		r.mu.Unlock()
	}()

	rep := r.newReporter(ctx, &c.Command, c.announced)
	run.Progress = rep
	result, err := r.await(runCtx, c, def, run)
	o := r.outcome(ctx, runCtx, c, def, result, err)
	if percent, message, pending := rep.close(); pending {
		o.Progress, o.Message = &percent, &message // written with the outcome
	}
	return o
}

// await runs the handler and returns what it returned, or, if it goes on
// for HandlerGrace after its context ended (it ignores its context), gives
// up on it with the context's cause: a cancel or a timeout must end the
// command even then, or it would hold its agent's slot for good.
func (r *Runner) await(runCtx context.Context, c *Claimed, def *tasks.Definition, run *tasks.Run) (any, error) {
	type returned struct {
		result any
		err    error
	}
	out := make(chan returned, 1)
	go func() {
		result, err := safeExecute(runCtx, def, run, c.Payload)
		out <- returned{result, err}
	}()
	select {
	case ret := <-out:
		return ret.result, ret.err
	case <-runCtx.Done():
	}
	grace := r.HandlerGrace
	if grace <= 0 {
		grace = 10 * time.Second
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case ret := <-out:
		return ret.result, ret.err
	case <-t.C:
		r.Logger.Warn("the handler did not stop after its context ended; the attempt ends without it", "command_id", c.ID, "attempt", c.Attempt, "task", c.Task, "grace", grace)
		return nil, context.Cause(runCtx)
	}
}

// outcome says how an attempt ended from what the handler returned and why
// its context ended.
func (r *Runner) outcome(ctx, runCtx context.Context, c *Claimed, def *tasks.Definition, result any, err error) Outcome {
	cause := context.Cause(runCtx)
	switch {
	case err == nil:
		raw, merr := json.Marshal(result)
		if merr != nil {
			return failure("the result is not JSON: " + merr.Error())
		}
		if holdsNUL(raw) {
			// PostgreSQL's jsonb holds no NUL character.
			return failure("the result holds a NUL character (\\u0000), which cannot be stored; encode binary data, as base64 say")
		}
		if len(raw) > maxResult {
			return failure(fmt.Sprintf("the result is %d bytes; at most %d", len(raw), maxResult))
		}
		return Outcome{Status: platform.CommandSucceeded, Event: "succeeded", Result: raw}
	case errors.Is(cause, errLeaseLost):
		// Another attempt has the command: this outcome will be refused.
		return Outcome{Status: platform.CommandQueued, Event: "requeued"}
	case errors.Is(cause, errCanceled):
		msg := "canceled"
		return Outcome{Status: platform.CommandCanceled, Event: "canceled", Error: &msg}
	case errors.Is(err, asynq.SkipRetry) || errors.Is(err, tasks.ErrBadPayload):
		return failure(cleanError(err))
	case errors.Is(cause, errTimeout):
		return r.retryable(c, def, fmt.Sprintf("timed out after %ds", c.TimeoutS))
	case ctx.Err() != nil:
		// The worker is shutting down: hand the command back, untried.
		return Outcome{Status: platform.CommandQueued, Event: "requeued"}
	default:
		return r.retryable(c, def, cleanError(err))
	}
}

// safeExecute runs the handler, turning a panic into a failed attempt.
func safeExecute(ctx context.Context, def *tasks.Definition, run *tasks.Run, payload json.RawMessage) (result any, err error) {
	defer func() {
		if rec := recover(); rec != nil {
			err = fmt.Errorf("the task panicked: %v", rec)
		}
	}()
	return def.Execute(ctx, run, payload)
}

// failure is the outcome of an attempt that must not be retried.
func failure(msg string) Outcome {
	return Outcome{Status: platform.CommandFailed, Event: "failed", Error: &msg, Failed: true}
}

// retryable is the outcome of a failed attempt: a retry after the task's
// backoff while retries remain, else failed.
func (r *Runner) retryable(c *Claimed, def *tasks.Definition, msg string) Outcome {
	if c.Failures+1 > c.MaxRetries {
		return Outcome{Status: platform.CommandFailed, Event: "failed", Error: &msg, Failed: true}
	}
	at := time.Now().Add(def.Backoff(c.Failures + 1))
	return Outcome{Status: platform.CommandQueued, Event: "retrying", Error: &msg, Failed: true, NotBefore: &at}
}

func cleanError(err error) string {
	return platform.Storable(strings.TrimSuffix(err.Error(), ": "+asynq.SkipRetry.Error()), 4000)
}

// holdsNUL reports whether JSON text escapes a NUL character (\u0000, not
// an escaped backslash followed by u0000).
func holdsNUL(raw []byte) bool {
	for i := bytes.Index(raw, []byte(`\u0000`)); i >= 0; {
		slashes := 0
		for j := i - 1; j >= 0 && raw[j] == '\\'; j-- {
			slashes++
		}
		if slashes%2 == 0 {
			return true
		}
		next := bytes.Index(raw[i+1:], []byte(`\u0000`))
		if next < 0 {
			return false
		}
		i += 1 + next
	}
	return false
}

// afterward is a recorded outcome, for what follows it (see followUp).
type afterward struct {
	done    *Finished
	outcome Outcome
	ran     time.Duration
}

// finish records the outcome (retrying while Postgres is unreachable),
// publishes it, re-enqueues a retry and admits the agent's next command.
// It hands the command's goroutine what follows the outcome (nil when it
// was not recorded), once.
func (r *Runner) finish(ctx context.Context, c *Claimed, o Outcome, ran time.Duration) {
	var next *afterward
	defer func() { c.after <- next }()
	wctx := context.WithoutCancel(ctx)
	var done *Finished
	err := retryDB(wctx, 30*time.Second, func() error {
		var err error
		done, err = r.record(c.ID, c.Attempt, o)
		return err
	})
	if err != nil && !transient(err) {
		// The database refused the outcome itself (a value it cannot
		// hold): end the attempt failed with why, rather than leave it to
		// its lease and run it again.
		r.Logger.ErrorContext(ctx, "outcome refused by the database; recording a failure", "command_id", c.ID, "attempt", c.Attempt, "err", err)
		o = failure("the outcome could not be stored: " + platform.Storable(err.Error(), 1000))
		done, err = r.record(c.ID, c.Attempt, o)
	}
	if err != nil {
		r.Logger.ErrorContext(ctx, "outcome not recorded; the lease will expire and the command run again", "command_id", c.ID, "attempt", c.Attempt, "err", err)
		return
	}
	if done == nil {
		r.Logger.WarnContext(ctx, "outcome refused: this worker no longer holds the attempt", "command_id", c.ID, "attempt", c.Attempt)
		return
	}
	if done.Status != o.Status {
		o.Event = done.Status // a retry of a command being cancelled ended it canceled
	}
	if done.Status == platform.CommandQueued {
		// A retry or a hand-back: its next attempt goes to the queue before
		// this one leaves it.
		var delay time.Duration
		if o.NotBefore != nil {
			delay = time.Until(*o.NotBefore)
		}
		if err := r.Dispatcher.Queue.Enqueue(wctx, done.ID, done.Attempt+1, time.Duration(done.TimeoutS)*time.Second, delay); err != nil {
			r.Logger.WarnContext(wctx, "retry not enqueued; the reconciler will", "command_id", done.ID, "err", err)
		}
	}
	// The outcome is recorded: free the queue's worker slot for the next
	// command now, and tell the world in the background (Stop waits).
	next = &afterward{done: done, outcome: o, ran: ran}
}

// followUp does what follows a recorded outcome: metrics, the event, and
// for a command that ended, the notification and the admission of what
// waited for the slots it freed.
func (r *Runner) followUp(wctx context.Context, c *Claimed, done *Finished, o Outcome, ran time.Duration) {
	if r.Metrics != nil {
		switch o.Event {
		case "retrying":
			r.Metrics.Retried(c.Task)
		case "requeued":
		default:
			r.Metrics.Finished(c.Task, done.Status, ran)
		}
	}
	if done.AgentChanged {
		r.Dispatcher.agentChanged(wctx, done.AgentID)
	}
	publishCommand(wctx, r.Dispatcher.Events, r.Logger, "command."+o.Event, &done.Command)
	if done.Status == platform.CommandQueued {
		return // its next attempt is queued already
	}
	if r.OnFinish != nil {
		r.OnFinish(wctx, &done.Command)
	}
	// A slot of the agent freed, and one of its organization: admit what
	// waits for them, seen now that the outcome is committed (a dispatch
	// that found the agent full just before is not missed). The agent's
	// own backlog takes its slot; the organization's slot is for another
	// agent only if the organization was at its limit (otherwise whatever
	// waits, waits for its own agent, whose outcome admits it). Without a
	// backlog this is one cheap query.
	if done.OrgFull {
		r.Dispatcher.AdmitOrg(wctx, done.OrgID)
	} else {
		r.Dispatcher.Admit(wctx, done.AgentID)
	}
}

// retryDB runs fn until it succeeds, or fails with anything but an
// unreachable database, or the time is up.
func retryDB(ctx context.Context, within time.Duration, fn func() error) error {
	deadline := time.Now().Add(within)
	wait := 100 * time.Millisecond
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) || !transient(err) {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		wait = min(2*wait, 2*time.Second)
	}
}

// transient is set by the worker to recognise an unreachable database.
var transient = func(err error) bool { return true }

// SetTransient installs the classifier of retryable database errors.
func SetTransient(fn func(error) bool) { transient = fn }

func (r *Runner) loadEnvironment(ctx context.Context, id string, run *tasks.Run) error {
	env, err := r.store().Environment(ctx, id)
	if err != nil || env == nil {
		return err
	}
	run.Variables = env.Variables()
	for name, sealed := range env.Secrets {
		s, ok := sealed.(string)
		if !ok {
			continue
		}
		value, err := r.Sealer.Open(env.ID, name, s)
		if err != nil {
			return fmt.Errorf("secret %s: %w", name, err)
		}
		run.Secrets[name] = value
	}
	return nil
}

// reporter throttles a handler's progress: the latest report and the log
// lines are written and published at most every ProgressEvery.
type reporter struct {
	r   *Runner
	ctx context.Context
	cmd *platform.Command
	// announced is closed once the command's running event is out.
	announced <-chan struct{}
	mu        sync.Mutex
	percent   int
	message   string
	dirty     bool
	lines     []string
	dropped   int
	// started tells that the loop runs: it starts at the first report, so
	// a handler that reports nothing costs no goroutine nor timer.
	started bool
	closed  bool
	stop    chan struct{}
	done    chan struct{}
}

func (r *Runner) newReporter(ctx context.Context, c *platform.Command, announced <-chan struct{}) *reporter {
	return &reporter{r: r, ctx: context.WithoutCancel(ctx), cmd: c, percent: c.Progress, announced: announced,
		stop: make(chan struct{}), done: make(chan struct{})}
}

func (rep *reporter) Report(percent int, message string) {
	percent = max(0, min(100, percent))
	message = platform.Storable(message, 1000)
	rep.mu.Lock()
	rep.percent, rep.message, rep.dirty = percent, message, true
	rep.startLocked()
	rep.mu.Unlock()
}

func (rep *reporter) Log(line string) {
	line = platform.Storable(line, 2000)
	rep.mu.Lock()
	if len(rep.lines) < 100 {
		rep.lines = append(rep.lines, line)
	} else {
		rep.dropped++
	}
	rep.startLocked()
	rep.mu.Unlock()
}

// startLocked starts the loop that writes the reports, once, unless the
// reporter is closed (a handler's stray goroutine may report after it
// returned: such a report is dropped). rep.mu is held.
func (rep *reporter) startLocked() {
	if !rep.started && !rep.closed {
		rep.started = true
		go rep.loop()
	}
}

func (rep *reporter) loop() {
	defer close(rep.done)
	t := time.NewTicker(rep.r.ProgressEvery)
	defer t.Stop()
	for {
		select {
		case <-rep.stop:
			rep.flush(true)
			return
		case <-t.C:
			rep.flush(false)
		}
	}
}

// close stops the reporter. Log lines still pending are written, with the
// progress; a progress report alone is returned (pending true) for the
// outcome to record, instead of a write of its own.
func (rep *reporter) close() (percent int, message string, pending bool) {
	rep.mu.Lock()
	rep.closed = true
	started := rep.started
	rep.mu.Unlock()
	if started {
		close(rep.stop)
		<-rep.done
	}
	rep.mu.Lock()
	defer rep.mu.Unlock()
	return rep.percent, rep.message, rep.dirty
}

func (rep *reporter) flush(final bool) {
	rep.mu.Lock()
	percent, message, dirty := rep.percent, rep.message, rep.dirty
	lines, dropped := rep.lines, rep.dropped
	if final && len(lines) == 0 && dropped == 0 {
		rep.mu.Unlock()
		return // close hands the progress to the outcome
	}
	rep.dirty, rep.lines, rep.dropped = false, nil, 0
	rep.mu.Unlock()
	if dropped > 0 {
		lines = append(lines, fmt.Sprintf("(%d more lines dropped: logging too fast)", dropped))
	}
	if !dirty && len(lines) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(rep.ctx, 10*time.Second) // the outcome waits for the last write
	ok, err := rep.r.store().Progress(ctx, rep.cmd.ID, rep.cmd.Attempt, percent, message, lines)
	cancel()
	if err != nil {
		rep.r.Logger.Warn("progress not recorded", "command_id", rep.cmd.ID, "err", err)
		return
	}
	if !ok {
		return
	}
	rep.cmd.Progress, rep.cmd.Message = percent, message
	typ := "command.progress"
	data := any(SnapshotOf(rep.cmd))
	if len(lines) > 0 {
		typ = "command.log"
		data = struct {
			Snapshot
			Lines []string `json:"lines"`
		}{SnapshotOf(rep.cmd), lines}
	}
	if rep.announced != nil {
		<-rep.announced
	}
	if err := rep.r.Dispatcher.Events.Publish(rep.ctx, typ, data, events.CommandTopic(rep.cmd.ID), events.AgentTopic(rep.cmd.AgentID)); err != nil {
		rep.r.Logger.Warn("progress not published", "command_id", rep.cmd.ID, "err", err)
	}
}
