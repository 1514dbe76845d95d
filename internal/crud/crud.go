// Package crud is agentry's generic resource framework (the seed's
// CRUDBase). Registering a model type with Register gives it the REST
// operations of DESIGN.md, in the OpenAPI document and on the router: create,
// read, replace (PUT), update (PATCH, JSON merge patch), delete, list (paged,
// sorted, filtered, authorised in SQL) and clear. Each can be switched off.
//
// A model is a struct embedding Base whose `db` tags name its columns; an
// input struct lists the fields a client may set, with Huma validation tags.
// Server-owned fields (id, org_id, owner_id, timestamps, version, and any
// field the input type leaves out) can therefore never be mass-assigned.
// Access decisions come from a Guard, so the same rules cover every route.
package crud

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"strings"

	"github.com/danielgtaylor/huma/v2"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// Base is embedded by every model: the columns every resource row has.
type Base = platform.Base

type hasBase interface{ Meta() *platform.Base }

// Op is a set of operations.
type Op uint8

// The operations a resource can offer.
const (
	OpCreate  Op = 1 << iota // POST   /v1/{plural}
	OpRead                   // GET    /v1/{plural}/{id}
	OpReplace                // PUT    /v1/{plural}/{id}
	OpUpdate                 // PATCH  /v1/{plural}/{id}
	OpDelete                 // DELETE /v1/{plural}/{id}
	OpList                   // GET    /v1/{plural}
	OpClear                  // DELETE /v1/{plural}
	OpACL                    // GET, POST /v1/{plural}/{id}/acl and DELETE /v1/{plural}/{id}/acl/{entry_id}
	AllOps    = OpCreate | OpRead | OpReplace | OpUpdate | OpDelete | OpList | OpClear | OpACL
)

// Actions the framework asks the Guard about.
const (
	ActionCreate = "create"
	ActionRead   = "read"
	ActionUpdate = "update"
	ActionDelete = "delete"
	ActionClear  = "clear"
)

// Guard makes the framework's access decisions. The access package
// implements it from DESIGN.md's decision order.
type Guard interface {
	// Caller returns the request's principal, or an EUNAUTHORIZED error.
	Caller(ctx context.Context) (*platform.Principal, error)
	// Decide returns nil when p may do action on the resource ref (nil for
	// an action on the type: create, clear), ENOTFOUND when p may not even
	// see it, EFORBIDDEN when p sees it but may not do this. entries is the
	// JSON array the Entries expression produced for the row.
	Decide(ctx context.Context, p *platform.Principal, scope platform.Scope, action string, ref *platform.ResourceRef, entries []byte) error
	// Entries returns a SQL expression over the row alias t giving, as a JSON
	// array, the ACL entries that may apply to p on that row.
	Entries(p *platform.Principal, scope platform.Scope, args *sqlq.Args) string
	// Filter returns a SQL predicate over the row alias t that holds exactly
	// for the rows of p's organization p may do action on.
	Filter(p *platform.Principal, scope platform.Scope, action string, args *sqlq.Args) string
	// Forget deletes the ACL entries of a deleted resource, in its transaction.
	Forget(ctx context.Context, tx *sqlx.Tx, ref platform.ResourceRef) error
	// AllEntries returns a SQL expression over the row alias t giving, as a
	// JSON array, every ACL entry of t's organization that applies to t or
	// to its whole type, whoever it names (what a cached row carries).
	AllEntries(scope platform.Scope, args *sqlq.Args) string
}

// Cache is the read-through cache of single resources (the cache package
// implements it). Get returns the bytes cached for key under the current
// versions of deps, loading them on a miss; an error with a Bypass() true
// method means the cache cannot vouch for freshness and the source must be
// read. Bump makes everything cached under deps stale.
type Cache interface {
	Get(ctx context.Context, key string, deps []string, load func(context.Context) ([]byte, error)) ([]byte, error)
	Bump(ctx context.Context, deps ...string) error
}

// ACLManager lists and edits the ACL of one resource; the access package
// implements it, deciding who may.
type ACLManager interface {
	// CanAdminister reports whether p may see and change ref's ACL.
	CanAdminister(p *platform.Principal, s platform.Scope, ref *platform.ResourceRef) bool
	List(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef) ([]platform.ACLEntry, error)
	Grant(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef, g platform.ACLGrant) (*platform.ACLEntry, error)
	Revoke(ctx context.Context, p *platform.Principal, s platform.Scope, ref *platform.ResourceRef, entryID string) error
}

