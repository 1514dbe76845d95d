package e2e

import (
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
)

// tplCreate creates a template and returns its id.
func tplCreate(t *testing.T, u *User, kind, name, parent string, params map[string]any) string {
	t.Helper()
	body := map[string]any{"kind": kind, "name": name, "params": params}
	if parent != "" {
		body["parent_id"] = parent
	}
	return tplOn(t, u.Client).Must(201, "POST", "/v1/templates", body).Str(t, "id")
}

// tplChain creates n agent templates, each the child of the one before
// (parent, if not empty, is the first one's parent), and returns their ids.
func tplChain(t *testing.T, u *User, name, parent string, n int) []string {
	t.Helper()
	ids := make([]string, 0, n)
	for i := range n {
		parent = tplCreate(t, u, "agent", fmt.Sprintf("%s-%d", name, i), parent, map[string]any{"labels": map[string]any{fmt.Sprintf("level%d", i): "yes"}})
		ids = append(ids, parent)
	}
	return ids
}

// tplFields returns the fields a problem answer lists, sorted.
func tplFields(t *testing.T, r *Response) []string {
	t.Helper()
	var p struct {
		Errors []struct{ Field string } `json:"errors"`
	}
	if err := json.Unmarshal(r.Body, &p); err != nil {
		t.Fatalf("not a problem (%d): %s", r.Status, r.Body)
	}
	var out []string
	for _, e := range p.Errors {
		out = append(out, e.Field)
	}
	slices.Sort(out)
	return out
}

// tplOn returns a copy of c reporting to t: a subtest's failure must not end
// its parent.
func tplOn(t *testing.T, c *Client) *Client {
	cp := *c
	cp.t = t
	return &cp
}

// tplMustFail sends a request that must be refused with status, listing
// exactly the fields want (when want is not nil).
func tplMustFail(t *testing.T, c *Client, status int, method, path string, body any, want ...string) *Response {
	t.Helper()
	r := tplOn(t, c).Must(status, method, path, body)
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
		t.Errorf("%s %s: want a problem, got Content-Type %q", method, path, ct)
	}
	if want != nil {
		slices.Sort(want)
		if got := tplFields(t, r); !slices.Equal(got, want) {
			t.Fatalf("%s %s: want fields %v, got %v: %s", method, path, want, got, r.Body)
		}
	}
	return r
}

// tplJSON decodes a JSON text, for comparing with answers.
func tplJSON(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad JSON in the test: %s", s)
	}
	return v
}

// tplWantJSON fails t unless got, decoded from an answer, is the JSON want.
func tplWantJSON(t *testing.T, what string, got any, want string) {
	t.Helper()
	if w := tplJSON(t, want); !reflect.DeepEqual(got, w) {
		data, _ := json.Marshal(got)
		t.Fatalf("%s:\nwant %s\n got %s", what, want, data)
	}
}

