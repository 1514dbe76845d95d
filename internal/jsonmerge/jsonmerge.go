// Package jsonmerge implements JSON Merge Patch (RFC 7396): an object patch
// merges key by key, a null removes a key, and anything else replaces the
// target. Templates resolve their inheritance chain with it and PATCH
// requests apply it.
package jsonmerge

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// Merge returns target with patch applied, per RFC 7396. Values are the
// shapes encoding/json decodes into any: map[string]any, []any, string,
// float64/json.Number, bool and nil. Neither argument is modified.
func Merge(target, patch any) any {
	p, ok := patch.(map[string]any)
	if !ok {
		return patch
	}
	t, ok := target.(map[string]any)
	out := make(map[string]any, len(t)+len(p))
	if ok {
		for k, v := range t {
			out[k] = v
		}
	}
	for k, v := range p {
		if v == nil {
			delete(out, k)
			continue
		}
		out[k] = Merge(out[k], v)
	}
	return out
}

// Apply applies the JSON document patch to the JSON document target and
// returns the result. A null or empty target is an empty document.
func Apply(target, patch []byte) ([]byte, error) {
	var t, p any
	if len(bytes.TrimSpace(target)) > 0 {
		if err := decode(target, &t); err != nil {
			return nil, fmt.Errorf("target: %w", err)
		}
	}
	if err := decode(patch, &p); err != nil {
		return nil, fmt.Errorf("patch: %w", err)
	}
	return json.Marshal(Merge(t, p))
}

// decode parses JSON keeping numbers exact (json.Number) so that merging
// never rounds a large integer.
func decode(data []byte, v *any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	// More would miss a stray ']' or '}': only the end of the input will do.
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("trailing data after the JSON value")
	}
	return nil
}
