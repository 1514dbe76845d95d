package access

import (
	"context"
	"encoding/json"
	"errors"
	"strings"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// Auditor records security-relevant events.
type Auditor interface {
	Record(ctx context.Context, e platform.AuditEvent)
}

// Guard is the CRUD framework's access guard: every resource route decides
// through it, and through it every denial is audited.
type Guard struct {
	DB    *sqlx.DB
	Audit Auditor
	// OnDeny, if set, is told the reason of every denial (metrics).
	OnDeny func(reason string)
}

// Caller returns the authenticated principal of the request, which must
// act in an organization.
func (g *Guard) Caller(ctx context.Context) (*platform.Principal, error) {
	p := platform.PrincipalFrom(ctx)
	switch {
	case p == nil:
		return nil, platform.Errorf(platform.EUNAUTHORIZED, "authentication required")
	case p.OrgID == "":
		// Every resource belongs to an organization: say how to name one,
		// rather than answer an empty list or a vague denial.
		return nil, platform.Errorf(platform.EFORBIDDEN, "you act in no organization: send X-Org-ID with one of yours (GET /v1/organizations), set default_org_id (PATCH /v1/users/me), or create one (POST /v1/organizations)")
	}
	return p, nil
}

// Decide decides action on ref (nil: on the type) and answers as DESIGN.md
// says: a denied read, or anything in another organization, is ENOTFOUND;
// any other denial is EFORBIDDEN. Clearing a collection is for organization
// admins (and the scope's always-allowed roles) only.
func (g *Guard) Decide(ctx context.Context, p *platform.Principal, s platform.Scope, action string, ref *platform.ResourceRef, entriesJSON []byte) error {
	var entries []platform.ACLEntry
	switch {
	case ref == nil:
		var err error
		if entries, err = g.typeEntries(ctx, p, s); err != nil {
			return err
		}
	case len(entriesJSON) > 0:
		if err := json.Unmarshal(entriesJSON, &entries); err != nil {
			return err
		}
	}
	var d Decision
	if action == "clear" {
		d = Decide(p, s, "delete", nil, entries)
		if d.Allowed && !p.IsOrgAdmin() && !alwaysAllowed(p, s) {
			d = Decision{Reason: "organization admins only"}
		}
	} else {
		d = Decide(p, s, action, ref, entries)
	}
	if d.Allowed {
		return nil
	}
	g.deny(ctx, p, s.Type, action, ref, d)
	if action == "read" || d.Reason == ReasonTenant {
		return platform.Errorf(platform.ENOTFOUND, "%s not found", strings.ToLower(s.Type))
	}
	if ref == nil {
		return platform.Errorf(platform.EFORBIDDEN, "you may not %s %s resources here", action, s.Type)
	}
	return platform.Errorf(platform.EFORBIDDEN, "you may not %s this %s", action, strings.ToLower(s.Type))
}

func alwaysAllowed(p *platform.Principal, s platform.Scope) bool {
	for _, role := range s.AllowAlways {
		if p.HasRole(role) {
			return true
		}
	}
	return false
}

// deny writes the audit row of a denied decision.
func (g *Guard) deny(ctx context.Context, p *platform.Principal, typ, action string, ref *platform.ResourceRef, d Decision) {
	if g.OnDeny != nil {
		g.OnDeny(DenialCode(d.Reason))
	}
	if g.Audit == nil {
		return
	}
	e := platform.AuditEvent{Action: typ + "." + action, ResourceType: typ, Outcome: "denied", Reason: d.Reason}
	if d.EntryID != "" {
		e.Details = platform.JSONObject{"entry_id": d.EntryID}
	}
	if ref != nil {
		e.ResourceID = &ref.ID
	}
	g.Audit.Record(ctx, e)
}

// typeEntries loads the type-wide entries that could apply to p.
func (g *Guard) typeEntries(ctx context.Context, p *platform.Principal, s platform.Scope) ([]platform.ACLEntry, error) {
	if p.OrgID == "" || alwaysAllowed(p, s) {
		return nil, nil
	}
	var out []platform.ACLEntry
	// Type-wide entries of p's organization naming p, its roles or its organization.
	err := g.DB.SelectContext(ctx, &out, `SELECT id, org_id, resource_type, '' AS resource_id, action, principal_id, effect
		FROM acl_entries WHERE org_id = $1 AND resource_type = $2 AND resource_id IS NULL AND principal_id = ANY($3::uuid[])`,
		p.OrgID, s.Type, pq.Array(p.Subjects()))
	return out, err
}

// Entries is the crud.Guard form of Entries.
func (g *Guard) Entries(p *platform.Principal, s platform.Scope, args *sqlq.Args) string {
	return Entries(p, s, args)
}

// Filter is the crud.Guard form of Filter.
func (g *Guard) Filter(p *platform.Principal, s platform.Scope, action string, args *sqlq.Args) string {
	return Filter(p, s, action, args)
}

// Forget deletes the ACL entries of a deleted resource.
func (g *Guard) Forget(ctx context.Context, tx *sqlx.Tx, ref platform.ResourceRef) error {
	_, err := tx.ExecContext(ctx, "DELETE FROM acl_entries WHERE resource_type = $1 AND resource_id = $2", ref.Type, ref.ID)
	return err
}

// AllEntries is the crud.Guard form of AllEntries.
func (g *Guard) AllEntries(s platform.Scope, args *sqlq.Args) string { return AllEntries(s, args) }

// DenialCodes are the metric labels of denial reasons.
var DenialCodes = map[string]string{
	ReasonKeyScope:             "key_scope",
	ReasonTenant:               "tenant",
	ReasonNoOrg:                "no_org",
	ReasonDenyEntry:            "deny_entry",
	ReasonNoGrant:              "no_grant",
	"organization admins only": "admins_only",
}

// DenialCode returns the metric label of a denial reason.
func DenialCode(reason string) string {
	if code, ok := DenialCodes[reason]; ok {
		return code
	}
	return "other"
}

// UserMay decides whether user, acting in ref's organization, may do action
// on ref now, as a request of theirs would be decided (membership, roles,
// permissions, ACL entries): for work a user set up to run later in their
// name, such as a schedule's fire times, which must stop when their access
// does. A user who is gone, disabled or no longer a member may not.
func UserMay(ctx context.Context, db sqlx.QueryerContext, store Store, userID string, s platform.Scope, action string, ref platform.ResourceRef) (bool, error) {
	f, err := store.Facts(ctx, userID, ref.OrgID)
	if platform.ErrorCode(err) == platform.ENOTFOUND {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	p, err := userPrincipal(f, ref.OrgID)
	if err != nil {
		var authErr *AuthError
		if errors.As(err, &authErr) {
			return false, nil
		}
		return false, err
	}
	var entries []platform.ACLEntry
	// The entries of ref's organization on ref or its whole type naming the
	// user, their roles or their organization.
	err = sqlx.SelectContext(ctx, db, &entries, `SELECT id, org_id, resource_type, COALESCE(resource_id::text, '') AS resource_id, action, principal_id, effect
		FROM acl_entries WHERE org_id = $1 AND resource_type = $2 AND (resource_id IS NULL OR resource_id = $3) AND principal_id = ANY($4::uuid[])`,
		ref.OrgID, s.Type, ref.ID, pq.Array(p.Subjects()))
	if err != nil {
		return false, err
	}
	return Decide(p, s, action, &ref, entries).Allowed, nil
}
