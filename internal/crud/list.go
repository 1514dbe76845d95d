package crud

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/url"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// ListInput holds the paging parameters every list takes. The raw query is
// kept so a resource's filters, which vary per resource, can be read and
// unknown parameters refused.
type ListInput struct {
	Page      int    `query:"page" minimum:"1" maximum:"100000" default:"1" doc:"Page number, from 1 (at most 100000; page deeper with the cursor)."`
	PageSize  int    `query:"page_size" minimum:"1" maximum:"100" default:"20" doc:"Items per page, 1 to 100."`
	Sort      string `query:"sort" doc:"Sort field; prefix with - for descending."`
	Cursor    string `query:"cursor" doc:"Opaque cursor from a previous page's next_cursor; replaces page."`
	SkipTotal bool   `query:"skip_total" doc:"Skip counting the total (faster on large lists)."`
	query     url.Values
}

// Resolve captures the raw query string for the filters.
func (l *ListInput) Resolve(ctx huma.Context) []error {
	u := ctx.URL()
	l.query = u.Query()
	return nil
}

// Query returns the request's query parameters.
func (l *ListInput) Query() url.Values { return l.query }

// Page is one page of a list.
type Page[T any] struct {
	Items      []*T   `json:"items" nullable:"false"`
	Page       int    `json:"page" doc:"This page's number (1 when paging by cursor)."`
	PageSize   int    `json:"page_size"`
	Total      *int64 `json:"total,omitempty" doc:"How many items match in all; absent with skip_total=true."`
	NextCursor string `json:"next_cursor,omitempty" doc:"Pass as cursor to get the next page; absent on the last page."`
}

// PageOutput answers a list.
type PageOutput[T any] struct {
	Body Page[T]
}

// pagingParams are the query parameters every list knows.
var pagingParams = map[string]bool{"page": true, "page_size": true, "sort": true, "cursor": true, "skip_total": true}

type filterSpec struct {
	Filter
	col *column
}

func (r *resource[T, In]) filterSpec(f Filter) filterSpec {
	c := r.m.byName[f.Column]
	if c == nil {
		panic(fmt.Sprintf("crud: %s filter %q: no column %q", r.Scope.Type, f.Param, f.Column))
	}
	if pagingParams[f.Param] {
		panic(fmt.Sprintf("crud: %s filter %q clashes with a paging parameter", r.Scope.Type, f.Param))
	}
	switch f.Op {
	case "":
		f.Op = "="
	case "=", "<", "<=", ">", ">=":
	default:
		panic(fmt.Sprintf("crud: %s filter %q: unknown op %q", r.Scope.Type, f.Param, f.Op))
	}
	t := c.typ
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if _, ok := pgCast(t); !ok {
		panic(fmt.Sprintf("crud: %s filter %q: cannot filter on type %s", r.Scope.Type, f.Param, c.typ))
	}
	return filterSpec{Filter: f, col: c}
}

func (r *resource[T, In]) filterParams() []*huma.Param {
	names := make([]string, 0, len(r.filters))
	for name := range r.filters {
		names = append(names, name)
	}
	sort.Strings(names)
	var params []*huma.Param
	for _, name := range names {
		f := r.filters[name]
		s := &huma.Schema{Type: "string"}
		t := f.col.typ
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch {
		case f.col.uuid:
			s.Format = "uuid"
		case t == reflect.TypeFor[time.Time]():
			s.Format = "date-time"
		case t.Kind() == reflect.Bool:
			s.Type = "boolean"
		case t.Kind() == reflect.Int || t.Kind() == reflect.Int64 || t.Kind() == reflect.Int32:
			s.Type = "integer"
		}
		for _, v := range f.col.enum {
			s.Enum = append(s.Enum, v)
		}
		doc := f.Doc
		if doc == "" {
			doc = fmt.Sprintf("Only items whose %s %s this value.", f.col.json, map[string]string{"=": "equals", "<": "is before/below", "<=": "is at most", ">": "is after/above", ">=": "is at least"}[f.Op])
		}
		params = append(params, &huma.Param{Name: name, In: "query", Description: doc, Schema: s})
	}
	return params
}