func TestTemplateCyclesRefused(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	u := s.Client(s.API()).NewUser("cy")

	chain := tplChain(t, u, "cy", "", 3) // a ← b ← c
	a, b, c := chain[0], chain[1], chain[2]

	cases := []struct {
		name        string
		method, id  string
		body        map[string]any
		wantInCycle []string
	}{
		{"self as parent", "PATCH", a, map[string]any{"parent_id": a}, []string{a}},
		{"re-parented under its grandchild", "PATCH", a, map[string]any{"parent_id": c}, []string{a, b, c}},
		{"re-parented under its child", "PATCH", b, map[string]any{"parent_id": c}, []string{b, c}},
		{"replaced with its grandchild as parent", "PUT", a, map[string]any{"kind": "agent", "name": "cy-0", "parent_id": c}, []string{a, b, c}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := tplMustFail(t, u.Client, 409, tc.method, "/v1/templates/"+tc.id, tc.body)
			detail := r.Str(t, "detail")
			if !strings.Contains(detail, "cycle") {
				t.Errorf("the problem should say cycle: %q", detail)
			}
			for _, id := range tc.wantInCycle {
				if !strings.Contains(detail, id) {
					t.Errorf("the problem should name %s of the cycle: %q", id, detail)
				}
			}
		})
	}
	// Nothing changed: a is still the root, and the chain still resolves.
	if got := u.Must(200, "GET", "/v1/templates/"+a, nil).JSON(t)["parent_id"]; got != nil {
		t.Fatalf("a's parent: want none, got %v", got)
	}
	if n := len(u.Must(200, "GET", "/v1/templates/"+c+"/resolved", nil).JSON(t)["chain"].([]any)); n != 3 {
		t.Fatalf("c's chain: want 3 templates, got %d", n)
	}

	// A template cannot be created into a cycle either: its id is the
	// server's, and the parent must exist.
	tplMustFail(t, u.Client, 400, "POST", "/v1/templates", map[string]any{"kind": "agent", "name": "x", "parent_id": "00000000-0000-4000-8000-000000000000"}, "body.parent_id")
}

// Two re-parentings that would together close a cycle: one must win and
// the other be refused as a cycle, at once.
func TestTemplateConcurrentReparenting(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("race")
	for round := range 4 {
		x := tplCreate(t, u, "agent", fmt.Sprint("x", round), "", nil)
		y := tplCreate(t, u, "agent", fmt.Sprint("y", round), "", nil)
		var wg sync.WaitGroup
		answers := make([]*Response, 2)
		for i, pair := range [][2]string{{x, y}, {y, x}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				answers[i] = u.Do("PATCH", "/v1/templates/"+pair[0], map[string]any{"parent_id": pair[1]})
			}()
		}
		wg.Wait()
		slices.SortFunc(answers, func(a, b *Response) int { return a.Status - b.Status })
		if answers[0].Status != 200 || answers[1].Status != 409 || !strings.Contains(answers[1].Str(t, "detail"), "cycle") {
			t.Fatalf("round %d: want 200 and a 409 naming the cycle, got %d %s and %d %s", round, answers[0].Status, answers[0].Body, answers[1].Status, answers[1].Body)
		}
		for _, id := range []string{x, y} {
			u.Must(200, "GET", "/v1/templates/"+id+"/resolved", nil)
		}
	}
	if logs := api.Logs(); strings.Contains(logs, "deadlock") {
		t.Fatalf("the api hit a deadlock:\n%s", logs)
	}
}

func TestTemplateDepthLimit(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	u := s.Client(s.API()).NewUser("deep")

	chain := tplChain(t, u, "deep", "", 16)
	leaf := chain[15]
	res := u.Must(200, "GET", "/v1/templates/"+leaf+"/resolved", nil).JSON(t)
	if n := len(res["chain"].([]any)); n != 16 {
		t.Fatalf("want a chain of 16, got %d", n)
	}
	if n := len(res["params"].(map[string]any)["labels"].(map[string]any)); n != 16 {
		t.Fatalf("want the labels of 16 levels, got %d: %v", n, res["params"])
	}

	r := tplMustFail(t, u.Client, 409, "POST", "/v1/templates", map[string]any{"kind": "agent", "name": "deep-16", "parent_id": leaf})
	if detail := r.Str(t, "detail"); !strings.Contains(detail, "16") {
		t.Errorf("the problem should give the limit: %q", detail)
	}

	// Re-parenting a two-level chain counts its descendants too.
	pair := tplChain(t, u, "pair", "", 2)
	tplMustFail(t, u.Client, 409, "PATCH", "/v1/templates/"+pair[0], map[string]any{"parent_id": chain[14]}) // 15 + 2
	u.Must(200, "PATCH", "/v1/templates/"+pair[0], map[string]any{"parent_id": chain[13]})                   // 14 + 2
	if n := len(u.Must(200, "GET", "/v1/templates/"+pair[1]+"/resolved", nil).JSON(t)["chain"].([]any)); n != 16 {
		t.Fatalf("want a chain of 16, got %d", n)
	}
	// A template under the 16th level is refused however it gets there.
	tplMustFail(t, u.Client, 409, "POST", "/v1/templates", map[string]any{"kind": "agent", "name": "deeper", "parent_id": pair[1]})
}

