package access_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"testing"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
	"github.com/agentry/agentry/internal/testenv"
)

// world is the data every decision case runs against: two organizations,
// users, an agent, roles, and a resource table res whose rows are
//
//	X  org A, owned by another user
//	Y  org A, owned by the principal user
//	W  org A, owned by another user (its entries must not apply to X)
//	V  org A, owned by the agent
//	Z  org B, owned by another user
//	M  org B, owned by the principal user
type world struct {
	db *sqlx.DB
	// ids by symbolic name: orgs "A" and "B"; entities "user", "other",
	// "agent"; roles "A/owner", "A/admin", "A/member", "A/viewer", "A/ops",
	// "A/superadmin" (a custom role), "B/member";
	// resources "X", "Y", "W", "V", "Z", "M".
	id       map[string]string
	resOrg   map[string]string // resource name → org name
	resOwner map[string]string // resource name → owner entity name
}

func newWorld(t *testing.T) *world {
	t.Helper()
	ctx := context.Background()
	db := testenv.Postgres(t)
	w := &world{db: db, id: map[string]string{}, resOrg: map[string]string{}, resOwner: map[string]string{}}
	for _, name := range []string{"A", "B", "user", "other", "agent", "A/owner", "A/admin", "A/member", "A/viewer", "A/ops", "A/superadmin", "B/member", "X", "Y", "W", "V", "Z", "M"} {
		w.id[name] = uuid.NewString()
	}
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := db.ExecContext(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	for _, e := range []struct{ name, kind string }{
		{"user", platform.KindUser}, {"other", platform.KindUser}, {"agent", platform.KindAgent},
		{"A", platform.KindOrganization}, {"B", platform.KindOrganization},
		{"A/owner", platform.KindRole}, {"A/admin", platform.KindRole}, {"A/member", platform.KindRole}, {"A/viewer", platform.KindRole},
		{"A/ops", platform.KindRole}, {"A/superadmin", platform.KindRole}, {"B/member", platform.KindRole},
	} {
		exec("INSERT INTO entities (id, kind) VALUES ($1, $2)", w.id[e.name], e.kind)
	}
	for _, u := range []string{"user", "other"} {
		exec("INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, 'x')", w.id[u], u+"@example.com", u)
	}
	for _, o := range []string{"A", "B"} {
		exec("INSERT INTO organizations (id, org_id, owner_id, name) VALUES ($1, $1, $2, $3)", w.id[o], w.id["other"], o)
	}
	for _, r := range []string{"A/owner", "A/admin", "A/member", "A/viewer", "A/ops", "A/superadmin", "B/member"} {
		org, name := r[:1], r[2:]
		exec("INSERT INTO roles (id, org_id, owner_id, name) VALUES ($1, $2, $3, $4)", w.id[r], w.id[org], w.id["other"], name)
	}
	exec("CREATE TABLE res (id uuid PRIMARY KEY, org_id uuid NOT NULL, owner_id uuid NOT NULL)")
	for _, r := range []struct{ name, org, owner string }{
		{"X", "A", "other"}, {"Y", "A", "user"}, {"W", "A", "other"}, {"V", "A", "agent"}, {"Z", "B", "other"}, {"M", "B", "user"},
	} {
		w.resOrg[r.name], w.resOwner[r.name] = r.org, r.owner
		exec("INSERT INTO res (id, org_id, owner_id) VALUES ($1, $2, $3)", w.id[r.name], w.id[r.org], w.id[r.owner])
	}
	return w
}

// ref returns the resource reference of the named row.
func (w *world) ref(name string) *platform.ResourceRef {
	return &platform.ResourceRef{Type: "Agent", ID: w.id[name], OrgID: w.id[w.resOrg[name]], OwnerID: w.id[w.resOwner[name]]}
}

// who is a principal of a case.
type who struct {
	agent      bool     // the agent, authenticated by its key (scope = key)
	org        string   // "A" (default), "B", or "-" for no organization
	roles      []string // role names held in org
	perms      []string // the union of the roles' permissions
	superadmin bool
	key        []string // the scope of the API key used; nil: an access token
}

func (w *world) principal(t *testing.T, s who) *platform.Principal {
	t.Helper()
	org := s.org
	if org == "" {
		org = "A"
	}
	p := &platform.Principal{ID: w.id["user"], Kind: platform.KindUser, Email: "user@example.com", Superadmin: s.superadmin}
	if org != "-" {
		p.OrgID = w.id[org]
	}
	for _, r := range s.roles {
		p.Roles = append(p.Roles, platform.RoleRef{ID: w.id[org+"/"+r], Name: r})
	}
	var err error
	if p.Permissions, err = platform.ParsePermissions(s.perms); err != nil {
		t.Fatal(err)
	}
	if s.key != nil {
		p.KeyID = uuid.NewString()
		if p.KeyScope, err = platform.ParsePermissions(s.key); err != nil {
			t.Fatal(err)
		}
	}
	if s.agent {
		p.ID, p.Kind, p.Email, p.Roles, p.Superadmin = w.id["agent"], platform.KindAgent, "", nil, false
		p.Permissions = p.KeyScope
	}
	return p
}

// entry is an ACL entry of a case, by symbolic names.
type entry struct {
	effect string // allow or deny
	action string // an action or *
	who    string // "me" (the principal), "other", "agent", "role:<name>", "org", "orgB"
	res    string // a resource name; "" for every resource of the type
	org    string // "" for A
	typ    string // "" for Agent
}

func (w *world) entries(t *testing.T, p *platform.Principal, es []entry) []platform.ACLEntry {
	t.Helper()
	out := make([]platform.ACLEntry, 0, len(es))
	for _, e := range es {
		org := e.org
		if org == "" {
			org = "A"
		}
		typ := e.typ
		if typ == "" {
			typ = "Agent"
		}
		var principal string
		switch {
		case e.who == "me":
			principal = p.ID
		case e.who == "org":
			principal = w.id["A"]
		case e.who == "orgB":
			principal = w.id["B"]
		case len(e.who) > 5 && e.who[:5] == "role:":
			principal = w.id[org+"/"+e.who[5:]]
		default:
			principal = w.id[e.who]
		}
		if principal == "" {
			t.Fatalf("entry %+v names no entity", e)
		}
		a := platform.ACLEntry{ID: uuid.NewString(), OrgID: w.id[org], ResourceType: typ, Action: e.action, PrincipalID: principal, Effect: e.effect}
		if e.res != "" {
			a.ResourceID = w.id[e.res]
		}
		out = append(out, a)
	}
	return out
}

func (w *world) store(t *testing.T, es []platform.ACLEntry) {
	t.Helper()
	ctx := context.Background()
	for _, e := range es {
		var res *string
		if e.ResourceID != "" {
			res = &e.ResourceID
		}
		if _, err := w.db.ExecContext(ctx, `INSERT INTO acl_entries (id, org_id, resource_type, resource_id, action, principal_id, effect)
			VALUES ($1, $2, $3, $4, $5, $6, $7)`, e.ID, e.OrgID, e.ResourceType, res, e.Action, e.PrincipalID, e.Effect); err != nil {
			t.Fatalf("store %+v: %v", e, err)
		}
	}
	t.Cleanup(func() { _, _ = w.db.ExecContext(ctx, "DELETE FROM acl_entries") })
}

var agentScope = platform.Scope{Type: "Agent", ACLAdmins: []string{platform.RoleSuperadmin}, AllowAlways: []string{platform.RoleSuperadmin}}

type decideCase struct {
	name    string
	p       who
	scope   *platform.Scope // nil: agentScope
	action  string
	res     string // a resource name; "" for an action on the type (create)
	entries []entry
	want    bool
	reason  string // the rule that decides
}

var decideCases = []decideCase{
	// Ownership.
	{name: "owner reads", res: "Y", action: "read", want: true, reason: access.ReasonOwner},
	{name: "owner updates", res: "Y", action: "update", want: true, reason: access.ReasonOwner},
	{name: "owner deletes", res: "Y", action: "delete", want: true, reason: access.ReasonOwner},
	{name: "no grant at all", res: "X", action: "read", reason: access.ReasonNoGrant},
	{name: "deny over owner", res: "Y", action: "read", entries: []entry{{effect: "deny", action: "read", who: "me", res: "Y"}}, reason: access.ReasonDenyEntry},
	{name: "owner denied another action still reads", res: "Y", action: "read", entries: []entry{{effect: "deny", action: "update", who: "me", res: "Y"}}, want: true, reason: access.ReasonOwner},
	{name: "deny via organization over owner", res: "Y", action: "delete", entries: []entry{{effect: "deny", action: "*", who: "org", res: "Y"}}, reason: access.ReasonDenyEntry},

	// Role permissions.
	{name: "allow via role permission", p: who{roles: []string{"member"}, perms: []string{"Agent.read"}}, res: "X", action: "read", want: true, reason: access.ReasonPermission},
	{name: "role permission for another action", p: who{roles: []string{"member"}, perms: []string{"Agent.read"}}, res: "X", action: "update", reason: access.ReasonNoGrant},
	{name: "wildcard type permission Agent.*", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}, res: "X", action: "delete", want: true, reason: access.ReasonPermission},
	{name: "*.read grants read", p: who{roles: []string{"member"}, perms: []string{"*.read"}}, res: "X", action: "read", want: true, reason: access.ReasonPermission},
	{name: "*.read does not grant update", p: who{roles: []string{"member"}, perms: []string{"*.read"}}, res: "X", action: "update", reason: access.ReasonNoGrant},
	{name: "* grants everything", p: who{roles: []string{"member"}, perms: []string{"*"}}, res: "X", action: "command", want: true, reason: access.ReasonPermission},
	{name: "permission on another type", p: who{roles: []string{"member"}, perms: []string{"Template.*", "Environment.read"}}, res: "X", action: "read", reason: access.ReasonNoGrant},

	// Denies.
	{name: "deny via role over role permission", p: who{roles: []string{"member", "ops"}, perms: []string{"Agent.read"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "read", who: "role:ops", res: "X"}}, reason: access.ReasonDenyEntry},
	{name: "deny via organization over role permission", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "read", who: "org", res: "X"}}, reason: access.ReasonDenyEntry},
	{name: "deny over allow entry", res: "X", action: "read",
		entries: []entry{{effect: "allow", action: "read", who: "me", res: "X"}, {effect: "deny", action: "*", who: "me", res: "X"}}, reason: access.ReasonDenyEntry},
	{name: "deny of a role not held does not apply", p: who{roles: []string{"member"}, perms: []string{"Agent.read"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "read", who: "role:ops", res: "X"}}, want: true, reason: access.ReasonPermission},
	{name: "deny of another user does not apply", p: who{roles: []string{"member"}, perms: []string{"Agent.read"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "*", who: "other", res: "X"}}, want: true, reason: access.ReasonPermission},
	{name: "deny for another action does not apply", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "delete", who: "me", res: "X"}}, want: true, reason: access.ReasonPermission},
	{name: "deny for another action denies that action", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}, res: "X", action: "delete",
		entries: []entry{{effect: "deny", action: "delete", who: "me", res: "X"}}, reason: access.ReasonDenyEntry},

	// Allow entries.
	{name: "allow entry for the principal", res: "X", action: "read", entries: []entry{{effect: "allow", action: "read", who: "me", res: "X"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "allow entry for another action", res: "X", action: "read", entries: []entry{{effect: "allow", action: "update", who: "me", res: "X"}}, reason: access.ReasonNoGrant},
	{name: "wildcard action entry", res: "X", action: "delete", entries: []entry{{effect: "allow", action: "*", who: "me", res: "X"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "allow via role entry", p: who{roles: []string{"ops"}}, res: "X", action: "update", entries: []entry{{effect: "allow", action: "update", who: "role:ops", res: "X"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "allow via organization entry", res: "X", action: "read", entries: []entry{{effect: "allow", action: "read", who: "org", res: "X"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "allow entry of a role not held", p: who{roles: []string{"member"}}, res: "X", action: "read", entries: []entry{{effect: "allow", action: "read", who: "role:ops", res: "X"}}, reason: access.ReasonNoGrant},
	{name: "allow entry for another user", res: "X", action: "read", entries: []entry{{effect: "allow", action: "*", who: "other", res: "X"}}, reason: access.ReasonNoGrant},
	{name: "entries of another resource do not apply", res: "X", action: "read", entries: []entry{{effect: "allow", action: "*", who: "me", res: "W"}}, reason: access.ReasonNoGrant},
	{name: "deny of another resource does not apply", p: who{perms: []string{"Agent.read"}}, res: "X", action: "read", entries: []entry{{effect: "deny", action: "*", who: "me", res: "W"}}, want: true, reason: access.ReasonPermission},
	{name: "entries of another org do not apply", res: "X", action: "read", entries: []entry{{effect: "allow", action: "*", who: "me", res: "X", org: "B"}}, reason: access.ReasonNoGrant},
	{name: "deny of another org does not apply", p: who{perms: []string{"Agent.read"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "*", who: "me", res: "X", org: "B"}, {effect: "deny", action: "*", who: "me", org: "B"}}, want: true, reason: access.ReasonPermission},
	{name: "entries of another type do not apply", res: "X", action: "read", entries: []entry{{effect: "allow", action: "*", who: "me", res: "X", typ: "Template"}, {effect: "allow", action: "*", who: "me", typ: "Template"}}, reason: access.ReasonNoGrant},

	// Type-wide entries.
	{name: "type-wide allow entry", res: "X", action: "read", entries: []entry{{effect: "allow", action: "read", who: "me"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "type-wide allow entry via role", p: who{roles: []string{"ops"}}, res: "W", action: "update", entries: []entry{{effect: "allow", action: "*", who: "role:ops"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "type-wide deny entry over permission", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}, res: "X", action: "read", entries: []entry{{effect: "deny", action: "read", who: "org"}}, reason: access.ReasonDenyEntry},
	{name: "type-wide deny entry over owner", res: "Y", action: "update", entries: []entry{{effect: "deny", action: "*", who: "me"}}, reason: access.ReasonDenyEntry},
	{name: "type-wide deny entry over resource allow", res: "X", action: "read", entries: []entry{{effect: "deny", action: "read", who: "me"}, {effect: "allow", action: "read", who: "me", res: "X"}}, reason: access.ReasonDenyEntry},
	{name: "type-wide deny for another action", p: who{perms: []string{"Agent.*"}}, res: "X", action: "read", entries: []entry{{effect: "deny", action: "delete", who: "me"}}, want: true, reason: access.ReasonPermission},

	// Tenancy.
	{name: "cross-tenant even with * permission", p: who{roles: []string{"member"}, perms: []string{"*"}}, res: "Z", action: "read", reason: access.ReasonTenant},
	{name: "cross-tenant even as owner", res: "M", action: "read", reason: access.ReasonTenant},
	{name: "cross-tenant even with an allow entry there", res: "Z", action: "read",
		entries: []entry{{effect: "allow", action: "*", who: "me", res: "Z", org: "B"}, {effect: "allow", action: "*", who: "me", org: "B"}}, reason: access.ReasonTenant},
	{name: "acting in the other organization", p: who{org: "B", roles: []string{"member"}, perms: []string{"Agent.read"}}, res: "Z", action: "read", want: true, reason: access.ReasonPermission},
	{name: "acting in the other organization, resource of the first", p: who{org: "B", roles: []string{"member"}, perms: []string{"*"}}, res: "Y", action: "read", reason: access.ReasonTenant},
	{name: "no organization", p: who{org: "-"}, res: "Y", action: "read", reason: access.ReasonNoOrg},

	// Always-allowed roles.
	{name: "superadmin (allow_always)", p: who{superadmin: true}, res: "X", action: "delete", want: true, reason: access.ReasonAllowAlways},
	{name: "superadmin over deny entry", p: who{superadmin: true}, res: "X", action: "read", entries: []entry{{effect: "deny", action: "*", who: "me", res: "X"}, {effect: "deny", action: "*", who: "org"}}, want: true, reason: access.ReasonAllowAlways},
	{name: "superadmin in another organization", p: who{superadmin: true}, res: "Z", action: "update", want: true, reason: access.ReasonAllowAlways},
	{name: "superadmin where the scope does not allow always", p: who{superadmin: true}, scope: &platform.Scope{Type: "Agent"}, res: "X", action: "read", reason: access.ReasonNoGrant},
	{name: "custom role named superadmin is not the platform role", p: who{roles: []string{"superadmin"}}, res: "X", action: "read", reason: access.ReasonNoGrant},
	{name: "allow_always custom role", p: who{roles: []string{"ops"}}, scope: &platform.Scope{Type: "Agent", AllowAlways: []string{"ops"}}, res: "X", action: "delete",
		entries: []entry{{effect: "deny", action: "*", who: "role:ops", res: "X"}}, want: true, reason: access.ReasonAllowAlways},

	// Agents.
	{name: "agent principal reads by its scope", p: who{agent: true, key: []string{"Agent.read"}}, res: "X", action: "read", want: true, reason: access.ReasonPermission},
	{name: "agent principal cannot update outside its scope", p: who{agent: true, key: []string{"Agent.read"}}, res: "X", action: "update", reason: access.ReasonKeyScope},
	{name: "agent principal: allow entry outside its key scope", p: who{agent: true, key: []string{"Agent.read"}}, res: "X", action: "update",
		entries: []entry{{effect: "allow", action: "*", who: "agent", res: "X"}}, reason: access.ReasonKeyScope},
	{name: "agent principal denied by entry", p: who{agent: true, key: []string{"Agent.read"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "read", who: "me", res: "X"}}, reason: access.ReasonDenyEntry},
	{name: "agent principal owns what it made", p: who{agent: true, key: []string{"Agent.update", "Template.read"}}, res: "V", action: "update", want: true, reason: access.ReasonOwner},
	{name: "agent principal denied via organization", p: who{agent: true, key: []string{"*"}}, res: "X", action: "read",
		entries: []entry{{effect: "deny", action: "*", who: "org"}}, reason: access.ReasonDenyEntry},

	// API key scopes.
	{name: "API key scope caps an owner", p: who{key: []string{"Agent.read"}}, res: "Y", action: "update", reason: access.ReasonKeyScope},
	{name: "API key scope lets an owner read", p: who{key: []string{"Agent.read"}}, res: "Y", action: "read", want: true, reason: access.ReasonOwner},
	{name: "API key scope caps role permissions", p: who{roles: []string{"member"}, perms: []string{"*"}, key: []string{"Agent.read"}}, res: "X", action: "delete", reason: access.ReasonKeyScope},
	{name: "API key scope caps a superadmin", p: who{superadmin: true, key: []string{"Agent.read"}}, res: "X", action: "delete", reason: access.ReasonKeyScope},
	{name: "API key scope caps an allow entry", p: who{key: []string{"Template.*"}}, res: "X", action: "read",
		entries: []entry{{effect: "allow", action: "*", who: "me", res: "X"}}, reason: access.ReasonKeyScope},
	{name: "API key with wildcard scope", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}, key: []string{"*"}}, res: "X", action: "delete", want: true, reason: access.ReasonPermission},
	{name: "API key scope does not grant by itself", p: who{key: []string{"Agent.*"}}, res: "X", action: "read", reason: access.ReasonNoGrant},

	// Actions on the type (create).
	{name: "create with role permission", p: who{roles: []string{"member"}, perms: []string{"Agent.create"}}, action: "create", want: true, reason: access.ReasonPermission},
	{name: "create without permission", p: who{roles: []string{"member"}, perms: []string{"Agent.read"}}, action: "create", reason: access.ReasonNoGrant},
	{name: "create with type-wide allow entry", action: "create", entries: []entry{{effect: "allow", action: "create", who: "me"}}, want: true, reason: access.ReasonAllowEntry},
	{name: "create: type-wide deny via role over permission", p: who{roles: []string{"member", "ops"}, perms: []string{"Agent.*"}}, action: "create",
		entries: []entry{{effect: "deny", action: "create", who: "role:ops"}}, reason: access.ReasonDenyEntry},
	{name: "create: resource entries do not apply", action: "create", entries: []entry{{effect: "allow", action: "*", who: "me", res: "X"}}, reason: access.ReasonNoGrant},
	{name: "create: resource deny does not apply", p: who{perms: []string{"Agent.create"}}, action: "create", entries: []entry{{effect: "deny", action: "*", who: "me", res: "X"}}, want: true, reason: access.ReasonPermission},
	{name: "create outside the key scope", p: who{perms: []string{"*"}, key: []string{"Agent.read"}}, action: "create", reason: access.ReasonKeyScope},
	{name: "create by superadmin", p: who{superadmin: true}, action: "create", entries: []entry{{effect: "deny", action: "*", who: "me"}}, want: true, reason: access.ReasonAllowAlways},
}

// TestDecide runs every case of the decision order through Decide, through
// Decide fed by the SQL of Entries and of AllEntries, through the Guard (which loads
// type-wide entries itself and maps denials to 404 or 403), and through
// the SQL of Filter, which must select exactly the rows Decide allows.
func TestDecide(t *testing.T) {
	if len(decideCases) < 40 {
		t.Fatalf("only %d cases", len(decideCases))
	}
	w := newWorld(t)
	ctx := context.Background()
	names := map[string]bool{}
	for _, tc := range decideCases {
		if names[tc.name] {
			t.Fatalf("two cases named %q", tc.name)
		}
		names[tc.name] = true
		t.Run(tc.name, func(t *testing.T) {
			p := w.principal(t, tc.p)
			scope := agentScope
			if tc.scope != nil {
				scope = *tc.scope
			}
			entries := w.entries(t, p, tc.entries)
			w.store(t, entries)
			var ref *platform.ResourceRef
			if tc.res != "" {
				ref = w.ref(tc.res)
			}

			d := access.Decide(p, scope, tc.action, ref, entries)
			if d.Allowed != tc.want || (tc.reason != "" && d.Reason != tc.reason) {
				t.Fatalf("Decide: want allowed=%v (%s), got %+v", tc.want, tc.reason, d)
			}

			// The Guard: denials are audited, and answered 404 or 403.
			audit := &recorder{}
			g := &access.Guard{DB: w.db, Audit: audit}
			var entriesJSON []byte
			if ref != nil {
				entriesJSON = w.entriesOf(t, tc.res, func(a *sqlq.Args) string { return access.Entries(p, scope, a) })
			}
			err := g.Decide(platform.WithPrincipal(ctx, p), p, scope, tc.action, ref, entriesJSON)
			switch {
			case tc.want && err != nil:
				t.Fatalf("Guard.Decide: want nil, got %v", err)
			case !tc.want:
				wantCode := platform.EFORBIDDEN
				if tc.action == "read" || d.Reason == access.ReasonTenant {
					wantCode = platform.ENOTFOUND
				}
				if got := platform.ErrorCode(err); got != wantCode {
					t.Fatalf("Guard.Decide: want %s, got %v", wantCode, err)
				}
				if len(audit.events) != 1 || audit.events[0].Outcome != "denied" || audit.events[0].Reason != d.Reason {
					t.Fatalf("Guard.Decide: want one denied audit event (%s), got %+v", d.Reason, audit.events)
				}
			}

			// Entries and AllEntries: for every row, Decide on the entries
			// the SQL returns decides as Decide on every entry.
			for _, name := range []string{"X", "Y", "W", "V", "Z", "M"} {
				want := access.Decide(p, scope, tc.action, w.ref(name), entries)
				for expr, fromSQL := range map[string][]byte{
					"Entries":    w.entriesOf(t, name, func(a *sqlq.Args) string { return access.Entries(p, scope, a) }),
					"AllEntries": w.entriesOf(t, name, func(a *sqlq.Args) string { return access.AllEntries(scope, a) }),
				} {
					var got []platform.ACLEntry
					if err := json.Unmarshal(fromSQL, &got); err != nil {
						t.Fatalf("%s of %s: %v: %s", expr, name, err, fromSQL)
					}
					viaSQL := access.Decide(p, scope, tc.action, w.ref(name), got)
					if want.Allowed != viaSQL.Allowed || want.Reason != viaSQL.Reason {
						t.Errorf("row %s: Decide with every entry %+v, with %s %+v (%s)", name, want, expr, viaSQL, fromSQL)
					}
				}
			}

			// Filter: the rows of the principal's organization it selects are
			// exactly those Decide allows.
			org := p.OrgID
			if org == "" {
				org = w.id["A"]
			}
			var args sqlq.Args
			q := "SELECT t.id FROM res t WHERE t.org_id = " + args.Add(org) + " AND (" + access.Filter(p, scope, tc.action, &args) + ")"
			var selected []string
			if err := w.db.SelectContext(ctx, &selected, q, args...); err != nil {
				t.Fatalf("Filter: %v\n%s", err, q)
			}
			var allowed []string
			for name, o := range w.resOrg {
				if w.id[o] == org && access.Decide(p, scope, tc.action, w.ref(name), entries).Allowed {
					allowed = append(allowed, w.id[name])
				}
			}
			sort.Strings(selected)
			sort.Strings(allowed)
			if !slices.Equal(selected, allowed) {
				t.Fatalf("Filter selects %v, Decide allows %v", w.names(selected), w.names(allowed))
			}
			if ref != nil && ref.OrgID == org {
				if slices.Contains(selected, ref.ID) != tc.want {
					t.Fatalf("Filter: %s selected=%v, want %v", tc.res, !tc.want, tc.want)
				}
			}
			if ref != nil && ref.OrgID != org && slices.Contains(selected, ref.ID) {
				t.Fatalf("Filter selects %s of another organization", tc.res)
			}
		})
	}
}

// entriesOf runs a GET-style query of the named row selecting the entries
// expression expr builds (Entries or AllEntries).
func (w *world) entriesOf(t *testing.T, name string, expr func(*sqlq.Args) string) []byte {
	t.Helper()
	var args sqlq.Args
	id := args.Add(w.id[name])
	q := "SELECT " + expr(&args) + " FROM res t WHERE t.id = " + id
	var out []byte
	if err := w.db.GetContext(context.Background(), &out, q, args...); err != nil {
		t.Fatalf("Entries: %v\n%s", err, q)
	}
	return out
}

func (w *world) names(ids []string) []string {
	out := make([]string, 0, len(ids))
	for _, id := range ids {
		for name, v := range w.id {
			if v == id {
				out = append(out, name)
			}
		}
	}
	return out
}

type recorder struct{ events []platform.AuditEvent }

func (r *recorder) Record(_ context.Context, e platform.AuditEvent) { r.events = append(r.events, e) }

// TestGuardClear checks that clearing a collection is for organization
// admins (and always-allowed roles) even when a role grants delete.
func TestGuardClear(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		p    who
		want string
	}{
		{"member with delete permission", who{roles: []string{"member"}, perms: []string{"Agent.*"}}, platform.EFORBIDDEN},
		{"admin", who{roles: []string{"admin"}, perms: []string{"*"}}, ""},
		{"owner", who{roles: []string{"owner"}, perms: []string{"*"}}, ""},
		{"superadmin", who{superadmin: true}, ""},
		{"admin through a key without delete", who{roles: []string{"admin"}, perms: []string{"*"}, key: []string{"Agent.read"}}, platform.EFORBIDDEN},
		{"viewer", who{roles: []string{"viewer"}, perms: []string{"Agent.read"}}, platform.EFORBIDDEN},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := w.principal(t, tc.p)
			g := &access.Guard{DB: w.db, Audit: &recorder{}}
			err := g.Decide(ctx, p, agentScope, "clear", nil, nil)
			if got := platform.ErrorCode(err); got != tc.want {
				t.Fatalf("want %q, got %v", tc.want, err)
			}
		})
	}
}

// TestGuardForget checks that deleting a resource deletes its entries and
// only its entries.
func TestGuardForget(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	p := w.principal(t, who{})
	w.store(t, w.entries(t, p, []entry{
		{effect: "allow", action: "read", who: "me", res: "X"},
		{effect: "deny", action: "*", who: "org", res: "X"},
		{effect: "allow", action: "read", who: "me", res: "W"},
		{effect: "allow", action: "read", who: "me"},
		{effect: "allow", action: "read", who: "me", res: "X", typ: "Template"},
	}))
	tx, err := w.db.BeginTxx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if err := (&access.Guard{DB: w.db}).Forget(ctx, tx, *w.ref("X")); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	var left int
	if err := w.db.GetContext(ctx, &left, "SELECT count(*) FROM acl_entries"); err != nil {
		t.Fatal(err)
	}
	if left != 3 {
		t.Fatalf("want 3 entries left, got %d", left)
	}
}

// BenchmarkDecide is the decision for a cached principal on one resource
// with ten ACL entries: no I/O.
func BenchmarkDecide(b *testing.B) {
	org, user, res := uuid.NewString(), uuid.NewString(), uuid.NewString()
	roles := []platform.RoleRef{{ID: uuid.NewString(), Name: "member"}, {ID: uuid.NewString(), Name: "ops"}}
	perms, _ := platform.ParsePermissions(platform.BuiltinRoles[2].Permissions)
	p := &platform.Principal{ID: user, Kind: platform.KindUser, OrgID: org, Roles: roles, Permissions: perms}
	ref := &platform.ResourceRef{Type: "Agent", ID: res, OrgID: org, OwnerID: uuid.NewString()}
	var entries []platform.ACLEntry
	for i := range 10 {
		e := platform.ACLEntry{ID: uuid.NewString(), OrgID: org, ResourceType: "Agent", ResourceID: res, Action: "read", PrincipalID: uuid.NewString(), Effect: platform.Deny}
		switch i {
		case 3:
			e.Action, e.Effect = "update", platform.Allow
			e.PrincipalID = roles[1].ID
		case 7:
			e.ResourceID, e.PrincipalID = "", org
			e.Action = "delete"
		}
		entries = append(entries, e)
	}
	b.ReportAllocs()
	for b.Loop() {
		if d := access.Decide(p, agentScope, "update", ref, entries); !d.Allowed {
			b.Fatal(fmt.Sprint(d))
		}
	}
}