// documentSort lists the sortable fields in the sort parameter's schema.
func (r *resource[T, In]) documentSort(opID string) {
	var allowed []any
	names := make([]string, 0, len(r.sorts))
	for name := range r.sorts {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, n := range names {
		allowed = append(allowed, n, "-"+n)
	}
	for _, item := range r.reg.API.OpenAPI().Paths {
		if item.Get == nil || item.Get.OperationID != opID {
			continue
		}
		for _, p := range item.Get.Parameters {
			if p.Name == "sort" {
				p.Description = "Sort field; prefix with - for descending. Default " + r.DefaultSort + "."
				p.Example = r.DefaultSort
				p.Schema = &huma.Schema{Type: "string", Enum: allowed}
			}
		}
	}
}

type sortSpec struct {
	col  *column
	desc bool
}

func (r *resource[T, In]) parseSort(s string) (sortSpec, error) {
	desc := strings.HasPrefix(s, "-")
	name := strings.TrimPrefix(s, "-")
	c := r.sorts[name]
	if c == nil {
		names := make([]string, 0, len(r.sorts))
		for n := range r.sorts {
			names = append(names, n)
		}
		sort.Strings(names)
		return sortSpec{}, platform.Invalid("cannot sort by that field", platform.FieldError{Field: "query.sort", Message: fmt.Sprintf("%q is not sortable; use one of %s (prefix - for descending)", name, strings.Join(names, ", "))})
	}
	return sortSpec{col: c, desc: desc}, nil
}

// cursor is the keyset position after the last item of a page.
type cursor struct {
	Sort  string `json:"s"`
	Value string `json:"v"`
	ID    string `json:"i"`
}

func encodeCursor(c cursor) string {
	data, _ := json.Marshal(c)
	return base64.RawURLEncoding.EncodeToString(data)
}

func decodeCursor(s, sortName string) (cursor, error) {
	bad := platform.Invalid("invalid cursor", platform.FieldError{Field: "query.cursor", Message: "not a cursor this list returned; start again without cursor"})
	data, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return cursor{}, bad
	}
	var c cursor
	if err := json.Unmarshal(data, &c); err != nil || uuid.Validate(c.ID) != nil {
		return cursor{}, bad
	}
	if c.Sort != sortName {
		return cursor{}, platform.Invalid("the cursor belongs to another sort order", platform.FieldError{Field: "query.cursor", Message: "the cursor was made for sort=" + c.Sort})
	}
	return c, nil
}

// cursorValue renders a sort value for a cursor, parseable by the column's cast.
func cursorValue(v reflect.Value) string {
	switch x := v.Interface().(type) {
	case time.Time:
		return x.UTC().Format(time.RFC3339Nano)
	default:
		return fmt.Sprint(x)
	}
}

// parseFilterValue parses a filter's query value as the column's type.
func parseFilterValue(f filterSpec, raw string) (any, error) {
	t := f.col.typ
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	bad := func(want string) error {
		return platform.Invalid("invalid filter", platform.FieldError{Field: "query." + f.Param, Message: fmt.Sprintf("%q is not %s", raw, want)})
	}
	switch {
	case f.col.uuid:
		if uuid.Validate(raw) != nil {
			return nil, bad("a UUID")
		}
		return raw, nil
	case t == reflect.TypeFor[time.Time]():
		ts, err := time.Parse(time.RFC3339Nano, raw)
		if err != nil {
			return nil, bad("an RFC 3339 timestamp")
		}
		return ts, nil
	case t.Kind() == reflect.Bool:
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return nil, bad("true or false")
		}
		return b, nil
	case t.Kind() == reflect.Int || t.Kind() == reflect.Int64 || t.Kind() == reflect.Int32:
		n, err := strconv.ParseInt(raw, 10, 64)
		if err != nil {
			return nil, bad("an integer")
		}
		return n, nil
	case len(f.col.enum) > 0:
		if !slices.Contains(f.col.enum, raw) {
			return nil, bad("one of " + strings.Join(f.col.enum, ", "))
		}
		return raw, nil
	case t.Kind() == reflect.String:
		if len(raw) > 1024 {
			return nil, bad("at most 1024 bytes")
		}
		return raw, nil
	}
	return nil, bad("a supported value")
}

