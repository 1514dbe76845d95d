package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
	"github.com/agentry/agentry/internal/templates"
)

// Scopes of the platform's resource types (the seed's @scope): superadmins
// administer every ACL and are always allowed.
var (
	AgentScope       = platform.AgentScope
	TemplateScope    = platform.Scope{Type: "Template", ACLAdmins: []string{platform.RoleSuperadmin}, AllowAlways: []string{platform.RoleSuperadmin}}
	EnvironmentScope = platform.Scope{Type: "Environment", ACLAdmins: []string{platform.RoleSuperadmin}, AllowAlways: []string{platform.RoleSuperadmin}}
)

// AgentSchema is the parameter schema of agents: what a template of kind
// agent and an agent's config may hold.
const AgentSchema = `{
	"type": "object",
	"properties": {
		"max_concurrency": {"type": "integer", "minimum": 1, "maximum": 100, "description": "Commands the agent runs at once (default 1)."},
		"allowed_tasks": {"type": "array", "items": {"type": "string"}, "description": "Tasks the agent accepts; all when absent."},
		"labels": {"type": "object", "additionalProperties": {"type": "string"}},
		"command_timeout_s": {"type": "integer", "minimum": 1, "maximum": 86400, "description": "Default timeout of its commands."}
	}
}`

// EnvironmentSchema is the parameter schema of environments.
const EnvironmentSchema = `{
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

// AgentInput is what a client sets of an agent.
type AgentInput struct {
	Name          string              `json:"name" minLength:"1" maxLength:"100"`
	Description   string              `json:"description,omitempty" maxLength:"1000"`
	EnvironmentID *string             `json:"environment_id,omitempty" format:"uuid"`
	TemplateID    *string             `json:"template_id,omitempty" format:"uuid" doc:"Make the agent from this template (kind agent); its params merge over the template's."`
	Params        platform.JSONObject `json:"params,omitempty" crud:"overrides" doc:"The agent's own parameters (its overrides)."`
}

// EnvironmentInput is what a client sets of an environment.
type EnvironmentInput struct {
	Name        string              `json:"name" minLength:"1" maxLength:"100"`
	Description string              `json:"description,omitempty" maxLength:"1000"`
	TemplateID  *string             `json:"template_id,omitempty" format:"uuid" doc:"Make the environment from this template (kind environment)."`
	Params      platform.JSONObject `json:"params,omitempty" crud:"overrides" doc:"{\"variables\": {NAME: value}}, merged over the template's."`
	Secrets     map[string]string   `json:"secrets,omitempty" crud:"-" maxProperties:"200" doc:"Write-only: set or replace secrets by name. They are stored encrypted and never shown again: a read shows *** for each, and *** written back keeps the secret as it is. Delete one with DELETE …/secrets/{name}."`
}

var secretName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,127}$`)

// secretShown is what a read shows for each secret.
const secretShown = "***"

// Resources are the handles of the templated resource types.
type Resources struct {
	Commands     *crud.Handle[platform.Command]
	Templates    *crud.Handle[templates.Template]
	Agents       *crud.Handle[platform.Agent]
	Environments *crud.Handle[platform.Environment]
	Service      *templates.Service
}