func TestTemplateParentChecks(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	u := c.NewUser("kinds")
	other := c.NewUser("stranger")

	env := tplCreate(t, u, "environment", "env", "", map[string]any{"variables": map[string]any{"A": "1"}})
	agent := tplCreate(t, u, "agent", "agent", "", nil)
	foreign := tplCreate(t, other, "agent", "foreign", "", nil)

	cases := []struct {
		name         string
		method, path string
		body         map[string]any
		status       int
		fields       []string
	}{
		{"create under another kind", "POST", "/v1/templates", map[string]any{"kind": "agent", "name": "x", "parent_id": env}, 400, []string{"body.parent_id"}},
		{"re-parent under another kind", "PATCH", "/v1/templates/" + agent, map[string]any{"parent_id": env}, 400, []string{"body.parent_id"}},
		{"create under another organization's template", "POST", "/v1/templates", map[string]any{"kind": "agent", "name": "x", "parent_id": foreign}, 400, []string{"body.parent_id"}},
		{"unknown kind", "POST", "/v1/templates", map[string]any{"kind": "widget", "name": "x"}, 400, []string{"body.kind"}},
		{"change of kind", "PATCH", "/v1/templates/" + env, map[string]any{"kind": "agent"}, 400, []string{"body.kind"}},
		{"environment params outside the schema are caught on use, not here", "POST", "/v1/templates", map[string]any{"kind": "environment", "name": "x", "parent_id": env, "params": map[string]any{"other": 1}}, 201, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.status >= 400 {
				tplMustFail(t, u.Client, tc.status, tc.method, tc.path, tc.body, tc.fields...)
				return
			}
			tplOn(t, u.Client).Must(tc.status, tc.method, tc.path, tc.body)
		})
	}
	if got := u.Must(200, "GET", "/v1/templates/"+agent, nil).JSON(t)["parent_id"]; got != nil {
		t.Fatalf("a refused re-parenting changed the parent to %v", got)
	}
}

func TestTemplateDeleteWithChildren(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	u := s.Client(s.API()).NewUser("del")

	chain := tplChain(t, u, "del", "", 2)
	agent := u.Must(201, "POST", "/v1/templates/"+chain[1]+"/instantiate", map[string]any{"name": "a"}).JSON(t)

	r := tplMustFail(t, u.Client, 409, "DELETE", "/v1/templates/"+chain[0], nil)
	if detail := r.Str(t, "detail"); !strings.Contains(detail, "1 template") {
		t.Errorf("the problem should count the children: %q", detail)
	}
	u.Must(200, "GET", "/v1/templates/"+chain[0], nil)
	u.Must(204, "DELETE", "/v1/templates/"+chain[1], nil)
	u.Must(204, "DELETE", "/v1/templates/"+chain[0], nil)

	// The agent made from the deleted template keeps its configuration.
	got := u.Must(200, "GET", "/v1/agents/"+agent["id"].(string), nil).JSON(t)
	if !reflect.DeepEqual(got["config"], agent["config"]) || got["template_id"] != nil {
		t.Fatalf("agent after its template was deleted: want config %v and no template, got %v", agent["config"], got)
	}
}

