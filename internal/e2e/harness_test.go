// Package e2e tests agentry end to end through its real binaries: the
// test process builds cmd/api, cmd/worker and cmd/scheduler once, and each
// test starts the ones it needs against its own PostgreSQL schema and Redis
// key prefix, then talks to them over HTTP and WebSocket like a user would.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/testenv"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "agentry-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	args := []string{"build", "-o", dir + "/"}
	if os.Getenv("AGENTRY_E2E_RACE") != "" {
		args = append(args, "-race") // slower; for hunting races in the binaries
	}
	args = append(args, "github.com/agentry/agentry/cmd/api", "github.com/agentry/agentry/cmd/worker", "github.com/agentry/agentry/cmd/scheduler")
	build := exec.Command("go", args...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: building the binaries:", err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// Stack is one isolated installation: a database schema, a Redis prefix,
// and the binaries started on them.
type Stack struct {
	t     *testing.T
	DSN   string
	Redis string
	// Prefix is the stack's Redis key prefix.
	Prefix string
	Env    map[string]string

	mu    sync.Mutex
	procs []*Proc
}

// NewStack prepares a migrated schema and a Redis prefix; start binaries
// with API, Worker and Scheduler. env adds or overrides AGENTRY_* settings.
func NewStack(t *testing.T, env map[string]string) *Stack {
	t.Helper()
	_, dsn := testenv.PostgresURL(t)
	_, prefix := testenv.Redis(t)
	s := &Stack{t: t, DSN: dsn, Redis: testenv.RedisURL(), Prefix: prefix, Env: map[string]string{
		"AGENTRY_ENV":                  "test",
		"AGENTRY_DATABASE_URL":         dsn,
		"AGENTRY_REDIS_URL":            testenv.RedisURL(),
		"AGENTRY_REDIS_PREFIX":         prefix,
		"AGENTRY_HTTP_ADDR":            "127.0.0.1:0",
		"AGENTRY_WORKER_ADDR":          "127.0.0.1:0",
		"AGENTRY_SCHEDULER_ADDR":       "127.0.0.1:0",
		"AGENTRY_SHUTDOWN_TIMEOUT":     "10s",
		"AGENTRY_LOG_LEVEL":            "info",
		"AGENTRY_CONFIG_DIR":           t.TempDir(),
		"AGENTRY_ALLOWED_ORIGINS":      "http://allowed.example",
		"AGENTRY_DB_MAX_OPEN_CONNS":    "10",
		"AGENTRY_LOGIN_FAILURE_WINDOW": "1m",
	}}
	for k, v := range env {
		s.Env[k] = v
	}
	t.Cleanup(s.StopAll)
	return s
}

// Proc is a running binary.
type Proc struct {
	Name string
	URL  string // its HTTP address
	cmd  *exec.Cmd
	logs *bytes.Buffer
	mu   *sync.Mutex
	done chan struct{}
	err  error
}

// Logs returns what the process wrote to stderr so far.
func (p *Proc) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// Start runs binary (api, worker or scheduler) with args and the stack's
// settings, and waits until it listens and /readyz answers 200.
func (s *Stack) Start(binary string, args ...string) *Proc {
	s.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, binary), args...)
	cmd.Env = os.Environ()
	for k, v := range s.Env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, _ := cmd.StdoutPipe()
	p := &Proc{Name: binary, cmd: cmd, logs: &bytes.Buffer{}, mu: &sync.Mutex{}, done: make(chan struct{})}
	cmd.Stderr = lockedWriter{p.mu, p.logs}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start %s: %v", binary, err)
	}
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			if _, url, ok := strings.Cut(line, " listening on "); ok {
				select {
				case urls <- url:
				default:
				}
			}
		}
	}()
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	select {
	case p.URL = <-urls:
	case <-p.done:
		s.t.Fatalf("%s exited before listening: %v\n%s", binary, p.err, p.Logs())
	case <-time.After(30 * time.Second):
		s.t.Fatalf("%s did not listen within 30s\n%s", binary, p.Logs())
	}
	s.waitReady(p)
	return p
}

