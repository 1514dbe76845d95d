// Command pipeline benchmarks agentry's command pipeline against bare Asynq
// on the same Redis, in one run, on loopback:
//
//	go run ./internal/bench/pipeline [-bin DIR] [-rate 500] [-duration 10s]
//
// It builds (or takes from -bin) the real api and worker binaries, starts
// them on a fresh PostgreSQL schema and Redis prefix, and measures
//
//   - throughput: no-op commands (agent:echo) dispatched through the HTTP
//     API — authenticated, ACL-checked, persisted, admitted, run by the
//     worker — per second, against no-op Asynq tasks enqueued from as many
//     goroutines to a server of the same concurrency and poll interval;
//   - latency: from the client's receipt of the 202 to the handler starting
//     (the command's started_at, stamped by the claim just before the
//     handler runs) at a steady rate, against bare Asynq's enqueue-returned
//     to handler-start at the same rate; each run's first second is a
//     warm-up, not counted.
//
// It prints one line per comparison:
//
//	BENCH <name> <value> <unit> vs <baseline> <value> <unit> ratio <r>
//
// and, with -explain, where the pipeline's time goes: CPU seconds per
// thousand commands of each process, and PostgreSQL transactions, row
// writes and Redis calls per command.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/bench/benchkit"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/testenv"
)

type options struct {
	bin         string
	db, redis   string
	concurrency int
	clients     int
	agents      int
	commands    int
	tasks       int
	rate        int
	duration    time.Duration
	explain     bool
	verbose     bool
	pgOptions   string
	keep        bool
}

