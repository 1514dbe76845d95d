package httpapi

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/crud"
	"github.com/agentry/agentry/internal/platform"
)

// Identity is what the identity routes need of the identity store.
type Identity interface {
	UserByID(ctx context.Context, id string) (*platform.User, error)
	UserByEmail(ctx context.Context, email string) (*platform.User, error)
	UpdateUser(ctx context.Context, userID string, name *string, defaultOrg *string) (*platform.User, error)
	SetUserFlags(ctx context.Context, userID string, disabled, superadmin *bool) (*platform.User, error)
	ListUsers(ctx context.Context, email string, limit, offset int) ([]platform.User, int64, error)
	Memberships(ctx context.Context, userID string) ([]platform.Membership, error)
	OrganizationsOf(ctx context.Context, userID string) ([]platform.Organization, error)
	Organization(ctx context.Context, id string) (*platform.Organization, error)
	CreateOrganization(ctx context.Context, userID, name string) (*platform.Organization, error)
	UpdateOrganization(ctx context.Context, id string, name *string, maxInFlight *int, clearMax bool, ifVersion int64, ceiling int) (*platform.Organization, error)
	DeleteOrganization(ctx context.Context, id string) error
	NewEntity(ctx context.Context, tx *sqlx.Tx, id, kind string) error
	DeleteEntity(ctx context.Context, tx *sqlx.Tx, id string) error
	RoleByName(ctx context.Context, tx *sqlx.Tx, orgID, name string) (platform.RoleRef, error)
	RoleName(ctx context.Context, tx *sqlx.Tx, roleID string) (string, error)
	CountOwners(ctx context.Context, tx *sqlx.Tx, orgID string) (int, error)
	MemberRole(ctx context.Context, tx *sqlx.Tx, orgID, userID string) (string, error)
	LeaveOrganization(ctx context.Context, orgID, userID string) (string, []string, error)
	EndMembership(ctx context.Context, tx *sqlx.Tx, orgID, userID string) ([]string, error)
	RoleMembers(ctx context.Context, tx *sqlx.Tx, roleID string) (int, error)
}

var bearer = []map[string][]string{{"bearer": {}}}

// op describes an operation of a hand-written route.
func (s *Server) op(method, path, id, tag, summary, desc string, status int, secured bool, errs ...int) huma.Operation {
	o := huma.Operation{
		OperationID: id, Method: method, Path: path, Tags: []string{tag},
		Summary: summary, Description: desc, DefaultStatus: status,
		MaxBodyBytes: s.opts.MaxBodyBytes,
		Errors:       append([]int{http.StatusBadRequest}, errs...),
	}
	if secured {
		o.Security = bearer
		o.Errors = append(o.Errors, http.StatusUnauthorized)
	}
	return o
}

func caller(ctx context.Context) *platform.Principal { return platform.PrincipalFrom(ctx) }

type registerInput struct {
	Body struct {
		Email    string `json:"email" maxLength:"254" doc:"A real email address." example:"ada@example.com"`
		Password string `json:"password" maxLength:"256" doc:"At least 8 characters, not the email address."`
		Name     string `json:"name" minLength:"1" maxLength:"100"`
	}
}

type userOutput struct {
	Body *platform.User
}

type loginInput struct {
	Body struct {
		Email    string `json:"email" maxLength:"254"`
		Password string `json:"password" maxLength:"256"`
	}
}

type tokenOutput struct {
	CacheControl string `header:"Cache-Control"`
	Body         *access.TokenPair
}

type refreshInput struct {
	Body struct {
		RefreshToken string `json:"refresh_token" maxLength:"128"`
	}
}

type passwordInput struct {
	Body struct {
		CurrentPassword string `json:"current_password" maxLength:"256"`
		NewPassword     string `json:"new_password" maxLength:"256" doc:"At least 8 characters, not the email address."`
	}
}

type meOutput struct {
	Body struct {
		*platform.User
		Memberships []platform.Membership `json:"memberships" nullable:"false" doc:"The organizations the user belongs to, with the role held in each."`
	}
}

type updateMeInput struct {
	Body struct {
		Name         *string `json:"name,omitempty" minLength:"1" maxLength:"100"`
		DefaultOrgID *string `json:"default_org_id,omitempty" format:"uuid" doc:"The organization requests act in without X-Org-ID."`
	}
}

