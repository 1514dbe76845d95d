// Command wsload measures the WebSocket gateway of one api process under
// load, on loopback:
//
//	go run ./internal/bench/wsload [-bin DIR] [-conns 10000] [-rate 2000] [-duration 10s] [-commands 20]
//
// It builds (or takes from -bin) the real api and worker binaries, starts
// one api and one worker on a fresh PostgreSQL schema and Redis prefix,
// creates one agent per connection, and opens that many WebSocket clients,
// each subscribed to its agent's topic. It then publishes events at -rate
// per second for -duration through events.Bus on the installation's Redis
// prefix — the path a worker's progress takes — each carrying its publish
// time, and measures at the clients how long each took to arrive.
// Meanwhile it dispatches -commands real commands per second through the
// HTTP API, whose events reach the clients of their agents too.
//
// It prints, in the harness's format:
//
//	BENCH ws_connections 10000 conns
//	BENCH ws_api_rss 212 MB
//	BENCH ws_memory_per_conn 18.4 KB
//	BENCH ws_event_latency_p50 2.1 ms
//	BENCH ws_event_latency_p99 9.3 ms
//
// The memory per connection is (the api's RSS holding the connections −
// its RSS before any) / connections. The targets of the issue: 10,000
// connections on one api under 300 MB in all, and a p99 under 50 ms at
// 2,000 events/s.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
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

	"github.com/gorilla/websocket"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"
	"github.com/redis/go-redis/v9"

	"github.com/agentry/agentry/internal/bench/benchkit"
	"github.com/agentry/agentry/internal/events"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/testenv"
)

type options struct {
	bin      string
	conns    int
	rate     int
	duration time.Duration
	commands int
	dialers  int
	verbose  bool
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "", "directory holding built api and worker binaries (default: build them)")
	flag.IntVar(&o.conns, "conns", 10000, "WebSocket connections, one agent each")
	flag.IntVar(&o.rate, "rate", 2000, "events published per second")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "how long events are published")
	flag.IntVar(&o.commands, "commands", 20, "real commands dispatched per second meanwhile (0: none, and no worker)")
	flag.IntVar(&o.dialers, "dialers", 64, "connections opened at once")
	flag.BoolVar(&o.verbose, "v", false, "print the api's log on failure")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "wsload:", err)
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "wsload: "+format+"\n", args...)
}

