package httpapi

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
)

// Keys is what the API key routes need of the identity store.
type Keys interface {
	CreateKey(ctx context.Context, k *platform.APIKey) error
	RevokeKey(ctx context.Context, tx *sqlx.Tx, id string) (*time.Time, error)
	ACLEntry(ctx context.Context, orgID, id string) (*platform.ACLEntry, error)
	ListAudit(ctx context.Context, f platform.AuditFilter) ([]platform.AuditEvent, int64, error)
}

type createKeyInput struct {
	Body struct {
		Name        string     `json:"name" minLength:"1" maxLength:"100"`
		Permissions []string   `json:"permissions,omitempty" minItems:"1" maxItems:"200" doc:"The key's scope, each no wider than the caller's own permissions; the caller's permissions when absent, for the caller's own key (an agent's key must list them; an empty list is refused: such a key could do nothing)."`
		AgentID     string     `json:"agent_id,omitempty" format:"uuid" doc:"Make the key authenticate as this agent (needs Agent.update on it) instead of as the caller."`
		ExpiresAt   *time.Time `json:"expires_at,omitempty" doc:"When the key stops working; never when absent."`
	}
}

type createdKeyOutput struct {
	CacheControl string `header:"Cache-Control"`
	Body         struct {
		Key    string           `json:"key" doc:"The secret key. It is shown only now: store it safely."`
		APIKey *platform.APIKey `json:"api_key"`
	}
}

type keyIDInput struct {
	ID string `path:"id" format:"uuid"`
}

type keyOutput struct {
	Body *platform.APIKey
}

// AgentLoader loads an agent the caller may do action on, as an API key's
// owner entity.
type AgentLoader func(ctx context.Context, id, action string) (*platform.ResourceRef, error)

func (s *Server) keyRoutes(d Deps, agents AgentLoader) {
	scope := platform.Scope{Type: "ApiKey"}
	keys := crud.Register(d.Registry, crud.Resource[platform.APIKey, struct{}]{
		Scope: scope, Path: "/v1/api-keys", Table: "api_keys", Tag: "API keys",
		Ops:         crud.OpRead | crud.OpList,
		Description: "API keys authenticate automation as a user, or as an agent, in one organization. Only the key's prefix is ever shown after creation.",
		Sort:        []string{"name"},
		Filters:     []crud.Filter{{Param: "entity_id", Column: "entity_id"}},
	})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/api-keys", "create-api-key", "API keys", "Create an API key",
		"Creates a key for the caller (or for an agent) in the organization the request acts in. The secret is in the answer and never shown again. Keys cannot create keys.",
		http.StatusCreated, true, http.StatusForbidden, http.StatusNotFound),
		func(ctx context.Context, in *createKeyInput) (*createdKeyOutput, error) {
			p := caller(ctx)
			if p.KeyID != "" || p.Kind != platform.KindUser {
				return nil, platform.Errorf(platform.EFORBIDDEN, "API keys cannot create API keys; log in")
			}
			if err := d.Guard.Decide(ctx, p, scope, "create", nil, nil); err != nil {
				return nil, err
			}
			if in.Body.AgentID != "" && in.Body.Permissions == nil {
				// An agent's key acts as the agent, not as its creator: it gets
				// what it is given, not the creator's every power.
				return nil, platform.Invalid("an agent's key needs its permissions", platform.FieldError{Field: "body.permissions", Message: "list what the agent may do, such as [\"Agent.read\", \"Command.read\"]"})
			}
			perms, err := keyScope(p, in.Body.Permissions, func(typ string) bool { return knownType(d, typ) })
			if err != nil {
				return nil, err
			}
			if in.Body.ExpiresAt != nil && !in.Body.ExpiresAt.After(time.Now()) {
				return nil, platform.Invalid("the key would be expired", platform.FieldError{Field: "body.expires_at", Message: "must be in the future"})
			}
			entity := p.ID
			if in.Body.AgentID != "" {
				ref, err := agents(ctx, in.Body.AgentID, "update")
				if err != nil {
					return nil, err
				}
				entity = ref.ID
			}
			secret, prefix, hash := access.NewAPIKey()
			k := &platform.APIKey{
				Base:        platform.Base{ID: uuid.NewString(), OrgID: p.OrgID, OwnerID: p.ID},
				EntityID:    entity,
				Name:        strings.TrimSpace(in.Body.Name),
				Prefix:      prefix,
				SecretHash:  hash,
				Permissions: perms,
				ExpiresAt:   in.Body.ExpiresAt,
			}
			if err := d.Keys.CreateKey(ctx, k); err != nil {
				return nil, err
			}
			d.Audit.Record(ctx, platform.AuditEvent{Action: "api_key.create", ResourceType: "ApiKey", ResourceID: &k.ID, Outcome: "ok",
				Details: platform.JSONObject{"prefix": prefix, "entity_id": entity, "permissions": []string(perms)}})
			out := &createdKeyOutput{CacheControl: "no-store"}
			out.Body.Key, out.Body.APIKey = secret, k
			return out, nil
		})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/api-keys/{id}/revoke", "revoke-api-key", "API keys", "Revoke an API key",
		"The key stops working at once on every replica. Its owner and organization admins may revoke it.",
		http.StatusOK, true, http.StatusForbidden, http.StatusNotFound),
		func(ctx context.Context, in *keyIDInput) (*keyOutput, error) {
			tx, err := d.DB.BeginTxx(ctx, nil)
			if err != nil {
				return nil, err
			}
			defer tx.Rollback()
			k, _, err := keys.GetForUpdate(ctx, tx, in.ID, "delete")
			if err != nil {
				return nil, err
			}
			if k.RevokedAt, err = d.Keys.RevokeKey(ctx, tx, k.ID); err != nil {
				return nil, err
			}
			if err := tx.Commit(); err != nil {
				return nil, err
			}
			d.Accounts.InvalidateKey(ctx, k.Prefix)
			d.Audit.Record(ctx, platform.AuditEvent{Action: "api_key.revoke", ResourceType: "ApiKey", ResourceID: &k.ID, Outcome: "ok", Details: platform.JSONObject{"prefix": k.Prefix}})
			return &keyOutput{Body: k}, nil
		})
}