func (s *Server) authRoutes(d Deps) {
	huma.Register(s.API, s.op(http.MethodPost, "/v1/auth/register", "register", "Authentication", "Register",
		"Creates an account and its personal organization, which the new user owns. A taken email answers 409.",
		http.StatusCreated, false, http.StatusConflict, http.StatusTooManyRequests),
		func(ctx context.Context, in *registerInput) (*userOutput, error) {
			u, err := d.Accounts.Register(ctx, in.Body.Email, in.Body.Password, in.Body.Name)
			if err != nil {
				return nil, err
			}
			return &userOutput{Body: u}, nil
		})

	huma.Register(s.API, s.op(http.MethodPost, "/v1/auth/login", "login", "Authentication", "Log in",
		"Checks an email and password and opens a session: a short-lived access token and a refresh token. Repeated failures are throttled (429 with Retry-After).",
		http.StatusOK, false, http.StatusUnauthorized, http.StatusTooManyRequests),
		func(ctx context.Context, in *loginInput) (*tokenOutput, error) {
			pair, err := d.Accounts.Login(ctx, in.Body.Email, in.Body.Password)
			if err != nil {
				return nil, err
			}
			return &tokenOutput{CacheControl: "no-store", Body: pair}, nil
		})

	huma.Register(s.API, s.op(http.MethodPost, "/v1/auth/refresh", "refresh", "Authentication", "Refresh tokens",
		"Exchanges a refresh token for a new pair. Each refresh token works once: presenting a used one again revokes the whole session.",
		http.StatusOK, false, http.StatusUnauthorized),
		func(ctx context.Context, in *refreshInput) (*tokenOutput, error) {
			pair, err := d.Accounts.Refresh(ctx, in.Body.RefreshToken)
			if err != nil {
				return nil, err
			}
			return &tokenOutput{CacheControl: "no-store", Body: pair}, nil
		})

	huma.Register(s.API, s.op(http.MethodPost, "/v1/auth/logout", "logout", "Authentication", "Log out",
		"Revokes the caller's session: its refresh tokens, and its access tokens on every replica.",
		http.StatusNoContent, true),
		func(ctx context.Context, _ *struct{}) (*struct{}, error) {
			return nil, d.Accounts.Logout(ctx, caller(ctx))
		})

	huma.Register(s.API, s.op(http.MethodGet, "/v1/users/me", "get-me", "Users", "Who am I",
		"The caller's account and the organizations it belongs to.", http.StatusOK, true),
		func(ctx context.Context, _ *struct{}) (*meOutput, error) {
			p := caller(ctx)
			if p.Kind != platform.KindUser {
				return nil, platform.Errorf(platform.EFORBIDDEN, "only users have an account")
			}
			u, err := d.Identity.UserByID(ctx, p.ID)
			if err != nil {
				return nil, err
			}
			ms, err := d.Identity.Memberships(ctx, p.ID)
			if err != nil {
				return nil, err
			}
			out := &meOutput{}
			out.Body.User, out.Body.Memberships = u, ms
			return out, nil
		})

	huma.Register(s.API, s.op(http.MethodPatch, "/v1/users/me", "update-me", "Users", "Update my account",
		"Changes the caller's name or default organization. Not with an API key.", http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *updateMeInput) (*userOutput, error) {
			p := caller(ctx)
			if p.Kind != platform.KindUser || p.KeyID != "" {
				return nil, platform.Errorf(platform.EFORBIDDEN, "only users logged in may change their account")
			}
			u, err := d.Identity.UpdateUser(ctx, p.ID, in.Body.Name, in.Body.DefaultOrgID)
			if err != nil {
				return nil, err
			}
			d.Accounts.InvalidateUser(ctx, p.ID)
			return &userOutput{Body: u}, nil
		})

	huma.Register(s.API, s.op(http.MethodPost, "/v1/users/me/password", "change-password", "Users", "Change my password",
		"Sets a new password after checking the current one. Every other session of the account is revoked. Wrong current passwords count as failed logins (429 with Retry-After once over the limit).",
		http.StatusNoContent, true, http.StatusForbidden, http.StatusConflict, http.StatusTooManyRequests),
		func(ctx context.Context, in *passwordInput) (*struct{}, error) {
			return nil, d.Accounts.ChangePassword(ctx, caller(ctx), in.Body.CurrentPassword, in.Body.NewPassword)
		})

	s.adminUserRoutes(d)
}

type listUsersInput struct {
	Page     int    `query:"page" minimum:"1" maximum:"100000" default:"1"`
	PageSize int    `query:"page_size" minimum:"1" maximum:"100" default:"20"`
	Email    string `query:"email" maxLength:"254" doc:"Only users whose email contains this."`
}

