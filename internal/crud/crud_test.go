package crud_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/crud/crudtest"
	"github.com/agentry/agentry/internal/httpapi"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/testenv"
)

// Widget is the model the framework is exercised with.
type Widget struct {
	crud.Base
	Name   string  `db:"name" json:"name"`
	Color  string  `db:"color" json:"color"`
	Size   int64   `db:"size" json:"size"`
	Note   *string `db:"note" json:"note,omitempty"`
	Secret string  `db:"secret" json:"secret,omitempty"`
	Status string  `db:"status" json:"status" doc:"Server-owned."`
}

type WidgetInput struct {
	Name   string  `json:"name" minLength:"1" maxLength:"50"`
	Color  string  `json:"color" enum:"red,green,blue"`
	Size   int64   `json:"size,omitempty" minimum:"0" maximum:"1000"`
	Note   *string `json:"note,omitempty" maxLength:"200"`
	Secret string  `json:"secret,omitempty"`
}

const widgetTable = `CREATE TABLE widgets (
	id uuid PRIMARY KEY, org_id uuid NOT NULL, owner_id uuid NOT NULL,
	name text NOT NULL, color text NOT NULL, size bigint NOT NULL DEFAULT 0, note text,
	secret text NOT NULL DEFAULT '', status text NOT NULL DEFAULT 'new',
	created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
	version bigint NOT NULL DEFAULT 1)`

type env struct {
	t    *testing.T
	srv  *httptest.Server
	db   *sqlx.DB
	org  string
	user string
}

func widgetResource(ops crud.Op) crud.Resource[Widget, WidgetInput] {
	return crud.Resource[Widget, WidgetInput]{
		Scope:   platform.Scope{Type: "Widget"},
		Path:    "/v1/widgets",
		Table:   "widgets",
		Ops:     ops,
		Sort:    []string{"name", "size"},
		Filters: []crud.Filter{{Param: "color", Column: "color"}, {Param: "owner_id", Column: "owner_id"}, {Param: "min_size", Column: "size", Op: ">="}},
		Validate: func(_ context.Context, in *WidgetInput) []platform.FieldError {
			if in.Name == "forbidden" {
				return []platform.FieldError{{Field: "name", Message: "this name is reserved"}}
			}
			return nil
		},
		View: func(_ context.Context, w *Widget) {
			if w.Secret != "" {
				w.Secret = "***"
			}
		},
	}
}

func newEnv(t *testing.T, ops crud.Op) *env {
	t.Helper()
	db := testenv.Postgres(t)
	if _, err := db.Exec(widgetTable); err != nil {
		t.Fatal(err)
	}
	s := httpapi.New(httpapi.Options{Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)), Version: "test", MaxBodyBytes: 1 << 20})
	reg := &crud.Registry{API: s.API, DB: db, Guard: crudtest.Guard{}, MaxBodyBytes: 1 << 20}
	crud.Register(reg, widgetResource(ops))
	srv := httptest.NewServer(crudtest.Middleware(s))
	t.Cleanup(srv.Close)
	return &env{t: t, srv: srv, db: db, org: uuid.NewString(), user: uuid.NewString()}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("body is not JSON: %v: %s", err, r.body)
	}
	return m
}

// do sends a request as the env's user; extra headers go in pairs.
func (e *env) do(method, path string, body any, headers ...string) response {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		data, _ := json.Marshal(b)
		rd = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, e.srv.URL+path, rd)
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set(crudtest.UserHeader, e.user)
	req.Header.Set(crudtest.OrgHeader, e.org)
	for i := 0; i+1 < len(headers); i += 2 {
		if headers[i+1] == "" {
			req.Header.Del(headers[i])
		} else {
			req.Header.Set(headers[i], headers[i+1])
		}
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	return response{status: res.StatusCode, header: res.Header, body: data}
}

func (e *env) create(name, color string) map[string]any {
	e.t.Helper()
	r := e.do("POST", "/v1/widgets", map[string]any{"name": name, "color": color})
	if r.status != 201 {
		e.t.Fatalf("create: status %d: %s", r.status, r.body)
	}
	return r.json(e.t)
}

func wantStatus(t *testing.T, r response, want int) {
	t.Helper()
	if r.status != want {
		t.Fatalf("status: want %d, got %d: %s", want, r.status, r.body)
	}
}

