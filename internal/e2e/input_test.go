package e2e

// Input that is well-formed but unusual, through the real server: every
// spelling of an id, values the database refuses, write-backs of what a
// read showed, parameters a route ignores.

import (
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	_ "github.com/lib/pq"
)

// spellings returns other ways of writing the UUID id that the API accepts.
func spellings(id string) map[string]string {
	return map[string]string{
		"upper case":      strings.ToUpper(id),
		"braces":          "{" + id + "}",
		"urn":             "urn:uuid:" + id,
		"without hyphens": strings.ReplaceAll(id, "-", ""),
	}
}

func TestEverySpellingOfAnIDIsTheSameResource(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	dispatch := map[string]any{"task": "agent:echo", "payload": map[string]any{"message": "x"}}

	agent := secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": "spelled"})
	for name, id := range spellings(agent) {
		// Each spelling is read and dispatched to, filling the cache under it.
		if got := alice.Must(200, "GET", "/v1/agents/"+id, nil).Str(t, "id"); got != agent {
			t.Fatalf("%s: GET answers id %q, want %q", name, got, agent)
		}
		alice.Must(202, "POST", "/v1/agents/"+id+"/commands", dispatch)
	}

	secStep(t, "a write is seen through every spelling", func() {
		alice.Must(200, "PATCH", "/v1/agents/"+agent, map[string]any{"description": "changed"})
		for name, id := range spellings(agent) {
			if got := alice.Must(200, "GET", "/v1/agents/"+id, nil).Str(t, "description"); got != "changed" {
				t.Fatalf("%s: description %q after the write", name, got)
			}
		}
	})

	secStep(t, "a deny holds for every spelling", func() {
		alice.Must(201, "POST", "/v1/agents/"+agent+"/acl", map[string]any{"principal_id": alice.ID, "action": "command", "effect": "deny"})
		for name, id := range spellings(agent) {
			secExpect(t, name+": dispatch after a deny", alice.Do("POST", "/v1/agents/"+id+"/commands", dispatch), 403)
		}
		alice.Must(201, "POST", "/v1/agents/"+agent+"/acl", map[string]any{"principal_id": alice.ID, "action": "read", "effect": "deny"})
		for name, id := range spellings(agent) {
			secExpect(t, name+": read after a deny", alice.Do("GET", "/v1/agents/"+id, nil), 404)
		}
	})

	secStep(t, "a deleted resource is gone under every spelling", func() {
		other := secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": "deleted"})
		for _, id := range spellings(other) {
			alice.Must(200, "GET", "/v1/agents/"+id, nil)
		}
		alice.Must(204, "DELETE", "/v1/agents/"+other, nil)
		for name, id := range spellings(other) {
			secExpect(t, name+": read after delete", alice.Do("GET", "/v1/agents/"+id, nil), 404)
		}
	})
}

