package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"
)

// command is what GET /v1/commands/{id} answers.
type command struct {
	ID                string          `json:"id"`
	AgentID           string          `json:"agent_id"`
	Task              string          `json:"task"`
	Status            string          `json:"status"`
	Attempt           int             `json:"attempt"`
	Failures          int             `json:"failures"`
	TimeoutS          int             `json:"timeout_s"`
	Progress          int             `json:"progress"`
	Error             *string         `json:"error"`
	Result            json.RawMessage `json:"result"`
	CreatedAt         time.Time       `json:"created_at"`
	StartedAt         *time.Time      `json:"started_at"`
	FinishedAt        *time.Time      `json:"finished_at"`
	NotBefore         *time.Time      `json:"not_before"`
	CancelRequestedAt *time.Time      `json:"cancel_requested_at"`
}

func (c *command) errorText() string {
	if c.Error == nil {
		return ""
	}
	return *c.Error
}

func decodeCommand(t *testing.T, r *Response) *command {
	t.Helper()
	c := &command{}
	if err := json.Unmarshal(r.Body, c); err != nil {
		t.Fatalf("not a command (%d): %s", r.Status, r.Body)
	}
	return c
}

// cmdAgent creates an agent with params and returns its id.
func cmdAgent(t *testing.T, c *Client, params map[string]any) string {
	t.Helper()
	body := map[string]any{"name": "agent"}
	if params != nil {
		body["params"] = params
	}
	return c.Must(201, "POST", "/v1/agents", body).Str(t, "id")
}

// cmdDispatch dispatches body to agent and wants 202.
func cmdDispatch(t *testing.T, c *Client, agent string, body any, headers ...string) *command {
	t.Helper()
	return decodeCommand(t, c.Must(202, "POST", "/v1/agents/"+agent+"/commands", body, headers...))
}

func echo(message string) map[string]any {
	return map[string]any{"task": "agent:echo", "payload": map[string]any{"message": message}}
}

func sleep(ms int, extra ...any) map[string]any {
	body := map[string]any{"task": "agent:sleep", "payload": map[string]any{"milliseconds": ms}}
	for i := 0; i+1 < len(extra); i += 2 {
		body[extra[i].(string)] = extra[i+1]
	}
	return body
}

func cmdGet(t *testing.T, c *Client, id string) *command {
	t.Helper()
	return decodeCommand(t, c.Must(200, "GET", "/v1/commands/"+id, nil))
}

// cmdWait polls the command until cond holds.
func cmdWait(t *testing.T, c *Client, id string, within time.Duration, what string, cond func(*command) bool) *command {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := cmdGet(t, c, id)
		if cond(got) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("command %s: want %s within %s; it is %s at attempt %d (error %q)", id, what, within, got.Status, got.Attempt, got.errorText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cmdWaitStatus waits until the command has status.
func cmdWaitStatus(t *testing.T, c *Client, id, status string, within time.Duration) *command {
	t.Helper()
	return cmdWait(t, c, id, within, status, func(c *command) bool { return c.Status == status })
}

type event struct {
	ID       int64  `json:"id"`
	Type     string `json:"type"`
	Status   string `json:"status"`
	Attempt  int    `json:"attempt"`
	Progress int    `json:"progress"`
	Message  string `json:"message"`
}

func cmdEvents(t *testing.T, c *Client, id string) []event {
	t.Helper()
	var out struct{ Items []event }
	if err := json.Unmarshal(c.Must(200, "GET", "/v1/commands/"+id+"/events", nil).Body, &out); err != nil {
		t.Fatal(err)
	}
	return out.Items
}

func eventTypes(evs []event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.Type
	}
	return out
}

func agentStatus(t *testing.T, c *Client, agent string) string {
	t.Helper()
	return c.Must(200, "GET", "/v1/agents/"+agent+"/status", nil).Str(t, "status")
}

// waitAgentStatus polls the agent's status until it is want.
func waitAgentStatus(t *testing.T, c *Client, agent, want string, within time.Duration) {
	t.Helper()
	var got string
	Eventually(t, within, "agent status "+want, func() bool {
		got = agentStatus(t, c, agent)
		return got == want
	})
}

// problemFields lists the fields of a problem answer.
func problemFields(t *testing.T, r *Response) []string {
	t.Helper()
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
		t.Errorf("want a problem, got Content-Type %q: %s", ct, r.Body)
	}
	var p struct {
		Errors []struct{ Location, Field, Message string } `json:"errors"`
	}
	_ = json.Unmarshal(r.Body, &p)
	var out []string
	for _, e := range p.Errors {
		out = append(out, e.Field+e.Location)
	}
	return out
}