// keyScope checks a requested scope against the creator's permissions.
func keyScope(p *platform.Principal, requested []string, known func(typ string) bool) (platform.JSONList, error) {
	if requested == nil { // absent; an empty list fails the schema (minItems)
		out := platform.JSONList{}
		for _, perm := range p.Permissions {
			out = append(out, perm.String())
		}
		if p.Superadmin && len(out) == 0 {
			out = append(out, "*")
		}
		return out, nil
	}
	var bad []platform.FieldError
	out := platform.JSONList{}
	for i, text := range requested {
		perm, err := platform.ParsePermission(text)
		if err != nil {
			bad = append(bad, platform.FieldError{Field: "body.permissions[" + strconv.Itoa(i) + "]", Message: err.Error()})
			continue
		}
		if !known(perm.Type) {
			bad = append(bad, platform.FieldError{Field: "body.permissions[" + strconv.Itoa(i) + "]", Message: unknownType(perm)})
			continue
		}
		if !p.Holds(perm) {
			bad = append(bad, platform.FieldError{Field: "body.permissions[" + strconv.Itoa(i) + "]", Message: "wider than your own permissions"})
			continue
		}
		out = append(out, perm.String())
	}
	if len(bad) > 0 {
		return nil, platform.Invalid("invalid key scope", bad...)
	}
	return out, nil
}

type aclTypeInput struct {
	ResourceType string `query:"resource_type" maxLength:"64" doc:"Only entries for this resource type (Agent, Template, …)."`
}

type aclGrantTypeInput struct {
	Body struct {
		ResourceType string `json:"resource_type" minLength:"1" maxLength:"64" doc:"The resource type the entry covers entirely: Agent, Template, …"`
		platform.ACLGrant
	}
}

type aclEntriesOutput struct {
	Body struct {
		Items []platform.ACLEntry `json:"items" nullable:"false"`
	}
}

type aclEntryIDInput struct {
	EntryID string `path:"entry_id" format:"uuid"`
}

type aclOneOutput struct {
	Body *platform.ACLEntry
}

