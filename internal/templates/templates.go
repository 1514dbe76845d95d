// Package templates is agentry's templated resources (the seed's
// TemplatedResource): templates of a kind that inherit from a parent of the
// same kind, resolved root-first with JSON merge patch, validated against
// the kind's JSON Schema, and instantiated into resources (agents,
// environments, and any kind a forking team registers).
package templates

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v6"
	errkind "github.com/santhosh-tekuri/jsonschema/v6/kind"
	"golang.org/x/text/language"
	"golang.org/x/text/message"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/jsonmerge"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// MaxDepth is the longest inheritance chain, the template itself included.
const MaxDepth = 16

// Template is a named set of parameters of a kind.
type Template struct {
	crud.Base
	Kind        string              `db:"kind" json:"kind" doc:"What the template makes: agent, environment, or a registered kind."`
	Name        string              `db:"name" json:"name"`
	Description string              `db:"description" json:"description"`
	ParentID    *string             `db:"parent_id" json:"parent_id,omitempty" format:"uuid" doc:"The template this one inherits from (same kind)."`
	Params      platform.JSONObject `db:"params" json:"params" doc:"This template's own parameters; resolving merges the chain root-first."`
}

// TemplateInput is what a client sets of a template.
type TemplateInput struct {
	Kind        string              `json:"kind" minLength:"1" maxLength:"64" pattern:"^[a-z][a-z0-9_]*$" doc:"Cannot change after creation."`
	Name        string              `json:"name" minLength:"1" maxLength:"100"`
	Description string              `json:"description,omitempty" maxLength:"1000"`
	ParentID    *string             `json:"parent_id,omitempty" format:"uuid"`
	Params      platform.JSONObject `json:"params,omitempty"`
}

// Kind is a kind of templated resource: its parameter schema and how to
// make one.
type Kind struct {
	Name string
	// Schema is the JSON Schema of the kind's resolved parameters.
	Schema json.RawMessage
	// Instantiate creates a resource of the kind from a template (the
	// seed's clone_from_template). Nil: templates of the kind cannot be
	// instantiated, only resolved.
	Instantiate func(ctx context.Context, req InstantiateRequest) (any, error)

	compiled *jsonschema.Schema
}

// InstantiateRequest asks for a resource made from a template.
type InstantiateRequest struct {
	TemplateID string
	// Fields are the resource's own fields (name, description, …).
	Fields map[string]any
	// Overrides are merged over the resolved template, last.
	Overrides platform.JSONObject
}

// Kinds is the registry of kinds.
type Kinds struct {
	mu    sync.RWMutex
	kinds map[string]*Kind
}

// Register adds a kind; its schema must compile.
func (k *Kinds) Register(kind *Kind) error {
	c := jsonschema.NewCompiler()
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(string(kind.Schema)))
	if err != nil {
		return fmt.Errorf("kind %s: schema: %w", kind.Name, err)
	}
	url := "agentry:/kinds/" + kind.Name + ".json"
	if err := c.AddResource(url, doc); err != nil {
		return fmt.Errorf("kind %s: schema: %w", kind.Name, err)
	}
	if kind.compiled, err = c.Compile(url); err != nil {
		return fmt.Errorf("kind %s: schema: %w", kind.Name, err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.kinds == nil {
		k.kinds = map[string]*Kind{}
	}
	k.kinds[kind.Name] = kind
	return nil
}

// Get returns a registered kind.
func (k *Kinds) Get(name string) (*Kind, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	kind, ok := k.kinds[name]
	return kind, ok
}

// Names returns the registered kinds, sorted.
func (k *Kinds) Names() []string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	out := make([]string, 0, len(k.kinds))
	for name := range k.kinds {
		out = append(out, name)
	}
	sort.Strings(out)
	return out
}

var printer = message.NewPrinter(language.English)

