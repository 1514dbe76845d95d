package tasks

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

func TestDecode(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, task, payload string
		wantErr             string // "" for a valid payload
	}{
		{"echo", TypeEcho, `{"message":"hi"}`, ""},
		{"empty payload", TypeEcho, ``, ""},
		{"empty object", TypeSleep, `{}`, ""},
		{"unknown field", TypeEcho, `{"message":"hi","nope":1}`, `unknown field "nope"`},
		{"wrong type", TypeSleep, `{"milliseconds":"5000"}`, `field "milliseconds" must be an integer`},
		{"wrong type of a string", TypeEcho, `{"message":5}`, `field "message" must be a string`},
		{"not an object", TypeEcho, `[1,2]`, "the payload must be an object"},
		{"malformed JSON", TypeEcho, `{"message":`, "malformed JSON"},
		{"trailing data", TypeEcho, `{"message":"a"} {"message":"b"}`, "trailing data"},
		{"Validate: negative sleep", TypeSleep, `{"milliseconds":-1}`, "milliseconds: between 0 and 3600000"},
		{"Validate: too long a sleep", TypeSleep, `{"milliseconds":3600001}`, "milliseconds: between 0 and 3600000"},
		{"Validate: too many steps", TypeSleep, `{"milliseconds":10,"steps":1001}`, "steps: between 0 and 1000"},
		{"Validate: message too large", TypeEcho, `{"message":"` + strings.Repeat("x", 64<<10+1) + `"}`, "message: at most 64 KiB"},
		{"Validate: relative URL", TypeWebScrape, `{"url":"/path"}`, "url: must be an absolute http or https URL"},
		{"Validate: file URL", TypeWebScrape, `{"url":"file:///etc/passwd"}`, "url: must be an absolute http or https URL"},
		{"Validate: credentials in the URL", TypeHTTPRequest, `{"url":"http://u:p@example.com/"}`, "url: must not carry credentials"},
		{"Validate: bad method", TypeHTTPRequest, `{"url":"http://example.com/","method":"TRACE"}`, `method: "TRACE" is not one of`},
		{"Validate: max_links", TypeWebScrape, `{"url":"http://example.com/","max_links":-1}`, "max_links: between 0 and 10000"},
		{"scrape", TypeWebScrape, `{"url":"https://example.com/a?b=c"}`, ""},
		{"Validate: header name", TypeHTTPRequest, `{"url":"http://example.com/","headers":{"a\r\nb":"c"}}`, "is not a valid header name"},
		{"Validate: header value", TypeHTTPRequest, `{"url":"http://example.com/","headers":{"X-A":"b\r\nHost: evil"}}`, "may not carry"},
		{"required field missing", TypeWebScrape, `{"max_links":5}`, `field "url" is required`},
		{"required field missing, empty payload", TypeHTTPRequest, ``, `field "url" is required`},
		{"optional fields missing", TypeEcho, `{}`, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			def, ok := Lookup(tc.task)
			if !ok {
				t.Fatalf("no task %s", tc.task)
			}
			_, err := def.Decode(json.RawMessage(tc.payload))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("want an error with %q, got %v", tc.wantErr, err)
			}
			if !errors.Is(err, ErrBadPayload) || !errors.Is(err, asynq.SkipRetry) {
				t.Fatalf("a bad payload must be ErrBadPayload and skip retries: %v", err)
			}
			if strings.Contains(err.Error(), "tasks.") || strings.Contains(err.Error(), "skip retry") {
				t.Fatalf("the reason should speak JSON, not Go: %v", err)
			}
		})
	}
}

// Validate fills in a default the handler then sees.
func TestDecodeDefaults(t *testing.T) {
	t.Parallel()
	def, _ := Lookup(TypeHTTPRequest)
	p, err := def.Decode(json.RawMessage(`{"url":"http://example.com/"}`))
	if err != nil {
		t.Fatal(err)
	}
	if m := p.(HTTPRequestPayload).Method; m != http.MethodGet {
		t.Fatalf("want GET by default, got %q", m)
	}
}

