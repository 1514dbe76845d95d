package platform_test

import (
	"context"
	"slices"
	"testing"

	"github.com/agentry/agentry/internal/platform"
)

func TestPrincipalHasRole(t *testing.T) {
	p := &platform.Principal{ID: "u", OrgID: "o", Roles: []platform.RoleRef{{ID: "r1", Name: "member"}, {ID: "r2", Name: "superadmin"}}}
	if !p.HasRole("member") || p.HasRole("admin") {
		t.Fatal("HasRole does not follow Roles")
	}
	// A custom role an organization named "superadmin" is not the platform role.
	if p.HasRole(platform.RoleSuperadmin) {
		t.Fatal("an organization role named superadmin counts as the platform role")
	}
	p.Superadmin = true
	if !p.HasRole(platform.RoleSuperadmin) {
		t.Fatal("the platform superadmin does not hold the superadmin role")
	}
	if p.IsOrgAdmin() {
		t.Fatal("a member is an org admin")
	}
	for _, r := range []string{platform.RoleOwner, platform.RoleAdmin} {
		q := &platform.Principal{Roles: []platform.RoleRef{{Name: r}}}
		if !q.IsOrgAdmin() {
			t.Fatalf("%s is not an org admin", r)
		}
	}
}

func TestPrincipalSubjects(t *testing.T) {
	p := &platform.Principal{ID: "u", OrgID: "o", Roles: []platform.RoleRef{{ID: "r1"}, {ID: "r2"}}}
	if got, want := p.Subjects(), []string{"u", "r1", "r2", "o"}; !slices.Equal(got, want) {
		t.Fatalf("want %v, got %v", want, got)
	}
	noOrg := &platform.Principal{ID: "u"}
	if got := noOrg.Subjects(); !slices.Equal(got, []string{"u"}) {
		t.Fatalf("without an organization: %v", got)
	}
}

func TestPrincipalContext(t *testing.T) {
	ctx := context.Background()
	if platform.PrincipalFrom(ctx) != nil {
		t.Fatal("a principal from nowhere")
	}
	p := &platform.Principal{ID: "u"}
	if platform.PrincipalFrom(platform.WithPrincipal(ctx, p)) != p {
		t.Fatal("the principal is lost")
	}
}

func TestBuiltinRolePermissionsParse(t *testing.T) {
	for _, r := range platform.BuiltinRoles {
		if _, err := platform.ParsePermissions(r.Permissions); err != nil {
			t.Errorf("%s: %v", r.Name, err)
		}
	}
}
