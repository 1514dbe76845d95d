package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/redis/go-redis/v9"
)

// faultEnv is the settings of the fault tests: short leases and a busy
// reconciler, so that what a fault breaks heals within seconds.
func faultEnv(extra map[string]string) map[string]string {
	env := map[string]string{
		"AGENTRY_WORKER_HEARTBEAT":   "1s",
		"AGENTRY_RECONCILE_INTERVAL": "1s",
		"AGENTRY_WORKER_CONCURRENCY": "20",
		"AGENTRY_LOG_LEVEL":          "warn",
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// freePort returns a TCP port nobody listens on (yet).
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// dispatchMany dispatches n commands of body over agents from conc
// goroutines and returns the ids accepted. after, if set, is called with
// how many were accepted so far after each one.
func dispatchMany(t *testing.T, c *Client, agents []string, n, conc int, body any, after func(accepted int)) []string {
	t.Helper()
	var mu sync.Mutex
	var ids []string
	var next atomic.Int64
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				r := c.Do("POST", "/v1/agents/"+agents[i%len(agents)]+"/commands", body)
				if r.Status != 202 {
					t.Errorf("dispatch: want 202, got %d: %s", r.Status, r.Body)
					return
				}
				mu.Lock()
				ids = append(ids, decodeCommand(t, r).ID)
				accepted := len(ids)
				mu.Unlock()
				if after != nil {
					after(accepted)
				}
			}
		})
	}
	wg.Wait()
	return ids
}

// waitAllTerminal waits until every command of ids has ended.
func waitAllTerminal(t *testing.T, db *sqlx.DB, ids []string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var open int
		err := db.Get(&open, `SELECT count(*) FROM commands WHERE id = ANY($1::uuid[]) AND status NOT IN ('succeeded', 'failed', 'canceled')`, pqArray(ids))
		if err == nil && open == 0 {
			return
		}
		if time.Now().After(deadline) {
			var rows []struct {
				Status  string `db:"status"`
				Attempt int    `db:"attempt"`
				N       int    `db:"n"`
			}
			_ = db.Select(&rows, `SELECT status, attempt, count(*) AS n FROM commands WHERE id = ANY($1::uuid[]) GROUP BY 1, 2 ORDER BY 1, 2`, pqArray(ids))
			t.Fatalf("%d of %d commands not ended within %s (err %v); by status and attempt: %+v", open, len(ids), within, err, rows)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pqArray is a Postgres array literal of uuids.
func pqArray(ids []string) string { return "{" + strings.Join(ids, ",") + "}" }

// checkExactlyOnce checks that every command of ids ended once: a terminal
// status, exactly one terminal event, and no attempt claimed twice.
func checkExactlyOnce(t *testing.T, db *sqlx.DB, ids []string) {
	t.Helper()
	var bad []struct {
		ID       string `db:"id"`
		Status   string `db:"status"`
		Terminal int    `db:"terminal"`
		Last     string `db:"last"`
	}
	err := db.Select(&bad, `SELECT c.id, c.status,
			count(*) FILTER (WHERE e.type IN ('succeeded', 'failed', 'canceled')) AS terminal,
			(array_agg(e.type ORDER BY e.id DESC))[1] AS last
		FROM commands c JOIN command_events e ON e.command_id = c.id
		WHERE c.id = ANY($1::uuid[])
		GROUP BY c.id, c.status
		HAVING count(*) FILTER (WHERE e.type IN ('succeeded', 'failed', 'canceled')) <> 1
			OR c.status NOT IN ('succeeded', 'failed', 'canceled')
			OR (array_agg(e.type ORDER BY e.id DESC))[1] <> c.status`, pqArray(ids))
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range bad {
		if i < 10 {
			t.Errorf("command %s: status %s, %d terminal events, last event %s", b.ID, b.Status, b.Terminal, b.Last)
		}
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d commands did not end exactly once", len(bad), len(ids))
	}
	var twice []struct {
		ID      string `db:"command_id"`
		Attempt int    `db:"attempt"`
		N       int    `db:"n"`
	}
	if err := db.Select(&twice, `SELECT command_id, attempt, count(*) AS n FROM command_events
		WHERE type = 'running' AND command_id = ANY($1::uuid[]) GROUP BY 1, 2 HAVING count(*) > 1`, pqArray(ids)); err != nil {
		t.Fatal(err)
	}
	for _, r := range twice {
		t.Errorf("command %s: attempt %d ran %d times", r.ID, r.Attempt, r.N)
	}
	var total int
	if err := db.Get(&total, `SELECT count(*) FROM commands WHERE id = ANY($1::uuid[])`, pqArray(ids)); err != nil || total != len(ids) {
		t.Errorf("want all %d accepted commands stored, found %d (%v)", len(ids), total, err)
	}
}

// workerPrefix is how the commands a worker runs name it (host-pid-…).
func workerPrefix(p *Proc) string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d-", host, p.cmd.Process.Pid)
}

// A worker killed with SIGKILL in the middle of 500 commands: its commands
// run again elsewhere once their leases lapse, and every command ends
// exactly once.
func TestFaultWorkerKilled(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("fault test")
	}
	s := NewStack(t, faultEnv(nil))
	api := s.API()
	s.Start("scheduler")
	victim := s.Start("worker")
	s.Start("worker")
	u := s.Client(api).NewUser("kill")
	var agents []string
	for range 10 {
		agents = append(agents, cmdAgent(t, u.Client, map[string]any{"max_concurrency": 10}))
	}
	db := stackDB(t, s)
	prefix := workerPrefix(victim)
	runningOnVictim := func() []string {
		var ids []string
		if err := db.Select(&ids, `SELECT id FROM commands WHERE status = 'running' AND worker_id LIKE $1 || '%'`, prefix); err != nil {
			t.Fatal(err)
		}
		return ids
	}

	var killed []string
	var killedAt time.Time
	var once sync.Once
	ids := dispatchMany(t, u.Client, agents, 500, 8, sleep(300, "max_retries", 2), func(accepted int) {
		if accepted < 200 {
			return
		}
		once.Do(func() {
			Eventually(t, 20*time.Second, "the victim running commands", func() bool { return len(runningOnVictim()) >= 3 })
			victim.Kill()
			killedAt = time.Now()
			// What it ran when it died: statements it sent just before
			// dying still complete, so look once they have.
			time.Sleep(time.Second)
			killed = runningOnVictim()
		})
	})
	if len(killed) == 0 {
		t.Fatal("the victim was killed running nothing; the test measured nothing")
	}
	waitAllTerminal(t, db, ids, 90*time.Second)
	t.Logf("%d commands; the killed worker was running %d; all ended %s after the kill", len(ids), len(killed), time.Since(killedAt).Round(time.Millisecond))
	checkExactlyOnce(t, db, ids)

	// The killed worker's commands ran again, on another worker, within 90s.
	var rerun []struct {
		ID      string    `db:"command_id"`
		Attempt int       `db:"attempt"`
		At      time.Time `db:"created_at"`
	}
	if err := db.Select(&rerun, `SELECT command_id, max(attempt) AS attempt, max(created_at) AS created_at FROM command_events
		WHERE type = 'running' AND command_id = ANY($1::uuid[]) GROUP BY 1`, pqArray(killed)); err != nil {
		t.Fatal(err)
	}
	for _, r := range rerun {
		if r.Attempt < 2 {
			var evs []struct {
				Type    string  `db:"type"`
				Attempt int     `db:"attempt"`
				Message string  `db:"message"`
				At      string  `db:"at"`
				Worker  *string `db:"worker"`
			}
			_ = db.Select(&evs, `SELECT e.type, e.attempt, e.message, to_char(e.created_at, 'HH24:MI:SS.MS') AS at, c.worker_id AS worker
				FROM command_events e JOIN commands c ON c.id = e.command_id WHERE e.command_id = $1 ORDER BY e.id`, r.ID)
			t.Errorf("command %s of the killed worker (killed at %s) never ran again: %+v", r.ID, killedAt.UTC().Format("15:04:05.000"), evs)
		}
		if d := r.At.Sub(killedAt); d > 90*time.Second {
			t.Errorf("command %s ran again %s after the kill", r.ID, d)
		}
	}
}