func run(ctx context.Context, o options) error {
	if err := raiseFileLimit(uint64(o.conns) + 4096); err != nil {
		return err
	}
	bin := o.bin
	if bin == "" {
		tmp, err := os.MkdirTemp("", "agentry-wsload-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		logf("building the binaries")
		build := exec.CommandContext(ctx, "go", "build", "-o", tmp+"/", "./cmd/api", "./cmd/worker")
		build.Stderr = os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build: %w", err)
		}
		bin = tmp
	}

	inst, err := install(ctx, bin, o.conns, o.commands > 0)
	if err != nil {
		return err
	}
	defer inst.close()
	if o.verbose {
		defer func() { fmt.Fprintln(os.Stderr, inst.api.Logs()) }()
	}

	// Idle: the api started, its pools warm, no connection yet.
	time.Sleep(time.Second)
	idle, err := benchkit.RSSKB(inst.api.Pid())
	if err != nil {
		return err
	}
	logf("api idle: %d MB", idle/1024)

	st := &stats{closes: map[string]int{}}
	clients, err := connect(ctx, inst, o, st)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	if err != nil {
		return err
	}
	time.Sleep(2 * time.Second) // let the api settle
	held, err := benchkit.RSSKB(inst.api.Pid())
	if err != nil {
		return err
	}
	logf("api holding %d connections: %d MB", len(clients), held/1024)

	// For comparison, how long Redis alone takes to deliver the events:
	// one pub/sub connection of this process on every agent's channel.
	direct := directLatency(ctx, inst)
	cpu0, _ := benchkit.CPUTime(inst.api.Pid())
	self0, _ := benchkit.CPUTime(os.Getpid())
	published, dispatched := load(ctx, inst, o, st)
	cpu1, _ := benchkit.CPUTime(inst.api.Pid())
	self1, _ := benchkit.CPUTime(os.Getpid())
	logf("CPU during the load: api %.0f%%, this load generator %.0f%% (of one core)",
		100*(cpu1-cpu0).Seconds()/o.duration.Seconds(), 100*(self1-self0).Seconds()/o.duration.Seconds())
	// Stragglers.
	for deadline := time.Now().Add(5 * time.Second); st.received.Load() < published && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	loaded, err := benchkit.RSSKB(inst.api.Pid())
	if err != nil {
		return err
	}
	logf("api after the load: %d MB", loaded/1024)

	alive := len(clients) - int(st.closed.Load())
	st.mu.Lock()
	lat := slices.Clone(st.lat)
	closes := st.closes
	st.mu.Unlock()
	slices.Sort(lat)
	logf("published %d events in %s (%.0f/s), received %d (%d lost); %d commands dispatched, %d command events received; %d connections still open",
		published, o.duration, float64(published)/o.duration.Seconds(), st.received.Load(), published-st.received.Load(), dispatched, st.commandEvents.Load(), alive)
	if len(closes) > 0 {
		logf("connections closed by the server: %v", closes)
	}
	if len(lat) == 0 {
		return errors.New("no event arrived")
	}
	if d := direct(); len(d) > 0 {
		logf("Redis pub/sub alone (one subscriber here): p50 %.1f ms, p99 %.1f ms", ms(d[len(d)/2]), ms(d[len(d)*99/100]))
	}
	rss := max(held, loaded)
	benchkit.Value("ws_connections", float64(alive), "conns")
	benchkit.Value("ws_api_rss", float64((rss+512)/1024), "MB")
	benchkit.Value("ws_memory_per_conn", float64(rss-idle)/float64(len(clients)), "KB")
	benchkit.Value("ws_event_latency_p50", ms(lat[len(lat)/2]), "ms")
	benchkit.Value("ws_event_latency_p99", ms(lat[len(lat)*99/100]), "ms")
	logf("latency max %.1f ms", ms(lat[len(lat)-1]))
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// stats are what the clients saw.
type stats struct {
	received      atomic.Int64
	commandEvents atomic.Int64
	closed        atomic.Int64

	mu     sync.Mutex
	lat    []time.Duration
	closes map[string]int
}

// connect opens o.conns clients, each subscribed to its agent, and starts
// their readers.
func connect(ctx context.Context, inst *installation, o options, st *stats) ([]*websocket.Conn, error) {
	start := time.Now()
	clients := make([]*websocket.Conn, o.conns)
	var next atomic.Int64
	var failures atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	url := "ws" + strings.TrimPrefix(inst.api.URL, "http") + "/v1/ws"
	header := http.Header{"Authorization": {"Bearer " + inst.token}}
	for range o.dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= o.conns {
					return
				}
				ws, err := dial(ctx, url, header, i, inst.agents[i])
				if err != nil {
					failures.Add(1)
					errOnce.Do(func() { firstErr = err })
					continue
				}
				clients[i] = ws
				go read(ws, st)
			}
		}()
	}
	wg.Wait()
	var out []*websocket.Conn
	for _, c := range clients {
		if c != nil {
			out = append(out, c)
		}
	}
	logf("%d connections open and subscribed in %s (%d failed)", len(out), time.Since(start).Round(time.Millisecond), failures.Load())
	if firstErr != nil {
		logf("first failure: %v", firstErr)
	}
	if len(out) == 0 {
		return nil, errors.New("no connection could be opened")
	}
	return out, ctx.Err()
}

// perSourceIP bounds the connections from one loopback address, under the
// ephemeral port range; more come from 127.0.0.2, 127.0.0.3 …
const perSourceIP = 20000

func dial(ctx context.Context, url string, header http.Header, i int, agent string) (*websocket.Conn, error) {
	d := websocket.Dialer{
		HandshakeTimeout: 30 * time.Second,
		ReadBufferSize:   1024,
		WriteBufferSize:  256,
		NetDialContext: (&net.Dialer{
			LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i/perSourceIP))},
		}).DialContext,
	}
	ws, res, err := d.DialContext(ctx, url, header)
	if err != nil {
		if res != nil {
			return nil, fmt.Errorf("dial: %w (status %d)", err, res.StatusCode)
		}
		return nil, fmt.Errorf("dial: %w", err)
	}
	res.Body.Close()
	topic := events.AgentTopic(agent)
	_ = ws.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := ws.WriteJSON(map[string]string{"type": "subscribe", "topic": topic}); err != nil {
		ws.Close()
		return nil, err
	}
	_ = ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		var m struct{ Type, Topic string }
		if err := ws.ReadJSON(&m); err != nil {
			ws.Close()
			return nil, fmt.Errorf("subscribe: %w", err)
		}
		if m.Type == "subscribed" && m.Topic == topic {
			break
		}
		if m.Type == "error" {
			ws.Close()
			return nil, fmt.Errorf("subscribe %s: refused", topic)
		}
	}
	_ = ws.SetReadDeadline(time.Time{})
	return ws, nil
}

