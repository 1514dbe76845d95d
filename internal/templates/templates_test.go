package templates

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
)

// agentSchema mirrors the platform's agent kind.
const agentSchema = `{
	"type": "object",
	"properties": {
		"max_concurrency": {"type": "integer", "minimum": 1, "maximum": 100},
		"allowed_tasks": {"type": "array", "items": {"type": "string"}},
		"labels": {"type": "object", "additionalProperties": {"type": "string"}},
		"command_timeout_s": {"type": "integer", "minimum": 1, "maximum": 86400}
	}
}`

func template(id string, params string) *Template {
	return &Template{Base: crud.Base{ID: id}, Kind: "agent", Name: id, Params: object(params)}
}

// object decodes a JSON object the way request bodies are (numbers exact).
func object(s string) platform.JSONObject {
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		panic(err)
	}
	return m
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestMerge(t *testing.T) {
	cases := []struct {
		name        string
		chain       []*Template
		wantParams  string
		wantSources map[string]string
	}{
		{
			name:        "empty chain",
			wantParams:  `{}`,
			wantSources: map[string]string{},
		},
		{
			name:        "one template",
			chain:       []*Template{template("root", `{"max_concurrency":2}`)},
			wantParams:  `{"max_concurrency":2}`,
			wantSources: map[string]string{"max_concurrency": "root"},
		},
		{
			name: "root first, the last template wins",
			chain: []*Template{
				template("root", `{"max_concurrency":1,"command_timeout_s":60,"labels":{"team":"core","tier":"gold"}}`),
				template("mid", `{"max_concurrency":4,"labels":{"tier":"silver","zone":"eu"}}`),
				template("leaf", `{"max_concurrency":8,"allowed_tasks":["echo"]}`),
			},
			wantParams:  `{"allowed_tasks":["echo"],"command_timeout_s":60,"labels":{"team":"core","tier":"silver","zone":"eu"},"max_concurrency":8}`,
			wantSources: map[string]string{"max_concurrency": "leaf", "command_timeout_s": "root", "labels": "mid", "allowed_tasks": "leaf"},
		},
		{
			name: "null removes a key and its source",
			chain: []*Template{
				template("root", `{"max_concurrency":1,"command_timeout_s":60,"labels":{"team":"core"}}`),
				template("mid", `{"command_timeout_s":null}`),
				template("leaf", `{"labels":{"team":null}}`),
			},
			wantParams:  `{"labels":{},"max_concurrency":1}`,
			wantSources: map[string]string{"max_concurrency": "root", "labels": "leaf"},
		},
		{
			name: "a key removed then set again comes from the template setting it",
			chain: []*Template{
				template("root", `{"max_concurrency":1}`),
				template("mid", `{"max_concurrency":null}`),
				template("leaf", `{"max_concurrency":3}`),
			},
			wantParams:  `{"max_concurrency":3}`,
			wantSources: map[string]string{"max_concurrency": "leaf"},
		},
		{
			name: "a null for a key no ancestor set",
			chain: []*Template{
				template("root", `{"max_concurrency":1}`),
				template("leaf", `{"labels":null}`),
			},
			wantParams:  `{"max_concurrency":1}`,
			wantSources: map[string]string{"max_concurrency": "root"},
		},
		{
			name: "templates without params",
			chain: []*Template{
				{Base: crud.Base{ID: "root"}},
				template("leaf", `{"max_concurrency":5}`),
			},
			wantParams:  `{"max_concurrency":5}`,
			wantSources: map[string]string{"max_concurrency": "leaf"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := mustJSON(t, tc.chain)
			res := Merge(tc.chain)
			if got := mustJSON(t, res.Params); got != tc.wantParams {
				t.Errorf("params: want %s, got %s", tc.wantParams, got)
			}
			if !reflect.DeepEqual(res.Sources, tc.wantSources) {
				t.Errorf("sources: want %v, got %v", tc.wantSources, res.Sources)
			}
			if len(res.Chain) != len(tc.chain) {
				t.Errorf("chain: want %d templates, got %d", len(tc.chain), len(res.Chain))
			}
			if after := mustJSON(t, tc.chain); after != before {
				t.Errorf("Merge modified the chain:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

func TestCompare(t *testing.T) {
	cases := []struct {
		name          string
		before, after string
		want          Diff
	}{
		{
			name: "nothing changed", before: `{"a":1,"b":{"c":[1,2]}}`, after: `{"b":{"c":[1,2]},"a":1}`,
			want: Diff{Added: map[string]any{}, Removed: map[string]any{}, Changed: map[string][2]any{}},
		},
		{
			name: "added, removed and changed", before: `{"keep":true,"gone":"x","n":1}`, after: `{"keep":true,"new":[1],"n":2}`,
			want: Diff{
				Added:   map[string]any{"new": []any{json.Number("1")}},
				Removed: map[string]any{"gone": "x"},
				Changed: map[string][2]any{"n": {json.Number("1"), json.Number("2")}},
			},
		},
		{
			name: "a nested change is a change of the top-level key", before: `{"labels":{"a":"1","b":"2"}}`, after: `{"labels":{"a":"1","b":"3"}}`,
			want: Diff{Added: map[string]any{}, Removed: map[string]any{}, Changed: map[string][2]any{
				"labels": {map[string]any{"a": "1", "b": "2"}, map[string]any{"a": "1", "b": "3"}},
			}},
		},
		{
			name: "a key set to null is not a removal", before: `{"a":null}`, after: `{"a":1}`,
			want: Diff{Added: map[string]any{}, Removed: map[string]any{}, Changed: map[string][2]any{"a": {nil, json.Number("1")}}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Compare(object(tc.before), object(tc.after))
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("want %#v\n got %#v", tc.want, got)
			}
			if got.Empty() != tc.want.Empty() {
				t.Fatalf("Empty: want %v, got %v", tc.want.Empty(), got.Empty())
			}
		})
	}
}

func TestCompareNumbersDecodedDifferently(t *testing.T) {
	// A stored config comes back from jsonb as float64; a freshly resolved
	// one carries the request's json.Number: the same value is no change.
	stored := map[string]any{"max_concurrency": float64(4), "labels": map[string]any{"n": "1"}, "t": []any{float64(1.5)}}
	resolved := map[string]any{"max_concurrency": json.Number("4"), "labels": map[string]any{"n": "1"}, "t": []any{json.Number("1.50")}}
	if d := Compare(stored, resolved); !d.Empty() {
		t.Fatalf("want no change, got %+v", d)
	}
}

func newKinds(t *testing.T) *Kinds {
	t.Helper()
	var k Kinds
	if err := k.Register(&Kind{Name: "agent", Schema: json.RawMessage(agentSchema)}); err != nil {
		t.Fatal(err)
	}
	return &k
}

func TestValidate(t *testing.T) {
	kinds := newKinds(t)
	agent, _ := kinds.Get("agent")
	cases := []struct {
		name   string
		params string
		want   []string // failing fields, sorted
	}{
		{"empty is valid", `{}`, nil},
		{"valid", `{"max_concurrency":100,"allowed_tasks":["echo"],"labels":{"team":"core"},"command_timeout_s":1,"extra":true}`, nil},
		{"over the maximum", `{"max_concurrency":101}`, []string{"body.params.max_concurrency"}},
		{"under the minimum", `{"command_timeout_s":0}`, []string{"body.params.command_timeout_s"}},
		{"not an integer", `{"max_concurrency":1.5}`, []string{"body.params.max_concurrency"}},
		{"wrong type in nested labels", `{"labels":{"team":"core","size":3}}`, []string{"body.params.labels.size"}},
		{"wrong type in an array", `{"allowed_tasks":["echo",7]}`, []string{"body.params.allowed_tasks.1"}},
		{
			"every failing path is listed",
			`{"max_concurrency":500,"labels":{"a":1,"b":true,"c":"ok"},"allowed_tasks":"echo","command_timeout_s":"60"}`,
			[]string{"body.params.allowed_tasks", "body.params.command_timeout_s", "body.params.labels.a", "body.params.labels.b", "body.params.max_concurrency"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bad := agent.Validate(object(tc.params), "body.params")
			var got []string
			for _, f := range bad {
				got = append(got, f.Field)
				if f.Message == "" {
					t.Errorf("%s: empty message", f.Field)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("want %v, got %v (%+v)", tc.want, got, bad)
			}
		})
	}
}

// environmentSchema mirrors the platform's environment kind.
const environmentSchema = `{
	"type": "object",
	"properties": {
		"variables": {
			"type": "object",
			"propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
			"additionalProperties": {"type": "string", "maxLength": 65536}
		}
	},
	"additionalProperties": false
}`

func TestValidateNamesThePropertyAtFault(t *testing.T) {
	var kinds Kinds
	if err := kinds.Register(&Kind{Name: "environment", Schema: json.RawMessage(environmentSchema)}); err != nil {
		t.Fatal(err)
	}
	env, _ := kinds.Get("environment")
	cases := []struct {
		name   string
		params string
		want   []string
	}{
		{"valid", `{"variables":{"A":"1","_b2":"2"}}`, nil},
		{"properties not allowed", `{"other":1,"more":2}`, []string{"body.params.more", "body.params.other"}},
		{"bad names", `{"variables":{"1BAD":"x","OK":"y","bad-too":"z"}}`, []string{"body.params.variables.1BAD", "body.params.variables.bad-too"}},
		{"bad value", `{"variables":{"N":2}}`, []string{"body.params.variables.N"}},
		{"all at once", `{"x":true,"variables":{"1":1}}`, []string{"body.params.variables.1", "body.params.variables.1", "body.params.x"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			bad := env.Validate(object(tc.params), "body.params")
			var got []string
			for _, f := range bad {
				got = append(got, f.Field)
				if f.Message == "" {
					t.Errorf("%s: empty message", f.Field)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("want %v, got %v (%+v)", tc.want, got, bad)
			}
		})
	}
}

func TestValidateFloatNumbers(t *testing.T) {
	// Params read back from jsonb hold float64, not json.Number.
	agent, _ := newKinds(t).Get("agent")
	if bad := agent.Validate(map[string]any{"max_concurrency": float64(3)}, "body.params"); len(bad) > 0 {
		t.Fatalf("3.0 is an integer: %+v", bad)
	}
	bad := agent.Validate(map[string]any{"max_concurrency": float64(1000)}, "p")
	if len(bad) != 1 || bad[0].Field != "p.max_concurrency" {
		t.Fatalf("want p.max_concurrency, got %+v", bad)
	}
}

func TestApply(t *testing.T) {
	agent, _ := newKinds(t).Get("agent")
	base := object(`{"max_concurrency":2,"labels":{"team":"core","tier":"gold"}}`)
	baseBefore := mustJSON(t, base)

	got, err := Apply(agent, base, object(`{"labels":{"tier":null,"zone":"eu"},"command_timeout_s":30}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"command_timeout_s":30,"labels":{"team":"core","zone":"eu"},"max_concurrency":2}`; mustJSON(t, got) != want {
		t.Fatalf("want %s, got %s", want, mustJSON(t, got))
	}
	if mustJSON(t, base) != baseBefore {
		t.Fatalf("Apply modified base: %s", mustJSON(t, base))
	}

	if got, err := Apply(agent, nil, nil); err != nil || got == nil || len(got) != 0 {
		t.Fatalf("nothing over nothing: want {}, got %v, %v", got, err)
	}

	_, err = Apply(agent, base, object(`{"max_concurrency":1000,"labels":{"team":1}}`))
	if platform.ErrorCode(err) != platform.EINVALID {
		t.Fatalf("want %s, got %v", platform.EINVALID, err)
	}
	var perr *platform.Error
	if !errors.As(err, &perr) {
		t.Fatalf("want a *platform.Error, got %T", err)
	}
	var fields []string
	for _, f := range perr.Fields {
		fields = append(fields, f.Field)
	}
	if want := []string{"body.params.labels.team", "body.params.max_concurrency"}; !slices.Equal(fields, want) {
		t.Fatalf("want %v, got %v", want, fields)
	}
}

func TestRegisterRefusesBadSchemas(t *testing.T) {
	cases := []struct{ name, schema string }{
		{"not JSON", `{"type": "object"`},
		{"empty", ``},
		{"wrong type of keyword", `{"type": 5}`},
		{"unknown type name", `{"type": "dictionary"}`},
		{"dangling reference", `{"$ref": "#/$defs/missing"}`},
		{"bad pattern", `{"type": "string", "pattern": "("}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var k Kinds
			err := k.Register(&Kind{Name: "broken", Schema: json.RawMessage(tc.schema)})
			if err == nil {
				t.Fatalf("schema %q: want an error", tc.schema)
			}
			if !strings.Contains(err.Error(), "broken") {
				t.Errorf("the error should name the kind: %v", err)
			}
			if _, ok := k.Get("broken"); ok {
				t.Fatalf("a kind with a bad schema was registered")
			}
		})
	}
}

func TestKinds(t *testing.T) {
	var k Kinds
	if _, ok := k.Get("agent"); ok {
		t.Fatal("an empty registry has no kinds")
	}
	for _, name := range []string{"zone", "agent", "environment"} {
		if err := k.Register(&Kind{Name: name, Schema: json.RawMessage(`{"type":"object"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	if want, got := []string{"agent", "environment", "zone"}, k.Names(); !slices.Equal(got, want) {
		t.Fatalf("names: want %v, got %v", want, got)
	}
	if kind, ok := k.Get("zone"); !ok || kind.Name != "zone" {
		t.Fatalf("Get(zone): %v %v", kind, ok)
	}
}

func TestResolutionJSON(t *testing.T) {
	res := Merge([]*Template{template("root", `{"a":1}`), template("leaf", `{"b":2}`)})
	data, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"params":{"a":1,"b":2}`, `"sources":{"a":"root","b":"leaf"}`, `"chain":[`} {
		if !bytes.Contains(data, []byte(want)) {
			t.Errorf("want %s in %s", want, data)
		}
	}
}
