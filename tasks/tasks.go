// Package tasks is agentry's public task registry: the commands agents can
// run. Each task lives in one file of this package: a Type constant named
// domain:verb, a payload struct, a NewXCommand constructor for clients and a
// HandleX function for the worker, registered in the file's init. A
// forking team adds a task by adding a file.
//
// A handler gets a context that is cancelled when the command is cancelled,
// times out or the worker shuts down; the decoded payload; and a Run with the
// agent's resolved config, its environment's variables and secrets, and a
// progress reporter. Returning an error wrapping ErrBadPayload (or
// asynq.SkipRetry) fails the command without retrying it.
package tasks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
)

// ErrBadPayload marks a payload that can never succeed: the command fails at
// once, without retries (it matches asynq.SkipRetry too).
var ErrBadPayload error = badPayload{}

type badPayload struct{}

func (badPayload) Error() string { return "bad payload" }

func (badPayload) Is(target error) bool { return target == asynq.SkipRetry }

// Reporter tells the user how a command is doing. Updates are throttled:
// a chatty handler cannot flood the database or the event stream.
type Reporter interface {
	// Report sets the progress (0–100) and a short message.
	Report(percent int, message string)
	// Log appends a line to the command's log.
	Log(line string)
}

// Run is what a handler knows of the command it runs.
type Run struct {
	CommandID string
	AgentID   string
	OrgID     string
	Attempt   int
	// Config is the agent's resolved config.
	Config map[string]any
	// Variables and Secrets are the agent's environment (empty without one).
	Variables map[string]string
	Secrets   map[string]string
	Progress  Reporter
	// Egress is the HTTP policy of the worker: tasks that fetch URLs must
	// use its client, which refuses private addresses unless allowlisted.
	Egress Egress
}

// Egress is how tasks reach the network.
type Egress interface {
	// Client returns an HTTP client enforcing the worker's egress policy
	// (SSRF guard, redirect re-checks, time limit).
	Client() HTTPDoer
	// MaxBytes is the most a task may read of one response.
	MaxBytes() int64
}

// Definition is a registered task.
type Definition struct {
	Type        string
	Description string
	// PayloadType is the payload struct, for documentation.
	PayloadType reflect.Type
	// maxRetries and timeout are the task's own defaults (zero: the
	// platform's, see SetDefaults).
	maxRetries int
	timeout    time.Duration
	// Backoff is the wait before retry n (1-based).
	Backoff func(n int) time.Duration

	decode func(raw json.RawMessage) (any, error)
	run    func(ctx context.Context, run *Run, payload any) (any, error)
}

// MaxRetries is the default number of retries after a failed attempt: the
// task's own, or the platform's.
func (d *Definition) MaxRetries() int {
	switch {
	case d.maxRetries == NoRetries:
		return 0
	case d.maxRetries > 0:
		return d.maxRetries
	}
	return int(defaultRetries.Load())
}

// Timeout is the default time limit of one attempt: the task's own, or the
// platform's.
func (d *Definition) Timeout() time.Duration {
	if d.timeout > 0 {
		return d.timeout
	}
	return time.Duration(defaultTimeout.Load())
}

// Decode checks a payload: unknown fields, wrong types and the payload's own
// Validate method fail with ErrBadPayload.
func (d *Definition) Decode(raw json.RawMessage) (any, error) { return d.decode(raw) }

// Execute decodes the payload and runs the handler.
func (d *Definition) Execute(ctx context.Context, run *Run, raw json.RawMessage) (any, error) {
	p, err := d.decode(raw)
	if err != nil {
		return nil, err
	}
	return d.run(ctx, run, p)
}

// Task describes a task with payload type P.
type Task[P any] struct {
	Type        string
	Description string
	// MaxRetries is how many times a failed attempt is retried by default
	// (a dispatch may say otherwise); 0 takes the platform's default
	// (setting command_max_retries), NoRetries means none.
	MaxRetries int
	// Timeout limits one attempt by default; 0 takes the platform's
	// default (setting command_timeout).
	Timeout time.Duration
	Backoff func(n int) time.Duration
	Handle  func(ctx context.Context, run *Run, payload P) (any, error)
}

// NoRetries is Task.MaxRetries for a task whose failed attempts are not
// retried unless the dispatch asks.
const NoRetries = -1

var (
	mu       sync.RWMutex
	registry = map[string]*Definition{}

	// The platform's defaults (SetDefaults).
	defaultTimeout, defaultRetries atomic.Int64
)

func init() {
	defaultTimeout.Store(int64(5 * time.Minute))
	defaultRetries.Store(3)
}