func (s *Server) aclRoutes(d Deps) {
	scopeOf := func(typ, field string) (platform.Scope, error) {
		sc, ok := d.Registry.Scope(access.ScopeName(typ))
		if !ok {
			return sc, platform.Invalid("unknown resource type", platform.FieldError{Field: field, Message: "not a resource type of this platform"})
		}
		return sc, nil
	}
	const who = " Organization admins and the type's ACL admins only."
	huma.Register(s.API, s.op(http.MethodGet, "/v1/acl", "list-type-acl", "Access control", "List type-wide ACL entries",
		"Entries that apply to every resource of a type (or, without resource_type, every entry of the organization)."+who,
		http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *aclTypeInput) (*aclEntriesOutput, error) {
			sc := platform.Scope{}
			if in.ResourceType != "" {
				var err error
				if sc, err = scopeOf(in.ResourceType, "query.resource_type"); err != nil {
					return nil, err
				}
			}
			entries, err := d.ACL.List(ctx, caller(ctx), sc, nil)
			if err != nil {
				return nil, err
			}
			out := &aclEntriesOutput{}
			out.Body.Items = entries
			return out, nil
		})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/acl", "grant-type-acl", "Access control", "Grant on a whole type",
		"Adds an allow or deny entry covering every resource of a type in the organization."+who,
		http.StatusCreated, true, http.StatusForbidden),
		func(ctx context.Context, in *aclGrantTypeInput) (*aclOneOutput, error) {
			sc, err := scopeOf(in.Body.ResourceType, "body.resource_type")
			if err != nil {
				return nil, err
			}
			e, err := d.ACL.Grant(ctx, caller(ctx), sc, nil, in.Body.ACLGrant)
			if err != nil {
				return nil, err
			}
			return &aclOneOutput{Body: e}, nil
		})
	huma.Register(s.API, s.op(http.MethodDelete, "/v1/acl/{entry_id}", "revoke-type-acl", "Access control", "Revoke a type-wide entry",
		"Deletes a type-wide entry. Entries of one resource are revoked under that resource's /acl."+who,
		http.StatusNoContent, true, http.StatusForbidden, http.StatusNotFound),
		func(ctx context.Context, in *aclEntryIDInput) (*struct{}, error) {
			p := caller(ctx)
			e, err := d.Keys.ACLEntry(ctx, p.OrgID, in.EntryID)
			if err != nil {
				return nil, err
			}
			if e.ResourceID != "" {
				return nil, platform.Errorf(platform.ENOTFOUND, "no type-wide entry has this id; revoke it under its resource")
			}
			sc, err := scopeOf(e.ResourceType, "path.entry_id")
			if err != nil {
				return nil, err
			}
			return nil, d.ACL.Revoke(ctx, p, sc, nil, e.ID)
		})
}

type auditInput struct {
	Page     int       `query:"page" minimum:"1" maximum:"100000" default:"1"`
	PageSize int       `query:"page_size" minimum:"1" maximum:"100" default:"50"`
	Action   string    `query:"action" maxLength:"100" doc:"Only this action (login, acl.grant, Agent.read, …)."`
	Outcome  string    `query:"outcome" enum:"ok,denied,failed" doc:"Only this outcome."`
	ActorID  string    `query:"actor_id" format:"uuid" doc:"Only this actor."`
	Since    time.Time `query:"since" doc:"Only events at or after this time (RFC 3339)."`
	Until    time.Time `query:"until" doc:"Only events before this time (RFC 3339)."`
}

type auditOutput struct {
	Body struct {
		Items    []platform.AuditEvent `json:"items" nullable:"false"`
		Page     int                   `json:"page"`
		PageSize int                   `json:"page_size"`
		Total    int64                 `json:"total"`
	}
}

func (s *Server) auditRoutes(d Deps) {
	huma.Register(s.API, s.op(http.MethodGet, "/v1/audit", "list-audit", "Access control", "Audit log",
		"Every denied decision and every change to identities, roles, keys and ACLs in the organization: who, what, when, from where. Newest first. Organization admins only.",
		http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *auditInput) (*auditOutput, error) {
			p := caller(ctx)
			if !p.IsOrgAdmin() && !p.Superadmin || !keyAllows(p, "Audit", "read") {
				d.Audit.Record(ctx, platform.AuditEvent{Action: "audit.read", Outcome: "denied", Reason: "organization admins only"})
				return nil, platform.Errorf(platform.EFORBIDDEN, "organization admins only")
			}
			f := platform.AuditFilter{OrgID: p.OrgID, Action: in.Action, Outcome: in.Outcome, ActorID: in.ActorID, Limit: in.PageSize, Offset: (in.Page - 1) * in.PageSize}
			if !in.Since.IsZero() {
				f.Since = &in.Since
			}
			if !in.Until.IsZero() {
				f.Until = &in.Until
			}
			events, total, err := d.Keys.ListAudit(ctx, f)
			if err != nil {
				return nil, err
			}
			out := &auditOutput{}
			out.Body.Items, out.Body.Page, out.Body.PageSize, out.Body.Total = events, in.Page, in.PageSize, total
			return out, nil
		})
}

// permissionTypes are the types permissions name besides the registered
// resources: what the platform checks on routes of its own.
var permissionTypes = []string{"Acl", "Audit", "Notification", "Organization"}

// knownType reports whether a permission may name typ: "*", a registered
// resource type, or one of permissionTypes. A misspelt type would make a
// role or key that silently grants nothing.
func knownType(d Deps, typ string) bool {
	if typ == "*" || slices.Contains(permissionTypes, typ) {
		return true
	}
	for _, s := range d.Registry.Scopes() {
		if s.Type == typ {
			return true
		}
	}
	return false
}

// unknownType says that perm names no type the platform knows.
func unknownType(perm platform.Permission) string {
	return fmt.Sprintf("%s: no resource type %q (see the types of /docs, such as Agent)", perm, perm.Type)
}
