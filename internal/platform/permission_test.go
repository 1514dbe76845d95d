package platform_test

import (
	"strings"
	"testing"

	"github.com/agentry/agentry/internal/platform"
)

func TestParsePermission(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want platform.Permission
		ok   bool
	}{
		{"Agent.read", platform.Permission{Type: "Agent", Action: "read"}, true},
		{"Agent.*", platform.Permission{Type: "Agent", Action: "*"}, true},
		{"*.read", platform.Permission{Type: "*", Action: "read"}, true},
		{"*", platform.Permission{Type: "*", Action: "*"}, true},
		{"*.*", platform.Permission{Type: "*", Action: "*"}, true},
		{"ApiKey.create", platform.Permission{Type: "ApiKey", Action: "create"}, true},
		{"Command.retry_all2", platform.Permission{Type: "Command", Action: "retry_all2"}, true},
		{"", platform.Permission{}, false},
		{"Agent", platform.Permission{}, false},
		{"agent.read", platform.Permission{}, false},
		{"Agent.Read", platform.Permission{}, false},
		{"Agent.", platform.Permission{}, false},
		{".read", platform.Permission{}, false},
		{"Agent.read.extra", platform.Permission{}, false},
		{"Agent.re ad", platform.Permission{}, false},
		{"Agent.2read", platform.Permission{}, false},
		{"Agent.rea-d", platform.Permission{}, false},
		{"Age-nt.read", platform.Permission{}, false},
		{"Agent.**", platform.Permission{}, false},
		{"**", platform.Permission{}, false},
		{" Agent.read", platform.Permission{}, false},
		{"Ägent.read", platform.Permission{}, false},
		{strings.Repeat("A", 65) + ".read", platform.Permission{}, false},
		{"Agent." + strings.Repeat("a", 65), platform.Permission{}, false},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := platform.ParsePermission(tc.in)
			if (err == nil) != tc.ok || got != tc.want {
				t.Fatalf("ParsePermission(%q) = %+v, %v; want %+v, ok=%v", tc.in, got, err, tc.want, tc.ok)
			}
		})
	}
}

func TestPermissionGrants(t *testing.T) {
	for _, tc := range []struct {
		perm, typ, action string
		want              bool
	}{
		{"Agent.read", "Agent", "read", true},
		{"Agent.read", "Agent", "update", false},
		{"Agent.read", "Template", "read", false},
		{"Agent.*", "Agent", "delete", true},
		{"Agent.*", "Environment", "delete", false},
		{"*.read", "Template", "read", true},
		{"*.read", "Template", "update", false},
		{"*", "Anything", "whatever", true},
	} {
		p, err := platform.ParsePermission(tc.perm)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Grants(tc.typ, tc.action); got != tc.want {
			t.Errorf("%s grants %s.%s: want %v, got %v", tc.perm, tc.typ, tc.action, tc.want, got)
		}
	}
}

func TestPermissionCovers(t *testing.T) {
	for _, tc := range []struct {
		p, q string
		want bool
	}{
		{"*", "Agent.read", true},
		{"*", "*", true},
		{"Agent.*", "Agent.read", true},
		{"Agent.*", "Agent.*", true},
		{"Agent.*", "*", false},
		{"Agent.*", "*.read", false},
		{"*.read", "Agent.read", true},
		{"*.read", "Agent.*", false},
		{"*.read", "*", false},
		{"Agent.read", "Agent.read", true},
		{"Agent.read", "Agent.*", false},
		{"Agent.read", "Template.read", false},
	} {
		p, _ := platform.ParsePermission(tc.p)
		q, _ := platform.ParsePermission(tc.q)
		if got := p.Covers(q); got != tc.want {
			t.Errorf("%s covers %s: want %v, got %v", tc.p, tc.q, tc.want, got)
		}
	}
}

func TestParsePermissions(t *testing.T) {
	ps, err := platform.ParsePermissions([]string{"Agent.read", "*"})
	if err != nil || len(ps) != 2 {
		t.Fatalf("got %v, %v", ps, err)
	}
	if _, err := platform.ParsePermissions([]string{"Agent.read", "bad"}); err == nil || !strings.Contains(err.Error(), `"bad"`) {
		t.Fatalf("want an error naming the bad permission, got %v", err)
	}
}

// FuzzParsePermission checks that ParsePermission never panics and that
// what it accepts is well formed and survives String and a second parse.
func FuzzParsePermission(f *testing.F) {
	for _, s := range []string{"Agent.read", "Agent.*", "*.read", "*", "*.*", "", ".", "Agent", "a.b", "A.b_1", "Agent.read.x", "Ä.read", "*.", ".*", "A." + strings.Repeat("b", 64)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := platform.ParsePermission(s)
		if err != nil {
			if p != (platform.Permission{}) {
				t.Fatalf("refused %q but returned %+v", s, p)
			}
			return
		}
		if p.Type != "*" && !platform.IsTypeName(p.Type) {
			t.Fatalf("%q: type %q is not a type name", s, p.Type)
		}
		if p.Action != "*" && !platform.IsActionName(p.Action) {
			t.Fatalf("%q: action %q is not an action name", s, p.Action)
		}
		again, err := platform.ParsePermission(p.String())
		if err != nil || again != p {
			t.Fatalf("%q → %+v → %q → %+v, %v", s, p, p.String(), again, err)
		}
		if s != "*.*" && p.String() != s {
			t.Fatalf("%q prints as %q", s, p.String())
		}
		if !p.Covers(p) {
			t.Fatalf("%q does not cover itself", s)
		}
	})
}