type usersOutput struct {
	Body struct {
		Items    []platform.User `json:"items" nullable:"false"`
		Page     int             `json:"page"`
		PageSize int             `json:"page_size"`
		Total    int64           `json:"total"`
	}
}

type userIDInput struct {
	ID string `path:"id" format:"uuid"`
}

type userFlagsInput struct {
	ID   string `path:"id" format:"uuid"`
	Body struct {
		Disabled     *bool `json:"disabled,omitempty" doc:"A disabled user cannot log in; their tokens stop working at once."`
		IsSuperadmin *bool `json:"is_superadmin,omitempty"`
	}
}

func requireSuperadmin(ctx context.Context, audit *access.Audit, action string) error {
	p := caller(ctx)
	if p.Superadmin { // a key's principal is one only with the whole scope (see access.Authenticator)
		return nil
	}
	audit.Record(ctx, platform.AuditEvent{Action: action, ResourceType: "User", Outcome: "denied", Reason: "superadmins only"})
	return platform.Errorf(platform.EFORBIDDEN, "superadmins only")
}

func (s *Server) adminUserRoutes(d Deps) {
	huma.Register(s.API, s.op(http.MethodGet, "/v1/users", "list-users", "Users", "List users (superadmin)",
		"Every account of the platform. Superadmins only.", http.StatusOK, true, http.StatusForbidden),
		func(ctx context.Context, in *listUsersInput) (*usersOutput, error) {
			if err := requireSuperadmin(ctx, d.Audit, "User.list"); err != nil {
				return nil, err
			}
			users, total, err := d.Identity.ListUsers(ctx, in.Email, in.PageSize, (in.Page-1)*in.PageSize)
			if err != nil {
				return nil, err
			}
			out := &usersOutput{}
			out.Body.Items, out.Body.Page, out.Body.PageSize, out.Body.Total = users, in.Page, in.PageSize, total
			return out, nil
		})
	huma.Register(s.API, s.op(http.MethodGet, "/v1/users/{id}", "get-user", "Users", "Get a user (superadmin)",
		"One account. Superadmins only.", http.StatusOK, true, http.StatusForbidden, http.StatusNotFound),
		func(ctx context.Context, in *userIDInput) (*userOutput, error) {
			if err := requireSuperadmin(ctx, d.Audit, "User.read"); err != nil {
				return nil, err
			}
			u, err := d.Identity.UserByID(ctx, in.ID)
			if err != nil {
				return nil, err
			}
			return &userOutput{Body: u}, nil
		})
	huma.Register(s.API, s.op(http.MethodPatch, "/v1/users/{id}", "update-user", "Users", "Disable a user or change the superadmin role (superadmin)",
		"Superadmins only. Disabling a user ends every session and token of theirs at once.", http.StatusOK, true, http.StatusForbidden, http.StatusNotFound),
		func(ctx context.Context, in *userFlagsInput) (*userOutput, error) {
			if err := requireSuperadmin(ctx, d.Audit, "User.update"); err != nil {
				return nil, err
			}
			if in.ID == caller(ctx).ID && (in.Body.Disabled != nil && *in.Body.Disabled || in.Body.IsSuperadmin != nil && !*in.Body.IsSuperadmin) {
				return nil, platform.Errorf(platform.ECONFLICT, "you cannot disable yourself or drop your own superadmin role")
			}
			u, err := d.Identity.SetUserFlags(ctx, in.ID, in.Body.Disabled, in.Body.IsSuperadmin)
			if err != nil {
				return nil, err
			}
			d.Accounts.InvalidateUser(ctx, in.ID)
			d.Audit.Record(ctx, platform.AuditEvent{Action: "user.update", ResourceType: "User", ResourceID: &in.ID, Outcome: "ok",
				Details: platform.JSONObject{"disabled": in.Body.Disabled, "is_superadmin": in.Body.IsSuperadmin}})
			return &userOutput{Body: u}, nil
		})
}

type orgInput struct {
	Body struct {
		Name string `json:"name" minLength:"1" maxLength:"100"`
	}
}

type orgOutput struct {
	ETag string `header:"ETag"`
	Body *platform.Organization
}

type orgsOutput struct {
	Body struct {
		Items []platform.Organization `json:"items" nullable:"false"`
	}
}

type orgIDInput struct {
	ID string `path:"id" format:"uuid"`
}