func (s *Server) resourceRoutes(d Deps) *Resources {
	kinds := d.Kinds
	res := &Resources{}
	svc := &templates.Service{Kinds: kinds}
	res.Service = svc
	staleOnDetach(d.Registry)

	// Templates.
	checkParent := func(ctx context.Context, tx *sqlx.Tx, t *templates.Template) error {
		if t.ParentID == nil {
			return nil
		}
		parent, _, err := res.Templates.Get(ctx, *t.ParentID, crud.ActionRead)
		if platform.ErrorCode(err) == platform.ENOTFOUND {
			return platform.Invalid("unknown parent", platform.FieldError{Field: "body.parent_id", Message: "no template you can read has this id"})
		}
		if err != nil {
			return err
		}
		if parent.Kind != t.Kind {
			return platform.Invalid("parent of another kind", platform.FieldError{Field: "body.parent_id", Message: fmt.Sprintf("the parent is of kind %q; a template inherits only from its own kind", parent.Kind)})
		}
		return sqlq.MapError(checkChain(ctx, tx, t.ID, *t.ParentID), "template not found")
	}
	res.Templates = crud.Register(d.Registry, crud.Resource[templates.Template, templates.TemplateInput]{
		Scope: TemplateScope, Path: "/v1/templates", Table: "templates", Tag: "Templates",
		Ops: crud.AllOps, Cached: true,
		Description: "Templates hold parameters of a kind (agent, environment, …) and may inherit from a parent of the same kind: resolving merges the chain root-first with JSON merge patch. Editing a template never changes resources already made from it; resync them on request.",
		Sort:        []string{"name", "kind"},
		Filters:     []crud.Filter{{Param: "kind", Column: "kind"}, {Param: "parent_id", Column: "parent_id"}, {Param: "name", Column: "name"}},
		Validate: func(_ context.Context, in *templates.TemplateInput) []platform.FieldError {
			if _, ok := kinds.Get(in.Kind); !ok {
				return []platform.FieldError{{Field: "kind", Message: "unknown kind; one of " + strings.Join(kinds.Names(), ", ")}}
			}
			if in.Params == nil {
				in.Params = platform.JSONObject{}
			}
			return nil
		},
		BeforeCreate: func(ctx context.Context, tx *sqlx.Tx, in *templates.TemplateInput, t *templates.Template) error {
			return checkParent(ctx, tx, t)
		},
		BeforeUpdate: func(ctx context.Context, tx *sqlx.Tx, in *templates.TemplateInput, old, t *templates.Template) error {
			if t.Kind != old.Kind {
				return platform.Invalid("a template's kind cannot change", platform.FieldError{Field: "body.kind", Message: "was " + old.Kind})
			}
			if !equalPtr(t.ParentID, old.ParentID) {
				return checkParent(ctx, tx, t)
			}
			return nil
		},
		BeforeDelete: func(ctx context.Context, tx *sqlx.Tx, t *templates.Template) error {
			if err := lockReferences(ctx, tx, "templates", t.ID); err != nil {
				return err
			}
			var n int
			if err := tx.GetContext(ctx, &n, "SELECT count(*) FROM templates WHERE parent_id = $1", t.ID); err != nil {
				return err
			}
			if n > 0 {
				return platform.Errorf(platform.ECONFLICT, "%d templates inherit from this one; delete or re-parent them first", n)
			}
			if err := detach(ctx, tx, "agents", "template_id", t.ID); err != nil {
				return err
			}
			return detach(ctx, tx, "environments", "template_id", t.ID)
		},
	})
	svc.Handle = res.Templates

	type resolvedOutput struct {
		Body *templates.Resolution
	}
	huma.Register(s.API, s.op(http.MethodGet, "/v1/templates/{id}/resolved", "resolve-template", "Templates", "Resolve a template",
		"The template's chain merged root-first, and which template supplied each top-level key. Needs read access on every template of the chain (404 otherwise).",
		http.StatusOK, true, http.StatusNotFound),
		func(ctx context.Context, in *struct {
			ID string `path:"id" format:"uuid"`
		}) (*resolvedOutput, error) {
			r, err := svc.Resolve(ctx, in.ID)
			if err != nil {
				return nil, err
			}
			return &resolvedOutput{Body: r}, nil
		})

	type instantiateInput struct {
		ID      string `path:"id" format:"uuid"`
		RawBody []byte
	}
	type instantiatedOutput struct {
		Location string `header:"Location"`
		Body     any
	}
	op := s.op(http.MethodPost, "/v1/templates/{id}/instantiate", "instantiate-template", "Templates", "Make a resource from a template",
		"Creates a resource of the template's kind (the seed's clone_from_template): the body is the kind's create body (an agent's, an environment's) without template_id; its params merge over the resolved template, last. Needs read access on the whole chain (404 otherwise) and create permission on the kind.",
		http.StatusCreated, true, http.StatusNotFound, http.StatusForbidden, http.StatusConflict)
	op.RequestBody = &huma.RequestBody{Required: true, Content: map[string]*huma.MediaType{"application/json": {Schema: &huma.Schema{Type: "object", Description: "The create body of the template's kind, without template_id."}}}}
	huma.Register(s.API, op, func(ctx context.Context, in *instantiateInput) (*instantiatedOutput, error) {
		// The whole chain must be readable: 404 otherwise, like resolve.
		resolution, err := svc.Resolve(ctx, in.ID)
		if err != nil {
			return nil, err
		}
		t := resolution.Chain[len(resolution.Chain)-1]
		kind, ok := kinds.Get(t.Kind)
		if !ok || kind.Instantiate == nil {
			return nil, platform.Errorf(platform.ECONFLICT, "templates of kind %q cannot be instantiated", t.Kind)
		}
		var body map[string]any
		dec := json.NewDecoder(bytes.NewReader(in.RawBody))
		dec.UseNumber()
		if err := dec.Decode(&body); err != nil || body == nil {
			return nil, platform.Invalid("the body must be a JSON object", platform.FieldError{Field: "body", Message: "expected a JSON object"})
		}
		if _, has := body["template_id"]; has {
			return nil, platform.Invalid("the template is in the path", platform.FieldError{Field: "body.template_id", Message: "unexpected property"})
		}
		var overrides map[string]any
		if raw, has := body["params"]; has && raw != nil {
			var ok bool
			if overrides, ok = raw.(map[string]any); !ok {
				return nil, platform.Invalid("params must be an object", platform.FieldError{Field: "body.params", Message: "expected a JSON object"})
			}
		}
		delete(body, "params")
		ctx = templates.WithResolution(ctx, resolution) // resolved once for the request
		created, err := kind.Instantiate(ctx, templates.InstantiateRequest{TemplateID: t.ID, Fields: body, Overrides: overrides})
		if err != nil {
			return nil, err
		}
		out := &instantiatedOutput{Body: created}
		if b, ok := created.(interface{ Meta() *platform.Base }); ok {
			out.Location = "/v1/" + t.Kind + "s/" + b.Meta().ID
		}
		return out, nil
	})

	// Environments.
	sealer := d.Sealer
	// seal seals the secrets of in into e. The placeholder a read shows
	// (***) keeps a secret as it is, so that what was read can be written
	// back without overwriting every secret with it.
	seal := func(e *platform.Environment, in map[string]string) error {
		var bad []platform.FieldError
		for name, value := range in {
			_, exists := e.Secrets[name]
			switch {
			case !secretName.MatchString(name):
				bad = append(bad, platform.FieldError{Field: "body.secrets." + name, Message: "names are letters, digits and underscores, not starting with a digit"})
			case len(value) > 65536:
				bad = append(bad, platform.FieldError{Field: "body.secrets." + name, Message: "at most 64 KiB"})
			case value == secretShown && !exists:
				bad = append(bad, platform.FieldError{Field: "body.secrets." + name, Message: secretShown + " keeps a secret's current value, and there is no secret " + name})
			}
		}
		if len(bad) > 0 {
			return platform.Invalid("invalid secrets", bad...)
		}
		if e.Secrets == nil {
			e.Secrets = platform.JSONObject{}
		}
		for name, value := range in {
			if value != secretShown {
				e.Secrets[name] = sealer.Seal(e.ID, name, value)
			}
		}
		return nil
	}
	envKind := "environment"
	configureEnv := func(ctx context.Context, e *platform.Environment) error {
		kind, _ := kinds.Get(envKind)
		if e.Overrides == nil {
			e.Overrides = platform.JSONObject{}
		}
		if e.TemplateID == nil {
			params, err := templates.Apply(kind, nil, e.Overrides)
			e.Params = params
			return err
		}
		_, _, params, err := svc.Instantiate(ctx, *e.TemplateID, e.Overrides, envKind)
		if platform.ErrorCode(err) == platform.ENOTFOUND {
			return platform.Invalid("unknown template", platform.FieldError{Field: "body.template_id", Message: "no template you can read has this id"})
		}
		e.Params = params
		return err
	}
	res.Environments = crud.Register(d.Registry, crud.Resource[platform.Environment, EnvironmentInput]{
		Scope: EnvironmentScope, Path: "/v1/environments", Table: "environments", Tag: "Environments",
		Ops: crud.AllOps, Cached: true,
		Description: "Environments are named variables and write-only secrets; the commands of agents using one see them. Secrets are encrypted at rest and always shown as ***.",
		Sort:        []string{"name"},
		Filters:     []crud.Filter{{Param: "name", Column: "name"}, {Param: "template_id", Column: "template_id"}},
		View: func(_ context.Context, e *platform.Environment) {
			shown := platform.JSONObject{}
			for name := range e.Secrets {
				shown[name] = secretShown
			}
			e.Secrets = shown
		},
		BeforeCreate: func(ctx context.Context, tx *sqlx.Tx, in *EnvironmentInput, e *platform.Environment) error {
			if err := configureEnv(ctx, e); err != nil {
				return err
			}
			return seal(e, in.Secrets)
		},
		BeforeDelete: func(ctx context.Context, tx *sqlx.Tx, e *platform.Environment) error {
			if err := lockReferences(ctx, tx, "environments", e.ID); err != nil {
				return err
			}
			return detach(ctx, tx, "agents", "environment_id", e.ID)
		},
		BeforeUpdate: func(ctx context.Context, tx *sqlx.Tx, in *EnvironmentInput, old, e *platform.Environment) error {
			if !equalPtr(e.TemplateID, old.TemplateID) || !jsonEqual(e.Overrides, old.Overrides) {
				if err := configureEnv(ctx, e); err != nil {
					return err
				}
			}
			e.Secrets = platform.JSONObject{}
			for k, v := range old.Secrets {
				e.Secrets[k] = v
			}
			return seal(e, in.Secrets)
		},
	})
	type secretInput struct {
		ID   string `path:"id" format:"uuid"`
		Name string `path:"name" maxLength:"128"`
	}
	huma.Register(s.API, s.op(http.MethodDelete, "/v1/environments/{id}/secrets/{name}", "delete-environment-secret", "Environments", "Delete a secret",
		"Removes one secret of the environment. Needs Environment.update.", http.StatusNoContent, true, http.StatusNotFound, http.StatusForbidden),
		func(ctx context.Context, in *secretInput) (*struct{}, error) {
			tx, err := d.DB.BeginTxx(ctx, nil)
			if err != nil {
				return nil, err
			}
			defer tx.Rollback()
			e, _, err := res.Environments.GetForUpdate(ctx, tx, in.ID, crud.ActionUpdate)
			if err != nil {
				return nil, err
			}
			if _, ok := e.Secrets[in.Name]; !ok {
				return nil, platform.Errorf(platform.ENOTFOUND, "the environment has no secret %q", in.Name)
			}
			delete(e.Secrets, in.Name)
			if err := tx.QueryRowxContext(ctx, "UPDATE environments SET secrets = $2, version = version + 1, updated_at = now() WHERE id = $1 RETURNING version, updated_at", e.ID, e.Secrets).Scan(&e.Version, &e.UpdatedAt); err != nil {
				return nil, err
			}
			if err := tx.Commit(); err != nil {
				return nil, err
			}
			res.Environments.Notify(ctx, crud.OpUpdate, e)
			return nil, nil
		})

	// Agents.
	agentKind := "agent"
	configureAgent := func(ctx context.Context, a *platform.Agent) error {
		kind, _ := kinds.Get(agentKind)
		if a.Overrides == nil {
			a.Overrides = platform.JSONObject{}
		}
		if a.TemplateID == nil {
			params, err := templates.Apply(kind, nil, a.Overrides)
			a.Config = params
			return err
		}
		_, _, params, err := svc.Instantiate(ctx, *a.TemplateID, a.Overrides, agentKind)
		if platform.ErrorCode(err) == platform.ENOTFOUND {
			return platform.Invalid("unknown template", platform.FieldError{Field: "body.template_id", Message: "no template you can read has this id"})
		}
		a.Config = params
		return err
	}
	checkEnv := func(ctx context.Context, a *platform.Agent) error {
		if a.EnvironmentID == nil {
			return nil
		}
		e, _, err := res.Environments.Get(ctx, *a.EnvironmentID, crud.ActionRead)
		if platform.ErrorCode(err) == platform.ENOTFOUND {
			return platform.Invalid("unknown environment", platform.FieldError{Field: "body.environment_id", Message: "no environment you can read has this id"})
		}
		if err == nil && e.OrgID != a.OrgID {
			return platform.Invalid("unknown environment", platform.FieldError{Field: "body.environment_id", Message: "no environment you can read has this id"})
		}
		return err
	}
	res.Agents = crud.Register(d.Registry, crud.Resource[platform.Agent, AgentInput]{
		Scope: AgentScope, Path: "/v1/agents", Table: "agents", Tag: "Agents",
		Ops: crud.AllOps, Cached: true, State: true, // status: busy, idle, error as it runs commands
		Description: "Agents run commands. Make one from scratch, or from a template (template_id; its params merge over the template's). An agent can hold API keys. Its status is the platform's to set.",
		Sort:        []string{"name", "status"},
		Filters:     []crud.Filter{{Param: "status", Column: "status"}, {Param: "name", Column: "name"}, {Param: "environment_id", Column: "environment_id"}, {Param: "template_id", Column: "template_id"}, {Param: "owner_id", Column: "owner_id"}},
		BeforeCreate: func(ctx context.Context, tx *sqlx.Tx, in *AgentInput, a *platform.Agent) error {
			if err := checkEnv(ctx, a); err != nil {
				return err
			}
			if err := configureAgent(ctx, a); err != nil {
				return err
			}
			return d.Identity.NewEntity(ctx, tx, a.ID, platform.KindAgent)
		},
		BeforeUpdate: func(ctx context.Context, tx *sqlx.Tx, in *AgentInput, old, a *platform.Agent) error {
			if !equalPtr(a.EnvironmentID, old.EnvironmentID) {
				if err := checkEnv(ctx, a); err != nil {
					return err
				}
			}
			if !equalPtr(a.TemplateID, old.TemplateID) || !jsonEqual(a.Overrides, old.Overrides) {
				return configureAgent(ctx, a)
			}
			return nil
		},
		AfterWrite: func(ctx context.Context, tx *sqlx.Tx, op crud.Op, a *platform.Agent) error {
			if op == crud.OpDelete {
				return d.Identity.DeleteEntity(ctx, tx, a.ID)
			}
			return nil
		},
	})

	// Kinds instantiate through the resources' own create.
	instantiate := func(h interface {
		Create(context.Context, []byte) (any, error)
	}) func(context.Context, templates.InstantiateRequest) (any, error) {
		return func(ctx context.Context, req templates.InstantiateRequest) (any, error) {
			body := map[string]any{}
			for k, v := range req.Fields {
				body[k] = v
			}
			body["template_id"] = req.TemplateID
			if req.Overrides != nil {
				body["params"] = map[string]any(req.Overrides)
			}
			data, err := json.Marshal(body)
			if err != nil {
				return nil, err
			}
			return h.Create(ctx, data)
		}
	}
	mustRegister(kinds, &templates.Kind{Name: agentKind, Schema: json.RawMessage(AgentSchema), Instantiate: instantiate(anyCreator[platform.Agent]{res.Agents})})
	mustRegister(kinds, &templates.Kind{Name: envKind, Schema: json.RawMessage(EnvironmentSchema), Instantiate: instantiate(anyCreator[platform.Environment]{res.Environments})})

	registerResync(s, d.DB, "agents", "agent", res.Agents, func(a *platform.Agent) (*string, platform.JSONObject, *platform.JSONObject) {
		return a.TemplateID, a.Overrides, &a.Config
	}, "config", svc)
	registerResync(s, d.DB, "environments", "environment", res.Environments, func(e *platform.Environment) (*string, platform.JSONObject, *platform.JSONObject) {
		return e.TemplateID, e.Overrides, &e.Params
	}, "params", svc)
	return res
}