// TestBadValuesAreClientErrors sends values that pass the schema but that
// the database refuses or the route cannot use: each is a 400 problem,
// never a 500.
func TestBadValuesAreClientErrors(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	agent := secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": "target"})
	cursor := base64.RawURLEncoding.EncodeToString([]byte(`{"s":"-created_at","v":"x","i":"` + agent + `"}`))

	for _, req := range []struct {
		what, method, path string
		body               any
		headers            []string
		says               string // in the answer, when given
	}{
		{"NUL in a name", "POST", "/v1/agents", `{"name":"a\u0000b"}`, nil, ""},
		{"NUL in a payload", "POST", "/v1/agents/" + agent + "/commands", `{"task":"agent:echo","payload":{"message":"\u0000"}}`, nil, ""},
		{"NUL in a filter", "GET", "/v1/agents?name=%00", nil, nil, ""},
		{"NUL in an environment", "POST", "/v1/environments", `{"name":"e","params":{"variables":{"A":"\u0000"}}}`, nil, ""},
		{"a page past the end of numbers", "GET", "/v1/agents?page=9223372036854775807", nil, nil, ""},
		{"a page past the end of numbers, notifications", "GET", "/v1/notifications?page=9223372036854775807", nil, nil, ""},
		{"a urn id in a filter", "GET", "/v1/audit?actor_id=urn:uuid:" + alice.ID, nil, nil, ""},
		{"a urn id in a body", "POST", "/v1/acl", map[string]any{"resource_type": "Agent", "principal_id": "urn:uuid:" + alice.ID, "action": "read", "effect": "allow"}, nil, ""},
		{"a tampered cursor", "GET", "/v1/commands?sort=-created_at&cursor=" + cursor, nil, nil, ""},
		{"an idempotency key that is not UTF-8", "POST", "/v1/agents/" + agent + "/commands", map[string]any{"task": "agent:echo"}, []string{"Idempotency-Key", "caf\xe9"}, ""},
		{"a payload without a required field", "POST", "/v1/agents/" + agent + "/commands", map[string]any{"task": "web:scrape", "payload": map[string]any{"max_links": 5}}, nil, `field \"url\" is required`},
		{"a header with a line break", "POST", "/v1/agents/" + agent + "/commands", map[string]any{"task": "http:request", "payload": map[string]any{"url": "http://example.com/", "headers": map[string]any{"X-A": "b\r\nHost: evil"}}}, nil, ""},
		{"an unknown status", "GET", "/v1/commands?status=bogus", nil, nil, ""},
		{"an unknown agent status", "GET", "/v1/agents?status=", nil, nil, ""},
		{"a filter on delete all", "DELETE", "/v1/agents?name=drop", nil, nil, ""},
		{"a key with no permissions", "POST", "/v1/api-keys", `{"name":"nothing","permissions":[]}`, nil, ""},
		{"a schedule every zero seconds", "POST", "/v1/schedules", map[string]any{"name": "s", "agent_id": agent, "task": "agent:echo", "cron": "@every 0s", "timezone": "UTC"}, nil, "at least 1s"},
		{"an unknown parameter of the organizations", "GET", "/v1/organizations?zzz=1", nil, nil, "query.zzz"},
		{"an unknown parameter of the tasks", "GET", "/v1/tasks?zzz=1", nil, nil, "query.zzz"},
		{"an unknown parameter of me", "GET", "/v1/users/me?zzz=1", nil, nil, "query.zzz"},
		{"a ';' in a page size", "GET", "/v1/agents?page_size=0;a", nil, nil, "';'"},
		{"a ';' in a parameter's name", "GET", "/v1/agents?zzz;=1", nil, nil, "';'"},
		{"a ';' on delete all", "DELETE", "/v1/agents?x;=1", nil, nil, "';'"},
		{"params nested 65 deep", "POST", "/v1/agents", `{"name":"deep","params":` + strings.Repeat(`{"a":`, 64) + `1` + strings.Repeat(`}`, 64) + `}`, nil, "nested more than 64"},
		{"params nested 65 deep, without a Content-Type", "POST", "/v1/agents", `{"name":"deep","params":` + strings.Repeat(`{"a":`, 64) + `1` + strings.Repeat(`}`, 64) + `}`, []string{"Content-Type", ""}, "nested more than 64"},
		{"a payload nested 9000 deep", "POST", "/v1/agents/" + agent + "/commands", `{"task":"agent:echo","payload":` + strings.Repeat(`[`, 9000) + strings.Repeat(`]`, 9000) + `}`, nil, "nested more than 64"},
		{"a role granting an unknown type", "POST", "/v1/roles", map[string]any{"name": "typo", "permissions": []string{"Agnet.read"}}, nil, "no resource type"},
		{"a key granting an unknown type", "POST", "/v1/api-keys", map[string]any{"name": "typo", "permissions": []string{"Nope.read"}}, nil, "no resource type"},
		{"a schedule every nanosecond", "POST", "/v1/schedules", map[string]any{"name": "s", "agent_id": agent, "task": "agent:echo", "cron": "@every 1ns", "timezone": "UTC"}, nil, "at least 1s"},
	} {
		r := alice.Do(req.method, req.path, req.body, req.headers...)
		if r.Status != 400 || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/problem+json") || !strings.Contains(string(r.Body), req.says) {
			t.Errorf("%s: %s %s: want a 400 problem, got %d %s: %s", req.what, req.method, req.path, r.Status, r.Header.Get("Content-Type"), r.Body)
		}
	}
	// Credentials come first: an anonymous caller learns nothing of the query.
	if r := c.Do("GET", "/v1/agents?zzz=1", nil); r.Status != 401 {
		t.Errorf("an unknown parameter without credentials: want 401, got %d: %s", r.Status, r.Body)
	}
	// As deep as allowed is stored; a body over the limit is still 413.
	alice.Must(201, "POST", "/v1/agents", `{"name":"deep enough","params":`+strings.Repeat(`{"a":`, 63)+`1`+strings.Repeat(`}`, 63)+`}`)
	if r := alice.Do("POST", "/v1/agents", `{"name":"`+strings.Repeat("x", 2<<20)+`"}`); r.Status != 413 {
		t.Errorf("a body over the limit: want 413, got %d: %.200s", r.Status, r.Body)
	}
	// The WebSocket endpoint, asked without an upgrade, answers a problem too.
	if r := alice.Do("GET", "/v1/ws", nil); r.Status != 400 || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/problem+json") {
		t.Errorf("GET /v1/ws without an upgrade: want a 400 problem, got %d %s: %s", r.Status, r.Header.Get("Content-Type"), r.Body)
	}
	// Nothing was deleted by the refused DELETE.
	alice.Must(200, "GET", "/v1/agents/"+agent, nil)
}