func TestTemplateResolveAndInstantiate(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	u := s.Client(s.API()).NewUser("inst")

	root := tplCreate(t, u, "agent", "root", "", map[string]any{"max_concurrency": 2, "command_timeout_s": 60, "labels": map[string]any{"team": "core", "tier": "gold"}})
	mid := tplCreate(t, u, "agent", "mid", root, map[string]any{"labels": map[string]any{"tier": nil, "zone": "eu"}, "allowed_tasks": []string{"echo"}})
	leaf := tplCreate(t, u, "agent", "leaf", mid, map[string]any{"max_concurrency": 4})

	res := u.Must(200, "GET", "/v1/templates/"+leaf+"/resolved", nil).JSON(t)
	tplWantJSON(t, "resolved params", res["params"], `{"max_concurrency":4,"command_timeout_s":60,"labels":{"team":"core","zone":"eu"},"allowed_tasks":["echo"]}`)
	tplWantJSON(t, "sources", res["sources"], fmt.Sprintf(`{"max_concurrency":%q,"command_timeout_s":%q,"labels":%q,"allowed_tasks":%q}`, leaf, root, mid, mid))
	var chain []any
	for _, tp := range res["chain"].([]any) {
		chain = append(chain, tp.(map[string]any)["id"])
	}
	tplWantJSON(t, "chain, root first", chain, fmt.Sprintf(`[%q,%q,%q]`, root, mid, leaf))
	u.Must(404, "GET", "/v1/templates/00000000-0000-4000-8000-000000000000/resolved", nil)

	overrides := `{"command_timeout_s":30,"labels":{"zone":null,"owner":"ada"}}`
	wantConfig := `{"max_concurrency":4,"command_timeout_s":30,"labels":{"team":"core","owner":"ada"},"allowed_tasks":["echo"]}`
	check := func(t *testing.T, a map[string]any) {
		t.Helper()
		if a["template_id"] != leaf {
			t.Errorf("template_id: want %s, got %v", leaf, a["template_id"])
		}
		tplWantJSON(t, "overrides", a["overrides"], overrides)
		tplWantJSON(t, "config", a["config"], wantConfig)
		stored := tplOn(t, u.Client).Must(200, "GET", "/v1/agents/"+a["id"].(string), nil).JSON(t)
		tplWantJSON(t, "stored config", stored["config"], wantConfig)
		tplWantJSON(t, "stored overrides", stored["overrides"], overrides)
	}
	t.Run("instantiate", func(t *testing.T) {
		r := tplOn(t, u.Client).Must(201, "POST", "/v1/templates/"+leaf+"/instantiate", `{"name":"from-template","description":"d","params":`+overrides+`}`)
		a := r.JSON(t)
		if want := "/v1/agents/" + a["id"].(string); r.Header.Get("Location") != want {
			t.Errorf("Location: want %s, got %q", want, r.Header.Get("Location"))
		}
		if a["name"] != "from-template" || a["description"] != "d" {
			t.Errorf("the body's own fields: %v", a)
		}
		check(t, a)
	})
	t.Run("create with template_id", func(t *testing.T) {
		check(t, tplOn(t, u.Client).Must(201, "POST", "/v1/agents", `{"name":"created","template_id":"`+leaf+`","params":`+overrides+`}`).JSON(t))
	})
	t.Run("instantiate without params", func(t *testing.T) {
		a := tplOn(t, u.Client).Must(201, "POST", "/v1/templates/"+leaf+"/instantiate", map[string]any{"name": "plain"}).JSON(t)
		tplWantJSON(t, "config", a["config"], `{"max_concurrency":4,"command_timeout_s":60,"labels":{"team":"core","zone":"eu"},"allowed_tasks":["echo"]}`)
	})

	bad := tplCreate(t, u, "agent", "bad", leaf, map[string]any{"max_concurrency": 500})
	envTpl := tplCreate(t, u, "environment", "env", "", nil)
	refusals := []struct {
		name         string
		method, path string
		body         any
		status       int
		fields       []string
	}{
		{"instantiate: overrides outside the schema", "POST", "/v1/templates/" + leaf + "/instantiate",
			map[string]any{"name": "x", "params": map[string]any{"max_concurrency": 500, "labels": map[string]any{"team": 1, "ok": "yes"}, "allowed_tasks": []any{"echo", 3}}}, 400,
			[]string{"body.params.allowed_tasks.1", "body.params.labels.team", "body.params.max_concurrency"}},
		{"create: overrides outside the schema", "POST", "/v1/agents",
			map[string]any{"name": "x", "template_id": leaf, "params": map[string]any{"command_timeout_s": 0, "labels": map[string]any{"team": true}}}, 400,
			[]string{"body.params.command_timeout_s", "body.params.labels.team"}},
		{"create without a template: params outside the schema", "POST", "/v1/agents",
			map[string]any{"name": "x", "params": map[string]any{"max_concurrency": "many"}}, 400, []string{"body.params.max_concurrency"}},
		{"instantiate: a template outside the schema", "POST", "/v1/templates/" + bad + "/instantiate", map[string]any{"name": "x"}, 400, []string{"body.params.max_concurrency"}},
		{"instantiate: an override mends the template", "POST", "/v1/templates/" + bad + "/instantiate", map[string]any{"name": "x", "params": map[string]any{"max_concurrency": 5}}, 201, nil},
		{"instantiate: template_id in the body", "POST", "/v1/templates/" + leaf + "/instantiate", map[string]any{"name": "x", "template_id": leaf}, 400, []string{"body.template_id"}},
		{"instantiate: not an object", "POST", "/v1/templates/" + leaf + "/instantiate", `[1]`, 400, []string{"body"}},
		{"instantiate: the kind's own checks", "POST", "/v1/templates/" + leaf + "/instantiate", map[string]any{"params": map[string]any{}}, 400, []string{"body.name"}},
		{"instantiate: unknown template", "POST", "/v1/templates/00000000-0000-4000-8000-000000000000/instantiate", map[string]any{"name": "x"}, 404, nil},
		{"create: template of another kind", "POST", "/v1/agents", map[string]any{"name": "x", "template_id": envTpl}, 400, []string{"body.template_id"}},
		{"create: environment from an agent template", "POST", "/v1/environments", map[string]any{"name": "x", "template_id": leaf}, 400, []string{"body.template_id"}},
		{"create: unknown template", "POST", "/v1/agents", map[string]any{"name": "x", "template_id": "00000000-0000-4000-8000-000000000000"}, 400, []string{"body.template_id"}},
	}
	for _, tc := range refusals {
		t.Run(tc.name, func(t *testing.T) {
			if tc.status >= 400 {
				tplMustFail(t, u.Client, tc.status, tc.method, tc.path, tc.body, tc.fields...)
				return
			}
			tplOn(t, u.Client).Must(tc.status, tc.method, tc.path, tc.body)
		})
	}
	t.Run("instantiate: params not an object", func(t *testing.T) {
		tplMustFail(t, u.Client, 400, "POST", "/v1/templates/"+leaf+"/instantiate", map[string]any{"name": "x", "params": "max_concurrency=1"}, "body.params")
	})
	t.Run("patch: trailing data after the merge patch", func(t *testing.T) {
		tplMustFail(t, u.Client, 400, "PATCH", "/v1/templates/"+leaf, `{"name":"renamed"}]`, "body")
	})
}