// wantProblem checks r is a problem+json of status want naming every field.
func wantProblem(t *testing.T, r response, want int, fields ...string) map[string]any {
	t.Helper()
	wantStatus(t, r, want)
	if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("Content-Type: want application/problem+json, got %q", ct)
	}
	p := r.json(t)
	if p["request_id"] == "" || p["request_id"] == nil {
		t.Fatalf("problem has no request_id: %s", r.body)
	}
	if int(p["status"].(float64)) != want {
		t.Fatalf("problem status: want %d, got %v", want, p["status"])
	}
	got := map[string]bool{}
	if errs, ok := p["errors"].([]any); ok {
		for _, e := range errs {
			got[e.(map[string]any)["field"].(string)] = true
		}
	}
	for _, f := range fields {
		if !got[f] {
			t.Fatalf("problem does not name field %q: %s", f, r.body)
		}
	}
	return p
}

func TestCreate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	r := e.do("POST", "/v1/widgets", map[string]any{"name": "gear", "color": "red", "size": 3, "secret": "hunter2"})
	wantStatus(t, r, 201)
	w := r.json(t)
	if w["name"] != "gear" || w["color"] != "red" || w["size"] != 3.0 {
		t.Fatalf("created widget: %s", r.body)
	}
	if w["org_id"] != e.org || w["owner_id"] != e.user || w["status"] != "new" || w["version"] != 1.0 {
		t.Fatalf("server-owned fields: %s", r.body)
	}
	if w["secret"] != "***" {
		t.Fatalf("secret leaked through the view: %s", r.body)
	}
	if r.header.Get("ETag") != `"1"` || r.header.Get("Location") != "/v1/widgets/"+w["id"].(string) {
		t.Fatalf("headers: ETag %q Location %q", r.header.Get("ETag"), r.header.Get("Location"))
	}
}

func TestCreateRefusesBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	big := `{"name":"` + strings.Repeat("x", 1<<20) + `","color":"red"}`
	cases := []struct {
		name        string
		body        any
		contentType string
		status      int
		fields      []string
	}{
		{"malformed JSON", `{"name": "x",`, "", 400, []string{"body"}},
		{"not an object", `[1,2]`, "", 400, nil},
		{"every bad field listed", map[string]any{"name": "", "color": "purple", "size": -1}, "", 400, []string{"body.name", "body.color", "body.size"}},
		{"missing required", map[string]any{"color": "red"}, "", 400, []string{"body.name"}},
		{"unknown field", map[string]any{"name": "x", "color": "red", "shape": "round"}, "", 400, []string{"body.shape"}},
		{"mass assignment of owner_id", map[string]any{"name": "x", "color": "red", "owner_id": uuid.NewString()}, "", 400, []string{"body.owner_id"}},
		{"mass assignment of org_id", map[string]any{"name": "x", "color": "red", "org_id": uuid.NewString()}, "", 400, []string{"body.org_id"}},
		{"mass assignment of status", map[string]any{"name": "x", "color": "red", "status": "shipped"}, "", 400, []string{"body.status"}},
		{"mass assignment of id", map[string]any{"name": "x", "color": "red", "id": uuid.NewString()}, "", 400, []string{"body.id"}},
		{"custom validation", map[string]any{"name": "forbidden", "color": "red"}, "", 400, []string{"body.name"}},
		{"wrong type", map[string]any{"name": 5, "color": "red"}, "", 400, []string{"body.name"}},
		{"body too large", big, "", 413, nil},
		{"wrong content type", `name=x`, "text/plain", 415, nil},
		{"form content type", `name=x`, "application/x-www-form-urlencoded", 415, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var headers []string
			if tc.contentType != "" {
				headers = []string{"Content-Type", tc.contentType}
			}
			r := e.do("POST", "/v1/widgets", tc.body, headers...)
			wantProblem(t, r, tc.status, tc.fields...)
		})
	}
	var n int
	if err := e.db.Get(&n, "SELECT count(*) FROM widgets"); err != nil || n != 0 {
		t.Fatalf("refused creates stored %d rows (err %v)", n, err)
	}
}

