package httpapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"

	"github.com/danielgtaylor/huma/v2"

	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/metrics"
)

func newServer(t *testing.T, ready ...httpapi.ReadyCheck) (*httpapi.Server, *httptest.Server) {
	t.Helper()
	s := httpapi.New(httpapi.Options{
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
		Metrics: metrics.New("api", "test"),
		Version: "test",
		Ready:   ready,
	})
	return s, httptest.NewServer(s)
}

func get(t *testing.T, url string) (*http.Response, map[string]any) {
	t.Helper()
	res, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	var m map[string]any
	_ = json.Unmarshal(data, &m)
	return res, m
}

func TestReadiness(t *testing.T) {
	t.Parallel()
	healthy := httpapi.ReadyCheck{Name: "postgres", Check: func(context.Context) error { return nil }}
	down := httpapi.ReadyCheck{Name: "redis", Check: func(context.Context) error { return errors.New("connection refused") }}

	_, srv := newServer(t, healthy)
	defer srv.Close()
	if res, _ := get(t, srv.URL+"/readyz"); res.StatusCode != 200 {
		t.Fatalf("ready: %d", res.StatusCode)
	}

	_, srv2 := newServer(t, healthy, down)
	defer srv2.Close()
	res, body := get(t, srv2.URL+"/readyz")
	if res.StatusCode != 503 || res.Header.Get("Content-Type") != "application/problem+json" || body["code"] != "unavailable" {
		t.Fatalf("not ready: %d %v", res.StatusCode, body)
	}
	if strings.Contains(body["detail"].(string), "refused") {
		t.Fatalf("readiness leaks internal errors: %v", body)
	}
	if res, _ := get(t, srv2.URL+"/healthz"); res.StatusCode != 200 {
		t.Fatalf("healthz depends on dependencies: %d", res.StatusCode)
	}
}

func TestPanicBecomesProblem(t *testing.T) {
	t.Parallel()
	s, srv := newServer(t)
	defer srv.Close()
	huma.Get(s.API, "/boom", func(ctx context.Context, _ *struct{}) (*struct{}, error) { panic("kaboom") })
	res, body := get(t, srv.URL+"/boom")
	if res.StatusCode != 500 || body["code"] != "internal" || body["request_id"] == nil {
		t.Fatalf("panic: %d %v", res.StatusCode, body)
	}
	if strings.Contains(body["detail"].(string), "kaboom") {
		t.Fatalf("panic value leaked to the client: %v", body)
	}
	// The server still serves.
	if res, _ := get(t, srv.URL+"/healthz"); res.StatusCode != 200 {
		t.Fatalf("after panic: %d", res.StatusCode)
	}
}

func TestUnknownRouteAndMethod(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	defer srv.Close()
	res, body := get(t, srv.URL+"/v1/nothing")
	if res.StatusCode != 404 || body["code"] != "not_found" {
		t.Fatalf("unknown route: %d %v", res.StatusCode, body)
	}
	req, _ := http.NewRequest("DELETE", srv.URL+"/healthz", nil)
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r2.Body.Close()
	if r2.StatusCode != 405 || r2.Header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("wrong method: %d", r2.StatusCode)
	}
}

func TestRequestID(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/nowhere", nil)
	req.Header.Set("X-Request-ID", "abc-123")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(res.Body).Decode(&body)
	if res.Header.Get("X-Request-ID") != "abc-123" || body["request_id"] != "abc-123" {
		t.Fatalf("request id not echoed: %q %v", res.Header.Get("X-Request-ID"), body)
	}
	req.Header.Set("X-Request-ID", "bad id <script>"+strings.Repeat("x", 100))
	res2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res2.Body.Close()
	if id := res2.Header.Get("X-Request-ID"); id == "" || strings.ContainsAny(id, " <") {
		t.Fatalf("unsafe request id accepted: %q", id)
	}
}

func TestDocsAreServedFromTheBinary(t *testing.T) {
	t.Parallel()
	_, srv := newServer(t)
	defer srv.Close()
	for _, path := range []string{"/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/init.js"} {
		res, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 || len(data) == 0 {
			t.Fatalf("%s: %d (%d bytes)", path, res.StatusCode, len(data))
		}
	}
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	if res, err := noRedirect.Get(srv.URL + "/docs/"); err != nil || res.StatusCode != http.StatusMovedPermanently || res.Header.Get("Location") != "/docs" {
		t.Errorf("/docs/: want a redirect to /docs, got %v %v", res, err)
	} else {
		res.Body.Close()
	}
	if res, _ := get(t, srv.URL+"/docs/../../etc/passwd"); res.StatusCode == 200 {
		t.Fatal("docs serve files outside their directory")
	}
}

// routesMatchSpec checks that every route the router serves is in the
// OpenAPI document and every documented operation is served.
func routesMatchSpec(t *testing.T, s *httpapi.Server, srv *httptest.Server) {
	t.Helper()
	served := map[string]bool{}
	for _, r := range s.Engine().Routes() {
		path := r.Path
		parts := strings.Split(path, "/")
		for i, p := range parts {
			if strings.HasPrefix(p, ":") || strings.HasPrefix(p, "*") {
				parts[i] = "{" + p[1:] + "}"
			}
		}
		served[r.Method+" "+strings.Join(parts, "/")] = true
	}
	_, doc := get(t, srv.URL+"/openapi.json")
	documented := map[string]bool{}
	for path, item := range doc["paths"].(map[string]any) {
		for method := range item.(map[string]any) {
			switch method {
			case "get", "put", "post", "patch", "delete", "head", "options":
				documented[strings.ToUpper(method)+" "+path] = true
			}
		}
	}
	var missing, phantom []string
	for r := range served {
		if !documented[r] {
			missing = append(missing, r)
		}
	}
	for r := range documented {
		if !served[r] {
			phantom = append(phantom, r)
		}
	}
	sort.Strings(missing)
	sort.Strings(phantom)
	if len(missing) > 0 {
		t.Errorf("served but not in the OpenAPI document: %v", missing)
	}
	if len(phantom) > 0 {
		t.Errorf("in the OpenAPI document but not served: %v", phantom)
	}
}

func TestPlatformRoutesMatchSpec(t *testing.T) {
	t.Parallel()
	s, srv := newServer(t)
	defer srv.Close()
	routesMatchSpec(t, s, srv)
}