func TestTemplateInstantiateNeedsReadOnTheChain(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	c := s.Client(s.API())
	owner := c.NewUser("owner")
	m := c.NewUser("member")
	owner.Must(201, "POST", "/v1/members", map[string]any{"email": m.Email, "role": "member"})
	member := m.As(m.Token, owner.Org)

	parent := tplCreate(t, owner, "agent", "parent", "", map[string]any{"labels": map[string]any{"secret_sauce": "parent-only"}})
	child := tplCreate(t, owner, "agent", "child", parent, map[string]any{"max_concurrency": 2})

	// With read access on the whole chain, the member instantiates.
	member.Must(200, "GET", "/v1/templates/"+child+"/resolved", nil)
	a := member.Must(201, "POST", "/v1/templates/"+child+"/instantiate", map[string]any{"name": "mine"}).JSON(t)
	tplWantJSON(t, "config", a["config"], `{"max_concurrency":2,"labels":{"secret_sauce":"parent-only"}}`)

	owner.Must(201, "POST", "/v1/templates/"+parent+"/acl", map[string]any{"principal_id": m.ID, "action": "read", "effect": "deny"})

	member.Must(404, "GET", "/v1/templates/"+parent, nil)
	member.Must(200, "GET", "/v1/templates/"+child, nil)
	for _, r := range []*Response{
		member.Must(404, "GET", "/v1/templates/"+child+"/resolved", nil),
		tplMustFail(t, member, 400, "POST", "/v1/agents", map[string]any{"name": "x", "template_id": child}, "body.template_id"),
	} {
		if strings.Contains(string(r.Body), "parent-only") || strings.Contains(string(r.Body), parent) {
			t.Fatalf("a refusal shows the unreadable parent: %s", r.Body)
		}
	}
	// The owner is not affected.
	owner.Must(201, "POST", "/v1/templates/"+child+"/instantiate", map[string]any{"name": "owners"})

	t.Run("instantiate answers 404", func(t *testing.T) {
		r := tplOn(t, member).Must(404, "POST", "/v1/templates/"+child+"/instantiate", map[string]any{"name": "x"})
		if strings.Contains(string(r.Body), "parent-only") {
			t.Fatalf("the refusal shows the parent's params: %s", r.Body)
		}
	})
}

