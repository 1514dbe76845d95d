package httpapi

import (
	"encoding/json"
	"testing"
)

// FuzzJSONDepth: for any body that is JSON, jsonDepth is how deeply it
// nests, so a document within MaxJSONDepth is never refused.
func FuzzJSONDepth(f *testing.F) {
	for _, s := range []string{`{}`, `[[[]]]`, `{"a":"[[[{"}`, `{"a":"\"[["}`, `[{"b":[1,{"c":"\\"}]}]`, `"]]]"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var v any
		if json.Unmarshal(data, &v) != nil {
			jsonDepth(data) // any bytes: no panic
			return
		}
		if got, want := jsonDepth(data), depthOf(v); got != want {
			t.Fatalf("jsonDepth(%q) = %d, want %d", data, got, want)
		}
	})
}

func depthOf(v any) int {
	deepest := 0
	switch x := v.(type) {
	case map[string]any:
		for _, e := range x {
			deepest = max(deepest, depthOf(e))
		}
		return deepest + 1
	case []any:
		for _, e := range x {
			deepest = max(deepest, depthOf(e))
		}
		return deepest + 1
	}
	return 0
}