func TestGet(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	w := e.create("gear", "red")
	id := w["id"].(string)

	r := e.do("GET", "/v1/widgets/"+id, nil)
	wantStatus(t, r, 200)
	if r.json(t)["name"] != "gear" || r.header.Get("ETag") != `"1"` {
		t.Fatalf("get: %s %v", r.body, r.header)
	}
	wantStatus(t, e.do("GET", "/v1/widgets/"+id, nil, "If-None-Match", `"1"`), 304)
	wantProblem(t, e.do("GET", "/v1/widgets/not-a-uuid", nil), 400, "path.id")
	wantProblem(t, e.do("GET", "/v1/widgets/"+uuid.NewString(), nil), 404)
	// Another tenant cannot tell the widget exists.
	wantProblem(t, e.do("GET", "/v1/widgets/"+id, nil, crudtest.OrgHeader, uuid.NewString()), 404)
	// No principal: 401.
	wantProblem(t, e.do("GET", "/v1/widgets/"+id, nil, crudtest.UserHeader, ""), 401)
}

func TestUpdateMergePatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	id := e.create("gear", "red")["id"].(string)

	r := e.do("PATCH", "/v1/widgets/"+id, `{"size": 7, "note": "fragile"}`, "Content-Type", "application/merge-patch+json")
	wantStatus(t, r, 200)
	w := r.json(t)
	if w["size"] != 7.0 || w["note"] != "fragile" || w["name"] != "gear" || w["version"] != 2.0 {
		t.Fatalf("patched: %s", r.body)
	}
	if r.header.Get("ETag") != `"2"` {
		t.Fatalf("ETag after patch: %q", r.header.Get("ETag"))
	}
	// null removes an optional field.
	r = e.do("PATCH", "/v1/widgets/"+id, `{"note": null}`, "Content-Type", "application/merge-patch+json")
	wantStatus(t, r, 200)
	if _, has := r.json(t)["note"]; has {
		t.Fatalf("note not removed: %s", r.body)
	}
	// A patch that changes nothing makes no new version: other clients'
	// ETags stay good.
	for _, body := range []string{`{}`, `{"size": 7}`, `{"note": null}`} {
		r = e.do("PATCH", "/v1/widgets/"+id, body, "Content-Type", "application/merge-patch+json")
		wantStatus(t, r, 200)
		if r.header.Get("ETag") != `"3"` || r.json(t)["version"] != 3.0 {
			t.Fatalf("no-op patch %s: ETag %q, %s", body, r.header.Get("ETag"), r.body)
		}
	}
	// Optimistic concurrency.
	wantProblem(t, e.do("PATCH", "/v1/widgets/"+id, `{"size": 9}`, "If-Match", `"1"`), 412)
	wantStatus(t, e.do("PATCH", "/v1/widgets/"+id, `{"size": 9}`, "If-Match", `"3"`), 200)
	// Bad patches change nothing.
	bad := []struct {
		name, body, ct string
		status         int
		fields         []string
	}{
		{"null on required field", `{"name": null}`, "", 400, []string{"body.name"}},
		{"invalid value", `{"color": "mauve", "size": 5000}`, "", 400, []string{"body.color", "body.size"}},
		{"server-owned field", `{"status": "done"}`, "", 400, []string{"body.status"}},
		{"owner_id", `{"owner_id": "` + uuid.NewString() + `"}`, "", 400, []string{"body.owner_id"}},
		{"malformed", `{"size":`, "", 400, []string{"body"}},
		{"not an object", `"x"`, "", 400, []string{"body"}},
		{"wrong content type", `{"size": 1}`, "text/plain", 415, nil},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			ct := tc.ct
			if ct == "" {
				ct = "application/merge-patch+json"
			}
			wantProblem(t, e.do("PATCH", "/v1/widgets/"+id, tc.body, "Content-Type", ct), tc.status, tc.fields...)
		})
	}
	r = e.do("GET", "/v1/widgets/"+id, nil)
	if w := r.json(t); w["size"] != 9.0 || w["version"] != 4.0 || w["status"] != "new" || w["owner_id"] != e.user {
		t.Fatalf("refused patches changed the widget: %s", r.body)
	}
	wantProblem(t, e.do("PATCH", "/v1/widgets/"+uuid.NewString(), `{"size": 1}`), 404)
}