// problemText is a problem's detail and its errors' messages.
func problemText(t *testing.T, r *Response) string {
	t.Helper()
	var p struct {
		Detail string                            `json:"detail"`
		Errors []struct{ Field, Message string } `json:"errors"`
	}
	if err := json.Unmarshal(r.Body, &p); err != nil {
		t.Fatalf("not a problem (%d): %s", r.Status, r.Body)
	}
	out := p.Detail
	for _, e := range p.Errors {
		out += "\n" + e.Field + ": " + e.Message
	}
	return out
}

func TestCommandDispatchSucceeds(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("disp")
	agent := cmdAgent(t, u.Client, nil)

	r := u.Must(202, "POST", "/v1/agents/"+agent+"/commands", echo("hello"))
	c := decodeCommand(t, r)
	if c.Status != "queued" || c.Task != "agent:echo" || c.AgentID != agent {
		t.Fatalf("202: want a queued agent:echo of the agent, got %s", r.Body)
	}
	if loc := r.Header.Get("Location"); loc != "/v1/commands/"+c.ID {
		t.Errorf("Location: want /v1/commands/%s, got %q", c.ID, loc)
	}
	var stamps struct {
		CreatedAt time.Time `json:"created_at"`
		UpdatedAt time.Time `json:"updated_at"`
	}
	if err := json.Unmarshal(r.Body, &stamps); err != nil || stamps.CreatedAt.IsZero() || stamps.UpdatedAt.Before(stamps.CreatedAt) {
		t.Errorf("a new command updated (%s) before it was created (%s) (%v)", stamps.UpdatedAt, stamps.CreatedAt, err)
	}
	done := cmdWaitStatus(t, u.Client, c.ID, "succeeded", 10*time.Second)
	var res struct {
		Message, Agent string
		Attempt        int
	}
	if err := json.Unmarshal(done.Result, &res); err != nil || res.Message != "hello" || res.Agent != agent || res.Attempt != 1 {
		t.Fatalf("result: want the message back from the agent at attempt 1, got %s", done.Result)
	}
	if done.Attempt != 1 || done.Progress != 100 || done.StartedAt == nil || done.FinishedAt == nil {
		t.Fatalf("want attempt 1, progress 100, started and finished; got %+v", done)
	}
	types := eventTypes(cmdEvents(t, u.Client, c.ID))
	if types[0] != "queued" || types[1] != "running" || types[len(types)-1] != "succeeded" {
		t.Fatalf("events: want queued, running … succeeded, got %v", types)
	}
	// It is listed, and filters work.
	list := u.Must(200, "GET", "/v1/commands?agent_id="+agent+"&status=succeeded", nil).JSON(t)
	if items := list["items"].([]any); len(items) != 1 {
		t.Fatalf("list: want 1, got %d", len(items))
	}
}

func TestCommandProgressEventsInOrder(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("prog")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, map[string]any{"task": "agent:sleep", "payload": map[string]any{"milliseconds": 1500, "steps": 5}})
	cmdWaitStatus(t, u.Client, c.ID, "succeeded", 15*time.Second)
	evs := cmdEvents(t, u.Client, c.ID)
	var progress []int
	for i, e := range evs {
		if i > 0 && e.ID <= evs[i-1].ID {
			t.Fatalf("events out of order: %v", evs)
		}
		if e.Type == "progress" {
			progress = append(progress, e.Progress)
		}
	}
	if len(progress) < 3 || !slices.IsSorted(progress) {
		t.Fatalf("want several progress events, rising, got %v (events %v)", progress, eventTypes(evs))
	}
	if final := evs[len(evs)-1]; final.Progress != 100 {
		t.Fatalf("want the command to end at 100%%, got %d", final.Progress)
	}
	types := eventTypes(evs)
	first, last := slices.Index(types, "progress"), len(types)-1
	if types[0] != "queued" || types[1] != "running" || first < 2 || types[last] != "succeeded" {
		t.Fatalf("want queued, running, progress…, succeeded; got %v", types)
	}
	// after= pages on.
	after := u.Must(200, "GET", fmt.Sprintf("/v1/commands/%s/events?after=%d", c.ID, evs[1].ID), nil).JSON(t)["items"].([]any)
	if len(after) != len(evs)-2 {
		t.Fatalf("after the second event: want %d, got %d", len(evs)-2, len(after))
	}
	if r := u.Do("GET", "/v1/commands/"+c.ID+"/events?page=2", nil); r.Status != 400 {
		t.Fatalf("an unknown parameter: want 400, got %d", r.Status)
	}
}