// Change describes a committed write, for observers (events, cache, audit).
type Change struct {
	Op    Op
	Scope platform.Scope
	Ref   platform.ResourceRef
	// Row is the model value after the change (before it, for a delete).
	Row any
}

// Registry holds what every resource shares: the API to register
// operations on, the database, the guard and the write observers.
type Registry struct {
	API   huma.API
	DB    *sqlx.DB
	Guard Guard
	// ACL, when set, gives every resource with OpACL its ACL routes.
	ACL ACLManager
	// Cache, when set, serves the single-resource reads of resources
	// registered with Cached.
	Cache        Cache
	MaxBodyBytes int64
	observers    []func(context.Context, Change)
	scopes       map[string]platform.Scope
	stmts        stmtCache
}

// Scope returns the scope of a registered resource type.
func (r *Registry) Scope(typ string) (platform.Scope, bool) {
	s, ok := r.scopes[typ]
	return s, ok
}

// Scopes returns every registered resource type's scope.
func (r *Registry) Scopes() []platform.Scope {
	out := make([]platform.Scope, 0, len(r.scopes))
	for _, s := range r.scopes {
		out = append(out, s)
	}
	return out
}

// AddScope registers the scope of a resource type served by custom routes.
func (r *Registry) AddScope(s platform.Scope) {
	if r.scopes == nil {
		r.scopes = map[string]platform.Scope{}
	}
	r.scopes[s.Type] = s
}

// Observe adds fn to the functions called after every committed write of
// every resource. fn must not block.
func (r *Registry) Observe(fn func(context.Context, Change)) { r.observers = append(r.observers, fn) }

func (r *Registry) notify(ctx context.Context, c Change) {
	for _, fn := range r.observers {
		fn(ctx, c)
	}
}

// Filter is a list filter: the query parameter Param restricts Column with
// Op (default "="). The value is parsed as the column's Go type; a uuid
// column's value must be a UUID.
type Filter struct {
	Param  string
	Column string
	Op     string // =, <, <=, >, >=
	Doc    string
}

// Resource describes one model type T and its input type In.
type Resource[T, In any] struct {
	// Scope names the resource type for permissions ("Agent") and its ACL
	// administrators.
	Scope platform.Scope
	// Path is the collection path, "/v1/agents".
	Path string
	// Table is the SQL table.
	Table string
	// Ops are the operations switched on; zero means AllOps.
	Ops Op
	// Tag groups the operations in the documentation.
	Tag string
	// Description is prepended to each operation's description.
	Description string
	// Sort lists the JSON field names a list may be sorted by; DefaultSort is
	// the order without ?sort ("-created_at" if empty).
	Sort        []string
	DefaultSort string
	// Filters are the list's filters.
	Filters []Filter
	// Validate checks what a schema cannot; it returns every bad field.
	Validate func(ctx context.Context, in *In) []platform.FieldError
	// View transforms a row before it is answered (redacting secrets).
	View func(ctx context.Context, row *T)
	// Cached serves this resource's single reads from Registry.Cache. The
	// model must round-trip through JSON (no json:"-" fields), and every
	// write of its rows outside the framework must call Handle.Notify.
	Cached bool
	// State, with Cached, tells that fields of this resource's rows change
	// outside its API, often (an agent's status, as it runs commands): such
	// a change bumps StateDep, not the resource's version, so that
	// GetDefinition keeps serving the rest from the cache. Get's copy
	// depends on both.
	State bool
	// Hooks run inside the write's transaction, before the statement. They
	// may change row (server-owned fields) or refuse with an error.
	BeforeCreate func(ctx context.Context, tx *sqlx.Tx, in *In, row *T) error
	BeforeUpdate func(ctx context.Context, tx *sqlx.Tx, in *In, old, row *T) error
	BeforeDelete func(ctx context.Context, tx *sqlx.Tx, row *T) error
	// AfterWrite runs inside the transaction after the statement, with the
	// stored row (audit rows, dependent rows).
	AfterWrite func(ctx context.Context, tx *sqlx.Tx, op Op, row *T) error
	// AfterCommit runs once the write is committed: what must not happen
	// for a write that may still roll back, or must see it (dropping
	// cached facts that a concurrent reader would otherwise load again
	// from before the commit, audit records).
	AfterCommit func(ctx context.Context, op Op, row *T)
}

