package platform

import "context"

// Entity kinds: every principal and every organization or role has one id in
// the entities table and one of these kinds.
const (
	KindUser         = "user"
	KindOrganization = "organization"
	KindRole         = "role"
	KindAgent        = "agent"
)

// Built-in role names. Every organization has the four organization roles;
// superadmin is the platform role.
const (
	RoleOwner      = "owner"
	RoleAdmin      = "admin"
	RoleMember     = "member"
	RoleViewer     = "viewer"
	RoleSuperadmin = "superadmin"
)

// RoleRef names a role a principal holds in its organization.
type RoleRef struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

// Principal is who a request acts as, in one organization: a user (by
// access token or API key) or an agent (by API key).
type Principal struct {
	ID    string // the user's or agent's entity id
	Kind  string // KindUser or KindAgent
	Email string // users only
	// OrgID is the organization the request acts in; "" for a user with no
	// organization yet.
	OrgID string
	// Roles are the roles the principal holds in OrgID.
	Roles []RoleRef
	// Permissions are the union of the roles' permissions (for an agent, the
	// permissions of its key).
	Permissions []Permission
	// Superadmin is the platform role; it is never granted by an API key of
	// narrower scope.
	Superadmin bool
	// KeyID is set when the request authenticated with an API key; KeyScope
	// is then that key's scope, which caps every decision.
	KeyID    string
	KeyScope []Permission
	// SessionID is the refresh-token family an access token belongs to.
	SessionID string
	// IP and UserAgent describe where the request came from, for the audit log.
	IP, UserAgent string
}

// HasRole reports whether p holds the named role: an organization role in
// p.OrgID, or the platform role superadmin.
func (p *Principal) HasRole(name string) bool {
	if name == RoleSuperadmin {
		return p.Superadmin
	}
	for _, r := range p.Roles {
		if r.Name == name {
			return true
		}
	}
	return false
}

// Holds reports whether p's own permissions cover all that q grants (a
// superadmin holds everything): what p may hand on, to a key or a role.
func (p *Principal) Holds(q Permission) bool {
	if p.Superadmin {
		return true
	}
	for _, mine := range p.Permissions {
		if mine.Covers(q) {
			return true
		}
	}
	return false
}

// IsOrgAdmin reports whether p administers its organization (owner or admin).
func (p *Principal) IsOrgAdmin() bool {
	return p.HasRole(RoleOwner) || p.HasRole(RoleAdmin)
}

// Subjects returns the ids whose ACL entries apply to p: itself, its roles
// and its organization.
func (p *Principal) Subjects() []string {
	ids := make([]string, 0, len(p.Roles)+2)
	ids = append(ids, p.ID)
	for _, r := range p.Roles {
		ids = append(ids, r.ID)
	}
	if p.OrgID != "" {
		ids = append(ids, p.OrgID)
	}
	return ids
}

type principalKey struct{}

// WithPrincipal returns ctx carrying p.
func WithPrincipal(ctx context.Context, p *Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// PrincipalFrom returns the principal ctx carries, or nil.
func PrincipalFrom(ctx context.Context) *Principal {
	p, _ := ctx.Value(principalKey{}).(*Principal)
	return p
}

// Scope is the access configuration of one resource type (the seed's
// @scope): who administers its ACLs and who is always allowed.
type Scope struct {
	// Type is the resource type as permissions name it: "Agent".
	Type string
	// ACLAdmins may edit the ACL of any resource of the type, besides its
	// owner and the organization's admins. Role names.
	ACLAdmins []string
	// AllowAlways are role names allowed every action on every resource of
	// the type, in every organization.
	AllowAlways []string
}

// Effects of an ACL entry.
const (
	Allow = "allow"
	Deny  = "deny"
)

// ACLEntry is one allow or deny rule. ResourceID "" applies to every
// resource of the type in the organization; Action "*" to every action.
type ACLEntry struct {
	ID           string `json:"id" db:"id"`
	OrgID        string `json:"org_id" db:"org_id"`
	ResourceType string `json:"resource_type" db:"resource_type"`
	ResourceID   string `json:"resource_id,omitempty" db:"resource_id"`
	Action       string `json:"action" db:"action"`
	PrincipalID  string `json:"principal_id" db:"principal_id"`
	Effect       string `json:"effect" db:"effect"`
}

// AgentScope is the access scope of agents: superadmins administer every
// ACL and are always allowed.
var AgentScope = Scope{Type: "Agent", ACLAdmins: []string{RoleSuperadmin}, AllowAlways: []string{RoleSuperadmin}}

// ResourceRef is what an access decision needs to know of a resource.
type ResourceRef struct {
	Type    string
	ID      string
	OrgID   string
	OwnerID string
}

// BuiltinRoles are the roles every organization is created with, and their
// permissions. Owners and admins may do everything in the organization
// (only owners may delete it or change owners); members use and create;
// viewers read.
var BuiltinRoles = []struct {
	Name        string
	Description string
	Permissions []string
}{
	{RoleOwner, "Owns the organization: everything, including deleting it.", []string{"*"}},
	{RoleAdmin, "Administers the organization: everything but deleting it or changing its owners.", []string{"*"}},
	{RoleMember, "Uses the platform: reads, creates and commands agents.", []string{
		"Agent.read", "Agent.create", "Agent.command", "Environment.read", "Environment.create",
		"Template.read", "Template.create", "Command.read", "Command.cancel", "Command.retry",
		"Schedule.read", "Schedule.create", "Membership.read", "Role.read", "ApiKey.create",
	}},
	{RoleViewer, "Reads agents, templates, environments, commands and schedules.", []string{
		"Agent.read", "Environment.read", "Template.read", "Command.read", "Schedule.read", "Membership.read", "Role.read",
	}},
}

// RequestInfo describes the request a context belongs to, for the audit log.
type RequestInfo struct {
	ID        string
	IP        string
	UserAgent string
}

type requestInfoKey struct{}

// WithRequestInfo returns ctx carrying info.
func WithRequestInfo(ctx context.Context, info RequestInfo) context.Context {
	return context.WithValue(ctx, requestInfoKey{}, info)
}

// RequestInfoFrom returns the request info ctx carries (zero outside a request).
func RequestInfoFrom(ctx context.Context) RequestInfo {
	info, _ := ctx.Value(requestInfoKey{}).(RequestInfo)
	return info
}

// ACLGrant is what a caller asks to add to an ACL.
type ACLGrant struct {
	PrincipalID string `json:"principal_id" format:"uuid" doc:"The user, role, organization or agent the entry applies to."`
	Action      string `json:"action" pattern:"^(\\*|[a-z][a-z0-9_]{0,63})$" doc:"One action (read, update, delete, command, …) or * for every action."`
	Effect      string `json:"effect" enum:"allow,deny" doc:"deny overrides every allow, and ownership."`
}
