package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

var latencyBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60}

// Commands counts the command pipeline. Labels are the task type and the
// outcome: never an agent or command id.
type Commands struct {
	dispatched *prometheus.CounterVec
	started    *prometheus.CounterVec
	finished   *prometheus.CounterVec
	retries    *prometheus.CounterVec
	wait       *prometheus.HistogramVec
	run        *prometheus.HistogramVec
}

// NewCommands registers the pipeline's metrics on r.
func NewCommands(r *Registry) *Commands {
	m := &Commands{
		dispatched: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "commands", Name: "dispatched_total",
			Help: "Commands accepted by the API, by task."}, []string{"task"}),
		started: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "commands", Name: "started_total",
			Help: "Command attempts started by workers, by task."}, []string{"task"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "commands", Name: "finished_total",
			Help: "Commands that ended, by task and outcome (succeeded, failed, canceled)."}, []string{"task", "outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "commands", Name: "retries_total",
			Help: "Failed attempts that will be retried, by task."}, []string{"task"}),
		wait: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Subsystem: "commands", Name: "dispatch_to_start_seconds",
			Help: "Time from a command's acceptance to its first attempt starting, by task.", Buckets: latencyBuckets}, []string{"task"}),
		run: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Subsystem: "commands", Name: "run_seconds",
			Help: "Time an attempt ran, by task.", Buckets: latencyBuckets}, []string{"task"}),
	}
	r.MustRegister(m.dispatched, m.started, m.finished, m.retries, m.wait, m.run)
	return m
}

// Init creates the series of every task and outcome at zero, so that
// dashboards and alerts see them before the first command.
func (m *Commands) Init(tasks []string) {
	for _, t := range tasks {
		m.dispatched.WithLabelValues(t)
		m.started.WithLabelValues(t)
		m.retries.WithLabelValues(t)
		m.wait.WithLabelValues(t)
		m.run.WithLabelValues(t)
		for _, o := range []string{"succeeded", "failed", "canceled"} {
			m.finished.WithLabelValues(t, o)
		}
	}
}

func (m *Commands) Dispatched(task string) { m.dispatched.WithLabelValues(task).Inc() }
func (m *Commands) Started(task string, waited time.Duration) {
	m.started.WithLabelValues(task).Inc()
	m.wait.WithLabelValues(task).Observe(waited.Seconds())
}
func (m *Commands) Finished(task, outcome string, ran time.Duration) {
	m.finished.WithLabelValues(task, outcome).Inc()
	m.run.WithLabelValues(task).Observe(ran.Seconds())
}
func (m *Commands) Retried(task string) { m.retries.WithLabelValues(task).Inc() }

// Ended counts a command that ended without a worker running it to the end
// (cancelled while queued, or its worker died).
func (m *Commands) Ended(task, outcome string) { m.finished.WithLabelValues(task, outcome).Inc() }

// Scheduler counts the scheduler's work.
type Scheduler struct {
	Leader   prometheus.Gauge
	fires    prometheus.Counter
	misfires prometheus.Counter
	repairs  *prometheus.CounterVec
}

// NewScheduler registers the scheduler's metrics on r.
func NewScheduler(r *Registry) *Scheduler {
	m := &Scheduler{
		Leader: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "scheduler", Name: "leader",
			Help: "1 while this scheduler replica leads (fires schedules and reconciles), else 0."}),
		fires: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "scheduler", Name: "fires_total",
			Help: "Commands created by schedules."}),
		misfires: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "scheduler", Name: "misfires_total",
			Help: "Schedule fire times missed (skipped, or folded into one run)."}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "reconciler", Name: "repairs_total",
			Help: "What the reconciler healed, by kind: lease_expired (a worker died), requeued (Redis lost the task), admitted (a backlog moved)."}, []string{"kind"}),
	}
	r.MustRegister(m.Leader, m.fires, m.misfires, m.repairs)
	for _, kind := range []string{"lease_expired", "requeued", "admitted"} {
		m.repairs.WithLabelValues(kind)
	}
	return m
}

func (m *Scheduler) Fired(n int)    { m.fires.Add(float64(n)) }
func (m *Scheduler) Misfired(n int) { m.misfires.Add(float64(n)) }
func (m *Scheduler) Repaired(kind string, n int) {
	if n > 0 {
		m.repairs.WithLabelValues(kind).Add(float64(n))
	}
}

// Access counts refused credentials and denied decisions.
type Access struct {
	authFailures *prometheus.CounterVec
	denials      *prometheus.CounterVec
}