func main() {
	o := options{}
	flag.StringVar(&o.bin, "bin", "", "directory holding built api and worker binaries (default: build them)")
	flag.StringVar(&o.db, "db", testenv.DatabaseURL(), "PostgreSQL database to make a schema in")
	flag.StringVar(&o.redis, "redis", testenv.RedisURL(), "Redis URL")
	flag.IntVar(&o.concurrency, "concurrency", envInt("AGENTRY_WORKER_CONCURRENCY", 20), "worker concurrency (AGENTRY_WORKER_CONCURRENCY), the same for bare Asynq")
	flag.IntVar(&o.clients, "clients", 32, "concurrent dispatchers / enqueuers in the throughput runs")
	flag.IntVar(&o.agents, "agents", 20, "agents the commands are spread over (max_concurrency 100 each)")
	flag.IntVar(&o.commands, "commands", 5000, "commands in the pipeline throughput run")
	flag.IntVar(&o.tasks, "tasks", 20000, "tasks in the bare Asynq throughput run")
	flag.IntVar(&o.rate, "rate", 500, "commands (tasks) per second in the latency runs")
	flag.DurationVar(&o.duration, "duration", durationEnv("BENCH_DURATION", 10*time.Second), "length of the latency runs")
	flag.BoolVar(&o.explain, "explain", false, "also print where the pipeline's time goes")
	flag.BoolVar(&o.verbose, "v", false, "print progress and the binaries' logs on failure")
	flag.BoolVar(&o.keep, "keep", false, "on failure, leave the stack running and its schema in place, for a look")
	flag.StringVar(&o.pgOptions, "pgoptions", "", `PostgreSQL options of the stack's sessions, such as "-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0"`)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "pipeline bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) (err error) {
	env, cleanup, err := prepare(ctx, o)
	defer func() {
		if err != nil && o.keep && env != nil {
			fmt.Fprintf(os.Stderr, "kept: schema %s, redis prefix %s, api %s; interrupt to clean up\n", env.app, env.prefix, env.base)
			<-ctx.Done()
		}
		cleanup()
	}()
	if err != nil {
		return err
	}

	// (i) and (ii): throughput.
	bare, err := bareThroughput(ctx, env, o)
	if err != nil {
		return fmt.Errorf("bare asynq throughput: %w", err)
	}
	env.logf("bare asynq: %.0f tasks/s", bare)
	before := env.snapshot(ctx)
	ours, err := pipelineThroughput(ctx, env, o)
	if err != nil {
		return fmt.Errorf("pipeline throughput: %w", err)
	}
	after := env.snapshot(ctx)
	env.logf("pipeline: %.0f cmd/s", ours)

	// (iii): latency at a steady rate, on tables vacuumed as autovacuum
	// would have done by now (it may be off on a test machine), after a
	// checkpoint.
	if err := env.vacuum(ctx); err != nil {
		return err
	}
	bareLat, err := bareLatency(ctx, env, o)
	if err != nil {
		return fmt.Errorf("bare asynq latency: %w", err)
	}
	latBefore := env.snapshot(ctx)
	ourLat, err := pipelineLatency(ctx, env, o)
	if err != nil {
		return fmt.Errorf("pipeline latency: %w", err)
	}
	latAfter := env.snapshot(ctx)

	benchkit.Compare("pipeline_throughput", ours, "cmd/s", "bare_asynq", bare, "tasks/s")
	benchkit.Compare("dispatch_to_start_p50", ms(ourLat.p50), "ms", "bare_asynq_p50", ms(bareLat.p50), "ms")
	benchkit.Compare("dispatch_to_start_p99", ms(ourLat.p99), "ms", "bare_asynq_p99", ms(bareLat.p99), "ms")
	if o.explain {
		explain(env, "throughput run", before, after)
		explain(env, fmt.Sprintf("latency run, %d/s", o.rate), latBefore, latAfter)
		fmt.Printf("  latency at %d/s (achieved %.0f/s): p50 %s p99 %s; bare asynq p50 %s p99 %s\n",
			o.rate, ourLat.achieved, ourLat.p50.Round(10*time.Microsecond), ourLat.p99.Round(10*time.Microsecond),
			bareLat.p50.Round(10*time.Microsecond), bareLat.p99.Round(10*time.Microsecond))
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// env is the stack under test.
type env struct {
	o       options
	db      *sqlx.DB // the bench schema
	rdb     *redis.Client
	prefix  string
	api     *benchkit.Proc
	worker  *benchkit.Proc
	http    *http.Client
	base    string
	token   string
	org     string
	agents  []string
	verbose bool
	app     string // the application_name of the stack's database sessions
}

func (e *env) logf(format string, args ...any) {
	if e.verbose {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
	}
}

func prepare(ctx context.Context, o options) (*env, func(), error) {
	var cleanups []func()
	cleanup := func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}
	e := &env{o: o, verbose: o.verbose, prefix: "bench" + randHex(6)}

	bin := o.bin
	if bin == "" {
		dir, err := os.MkdirTemp("", "agentry-bench-")
		if err != nil {
			return nil, cleanup, err
		}
		cleanups = append(cleanups, func() { os.RemoveAll(dir) })
		build := exec.CommandContext(ctx, "go", "build", "-o", dir+"/", "github.com/agentry/agentry/cmd/api", "github.com/agentry/agentry/cmd/worker")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return nil, cleanup, fmt.Errorf("building the binaries: %w", err)
		}
		bin = dir
	}

	// A fresh schema, migrated.
	admin, err := sqlx.Open("postgres", o.db)
	if err != nil {
		return nil, cleanup, err
	}
	cleanups = append(cleanups, func() { admin.Close() })
	schema := "bench_" + randHex(6)
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		return nil, cleanup, fmt.Errorf("PostgreSQL at %s: %w", o.db, err)
	}
	cleanups = append(cleanups, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = admin.ExecContext(ctx, "DROP SCHEMA "+schema+" CASCADE")
	})
	u, err := url.Parse(o.db)
	if err != nil {
		return nil, cleanup, err
	}
	q := u.Query()
	q.Set("search_path", schema)
	q.Set("application_name", schema) // finds the stack's backends for -explain
	if o.pgOptions != "" {
		q.Set("options", o.pgOptions)
	}
	u.RawQuery = q.Encode()
	dsn := u.String()
	e.app = schema
	// The bench's own queries are not the stack's: another application_name.
	own := *u
	oq := own.Query()
	oq.Set("application_name", schema+"_bench")
	own.RawQuery = oq.Encode()
	e.db, err = postgres.Open(ctx, own.String(), postgres.PoolOptions{MaxOpenConns: 4, MaxIdleConns: 4})
	if err != nil {
		return nil, cleanup, err
	}
	cleanups = append(cleanups, func() { e.db.Close() })
	m, err := postgres.NewMigrator(e.db.DB, false)
	if err != nil {
		return nil, cleanup, err
	}
	if err := m.Up(ctx, io.Discard); err != nil {
		return nil, cleanup, fmt.Errorf("migrate: %w", err)
	}

	ropts, err := redis.ParseURL(o.redis)
	if err != nil {
		return nil, cleanup, err
	}
	ropts.PoolSize = 4 * o.clients
	e.rdb = redis.NewClient(ropts)
	if err := e.rdb.Ping(ctx).Err(); err != nil {
		return nil, cleanup, fmt.Errorf("redis at %s: %w", o.redis, err)
	}
	cleanups = append(cleanups, func() {
		ctx := context.Background()
		testenv.DeleteKeys(ctx, e.rdb, e.prefix+"*", "asynq:{"+e.prefix+"*")
		e.rdb.SRem(ctx, "asynq:queues", e.prefix+"-commands", e.prefix+"-bare")
		e.rdb.Close()
	})

	confDir, err := os.MkdirTemp("", "agentry-bench-conf-")
	if err != nil {
		return nil, cleanup, err
	}
	cleanups = append(cleanups, func() { os.RemoveAll(confDir) })
	settings := map[string]string{
		"AGENTRY_ENV":                "test",
		"AGENTRY_CONFIG_DIR":         confDir,
		"AGENTRY_DATABASE_URL":       dsn,
		"AGENTRY_REDIS_URL":          o.redis,
		"AGENTRY_REDIS_PREFIX":       e.prefix,
		"AGENTRY_HTTP_ADDR":          "127.0.0.1:0",
		"AGENTRY_WORKER_ADDR":        "127.0.0.1:0",
		"AGENTRY_LOG_LEVEL":          "warn",
		"AGENTRY_WORKER_CONCURRENCY": strconv.Itoa(o.concurrency),
		"AGENTRY_ORG_MAX_IN_FLIGHT":  "1000000",
		"AGENTRY_ORG_MAX_QUEUED":     "1000000",
	}
	e.api, err = startProc(ctx, filepath.Join(bin, "api"), settings)
	if err != nil {
		return nil, cleanup, err
	}
	cleanups = append(cleanups, e.api.Stop)
	e.worker, err = startProc(ctx, filepath.Join(bin, "worker"), settings)
	if err != nil {
		return nil, cleanup, err
	}
	cleanups = append(cleanups, e.worker.Stop)
	cleanups = append(cleanups, func() {
		if e.verbose {
			fmt.Fprintf(os.Stderr, "--- api\n%s\n--- worker\n%s\n", tail(e.api.Logs()), tail(e.worker.Logs()))
		}
	})
	e.base = e.api.URL
	e.http = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConns: 4 * o.clients, MaxIdleConnsPerHost: 4 * o.clients}}

	// A user, its organization and agents.
	user, token, err := benchkit.SignUp(e.base, "bench-"+randHex(4)+"@example.com", "bench-password-long")
	if err != nil {
		return nil, cleanup, err
	}
	e.token = token
	e.org, _ = user["default_org_id"].(string)
	for i := range o.agents {
		a, err := e.call(ctx, "POST", "/v1/agents", map[string]any{"name": fmt.Sprintf("bench-%d", i), "params": map[string]any{"max_concurrency": 100}}, 201)
		if err != nil {
			return nil, cleanup, err
		}
		e.agents = append(e.agents, a["id"].(string))
	}
	return e, cleanup, nil
}

