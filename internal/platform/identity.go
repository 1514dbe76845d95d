package platform

import "time"

// User is a person who logs in. PasswordHash never leaves the server.
type User struct {
	ID           string    `db:"id" json:"id" format:"uuid"`
	Email        string    `db:"email" json:"email" format:"email"`
	Name         string    `db:"name" json:"name"`
	PasswordHash string    `db:"password_hash" json:"-"`
	IsSuperadmin bool      `db:"is_superadmin" json:"is_superadmin"`
	Disabled     bool      `db:"disabled" json:"disabled"`
	TokenVersion int64     `db:"token_version" json:"-"`
	DefaultOrgID *string   `db:"default_org_id" json:"default_org_id,omitempty" format:"uuid"`
	CreatedAt    time.Time `db:"created_at" json:"created_at"`
	UpdatedAt    time.Time `db:"updated_at" json:"updated_at"`
	Version      int64     `db:"version" json:"version"`
}

// Organization is a tenant. Its org_id is its own id.
type Organization struct {
	ID             string    `db:"id" json:"id" format:"uuid"`
	OrgID          string    `db:"org_id" json:"-"`
	OwnerID        string    `db:"owner_id" json:"owner_id" format:"uuid"`
	Name           string    `db:"name" json:"name"`
	OrgMaxInFlight *int      `db:"org_max_in_flight" json:"org_max_in_flight,omitempty" doc:"Commands this organization may have in flight; the platform default when absent."`
	CreatedAt      time.Time `db:"created_at" json:"created_at"`
	UpdatedAt      time.Time `db:"updated_at" json:"updated_at"`
	Version        int64     `db:"version" json:"version"`
}

// Membership puts a user in an organization with one role.
type Membership struct {
	OrgID    string `db:"org_id" json:"org_id"`
	UserID   string `db:"user_id" json:"user_id"`
	RoleID   string `db:"role_id" json:"role_id"`
	RoleName string `db:"role_name" json:"role"`
}

// PrincipalFacts is what authentication loads about a user in one
// organization, cached briefly by the authenticator.
type PrincipalFacts struct {
	User        User
	Member      bool
	Roles       []RoleRef
	Permissions []Permission
}

// APIKey is a credential for automation, bound to one organization and to
// a user or an agent. The secret is shown once, when created; only its hash
// is stored.
type APIKey struct {
	Base
	EntityID    string     `db:"entity_id" json:"entity_id" format:"uuid" doc:"The user or agent the key authenticates as."`
	Name        string     `db:"name" json:"name"`
	Prefix      string     `db:"prefix" json:"prefix" doc:"The key's public prefix; the secret part is never shown again."`
	SecretHash  []byte     `db:"secret_hash" json:"-"`
	Permissions JSONList   `db:"permissions" json:"permissions" doc:"The key's scope: permissions no wider than its creator's."`
	ExpiresAt   *time.Time `db:"expires_at" json:"expires_at,omitempty"`
	LastUsedAt  *time.Time `db:"last_used_at" json:"last_used_at,omitempty"`
	RevokedAt   *time.Time `db:"revoked_at" json:"revoked_at,omitempty"`
}

// AuditEvent is one row of the audit log.
type AuditEvent struct {
	ID           int64      `db:"id" json:"id"`
	OrgID        *string    `db:"org_id" json:"org_id,omitempty"`
	ActorID      *string    `db:"actor_id" json:"actor_id,omitempty"`
	ActorKind    string     `db:"actor_kind" json:"actor_kind,omitempty"`
	Action       string     `db:"action" json:"action" doc:"What happened: login, acl.grant, Agent.read, …"`
	ResourceType string     `db:"resource_type" json:"resource_type,omitempty"`
	ResourceID   *string    `db:"resource_id" json:"resource_id,omitempty"`
	Outcome      string     `db:"outcome" json:"outcome" enum:"ok,denied,failed"`
	Reason       string     `db:"reason" json:"reason,omitempty"`
	IP           string     `db:"ip" json:"ip,omitempty"`
	UserAgent    string     `db:"user_agent" json:"user_agent,omitempty"`
	RequestID    string     `db:"request_id" json:"request_id,omitempty"`
	Details      JSONObject `db:"details" json:"details,omitempty"`
	CreatedAt    time.Time  `db:"created_at" json:"created_at"`
}

// Session is a stored refresh token; a family is one login session.
type Session struct {
	ID        string     `db:"id"`
	FamilyID  string     `db:"family_id"`
	UserID    string     `db:"user_id"`
	ExpiresAt time.Time  `db:"expires_at"`
	RotatedAt *time.Time `db:"rotated_at"`
	RevokedAt *time.Time `db:"revoked_at"`
}

// AuditFilter selects audit events of one organization.
type AuditFilter struct {
	OrgID, Action, Outcome, ActorID string
	Since, Until                    *time.Time
	Limit, Offset                   int
}