func mustRegister(kinds *templates.Kinds, k *templates.Kind) {
	if err := kinds.Register(k); err != nil {
		panic(err)
	}
}

// anyCreator adapts a typed handle's Create to return any.
type anyCreator[T any] struct{ h *crud.Handle[T] }

func (c anyCreator[T]) Create(ctx context.Context, body []byte) (any, error) {
	row, err := c.h.Create(ctx, body)
	if err != nil {
		return nil, err
	}
	return c.h.Render(ctx, row), nil
}

type resyncOutput[T any] struct {
	Body struct {
		Changed  bool           `json:"changed" doc:"Whether the resolved parameters changed."`
		Diff     templates.Diff `json:"diff"`
		Resource *T             `json:"resource"`
	}
}

// registerResync adds POST /v1/{plural}/{id}/resync: re-resolve a
// resource from its template chain and its own overrides, and report what
// changed. fields returns the resource's template, overrides and resolved
// params (stored in column).
func registerResync[T any](s *Server, db *sqlx.DB, plural, kind string, h *crud.Handle[T], fields func(*T) (*string, platform.JSONObject, *platform.JSONObject), column string, svc *templates.Service) {
	table := plural
	huma.Register(s.API, s.op(http.MethodPost, "/v1/"+plural+"/{id}/resync", "resync-"+kind, strings.ToUpper(plural[:1])+plural[1:], "Resync from the template",
		"Re-resolves the "+kind+" from its template chain as it is now, with its own overrides merged last, and reports what changed. Needs update on the "+kind+" and read on the whole chain.",
		http.StatusOK, true, http.StatusNotFound, http.StatusForbidden, http.StatusConflict),
		func(ctx context.Context, in *struct {
			ID string `path:"id" format:"uuid"`
		}) (*resyncOutput[T], error) {
			tx, err := db.BeginTxx(ctx, nil)
			if err != nil {
				return nil, err
			}
			defer tx.Rollback()
			row, _, err := h.GetForUpdate(ctx, tx, in.ID, crud.ActionUpdate)
			if err != nil {
				return nil, err
			}
			templateID, overrides, params := fields(row)
			if templateID == nil {
				return nil, platform.Errorf(platform.ECONFLICT, "this %s was not made from a template", kind)
			}
			_, _, resolved, err := svc.Instantiate(ctx, *templateID, overrides, kind)
			if err != nil {
				return nil, err
			}
			out := &resyncOutput[T]{}
			out.Body.Diff = templates.Compare(*params, resolved)
			out.Body.Changed = !out.Body.Diff.Empty()
			if out.Body.Changed {
				*params = resolved
				b := any(row).(interface{ Meta() *platform.Base }).Meta()
				// Stores the re-resolved parameters; returns the new version.
				q := "UPDATE " + sqlq.Ident(table) + " SET " + sqlq.Ident(column) + " = $2, version = version + 1, updated_at = now() WHERE id = $1 RETURNING version, updated_at"
				if err := tx.QueryRowxContext(ctx, q, b.ID, resolved).Scan(&b.Version, &b.UpdatedAt); err != nil {
					return nil, err
				}
			}
			if err := tx.Commit(); err != nil {
				return nil, err
			}
			if out.Body.Changed {
				h.Notify(ctx, crud.OpUpdate, row)
			}
			out.Body.Resource = h.Render(ctx, row)
			return out, nil
		})
}