// NewAccess registers the access metrics on r.
func NewAccess(r *Registry) *Access {
	m := &Access{
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "auth", Name: "failures_total",
			Help: "Refused credentials, by reason (missing, bad_token, revoked, bad_key, disabled, not_member, bad_ticket, bad_password, throttled, refresh_reuse)."}, []string{"reason"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "access", Name: "denials_total",
			Help: "Access decisions that denied, by reason."}, []string{"reason"}),
	}
	r.MustRegister(m.authFailures, m.denials)
	for _, reason := range []string{"missing", "bad_token", "revoked", "bad_key", "disabled", "not_member", "bad_password", "throttled", "refresh_reuse", "bad_ticket"} {
		m.authFailures.WithLabelValues(reason)
	}
	for _, reason := range []string{"key_scope", "tenant", "no_org", "deny_entry", "no_grant", "admins_only", "not_acl_admin", "other"} {
		m.denials.WithLabelValues(reason)
	}
	return m
}

func (m *Access) AuthFailure(reason string) { m.authFailures.WithLabelValues(reason).Inc() }
func (m *Access) Denied(reason string)      { m.denials.WithLabelValues(reason).Inc() }

// Queue holds the queue and backlog gauges. The scheduler leader refreshes
// them on its own clock, so a scrape never touches Redis or Postgres (and
// only one replica exports them, so sums do not double).
type Queue struct {
	tasks    *prometheus.GaugeVec
	oldest   *prometheus.GaugeVec
	inFlight *prometheus.GaugeVec
	waiting  prometheus.Gauge
}

// QueueStats is one reading of the queue and the backlog.
type QueueStats struct {
	Queue string
	// Tasks by state: pending, active, scheduled, retry, archived.
	Tasks map[string]int64
	// OldestPending is the age of the oldest pending task.
	OldestPending time.Duration
	// InFlight is the admitted commands per organization.
	InFlight map[string]int
	// Waiting is the commands held back in Postgres by fairness limits.
	Waiting int
}

// NewQueue registers the queue gauges on r.
func NewQueue(r *Registry) *Queue {
	m := &Queue{
		tasks: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "queue", Name: "tasks",
			Help: "Tasks in the queue by state (pending, active, scheduled, retry, archived); exported by the scheduler leader."}, []string{"queue", "state"}),
		oldest: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "queue", Name: "oldest_pending_age_seconds",
			Help: "Age of the oldest task waiting for a worker; exported by the scheduler leader."}, []string{"queue"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "commands", Name: "in_flight",
			Help: "Admitted commands (queued for a worker or running) per organization; exported by the scheduler leader."}, []string{"org"}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "commands", Name: "waiting",
			Help: "Commands accepted but held back in Postgres by per-agent or per-organization limits; exported by the scheduler leader."}),
	}
	r.MustRegister(m.tasks, m.oldest, m.inFlight, m.waiting)
	return m
}

// Set replaces the readings.
func (m *Queue) Set(s QueueStats) {
	for state, n := range s.Tasks {
		m.tasks.WithLabelValues(s.Queue, state).Set(float64(n))
	}
	m.oldest.WithLabelValues(s.Queue).Set(s.OldestPending.Seconds())
	m.inFlight.Reset()
	for org, n := range s.InFlight {
		m.inFlight.WithLabelValues(org).Set(float64(n))
	}
	m.waiting.Set(float64(s.Waiting))
}

// Clear drops the readings (this replica stopped leading).
func (m *Queue) Clear() {
	m.tasks.Reset()
	m.oldest.Reset()
	m.inFlight.Reset()
	m.waiting.Set(0)
}

// Realtime counts the WebSocket gateway.
type Realtime struct {
	connections   prometheus.Gauge
	subscriptions prometheus.Gauge
	sent          prometheus.Counter
	slow          prometheus.Counter
}

// NewRealtime registers the gateway's metrics on r.
func NewRealtime(r *Registry) *Realtime {
	m := &Realtime{
		connections: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "ws", Name: "connections",
			Help: "WebSocket connections open on this API replica."}),
		subscriptions: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "ws", Name: "subscriptions",
			Help: "Topic subscriptions of this replica's WebSocket connections."}),
		sent: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "ws", Name: "messages_sent_total",
			Help: "Messages (events and replies) sent to WebSocket clients."}),
		slow: prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "ws", Name: "slow_clients_dropped_total",
			Help: "WebSocket clients disconnected for falling behind (close code 4008)."}),
	}
	r.MustRegister(m.connections, m.subscriptions, m.sent, m.slow)
	return m
}

func (m *Realtime) Connections(d int)   { m.connections.Add(float64(d)) }
func (m *Realtime) Subscriptions(d int) { m.subscriptions.Add(float64(d)) }
func (m *Realtime) EventsSent(n int)    { m.sent.Add(float64(n)) }
func (m *Realtime) SlowClient()         { m.slow.Inc() }
