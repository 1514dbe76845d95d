// Package access makes agentry's authentication and authorization
// decisions: it verifies passwords, access tokens and API keys, loads the
// principal a request acts as, and decides every action on every resource
// by DESIGN.md's order (deny overrides; owners and grants allow). The same
// order is written twice, once as Decide for one resource and once as the
// SQL of Filter for lists, and the decision table test runs every case
// through both.
package access

import (
	"slices"

	"github.com/agentry/agentry/internal/platform"
)

// Decision is the outcome of Decide, with the reason recorded in the audit
// log when it denies.
type Decision struct {
	Allowed bool
	// Reason names the rule that decided.
	Reason string
	// EntryID is the ACL entry that decided, if one did.
	EntryID string
}

// Reasons a decision gives.
const (
	ReasonKeyScope    = "outside the API key's scope"
	ReasonAllowAlways = "role always allowed"
	ReasonTenant      = "resource in another organization"
	ReasonNoOrg       = "no organization"
	ReasonDenyEntry   = "denied by ACL entry"
	ReasonOwner       = "owner"
	ReasonAllowEntry  = "allowed by ACL entry"
	ReasonPermission  = "role permission"
	ReasonNoGrant     = "no grant"
)

// Decide applies the decision order of DESIGN.md to principal p doing
// action on the resource ref of scope s; ref is nil for an action on the
// whole type (create). entries are the ACL entries of ref's organization
// for its type; Decide uses those that match.
//
//  0. an API key's scope caps everything: outside it, deny;
//  1. a role in the scope's AllowAlways list: allow;
//  2. a resource of another organization: deny (and answer 404);
//  3. a matching deny entry for p, one of its roles or its organization: deny;
//  4. p owns the resource: allow;
//  5. a matching allow entry, or a role permission Type.action: allow;
//  6. otherwise deny.
func Decide(p *platform.Principal, s platform.Scope, action string, ref *platform.ResourceRef, entries []platform.ACLEntry) Decision {
	if p.KeyID != "" && !keyAllows(p, s.Type, action) {
		return Decision{Reason: ReasonKeyScope}
	}
	for _, role := range s.AllowAlways {
		if p.HasRole(role) {
			return Decision{Allowed: true, Reason: ReasonAllowAlways}
		}
	}
	if p.OrgID == "" {
		return Decision{Reason: ReasonNoOrg}
	}
	if ref != nil && ref.OrgID != p.OrgID {
		return Decision{Reason: ReasonTenant}
	}
	subjects := p.Subjects()
	matches := func(e platform.ACLEntry, effect string) bool {
		if e.Effect != effect || e.OrgID != p.OrgID || e.ResourceType != s.Type {
			return false
		}
		if e.Action != "*" && e.Action != action {
			return false
		}
		if e.ResourceID != "" && (ref == nil || e.ResourceID != ref.ID) {
			return false
		}
		return slices.Contains(subjects, e.PrincipalID)
	}
	for _, e := range entries {
		if matches(e, platform.Deny) {
			return Decision{Reason: ReasonDenyEntry, EntryID: e.ID}
		}
	}
	if ref != nil && ref.OwnerID == p.ID {
		return Decision{Allowed: true, Reason: ReasonOwner}
	}
	for _, e := range entries {
		if matches(e, platform.Allow) {
			return Decision{Allowed: true, Reason: ReasonAllowEntry, EntryID: e.ID}
		}
	}
	if permits(p.Permissions, s.Type, action) {
		return Decision{Allowed: true, Reason: ReasonPermission}
	}
	return Decision{Reason: ReasonNoGrant}
}

// keyAllows reports whether the API key the principal authenticated with
// covers action on typ.
func keyAllows(p *platform.Principal, typ, action string) bool {
	return permits(p.KeyScope, typ, action)
}

func permits(perms []platform.Permission, typ, action string) bool {
	for _, perm := range perms {
		if perm.Grants(typ, action) {
			return true
		}
	}
	return false
}