func TestReplace(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	id := e.create("gear", "red")["id"].(string)
	e.do("PATCH", "/v1/widgets/"+id, `{"note": "keep?"}`)
	r := e.do("PUT", "/v1/widgets/"+id, map[string]any{"name": "cog", "color": "blue"})
	wantStatus(t, r, 200)
	w := r.json(t)
	if w["name"] != "cog" || w["color"] != "blue" || w["note"] != nil || w["version"] != 3.0 {
		t.Fatalf("replaced: %s", r.body)
	}
	wantProblem(t, e.do("PUT", "/v1/widgets/"+id, map[string]any{"name": "cog"}), 400, "body.color")
	wantProblem(t, e.do("PUT", "/v1/widgets/"+id, map[string]any{"name": "x", "color": "red"}, "If-Match", `"2"`), 412)
}

func TestDelete(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	id := e.create("gear", "red")["id"].(string)
	wantProblem(t, e.do("DELETE", "/v1/widgets/"+id, nil, "If-Match", `"7"`), 412)
	// A reader may see but not delete another's widget: 403.
	wantProblem(t, e.do("DELETE", "/v1/widgets/"+id, nil, crudtest.UserHeader, uuid.NewString(), crudtest.ReadOnlyHeader, "1"), 403)
	wantStatus(t, e.do("DELETE", "/v1/widgets/"+id, nil), 204)
	wantProblem(t, e.do("GET", "/v1/widgets/"+id, nil), 404)
	wantProblem(t, e.do("DELETE", "/v1/widgets/"+id, nil), 404)
}

func TestSwitchedOffOperation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps&^(crud.OpDelete|crud.OpClear|crud.OpReplace))
	id := e.create("gear", "red")["id"].(string)
	wantProblem(t, e.do("DELETE", "/v1/widgets/"+id, nil), 405)
	wantProblem(t, e.do("DELETE", "/v1/widgets", nil), 405)
	wantProblem(t, e.do("PUT", "/v1/widgets/"+id, map[string]any{"name": "x", "color": "red"}), 405)
	spec := e.do("GET", "/openapi.json", nil)
	var doc struct {
		Paths map[string]map[string]any `json:"paths"`
	}
	if err := json.Unmarshal(spec.body, &doc); err != nil {
		t.Fatal(err)
	}
	if _, has := doc.Paths["/v1/widgets/{id}"]["delete"]; has {
		t.Fatal("switched-off delete is in the OpenAPI document")
	}
	if _, has := doc.Paths["/v1/widgets/{id}"]["put"]; has {
		t.Fatal("switched-off replace is in the OpenAPI document")
	}
	if _, has := doc.Paths["/v1/widgets"]["delete"]; has {
		t.Fatal("switched-off clear is in the OpenAPI document")
	}
	if _, has := doc.Paths["/v1/widgets/{id}"]["patch"]; !has {
		t.Fatal("update is missing from the OpenAPI document")
	}
}

func TestClear(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	for i := range 3 {
		e.create(fmt.Sprint("w", i), "red")
	}
	other := uuid.NewString()
	e.do("POST", "/v1/widgets", map[string]any{"name": "theirs", "color": "red"}, crudtest.OrgHeader, other)
	r := e.do("DELETE", "/v1/widgets", nil)
	wantStatus(t, r, 200)
	if r.json(t)["deleted"] != 3.0 {
		t.Fatalf("clear: %s", r.body)
	}
	var n int
	if err := e.db.Get(&n, "SELECT count(*) FROM widgets WHERE org_id = $1", other); err != nil || n != 1 {
		t.Fatalf("clear reached another organization: %d left (err %v)", n, err)
	}
}