// Validate checks resolved params against the kind's schema and returns
// every failing path, as fields under prefix ("body.params").
func (kind *Kind) Validate(params map[string]any, prefix string) []platform.FieldError {
	// The validator wants the shapes encoding/json produces.
	data, err := json.Marshal(params)
	if err != nil {
		return []platform.FieldError{{Field: prefix, Message: err.Error()}}
	}
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(string(data)))
	if err != nil {
		return []platform.FieldError{{Field: prefix, Message: err.Error()}}
	}
	err = kind.compiled.Validate(doc)
	if err == nil {
		return nil
	}
	ve, ok := err.(*jsonschema.ValidationError)
	if !ok {
		return []platform.FieldError{{Field: prefix, Message: err.Error()}}
	}
	var out []platform.FieldError
	var walk func(e *jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		field := prefix
		for _, part := range e.InstanceLocation {
			field += "." + part
		}
		// Errors about properties are located at their object: name the
		// property at fault instead.
		switch k := e.ErrorKind.(type) {
		case *errkind.AdditionalProperties:
			for _, name := range k.Properties {
				out = append(out, platform.FieldError{Field: field + "." + name, Message: "not allowed"})
			}
			return
		case *errkind.PropertyNames:
			// The causes judge the name as an instance of its own, located at "".
			out = append(out, platform.FieldError{Field: field + "." + k.Property, Message: "invalid name: " + leafMessages(e)})
			return
		}
		if len(e.Causes) == 0 {
			out = append(out, platform.FieldError{Field: field, Message: e.ErrorKind.LocalizedString(printer)})
			return
		}
		for _, c := range e.Causes {
			walk(c)
		}
	}
	walk(ve)
	slices.SortFunc(out, func(a, b platform.FieldError) int {
		return cmp.Or(strings.Compare(a.Field, b.Field), strings.Compare(a.Message, b.Message))
	})
	return out
}

// leafMessages joins the messages of the innermost causes of e.
func leafMessages(e *jsonschema.ValidationError) string {
	if len(e.Causes) == 0 {
		return e.ErrorKind.LocalizedString(printer)
	}
	msgs := make([]string, len(e.Causes))
	for i, c := range e.Causes {
		msgs[i] = leafMessages(c)
	}
	return strings.Join(msgs, "; ")
}

// Resolution is a template's chain merged.
type Resolution struct {
	// Chain lists the templates root first; the last is the one resolved.
	Chain []*Template `json:"chain"`
	// Params is the chain's params merged root-first.
	Params platform.JSONObject `json:"params"`
	// Sources names, for each top-level key of Params, the template whose
	// params last set it.
	Sources map[string]string `json:"sources"`
}

// Merge resolves a chain given root first.
func Merge(chain []*Template) *Resolution {
	res := &Resolution{Chain: chain, Params: platform.JSONObject{}, Sources: map[string]string{}}
	var merged any = map[string]any{}
	for _, t := range chain {
		merged = jsonmerge.Merge(merged, map[string]any(t.Params))
		for key, v := range t.Params {
			if v == nil {
				delete(res.Sources, key)
			} else {
				res.Sources[key] = t.ID
			}
		}
	}
	res.Params = platform.JSONObject(merged.(map[string]any))
	return res
}

// Service resolves and checks templates with the caller's access.
type Service struct {
	Handle *crud.Handle[Template]
	Kinds  *Kinds
}

type resolutionKey struct{}

// WithResolution returns ctx carrying a resolution the caller already made
// (and checked access for), so that Resolve of the same template in the
// same request does not read the chain again.
func WithResolution(ctx context.Context, r *Resolution) context.Context {
	return context.WithValue(ctx, resolutionKey{}, r)
}

