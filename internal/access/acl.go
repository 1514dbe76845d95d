package access

import (
	"context"
	"database/sql"
	"errors"
	"slices"
	"strings"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// ACL manages allow and deny entries. Only a resource's owner, the
// organization's admins and the scope's ACL admins may change (or list) the
// entries of a resource; only admins those of a whole type.
type ACL struct {
	DB    *sqlx.DB
	Audit *Audit
	// Changed, if set, is told of every change to an organization's
	// entries (the cache and the WebSocket gateway re-check access).
	Changed func(ctx context.Context, orgID, resourceType, resourceID string)
	// OnDeny, if set, is told of every refusal (metrics).
	OnDeny func(reason string)
}

func (a *ACL) changed(ctx context.Context, orgID, typ string, resourceID *string) {
	if a.Changed == nil {
		return
	}
	id := ""
	if resourceID != nil {
		id = *resourceID
	}
	a.Changed(ctx, orgID, typ, id)
}

// CanAdminister reports whether p may change the ACL of ref (nil: of the
// whole type) in scope s.
//
// An API key's scope caps this as it caps every decision: without
// Acl.update in its scope, a key administers no ACL, whoever holds it.
// Only the platform role (superadmin) reaches across organizations; the
// organization roles of ACLAdmins act in their own organization.
func CanAdminister(p *platform.Principal, s platform.Scope, ref *platform.ResourceRef) bool {
	if p.KeyID != "" && !keyAllows(p, "Acl", "update") {
		return false
	}
	if alwaysAllowed(p, s) || p.Superadmin && slices.Contains(s.ACLAdmins, platform.RoleSuperadmin) {
		return true
	}
	if p.OrgID == "" || ref != nil && ref.OrgID != p.OrgID {
		return false
	}
	for _, role := range s.ACLAdmins {
		if p.HasRole(role) {
			return true
		}
	}
	return p.IsOrgAdmin() || (ref != nil && ref.OwnerID == p.ID)
}

// CanAdminister is the crud.ACLManager form of CanAdminister.
func (a *ACL) CanAdminister(p *platform.Principal, s platform.Scope, ref *platform.ResourceRef) bool {
	return CanAdminister(p, s, ref)
}

func (a *ACL) check(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef, action string) error {
	if CanAdminister(p, s, ref) {
		return nil
	}
	if a.OnDeny != nil {
		a.OnDeny("not_acl_admin")
	}
	e := platform.AuditEvent{Action: "acl." + action, ResourceType: s.Type, Outcome: "denied", Reason: "not an ACL administrator"}
	if ref != nil {
		e.ResourceID = &ref.ID
	}
	a.Audit.Record(ctx, e)
	return platform.Errorf(platform.EFORBIDDEN, "only the owner, organization admins and ACL admins may change this ACL")
}

const entryColumns = "id, org_id, resource_type, COALESCE(resource_id::text, '') AS resource_id, action, principal_id, effect"

// List returns the entries of ref (nil: the type-wide entries of s.Type;
// with typ "" every entry of the organization).
func (a *ACL) List(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef) ([]platform.ACLEntry, error) {
	if err := a.check(ctx, p, s, ref, "list"); err != nil {
		return nil, err
	}
	out := []platform.ACLEntry{}
	var err error
	switch {
	case ref != nil:
		err = a.DB.SelectContext(ctx, &out, "SELECT "+entryColumns+" FROM acl_entries WHERE org_id = $1 AND resource_type = $2 AND resource_id = $3 ORDER BY created_at, id", ref.OrgID, s.Type, ref.ID)
	case s.Type == "":
		err = a.DB.SelectContext(ctx, &out, "SELECT "+entryColumns+" FROM acl_entries WHERE org_id = $1 ORDER BY created_at, id", p.OrgID)
	default:
		err = a.DB.SelectContext(ctx, &out, "SELECT "+entryColumns+" FROM acl_entries WHERE org_id = $1 AND resource_type = $2 AND resource_id IS NULL ORDER BY created_at, id", p.OrgID, s.Type)
	}
	return out, err
}

// Grant adds an entry to the ACL of ref (nil: type-wide). The principal
// must be a user, role, agent or the organization itself, of p's
// organization. Granting an entry that exists returns it.
func (a *ACL) Grant(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef, g platform.ACLGrant) (*platform.ACLEntry, error) {
	if err := a.check(ctx, p, s, ref, "grant"); err != nil {
		return nil, err
	}
	var bad []platform.FieldError
	if g.Action != "*" && !platform.IsActionName(g.Action) {
		bad = append(bad, platform.FieldError{Field: "body.action", Message: "must be an action name or *"})
	}
	if g.Effect != platform.Allow && g.Effect != platform.Deny {
		bad = append(bad, platform.FieldError{Field: "body.effect", Message: "must be allow or deny"})
	}
	if uuid.Validate(g.PrincipalID) != nil {
		bad = append(bad, platform.FieldError{Field: "body.principal_id", Message: "must be a UUID"})
	}
	if len(bad) > 0 {
		return nil, platform.Invalid("invalid ACL entry", bad...)
	}
	orgID := p.OrgID
	if ref != nil {
		orgID = ref.OrgID
	}
	var kind string
	// The kind of the principal, if it belongs to the organization.
	err := a.DB.GetContext(ctx, &kind, `SELECT e.kind FROM entities e WHERE e.id = $1 AND (
		(e.kind = 'user' AND EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = e.id AND m.org_id = $2)) OR
		(e.kind = 'role' AND EXISTS (SELECT 1 FROM roles r WHERE r.id = e.id AND r.org_id = $2)) OR
		(e.kind = 'agent' AND EXISTS (SELECT 1 FROM agents g WHERE g.id = e.id AND g.org_id = $2)) OR
		(e.kind = 'organization' AND e.id = $2))`, g.PrincipalID, orgID)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, platform.Invalid("unknown principal", platform.FieldError{Field: "body.principal_id", Message: "no user, role or agent of this organization has this id"})
	}
	if err != nil {
		return nil, err
	}
	var resourceID *string
	if ref != nil {
		resourceID = &ref.ID
	}
	e := &platform.ACLEntry{}
	// Inserts the entry, or returns the identical one that exists. An
	// identical entry inserted at the same moment is waited for, but not
	// seen by this statement's snapshot: the second try sees it.
	for try := 0; try < 2; try++ {
		err = a.grantOnce(ctx, e, orgID, s.Type, resourceID, g, p.ID)
		if !errors.Is(err, sql.ErrNoRows) {
			break
		}
	}
	if err != nil {
		return nil, sqlq.MapError(err, "acl entry not found")
	}
	a.Audit.Record(ctx, platform.AuditEvent{Action: "acl.grant", ResourceType: s.Type, ResourceID: resourceID, Outcome: "ok",
		Details: platform.JSONObject{"entry_id": e.ID, "principal_id": g.PrincipalID, "principal_kind": kind, "action": g.Action, "effect": g.Effect}})
	a.changed(ctx, orgID, s.Type, resourceID)
	return e, nil
}