func TestList(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	colors := []string{"red", "green", "blue"}
	for i := range 25 {
		r := e.do("POST", "/v1/widgets", map[string]any{"name": fmt.Sprintf("w%02d", i), "color": colors[i%3], "size": i})
		wantStatus(t, r, 201)
	}
	e.do("POST", "/v1/widgets", map[string]any{"name": "elsewhere", "color": "red"}, crudtest.OrgHeader, uuid.NewString())

	page := func(query string) map[string]any {
		t.Helper()
		r := e.do("GET", "/v1/widgets"+query, nil)
		wantStatus(t, r, 200)
		return r.json(t)
	}
	names := func(p map[string]any) []string {
		var out []string
		for _, it := range p["items"].([]any) {
			out = append(out, it.(map[string]any)["name"].(string))
		}
		return out
	}

	p := page("")
	if len(p["items"].([]any)) != 20 || p["total"] != 25.0 || p["page"] != 1.0 || p["page_size"] != 20.0 {
		t.Fatalf("default page: %d items, total %v", len(p["items"].([]any)), p["total"])
	}
	p = page("?page=2&page_size=10&sort=name")
	if got := strings.Join(names(p), ","); got != "w10,w11,w12,w13,w14,w15,w16,w17,w18,w19" {
		t.Fatalf("page 2 by name: %s", got)
	}
	p = page("?page=99")
	if len(p["items"].([]any)) != 0 || p["total"] != 25.0 {
		t.Fatalf("page past the end: %v", p)
	}
	if _, has := page("?skip_total=true")["total"]; has {
		t.Fatal("skip_total still counted")
	}
	p = page("?color=green&sort=-size")
	if got := strings.Join(names(p), ","); got != "w22,w19,w16,w13,w10,w07,w04,w01" || p["total"] != 8.0 {
		t.Fatalf("green by size desc: %s (total %v)", got, p["total"])
	}
	if p := page("?min_size=20"); p["total"] != 5.0 {
		t.Fatalf("min_size filter: total %v", p["total"])
	}
	if p := page("?owner_id=" + uuid.NewString()); p["total"] != 0.0 {
		t.Fatalf("owner filter: total %v", p["total"])
	}

	// Cursor paging visits every item once, in order.
	var seen []string
	query := "?page_size=7&sort=name"
	for range 10 {
		p := page(query)
		seen = append(seen, names(p)...)
		next, _ := p["next_cursor"].(string)
		if next == "" {
			break
		}
		query = "?page_size=7&sort=name&cursor=" + next
	}
	if len(seen) != 25 || seen[0] != "w00" || seen[24] != "w24" {
		t.Fatalf("cursor paging: %v", seen)
	}
	// A full last page says there is no next one.
	query = "?page_size=5&sort=name"
	for i := range 5 {
		p := page(query)
		next, _ := p["next_cursor"].(string)
		if last := i == 4; (next == "") != last || len(names(p)) != 5 {
			t.Fatalf("page %d of 5 full ones: %d items, next_cursor %q", i+1, len(names(p)), next)
		}
		query = "?page_size=5&sort=name&cursor=" + next
	}

	bad := []struct {
		name, query string
		field       string
	}{
		{"page 0", "?page=0", "query.page"},
		{"page_size 0", "?page_size=0", "query.page_size"},
		{"page_size 101", "?page_size=101", "query.page_size"},
		{"page not a number", "?page=x", "query.page"},
		{"unknown sort", "?sort=secret", "query.sort"},
		{"unknown filter", "?shape=round", "query.shape"},
		{"sql in a filter name", "?name%3B%20drop%20table%20widgets=1", "query.name; drop table widgets"},
		{"bad uuid filter", "?owner_id=nope", "query.owner_id"},
		{"bad integer filter", "?min_size=big", "query.min_size"},
		{"bad cursor", "?cursor=!!!", "query.cursor"},
		{"cursor with page", "?cursor=abc&page=2", "query.cursor"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			wantProblem(t, e.do("GET", "/v1/widgets"+tc.query, nil), 400, tc.field)
		})
	}
	// A cursor made for one sort is refused for another.
	next := page("?page_size=5&sort=name")["next_cursor"].(string)
	wantProblem(t, e.do("GET", "/v1/widgets?sort=size&cursor="+next, nil), 400, "query.cursor")
}

func TestReaderListsOnlyWhatTheGuardAllows(t *testing.T) {
	t.Parallel()
	e := newEnv(t, crud.AllOps)
	e.create("mine", "red")
	reader := uuid.NewString()
	r := e.do("GET", "/v1/widgets", nil, crudtest.UserHeader, reader, crudtest.ReadOnlyHeader, "1")
	wantStatus(t, r, 200)
	if r.json(t)["total"] != 1.0 {
		t.Fatalf("reader list: %s", r.body)
	}
	// A reader's clear deletes only what it may delete: nothing of others'.
	r = e.do("DELETE", "/v1/widgets", nil, crudtest.UserHeader, reader, crudtest.ReadOnlyHeader, "1")
	if r.status == 200 && r.json(t)["deleted"] != 0.0 {
		t.Fatalf("reader cleared others' widgets: %s", r.body)
	}
}

// testWriter sends the server's log lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