// Handle gives custom routes of a resource the framework's loaders, so they
// decide access exactly as the CRUD routes do.
type Handle[T any] struct {
	reg    *Registry
	scope  platform.Scope
	table  string
	m      *model
	view   func(context.Context, *T)
	create func(ctx context.Context, body []byte) (*T, error)
	cached bool
	state  bool
}

// Create creates a resource from a JSON body of the resource's input type,
// exactly as POST on the collection does (schema, validation, hooks,
// access). Template instantiation creates resources through it.
// A resource without the create operation is ENOTALLOWED.
func (h *Handle[T]) Create(ctx context.Context, body []byte) (*T, error) {
	if h.create == nil {
		return nil, platform.Errorf(platform.ENOTALLOWED, "%s resources are not created this way", h.scope.Type)
	}
	return h.create(ctx, body)
}

type resource[T, In any] struct {
	Resource[T, In]
	Handle[T]
	in       fieldMap
	inSchema *huma.Schema
	sorts    map[string]*column
	filters  map[string]filterSpec
	// updateCols are every column but the immutable ones.
	updateCols []string
}

// Register adds the operations of res to reg.API and returns a Handle for
// its custom routes. It panics on a misdescribed resource: a programming
// error that the first test run catches.
func Register[T, In any](reg *Registry, res Resource[T, In]) *Handle[T] {
	if _, ok := any(new(T)).(hasBase); !ok {
		panic(fmt.Sprintf("crud: %T does not embed crud.Base", *new(T)))
	}
	if res.Ops == 0 {
		res.Ops = AllOps
	}
	if res.DefaultSort == "" {
		res.DefaultSort = "-created_at"
	}
	if res.Tag == "" {
		res.Tag = res.Scope.Type
	}
	m := modelOf(reflect.TypeFor[T]())
	r := &resource[T, In]{
		Resource: res,
		Handle:   Handle[T]{reg: reg, scope: res.Scope, table: res.Table, m: m, view: res.View},
		in:       mapInput(reflect.TypeFor[In](), m),
		sorts:    map[string]*column{},
		filters:  map[string]filterSpec{},
	}
	for _, c := range m.cols {
		switch c.name {
		case "id", "org_id", "created_at", "updated_at", "version":
		default:
			r.updateCols = append(r.updateCols, c.name)
		}
	}
	sortable := append([]string{"created_at", "updated_at"}, res.Sort...)
	for _, name := range sortable {
		c := m.byJSON[name]
		if c == nil {
			panic(fmt.Sprintf("crud: %s cannot sort by %q: no such field", res.Scope.Type, name))
		}
		if _, ok := pgCast(c.typ); !ok {
			panic(fmt.Sprintf("crud: %s cannot sort by %q: type %s", res.Scope.Type, name, c.typ))
		}
		r.sorts[name] = c
	}
	if _, err := r.parseSort(res.DefaultSort); err != nil {
		panic(fmt.Sprintf("crud: %s: default sort: %v", res.Scope.Type, err))
	}
	for _, f := range res.Filters {
		r.filters[f.Param] = r.filterSpec(f)
	}
	if res.Ops&(OpCreate|OpReplace|OpUpdate) != 0 {
		// Only a resource clients write has an input schema to publish.
		r.inSchema = reg.API.OpenAPI().Components.Schemas.Schema(reflect.TypeFor[In](), true, "")
	}
	reg.AddScope(res.Scope)
	if res.Ops&OpCreate != 0 {
		r.Handle.create = r.createJSON
	}
	if res.Cached {
		for _, c := range m.cols {
			if c.json == "" {
				panic(fmt.Sprintf("crud: %s is cached but its field %s is not in its JSON", res.Scope.Type, c.name))
			}
		}
		r.Handle.cached = true
		r.Handle.state = res.State
	}
	r.register()
	return &r.Handle
}