func TestCommandAgentStatus(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("status")
	agent := cmdAgent(t, u.Client, nil)
	if st := agentStatus(t, u.Client, agent); st != "idle" {
		t.Fatalf("a new agent: want idle, got %s", st)
	}
	c := cmdDispatch(t, u.Client, agent, sleep(1500))
	cmdWaitStatus(t, u.Client, c.ID, "running", 10*time.Second)
	// The API caches agents; the worker makes the cached copy stale just
	// after it claims the command.
	waitAgentStatus(t, u.Client, agent, "busy", time.Second)
	st := u.Must(200, "GET", "/v1/agents/"+agent+"/status", nil).JSON(t)
	if st["status"] != "busy" || st["running"] != float64(1) || st["last_task"] != "agent:sleep" {
		var inDB string
		_ = stackDB(t, s).Get(&inDB, `SELECT status FROM agents WHERE id = $1`, agent)
		t.Fatalf("while running: want busy with 1 running, got %v (the database says %s)", st, inDB)
	}
	cmdWaitStatus(t, u.Client, c.ID, "succeeded", 10*time.Second)
	waitAgentStatus(t, u.Client, agent, "idle", 5*time.Second)

	failed := cmdDispatch(t, u.Client, agent, map[string]any{"task": "agent:echo", "payload": map[string]any{"fail": "broken"}, "max_retries": 0})
	cmdWaitStatus(t, u.Client, failed.ID, "failed", 10*time.Second)
	waitAgentStatus(t, u.Client, agent, "error", 5*time.Second)
	// A success clears the error.
	ok := cmdDispatch(t, u.Client, agent, echo("fine"))
	cmdWaitStatus(t, u.Client, ok.ID, "succeeded", 10*time.Second)
	waitAgentStatus(t, u.Client, agent, "idle", 5*time.Second)
}

func TestCommandIdempotency(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("idem")
	agent := cmdAgent(t, u.Client, nil)
	first := cmdDispatch(t, u.Client, agent, echo("once"), "Idempotency-Key", "key-1")
	again := decodeCommand(t, u.Must(200, "POST", "/v1/agents/"+agent+"/commands", echo("once"), "Idempotency-Key", "key-1"))
	if again.ID != first.ID {
		t.Fatalf("same key and body: want the same command %s, got %s", first.ID, again.ID)
	}
	// The same body with its keys in another order is the same request.
	reordered := `{"payload": {"message": "once"}, "task": "agent:echo"}`
	if got := decodeCommand(t, u.Must(200, "POST", "/v1/agents/"+agent+"/commands", reordered, "Idempotency-Key", "key-1")); got.ID != first.ID {
		t.Fatalf("reordered body: want the same command, got %s", got.ID)
	}
	// A setting sent with its default value is the same request as one
	// that leaves it out.
	defaults := `{"task": "agent:echo", "payload": {"message": "once"}, "priority": 0}`
	if got := decodeCommand(t, u.Must(200, "POST", "/v1/agents/"+agent+"/commands", defaults, "Idempotency-Key", "key-1")); got.ID != first.ID {
		t.Fatalf("explicit defaults: want the same command, got %s", got.ID)
	}
	if r := u.Do("POST", "/v1/agents/"+agent+"/commands", `{"task": "agent:echo", "payload": {"message": "once"}, "priority": 5}`, "Idempotency-Key", "key-1"); r.Status != 409 {
		t.Fatalf("same key, another priority: want 409, got %d: %s", r.Status, r.Body)
	}
	r := u.Do("POST", "/v1/agents/"+agent+"/commands", echo("twice"), "Idempotency-Key", "key-1")
	if r.Status != 409 {
		t.Fatalf("same key, different body: want 409, got %d: %s", r.Status, r.Body)
	}
	problemFields(t, r)
	other := cmdDispatch(t, u.Client, agent, echo("once"), "Idempotency-Key", "key-2")
	if other.ID == first.ID {
		t.Fatal("another key: want another command")
	}
	// Another user's same key is theirs.
	v := s.Client(api).NewUser("idem2")
	vAgent := cmdAgent(t, v.Client, nil)
	cmdDispatch(t, v.Client, vAgent, echo("once"), "Idempotency-Key", "key-1")

	// Concurrent retries of one request store one command.
	var wg sync.WaitGroup
	var mu sync.Mutex
	ids := map[string]bool{}
	statuses := map[int]int{}
	for range 8 {
		wg.Go(func() {
			r := u.Do("POST", "/v1/agents/"+agent+"/commands", echo("race"), "Idempotency-Key", "key-race")
			mu.Lock()
			defer mu.Unlock()
			statuses[r.Status]++
			if r.Status < 300 {
				ids[decodeCommand(t, r).ID] = true
			}
		})
	}
	wg.Wait()
	if len(ids) != 1 || statuses[202] != 1 || statuses[200] != 7 {
		t.Fatalf("concurrent retries: want one 202 and seven 200 with one command, got statuses %v, ids %v", statuses, ids)
	}
}