func equalPtr(a, b *string) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && *a == *b)
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

// checkChain refuses a parent that would make a cycle or a chain deeper
// than templates.MaxDepth. It holds an organization-wide lock until the
// transaction ends, so two concurrent re-parentings cannot close a cycle.
func checkChain(ctx context.Context, tx *sqlx.Tx, id, parentID string) error {
	if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock(hashtext('agentry:templates:' || (SELECT org_id::text FROM templates WHERE id = $1)))", parentID); err != nil {
		return err
	}
	var up []string
	// The parent's ancestors, nearest first.
	if err := tx.SelectContext(ctx, &up, `WITH RECURSIVE up AS (
			SELECT id, parent_id, 1 AS depth FROM templates WHERE id = $1
			UNION ALL SELECT t.id, t.parent_id, u.depth + 1 FROM templates t JOIN up u ON t.id = u.parent_id WHERE u.depth <= $2
		) SELECT id FROM up ORDER BY depth`, parentID, templates.MaxDepth*2); err != nil {
		return err
	}
	for i, anc := range up {
		if anc == id {
			cycle := append([]string{id}, up[:i+1]...)
			return platform.Errorf(platform.ECONFLICT, "parent_id would make a cycle: %s", strings.Join(cycle, " → "))
		}
	}
	var below int
	// How many generations inherit from the template.
	if err := tx.GetContext(ctx, &below, `WITH RECURSIVE down AS (
			SELECT id, 0 AS depth FROM templates WHERE id = $1
			UNION ALL SELECT t.id, d.depth + 1 FROM templates t JOIN down d ON t.parent_id = d.id WHERE d.depth < $2
		) SELECT COALESCE(max(depth), 0) FROM down`, id, templates.MaxDepth*2); err != nil {
		return err
	}
	if depth := len(up) + 1 + below; depth > templates.MaxDepth {
		return platform.Errorf(platform.ECONFLICT, "the chain would be %d templates deep; at most %d", depth, templates.MaxDepth)
	}
	return nil
}

