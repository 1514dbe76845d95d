package helm_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// TestReadmeDocumentsEveryValue checks that README.md has a row for every
// value values.schema.json knows, and that the schema knows every value in
// values.yaml (the default render validates values.yaml against it).
func TestReadmeDocumentsEveryValue(t *testing.T) {
	data, err := os.ReadFile("values.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var schema jsonSchema
	if err := json.Unmarshal(data, &schema); err != nil {
		t.Fatalf("values.schema.json: %v", err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	schema.leaves("", &paths)
	if len(paths) < 50 {
		t.Fatalf("found %d values in values.schema.json, expected many more", len(paths))
	}
	for _, path := range paths {
		if path == "global" {
			continue // a parent chart's, not ours
		}
		if !strings.Contains(string(readme), "| `"+path+"` |") {
			t.Errorf("README.md has no row for value %s", path)
		}
	}
}

type jsonSchema struct {
	Properties map[string]jsonSchema `json:"properties"`
}

// leaves appends the dotted paths of the values that have no sub-values.
func (s jsonSchema) leaves(prefix string, out *[]string) {
	for name, sub := range s.Properties {
		if len(sub.Properties) == 0 {
			*out = append(*out, prefix+name)
		} else {
			sub.leaves(prefix+name+".", out)
		}
	}
}