type orgUpdateInput struct {
	ID      string `path:"id" format:"uuid"`
	IfMatch string `header:"If-Match"`
	Body    struct {
		Name           *string `json:"name,omitempty" minLength:"1" maxLength:"100"`
		OrgMaxInFlight *int    `json:"org_max_in_flight,omitempty" minimum:"0" maximum:"100000" doc:"Commands in flight at once; 0 restores the platform default. Above the platform default: superadmins only."`
	}
}

// orgRole returns the caller's built-in role in org: owner, admin, … or "".
func orgRole(p *platform.Principal, orgID string) string {
	if p.OrgID != orgID {
		return ""
	}
	for _, name := range []string{platform.RoleOwner, platform.RoleAdmin, platform.RoleMember, platform.RoleViewer} {
		if p.HasRole(name) {
			return name
		}
	}
	if len(p.Roles) > 0 {
		return p.Roles[0].Name
	}
	return ""
}

func (s *Server) orgRoutes(d Deps) {
	d.Registry.AddScope(platform.Scope{Type: "Organization"})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/organizations", "create-organization", "Organizations", "Create an organization",
		"Creates an organization owned by the caller, with the built-in roles owner, admin, member and viewer.", http.StatusCreated, true, http.StatusForbidden),
		func(ctx context.Context, in *orgInput) (*orgOutput, error) {
			p := caller(ctx)
			if p.Kind != platform.KindUser || p.KeyID != "" {
				return nil, platform.Errorf(platform.EFORBIDDEN, "only users logged in may create organizations")
			}
			org, err := d.Identity.CreateOrganization(ctx, p.ID, strings.TrimSpace(in.Body.Name))
			if err != nil {
				return nil, err
			}
			d.Accounts.InvalidateUser(ctx, p.ID)
			d.Audit.Record(ctx, platform.AuditEvent{Action: "organization.create", OrgID: &org.ID, ResourceType: "Organization", ResourceID: &org.ID, Outcome: "ok"})
			return &orgOutput{ETag: etagOf(org.Version), Body: org}, nil
		})
	huma.Register(s.API, s.op(http.MethodGet, "/v1/organizations", "list-organizations", "Organizations", "List my organizations",
		"The organizations the caller belongs to.", http.StatusOK, true),
		func(ctx context.Context, _ *struct{}) (*orgsOutput, error) {
			p := caller(ctx)
			out := &orgsOutput{}
			if p.Kind != platform.KindUser || p.KeyID != "" {
				org, err := d.Identity.Organization(ctx, p.OrgID)
				if err != nil {
					return nil, err
				}
				out.Body.Items = []platform.Organization{*org}
				return out, nil
			}
			orgs, err := d.Identity.OrganizationsOf(ctx, p.ID)
			out.Body.Items = orgs
			return out, err
		})
	// An organization is visible to its members (acting in it) and superadmins.
	load := func(ctx context.Context, id string) (*platform.Organization, *platform.Principal, error) {
		p := caller(ctx)
		if !p.Superadmin && p.OrgID != id {
			return nil, nil, platform.Errorf(platform.ENOTFOUND, "organization not found (act in it with X-Org-ID)")
		}
		org, err := d.Identity.Organization(ctx, id)
		return org, p, err
	}
	huma.Register(s.API, s.op(http.MethodGet, "/v1/organizations/{id}", "get-organization", "Organizations", "Get an organization",
		"An organization the caller acts in (X-Org-ID).", http.StatusOK, true, http.StatusNotFound),
		func(ctx context.Context, in *orgIDInput) (*orgOutput, error) {
			org, _, err := load(ctx, in.ID)
			if err != nil {
				return nil, err
			}
			return &orgOutput{ETag: etagOf(org.Version), Body: org}, nil
		})
	huma.Register(s.API, s.op(http.MethodPatch, "/v1/organizations/{id}", "update-organization", "Organizations", "Update an organization",
		"Renames the organization or sets its limit of commands in flight. Owners and admins; raising the limit above the platform's default (AGENTRY_ORG_MAX_IN_FLIGHT) takes a superadmin.", http.StatusOK, true, http.StatusForbidden, http.StatusNotFound, http.StatusPreconditionFailed),
		func(ctx context.Context, in *orgUpdateInput) (*orgOutput, error) {
			_, p, err := load(ctx, in.ID)
			if err != nil {
				return nil, err
			}
			if role := orgRole(p, in.ID); role != platform.RoleOwner && role != platform.RoleAdmin && !p.Superadmin || !keyAllows(p, "Organization", "update") {
				return nil, s.denied(ctx, d, "Organization.update", in.ID)
			}
			var ifVersion int64
			if in.IfMatch != "" {
				if ifVersion = versionOf(in.IfMatch); ifVersion == 0 {
					return nil, platform.Errorf(platform.EPRECONDITION, "If-Match does not name a version of this organization")
				}
			}
			var name *string
			if in.Body.Name != nil {
				trimmed := strings.TrimSpace(*in.Body.Name)
				name = &trimmed
			}
			maxInFlight, clearMax := in.Body.OrgMaxInFlight, false
			if maxInFlight != nil && *maxInFlight == 0 {
				maxInFlight, clearMax = nil, true
			}
			// The limit shares the workers fairly among organizations: an
			// organization may restrain itself (up to the platform's default,
			// or lower than a superadmin let it have), only a superadmin lets
			// one have more.
			ceiling := orgMaxInFlight(d)
			if p.Superadmin {
				ceiling = -1
			}
			org, err := d.Identity.UpdateOrganization(ctx, in.ID, name, maxInFlight, clearMax, ifVersion, ceiling)
			if err != nil {
				return nil, err
			}
			d.Audit.Record(ctx, platform.AuditEvent{Action: "organization.update", ResourceType: "Organization", ResourceID: &in.ID, Outcome: "ok"})
			return &orgOutput{ETag: etagOf(org.Version), Body: org}, nil
		})
	huma.Register(s.API, s.op(http.MethodPost, "/v1/organizations/{id}/leave", "leave-organization", "Organizations", "Leave an organization",
		"Ends the caller's membership (anyone may leave, but not the last owner: 409), and revokes the API keys they made there. Not with an API key.",
		http.StatusNoContent, true, http.StatusForbidden, http.StatusNotFound, http.StatusConflict),
		func(ctx context.Context, in *orgIDInput) (*struct{}, error) {
			p := caller(ctx)
			if p.Kind != platform.KindUser || p.KeyID != "" {
				return nil, platform.Errorf(platform.EFORBIDDEN, "leave an organization logged in, not with an API key")
			}
			id, revoked, err := d.Identity.LeaveOrganization(ctx, in.ID, p.ID)
			if err != nil {
				return nil, err
			}
			d.Accounts.InvalidateUser(ctx, p.ID)
			keysRevoked(ctx, d, p.ID, revoked)
			d.Audit.Record(ctx, platform.AuditEvent{OrgID: &in.ID, Action: "membership.leave", ResourceType: "Membership", ResourceID: &id, Outcome: "ok"})
			return nil, nil
		})
	huma.Register(s.API, s.op(http.MethodDelete, "/v1/organizations/{id}", "delete-organization", "Organizations", "Delete an organization",
		"Deletes the organization and everything in it. Owners only.", http.StatusNoContent, true, http.StatusForbidden, http.StatusNotFound),
		func(ctx context.Context, in *orgIDInput) (*struct{}, error) {
			_, p, err := load(ctx, in.ID)
			if err != nil {
				return nil, err
			}
			if orgRole(p, in.ID) != platform.RoleOwner && !p.Superadmin || !keyAllows(p, "Organization", "delete") {
				return nil, s.denied(ctx, d, "Organization.delete", in.ID)
			}
			if err := d.Identity.DeleteOrganization(ctx, in.ID); err != nil {
				return nil, err
			}
			d.Accounts.InvalidateAll(ctx)
			d.Audit.Record(ctx, platform.AuditEvent{Action: "organization.delete", ResourceType: "Organization", ResourceID: &in.ID, Outcome: "ok"})
			return nil, nil
		})
}