func TestCommandDispatchRefused(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("bad")
	agent := cmdAgent(t, u.Client, nil)
	path := "/v1/agents/" + agent + "/commands"
	cases := []struct {
		name       string
		body       any
		wantStatus int
		wantField  string
		wantReason string
	}{
		{"unknown task", map[string]any{"task": "agent:teleport"}, 400, "body.task", "agent:echo"},
		{"unknown payload field", map[string]any{"task": "agent:echo", "payload": map[string]any{"nope": 1}}, 400, "body.payload", `unknown field "nope"`},
		{"wrong payload type", map[string]any{"task": "agent:sleep", "payload": map[string]any{"milliseconds": "soon"}}, 400, "body.payload", `"milliseconds"`},
		{"payload out of range", map[string]any{"task": "agent:sleep", "payload": map[string]any{"milliseconds": -5}}, 400, "body.payload", "between 0 and 3600000"},
		{"bad URL", map[string]any{"task": "web:scrape", "payload": map[string]any{"url": "ftp://x"}}, 400, "body.payload", "url"},
		{"timeout out of range", map[string]any{"task": "agent:echo", "timeout_s": 0}, 400, "timeout_s", ""},
		{"malformed JSON", `{"task": "agent:echo",`, 400, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := u.Do("POST", path, tc.body)
			if r.Status != tc.wantStatus {
				t.Fatalf("want %d, got %d: %s", tc.wantStatus, r.Status, r.Body)
			}
			fields := problemFields(t, r)
			if tc.wantField != "" && !slices.ContainsFunc(fields, func(f string) bool { return strings.Contains(f, tc.wantField) }) {
				t.Fatalf("want the problem to name %s, got %v: %s", tc.wantField, fields, r.Body)
			}
			if tc.wantReason != "" && !strings.Contains(problemText(t, r), tc.wantReason) {
				t.Fatalf("want the reason to say %q: %s", tc.wantReason, r.Body)
			}
		})
	}
	t.Run("disabled agent", func(t *testing.T) {
		u.Must(200, "POST", "/v1/agents/"+agent+"/disable", nil)
		r := u.Do("POST", path, echo("x"))
		if r.Status != 409 {
			t.Fatalf("want 409, got %d: %s", r.Status, r.Body)
		}
		problemFields(t, r)
		if st := agentStatus(t, u.Client, agent); st != "disabled" {
			t.Fatalf("want disabled, got %s", st)
		}
		u.Must(200, "POST", "/v1/agents/"+agent+"/enable", nil)
		cmdDispatch(t, u.Client, agent, echo("x"))
	})
	t.Run("allowed_tasks", func(t *testing.T) {
		limited := cmdAgent(t, u.Client, map[string]any{"allowed_tasks": []string{"agent:sleep"}})
		r := u.Do("POST", "/v1/agents/"+limited+"/commands", echo("x"))
		if r.Status != 400 || !strings.Contains(problemText(t, r), "does not allow") {
			t.Fatalf("want 400 naming the refusal, got %d: %s", r.Status, r.Body)
		}
	})
	t.Run("another user's agent", func(t *testing.T) {
		v := s.Client(api).NewUser("stranger")
		if r := v.Do("POST", path, echo("x")); r.Status != 404 {
			t.Fatalf("want 404, got %d: %s", r.Status, r.Body)
		}
	})
	// Nothing refused was stored.
	list := u.Must(200, "GET", "/v1/commands?agent_id="+agent, nil).JSON(t)
	if n := len(list["items"].([]any)); n != 1 {
		t.Fatalf("want only the one accepted command stored, got %d", n)
	}
}