// SetDefaults sets the platform's defaults for tasks that have none of
// their own (settings command_timeout and command_max_retries).
func SetDefaults(timeout time.Duration, maxRetries int) {
	if timeout > 0 {
		defaultTimeout.Store(int64(timeout))
	}
	if maxRetries >= 0 {
		defaultRetries.Store(int64(maxRetries))
	}
}

// Register adds a task; it panics on a duplicate type (a programming
// error found at start-up).
func Register[P any](t Task[P]) {
	if t.Backoff == nil {
		t.Backoff = ExponentialBackoff(time.Second, time.Minute)
	}
	required := requiredFields(reflect.TypeFor[P]())
	d := &Definition{
		Type: t.Type, Description: t.Description, PayloadType: reflect.TypeFor[P](),
		maxRetries: t.MaxRetries, timeout: t.Timeout, Backoff: t.Backoff,
		decode: func(raw json.RawMessage) (any, error) { return decode[P](raw, required) },
		run:    func(ctx context.Context, run *Run, p any) (any, error) { return t.Handle(ctx, run, p.(P)) },
	}
	mu.Lock()
	defer mu.Unlock()
	if _, dup := registry[t.Type]; dup {
		panic("tasks: " + t.Type + " registered twice")
	}
	registry[t.Type] = d
}

// Lookup returns the task registered under typ.
func Lookup(typ string) (*Definition, bool) {
	mu.RLock()
	defer mu.RUnlock()
	d, ok := registry[typ]
	return d, ok
}

// All returns every registered task, by type.
func All() []*Definition {
	mu.RLock()
	defer mu.RUnlock()
	out := make([]*Definition, 0, len(registry))
	for _, d := range registry {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Type < out[j].Type })
	return out
}

// Validator is implemented by payloads with rules beyond their types.
type Validator interface{ Validate() error }

// requiredFields lists the JSON fields of a payload type that a payload
// must have: those without omitempty (or omitzero), as in the schema GET
// /v1/tasks publishes for it.
func requiredFields(t reflect.Type) []string {
	if t.Kind() != reflect.Struct {
		return nil
	}
	var out []string
	for f := range t.Fields() {
		tag := f.Tag.Get("json")
		name, opts, _ := strings.Cut(tag, ",")
		if !f.IsExported() || f.Anonymous || name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		if flags := strings.Split(opts, ","); !slices.Contains(flags, "omitempty") && !slices.Contains(flags, "omitzero") {
			out = append(out, name)
		}
	}
	return out
}

func decode[P any](raw json.RawMessage, required []string) (P, error) {
	var p P
	if len(bytes.TrimSpace(raw)) == 0 {
		raw = json.RawMessage("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return p, fmt.Errorf("%w: %s", ErrBadPayload, cleanJSONError(err))
	}
	if dec.More() {
		return p, fmt.Errorf("%w: trailing data after the payload", ErrBadPayload)
	}
	if len(required) > 0 {
		var fields map[string]json.RawMessage
		_ = json.Unmarshal(raw, &fields) // an object: it decoded into a struct
		for _, name := range required {
			if _, ok := fields[name]; !ok {
				return p, fmt.Errorf("%w: field %q is required", ErrBadPayload, name)
			}
		}
	}
	if v, ok := any(&p).(Validator); ok {
		if err := v.Validate(); err != nil {
			return p, fmt.Errorf("%w: %v", ErrBadPayload, err)
		}
	}
	return p, nil
}

// cleanJSONError says what is wrong with a payload in JSON's terms, not Go's.
func cleanJSONError(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		if te.Field == "" {
			return "the payload must be " + jsonKind(te.Type)
		}
		return fmt.Sprintf("field %q must be %s", te.Field, jsonKind(te.Type))
	}
	var se *json.SyntaxError
	if errors.As(err, &se) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "malformed JSON: " + strings.TrimPrefix(err.Error(), "json: ")
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// jsonKind names the JSON value a Go type decodes from.
func jsonKind(t reflect.Type) string {
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	default:
		return t.String()
	}
}

// ExponentialBackoff waits base, 2×base, 4×base … up to max, with ±20%
// jitter so that retries of many commands spread out.
func ExponentialBackoff(base, max time.Duration) func(n int) time.Duration {
	return func(n int) time.Duration {
		d := base
		for i := 1; i < n && d < max; i++ {
			d *= 2
		}
		d = min(d, max)
		jitter := 0.8 + 0.4*rand.Float64()
		return time.Duration(float64(d) * jitter)
	}
}

// Command is a dispatch body for POST /v1/agents/{id}/commands.
type Command struct {
	Task    string `json:"task"`
	Payload any    `json:"payload"`
}

// HTTPDoer sends HTTP requests (an *http.Client).
type HTTPDoer interface {
	Do(req *http.Request) (*http.Response, error)
}
