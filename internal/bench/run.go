package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/bench/benchkit"
	"github.com/agentry/agentry/internal/crud/crudtest"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/testenv"
)

type options struct {
	duration   time.Duration
	only       string
	cpuprofile string
}

// result is one measurement.
type result struct {
	rps      float64
	p50, p99 time.Duration
	errors   int64
}

// load sends requests from conc goroutines for d and returns the rate of
// successful answers. next returns the request path to send.
func load(ctx context.Context, base string, headers map[string]string, conc int, d time.Duration, next func() string) result {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: conc, MaxIdleConns: conc}}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var ok, bad atomic.Int64
	lat := make([][]time.Duration, conc)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+next(), nil)
				for k, v := range headers {
					req.Header.Set(k, v)
				}
				t := time.Now()
				res, err := client.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						bad.Add(1)
					}
					continue
				}
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.StatusCode != http.StatusOK {
					bad.Add(1)
					continue
				}
				ok.Add(1)
				lat[i] = append(lat[i], time.Since(t))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	r := result{rps: float64(ok.Load()) / elapsed.Seconds(), errors: bad.Load()}
	if len(all) > 0 {
		r.p50, r.p99 = all[len(all)/2], all[len(all)*99/100]
	}
	return r
}

func run(ctx context.Context, o options) error {
	if o.duration == 0 {
		o.duration = 5 * time.Second
		if d, err := time.ParseDuration(os.Getenv("BENCH_DURATION")); err == nil {
			o.duration = d
		}
	}
	want := func(name string) bool { return o.only == "" || strings.Contains(name, o.only) }
	tmp, err := os.MkdirTemp("", "agentry-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	fmt.Fprintln(os.Stderr, "bench: building the binaries")
	build := exec.Command("go", "build", "-o", tmp+"/", "./cmd/api", "./cmd/worker", "./cmd/scheduler")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}

	env, cleanup, err := prepare(ctx, tmp)
	if err != nil {
		return err
	}
	var once sync.Once
	cleanup = func(f func()) func() { return func() { once.Do(f) } }(cleanup)
	defer cleanup()
	fmt.Fprintf(os.Stderr, "bench: %d agents in one organization; each measurement runs %s\n", len(env.ids), o.duration)

	bare, err := benchkit.Start(ctx, exec.Command(self, "-serve", "bare", "-dsn", env.dsn))
	if err != nil {
		return err
	}
	defer bare.Stop()
	barePrep, err := benchkit.Start(ctx, exec.Command(self, "-serve", "bare-prepared", "-dsn", env.dsn))
	if err != nil {
		return err
	}
	defer barePrep.Stop()
	fwArgs := []string{"-serve", "framework", "-dsn", env.dsn}
	if o.cpuprofile != "" {
		fwArgs = append(fwArgs, "-cpuprofile", o.cpuprofile)
	}
	fw, err := benchkit.Start(ctx, exec.Command(self, fwArgs...))
	if err != nil {
		return err
	}
	defer fw.Stop()

	testHeaders := map[string]string{crudtest.UserHeader: env.user, crudtest.OrgHeader: env.org}
	apiHeaders := map[string]string{"Authorization": "Bearer " + env.token, "X-Org-ID": env.org}
	randomAgent := func() string { return "/v1/agents/" + env.ids[rand.IntN(len(env.ids))] }
	randomPage := func() string { return "/v1/agents?page=" + strconv.Itoa(1+rand.IntN(50)) + "&page_size=20" }
	const conc = 16

	measure := func(s string, h map[string]string, next func() string) result {
		load(ctx, s, h, conc, time.Second, next) // warm up
		return load(ctx, s, h, conc, o.duration, next)
	}
	if want("crud_get") || want("api_get") {
		b := measure(bare.URL, testHeaders, randomAgent)
		bp := measure(barePrep.URL, testHeaders, randomAgent)
		f := measure(fw.URL, testHeaders, randomAgent)
		a := measure(env.api.URL, apiHeaders, randomAgent)
		b2 := measure(bare.URL, testHeaders, randomAgent)
		bp2 := measure(barePrep.URL, testHeaders, randomAgent)
		base, basePrep := (b.rps+b2.rps)/2, (bp.rps+bp2.rps)/2
		if want("crud_get") {
			benchkit.Compare("crud_get", f.rps, "req/s", "gin_sqlx", base, "req/s")
			benchkit.Compare("crud_get", f.rps, "req/s", "gin_sqlx_prepared", basePrep, "req/s")
		}
		if want("api_get") {
			benchkit.Compare("api_get_authenticated_acl", a.rps, "req/s", "gin_sqlx", base, "req/s")
			benchkit.Compare("api_get_authenticated_acl", a.rps, "req/s", "gin_sqlx_prepared", basePrep, "req/s")
		}
		checkErrors(b, bp, f, a)
	}
	if want("api_get_cached") {
		// A cache serves hot keys: 5,000 agents, read once to warm it, then
		// read at random by the cached API and by the baseline alike.
		hot := env.ids[:5000]
		warmUp(ctx, env.cached.URL, apiHeaders, hot)
		randomHot := func() string { return "/v1/agents/" + hot[rand.IntN(len(hot))] }
		b := measure(bare.URL, testHeaders, randomHot)
		c := measure(env.cached.URL, apiHeaders, randomHot)
		b2 := measure(bare.URL, testHeaders, randomHot)
		benchkit.Compare("api_get_cached", c.rps, "req/s", "gin_sqlx", (b.rps+b2.rps)/2, "req/s")
		checkErrors(b, c)
	}
	if want("crud_list") {
		b := measure(bare.URL, testHeaders, randomPage)
		f := measure(fw.URL, testHeaders, randomPage)
		b2 := measure(bare.URL, testHeaders, randomPage)
		benchkit.Compare("crud_list_total_50k", f.rps, "req/s", "gin_sqlx", (b.rps+b2.rps)/2, "req/s")
		checkErrors(b, f)
	}
	bare.Stop()
	barePrep.Stop()
	fw.Stop()
	cleanup()

	// The sub-benchmarks print their own BENCH lines.
	subs := []struct {
		name string
		args []string
	}{
		{"pipeline", []string{"run", "./internal/bench/pipeline", "-bin", tmp}},
		{"ws", []string{"run", "./internal/bench/wsload", "-bin", tmp}},
		{"instantiate", []string{"test", "-run", "^$", "-bench", "^(BenchmarkInstantiate5Deep|BenchmarkPlainCreate)$", "-benchtime", "3s", "./internal/e2e/"}},
	}
	for _, sub := range subs {
		if !want(sub.name) {
			continue
		}
		fmt.Fprintf(os.Stderr, "bench: %s\n", sub.name)
		cmd := exec.CommandContext(ctx, "go", sub.args...)
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %s failed: %v\n%s", sub.name, err, out)
			continue
		}
		if sub.name == "instantiate" {
			instantiateLine(string(out))
			continue
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "BENCH ") {
				fmt.Println(l)
			}
		}
	}
	return nil
}