// call sends a JSON request as the bench user and wants status.
func (e *env) call(ctx context.Context, method, path string, body any, want int) (map[string]any, error) {
	var rd io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, e.base+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if e.token != "" {
		req.Header.Set("Authorization", "Bearer "+e.token)
		req.Header.Set("X-Org-ID", e.org)
	}
	res, err := e.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	if res.StatusCode != want {
		return nil, fmt.Errorf("%s %s: want %d, got %d: %s", method, path, want, res.StatusCode, data)
	}
	out := map[string]any{}
	_ = json.Unmarshal(data, &out)
	return out, nil
}

var dispatchBody = []byte(`{"task":"agent:echo","payload":{"message":""}}`)

// dispatch sends one no-op command to agent and returns its id and when
// the 202 arrived.
func (e *env) dispatch(ctx context.Context, agent string) (string, time.Time, error) {
	req, err := http.NewRequestWithContext(ctx, "POST", e.base+"/v1/agents/"+agent+"/commands", bytes.NewReader(dispatchBody))
	if err != nil {
		return "", time.Time{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+e.token)
	req.Header.Set("X-Org-ID", e.org)
	res, err := e.http.Do(req)
	if err != nil {
		return "", time.Time{}, err
	}
	got := time.Now()
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusAccepted {
		return "", got, fmt.Errorf("dispatch: %d %s", res.StatusCode, data)
	}
	var c struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(data, &c); err != nil || c.ID == "" {
		return "", got, fmt.Errorf("dispatch: not a command: %s", data)
	}
	return c.ID, got, nil
}

// waitDone waits until n commands created at or after since have ended,
// and returns when the last one finished.
func (e *env) waitDone(ctx context.Context, since time.Time, n int, within time.Duration) (time.Time, error) {
	deadline := time.Now().Add(within)
	for {
		var row struct {
			Done int        `db:"done"`
			Last *time.Time `db:"last"`
			Bad  int        `db:"bad"`
		}
		err := e.db.GetContext(ctx, &row, `SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'canceled')) AS done,
			max(finished_at) AS last, count(*) FILTER (WHERE status <> 'succeeded' AND finished_at IS NOT NULL) AS bad
			FROM commands WHERE created_at >= $1`, since)
		if err != nil {
			return time.Time{}, err
		}
		if row.Bad > 0 {
			return time.Time{}, fmt.Errorf("%d commands did not succeed", row.Bad)
		}
		if row.Done >= n {
			return *row.Last, nil
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("%d of %d commands done after %s", row.Done, n, within)
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(100 * time.Millisecond): // the end is max(finished_at), not when this sees it
		}
	}
}

func pipelineThroughput(ctx context.Context, e *env, o options) (float64, error) {
	// A short warm-up: connections, caches, prepared statements.
	if _, err := e.runDispatchers(ctx, 200, o.clients); err != nil {
		return 0, err
	}
	since, err := e.dbNow(ctx)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if _, err := e.runDispatchers(ctx, o.commands, o.clients); err != nil {
		return 0, err
	}
	e.logf("pipeline: %d dispatched in %s", o.commands, time.Since(start))
	last, err := e.waitDone(ctx, since, o.commands, 5*time.Minute)
	if err != nil {
		return 0, err
	}
	return float64(o.commands) / last.Sub(since).Seconds(), nil
}

// vacuum vacuums and analyzes the pipeline's tables, then checkpoints (if
// allowed), so that the latency run does not pay for flushing what the
// throughput run dirtied.
func (e *env) vacuum(ctx context.Context) error {
	for _, table := range []string{"commands", "command_events", "org_load", "agents", "notifications"} {
		if _, err := e.db.ExecContext(ctx, "VACUUM ANALYZE "+table); err != nil {
			return fmt.Errorf("vacuum %s: %w", table, err)
		}
	}
	if _, err := e.db.ExecContext(ctx, "CHECKPOINT"); err != nil {
		e.logf("no checkpoint before the latency run: %v", err)
	}
	return nil
}

// dbNow is the database's clock, which stamps the commands.
func (e *env) dbNow(ctx context.Context) (time.Time, error) {
	var t time.Time
	err := e.db.GetContext(ctx, &t, "SELECT clock_timestamp()")
	return t, err
}

// runDispatchers dispatches n commands from conc goroutines, round robin
// over the agents, and waits for the first n-... to be accepted.
func (e *env) runDispatchers(ctx context.Context, n, conc int) (int64, error) {
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(n) || failed.Load() != nil {
					return
				}
				if _, _, err := e.dispatch(ctx, e.agents[int(i)%len(e.agents)]); err != nil {
					failed.Store(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		return 0, err
	}
	// Wait for the warm-up (or any earlier run) to drain.
	return int64(n), nil
}

type latency struct {
	p50, p99 time.Duration
	n        int
	achieved float64 // requests per second actually sent
}

// warmUp is the start of each latency run, at its rate, whose latencies
// are not counted: the rate is to be sustained, and the first moments pay
// for what the previous run left (plans, caches, connections).
const warmUp = time.Second

// warm is how many requests the warm-up sends at rate.
func warm(rate int) int { return int(warmUp.Seconds() * float64(rate)) }

func summarize(ds []time.Duration, sent int, d time.Duration) latency {
	slices.Sort(ds)
	at := func(p float64) time.Duration {
		if len(ds) == 0 {
			return 0
		}
		return ds[min(len(ds)-1, int(float64(len(ds))*p))]
	}
	return latency{p50: at(0.50), p99: at(0.99), n: len(ds), achieved: float64(sent) / d.Seconds()}
}

// paced calls fn rate times a second for d, each call in its own goroutine.
func paced(ctx context.Context, rate int, d time.Duration, fn func(i int)) (int, time.Duration) {
	n := int(d.Seconds() * float64(rate))
	interval := time.Second / time.Duration(rate)
	var wg sync.WaitGroup
	start := time.Now()
	sem := make(chan struct{}, 2000)
	for i := range n {
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			time.Sleep(wait)
		}
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			fn(i)
		})
	}
	took := time.Since(start)
	wg.Wait()
	return n, took
}