// singular and plural name the resource in operation ids: "agent", "agents".
func (r *resource[T, In]) names() (singular, plural string) {
	plural = r.Path[strings.LastIndex(r.Path, "/")+1:]
	return strings.ToLower(r.Scope.Type), plural
}

func (r *resource[T, In]) operation(method, path, id, summary, desc string, status int, errs ...int) huma.Operation {
	if r.Description != "" {
		desc = r.Description + "\n\n" + desc
	}
	return huma.Operation{
		OperationID:   id,
		Method:        method,
		Path:          path,
		Summary:       summary,
		Description:   desc,
		Tags:          []string{r.Tag},
		DefaultStatus: status,
		MaxBodyBytes:  r.reg.MaxBodyBytes,
		Security:      []map[string][]string{{"bearer": {}}},
		Errors:        append([]int{http.StatusBadRequest, http.StatusUnauthorized}, errs...),
	}
}

// ctxKey-free helpers ------------------------------------------------------

// begin starts the write transaction of one request.
func (h *Handle[T]) begin(ctx context.Context) (*sqlx.Tx, error) {
	return h.reg.DB.BeginTxx(ctx, nil)
}

// selectOne returns the statement loading one row by id with its ACL entries.
func (h *Handle[T]) selectOne(p *platform.Principal, forUpdate bool) (string, sqlq.Args) {
	var args sqlq.Args
	id := args.Add(nil) // $1 is the id, set by the caller
	entries := h.reg.Guard.Entries(p, h.scope, &args)
	q := "SELECT " + h.m.selectList + ", " + entries + " FROM " + sqlq.Ident(h.table) + " t WHERE t.id = " + id
	if forUpdate {
		// NO KEY UPDATE: the row is locked against other writes, but rows
		// referencing it (a template's children) can still be checked.
		q += " FOR NO KEY UPDATE OF t"
	}
	return q, args
}

// load reads the row id (in tx, if not nil) and decides action on it for
// p. A row p may not see is ENOTFOUND, exactly like a missing one.
func (h *Handle[T]) load(ctx context.Context, tx *sqlx.Tx, p *platform.Principal, id, action string, forUpdate bool) (*T, error) {
	query, args := h.selectOne(p, forUpdate)
	args[0] = id
	row := new(T)
	var entries []byte
	dest := append(h.m.ptrs(reflect.ValueOf(row).Elem()), &entries)
	if err := h.reg.queryRow(ctx, tx, query, args...).Scan(dest...); err != nil {
		return nil, sqlq.MapError(err, h.notFound())
	}
	ref := any(row).(hasBase).Meta().Ref(h.scope.Type)
	if err := h.reg.Guard.Decide(ctx, p, h.scope, ActionRead, &ref, entries); err != nil {
		return nil, err
	}
	if action != ActionRead {
		if err := h.reg.Guard.Decide(ctx, p, h.scope, action, &ref, entries); err != nil {
			return nil, err
		}
	}
	return row, nil
}

func (h *Handle[T]) notFound() string { return strings.ToLower(h.scope.Type) + " not found" }

// Get returns the row id if the request's caller may do action on it
// (ENOTFOUND if it may not see it, EFORBIDDEN if it may see but not act).
// It is how custom routes load a resource.
func (h *Handle[T]) Get(ctx context.Context, id, action string) (*T, *platform.Principal, error) {
	return h.get(ctx, id, action, true)
}

// GetDefinition is Get for a caller that needs the row's definition and
// access, not its state (see Resource.State): those are as fresh as Get's,
// but the state fields may be older than the last StateChanged. Dispatching
// to an agent reads it so: its status flips with every command it runs,
// which would leave Get's cached copy mostly stale.
func (h *Handle[T]) GetDefinition(ctx context.Context, id, action string) (*T, *platform.Principal, error) {
	return h.get(ctx, id, action, false)
}

// get is Get, through the cache if the resource is cached (with its latest
// state fields if state).
func (h *Handle[T]) get(ctx context.Context, id, action string, state bool) (*T, *platform.Principal, error) {
	p, err := h.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, nil, err
	}
	if h.cached && h.reg.Cache != nil {
		row, err := h.loadCached(ctx, p, id, action, state)
		if !errors.Is(err, errNoCache) {
			return row, p, err
		}
	}
	row, err := h.load(ctx, nil, p, id, action, false)
	return row, p, err
}