// Resolve loads the chain of template id, every template of which the
// caller must be able to read (else ENOTFOUND), and merges it. One query
// reads the whole chain.
func (s *Service) Resolve(ctx context.Context, id string) (*Resolution, error) {
	if r, ok := ctx.Value(resolutionKey{}).(*Resolution); ok && len(r.Chain) > 0 && r.Chain[len(r.Chain)-1].ID == id {
		return r, nil
	}
	rows, _, err := s.Handle.Query(ctx, crud.ActionRead, func(cols, entries string, args *sqlq.Args) string {
		// Walks from the template up its parents, at most MaxDepth+1 deep (to see a chain too long).
		return `WITH RECURSIVE chain AS (
				SELECT tp.*, 1 AS depth FROM templates tp WHERE tp.id = ` + args.Add(id) + `
				UNION ALL
				SELECT p.*, c.depth + 1 FROM templates p JOIN chain c ON p.id = c.parent_id WHERE c.depth <= ` + fmt.Sprint(MaxDepth) + `
			) SELECT ` + cols + `, ` + entries + ` FROM chain t ORDER BY t.depth DESC`
	})
	if err != nil {
		return nil, err
	}
	if len(rows) == 0 {
		return nil, platform.Errorf(platform.ENOTFOUND, "template not found")
	}
	if len(rows) > MaxDepth {
		return nil, platform.Errorf(platform.ECONFLICT, "the template's chain is deeper than %d", MaxDepth)
	}
	return Merge(rows), nil
}

// Instantiate resolves the template, merges the overrides last and
// validates the result against the kind's schema. It returns the kind and
// the resolved params.
func (s *Service) Instantiate(ctx context.Context, templateID string, overrides platform.JSONObject, wantKind string) (*Kind, *Resolution, platform.JSONObject, error) {
	res, err := s.Resolve(ctx, templateID)
	if err != nil {
		return nil, nil, nil, err
	}
	t := res.Chain[len(res.Chain)-1]
	if wantKind != "" && t.Kind != wantKind {
		return nil, nil, nil, platform.Invalid("wrong template kind", platform.FieldError{Field: "body.template_id", Message: fmt.Sprintf("the template is of kind %q, not %q", t.Kind, wantKind)})
	}
	kind, ok := s.Kinds.Get(t.Kind)
	if !ok {
		return nil, nil, nil, platform.Errorf(platform.ECONFLICT, "templates of kind %q cannot be instantiated here", t.Kind)
	}
	params, err := Apply(kind, res.Params, overrides)
	return kind, res, params, err
}

// Apply merges overrides over base and validates the result.
func Apply(kind *Kind, base, overrides platform.JSONObject) (platform.JSONObject, error) {
	merged := jsonmerge.Merge(map[string]any(base), map[string]any(overrides)).(map[string]any)
	if bad := kind.Validate(merged, "body.params"); len(bad) > 0 {
		return nil, platform.Invalid("the resolved parameters do not fit the "+kind.Name+" schema", bad...)
	}
	return platform.JSONObject(merged), nil
}

// Diff reports what changed between two resolved param sets, key by key.
type Diff struct {
	Added   map[string]any    `json:"added" nullable:"false"`
	Removed map[string]any    `json:"removed" nullable:"false"`
	Changed map[string][2]any `json:"changed" nullable:"false" doc:"Each changed key: [before, after]."`
}

// Compare returns the top-level differences from before to after.
func Compare(before, after map[string]any) Diff {
	d := Diff{Added: map[string]any{}, Removed: map[string]any{}, Changed: map[string][2]any{}}
	for k, v := range after {
		old, ok := before[k]
		switch {
		case !ok:
			d.Added[k] = v
		case !reflect.DeepEqual(normal(old), normal(v)):
			d.Changed[k] = [2]any{old, v}
		}
	}
	for k, v := range before {
		if _, ok := after[k]; !ok {
			d.Removed[k] = v
		}
	}
	return d
}

// Empty reports whether nothing changed.
func (d Diff) Empty() bool { return len(d.Added)+len(d.Removed)+len(d.Changed) == 0 }

// normal makes values decoded in different ways comparable.
func normal(v any) any {
	data, _ := json.Marshal(v)
	var out any
	_ = json.Unmarshal(data, &out)
	return out
}
