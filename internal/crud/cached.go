package crud

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"reflect"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// ResourceDep is the cache version of one resource; TypeDep that of the
// type-wide ACL entries of a type in an organization; StateDep that of a
// resource's state fields (Resource.State). Writes bump them.
func ResourceDep(typ, id string) string { return "r:" + typ + ":" + id }
func TypeDep(orgID, typ string) string  { return "t:" + orgID + ":" + typ }
func StateDep(typ, id string) string    { return "s:" + typ + ":" + id }

// errNoCache makes Get read the database itself.
var errNoCache = errors.New("no cache")

// cachedRow is what the cache holds for a resource: the row and every ACL
// entry that may apply to it, whoever it names, so the access decision is
// made afresh for each caller.
type cachedRow[T any] struct {
	Row     *T                  `json:"row,omitempty"`
	Entries []platform.ACLEntry `json:"entries"`
}

// loadCached is load through the cache, for reads outside transactions;
// with state false, the copy need not have the latest state fields (see
// GetDefinition), and is cached apart.
func (h *Handle[T]) loadCached(ctx context.Context, p *platform.Principal, id, action string, state bool) (*T, error) {
	// Every spelling of an id shares the entry that writes make stale.
	if u, err := uuid.Parse(id); err == nil {
		id = u.String()
	}
	deps := []string{ResourceDep(h.scope.Type, id), TypeDep(p.OrgID, h.scope.Type)}
	key := "row:" + h.scope.Type + ":" + id
	if h.state {
		if state {
			deps = append(deps, StateDep(h.scope.Type, id))
		} else {
			key = "def:" + h.scope.Type + ":" + id
		}
	}
	data, err := h.reg.Cache.Get(ctx, key, deps, func(ctx context.Context) ([]byte, error) {
		var args sqlq.Args
		idArg := args.Add(id)
		q := "SELECT " + h.m.selectList + ", " + h.reg.Guard.AllEntries(h.scope, &args) + " FROM " + sqlq.Ident(h.table) + " t WHERE t.id = " + idArg
		row := new(T)
		var entries []byte
		err := h.reg.queryRow(ctx, nil, q, args...).Scan(append(h.m.ptrs(reflect.ValueOf(row).Elem()), &entries)...)
		if errors.Is(err, sql.ErrNoRows) {
			return json.Marshal(cachedRow[T]{Entries: []platform.ACLEntry{}})
		}
		if err != nil {
			return nil, err
		}
		c := cachedRow[T]{Row: row}
		if err := json.Unmarshal(entries, &c.Entries); err != nil {
			return nil, err
		}
		return json.Marshal(c)
	})
	var bypass interface{ Bypass() bool }
	if errors.As(err, &bypass) && bypass.Bypass() {
		return nil, errNoCache
	}
	if err != nil {
		return nil, sqlq.MapError(err, h.notFound())
	}
	var c cachedRow[T]
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, errNoCache
	}
	if c.Row == nil {
		return nil, platform.Errorf(platform.ENOTFOUND, "%s", h.notFound())
	}
	ref := any(c.Row).(hasBase).Meta().Ref(h.scope.Type)
	entries, _ := json.Marshal(c.Entries)
	if err := h.reg.Guard.Decide(ctx, p, h.scope, ActionRead, &ref, entries); err != nil {
		return nil, err
	}
	if action != ActionRead {
		if err := h.reg.Guard.Decide(ctx, p, h.scope, action, &ref, entries); err != nil {
			return nil, err
		}
	}
	return c.Row, nil
}