// read takes a client's messages until its connection ends: a load event's
// latency is now minus the publish time it carries.
func read(ws *websocket.Conn, st *stats) {
	for {
		_, data, err := ws.ReadMessage()
		if err != nil {
			st.closed.Add(1)
			reason := "error"
			var ce *websocket.CloseError
			if errors.As(err, &ce) {
				reason = strconv.Itoa(ce.Code)
			} else if errors.Is(err, net.ErrClosed) {
				reason = "closed by the client"
			}
			st.mu.Lock()
			st.closes[reason]++
			st.mu.Unlock()
			return
		}
		now := time.Now().UnixNano()
		var m struct {
			Type string
			Data struct {
				At int64 `json:"at"`
			}
		}
		if json.Unmarshal(data, &m) != nil {
			continue
		}
		switch {
		case m.Type == "load":
			st.received.Add(1)
			st.mu.Lock()
			st.lat = append(st.lat, time.Duration(now-m.Data.At))
			st.mu.Unlock()
		case strings.HasPrefix(m.Type, "command."):
			st.commandEvents.Add(1)
		}
	}
}

// load publishes o.rate events a second for o.duration to random agents,
// and dispatches o.commands commands a second meanwhile. It returns how
// many events were published and commands dispatched.
func load(ctx context.Context, inst *installation, o options, st *stats) (int64, int64) {
	bus := events.NewBus(inst.rdb, inst.prefix, 1000)
	ctx, cancel := context.WithTimeout(ctx, o.duration)
	defer cancel()
	var published, dispatched atomic.Int64
	var wg sync.WaitGroup
	const publishers = 32
	interval := time.Second / time.Duration(o.rate)
	start := time.Now()
	for w := range publishers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; ; k++ {
				due := start.Add(time.Duration(k*publishers+w) * interval)
				if wait := time.Until(due); wait > 0 {
					select {
					case <-ctx.Done():
						return
					case <-time.After(wait):
					}
				}
				if ctx.Err() != nil {
					return
				}
				agent := inst.agents[rand.IntN(len(inst.agents))]
				data := map[string]any{"at": time.Now().UnixNano(), "seq": k*publishers + w}
				if err := bus.Publish(context.Background(), "load", data, events.AgentTopic(agent)); err != nil {
					logf("publish: %v", err)
					return
				}
				published.Add(1)
			}
		}()
	}
	if o.commands > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(time.Second / time.Duration(o.commands))
			defer t.Stop()
			body := []byte(`{"task":"agent:echo","payload":{"message":"wsload"}}`)
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				agent := inst.agents[rand.IntN(len(inst.agents))]
				req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, inst.api.URL+"/v1/agents/"+agent+"/commands", bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+inst.token)
				req.Header.Set("Content-Type", "application/json")
				res, err := http.DefaultClient.Do(req)
				if err != nil {
					continue
				}
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.StatusCode == http.StatusAccepted {
					dispatched.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return published.Load(), dispatched.Load()
}

// directLatency subscribes to every agent channel of the installation and
// records how long each load event took to arrive; the function it
// returns stops and gives the sorted latencies.
func directLatency(ctx context.Context, inst *installation) func() []time.Duration {
	bus := events.NewBus(inst.rdb, inst.prefix, 1000)
	ps := inst.rdb.PSubscribe(ctx, bus.Channel("agent:*"))
	var mu sync.Mutex
	var lat []time.Duration
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m := range ps.Channel(redis.WithChannelSize(10000)) {
			now := time.Now().UnixNano()
			var e struct {
				Type string
				Data struct {
					At int64 `json:"at"`
				}
			}
			if json.Unmarshal([]byte(m.Payload), &e) == nil && e.Type == "load" {
				mu.Lock()
				lat = append(lat, time.Duration(now-e.Data.At))
				mu.Unlock()
			}
		}
	}()
	return func() []time.Duration {
		ps.Close()
		<-done
		slices.Sort(lat)
		return lat
	}
}

// installation is a schema, a Redis prefix, and the binaries running on them.
type installation struct {
	schema, prefix string
	admin          *sqlx.DB
	rdb            *redis.Client
	api, worker    *benchkit.Proc
	token          string
	agents         []string
}