// instantiateLine turns the template benchmarks' ns/op into a comparison.
func instantiateLine(out string) {
	nsop := map[string]float64{}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 4 && strings.HasPrefix(f[0], "Benchmark") && f[3] == "ns/op" {
			name := strings.SplitN(strings.TrimPrefix(f[0], "Benchmark"), "-", 2)[0]
			if v, err := strconv.ParseFloat(f[2], 64); err == nil {
				nsop[name] = v
			}
		}
	}
	inst, plain := nsop["Instantiate5Deep"], nsop["PlainCreate"]
	if inst == 0 || plain == 0 {
		fmt.Fprintf(os.Stderr, "bench: instantiate: no figures in\n%s", out)
		return
	}
	benchkit.Compare("instantiate_5_deep", inst/1e6, "ms", "plain_create", plain/1e6, "ms")
}

func checkErrors(rs ...result) {
	for _, r := range rs {
		if r.errors > 0 {
			fmt.Fprintf(os.Stderr, "bench: warning: %d failed requests in a run\n", r.errors)
		}
	}
}

type benchEnv struct {
	dsn, org, user, token string
	ids                   []string
	api, cached           *benchkit.Proc
}

// prepare creates a schema, starts the real api on it, registers a user and
// seeds 50,000 agents in the user's organization.
func prepare(ctx context.Context, bin string) (*benchEnv, func(), error) {
	schema := testenv.Name("bench_")
	admin, err := sqlx.Open("postgres", testenv.DatabaseURL())
	if err != nil {
		return nil, nil, err
	}
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		return nil, nil, fmt.Errorf("PostgreSQL at %s: %w (make bench starts it)", testenv.DatabaseURL(), err)
	}
	cleanup := func() {
		_, _ = admin.Exec("DROP SCHEMA " + schema + " CASCADE")
		admin.Close()
	}
	dsn := testenv.DatabaseURL() + "&search_path=" + schema
	if !strings.Contains(testenv.DatabaseURL(), "?") {
		dsn = testenv.DatabaseURL() + "?search_path=" + schema
	}
	db, err := postgres.Open(ctx, dsn, postgres.PoolOptions{MaxOpenConns: 4})
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	defer db.Close()
	m, err := postgres.NewMigrator(db.DB, false)
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	if err := m.Up(ctx, io.Discard); err != nil {
		cleanup()
		return nil, nil, err
	}
	env := &benchEnv{dsn: dsn}
	apiCmd := func(cache bool) *exec.Cmd {
		api := exec.Command(filepath.Join(bin, "api"))
		api.Env = append(os.Environ(),
			"AGENTRY_ENV=test", "AGENTRY_DATABASE_URL="+dsn, "AGENTRY_REDIS_URL="+testenv.RedisURL(),
			"AGENTRY_REDIS_PREFIX="+schema, "AGENTRY_HTTP_ADDR=127.0.0.1:0", "AGENTRY_CONFIG_DIR="+bin,
			"AGENTRY_CACHE="+strconv.FormatBool(cache))
		return api
	}
	if env.api, err = benchkit.StartReady(ctx, apiCmd(false)); err != nil {
		cleanup()
		return nil, nil, err
	}
	if env.cached, err = benchkit.StartReady(ctx, apiCmd(true)); err != nil {
		env.api.Stop()
		cleanup()
		return nil, nil, err
	}
	stopAll := func() { env.api.Stop(); env.cached.Stop(); cleanup() }
	u, token, err := benchkit.SignUp(env.api.URL, "bench@example.com", "bench-password")
	if err != nil {
		stopAll()
		return nil, nil, err
	}
	env.user, env.org, env.token = u["id"].(string), u["default_org_id"].(string), token
	// Seeds 50,000 agents owned by the user, one second apart.
	if err := db.SelectContext(ctx, &env.ids, `WITH ids AS (SELECT gen_random_uuid() AS id, g FROM generate_series(1, 50000) g),
			e AS (INSERT INTO entities (id, kind) SELECT id, 'agent' FROM ids)
		INSERT INTO agents (id, org_id, owner_id, name, created_at, updated_at)
		SELECT id, $1, $2, 'agent-' || g, now() - g * interval '1 second', now() - g * interval '1 second' FROM ids
		RETURNING id`, env.org, env.user); err != nil {
		stopAll()
		return nil, nil, err
	}
	if _, err := db.ExecContext(ctx, "ANALYZE"); err != nil {
		stopAll()
		return nil, nil, err
	}
	return env, stopAll, nil
}

// warmUp reads every path of ids once, 16 at a time.
func warmUp(ctx context.Context, base string, headers map[string]string, ids []string) {
	work := make(chan string)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range work {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/agents/"+id, nil)
				for k, v := range headers {
					req.Header.Set(k, v)
				}
				if res, err := http.DefaultClient.Do(req); err == nil {
					_, _ = io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
			}
		}()
	}
	for _, id := range ids {
		work <- id
	}
	close(work)
	wg.Wait()
}
