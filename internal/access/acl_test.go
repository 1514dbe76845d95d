package access_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/platform"
)

func TestCanAdminister(t *testing.T) {
	w := &world{id: map[string]string{}, resOrg: map[string]string{"X": "A", "Y": "A", "M": "B"}, resOwner: map[string]string{"X": "other", "Y": "user", "M": "user"}}
	for _, name := range []string{"A", "B", "user", "other", "agent", "A/owner", "A/admin", "A/member", "A/security", "X", "Y", "M"} {
		w.id[name] = uuid.NewString()
	}
	withSecurity := platform.Scope{Type: "Agent", ACLAdmins: []string{"security"}}
	for _, tc := range []struct {
		name  string
		p     who
		scope *platform.Scope
		res   string // "" for the type-wide ACL
		want  bool
	}{
		{name: "owner of the resource", res: "Y", want: true},
		{name: "member, not the owner", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}, res: "X"},
		{name: "org admin", p: who{roles: []string{"admin"}, perms: []string{"*"}}, res: "X", want: true},
		{name: "org owner", p: who{roles: []string{"owner"}, perms: []string{"*"}}, res: "X", want: true},
		{name: "superadmin (acl_admins)", p: who{superadmin: true}, res: "X", want: true},
		{name: "superadmin in another organization", p: who{superadmin: true}, res: "M", want: true},
		{name: "owner of a resource in another organization", res: "M"},
		{name: "org admin, resource of another organization", p: who{roles: []string{"admin"}, perms: []string{"*"}}, res: "M"},
		{name: "type-wide: org admin", p: who{roles: []string{"admin"}, perms: []string{"*"}}, want: true},
		{name: "type-wide: member", p: who{roles: []string{"member"}, perms: []string{"Agent.*"}}},
		{name: "type-wide: superadmin", p: who{superadmin: true}, want: true},
		{name: "acl_admins role", p: who{roles: []string{"security"}}, scope: &withSecurity, res: "X", want: true},
		{name: "acl_admins role, resource of another organization", p: who{roles: []string{"security"}}, scope: &withSecurity, res: "M"},
		{name: "no organization", p: who{org: "-"}, res: "Y"},
		{name: "owner through a key without Acl.update", p: who{key: []string{"Agent.*"}}, res: "Y"},
		{name: "owner through a key with Acl.update", p: who{key: []string{"Agent.read", "Acl.update"}}, res: "Y", want: true},
		{name: "admin through a key without Acl.update", p: who{roles: []string{"admin"}, perms: []string{"*"}, key: []string{"Agent.*"}}, res: "X"},
		{name: "superadmin through a key without Acl.update", p: who{superadmin: true, key: []string{"Agent.read"}}, res: "X"},
		{name: "superadmin through a key with *", p: who{superadmin: true, key: []string{"*"}}, res: "X", want: true},
		{name: "acl_admins role through a key without Acl.update", p: who{roles: []string{"security"}, key: []string{"Agent.read"}}, scope: &withSecurity, res: "X"},
		{name: "agent owning the resource, key without Acl.update", p: who{agent: true, key: []string{"Agent.*"}}, res: "Y"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := w.principal(t, tc.p)
			scope := agentScope
			if tc.scope != nil {
				scope = *tc.scope
			}
			var ref *platform.ResourceRef
			if tc.res != "" {
				ref = w.ref(tc.res)
			}
			if got := access.CanAdminister(p, scope, ref); got != tc.want {
				t.Fatalf("want %v, got %v", tc.want, got)
			}
		})
	}
}

type auditStore struct {
	mu     sync.Mutex
	events []platform.AuditEvent
}

func (s *auditStore) Record(_ context.Context, e platform.AuditEvent) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, e)
	return nil
}