func pipelineLatency(ctx context.Context, e *env, o options) (latency, error) {
	since, err := e.dbNow(ctx)
	if err != nil {
		return latency{}, err
	}
	var mu sync.Mutex
	accepted := map[string]time.Time{}
	warming := map[string]bool{}
	var failed atomic.Int64
	var lastErr atomic.Value
	sent, took := paced(ctx, o.rate, warmUp+o.duration, func(i int) {
		id, at, err := e.dispatch(ctx, e.agents[i%len(e.agents)])
		if err != nil {
			// An overloaded stack answers late or not at all: count it.
			failed.Add(1)
			lastErr.Store(err)
			return
		}
		mu.Lock()
		accepted[id] = at
		warming[id] = i < warm(o.rate)
		mu.Unlock()
	})
	if n := failed.Load(); n > 0 {
		fmt.Fprintf(os.Stderr, "pipeline latency: %d of %d dispatches failed (overloaded?); last: %v\n", n, sent, lastErr.Load())
	}
	if len(accepted) == 0 {
		return latency{}, fmt.Errorf("no dispatch accepted")
	}
	if _, err := e.waitDone(ctx, since, len(accepted), 5*time.Minute); err != nil {
		return latency{}, err
	}
	var rows []struct {
		ID       string    `db:"id"`
		Created  time.Time `db:"created_at"`
		Admitted time.Time `db:"admitted_at"`
		Started  time.Time `db:"started_at"`
	}
	if err := e.db.SelectContext(ctx, &rows, `SELECT id, created_at, admitted_at, started_at FROM commands WHERE created_at >= $1 ORDER BY created_at`, since); err != nil {
		return latency{}, err
	}
	ds := make([]time.Duration, 0, len(rows))
	for _, r := range rows {
		if at, ok := accepted[r.ID]; ok && !warming[r.ID] {
			ds = append(ds, max(0, r.Started.Sub(at)))
		}
	}
	if e.verbose {
		// The slow starts, when they were dispatched and where they waited.
		for _, r := range rows {
			if at, ok := accepted[r.ID]; ok && !warming[r.ID] && r.Started.Sub(at) > 25*time.Millisecond {
				fmt.Fprintf(os.Stderr, "slow: +%s accepted %s after its insert; admitted +%s, started +%s after the 202\n",
					r.Created.Sub(rows[0].Created).Round(time.Millisecond), at.Sub(r.Created).Round(100*time.Microsecond),
					r.Admitted.Sub(at).Round(100*time.Microsecond), r.Started.Sub(at).Round(100*time.Microsecond))
			}
		}
	}
	l := summarize(ds, sent, took)
	e.logf("pipeline latency: %d at %.0f/s: p50 %s p99 %s", l.n, l.achieved, l.p50, l.p99)
	return l, nil
}