func TestRegistry(t *testing.T) {
	t.Parallel()
	var names []string
	for _, d := range All() {
		names = append(names, d.Type)
	}
	for _, want := range []string{TypeEcho, TypeSleep, TypeHTTPRequest, TypeWebScrape} {
		if !slices.Contains(names, want) {
			t.Errorf("want %s registered, got %v", want, names)
		}
	}
	if !slices.IsSorted(names) {
		t.Errorf("All is not sorted: %v", names)
	}
	if _, ok := Lookup("no:such"); ok {
		t.Error("Lookup found an unknown task")
	}
	defer func() {
		if recover() == nil {
			t.Error("registering a type twice should panic")
		}
	}()
	Register(Task[EchoPayload]{Type: TypeEcho, Handle: HandleEcho})
}

func TestExponentialBackoff(t *testing.T) {
	t.Parallel()
	b := ExponentialBackoff(time.Second, 10*time.Second)
	cases := []struct {
		n      int
		center time.Duration
	}{{1, time.Second}, {2, 2 * time.Second}, {3, 4 * time.Second}, {4, 8 * time.Second}, {5, 10 * time.Second}, {50, 10 * time.Second}}
	for _, tc := range cases {
		for range 20 {
			d := b(tc.n)
			lo, hi := time.Duration(float64(tc.center)*0.8), time.Duration(float64(tc.center)*1.2)
			if d < lo || d > hi {
				t.Fatalf("backoff(%d) = %s, want within [%s, %s]", tc.n, d, lo, hi)
			}
		}
	}
}

func TestParsePage(t *testing.T) {
	t.Parallel()
	base, _ := url.Parse("https://example.com/docs/page.html?x=1")
	cases := []struct {
		name      string
		doc       string
		max       int
		wantTitle string
		wantLinks []string
	}{
		{
			name: "title and absolute links, deduplicated",
			doc: `<!doctype html><html><head><title>  Hello &amp; welcome </title></head><body>
				<a href="/about">About</a>
				<a href="guide.html#intro">Guide</a>
				<a href="guide.html#other">Guide again (same page)</a>
				<a href="https://other.example/x">Other</a>
				<a href="//cdn.example/lib.js">Protocol-relative</a>
				<a href="../up">Up</a>
				<a href="/about">About again</a>
				<a href="mailto:someone@example.com">Mail</a>
				<a href="javascript:alert(1)">JS</a>
				<a name="anchor-only">No href</a>
				<a class="x" href=" /spaced ">Spaced</a>
			</body></html>`,
			max:       100,
			wantTitle: "Hello & welcome",
			wantLinks: []string{
				"https://example.com/about", "https://example.com/docs/guide.html", "https://other.example/x",
				"https://cdn.example/lib.js", "https://example.com/up", "https://example.com/spaced",
			},
		},
		{
			name:      "at most max links",
			doc:       `<a href="/1">1</a><a href="/2">2</a><a href="/3">3</a>`,
			max:       2,
			wantLinks: []string{"https://example.com/1", "https://example.com/2"},
		},
		{
			name:      "the first title only",
			doc:       `<title>First</title><svg><title>Icon</title></svg>`,
			max:       10,
			wantTitle: "First",
			wantLinks: []string{},
		},
		{
			name:      "no title, no links",
			doc:       `<p>plain</p>`,
			max:       10,
			wantLinks: []string{},
		},
		{
			name:      "broken HTML",
			doc:       `<title>Broken<a href="/x">`,
			max:       10,
			wantTitle: `Broken<a href="/x">`,
			wantLinks: []string{},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			title, links := parsePage(tc.doc, base, tc.max)
			if title != tc.wantTitle {
				t.Errorf("title: want %q, got %q", tc.wantTitle, title)
			}
			if !slices.Equal(links, tc.wantLinks) {
				t.Errorf("links:\nwant %q\n got %q", tc.wantLinks, links)
			}
		})
	}
}

// fakeEgress lets handlers reach test servers.
type fakeEgress struct{ max int64 }

func (e fakeEgress) Client() HTTPDoer { return http.DefaultClient }
func (e fakeEgress) MaxBytes() int64  { return e.max }

// reports records a handler's progress.
type reports struct {
	mu       sync.Mutex
	percents []int
	lines    []string
}

func (r *reports) Report(p int, _ string) {
	r.mu.Lock()
	r.percents = append(r.percents, p)
	r.mu.Unlock()
}
func (r *reports) Log(line string) { r.mu.Lock(); r.lines = append(r.lines, line); r.mu.Unlock() }