// where builds the list's WHERE clause (without the cursor), refusing any
// query parameter that is neither paging nor one of the resource's filters.
func (r *resource[T, In]) where(p *platform.Principal, q url.Values, args *sqlq.Args) (string, error) {
	tenant := "FALSE" // no organization: nothing to list
	if p.OrgID != "" {
		tenant = "t.org_id = " + args.Add(p.OrgID)
	}
	clauses := []string{tenant, "(" + r.reg.Guard.Filter(p, r.scope, ActionRead, args) + ")"}
	var bad []platform.FieldError
	names := make([]string, 0, len(q))
	for name := range q {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if pagingParams[name] {
			continue
		}
		f, ok := r.filters[name]
		if !ok {
			bad = append(bad, platform.FieldError{Field: "query." + name, Message: "unknown query parameter"})
			continue
		}
		values := q[name]
		if len(values) != 1 {
			bad = append(bad, platform.FieldError{Field: "query." + name, Message: "give this filter once"})
			continue
		}
		v, err := parseFilterValue(f, values[0])
		if err != nil {
			bad = append(bad, err.(*platform.Error).Fields...)
			continue
		}
		clauses = append(clauses, "t."+sqlq.Ident(f.Column)+" "+f.Op+" "+args.Add(v))
	}
	if len(bad) > 0 {
		return "", platform.Invalid("invalid list parameters", bad...)
	}
	return strings.Join(clauses, " AND "), nil
}

func (r *resource[T, In]) list(ctx context.Context, in *ListInput) (*PageOutput[T], error) {
	p, err := r.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, err
	}
	sortName := in.Sort
	if sortName == "" {
		sortName = r.DefaultSort
	}
	spec, err := r.parseSort(sortName)
	if err != nil {
		return nil, err
	}
	if in.Cursor != "" && in.query.Has("page") {
		return nil, platform.Invalid("give page or cursor, not both", platform.FieldError{Field: "query.cursor", Message: "cannot be combined with page"})
	}
	var args sqlq.Args
	where, err := r.where(p, in.query, &args)
	if err != nil {
		return nil, err
	}
	out := &PageOutput[T]{Body: Page[T]{Items: []*T{}, Page: in.Page, PageSize: in.PageSize}}
	table := sqlq.Ident(r.Table)
	if !in.SkipTotal {
		var total int64
		// Counts every row of the list, before paging.
		if err := r.reg.queryRow(ctx, nil, "SELECT count(*) FROM "+table+" t WHERE "+where, args...).Scan(&total); err != nil {
			return nil, sqlq.MapError(err, r.notFound())
		}
		out.Body.Total = &total
	}

	dir, cmp := "ASC", ">"
	if spec.desc {
		dir, cmp = "DESC", "<"
	}
	sortCol := "t." + sqlq.Ident(spec.col.name)
	q := "SELECT " + r.m.selectList + " FROM " + table + " t WHERE " + where
	if in.Cursor != "" {
		c, err := decodeCursor(in.Cursor, sortName)
		if err != nil {
			return nil, err
		}
		cast, _ := pgCast(spec.col.typ)
		q += " AND (" + sortCol + ", t.id) " + cmp + " (" + args.Add(c.Value) + "::" + cast + ", " + args.Add(c.ID) + "::uuid)"
		out.Body.Page = 1
	}
	// One row more than the page says whether a next page exists: a full
	// last page gets no next_cursor.
	q += " ORDER BY " + sortCol + " " + dir + ", t.id " + dir + " LIMIT " + args.Add(in.PageSize+1)
	if in.Cursor == "" && in.Page > 1 {
		q += " OFFSET " + args.Add(int64(in.Page-1)*int64(in.PageSize))
	}
	rows, err := r.reg.query(ctx, q, args...)
	if err != nil {
		return nil, sqlq.MapError(err, r.notFound())
	}
	defer rows.Close()
	more := false
	for rows.Next() {
		if len(out.Body.Items) == in.PageSize {
			more = true
			break
		}
		row, err := r.Scan(rows)
		if err != nil {
			return nil, err
		}
		out.Body.Items = append(out.Body.Items, r.Render(ctx, row))
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if n := len(out.Body.Items); more {
		last := reflect.ValueOf(out.Body.Items[n-1]).Elem()
		out.Body.NextCursor = encodeCursor(cursor{
			Sort:  sortName,
			Value: cursorValue(last.FieldByIndex(spec.col.index)),
			ID:    any(out.Body.Items[n-1]).(hasBase).Meta().ID,
		})
	}
	return out, nil
}