// install makes a schema and a Redis prefix, starts the api (and a worker)
// on them, registers a user and seeds n agents in the user's organization.
func install(ctx context.Context, bin string, n int, worker bool) (*installation, error) {
	schema := testenv.Name("wsload_")
	inst := &installation{schema: schema, prefix: schema}
	var err error
	if inst.admin, err = sqlx.Open("postgres", testenv.DatabaseURL()); err != nil {
		return nil, err
	}
	if _, err := inst.admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		inst.admin.Close()
		return nil, fmt.Errorf("PostgreSQL at %s: %w", testenv.DatabaseURL(), err)
	}
	opts, err := redis.ParseURL(testenv.RedisURL())
	if err != nil {
		inst.close()
		return nil, err
	}
	inst.rdb = redis.NewClient(opts)
	sep := "?"
	if strings.Contains(testenv.DatabaseURL(), "?") {
		sep = "&"
	}
	dsn := testenv.DatabaseURL() + sep + "search_path=" + schema
	db, err := postgres.Open(ctx, dsn, postgres.PoolOptions{MaxOpenConns: 4})
	if err != nil {
		inst.close()
		return nil, err
	}
	defer db.Close()
	m, err := postgres.NewMigrator(db.DB, false)
	if err == nil {
		err = m.Up(ctx, io.Discard)
	}
	if err != nil {
		inst.close()
		return nil, err
	}
	env := []string{
		"AGENTRY_ENV=test", "AGENTRY_DATABASE_URL=" + dsn, "AGENTRY_REDIS_URL=" + testenv.RedisURL(),
		"AGENTRY_REDIS_PREFIX=" + inst.prefix, "AGENTRY_HTTP_ADDR=127.0.0.1:0", "AGENTRY_WORKER_ADDR=127.0.0.1:0",
		"AGENTRY_CONFIG_DIR=" + bin, "AGENTRY_DB_MAX_OPEN_CONNS=10", "AGENTRY_LOG_LEVEL=warn",
	}
	if inst.api, err = startProc(ctx, filepath.Join(bin, "api"), env); err != nil {
		inst.close()
		return nil, err
	}
	if worker {
		if inst.worker, err = startProc(ctx, filepath.Join(bin, "worker"), env); err != nil {
			inst.close()
			return nil, err
		}
	}
	u, token, err := benchkit.SignUp(inst.api.URL, "wsload@example.com", "wsload-password")
	if err != nil {
		inst.close()
		return nil, err
	}
	inst.token = token
	// Seeds n agents owned by the user.
	if err := db.SelectContext(ctx, &inst.agents, `WITH ids AS (SELECT gen_random_uuid() AS id, g FROM generate_series(1, $3) g),
			e AS (INSERT INTO entities (id, kind) SELECT id, 'agent' FROM ids)
		INSERT INTO agents (id, org_id, owner_id, name) SELECT id, $1, $2, 'agent-' || g FROM ids
		RETURNING id`, u["default_org_id"], u["id"], n); err != nil {
		inst.close()
		return nil, err
	}
	return inst, nil
}

func (inst *installation) close() {
	if inst.worker != nil {
		inst.worker.Stop()
	}
	if inst.api != nil {
		inst.api.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if inst.rdb != nil {
		testenv.DeleteKeys(ctx, inst.rdb, "*"+inst.prefix+"*")
		inst.rdb.Close()
	}
	_, _ = inst.admin.ExecContext(ctx, "DROP SCHEMA "+inst.schema+" CASCADE")
	inst.admin.Close()
}

// startProc runs a binary with env added to this process's, and waits
// until it says where it listens.
func startProc(ctx context.Context, path string, env []string) (*benchkit.Proc, error) {
	cmd := exec.Command(path)
	cmd.Env = append(os.Environ(), env...)
	return benchkit.Start(ctx, cmd)
}

// raiseFileLimit raises this process's open file limit (which the api it
// starts inherits) to at least want, or as far as it may.
func raiseFileLimit(want uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if lim.Cur >= want {
		return nil
	}
	if lim.Max < want {
		// Raising the hard limit needs privileges; try, then settle.
		raised := syscall.Rlimit{Cur: want, Max: want}
		if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
			return nil
		}
	}
	lim.Cur = min(max(lim.Cur, want), lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("raising the open file limit: %w", err)
	}
	if lim.Cur < want {
		logf("warning: open files limited to %d, under the %d wanted", lim.Cur, want)
	}
	return nil
}