// startRedis runs a private redis-server for t and returns its URL.
func startRedis(t *testing.T) string {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	cmd.Dir = t.TempDir()
	if err := cmd.Start(); err != nil {
		t.Skipf("redis-server: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	url := fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	opts, _ := redis.ParseURL(url)
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	Eventually(t, 10*time.Second, "the private Redis answering", func() bool { return rdb.Ping(context.Background()).Err() == nil })
	return url
}

// Redis flushed in the middle of 1,000 commands: Postgres is the truth, and
// the reconciler re-enqueues what Redis lost. Every command ends once.
func TestFaultRedisFlushed(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("fault test")
	}
	redisURL := startRedis(t)
	s := NewStack(t, faultEnv(map[string]string{"AGENTRY_REDIS_URL": redisURL}))
	api := s.API()
	s.Start("scheduler")
	s.Start("worker")
	s.Start("worker")
	u := s.Client(api).NewUser("flush")
	var agents []string
	for range 10 {
		agents = append(agents, cmdAgent(t, u.Client, map[string]any{"max_concurrency": 10}))
	}
	opts, _ := redis.ParseURL(redisURL)
	rdb := redis.NewClient(opts)
	defer rdb.Close()

	var flushedAt time.Time
	var once sync.Once
	ids := dispatchMany(t, u.Client, agents, 1000, 8, sleep(50), func(accepted int) {
		if accepted >= 400 {
			once.Do(func() {
				if err := rdb.FlushAll(context.Background()).Err(); err != nil {
					t.Errorf("FLUSHALL: %v", err)
				}
				flushedAt = time.Now()
			})
		}
	})
	db := stackDB(t, s)
	waitAllTerminal(t, db, ids, 90*time.Second)
	t.Logf("%d commands; all ended %s after the flush", len(ids), time.Since(flushedAt).Round(time.Millisecond))
	checkExactlyOnce(t, db, ids)
	var failed int
	if err := db.Get(&failed, `SELECT count(*) FROM commands WHERE id = ANY($1::uuid[]) AND status <> 'succeeded'`, pqArray(ids)); err != nil || failed > 0 {
		t.Errorf("a flush lost no work: want every command succeeded, %d did not (%v)", failed, err)
	}
}

// pgCluster is a private PostgreSQL server.
type pgCluster struct {
	t    *testing.T
	dir  string
	port int
}

func (c *pgCluster) ctl(args ...string) error {
	all := append([]string{"-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", c.dir}, args...)
	out, err := exec.Command("runuser", all...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl %v: %v\n%s", args, err, out)
	}
	return nil
}

func (c *pgCluster) start() error {
	return c.ctl("-l", filepath.Join(c.dir, "log"), "-w", "-t", "30",
		"-o", fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off", c.port, c.dir), "start")
}

func (c *pgCluster) stop() error { return c.ctl("-m", "fast", "-w", "stop") }

func (c *pgCluster) url(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.port, db)
}

// startPostgres initialises and starts a private cluster for t.
func startPostgres(t *testing.T) *pgCluster {
	t.Helper()
	if _, err := os.Stat("/usr/lib/postgresql/15/bin/initdb"); err != nil {
		t.Skip("no PostgreSQL 15 binaries")
	}
	dir, err := os.MkdirTemp("", "agentry-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if out, err := exec.Command("chown", "postgres", dir).CombinedOutput(); err != nil {
		t.Skipf("chown: %v %s", err, out)
	}
	c := &pgCluster{t: t, dir: filepath.Join(dir, "data"), port: freePort(t)}
	if out, err := exec.Command("runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/initdb", "-D", c.dir, "-A", "trust", "-U", "postgres").CombinedOutput(); err != nil {
		t.Skipf("initdb: %v\n%s", err, out)
	}
	if err := c.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.ctl("-m", "immediate", "-w", "stop") })
	admin, err := sqlx.Open("postgres", c.url("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec("CREATE DATABASE agentry"); err != nil {
		t.Fatal(err)
	}
	return c
}