func TestSecretsReadBackKeepTheirValues(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	env := alice.Must(201, "POST", "/v1/environments", map[string]any{"name": "prod", "secrets": map[string]any{"TOKEN": "real-value"}})
	id := env.Str(t, "id")

	db, err := sql.Open("postgres", s.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	sealed := func() string {
		var v string
		if err := db.QueryRow(`SELECT secrets->>'TOKEN' FROM environments WHERE id = $1`, id).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	before := sealed()

	// What a read shows, written back as it is.
	read := alice.Must(200, "GET", "/v1/environments/"+id, nil)
	var shown struct {
		Secrets map[string]string `json:"secrets"`
	}
	if err := json.Unmarshal(read.Body, &shown); err != nil || shown.Secrets["TOKEN"] != "***" {
		t.Fatalf("a read shows %s", read.Body)
	}
	alice.Must(200, "PATCH", "/v1/environments/"+id, map[string]any{"secrets": shown.Secrets})
	etag := alice.Must(200, "GET", "/v1/environments/"+id, nil).Header.Get("ETag")
	alice.Must(200, "PUT", "/v1/environments/"+id, map[string]any{"name": "prod", "secrets": shown.Secrets}, "If-Match", etag)
	if after := sealed(); after != before {
		t.Fatal("writing back *** replaced the secret")
	}
	// A placeholder for a secret that does not exist is refused.
	secExpect(t, "*** for a new secret", alice.Do("PATCH", "/v1/environments/"+id, map[string]any{"secrets": map[string]any{"OTHER": "***"}}), 400)
	// A real value still replaces it.
	alice.Must(200, "PATCH", "/v1/environments/"+id, map[string]any{"secrets": map[string]any{"TOKEN": "new-value"}})
	if sealed() == before {
		t.Fatal("a new value did not replace the secret")
	}
}

// TestDeletingWhatAnAgentUsesChangesTheAgent: an agent whose environment or
// template is deleted loses the reference, visibly: a fresh read shows it,
// and its ETag changes.
func TestDeletingWhatAnAgentUsesChangesTheAgent(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	tpl := secCreate(t, alice.Client, "/v1/templates", map[string]any{"kind": "agent", "name": "base"})
	envTpl := secCreate(t, alice.Client, "/v1/templates", map[string]any{"kind": "environment", "name": "env-base"})
	env := secCreate(t, alice.Client, "/v1/environments", map[string]any{"name": "prod"})
	stage := secCreate(t, alice.Client, "/v1/environments", map[string]any{"name": "stage", "template_id": envTpl})
	agent := secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": "a", "template_id": tpl, "environment_id": env})

	for _, step := range []struct{ path, field, of string }{
		{"/v1/environments/" + env, "environment_id", "/v1/agents/" + agent},
		{"/v1/templates/" + tpl, "template_id", "/v1/agents/" + agent},
		{"/v1/templates/" + envTpl, "template_id", "/v1/environments/" + stage},
	} {
		before := alice.Must(200, "GET", step.of, nil) // cached now
		if before.JSON(t)[step.field] == nil {
			t.Fatalf("%s has no %s to lose", step.of, step.field)
		}
		alice.Must(204, "DELETE", step.path, nil)
		after := alice.Must(200, "GET", step.of, nil)
		if v, ok := after.JSON(t)[step.field]; ok && v != nil {
			t.Fatalf("after DELETE %s, %s still shows %s %v", step.path, step.of, step.field, v)
		}
		if after.Header.Get("ETag") == before.Header.Get("ETag") {
			t.Fatalf("after DELETE %s, %s kept its ETag %s", step.path, step.of, after.Header.Get("ETag"))
		}
		secExpect(t, "If-None-Match with the old ETag", alice.Do("GET", step.of, nil, "If-None-Match", before.Header.Get("ETag")), 200)
	}
}

// TestTaskSchemasAreJSONSchema: GET /v1/tasks gives each payload's JSON
// Schema (what dispatch checks), and the OpenAPI document describes it as
// such, not as the server's own types.
func TestTaskSchemasAreJSONSchema(t *testing.T) {
	t.Parallel()
	s := NewStack(t, map[string]string{"AGENTRY_COMMAND_TIMEOUT": "10m"})
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	components := func() map[string]any {
		var doc struct {
			Components struct {
				Schemas map[string]any `json:"schemas"`
			} `json:"components"`
		}
		if err := json.Unmarshal(c.Must(200, "GET", "/openapi.json", nil).Body, &doc); err != nil {
			t.Fatal(err)
		}
		return doc.Components.Schemas
	}
	before := components()

	var list struct {
		Items []struct {
			Type          string         `json:"type"`
			TimeoutS      int            `json:"timeout_s"`
			PayloadSchema map[string]any `json:"payload_schema"`
		} `json:"items"`
	}
	if err := json.Unmarshal(alice.Must(200, "GET", "/v1/tasks", nil).Body, &list); err != nil {
		t.Fatal(err)
	}
	required := map[string]string{}
	for _, task := range list.Items {
		if task.PayloadSchema["type"] != "object" || task.PayloadSchema["properties"] == nil {
			t.Fatalf("%s: payload_schema %v", task.Type, task.PayloadSchema)
		}
		req, _ := json.Marshal(task.PayloadSchema["required"])
		required[task.Type] = string(req)
		// agent:echo has no timeout of its own: the setting's applies.
		if task.Type == "agent:echo" && task.TimeoutS != 600 {
			t.Errorf("agent:echo: timeout_s %d with AGENTRY_COMMAND_TIMEOUT=10m", task.TimeoutS)
		}
	}
	agent := secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": "a"})
	if got := alice.Must(202, "POST", "/v1/agents/"+agent+"/commands", map[string]any{"task": "agent:echo"}).JSON(t)["timeout_s"]; got != 600.0 {
		t.Errorf("an echo dispatched with AGENTRY_COMMAND_TIMEOUT=10m has timeout_s %v", got)
	}
	if required["web:scrape"] != `["url"]` || required["agent:echo"] != "null" {
		t.Fatalf("required fields: %v", required)
	}
	// The schemas carry the limits dispatch enforces.
	for _, task := range list.Items {
		props := task.PayloadSchema["properties"].(map[string]any)
		switch task.Type {
		case "agent:sleep":
			if ms := props["milliseconds"].(map[string]any); ms["minimum"] != 0.0 || ms["maximum"] != 3600000.0 {
				t.Errorf("agent:sleep milliseconds: %v", ms)
			}
		case "http:request":
			if m := props["method"].(map[string]any); len(m["enum"].([]any)) != 6 {
				t.Errorf("http:request method: %v", m)
			}
		}
	}

	after := components()
	for _, name := range []string{"", "Schema", "Discriminator"} {
		if _, ok := after[name]; ok {
			t.Errorf("the OpenAPI document has a component schema %q", name)
		}
	}
	if len(after) != len(before) {
		t.Errorf("GET /v1/tasks changed the OpenAPI document: %d component schemas, then %d", len(before), len(after))
	}
}

// TestOpenAPIDocumentsTheOrganizationHeader: X-Org-ID, which every
// authenticated operation reads, is a documented parameter of each, and the
// idempotent replay of a dispatch (200) is documented; its server is the
// public URL.
func TestOpenAPIDocumentsTheOrganizationHeader(t *testing.T) {
	t.Parallel()
	s := NewStack(t, map[string]string{"AGENTRY_PUBLIC_URL": "https://agentry.example.com/"})
	c := s.Client(s.API())
	var doc struct {
		Servers []struct {
			URL string `json:"url"`
		} `json:"servers"`
		Paths map[string]map[string]struct {
			Security   []any            `json:"security"`
			Parameters []map[string]any `json:"parameters"`
			Responses  map[string]any   `json:"responses"`
		} `json:"paths"`
	}
	if err := json.Unmarshal(c.Must(200, "GET", "/openapi.json", nil).Body, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Servers) != 1 || doc.Servers[0].URL != "https://agentry.example.com" {
		t.Errorf("servers %+v, want the public URL", doc.Servers)
	}
	secured := 0
	for path, ops := range doc.Paths {
		for method, op := range ops {
			if len(op.Security) == 0 {
				continue
			}
			secured++
			found := false
			for _, p := range op.Parameters {
				found = found || p["$ref"] == "#/components/parameters/OrgID"
			}
			if !found {
				t.Errorf("%s %s does not document X-Org-ID", method, path)
			}
		}
	}
	if secured < 50 {
		t.Fatalf("only %d authenticated operations", secured)
	}
	if _, ok := doc.Paths["/v1/agents/{id}/commands"]["post"].Responses["200"]; !ok {
		t.Error("the dispatch's 200 (an idempotent replay) is not documented")
	}
}

// Agents made from an environment while it is deleted: each one either
// fails, or is detached as a change of its own (a new version, so a new
// ETag). The foreign key cleared the reference of those made at the same
// moment silently, and clients kept their old copies.
func TestAgentsMadeWhileTheirEnvironmentIsDeleted(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	for round := range 8 {
		env := secCreate(t, alice.Client, "/v1/environments", map[string]any{"name": fmt.Sprintf("e%d", round)})
		var wg sync.WaitGroup
		var mu sync.Mutex
		made := map[string]float64{} // id: its version when made with the environment
		for i := range 6 {
			wg.Go(func() {
				r := alice.Do("POST", "/v1/agents", map[string]any{"name": fmt.Sprintf("a%d-%d", round, i), "environment_id": env})
				if r.Status != 201 {
					return
				}
				if body := r.JSON(t); body["environment_id"] == env {
					mu.Lock()
					made[body["id"].(string)] = body["version"].(float64)
					mu.Unlock()
				}
			})
		}
		wg.Go(func() { alice.Must(204, "DELETE", "/v1/environments/"+env, nil) })
		wg.Wait()
		for id, version := range made {
			now := alice.Must(200, "GET", "/v1/agents/"+id, nil).JSON(t)
			if now["environment_id"] != nil || now["version"].(float64) == version {
				t.Fatalf("round %d: agent %s made with the environment, after its deletion: environment_id %v, version %v (made at %v)",
					round, id, now["environment_id"], now["version"], version)
			}
		}
	}
}

// An ACL entry granted on a resource while it is deleted does not outlive
// it: the deletion removed the entries it saw, and one made meanwhile
// stayed listed, with no route left to revoke it.
func TestGrantWhileTheResourceIsDeleted(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	alice := c.NewUser("alice")
	for round := range 12 {
		agent := secCreate(t, alice.Client, "/v1/agents", map[string]any{"name": fmt.Sprintf("g%d", round)})
		var wg sync.WaitGroup
		actions := []string{"read", "update", "delete", "command", "create"}
		granted := make([]int, len(actions))
		for i, action := range actions {
			wg.Go(func() {
				r := alice.Do("POST", "/v1/agents/"+agent+"/acl", map[string]any{"principal_id": alice.Org, "action": action, "effect": "allow"})
				granted[i] = r.Status
				if r.Status != 201 && r.Status != 404 {
					t.Errorf("round %d: the grant answered %d: %s", round, r.Status, r.Body)
				}
			})
		}
		wg.Go(func() { alice.Must(204, "DELETE", "/v1/agents/"+agent, nil) })
		wg.Wait()
		for _, e := range alice.Must(200, "GET", "/v1/acl", nil).JSON(t)["items"].([]any) {
			if e.(map[string]any)["resource_id"] == agent {
				t.Fatalf("round %d: an entry of the deleted agent is left (the grants answered %v)", round, granted)
			}
		}
	}
}