// bare is a bare Asynq server on the bench's Redis, with the worker's
// concurrency and poll interval, running a no-op handler.
type bare struct {
	srv    *asynq.Server
	client *asynq.Client
	queue  string
	// started is told the id of every task as its handler starts.
	started func(id string, at time.Time)
}

func startBare(e *env, o options, started func(string, time.Time)) (*bare, error) {
	b := &bare{queue: e.prefix + "-bare", client: asynq.NewClientFromRedisClient(e.rdb), started: started}
	b.srv = asynq.NewServerFromRedisClient(e.rdb, asynq.Config{
		Concurrency:       o.concurrency,
		Queues:            map[string]int{b.queue: 1},
		TaskCheckInterval: 5 * time.Millisecond,
		LogLevel:          asynq.ErrorLevel,
	})
	mux := asynq.NewServeMux()
	mux.HandleFunc("bench:noop", func(ctx context.Context, t *asynq.Task) error {
		b.started(string(t.Payload()), time.Now())
		return nil
	})
	if err := b.srv.Start(mux); err != nil {
		return nil, err
	}
	return b, nil
}

func (b *bare) enqueue(ctx context.Context, id string) error {
	_, err := b.client.EnqueueContext(ctx, asynq.NewTask("bench:noop", []byte(id)), asynq.Queue(b.queue), asynq.MaxRetry(0), asynq.TaskID(id))
	return err
}