// keyRequires refuses a request whose API key (if any) does not cover
// action on typ.
func keyRequires(p *platform.Principal, typ, action string) error {
	if !keyAllows(p, typ, action) {
		return platform.Errorf(platform.EFORBIDDEN, "this API key's scope does not include %s.%s", typ, action)
	}
	return nil
}

// keyAllows reports whether the API key a request came with (if any)
// covers action on typ: a key's scope caps every route, not only the
// resources the access guard decides.
func keyAllows(p *platform.Principal, typ, action string) bool {
	if p.KeyID == "" {
		return true
	}
	for _, perm := range p.KeyScope {
		if perm.Grants(typ, action) {
			return true
		}
	}
	return false
}

func (s *Server) denied(ctx context.Context, d Deps, action, id string) error {
	d.Audit.Record(ctx, platform.AuditEvent{Action: action, ResourceType: "Organization", ResourceID: &id, Outcome: "denied", Reason: "role too low"})
	return platform.Errorf(platform.EFORBIDDEN, "your role in this organization does not allow this")
}

// Member is a user's place in an organization.
type Member struct {
	crud.Base
	UserID string `db:"user_id" json:"user_id" format:"uuid"`
	RoleID string `db:"role_id" json:"role_id" format:"uuid"`
}

// MemberInput invites a user (by the email of an existing account) with
// a role, or changes the role.
type MemberInput struct {
	Email string `json:"email,omitempty" crud:"-" maxLength:"254" doc:"The invited user's email; only when inviting."`
	Role  string `json:"role" crud:"-" minLength:"1" maxLength:"64" doc:"A role of the organization: owner, admin, member, viewer or a custom one."`
}

