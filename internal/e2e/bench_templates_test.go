package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/testenv"
)

// The target: instantiating from a 5-deep chain costs at most twice
// a plain create of the same agent. Compare
//
//	go test -run '^$' -bench 'Instantiate5Deep|PlainCreate' -benchtime 3s ./internal/e2e/
//
// Both go through the real API over HTTP, each on a stack of its own.

// benchChainParams are the params of a 5-deep agent template chain, root
// first; every level sets, changes or removes something.
var benchChainParams = []map[string]any{
	{"max_concurrency": 1, "command_timeout_s": 60, "labels": map[string]any{"team": "core", "tier": "gold"}},
	{"allowed_tasks": []any{"echo", "sleep"}, "labels": map[string]any{"zone": "eu"}},
	{"max_concurrency": 4, "labels": map[string]any{"tier": nil, "rack": "r1"}},
	{"command_timeout_s": 120, "labels": map[string]any{"level": "4"}},
	{"allowed_tasks": []any{"echo"}, "labels": map[string]any{"level": "5"}},
}

// benchOverrides are what each instantiate sends; benchResolved is the
// config both benchmarks' agents end with.
var (
	benchOverrides = map[string]any{"command_timeout_s": 30, "labels": map[string]any{"owner": "bench"}}
	benchResolved  = map[string]any{
		"max_concurrency": 4, "command_timeout_s": 30, "allowed_tasks": []any{"echo"},
		"labels": map[string]any{"team": "core", "zone": "eu", "rack": "r1", "level": "5", "owner": "bench"},
	}
)

func BenchmarkInstantiate5Deep(b *testing.B) {
	c := benchUser(b, benchAPI(b))
	parent := ""
	for i, params := range benchChainParams {
		body := map[string]any{"kind": "agent", "name": fmt.Sprint("level-", i+1), "params": params}
		if parent != "" {
			body["parent_id"] = parent
		}
		parent = c.must(201, "POST", "/v1/templates", body)["id"].(string)
	}
	path := "/v1/templates/" + parent + "/instantiate"
	body := benchBody(b, map[string]any{"name": "bench", "params": benchOverrides})
	got := c.must(201, "POST", path, body)
	if !benchSameJSON(got["config"], benchResolved) {
		b.Fatalf("instantiated config: want %v, got %v", benchResolved, got["config"])
	}
	for b.Loop() {
		c.mustStatus(201, "POST", path, body)
	}
}

func BenchmarkPlainCreate(b *testing.B) {
	c := benchUser(b, benchAPI(b))
	body := benchBody(b, map[string]any{"name": "bench", "params": benchResolved})
	got := c.must(201, "POST", "/v1/agents", body)
	if !benchSameJSON(got["config"], benchResolved) {
		b.Fatalf("created config: want %v, got %v", benchResolved, got["config"])
	}
	for b.Loop() {
		c.mustStatus(201, "POST", "/v1/agents", body)
	}
}

// benchAPI starts an api process on a schema and Redis prefix of b's own,
// with the settings NewStack gives tests, and returns its URL. (NewStack
// and Start take the *testing.T a benchmark does not have.)
func benchAPI(b *testing.B) string {
	b.Helper()
	_, dsn := testenv.PostgresURL(b)
	_, prefix := testenv.Redis(b)
	cmd := exec.Command(filepath.Join(binDir, "api"))
	cmd.Env = append(os.Environ(),
		"AGENTRY_ENV=test",
		"AGENTRY_DATABASE_URL="+dsn,
		"AGENTRY_REDIS_URL="+testenv.RedisURL(),
		"AGENTRY_REDIS_PREFIX="+prefix,
		"AGENTRY_HTTP_ADDR=127.0.0.1:0",
		"AGENTRY_SHUTDOWN_TIMEOUT=10s",
		"AGENTRY_LOG_LEVEL=info",
		"AGENTRY_CONFIG_DIR="+b.TempDir(),
		"AGENTRY_DB_MAX_OPEN_CONNS=10",
	)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var mu sync.Mutex
	var logs bytes.Buffer
	cmd.Stderr = lockedWriter{&mu, &logs}
	stderr := func() string {
		mu.Lock()
		defer mu.Unlock()
		return logs.String()
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second): // a benchmark needs no graceful end
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if l := stderr(); strings.Contains(l, "panic:") {
			b.Errorf("api:\n%s", l)
		}
	})
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if _, url, ok := strings.Cut(sc.Text(), " listening on "); ok {
				select {
				case urls <- url:
				default:
				}
			}
		}
	}()
	select {
	case url := <-urls:
		return url
	case <-done:
		b.Fatalf("api exited before listening:\n%s", stderr())
	case <-time.After(30 * time.Second):
		b.Fatalf("api did not listen within 30s:\n%s", stderr())
	}
	return ""
}

// benchClient is one logged-in user of an API, for benchmarks.
type benchClient struct {
	b                *testing.B
	base, token, org string
	http             *http.Client
}

// benchUser registers and logs in a user on the API at base.
func benchUser(b *testing.B, base string) *benchClient {
	b.Helper()
	c := &benchClient{b: b, base: base, http: &http.Client{Timeout: 30 * time.Second}}
	email := fmt.Sprintf("bench-%d@example.com", time.Now().UnixNano())
	password := "bench-password-long-enough"
	// /readyz first: the listener is up before the dependencies are checked.
	deadline := time.Now().Add(30 * time.Second)
	for status, _ := c.do("GET", "/readyz", nil); status != 200; status, _ = c.do("GET", "/readyz", nil) {
		if time.Now().After(deadline) {
			b.Fatalf("api not ready within 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	reg := c.must(201, "POST", "/v1/auth/register", map[string]any{"email": email, "password": password, "name": "bench"})
	tok := c.must(200, "POST", "/v1/auth/login", map[string]any{"email": email, "password": password})
	c.token, c.org = tok["access_token"].(string), reg["default_org_id"].(string)
	return c
}

func (c *benchClient) do(method, path string, body any) (int, []byte) {
	var rd io.Reader
	switch x := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(x)
	default:
		rd = bytes.NewReader(benchBody(c.b, x))
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		c.b.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
		req.Header.Set("X-Org-ID", c.org)
	}
	res, err := c.http.Do(req)
	if err != nil {
		c.b.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	data, err := io.ReadAll(res.Body)
	if err != nil {
		c.b.Fatalf("%s %s: %v", method, path, err)
	}
	return res.StatusCode, data
}

func (c *benchClient) mustStatus(want int, method, path string, body any) []byte {
	status, data := c.do(method, path, body)
	if status != want {
		c.b.Fatalf("%s %s: want %d, got %d: %s", method, path, want, status, data)
	}
	return data
}

func (c *benchClient) must(want int, method, path string, body any) map[string]any {
	var out map[string]any
	if err := json.Unmarshal(c.mustStatus(want, method, path, body), &out); err != nil {
		c.b.Fatalf("%s %s: %v", method, path, err)
	}
	return out
}

func benchBody(b *testing.B, v any) []byte {
	data, err := json.Marshal(v)
	if err != nil {
		b.Fatal(err)
	}
	return data
}

// benchSameJSON compares two values as JSON.
func benchSameJSON(a, b any) bool {
	var x, y any
	da, _ := json.Marshal(a)
	db, _ := json.Marshal(b)
	_ = json.Unmarshal(da, &x)
	_ = json.Unmarshal(db, &y)
	return reflect.DeepEqual(x, y)
}