// A failing echo is retried with growing waits, then fails with its error.
func TestCommandRetriesThenFails(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("retry")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, map[string]any{"task": "agent:echo", "payload": map[string]any{"fail": "it broke"}, "max_retries": 2})
	done := cmdWaitStatus(t, u.Client, c.ID, "failed", 30*time.Second)
	if done.Attempt != 3 || done.Failures != 3 || done.errorText() != "it broke" {
		t.Fatalf("want 3 attempts, 3 failures and the last error; got attempt %d, failures %d, error %q", done.Attempt, done.Failures, done.errorText())
	}
	evs := cmdEvents(t, u.Client, c.ID)
	var page struct {
		Items []struct {
			Type      string    `json:"type"`
			CreatedAt time.Time `json:"created_at"`
		} `json:"items"`
	}
	if err := json.Unmarshal(u.Must(200, "GET", "/v1/commands/"+c.ID+"/events", nil).Body, &page); err != nil {
		t.Fatal(err)
	}
	var runs []time.Time
	for _, e := range page.Items {
		if e.Type == "running" {
			runs = append(runs, e.CreatedAt)
		}
	}
	if want := []string{"queued", "running", "retrying", "running", "retrying", "running", "failed"}; !slices.Equal(eventTypes(evs), want) {
		t.Fatalf("events: want %v, got %v", want, eventTypes(evs))
	}
	// Backoff: about 1s, then about 2s (±20%).
	if len(runs) != 3 {
		t.Fatalf("want 3 runs, got %d", len(runs))
	}
	if gap := runs[1].Sub(runs[0]); gap < 700*time.Millisecond {
		t.Errorf("first retry after %s; want about 1s", gap)
	}
	if gap := runs[2].Sub(runs[1]); gap < 1500*time.Millisecond {
		t.Errorf("second retry after %s; want about 2s", gap)
	}
}

// A payload the worker cannot use fails at once: bad payloads are never
// retried.
func TestCommandBadPayloadNotRetried(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("badp")
	agent := cmdAgent(t, u.Client, nil)
	// The API refuses bad payloads, so make one the worker meets: a payload
	// changed in the database after it was accepted.
	c := cmdDispatch(t, u.Client, agent, map[string]any{"task": "agent:echo", "payload": map[string]any{"message": "x"}, "max_retries": 3})
	cmdWaitStatus(t, u.Client, c.ID, "succeeded", 10*time.Second)
	db := stackDB(t, s)
	if _, err := db.Exec(`UPDATE commands SET status = 'failed', payload = '{"message": 5}' WHERE id = $1`, c.ID); err != nil {
		t.Fatal(err)
	}
	u.Must(200, "POST", "/v1/commands/"+c.ID+"/retry", nil)
	done := cmdWaitStatus(t, u.Client, c.ID, "failed", 10*time.Second)
	if done.Failures != 1 || done.Attempt != 2 || !strings.Contains(done.errorText(), "bad payload") {
		t.Fatalf("want one failed attempt with a bad payload error, got attempt %d, failures %d, error %q", done.Attempt, done.Failures, done.errorText())
	}
}

func TestCommandTimeout(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("timeout")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, sleep(5000, "timeout_s", 1))
	retrying := cmdWait(t, u.Client, c.ID, 5*time.Second, "a retry after the timeout", func(c *command) bool {
		return c.Failures >= 1
	})
	if !strings.Contains(retrying.errorText(), "timed out after 1s") {
		t.Fatalf("want the timeout as error, got %q", retrying.errorText())
	}
	// agent:sleep retries once by default: the second timeout fails it.
	done := cmdWaitStatus(t, u.Client, c.ID, "failed", 15*time.Second)
	if done.Attempt != 2 || done.Failures != 2 {
		t.Fatalf("want failed after 2 attempts, got attempt %d, failures %d", done.Attempt, done.Failures)
	}
	if ran := done.FinishedAt.Sub(*done.StartedAt); ran > 6*time.Second {
		t.Fatalf("two 1s attempts and a ~1s backoff took %s", ran)
	}
}

func TestCommandCancelRunning(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("cancel")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, sleep(30000, "max_retries", 3))
	cmdWaitStatus(t, u.Client, c.ID, "running", 10*time.Second)
	asked := time.Now()
	r := decodeCommand(t, u.Must(200, "POST", "/v1/commands/"+c.ID+"/cancel", nil))
	if r.CancelRequestedAt == nil {
		t.Fatalf("want the cancellation recorded, got %+v", r)
	}
	done := cmdWaitStatus(t, u.Client, c.ID, "canceled", 5*time.Second)
	if took := time.Since(asked); took > 3*time.Second {
		t.Errorf("canceled after %s; want within a few seconds", took)
	}
	// Past a retry's backoff (about 1s), it is still canceled at attempt 1.
	time.Sleep(2500 * time.Millisecond)
	after := cmdGet(t, u.Client, c.ID)
	if after.Status != "canceled" || after.Attempt != 1 || done.Attempt != 1 {
		t.Fatalf("a canceled command was retried: %s at attempt %d", after.Status, after.Attempt)
	}
	if r := u.Do("POST", "/v1/commands/"+c.ID+"/cancel", nil); r.Status != 409 {
		t.Fatalf("cancelling again: want 409, got %d", r.Status)
	}
	if r := u.Do("POST", "/v1/commands/"+c.ID+"/retry", nil); r.Status != 409 {
		t.Fatalf("retrying a canceled command: want 409, got %d", r.Status)
	}
	types := eventTypes(cmdEvents(t, u.Client, c.ID))
	if !slices.Contains(types, "cancel_requested") || types[len(types)-1] != "canceled" {
		t.Fatalf("events: want cancel_requested then canceled, got %v", types)
	}
	waitAgentStatus(t, u.Client, agent, "idle", 5*time.Second)
}