// Role is an organization role: a named set of permissions.
type Role struct {
	crud.Base
	Name        string            `db:"name" json:"name"`
	Description string            `db:"description" json:"description"`
	Builtin     bool              `db:"builtin" json:"builtin" doc:"Built-in roles cannot be changed or deleted."`
	Permissions platform.JSONList `db:"permissions" json:"permissions" nullable:"false"`
}

// RoleInput is what a client sets of a role.
type RoleInput struct {
	Name        string            `json:"name" minLength:"1" maxLength:"64" pattern:"^[a-z][a-z0-9_-]*$" doc:"Lower-case; the built-in names are taken."`
	Description string            `json:"description,omitempty" maxLength:"500"`
	Permissions platform.JSONList `json:"permissions" maxItems:"200" doc:"Permissions such as Agent.read, Agent.*, *.read or *." nullable:"false"`
}

func (s *Server) membershipRoutes(d Deps) {
	membership := platform.Scope{Type: "Membership"}
	// ownerNow refuses a caller who is not an owner of orgID as tx sees it
	// now (not as the request's principal was loaded: another owner may
	// have demoted them meanwhile), unless a superadmin.
	ownerNow := func(ctx context.Context, tx *sqlx.Tx, orgID, refusal string) error {
		p := caller(ctx)
		if p.Superadmin {
			return nil
		}
		if role, err := d.Identity.MemberRole(ctx, tx, orgID, p.ID); err != nil || role != platform.RoleOwner {
			if err != nil && platform.ErrorCode(err) != platform.ENOTFOUND {
				return err
			}
			return platform.Errorf(platform.EFORBIDDEN, "%s", refusal)
		}
		return nil
	}
	checkRole := func(ctx context.Context, tx *sqlx.Tx, orgID, role string) (platform.RoleRef, error) {
		ref, err := d.Identity.RoleByName(ctx, tx, orgID, role)
		if platform.ErrorCode(err) == platform.ENOTFOUND {
			return ref, platform.Invalid("unknown role", platform.FieldError{Field: "body.role", Message: "no role of this organization has this name"})
		}
		if err != nil {
			return ref, err
		}
		if role == platform.RoleOwner {
			if _, err := d.Identity.CountOwners(ctx, tx, orgID); err != nil { // owner changes take turns
				return ref, err
			}
			if err := ownerNow(ctx, tx, orgID, "only owners may make owners"); err != nil {
				return ref, err
			}
		}
		var perms platform.JSONList
		if err := tx.GetContext(ctx, &perms, "SELECT permissions FROM roles WHERE id = $1", ref.ID); err != nil {
			return ref, err
		}
		if err := withinCaller(caller(ctx), perms); err != nil {
			return ref, platform.Errorf(platform.EFORBIDDEN, "the role %s grants %s, which you do not hold: you may give only a role within your own permissions", role, err)
		}
		return ref, nil
	}
	keepAnOwner := func(ctx context.Context, tx *sqlx.Tx, m *Member) error {
		name, err := d.Identity.RoleName(ctx, tx, m.RoleID)
		if err != nil || name != platform.RoleOwner {
			return err
		}
		// Counting locks the organization: owner changes take turns, and
		// the caller's role is read as the one before left it.
		n, err := d.Identity.CountOwners(ctx, tx, m.OrgID)
		if err != nil {
			return err
		}
		if err := ownerNow(ctx, tx, m.OrgID, "only owners may change or remove an owner"); err != nil {
			return err
		}
		if n <= 1 {
			return platform.Errorf(platform.ECONFLICT, "an organization keeps at least one owner")
		}
		return nil
	}
	crud.Register(d.Registry, crud.Resource[Member, MemberInput]{
		Scope: membership, Path: "/v1/members", Table: "memberships", Tag: "Members",
		Ops:         crud.OpCreate | crud.OpRead | crud.OpUpdate | crud.OpDelete | crud.OpList,
		Description: "Members of the organization the request acts in (X-Org-ID). Inviting, changing roles and removing need `Membership.*` (owners and admins); only owners make or unmake owners, and the last owner stays.",
		Sort:        []string{"user_id"},
		Filters:     []crud.Filter{{Param: "user_id", Column: "user_id"}, {Param: "role_id", Column: "role_id"}},
		Validate: func(ctx context.Context, in *MemberInput) []platform.FieldError {
			if in.Email != "" && !access.ValidEmail(in.Email) {
				return []platform.FieldError{{Field: "email", Message: "must be an email address"}}
			}
			return nil
		},
		BeforeCreate: func(ctx context.Context, tx *sqlx.Tx, in *MemberInput, m *Member) error {
			if in.Email == "" {
				return platform.Invalid("invite by email", platform.FieldError{Field: "body.email", Message: "required when inviting"})
			}
			u, err := d.Identity.UserByEmail(ctx, in.Email)
			if platform.ErrorCode(err) == platform.ENOTFOUND {
				return platform.Invalid("no such account", platform.FieldError{Field: "body.email", Message: "no account has this email; ask them to register first"})
			}
			if err != nil {
				return err
			}
			role, err := checkRole(ctx, tx, m.OrgID, in.Role)
			if err != nil {
				return err
			}
			// The organization owns its memberships: whoever invited a
			// member gains no rights over the membership by it.
			m.UserID, m.RoleID, m.OwnerID = u.ID, role.ID, m.OrgID
			return nil
		},
		BeforeUpdate: func(ctx context.Context, tx *sqlx.Tx, in *MemberInput, old, m *Member) error {
			if in.Email != "" {
				return platform.Invalid("a membership's user cannot change", platform.FieldError{Field: "body.email", Message: "only when inviting"})
			}
			role, err := checkRole(ctx, tx, m.OrgID, in.Role)
			if err != nil {
				return err
			}
			if role.ID != old.RoleID {
				if err := keepAnOwner(ctx, tx, old); err != nil {
					return err
				}
			}
			m.RoleID = role.ID
			return nil
		},
		BeforeDelete: func(ctx context.Context, tx *sqlx.Tx, m *Member) error {
			if err := keepAnOwner(ctx, tx, m); err != nil {
				return err
			}
			revoked, err := d.Identity.EndMembership(ctx, tx, m.OrgID, m.UserID)
			if err == nil {
				endedKeys.Store(m.ID, revoked) // for AfterCommit
			}
			return err
		},
		// After the commit: a reader that loaded the member's facts before
		// it would cache the old membership again.
		AfterCommit: func(ctx context.Context, op crud.Op, m *Member) {
			d.Accounts.InvalidateUser(ctx, m.UserID)
			if op == crud.OpDelete {
				if revoked, ok := endedKeys.LoadAndDelete(m.ID); ok {
					keysRevoked(ctx, d, m.UserID, revoked.([]string))
				}
			}
			d.Audit.Record(ctx, platform.AuditEvent{Action: "membership." + opName(op), ResourceType: "Membership", ResourceID: &m.ID, Outcome: "ok",
				Details: platform.JSONObject{"user_id": m.UserID, "role_id": m.RoleID}})
		},
	})

	builtin := map[string]bool{}
	for _, r := range platform.BuiltinRoles {
		builtin[r.Name] = true
	}
	checkPerms := func(in *RoleInput) []platform.FieldError {
		var bad []platform.FieldError
		for _, text := range in.Permissions {
			if perm, err := platform.ParsePermission(text); err != nil {
				bad = append(bad, platform.FieldError{Field: "permissions", Message: err.Error()})
			} else if !knownType(d, perm.Type) {
				bad = append(bad, platform.FieldError{Field: "permissions", Message: unknownType(perm)})
			}
		}
		return bad
	}
	crud.Register(d.Registry, crud.Resource[Role, RoleInput]{
		Scope: platform.Scope{Type: "Role"}, Path: "/v1/roles", Table: "roles", Tag: "Roles",
		Ops:         crud.OpCreate | crud.OpRead | crud.OpReplace | crud.OpUpdate | crud.OpDelete | crud.OpList,
		Description: "Roles of the organization the request acts in. Custom roles hold permissions such as `Agent.read`; the built-in roles cannot change.",
		Sort:        []string{"name"},
		Filters:     []crud.Filter{{Param: "name", Column: "name"}, {Param: "builtin", Column: "builtin"}},
		Validate:    func(_ context.Context, in *RoleInput) []platform.FieldError { return checkPerms(in) },
		BeforeCreate: func(ctx context.Context, tx *sqlx.Tx, in *RoleInput, r *Role) error {
			if builtin[in.Name] {
				return platform.Errorf(platform.ECONFLICT, "%q is a built-in role", in.Name)
			}
			if err := withinCaller(caller(ctx), in.Permissions); err != nil {
				return platform.Errorf(platform.EFORBIDDEN, "a role may grant only what you hold; not %s", err)
			}
			r.OwnerID = r.OrgID // the organization owns its roles, not their creator
			return d.Identity.NewEntity(ctx, tx, r.ID, platform.KindRole)
		},
		BeforeUpdate: func(ctx context.Context, tx *sqlx.Tx, in *RoleInput, old, r *Role) error {
			if old.Builtin {
				return platform.Errorf(platform.ECONFLICT, "built-in roles cannot be changed")
			}
			if builtin[in.Name] {
				return platform.Errorf(platform.ECONFLICT, "%q is a built-in role", in.Name)
			}
			if err := withinCaller(caller(ctx), in.Permissions); err != nil {
				return platform.Errorf(platform.EFORBIDDEN, "a role may grant only what you hold; not %s", err)
			}
			return nil
		},
		BeforeDelete: func(ctx context.Context, tx *sqlx.Tx, r *Role) error {
			if r.Builtin {
				return platform.Errorf(platform.ECONFLICT, "built-in roles cannot be deleted")
			}
			if err := lockReferences(ctx, tx, "roles", r.ID); err != nil { // the count sees the role given meanwhile
				return err
			}
			n, err := d.Identity.RoleMembers(ctx, tx, r.ID)
			if err != nil {
				return err
			}
			if n > 0 {
				return platform.Errorf(platform.ECONFLICT, "%d members hold this role; give them another first", n)
			}
			return nil
		},
		AfterWrite: func(ctx context.Context, tx *sqlx.Tx, op crud.Op, r *Role) error {
			if op == crud.OpDelete {
				return d.Identity.DeleteEntity(ctx, tx, r.ID)
			}
			return nil
		},
		AfterCommit: func(ctx context.Context, op crud.Op, r *Role) {
			d.Accounts.InvalidateAll(ctx)
			d.Audit.Record(ctx, platform.AuditEvent{Action: "role." + opName(op), ResourceType: "Role", ResourceID: &r.ID, Outcome: "ok",
				Details: platform.JSONObject{"name": r.Name, "permissions": []string(r.Permissions)}})
		},
	})
}