// grantOnce inserts an entry, or reads the identical one that exists.
func (a *ACL) grantOnce(ctx context.Context, e *platform.ACLEntry, orgID, typ string, resourceID *string, g platform.ACLGrant, by string) error {
	return a.DB.GetContext(ctx, e, `WITH ins AS (
			INSERT INTO acl_entries (id, org_id, resource_type, resource_id, action, principal_id, effect, created_by)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
			ON CONFLICT (org_id, resource_type, resource_id, action, principal_id, effect) DO NOTHING
			RETURNING `+entryColumns+`)
		SELECT * FROM ins UNION ALL
		SELECT `+entryColumns+` FROM acl_entries WHERE org_id = $2 AND resource_type = $3 AND resource_id IS NOT DISTINCT FROM $4
			AND action = $5 AND principal_id = $6 AND effect = $7 LIMIT 1`,
		uuid.NewString(), orgID, typ, resourceID, g.Action, g.PrincipalID, g.Effect, by)
}

// Revoke deletes entry entryID of ref's ACL (nil: of the type-wide ACL).
func (a *ACL) Revoke(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef, entryID string) error {
	if err := a.check(ctx, p, s, ref, "revoke"); err != nil {
		return err
	}
	var res sql.Result
	var err error
	if ref != nil {
		res, err = a.DB.ExecContext(ctx, "DELETE FROM acl_entries WHERE id = $1 AND org_id = $2 AND resource_type = $3 AND resource_id = $4", entryID, ref.OrgID, s.Type, ref.ID)
	} else {
		res, err = a.DB.ExecContext(ctx, "DELETE FROM acl_entries WHERE id = $1 AND org_id = $2 AND resource_type = $3 AND resource_id IS NULL", entryID, p.OrgID, s.Type)
	}
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return platform.Errorf(platform.ENOTFOUND, "acl entry not found")
	}
	var resourceID *string
	if ref != nil {
		resourceID = &ref.ID
	}
	a.Audit.Record(ctx, platform.AuditEvent{Action: "acl.revoke", ResourceType: s.Type, ResourceID: resourceID, Outcome: "ok", Details: platform.JSONObject{"entry_id": entryID}})
	org := p.OrgID
	if ref != nil {
		org = ref.OrgID
	}
	a.changed(ctx, org, s.Type, resourceID)
	return nil
}

// ScopeName normalises a type name given by a client ("agent" → "Agent").
func ScopeName(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