func TestCommandCancelQueued(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("cancelq")
	agent := cmdAgent(t, u.Client, nil)
	blocker := cmdDispatch(t, u.Client, agent, sleep(1500))
	waiting := cmdDispatch(t, u.Client, agent, echo("never"))
	next := cmdDispatch(t, u.Client, agent, echo("next"))
	got := decodeCommand(t, u.Must(200, "POST", "/v1/commands/"+waiting.ID+"/cancel", nil))
	if got.Status != "canceled" {
		t.Fatalf("a queued command: want canceled at once, got %s", got.Status)
	}
	cmdWaitStatus(t, u.Client, blocker.ID, "succeeded", 10*time.Second)
	cmdWaitStatus(t, u.Client, next.ID, "succeeded", 10*time.Second)
	if after := cmdGet(t, u.Client, waiting.ID); after.Status != "canceled" || after.StartedAt != nil {
		t.Fatalf("the canceled command ran: %+v", after)
	}
}

func TestCommandRetryFailed(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("retryf")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, map[string]any{"task": "agent:echo", "payload": map[string]any{"fail": "nope"}, "max_retries": 0})
	first := cmdWaitStatus(t, u.Client, c.ID, "failed", 10*time.Second)
	r := decodeCommand(t, u.Must(200, "POST", "/v1/commands/"+c.ID+"/retry", nil))
	if r.Status != "queued" || r.Failures != 0 || r.Error != nil || r.StartedAt != nil || r.FinishedAt != nil {
		t.Fatalf("retry: want queued with failures, error and timings cleared, got %+v", r)
	}
	done := cmdWaitStatus(t, u.Client, c.ID, "failed", 10*time.Second)
	if done.Attempt != 2 || done.Failures != 1 {
		t.Fatalf("want it run again as attempt 2, got attempt %d, failures %d", done.Attempt, done.Failures)
	}
	if done.StartedAt == nil || done.FinishedAt == nil || done.StartedAt.Before(*first.FinishedAt) || done.FinishedAt.Before(*done.StartedAt) {
		t.Fatalf("timings of the run after the retry: started %v, finished %v", done.StartedAt, done.FinishedAt)
	}
	ok := cmdDispatch(t, u.Client, agent, echo("x"))
	cmdWaitStatus(t, u.Client, ok.ID, "succeeded", 10*time.Second)
	if r := u.Do("POST", "/v1/commands/"+ok.ID+"/retry", nil); r.Status != 409 {
		t.Fatalf("retrying a succeeded command: want 409, got %d", r.Status)
	}
}

// An agent runs max_concurrency commands at once, in order.
func TestCommandPerAgentOrdering(t *testing.T) {
	t.Parallel()
	s := NewStack(t, map[string]string{"AGENTRY_WORKER_CONCURRENCY": "10"})
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("order")

	run := func(t *testing.T, concurrency int) []*command {
		agent := cmdAgent(t, u.Client, map[string]any{"max_concurrency": concurrency})
		var ids []string
		for range 6 {
			ids = append(ids, cmdDispatch(t, u.Client, agent, sleep(300)).ID)
		}
		var out []*command
		for _, id := range ids {
			out = append(out, cmdWaitStatus(t, u.Client, id, "succeeded", 30*time.Second))
		}
		return out
	}
	t.Run("one at a time, in order", func(t *testing.T) {
		cmds := run(t, 1)
		for i := 1; i < len(cmds); i++ {
			prev, cur := cmds[i-1], cmds[i]
			if cur.StartedAt.Before(*prev.FinishedAt) {
				t.Fatalf("command %d started at %s before command %d finished at %s", i, cur.StartedAt.Format(time.StampMicro), i-1, prev.FinishedAt.Format(time.StampMicro))
			}
		}
	})
	t.Run("three at a time", func(t *testing.T) {
		cmds := run(t, 3)
		maxOverlap := 0
		for _, c := range cmds {
			n := 0
			for _, o := range cmds {
				if !o.StartedAt.After(*c.StartedAt) && o.FinishedAt.After(*c.StartedAt) {
					n++
				}
			}
			maxOverlap = max(maxOverlap, n)
		}
		if maxOverlap != 3 {
			t.Fatalf("want up to 3 running at once, saw %d", maxOverlap)
		}
		firstDone := slices.MinFunc(cmds[:3], func(a, b *command) int { return a.FinishedAt.Compare(*b.FinishedAt) }).FinishedAt
		for i, c := range cmds[3:] {
			if c.StartedAt.Before(*firstDone) {
				t.Fatalf("command %d started at %s, before any of the first three finished (%s)", i+3, c.StartedAt, firstDone)
			}
		}
	})
}