func TestTemplateEditAndResync(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	u := s.Client(s.API()).NewUser("resync")

	root := tplCreate(t, u, "agent", "root", "", map[string]any{"command_timeout_s": 60})
	tpl := tplCreate(t, u, "agent", "tpl", root, map[string]any{"max_concurrency": 2, "labels": map[string]any{"a": "1"}})
	made := u.Must(201, "POST", "/v1/templates/"+tpl+"/instantiate", map[string]any{"name": "a", "params": map[string]any{"allowed_tasks": []string{"echo"}}}).JSON(t)
	id := made["id"].(string)
	before := `{"command_timeout_s":60,"max_concurrency":2,"labels":{"a":"1"},"allowed_tasks":["echo"]}`
	tplWantJSON(t, "config", made["config"], before)

	u.Must(200, "PATCH", "/v1/templates/"+root, map[string]any{"params": map[string]any{"command_timeout_s": nil, "extra": "yes"}})
	u.Must(200, "PATCH", "/v1/templates/"+tpl, map[string]any{"params": map[string]any{"max_concurrency": 3, "labels": map[string]any{"b": "2"}}})

	// Editing templates leaves the agents made from them alone.
	got := u.Must(200, "GET", "/v1/agents/"+id, nil).JSON(t)
	tplWantJSON(t, "config after the edit", got["config"], before)
	if got["version"] != made["version"] {
		t.Fatalf("the agent's version moved from %v to %v", made["version"], got["version"])
	}

	r := u.Must(200, "POST", "/v1/agents/"+id+"/resync", nil).JSON(t)
	if r["changed"] != true {
		t.Fatalf("resync: want changed, got %v", r)
	}
	tplWantJSON(t, "diff", r["diff"], `{"added":{"extra":"yes"},"removed":{"command_timeout_s":60},"changed":{"max_concurrency":[2,3],"labels":[{"a":"1"},{"a":"1","b":"2"}]}}`)
	after := `{"extra":"yes","max_concurrency":3,"labels":{"a":"1","b":"2"},"allowed_tasks":["echo"]}`
	tplWantJSON(t, "resynced resource", r["resource"].(map[string]any)["config"], after)
	got = u.Must(200, "GET", "/v1/agents/"+id, nil).JSON(t)
	tplWantJSON(t, "stored config", got["config"], after)
	tplWantJSON(t, "overrides kept", got["overrides"], `{"allowed_tasks":["echo"]}`)
	version := got["version"]
	if version == made["version"] {
		t.Fatalf("resync did not bump the version (%v)", version)
	}

	r = u.Must(200, "POST", "/v1/agents/"+id+"/resync", nil).JSON(t)
	if r["changed"] != false {
		t.Fatalf("second resync: want no change, got %v", r)
	}
	tplWantJSON(t, "second diff", r["diff"], `{"added":{},"removed":{},"changed":{}}`)
	if v := u.Must(200, "GET", "/v1/agents/"+id, nil).JSON(t)["version"]; v != version {
		t.Fatalf("a resync without change moved the version from %v to %v", version, v)
	}

	// A template edited out of the schema: the resync is refused and the agent kept.
	u.Must(200, "PATCH", "/v1/templates/"+tpl, map[string]any{"params": map[string]any{"max_concurrency": 500}})
	tplMustFail(t, u.Client, 400, "POST", "/v1/agents/"+id+"/resync", nil, "body.params.max_concurrency")
	tplWantJSON(t, "config after a refused resync", u.Must(200, "GET", "/v1/agents/"+id, nil).JSON(t)["config"], after)

	plain := u.Must(201, "POST", "/v1/agents", map[string]any{"name": "plain"}).Str(t, "id")
	tplMustFail(t, u.Client, 409, "POST", "/v1/agents/"+plain+"/resync", nil)
	u.Must(404, "POST", "/v1/agents/00000000-0000-4000-8000-000000000000/resync", nil)
}