func opName(op crud.Op) string {
	switch op {
	case crud.OpCreate:
		return "create"
	case crud.OpDelete:
		return "delete"
	default:
		return "update"
	}
}

func etagOf(version int64) string { return `"` + strconv.FormatInt(version, 10) + `"` }

// versionOf reads the version of an If-Match header, 0 if it names none.
func versionOf(ifMatch string) int64 {
	tag := strings.Trim(strings.TrimPrefix(strings.TrimSpace(ifMatch), "W/"), `"`)
	var n int64
	for _, c := range tag {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

// withinCaller checks that p holds every permission of perms (a role it
// would give or shape): nobody grants more than they hold, not even to
// themselves. The error names the first permission p lacks.
func withinCaller(p *platform.Principal, perms []string) error {
	for _, text := range perms {
		want, err := platform.ParsePermission(text)
		if err != nil {
			return errors.New(text)
		}
		if !p.Holds(want) {
			return errors.New(want.String())
		}
	}
	return nil
}

// orgMaxInFlight is the platform's default limit of an organization's
// commands in flight (0 when unknown).
func orgMaxInFlight(d Deps) int {
	if d.Dispatcher == nil || d.Dispatcher.Store == nil {
		return 0
	}
	return d.Dispatcher.Store.Limits.OrgMaxInFlight
}

// endedKeys holds, from a membership's deletion to its commit, the
// prefixes of the keys its deletion revoked (by membership id).
var endedKeys sync.Map

// keysRevoked drops the revoked keys of a membership that ended from the
// caches, and audits their revocation.
func keysRevoked(ctx context.Context, d Deps, userID string, prefixes []string) {
	for _, prefix := range prefixes {
		d.Accounts.InvalidateKey(ctx, prefix)
	}
	if len(prefixes) > 0 {
		d.Audit.Record(ctx, platform.AuditEvent{Action: "api_key.revoke", ResourceType: "ApiKey", Outcome: "ok", Reason: "membership ended",
			Details: platform.JSONObject{"user_id": userID, "prefixes": prefixes}})
	}
}