// stackDB opens the stack's database.
func stackDB(t *testing.T, s *Stack) *sqlx.DB {
	t.Helper()
	db, err := sqlx.Open("postgres", s.DSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// scrapeSite serves a page with a title and links on 127.0.0.1.
func scrapeSite(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `<html><head><title>Scrape me</title></head><body><a href="/a">a</a><a href="/b#x">b</a><a href="/a">again</a></body></html>`)
	}))
	t.Cleanup(srv.Close)
	if host, _, _ := net.SplitHostPort(srv.Listener.Addr().String()); host != "127.0.0.1" {
		t.Skipf("test server on %s, not 127.0.0.1", host)
	}
	return srv
}

func TestCommandWebScrapeAllowlisted(t *testing.T) {
	t.Parallel()
	srv := scrapeSite(t)
	s := NewStack(t, map[string]string{"AGENTRY_EGRESS_ALLOW_CIDRS": "127.0.0.1/32"})
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("scrape")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, map[string]any{"task": "web:scrape", "payload": map[string]any{"url": srv.URL + "/"}})
	done := cmdWaitStatus(t, u.Client, c.ID, "succeeded", 15*time.Second)
	var res struct {
		Status int
		Title  string
		Links  []string
	}
	if err := json.Unmarshal(done.Result, &res); err != nil {
		t.Fatal(err)
	}
	if want := []string{srv.URL + "/a", srv.URL + "/b"}; res.Status != 200 || res.Title != "Scrape me" || !slices.Equal(res.Links, want) {
		t.Fatalf("want 200, title and links %v; got %s", want, done.Result)
	}
}

func TestCommandWebScrapeRefused(t *testing.T) {
	t.Parallel()
	srv := scrapeSite(t)
	s := NewStack(t, nil)
	api := s.API()
	s.Start("worker")
	u := s.Client(api).NewUser("ssrf")
	agent := cmdAgent(t, u.Client, nil)
	c := cmdDispatch(t, u.Client, agent, map[string]any{"task": "web:scrape", "payload": map[string]any{"url": srv.URL + "/"}})
	done := cmdWaitStatus(t, u.Client, c.ID, "failed", 15*time.Second)
	if !strings.Contains(done.errorText(), "egress refused") {
		t.Fatalf("want egress refused, got %q", done.errorText())
	}
	if done.Attempt != 1 || done.Failures != 1 {
		t.Fatalf("a refusal is not worth retrying: want 1 attempt, got attempt %d, failures %d", done.Attempt, done.Failures)
	}
}