// lockReferences locks the row id of table being deleted against new
// references, in its transaction, and waits for those being made (their
// foreign key checks hold the row): what follows then sees every row that
// refers to it. (The delete's own lock lets references be made until its
// DELETE statement, and the foreign key then cleared them silently.)
func lockReferences(ctx context.Context, tx *sqlx.Tx, table, id string) error {
	_, err := tx.ExecContext(ctx, "SELECT 1 FROM "+sqlq.Ident(table)+" WHERE id = $1 FOR UPDATE", id)
	return err
}

// detach clears column in the rows of table that refer to the resource
// being deleted, in its transaction, as a change of theirs: a new version,
// so that their ETags change. (The foreign key would clear it too, but
// silently.) staleOnDetach makes their cached copies stale once the delete
// commits.
func detach(ctx context.Context, tx *sqlx.Tx, table, column, id string) error {
	_, err := tx.ExecContext(ctx, "UPDATE "+table+" SET "+column+" = NULL, version = version + 1, updated_at = now() WHERE "+column+" = $1", id)
	return err
}

// staleOnDetach makes the cached agents and environments of an
// organization stale when one of its templates or environments is deleted
// (see detach): deletes are rare, and which rows referred to it is no
// longer known once it committed.
func staleOnDetach(reg *crud.Registry) {
	reg.Observe(func(ctx context.Context, c crud.Change) {
		if c.Op != crud.OpDelete || reg.Cache == nil || c.Ref.OrgID == "" {
			return
		}
		switch c.Scope.Type {
		case TemplateScope.Type:
			_ = reg.Cache.Bump(ctx, crud.TypeDep(c.Ref.OrgID, AgentScope.Type), crud.TypeDep(c.Ref.OrgID, EnvironmentScope.Type))
		case EnvironmentScope.Type:
			_ = reg.Cache.Bump(ctx, crud.TypeDep(c.Ref.OrgID, AgentScope.Type))
		}
	})
}