func (s *Stack) waitReady(p *Proc) {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		res, err := http.Get(p.URL + "/readyz")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return
			}
		}
		select {
		case <-p.done:
			s.t.Fatalf("%s exited: %v\n%s", p.Name, p.err, p.Logs())
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.t.Fatalf("%s not ready within 30s\n%s", p.Name, p.Logs())
}

// API starts an API process.
func (s *Stack) API() *Proc { return s.Start("api") }

// Stop sends SIGTERM and waits for the process to exit (SIGKILL after 20s).
func (p *Proc) Stop() error {
	if p.cmd.Process == nil {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	return p.err
}

// Kill sends SIGKILL: the process dies without any cleanup.
func (p *Proc) Kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// StopAll stops every process of the stack; a process that logged a panic
// or a data race fails the test.
func (s *Stack) StopAll() {
	s.mu.Lock()
	procs := s.procs
	s.procs = nil
	s.mu.Unlock()
	for _, p := range procs {
		_ = p.Stop()
		logs := p.Logs()
		if strings.Contains(logs, "WARNING: DATA RACE") || strings.Contains(logs, "panic:") {
			s.t.Errorf("%s:\n%s", p.Name, logs)
		}
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Client talks to an API as one caller.
type Client struct {
	t     *testing.T
	Base  string
	Token string
	Org   string
	// Header is added to every request.
	Header http.Header
}

// Client returns an anonymous client of the API process p.
func (s *Stack) Client(p *Proc) *Client {
	return &Client{t: s.t, Base: p.URL, Header: http.Header{}}
}

// Response is an answer, read whole.
type Response struct {
	Status int
	Header http.Header
	Body   []byte
}

// JSON decodes the body into a map (failing the test if it is not JSON).
func (r *Response) JSON(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("not JSON (%d): %s", r.Status, r.Body)
	}
	return m
}

// Str returns a top-level string field of a JSON body.
func (r *Response) Str(t *testing.T, key string) string {
	t.Helper()
	v, _ := r.JSON(t)[key].(string)
	return v
}

// Do sends a request; body is marshalled to JSON unless it is a string or
// []byte. Extra headers come in name, value pairs.
func (c *Client) Do(method, path string, body any, headers ...string) *Response {
	c.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			c.t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, c.Base+path, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if c.Org != "" {
		req.Header.Set("X-Org-ID", c.Org)
	}
	for k, vs := range c.Header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	return &Response{Status: res.StatusCode, Header: res.Header, Body: data}
}

// Must sends a request and fails the test unless the status is want.
func (c *Client) Must(want int, method, path string, body any, headers ...string) *Response {
	c.t.Helper()
	r := c.Do(method, path, body, headers...)
	if r.Status != want {
		c.t.Fatalf("%s %s: want %d, got %d: %s", method, path, want, r.Status, r.Body)
	}
	return r
}

// As returns a copy of the client with another token and organization.
func (c *Client) As(token, org string) *Client {
	cp := *c
	cp.Token, cp.Org = token, org
	cp.Header = c.Header.Clone()
	return &cp
}

// User is a registered, logged-in account.
type User struct {
	*Client
	ID, Email, Password, Org, Refresh string
}

var userSeq struct {
	sync.Mutex
	n int
}

// NewUser registers a fresh account and logs it in; its client acts in its
// personal organization.
func (c *Client) NewUser(name string) *User {
	c.t.Helper()
	userSeq.Lock()
	userSeq.n++
	n := userSeq.n
	userSeq.Unlock()
	email := fmt.Sprintf("%s-%d-%d@example.com", strings.ToLower(name), n, time.Now().UnixNano())
	password := "pass-" + name + "-long-enough"
	anon := c.As("", "")
	r := anon.Must(201, "POST", "/v1/auth/register", map[string]any{"email": email, "password": password, "name": name})
	u := &User{ID: r.Str(c.t, "id"), Email: email, Password: password, Org: r.Str(c.t, "default_org_id")}
	tok := anon.Must(200, "POST", "/v1/auth/login", map[string]any{"email": email, "password": password})
	u.Client = c.As(tok.Str(c.t, "access_token"), u.Org)
	u.Refresh = tok.Str(c.t, "refresh_token")
	return u
}

// Eventually polls cond every 20ms until it holds or timeout passes.
func Eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