func bareThroughput(ctx context.Context, e *env, o options) (float64, error) {
	var done atomic.Int64
	all := make(chan struct{})
	var last atomic.Int64
	b, err := startBare(e, o, func(string, time.Time) {
		if done.Add(1) == int64(o.tasks) {
			last.Store(time.Now().UnixNano())
			close(all)
		}
	})
	if err != nil {
		return 0, err
	}
	defer b.srv.Shutdown()
	run := randHex(4)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range o.clients {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(o.tasks) || failed.Load() != nil {
					return
				}
				if err := b.enqueue(ctx, run+"-"+strconv.FormatInt(i, 10)); err != nil {
					failed.Store(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		return 0, err
	}
	select {
	case <-all:
	case <-time.After(5 * time.Minute):
		return 0, fmt.Errorf("%d of %d tasks done", done.Load(), o.tasks)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return float64(o.tasks) / time.Unix(0, last.Load()).Sub(start).Seconds(), nil
}

func bareLatency(ctx context.Context, e *env, o options) (latency, error) {
	var mu sync.Mutex
	enqueued, started := map[string]time.Time{}, map[string]time.Time{}
	b, err := startBare(e, o, func(id string, at time.Time) {
		mu.Lock()
		started[id] = at
		mu.Unlock()
	})
	if err != nil {
		return latency{}, err
	}
	defer b.srv.Shutdown()
	run := randHex(4)
	var failed atomic.Value
	warming := map[string]bool{}
	sent, took := paced(ctx, o.rate, warmUp+o.duration, func(i int) {
		id := run + "-" + strconv.Itoa(i)
		if err := b.enqueue(ctx, id); err != nil {
			failed.Store(err)
			return
		}
		at := time.Now()
		mu.Lock()
		enqueued[id] = at
		warming[id] = i < warm(o.rate)
		mu.Unlock()
	})
	if err, _ := failed.Load().(error); err != nil {
		return latency{}, err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		mu.Lock()
		n := len(started)
		mu.Unlock()
		if n >= sent {
			break
		}
		if time.Now().After(deadline) {
			return latency{}, fmt.Errorf("%d of %d tasks started", n, sent)
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	ds := make([]time.Duration, 0, len(started))
	for id, at := range started {
		if !warming[id] {
			ds = append(ds, max(0, at.Sub(enqueued[id])))
		}
	}
	l := summarize(ds, sent, took)
	e.logf("bare latency: %d at %.0f/s: p50 %s p99 %s", l.n, l.achieved, l.p50, l.p99)
	return l, nil
}

// startProc runs a binary of the stack with settings and waits until it
// is ready.
func startProc(ctx context.Context, path string, settings map[string]string) (*benchkit.Proc, error) {
	cmd := exec.Command(path)
	cmd.Env = os.Environ()
	for k, v := range settings {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	return benchkit.StartReady(ctx, cmd)
}

func tail(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

func durationEnv(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}