func newRun() (*Run, *reports) {
	rep := &reports{}
	return &Run{CommandID: "c", AgentID: "a", Attempt: 2, Progress: rep, Egress: fakeEgress{max: 1 << 20}}, rep
}

func TestHandleScrape(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/moved" {
			http.Redirect(w, r, "/page/", http.StatusMovedPermanently)
			return
		}
		io.WriteString(w, `<title>The page</title><a href="next">next</a><a href="/next">root</a>`)
	}))
	defer srv.Close()
	run, rep := newRun()
	def, _ := Lookup(TypeWebScrape)
	out, err := def.Execute(context.Background(), run, json.RawMessage(`{"url":"`+srv.URL+`/moved"}`))
	if err != nil {
		t.Fatal(err)
	}
	res := out.(ScrapeResult)
	want := ScrapeResult{URL: srv.URL + "/page/", Status: 200, Title: "The page", Links: []string{srv.URL + "/page/next", srv.URL + "/next"}}
	if res.URL != want.URL || res.Status != want.Status || res.Title != want.Title || !slices.Equal(res.Links, want.Links) || res.Truncated {
		t.Fatalf("want %+v, got %+v", want, res)
	}
	if len(rep.percents) == 0 {
		t.Error("want progress reports")
	}
}

func TestHandleHTTPRequestTruncates(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Method", r.Method)
		io.WriteString(w, strings.Repeat("x", 100))
	}))
	defer srv.Close()
	run, _ := newRun()
	run.Egress = fakeEgress{max: 10}
	out, err := HandleHTTPRequest(context.Background(), run, HTTPRequestPayload{Method: http.MethodPost, URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	res := out.(HTTPResponse)
	if res.Status != 200 || len(res.Body) != 10 || !res.Truncated || res.Headers["X-Method"] != "POST" {
		t.Fatalf("want 10 bytes, truncated, POST; got %+v", res)
	}
}

func TestHandleEcho(t *testing.T) {
	t.Parallel()
	run, _ := newRun()
	out, err := HandleEcho(context.Background(), run, EchoPayload{Message: "hi"})
	if err != nil || out.(EchoResult) != (EchoResult{Message: "hi", Agent: "a", Attempt: 2}) {
		t.Fatalf("got %v, %v", out, err)
	}
	if _, err := HandleEcho(context.Background(), run, EchoPayload{Fail: "boom"}); err == nil || err.Error() != "boom" {
		t.Fatalf("fail: want boom, got %v", err)
	}
}

func TestHandleSleep(t *testing.T) {
	t.Parallel()
	run, rep := newRun()
	if _, err := HandleSleep(context.Background(), run, SleepPayload{Milliseconds: 40, Steps: 4}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.percents, []int{25, 50, 75, 100}) {
		t.Fatalf("want progress 25..100, got %v", rep.percents)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := HandleSleep(ctx, run, SleepPayload{Milliseconds: 60_000})
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("want context.Canceled, got %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a cancelled sleep did not stop")
	}
}

// A task without its own timeout or retries takes the platform's defaults
// (settings command_timeout and command_max_retries); NoRetries means none.
func TestPlatformDefaults(t *testing.T) {
	Register(Task[EchoPayload]{Type: "test:platform-defaults", Handle: HandleEcho})
	Register(Task[EchoPayload]{Type: "test:no-retries", MaxRetries: NoRetries, Handle: HandleEcho})
	plain, _ := Lookup("test:platform-defaults")
	none, _ := Lookup("test:no-retries")
	echo, _ := Lookup(TypeEcho)
	if plain.Timeout() != 5*time.Minute || plain.MaxRetries() != 3 {
		t.Fatalf("before SetDefaults: %v, %d retries", plain.Timeout(), plain.MaxRetries())
	}
	SetDefaults(10*time.Minute, 7)
	defer SetDefaults(5*time.Minute, 3)
	if plain.Timeout() != 10*time.Minute || plain.MaxRetries() != 7 {
		t.Fatalf("after SetDefaults: %v, %d retries", plain.Timeout(), plain.MaxRetries())
	}
	if none.MaxRetries() != 0 {
		t.Fatalf("NoRetries: %d retries", none.MaxRetries())
	}
	if echo.MaxRetries() != 3 || echo.Timeout() != 10*time.Minute {
		t.Fatalf("echo keeps its own retries and takes the default timeout: %v, %d", echo.Timeout(), echo.MaxRetries())
	}
}
