package access

import (
	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// Filter returns a SQL predicate over the row alias t (columns id, org_id,
// owner_id) that holds exactly for the rows Decide would allow p to do
// action on. It is Decide written in SQL, so that lists are filtered by the
// database and their pages and totals are exact. The per-row parts are
// uncorrelated subqueries, which PostgreSQL evaluates once per statement.
func Filter(p *platform.Principal, s platform.Scope, action string, args *sqlq.Args) string {
	if p.KeyID != "" && !keyAllows(p, s.Type, action) {
		return "FALSE" // 0
	}
	for _, role := range s.AllowAlways {
		if p.HasRole(role) {
			return "TRUE" // 1
		}
	}
	if p.OrgID == "" {
		return "FALSE"
	}
	org := args.Add(p.OrgID)
	// Entries of this organization and type, for this action, naming p,
	// one of its roles or its organization.
	match := "a.org_id = " + org + "::uuid AND a.resource_type = " + args.Add(s.Type) +
		" AND a.action IN (" + args.Add(action) + ", '*') AND a.principal_id = ANY(" + args.Add(pq.Array(p.Subjects())) + "::uuid[])"
	pred := "t.org_id = " + org + "::uuid" + // 2
		" AND NOT EXISTS (SELECT 1 FROM acl_entries a WHERE " + match + " AND a.effect = 'deny' AND a.resource_id IS NULL)" + // 3, type-wide
		" AND t.id NOT IN (SELECT a.resource_id FROM acl_entries a WHERE " + match + " AND a.effect = 'deny' AND a.resource_id IS NOT NULL)" // 3
	if permits(p.Permissions, s.Type, action) {
		return pred // 5, by role permission: every row not denied
	}
	return pred + " AND (t.owner_id = " + args.Add(p.ID) + "::uuid" + // 4
		" OR EXISTS (SELECT 1 FROM acl_entries a WHERE " + match + " AND a.effect = 'allow' AND a.resource_id IS NULL)" + // 5, type-wide
		" OR t.id IN (SELECT a.resource_id FROM acl_entries a WHERE " + match + " AND a.effect = 'allow' AND a.resource_id IS NOT NULL))" // 5
}

// Entries returns a SQL expression over the row alias t giving, as a JSON
// array, the ACL entries of t's organization and type that name p, one of
// its roles or its organization, and apply to t or to the whole type.
func Entries(p *platform.Principal, s platform.Scope, args *sqlq.Args) string {
	for _, role := range s.AllowAlways {
		if p.HasRole(role) {
			return "'[]'::json"
		}
	}
	return "COALESCE((SELECT json_agg(json_build_object('id', a.id, 'org_id', a.org_id, 'resource_type', a.resource_type, " +
		"'resource_id', a.resource_id, 'action', a.action, 'principal_id', a.principal_id, 'effect', a.effect)) " +
		"FROM acl_entries a WHERE a.org_id = t.org_id AND a.resource_type = " + args.Add(s.Type) +
		" AND (a.resource_id IS NULL OR a.resource_id = t.id) AND a.principal_id = ANY(" + args.Add(pq.Array(p.Subjects())) + "::uuid[])), '[]'::json)"
}

// AllEntries returns a SQL expression over the row alias t giving, as a
// JSON array, every ACL entry of t's organization and type that applies to
// t or to the whole type, whoever it names: what a cached row carries, so
// that Decide can judge any caller from the cache.
func AllEntries(s platform.Scope, args *sqlq.Args) string {
	return "COALESCE((SELECT json_agg(json_build_object('id', a.id, 'org_id', a.org_id, 'resource_type', a.resource_type, " +
		"'resource_id', a.resource_id, 'action', a.action, 'principal_id', a.principal_id, 'effect', a.effect)) " +
		"FROM acl_entries a WHERE a.org_id = t.org_id AND a.resource_type = " + args.Add(s.Type) +
		" AND (a.resource_id IS NULL OR a.resource_id = t.id)), '[]'::json)"
}