// migrate runs `api migrate up` with the stack's settings.
func (s *Stack) migrate(t *testing.T) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "api"), "migrate", "up")
	cmd.Env = os.Environ()
	for k, v := range s.Env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("api migrate up: %v\n%s", err, out)
	}
}

// PostgreSQL stopped for a few seconds while commands are dispatched: the
// API answers 503 with a problem meanwhile, never 500, and every command it
// accepted (202) ends exactly once after the restart.
func TestFaultPostgresRestart(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("fault test")
	}
	pg := startPostgres(t)
	s := NewStack(t, faultEnv(map[string]string{"AGENTRY_DATABASE_URL": pg.url("agentry")}))
	s.migrate(t)
	api := s.API()
	s.Start("scheduler")
	s.Start("worker")
	u := s.Client(api).NewUser("pgdown")
	var agents []string
	for range 5 {
		agents = append(agents, cmdAgent(t, u.Client, map[string]any{"max_concurrency": 10}))
	}
	db, err := sqlx.Open("postgres", pg.url("agentry"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	var (
		mu       sync.Mutex
		accepted []string
		statuses = map[int]int{}
		bodies   = map[int]string{}
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				r := u.Do("POST", "/v1/agents/"+agents[(g+i)%len(agents)]+"/commands", sleep(20))
				mu.Lock()
				statuses[r.Status]++
				if _, ok := bodies[r.Status]; !ok {
					bodies[r.Status] = r.Header.Get("Content-Type") + " " + string(r.Body)
				}
				if r.Status == 202 {
					accepted = append(accepted, decodeCommand(t, r).ID)
				}
				mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
	time.Sleep(3 * time.Second)
	if err := pg.stop(); err != nil {
		t.Fatal(err)
	}
	downAt := time.Now()
	time.Sleep(4 * time.Second)
	if err := pg.start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("PostgreSQL down for %s", time.Since(downAt).Round(time.Millisecond))
	time.Sleep(4 * time.Second)
	close(stop)
	wg.Wait()

	t.Logf("answers: %v", statuses)
	if statuses[500] > 0 {
		t.Errorf("the API answered 500 %d times while PostgreSQL was down: %s", statuses[500], bodies[500])
	}
	if statuses[503] == 0 {
		t.Errorf("want 503 while PostgreSQL was down, got %v", statuses)
	} else if !strings.HasPrefix(bodies[503], "application/problem+json") {
		t.Errorf("503 is not a problem: %s", bodies[503])
	}
	for code, n := range statuses {
		if code != 202 && code != 503 {
			t.Errorf("unexpected answer %d (%d times): %s", code, n, bodies[code])
		}
	}
	waitAllTerminal(t, db, accepted, 60*time.Second)
	checkExactlyOnce(t, db, accepted)
}