// SIGTERM drains a worker: a command that ends within the shutdown timeout
// finishes there, one that would not is handed back untried and finished by
// another worker. Leases are short, and the reconciler runs, so a draining
// worker that stopped renewing its leases would lose its commands.
func TestDrainOnSIGTERM(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("drains for the 10s shutdown timeout")
	}
	s := NewStack(t, map[string]string{
		"AGENTRY_SHUTDOWN_TIMEOUT":   "10s",
		"AGENTRY_WORKER_HEARTBEAT":   "500ms",
		"AGENTRY_RECONCILE_INTERVAL": "500ms",
	})
	api := s.API()
	s.Start("scheduler")
	first := s.Start("worker")
	u := s.Client(api).NewUser("drain")
	short := cmdDispatch(t, u.Client, cmdAgent(t, u.Client, nil), sleep(2000))
	// Longer than the shutdown timeout (twice it).
	long := cmdDispatch(t, u.Client, cmdAgent(t, u.Client, nil), sleep(20000, "max_retries", 0))
	cmdWaitStatus(t, u.Client, short.ID, "running", 10*time.Second)
	cmdWaitStatus(t, u.Client, long.ID, "running", 10*time.Second)

	stopped := time.Now()
	if err := first.Stop(); err != nil {
		t.Fatalf("the worker exited with %v\n%s", err, first.Logs())
	}
	took := time.Since(stopped)
	if took < 9*time.Second || took > 15*time.Second {
		t.Errorf("the drain took %s; want about the 10s shutdown timeout", took)
	}
	if got := cmdGet(t, u.Client, short.ID); got.Status != "succeeded" || got.Attempt != 1 || got.Failures != 0 {
		t.Fatalf("the short command: want succeeded at attempt 1 during the drain, got %s at attempt %d, %d failures (%q)", got.Status, got.Attempt, got.Failures, got.errorText())
	}
	handed := cmdGet(t, u.Client, long.ID)
	if handed.Status != "queued" || handed.Attempt != 1 || handed.Failures != 0 {
		t.Fatalf("the long command: want handed back (queued, attempt 1, no failure), got %s at attempt %d, %d failures", handed.Status, handed.Attempt, handed.Failures)
	}

	s.Start("worker")
	cmdWait(t, u.Client, long.ID, 10*time.Second, "running on the second worker", func(c *command) bool { return c.Attempt == 2 })
	done := cmdWaitStatus(t, u.Client, long.ID, "succeeded", 30*time.Second)
	if done.Attempt != 2 || done.Failures != 0 {
		t.Fatalf("want succeeded at attempt 2 without a failure, got attempt %d, %d failures", done.Attempt, done.Failures)
	}
	types := eventTypes(cmdEvents(t, u.Client, long.ID))
	if !slices.Contains(types, "requeued") || types[len(types)-1] != "succeeded" {
		t.Fatalf("events: want requeued … succeeded, got %v", types)
	}
}

// percentile returns the p-th percentile (0..1) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s)-1)*p + 0.5)
	return s[i]
}

// One organization's backlog does not delay another's commands: while org
// A has thousands waiting, org B's start within a second.
func TestFairnessAcrossOrganizations(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("dispatches 5,000 commands")
	}
	s := NewStack(t, map[string]string{"AGENTRY_WORKER_CONCURRENCY": "20", "AGENTRY_DB_MAX_OPEN_CONNS": "20"})
	api := s.API()
	s.Start("worker")
	c := s.Client(api)
	a, b := c.NewUser("orga"), c.NewUser("orgb")
	var agentsA []string
	for range 5 {
		agentsA = append(agentsA, cmdAgent(t, a.Client, map[string]any{"max_concurrency": 20}))
	}
	agentB := cmdAgent(t, b.Client, map[string]any{"max_concurrency": 20})

	// Org A's commands run 100 ms each: 20 worker slots run at most 200 a
	// second of them, less than it dispatches even on a slow machine, so a
	// backlog builds up.
	const backlog = 5000
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for i := range jobs {
				r := a.Do("POST", "/v1/agents/"+agentsA[i%len(agentsA)]+"/commands", sleep(100))
				if r.Status != 202 {
					t.Errorf("org A dispatch: %d %s", r.Status, r.Body)
					return
				}
			}
		})
	}
	start := time.Now()
	for i := range backlog {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	t.Logf("org A: %d commands dispatched in %s", backlog, time.Since(start))

	db := stackDB(t, s)
	waitingA := func() int {
		var n int
		if err := db.Get(&n, `SELECT count(*) FROM commands c JOIN agents g ON g.id = c.agent_id WHERE g.org_id = $1 AND c.status = 'queued'`, a.Org); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := waitingA(); n < 1000 {
		t.Fatalf("org A's backlog: want thousands waiting, got %d (the test needs a backlog)", n)
	}
	var ids []string
	for range 20 {
		ids = append(ids, cmdDispatch(t, b.Client, agentB, sleep(20)).ID)
		time.Sleep(50 * time.Millisecond)
	}
	var waits []time.Duration
	for _, id := range ids {
		got := cmdWaitStatus(t, b.Client, id, "succeeded", 30*time.Second)
		waits = append(waits, got.StartedAt.Sub(got.CreatedAt))
	}
	left := waitingA()
	p50, p99 := percentile(waits, 0.5), percentile(waits, 0.99)
	t.Logf("org B: dispatch to start p50 %s, p99 %s, max %s; org A still had %d queued", p50, p99, slices.Max(waits), left)
	if left == 0 {
		t.Errorf("org A's backlog drained before org B's commands ran: the test measured nothing")
	}
	if p99 >= time.Second {
		t.Fatalf("org B waited behind org A: p99 %s (waits %v)", p99, waits)
	}
}