// GetForUpdate is Get inside tx, locking the row until tx ends.
func (h *Handle[T]) GetForUpdate(ctx context.Context, tx *sqlx.Tx, id, action string) (*T, *platform.Principal, error) {
	p, err := h.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, nil, err
	}
	row, err := h.load(ctx, tx, p, id, action, true)
	return row, p, err
}

// Query runs a custom SELECT built by build, which must select Columns()
// and then the entries expression it is given, over alias t. It decides
// action on every row and fails with the first refusal (ENOTFOUND for a row
// the caller may not see): custom routes reading several rows (a template's
// inheritance chain) decide exactly as the CRUD routes do.
func (h *Handle[T]) Query(ctx context.Context, action string, build func(cols, entries string, args *sqlq.Args) string) ([]*T, *platform.Principal, error) {
	p, err := h.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, nil, err
	}
	var args sqlq.Args
	q := build(h.m.selectList, h.reg.Guard.Entries(p, h.scope, &args), &args)
	rows, err := h.reg.DB.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, nil, sqlq.MapError(err, h.notFound())
	}
	defer rows.Close()
	var out []*T
	for rows.Next() {
		row := new(T)
		var entries []byte
		if err := rows.Scan(append(h.m.ptrs(reflect.ValueOf(row).Elem()), &entries)...); err != nil {
			return nil, nil, err
		}
		ref := any(row).(hasBase).Meta().Ref(h.scope.Type)
		if err := h.reg.Guard.Decide(ctx, p, h.scope, ActionRead, &ref, entries); err != nil {
			return nil, nil, err
		}
		if action != ActionRead {
			if err := h.reg.Guard.Decide(ctx, p, h.scope, action, &ref, entries); err != nil {
				return nil, nil, err
			}
		}
		out = append(out, row)
	}
	return out, p, rows.Err()
}

// Render applies the resource's response transformation to row.
func (h *Handle[T]) Render(ctx context.Context, row *T) *T {
	if h.view != nil {
		h.view(ctx, row)
	}
	return row
}

// Notify tells the registry's observers about a write a custom route made
// (after it committed, before it answers), and makes the cached copy stale.
func (h *Handle[T]) Notify(ctx context.Context, op Op, row *T) {
	ref := any(row).(hasBase).Meta().Ref(h.scope.Type)
	if h.cached && h.reg.Cache != nil {
		_ = h.reg.Cache.Bump(ctx, ResourceDep(ref.Type, ref.ID))
	}
	h.reg.notify(ctx, Change{Op: op, Scope: h.scope, Ref: ref, Row: row})
}

// StateChanged makes the cached copies of the row id stale for Get, after
// its state fields changed outside the API (see Resource.State).
func StateChanged(ctx context.Context, cache Cache, typ, id string) error {
	return cache.Bump(ctx, StateDep(typ, id))
}

// AccessScope returns the resource's access scope.
func (h *Handle[T]) AccessScope() platform.Scope { return h.scope }

// Columns returns the model's select list over alias t, for custom queries.
func (h *Handle[T]) Columns() string { return h.m.selectList }

// Scan scans one row of a query selecting Columns().
func (h *Handle[T]) Scan(row interface{ Scan(...any) error }) (*T, error) {
	out := new(T)
	if err := row.Scan(h.m.ptrs(reflect.ValueOf(out).Elem())...); err != nil {
		return nil, err
	}
	return out, nil
}

// etag is a row's entity tag: its version.
func etag(version int64) string { return fmt.Sprintf(`"%d"`, version) }

// matchETag reports whether an If-Match / If-None-Match header value matches
// version: "*", or a list of (possibly weak) tags one of which is etag(version).
func matchETag(header string, version int64) bool {
	want := etag(version)
	for tag := range strings.SplitSeq(header, ",") {
		tag = strings.TrimSpace(tag)
		tag = strings.TrimPrefix(tag, "W/")
		if tag == "*" || tag == want {
			return true
		}
	}
	return false
}

func preconditionFailed(version int64) error {
	return platform.Errorf(platform.EPRECONDITION, "the resource has changed (now at version %d); fetch it again and retry", version)
}
