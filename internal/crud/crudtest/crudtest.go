// Package crudtest gives tests and benchmarks of the CRUD framework a guard
// that enforces tenancy and ownership only, and a principal taken from
// request headers, so the framework can be exercised before (and apart
// from) the access package.
package crudtest

import (
	"context"
	"net/http"

	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// Headers carrying the test principal.
const (
	UserHeader = "X-Test-User"
	OrgHeader  = "X-Test-Org"
	// ReadOnlyHeader makes the principal a reader: writes on others'
	// resources are forbidden, creating is forbidden.
	ReadOnlyHeader = "X-Test-Readonly"
)

// Middleware puts the principal named by the test headers into the request.
func Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if user := r.Header.Get(UserHeader); user != "" {
			p := &platform.Principal{ID: user, Kind: platform.KindUser, OrgID: r.Header.Get(OrgHeader)}
			if r.Header.Get(ReadOnlyHeader) != "" {
				p.Roles = []platform.RoleRef{{ID: "reader", Name: platform.RoleViewer}}
			} else {
				p.Roles = []platform.RoleRef{{ID: "admin", Name: platform.RoleAdmin}}
			}
			r = r.WithContext(platform.WithPrincipal(r.Context(), p))
		}
		next.ServeHTTP(w, r)
	})
}

// Guard allows an organization's members to read everything in it, its
// admins to do everything, and readers to write only what they own.
type Guard struct{}

func (Guard) Caller(ctx context.Context) (*platform.Principal, error) {
	if p := platform.PrincipalFrom(ctx); p != nil {
		return p, nil
	}
	return nil, platform.Errorf(platform.EUNAUTHORIZED, "authentication required")
}

func (Guard) Decide(ctx context.Context, p *platform.Principal, scope platform.Scope, action string, ref *platform.ResourceRef, entries []byte) error {
	if ref != nil && ref.OrgID != p.OrgID {
		return platform.Errorf(platform.ENOTFOUND, "not found")
	}
	if action == "read" || p.IsOrgAdmin() || (ref != nil && ref.OwnerID == p.ID) {
		return nil
	}
	return platform.Errorf(platform.EFORBIDDEN, "you may not %s this", action)
}

func (Guard) Entries(*platform.Principal, platform.Scope, *sqlq.Args) string { return "'[]'::json" }

func (Guard) Filter(p *platform.Principal, _ platform.Scope, action string, args *sqlq.Args) string {
	if action == "read" || p.IsOrgAdmin() {
		return "TRUE"
	}
	return "t.owner_id = " + args.Add(p.ID)
}

func (Guard) Forget(context.Context, *sqlx.Tx, platform.ResourceRef) error { return nil }

func (Guard) AllEntries(platform.Scope, *sqlq.Args) string { return "'[]'::json" }