func TestEnvironmentSecretsAndVariables(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	u := s.Client(api).NewUser("env")
	secretValues := []string{"s3cr3t-db-password-8c1f", "tok-API-0d9e-very-private", "third-secret-value-77aa", "bad-name-secret-value-5b2c"}
	var seen []*Response
	keep := func(r *Response) *Response { seen = append(seen, r); return r }

	tpl := tplCreate(t, u, "environment", "base", "", map[string]any{"variables": map[string]any{"REGION": "eu", "LEVEL": "info"}})
	child := tplCreate(t, u, "environment", "child", tpl, map[string]any{"variables": map[string]any{"LEVEL": "warn", "TIER": "gold"}})

	env := keep(u.Must(201, "POST", "/v1/environments", map[string]any{
		"name": "prod", "template_id": child,
		"params":  map[string]any{"variables": map[string]any{"LEVEL": "debug", "EXTRA": "1", "TIER": nil}},
		"secrets": map[string]any{"DB_PASSWORD": secretValues[0], "API_TOKEN": secretValues[1]},
	})).JSON(t)
	id := env["id"].(string)
	tplWantJSON(t, "variables", env["params"], `{"variables":{"REGION":"eu","LEVEL":"debug","EXTRA":"1"}}`)
	tplWantJSON(t, "secrets", env["secrets"], `{"DB_PASSWORD":"***","API_TOKEN":"***"}`)

	inst := keep(u.Must(201, "POST", "/v1/templates/"+tpl+"/instantiate", map[string]any{"name": "staging", "secrets": map[string]any{"DB_PASSWORD": secretValues[0]}})).JSON(t)
	tplWantJSON(t, "instantiated variables", inst["params"], `{"variables":{"REGION":"eu","LEVEL":"info"}}`)
	tplWantJSON(t, "instantiated secrets", inst["secrets"], `{"DB_PASSWORD":"***"}`)

	keep(u.Must(200, "PATCH", "/v1/environments/"+id, map[string]any{"secrets": map[string]any{"THIRD": secretValues[2]}, "description": "patched"}))
	keep(u.Must(200, "PUT", "/v1/environments/"+id, map[string]any{"name": "prod", "template_id": child, "params": map[string]any{"variables": map[string]any{"LEVEL": "debug", "EXTRA": "1", "TIER": nil}}}))
	got := keep(u.Must(200, "GET", "/v1/environments/"+id, nil)).JSON(t)
	tplWantJSON(t, "secrets after patch and put", got["secrets"], `{"DB_PASSWORD":"***","API_TOKEN":"***","THIRD":"***"}`)
	keep(u.Must(200, "GET", "/v1/environments", nil))
	keep(u.Must(200, "GET", "/v1/environments?name=prod", nil))

	// Refusals do not echo secrets either.
	keep(tplMustFail(t, u.Client, 400, "POST", "/v1/environments", map[string]any{"name": "x", "secrets": map[string]any{"1BAD": secretValues[3]}}, "body.secrets.1BAD"))
	keep(tplMustFail(t, u.Client, 400, "PATCH", "/v1/environments/"+id, map[string]any{"secrets": map[string]any{"bad-name": secretValues[3]}}, "body.secrets.bad-name"))
	keep(tplMustFail(t, u.Client, 400, "POST", "/v1/environments", map[string]any{"name": "x", "params": map[string]any{"variables": map[string]any{"OK": "1", "N": 2}}, "secrets": map[string]any{"S": secretValues[3]}}, "body.params.variables.N"))
	keep(tplMustFail(t, u.Client, 400, "POST", "/v1/environments", map[string]any{"name": "x", "params": map[string]any{"other": "1"}, "secrets": map[string]any{"S": secretValues[3]}}, "body.params.other"))
	keep(tplMustFail(t, u.Client, 400, "POST", "/v1/templates/"+tpl+"/instantiate", map[string]any{"name": "x", "params": map[string]any{"variables": map[string]any{"1BAD": "x"}}, "secrets": map[string]any{"S": secretValues[3]}}, "body.params.variables.1BAD"))

	// Deleting a secret.
	u.Must(204, "DELETE", "/v1/environments/"+id+"/secrets/API_TOKEN", nil)
	got = keep(u.Must(200, "GET", "/v1/environments/"+id, nil)).JSON(t)
	tplWantJSON(t, "secrets after delete", got["secrets"], `{"DB_PASSWORD":"***","THIRD":"***"}`)
	u.Must(404, "DELETE", "/v1/environments/"+id+"/secrets/API_TOKEN", nil)
	u.Must(404, "DELETE", "/v1/environments/00000000-0000-4000-8000-000000000000/secrets/THIRD", nil)
	s.Client(api).NewUser("other").Must(404, "DELETE", "/v1/environments/"+id+"/secrets/THIRD", nil)

	// Variables follow the template on resync; secrets stay.
	u.Must(200, "PATCH", "/v1/templates/"+tpl, map[string]any{"params": map[string]any{"variables": map[string]any{"REGION": "us", "NEW": "n"}}})
	r := keep(u.Must(200, "POST", "/v1/environments/"+id+"/resync", nil)).JSON(t)
	tplWantJSON(t, "environment diff", r["diff"], `{"added":{},"removed":{},"changed":{"variables":[{"REGION":"eu","LEVEL":"debug","EXTRA":"1"},{"REGION":"us","NEW":"n","LEVEL":"debug","EXTRA":"1"}]}}`)
	tplWantJSON(t, "secrets after resync", r["resource"].(map[string]any)["secrets"], `{"DB_PASSWORD":"***","THIRD":"***"}`)

	for _, resp := range seen {
		for _, v := range secretValues {
			if strings.Contains(string(resp.Body), v) {
				t.Fatalf("a response shows the secret %q: %s", v, resp.Body)
			}
		}
	}
	logs := api.Logs()
	if !strings.Contains(logs, "/v1/environments") {
		t.Fatalf("the api logged no environment request; is the log captured?\n%s", logs)
	}
	for _, v := range secretValues {
		if strings.Contains(logs, v) {
			t.Fatalf("the api logged the secret %q", v)
		}
	}
}