func TestACLGrantListRevoke(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	// The principal user is a member of A; "other" of B only.
	for _, m := range []struct{ org, user, role string }{{"A", "user", "A/member"}, {"B", "other", "B/member"}} {
		if _, err := w.db.ExecContext(ctx, "INSERT INTO memberships (id, org_id, owner_id, user_id, role_id) VALUES ($1, $2, $3, $3, $4)",
			uuid.NewString(), w.id[m.org], w.id[m.user], w.id[m.role]); err != nil {
			t.Fatal(err)
		}
	}
	audits := &auditStore{}
	acl := &access.ACL{DB: w.db, Audit: &access.Audit{Store: audits}}
	owner := w.principal(t, who{roles: []string{"member"}}) // owns Y
	admin := w.principal(t, who{roles: []string{"admin"}, perms: []string{"*"}})
	stranger := w.principal(t, who{roles: []string{"member"}, perms: []string{"Agent.read"}})
	stranger.ID = w.id["other"]
	y := w.ref("Y")

	grant := func(p *platform.Principal, ref *platform.ResourceRef, principal, action, effect string) (*platform.ACLEntry, error) {
		return acl.Grant(platform.WithPrincipal(ctx, p), p, agentScope, ref, platform.ACLGrant{PrincipalID: principal, Action: action, Effect: effect})
	}

	e, err := grant(owner, y, w.id["A/ops"], "read", platform.Allow)
	if err != nil {
		t.Fatal(err)
	}
	if e.ResourceID != y.ID || e.OrgID != w.id["A"] || e.ResourceType != "Agent" || e.Effect != platform.Allow {
		t.Fatalf("entry: %+v", e)
	}
	again, err := grant(owner, y, w.id["A/ops"], "read", platform.Allow)
	if err != nil || again.ID != e.ID {
		t.Fatalf("granting twice: want the same entry %s, got %+v, %v", e.ID, again, err)
	}
	for _, tc := range []struct {
		name                      string
		principal, action, effect string
		field                     string
	}{
		{"bad action", w.id["A/ops"], "Read", platform.Allow, "body.action"},
		{"bad effect", w.id["A/ops"], "read", "maybe", "body.effect"},
		{"principal not a UUID", "ops", "read", platform.Allow, "body.principal_id"},
		{"user of another organization", w.id["other"], "read", platform.Allow, "body.principal_id"},
		{"role of another organization", w.id["B/member"], "read", platform.Allow, "body.principal_id"},
		{"another organization", w.id["B"], "read", platform.Allow, "body.principal_id"},
		{"no such entity", uuid.NewString(), "read", platform.Allow, "body.principal_id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := grant(owner, y, tc.principal, tc.action, tc.effect)
			var perr *platform.Error
			if platform.ErrorCode(err) != platform.EINVALID || !errors.As(err, &perr) || len(perr.Fields) == 0 || perr.Fields[0].Field != tc.field {
				t.Fatalf("want EINVALID naming %s, got %v", tc.field, err)
			}
		})
	}
	if _, err := grant(stranger, y, stranger.ID, "*", platform.Allow); platform.ErrorCode(err) != platform.EFORBIDDEN {
		t.Fatalf("a non-owner grants: %v", err)
	}
	if _, err := grant(owner, nil, owner.ID, "*", platform.Allow); platform.ErrorCode(err) != platform.EFORBIDDEN {
		t.Fatalf("a member grants type-wide: %v", err)
	}
	typeWide, err := grant(admin, nil, w.id["A"], "read", platform.Deny)
	if err != nil || typeWide.ResourceID != "" {
		t.Fatalf("an admin grants type-wide: %+v, %v", typeWide, err)
	}

	list, err := acl.List(ctx, owner, agentScope, y)
	if err != nil || len(list) != 1 || list[0].ID != e.ID {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if _, err := acl.List(ctx, stranger, agentScope, y); platform.ErrorCode(err) != platform.EFORBIDDEN {
		t.Fatalf("a non-owner lists: %v", err)
	}
	all, err := acl.List(ctx, admin, platform.Scope{}, nil)
	if err != nil || len(all) != 2 {
		t.Fatalf("every entry of the organization: %+v, %v", all, err)
	}

	// Revoking through another resource, or type-wide, finds nothing.
	if err := acl.Revoke(ctx, admin, agentScope, w.ref("X"), e.ID); platform.ErrorCode(err) != platform.ENOTFOUND {
		t.Fatalf("revoke through another resource: %v", err)
	}
	if err := acl.Revoke(ctx, admin, agentScope, nil, e.ID); platform.ErrorCode(err) != platform.ENOTFOUND {
		t.Fatalf("revoke a resource's entry type-wide: %v", err)
	}
	if err := acl.Revoke(ctx, owner, agentScope, y, e.ID); err != nil {
		t.Fatal(err)
	}
	if err := acl.Revoke(ctx, owner, agentScope, y, e.ID); platform.ErrorCode(err) != platform.ENOTFOUND {
		t.Fatalf("revoke twice: %v", err)
	}
	if err := acl.Revoke(ctx, admin, agentScope, nil, typeWide.ID); err != nil {
		t.Fatal(err)
	}
	var grants, revokes, denied int
	for _, ev := range audits.events {
		switch {
		case ev.Action == "acl.grant" && ev.Outcome == "ok":
			grants++
		case ev.Action == "acl.revoke" && ev.Outcome == "ok":
			revokes++
		case ev.Outcome == "denied":
			denied++
		}
	}
	if grants != 3 || revokes != 2 || denied != 3 {
		t.Fatalf("audit: %d grants, %d revokes, %d denied: %+v", grants, revokes, denied, audits.events)
	}
}

func TestACLIdenticalGrantsAtOnce(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	acl := &access.ACL{DB: w.db, Audit: &access.Audit{Store: &auditStore{}}}
	owner := w.principal(t, who{roles: []string{"member"}}) // owns Y
	y := w.ref("Y")
	grant := func(p *platform.Principal, ref *platform.ResourceRef, principal, action, effect string) (*platform.ACLEntry, error) {
		return acl.Grant(platform.WithPrincipal(ctx, p), p, agentScope, ref, platform.ACLGrant{PrincipalID: principal, Action: action, Effect: effect})
	}
	// The same entry granted many times at once: one entry, every grant
	// answers it (those that waited for another's insert answered 404).
	var wg sync.WaitGroup
	ids := make([]string, 8)
	for i := range ids {
		wg.Go(func() {
			e, err := grant(owner, y, w.id["A/ops"], "update", platform.Allow)
			if err != nil {
				t.Errorf("grant %d at once: %v", i, err)
				return
			}
			ids[i] = e.ID
		})
	}
	wg.Wait()
	for _, id := range ids {
		if id != ids[0] {
			t.Fatalf("identical grants at once made different entries: %v", ids)
		}
	}
}
