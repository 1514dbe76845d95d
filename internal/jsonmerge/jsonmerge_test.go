package jsonmerge

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
)

// rfc7396 are the examples of RFC 7396, Appendix A.
var rfc7396 = []struct {
	name                  string
	target, patch, result string
}{
	{"replace a member", `{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`},
	{"add a member", `{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`},
	{"null removes the only member", `{"a":"b"}`, `{"a":null}`, `{}`},
	{"null removes one member", `{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`},
	{"string replaces array", `{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`},
	{"array replaces string", `{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`},
	{"nested merge and removal", `{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`},
	{"arrays are replaced, not merged", `{"a":[{"b":"c"}]}`, `{"a":[1]}`, `{"a":[1]}`},
	{"array replaces array", `["a","b"]`, `["c","d"]`, `["c","d"]`},
	{"array replaces object", `{"a":"b"}`, `["c"]`, `["c"]`},
	{"null patch replaces the document", `{"a":"foo"}`, `null`, `null`},
	{"string patch replaces the document", `{"a":"foo"}`, `"bar"`, `"bar"`},
	{"null in the target is kept", `{"e":null}`, `{"a":1}`, `{"e":null,"a":1}`},
	{"object patch replaces array, dropping its nulls", `[1,2]`, `{"a":"b","c":null}`, `{"a":"b"}`},
	{"nested null in a new member is dropped", `{}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
}

func TestApplyRFC7396(t *testing.T) {
	for _, tc := range rfc7396 {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Apply([]byte(tc.target), []byte(tc.patch))
			if err != nil {
				t.Fatalf("Apply(%s, %s): %v", tc.target, tc.patch, err)
			}
			if !jsonEqual(t, got, []byte(tc.result)) {
				t.Fatalf("Apply(%s, %s):\nwant %s\n got %s", tc.target, tc.patch, tc.result, got)
			}
		})
	}
}

func TestMergeRFC7396(t *testing.T) {
	for _, tc := range rfc7396 {
		t.Run(tc.name, func(t *testing.T) {
			got := Merge(mustDecode(t, tc.target), mustDecode(t, tc.patch))
			if want := mustDecode(t, tc.result); !reflect.DeepEqual(got, want) {
				t.Fatalf("Merge(%s, %s):\nwant %#v\n got %#v", tc.target, tc.patch, want, got)
			}
		})
	}
}

func TestApplyEmptyTarget(t *testing.T) {
	for _, target := range []string{"", "  \n", "null"} {
		got, err := Apply([]byte(target), []byte(`{"a":{"b":null,"c":1}}`))
		if err != nil {
			t.Fatalf("target %q: %v", target, err)
		}
		if want := `{"a":{"c":1}}`; string(got) != want {
			t.Fatalf("target %q: want %s, got %s", target, want, got)
		}
	}
}

func TestApplyAllowsSurroundingWhitespace(t *testing.T) {
	got, err := Apply([]byte(" {\"a\":1}\n"), []byte("\t{\"b\":2} \r\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"a":1,"b":2}`; string(got) != want {
		t.Fatalf("want %s, got %s", want, got)
	}
}

func TestApplyKeepsLargeIntegers(t *testing.T) {
	got, err := Apply([]byte(`{"id":9007199254740993,"n":1}`), []byte(`{"n":12345678901234567890}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"id":9007199254740993,"n":12345678901234567890}`; string(got) != want {
		t.Fatalf("want %s, got %s", want, got)
	}
}

func TestApplyRefusesMalformedJSON(t *testing.T) {
	cases := []struct{ name, target, patch string }{
		{"malformed patch", `{}`, `{"a":`},
		{"empty patch", `{}`, ``},
		{"second value after the patch", `{}`, `{"a":1} {"b":2}`},
		{"number after the patch", `{}`, `{"a":1} 2`},
		{"closing bracket after the patch", `{}`, `{"a":1}]`},
		{"closing brace after the patch", `{}`, `{"a":1}}`},
		{"closing bracket after a string patch", `{}`, `"x"]`},
		{"malformed target", `{"a"`, `{}`},
		{"closing bracket after the target", `{"b":2}]`, `{}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Apply([]byte(tc.target), []byte(tc.patch))
			if err == nil {
				t.Fatalf("Apply(%q, %q): want an error, got %s", tc.target, tc.patch, got)
			}
		})
	}
}

func TestMergeDoesNotModifyItsArguments(t *testing.T) {
	const target = `{"a":{"b":"c","d":{"e":1}},"f":[1,2],"g":"h","n":null}`
	const patch = `{"a":{"b":null,"d":{"e":2,"x":null},"y":{"z":null}},"f":[3],"g":null,"new":{"k":null}}`
	tgt, p := mustDecode(t, target), mustDecode(t, patch)
	out := Merge(tgt, p)
	if !reflect.DeepEqual(tgt, mustDecode(t, target)) {
		t.Fatalf("target modified: want %s, got %#v", target, tgt)
	}
	if !reflect.DeepEqual(p, mustDecode(t, patch)) {
		t.Fatalf("patch modified: want %s, got %#v", patch, p)
	}
	want := mustDecode(t, `{"a":{"d":{"e":2},"y":{}},"f":[3],"n":null,"new":{}}`)
	if !reflect.DeepEqual(out, want) {
		t.Fatalf("want %#v, got %#v", want, out)
	}
	// Changing the result leaves the arguments alone too, where the
	// result's maps are new ones.
	out.(map[string]any)["a"].(map[string]any)["d"].(map[string]any)["e"] = "changed"
	if !reflect.DeepEqual(tgt, mustDecode(t, target)) || !reflect.DeepEqual(p, mustDecode(t, patch)) {
		t.Fatalf("changing the result changed an argument: target %#v, patch %#v", tgt, p)
	}
}

// FuzzApply checks that Apply never panics, that a merge patch is
// idempotent (applying it twice equals applying it once), and that a patch
// object with no nulls leaves each of its keys, at every depth, in the
// result.
func FuzzApply(f *testing.F) {
	for _, tc := range rfc7396 {
		f.Add([]byte(tc.target), []byte(tc.patch))
	}
	f.Add([]byte(``), []byte(`{"a":{"b":{"c":[1,{"d":null}]}}}`))
	f.Add([]byte(`{"a":1e400,"b":-0}`), []byte(`{"a":{"x":"\u0000"},"b":null}`))
	f.Add([]byte(`{"a":{"a":{"a":{}}}}`), []byte(`{"a":{"a":{"a":{"a":1}}}}`))
	f.Add([]byte(`{"<&>":"\ud800"}`), []byte(`{"<&>":{"\u2028":true}}`))
	f.Add([]byte(`{"a":1,"a":2}`), []byte(`{"a":null,"a":3}`))
	f.Fuzz(func(t *testing.T, target, patch []byte) {
		once, err := Apply(target, patch)
		if err != nil {
			return
		}
		twice, err := Apply(once, patch)
		if err != nil {
			t.Fatalf("Apply(Apply(t, p), p) failed: %v\nt = %s\np = %s\nApply(t, p) = %s", err, target, patch, once)
		}
		if !bytes.Equal(once, twice) {
			t.Fatalf("not idempotent:\nt = %s\np = %s\nonce  %s\ntwice %s", target, patch, once, twice)
		}
		p, ok := decodeFuzz(patch).(map[string]any)
		if !ok || hasNull(p) {
			return
		}
		result, ok := decodeFuzz(once).(map[string]any)
		if !ok {
			t.Fatalf("an object patch gave a non-object: %s", once)
		}
		if path, ok := holdsKeys(result, p, ""); !ok {
			t.Fatalf("key %s of the patch is missing:\nt = %s\np = %s\nresult %s", path, target, patch, once)
		}
	})
}

// holdsKeys reports whether doc has every key of patch, and of each object
// in patch, at the same place; if not, it returns the first missing path.
func holdsKeys(doc, patch map[string]any, at string) (string, bool) {
	for k, v := range patch {
		got, ok := doc[k]
		if !ok {
			return at + "/" + k, false
		}
		if sub, isObject := v.(map[string]any); isObject {
			gotObject, ok := got.(map[string]any)
			if !ok {
				return at + "/" + k, false
			}
			if path, ok := holdsKeys(gotObject, sub, at+"/"+k); !ok {
				return path, false
			}
		}
	}
	return "", true
}

// hasNull reports whether v holds a null at any depth.
func hasNull(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case map[string]any:
		for _, e := range x {
			if hasNull(e) {
				return true
			}
		}
	case []any:
		for _, e := range x {
			if hasNull(e) {
				return true
			}
		}
	}
	return false
}

func decodeFuzz(data []byte) any {
	var v any
	_ = decode(data, &v)
	return v
}

func mustDecode(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := decode([]byte(s), &v); err != nil {
		t.Fatalf("decode %s: %v", s, err)
	}
	return v
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	return reflect.DeepEqual(mustDecodeJSON(t, a), mustDecodeJSON(t, b))
}

func mustDecodeJSON(t *testing.T, data []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("not JSON: %s: %v", data, err)
	}
	return v
}
