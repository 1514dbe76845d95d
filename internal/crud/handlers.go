package crud

import (
	"bytes"
	"context"
	"encoding/json"
	"mime"
	"net/http"
	"net/url"
	"reflect"
	"slices"
	"strings"

	"github.com/danielgtaylor/huma/v2"
	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"

	"github.com/agentry/agentry/internal/jsonmerge"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

type getInput struct {
	ID          string `path:"id" format:"uuid" doc:"The resource id."`
	IfNoneMatch string `header:"If-None-Match" doc:"Answer 304 if the resource still has this ETag."`
}

type createInput[In any] struct {
	Body In
}

type replaceInput[In any] struct {
	ID      string `path:"id" format:"uuid" doc:"The resource id."`
	IfMatch string `header:"If-Match" doc:"Refuse with 412 unless the resource still has this ETag."`
	Body    In
}

type patchInput struct {
	ID          string `path:"id" format:"uuid" doc:"The resource id."`
	IfMatch     string `header:"If-Match" doc:"Refuse with 412 unless the resource still has this ETag."`
	ContentType string `header:"Content-Type"`
	RawBody     []byte
}

type deleteInput struct {
	ID      string `path:"id" format:"uuid" doc:"The resource id."`
	IfMatch string `header:"If-Match" doc:"Refuse with 412 unless the resource still has this ETag."`
}

// ItemOutput answers one resource with its ETag.
type ItemOutput[T any] struct {
	ETag string `header:"ETag"`
	Body *T
}

// CreatedOutput answers a created resource with its ETag and Location.
type CreatedOutput[T any] struct {
	ETag     string `header:"ETag"`
	Location string `header:"Location"`
	Body     *T
}

type clearOutput struct {
	Body struct {
		Deleted int64 `json:"deleted" doc:"How many resources were deleted."`
	}
}

func (r *resource[T, In]) register() {
	api := r.reg.API
	one, many := r.names()
	an := article(one)
	item := r.Path + "/{id}"
	typ := r.Scope.Type

	if r.Ops&OpCreate != 0 {
		op := r.operation(http.MethodPost, r.Path, "create-"+one, "Create "+an+" "+one,
			"Creates "+an+" "+one+" owned by the caller in the caller's organization. Needs `"+typ+".create`.",
			http.StatusCreated, http.StatusForbidden, http.StatusConflict, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType)
		huma.Register(api, op, r.create)
	}
	if r.Ops&OpRead != 0 {
		op := r.operation(http.MethodGet, item, "get-"+one, "Get "+an+" "+one,
			"Returns the "+one+" with its ETag. A "+one+" the caller may not read answers 404.",
			http.StatusOK, http.StatusNotFound, http.StatusNotModified)
		huma.Register(api, op, r.get)
	}
	if r.Ops&OpReplace != 0 {
		op := r.operation(http.MethodPut, item, "replace-"+one, "Replace "+an+" "+one,
			"Replaces every field a client may set. Needs `"+typ+".update`.",
			http.StatusOK, http.StatusForbidden, http.StatusNotFound, http.StatusConflict, http.StatusPreconditionFailed, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType)
		huma.Register(api, op, r.replace)
	}
	if r.Ops&OpUpdate != 0 {
		op := r.operation(http.MethodPatch, item, "update-"+one, "Update "+an+" "+one,
			"Applies a JSON merge patch (RFC 7396): fields present are set, `null` clears a field, absent fields are kept. Needs `"+typ+".update`.",
			http.StatusOK, http.StatusForbidden, http.StatusNotFound, http.StatusConflict, http.StatusPreconditionFailed, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType)
		patchSchema := *r.inSchema
		if resolved := api.OpenAPI().Components.Schemas.SchemaFromRef(r.inSchema.Ref); resolved != nil {
			patchSchema = *resolved
		}
		patchSchema.Required = nil
		patchSchema.Description = "A JSON merge patch of the writable fields."
		op.RequestBody = &huma.RequestBody{
			Required: true,
			Content: map[string]*huma.MediaType{
				"application/merge-patch+json": {Schema: &patchSchema},
				"application/json":             {Schema: &patchSchema},
			},
		}
		huma.Register(api, op, r.update)
	}
	if r.Ops&OpDelete != 0 {
		op := r.operation(http.MethodDelete, item, "delete-"+one, "Delete "+an+" "+one,
			"Deletes the "+one+" and its ACL entries. Needs `"+typ+".delete`.",
			http.StatusNoContent, http.StatusForbidden, http.StatusNotFound, http.StatusPreconditionFailed)
		huma.Register(api, op, r.delete)
	}
	if r.Ops&OpList != 0 {
		op := r.operation(http.MethodGet, r.Path, "list-"+many, "List "+many,
			"Lists the "+many+" of the caller's organization it may read, a page at a time.",
			http.StatusOK)
		op.Parameters = r.filterParams()
		huma.Register(api, op, r.list)
		r.documentSort(op.OperationID)
	}
	if r.Ops&OpACL != 0 && r.reg.ACL != nil {
		r.registerACL(item)
	}
	if r.Ops&OpClear != 0 {
		op := r.operation(http.MethodDelete, r.Path, "clear-"+many, "Delete all "+many,
			"Deletes every "+one+" of the caller's organization the caller may delete. Organization admins only.",
			http.StatusOK, http.StatusForbidden)
		huma.Register(api, op, r.clear)
	}
}

// validate runs the resource's own checks on an input that passed its schema.
func (r *resource[T, In]) validate(ctx context.Context, in *In) error {
	if r.Validate == nil {
		return nil
	}
	if fields := r.Validate(ctx, in); len(fields) > 0 {
		for i := range fields {
			if !strings.HasPrefix(fields[i].Field, "body") {
				fields[i].Field = "body." + fields[i].Field
			}
		}
		return platform.Invalid("validation failed", fields...)
	}
	return nil
}

// createJSON validates body as the input type and creates the resource.
func (r *resource[T, In]) createJSON(ctx context.Context, body []byte) (*T, error) {
	var doc any
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return nil, platform.Invalid("the body is not a JSON document", platform.FieldError{Field: "body", Message: "malformed JSON"})
	}
	if err := r.checkSchema(doc); err != nil {
		return nil, err
	}
	in := new(In)
	if err := json.Unmarshal(body, in); err != nil {
		return nil, platform.Invalid("invalid body", platform.FieldError{Field: "body", Message: err.Error()})
	}
	out, err := r.create(ctx, &createInput[In]{Body: *in})
	if err != nil {
		return nil, err
	}
	return out.Body, nil
}

func (r *resource[T, In]) create(ctx context.Context, input *createInput[In]) (*CreatedOutput[T], error) {
	p, err := r.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.reg.Guard.Decide(ctx, p, r.scope, ActionCreate, nil, nil); err != nil {
		return nil, err
	}
	if err := r.validate(ctx, &input.Body); err != nil {
		return nil, err
	}
	row := new(T)
	rv := reflect.ValueOf(row).Elem()
	r.in.toRow(reflect.ValueOf(&input.Body).Elem(), rv)
	b := any(row).(hasBase).Meta()
	b.ID, b.OrgID, b.OwnerID = uuid.NewString(), p.OrgID, p.ID

	tx, err := r.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	if r.BeforeCreate != nil {
		if err := r.BeforeCreate(ctx, tx, &input.Body, row); err != nil {
			return nil, err
		}
	}
	var args sqlq.Args
	var cols, marks []string
	for _, name := range r.insertColumns(rv) {
		cols = append(cols, sqlq.Ident(name))
		marks = append(marks, args.Add(rv.FieldByIndex(r.m.byName[name].index).Interface()))
	}
	// Inserts the row; returns every column (with the database's defaults).
	q := "INSERT INTO " + sqlq.Ident(r.Table) + " AS t (" + strings.Join(cols, ", ") + ") VALUES (" +
		strings.Join(marks, ", ") + ") RETURNING " + r.m.selectList
	if err := tx.QueryRowxContext(ctx, q, args...).Scan(r.m.ptrs(rv)...); err != nil {
		return nil, sqlq.MapError(err, r.notFound())
	}
	if err := r.afterWrite(ctx, tx, OpCreate, row); err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	r.committed(ctx, OpCreate, row)
	return &CreatedOutput[T]{ETag: etag(b.Version), Location: r.Path + "/" + b.ID, Body: r.Render(ctx, row)}, nil
}

// insertColumns are the columns a create writes: the base columns, every
// column the input sets, and every other column a hook set to a non-zero
// value. The rest take the database's defaults.
func (r *resource[T, In]) insertColumns(row reflect.Value) []string {
	set := map[string]bool{"id": true, "org_id": true, "owner_id": true}
	for _, name := range r.in.columns {
		set[name] = true
	}
	var out []string
	for _, c := range r.m.cols {
		if set[c.name] || (c.name != "created_at" && c.name != "updated_at" && c.name != "version" && !row.FieldByIndex(c.index).IsZero()) {
			out = append(out, c.name)
		}
	}
	return out
}

// committed tells the cache, the observers and AfterCommit of a write
// that is committed.
func (r *resource[T, In]) committed(ctx context.Context, op Op, row *T) {
	r.Notify(ctx, op, row)
	if r.AfterCommit != nil {
		r.AfterCommit(ctx, op, row)
	}
}

func (r *resource[T, In]) afterWrite(ctx context.Context, tx *sqlx.Tx, op Op, row *T) error {
	if r.AfterWrite == nil {
		return nil
	}
	return r.AfterWrite(ctx, tx, op, row)
}

func (r *resource[T, In]) get(ctx context.Context, input *getInput) (*ItemOutput[T], error) {
	row, _, err := r.Get(ctx, input.ID, ActionRead)
	if err != nil {
		return nil, err
	}
	version := any(row).(hasBase).Meta().Version
	if input.IfNoneMatch != "" && matchETag(input.IfNoneMatch, version) {
		return nil, huma.Status304NotModified()
	}
	return &ItemOutput[T]{ETag: etag(version), Body: r.Render(ctx, row)}, nil
}

func (r *resource[T, In]) replace(ctx context.Context, input *replaceInput[In]) (*ItemOutput[T], error) {
	if err := r.validate(ctx, &input.Body); err != nil {
		return nil, err
	}
	return r.write(ctx, input.ID, input.IfMatch, func(*T) (*In, error) { return &input.Body, nil })
}

func (r *resource[T, In]) update(ctx context.Context, input *patchInput) (*ItemOutput[T], error) {
	if err := checkPatchType(input.ContentType); err != nil {
		return nil, err
	}
	var patch any
	dec := json.NewDecoder(bytes.NewReader(input.RawBody))
	dec.UseNumber()
	if err := dec.Decode(&patch); err != nil || dec.More() {
		return nil, platform.Invalid("the body is not a JSON document", platform.FieldError{Field: "body", Message: "malformed JSON"})
	}
	if _, ok := patch.(map[string]any); !ok {
		return nil, platform.Invalid("a merge patch must be a JSON object", platform.FieldError{Field: "body", Message: "expected a JSON object"})
	}
	return r.write(ctx, input.ID, input.IfMatch, func(old *T) (*In, error) {
		current := new(In)
		r.in.fromRow(reflect.ValueOf(old).Elem(), reflect.ValueOf(current).Elem())
		doc, err := json.Marshal(current)
		if err != nil {
			return nil, err
		}
		var target any
		tdec := json.NewDecoder(bytes.NewReader(doc))
		tdec.UseNumber()
		if err := tdec.Decode(&target); err != nil {
			return nil, err
		}
		merged := jsonmerge.Merge(target, patch)
		if err := r.checkSchema(merged); err != nil {
			return nil, err
		}
		data, err := json.Marshal(merged)
		if err != nil {
			return nil, err
		}
		next := new(In)
		if err := json.Unmarshal(data, next); err != nil {
			return nil, platform.Invalid("the patched resource is invalid", platform.FieldError{Field: "body", Message: err.Error()})
		}
		if err := r.validate(ctx, next); err != nil {
			return nil, err
		}
		return next, nil
	})
}

// checkPatchType accepts the merge patch media type and plain JSON.
func checkPatchType(contentType string) error {
	if contentType == "" {
		return nil
	}
	mt, _, err := mime.ParseMediaType(contentType)
	if err == nil && (mt == "application/merge-patch+json" || mt == "application/json") {
		return nil
	}
	return platform.Errorf(platform.EMEDIATYPE, "unsupported Content-Type %q; send application/merge-patch+json", contentType)
}

// checkSchema validates a decoded document against the input schema, with
// every failing field listed.
func (r *resource[T, In]) checkSchema(doc any) error {
	reg := r.reg.API.OpenAPI().Components.Schemas
	pb := huma.NewPathBuffer([]byte{}, 0)
	pb.Push("body")
	res := &huma.ValidateResult{}
	huma.Validate(reg, r.inSchema, pb, huma.ModeWriteToServer, normalizeNumbers(doc), res)
	if len(res.Errors) == 0 {
		return nil
	}
	fields := make([]platform.FieldError, 0, len(res.Errors))
	for _, e := range res.Errors {
		if d, ok := e.(*huma.ErrorDetail); ok {
			fields = append(fields, FieldError(d))
		} else {
			fields = append(fields, platform.FieldError{Field: "body", Message: e.Error()})
		}
	}
	return platform.Invalid("validation failed", fields...)
}

// FieldError turns a Huma validation detail into a platform field error,
// naming a missing property itself rather than the object lacking it.
func FieldError(d *huma.ErrorDetail) platform.FieldError {
	field, message := d.Location, d.Message
	if name, ok := strings.CutPrefix(message, "expected required property "); ok {
		if name, ok = strings.CutSuffix(name, " to be present"); ok {
			field += "." + name
		}
	}
	if strings.HasPrefix(message, "invalid character") || strings.HasPrefix(message, "unexpected end of JSON") || strings.HasPrefix(message, "json: ") {
		message = "malformed JSON: " + message
	}
	return platform.FieldError{Field: field, Message: message}
}

// normalizeNumbers turns json.Number into float64, the number type Huma's
// validator expects.
func normalizeNumbers(v any) any {
	switch x := v.(type) {
	case json.Number:
		f, _ := x.Float64()
		return f
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = normalizeNumbers(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = normalizeNumbers(e)
		}
		return out
	}
	return v
}

// write runs a replace or an update: it locks the row, checks access and
// If-Match, computes the new input from the old row, and stores it.
func (r *resource[T, In]) write(ctx context.Context, id, ifMatch string, next func(old *T) (*In, error)) (*ItemOutput[T], error) {
	tx, err := r.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	old, _, err := r.GetForUpdate(ctx, tx, id, ActionUpdate)
	if err != nil {
		return nil, err
	}
	oldBase := any(old).(hasBase).Meta()
	if ifMatch != "" && !matchETag(ifMatch, oldBase.Version) {
		return nil, preconditionFailed(oldBase.Version)
	}
	in, err := next(old)
	if err != nil {
		return nil, err
	}
	row := new(T)
	*row = *old
	rv := reflect.ValueOf(row).Elem()
	r.in.toRow(reflect.ValueOf(in).Elem(), rv)
	if r.BeforeUpdate != nil {
		if err := r.BeforeUpdate(ctx, tx, in, old, row); err != nil {
			return nil, err
		}
	}
	values := r.m.values(rv, r.updateCols)
	if reflect.DeepEqual(values, r.m.values(reflect.ValueOf(old).Elem(), r.updateCols)) {
		// Nothing changes: no new version, so that other clients' ETags
		// stay good.
		return &ItemOutput[T]{ETag: etag(oldBase.Version), Body: r.Render(ctx, row)}, nil
	}
	var args sqlq.Args
	sets := make([]string, len(r.updateCols))
	for i, v := range values {
		sets[i] = sqlq.Ident(r.updateCols[i]) + " = " + args.Add(v)
	}
	// Stores the new values and bumps the version; returns the stored row.
	q := "UPDATE " + sqlq.Ident(r.Table) + " AS t SET " + strings.Join(sets, ", ") +
		", version = t.version + 1, updated_at = now() WHERE t.id = " + args.Add(id) + " RETURNING " + r.m.selectList
	if err := tx.QueryRowxContext(ctx, q, args...).Scan(r.m.ptrs(rv)...); err != nil {
		return nil, sqlq.MapError(err, r.notFound())
	}
	if err := r.afterWrite(ctx, tx, OpUpdate, row); err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	r.committed(ctx, OpUpdate, row)
	return &ItemOutput[T]{ETag: etag(any(row).(hasBase).Meta().Version), Body: r.Render(ctx, row)}, nil
}

func (r *resource[T, In]) delete(ctx context.Context, input *deleteInput) (*struct{}, error) {
	tx, err := r.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	row, _, err := r.GetForUpdate(ctx, tx, input.ID, ActionDelete)
	if err != nil {
		return nil, err
	}
	b := any(row).(hasBase).Meta()
	if input.IfMatch != "" && !matchETag(input.IfMatch, b.Version) {
		return nil, preconditionFailed(b.Version)
	}
	if err := r.deleteRow(ctx, tx, row); err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	r.committed(ctx, OpDelete, row)
	return nil, nil
}

func (r *resource[T, In]) deleteRow(ctx context.Context, tx *sqlx.Tx, row *T) error {
	if r.BeforeDelete != nil {
		if err := r.BeforeDelete(ctx, tx, row); err != nil {
			return err
		}
	}
	b := any(row).(hasBase).Meta()
	if _, err := tx.ExecContext(ctx, "DELETE FROM "+sqlq.Ident(r.Table)+" WHERE id = $1", b.ID); err != nil {
		return sqlq.MapError(err, r.notFound())
	}
	if err := r.reg.Guard.Forget(ctx, tx, b.Ref(r.scope.Type)); err != nil {
		return err
	}
	return r.afterWrite(ctx, tx, OpDelete, row)
}

// clearInput keeps the raw query of a collection's DELETE, which takes no
// parameters: a filter it ignored would delete what it meant to keep.
type clearInput struct {
	query url.Values
}

// Resolve captures the raw query string.
func (c *clearInput) Resolve(ctx huma.Context) []error {
	u := ctx.URL()
	c.query = u.Query()
	return nil
}

func (r *resource[T, In]) clear(ctx context.Context, in *clearInput) (*clearOutput, error) {
	if len(in.query) > 0 {
		var bad []platform.FieldError
		for name := range in.query {
			bad = append(bad, platform.FieldError{Field: "query." + name, Message: "deleting all takes no parameters; delete items one by one to choose them"})
		}
		slices.SortFunc(bad, func(a, b platform.FieldError) int { return strings.Compare(a.Field, b.Field) })
		return nil, platform.Invalid("this deletes every item and takes no filters", bad...)
	}
	p, err := r.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.reg.Guard.Decide(ctx, p, r.scope, ActionClear, nil, nil); err != nil {
		return nil, err
	}
	tx, err := r.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	var args sqlq.Args
	if p.OrgID == "" {
		return &clearOutput{}, nil
	}
	// Locks and returns every row of the organization the caller may delete.
	q := "SELECT " + r.m.selectList + " FROM " + sqlq.Ident(r.Table) + " t WHERE t.org_id = " + args.Add(p.OrgID) +
		" AND (" + r.reg.Guard.Filter(p, r.scope, ActionDelete, &args) + ") FOR UPDATE OF t"
	rows, err := tx.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, sqlq.MapError(err, r.notFound())
	}
	var victims []*T
	for rows.Next() {
		row, err := r.Scan(rows)
		if err != nil {
			rows.Close()
			return nil, err
		}
		victims = append(victims, row)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, row := range victims {
		if err := r.deleteRow(ctx, tx, row); err != nil {
			return nil, err
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	for _, row := range victims {
		r.committed(ctx, OpDelete, row)
	}
	out := &clearOutput{}
	out.Body.Deleted = int64(len(victims))
	return out, nil
}

type aclListOutput struct {
	Body struct {
		Items []platform.ACLEntry `json:"items" nullable:"false"`
	}
}

type aclGrantInput struct {
	ID   string `path:"id" format:"uuid" doc:"The resource id."`
	Body platform.ACLGrant
}

type aclEntryOutput struct {
	Body *platform.ACLEntry
}

type aclRevokeInput struct {
	ID      string `path:"id" format:"uuid" doc:"The resource id."`
	EntryID string `path:"entry_id" format:"uuid" doc:"The ACL entry id."`
}

type aclGetInput struct {
	ID string `path:"id" format:"uuid" doc:"The resource id."`
}

// Resolve refuses query parameters: the list takes none.
func (in *aclGetInput) Resolve(ctx huma.Context) []error { return OnlyParams(ctx) }

// OnlyParams refuses query parameters other than names, for a Resolve of
// an operation's input: one it ignored (misspelt, say) would answer what
// was not asked.
func OnlyParams(ctx huma.Context, names ...string) []error {
	var errs []error
	u := ctx.URL()
	for name := range u.Query() {
		if !slices.Contains(names, name) {
			msg := "unknown parameter; this operation takes none"
			if len(names) > 0 {
				msg = "unknown parameter; this operation takes " + strings.Join(names, ", ")
			}
			errs = append(errs, &huma.ErrorDetail{Location: "query." + name, Message: msg})
		}
	}
	return errs
}

// registerACL adds the ACL routes of one resource: who may do what on it.
func (r *resource[T, In]) registerACL(item string) {
	one, _ := r.names()
	an := article(one)
	who := "Only the " + one + "'s owner, organization admins and the type's ACL admins may see or change its ACL."
	list := r.operation(http.MethodGet, item+"/acl", "list-"+one+"-acl", "List "+an+" "+one+"'s ACL", "Lists the allow and deny entries of this "+one+". "+who, http.StatusOK, http.StatusForbidden, http.StatusNotFound)
	huma.Register(r.reg.API, list, func(ctx context.Context, in *aclGetInput) (*aclListOutput, error) {
		ref, p, err := r.ref(ctx, in.ID)
		if err != nil {
			return nil, err
		}
		entries, err := r.reg.ACL.List(ctx, p, r.scope, ref)
		if err != nil {
			return nil, err
		}
		out := &aclListOutput{}
		out.Body.Items = entries
		return out, nil
	})
	grant := r.operation(http.MethodPost, item+"/acl", "grant-"+one+"-acl", "Grant on "+an+" "+one, "Adds an allow or deny entry for a user, role, agent or the organization, for one action or *. Deny overrides allow and ownership. "+who, http.StatusCreated, http.StatusForbidden, http.StatusNotFound)
	huma.Register(r.reg.API, grant, func(ctx context.Context, in *aclGrantInput) (*aclEntryOutput, error) {
		ref, p, err := r.ref(ctx, in.ID)
		if err != nil {
			return nil, err
		}
		e, err := r.reg.ACL.Grant(ctx, p, r.scope, ref, in.Body)
		if err != nil {
			return nil, err
		}
		// The resource may be being deleted: its deletion removes the
		// entries it sees, not one made meanwhile, which nothing could
		// then revoke. Waiting for the deletion tells.
		var exists bool
		if err := r.reg.DB.GetContext(ctx, &exists, "SELECT EXISTS (SELECT 1 FROM "+sqlq.Ident(r.Table)+" WHERE id = $1 FOR KEY SHARE)", ref.ID); err != nil {
			return nil, sqlq.MapError(err, r.notFound())
		}
		if !exists {
			if _, err := r.reg.DB.ExecContext(ctx, "DELETE FROM acl_entries WHERE id = $1", e.ID); err != nil {
				return nil, err
			}
			return nil, platform.Errorf(platform.ENOTFOUND, "%s", r.notFound())
		}
		return &aclEntryOutput{Body: e}, nil
	})
	revoke := r.operation(http.MethodDelete, item+"/acl/{entry_id}", "revoke-"+one+"-acl", "Revoke on "+an+" "+one, "Deletes one entry of this "+one+"'s ACL. "+who, http.StatusNoContent, http.StatusForbidden, http.StatusNotFound)
	huma.Register(r.reg.API, revoke, func(ctx context.Context, in *aclRevokeInput) (*struct{}, error) {
		ref, p, err := r.ref(ctx, in.ID)
		if err != nil {
			return nil, err
		}
		return nil, r.reg.ACL.Revoke(ctx, p, r.scope, ref, in.EntryID)
	})
}

// ref loads the resource whose ACL a request manages. Its ACL
// administrators reach it even when an entry denies them reading it (a deny
// must not lock an organization admin out of the ACL); anyone else who may
// not read it gets 404, like every other route. Ownership makes an ACL
// administrator only while no deny entry names the owner: a deny put on
// the owner is not theirs to see or lift (the ref returned then carries no
// owner, so that the ACL's own checks judge it so too).
func (r *resource[T, In]) ref(ctx context.Context, id string) (*platform.ResourceRef, *platform.Principal, error) {
	p, err := r.reg.Guard.Caller(ctx)
	if err != nil {
		return nil, nil, err
	}
	var args sqlq.Args
	idArg := args.Add(id)
	entries := r.reg.Guard.Entries(p, r.scope, &args)
	ref := platform.ResourceRef{Type: r.scope.Type}
	var raw []byte
	err = r.reg.queryRow(ctx, nil, "SELECT t.id, t.org_id, t.owner_id, "+entries+" FROM "+sqlq.Ident(r.table)+" t WHERE t.id = "+idArg, args...).
		Scan(&ref.ID, &ref.OrgID, &ref.OwnerID, &raw)
	if err != nil {
		return nil, nil, sqlq.MapError(err, r.notFound())
	}
	if ref.OwnerID == p.ID && deniesAny(raw) {
		ref.OwnerID = ""
	}
	if r.reg.ACL.CanAdminister(p, r.scope, &ref) {
		return &ref, p, nil
	}
	if err := r.reg.Guard.Decide(ctx, p, r.scope, ActionRead, &ref, raw); err != nil {
		return nil, nil, err
	}
	return &ref, p, nil
}

// deniesAny reports whether the ACL entries of raw (those naming a
// principal, as Guard.Entries gives them) hold a deny.
func deniesAny(raw []byte) bool {
	var entries []platform.ACLEntry
	if err := json.Unmarshal(raw, &entries); err != nil {
		return true // unreadable: judge as denied, the safe side
	}
	for _, e := range entries {
		if e.Effect == platform.Deny {
			return true
		}
	}
	return false
}

// article is the indefinite article of a noun: "an agent", "a template".
func article(noun string) string {
	if noun != "" && strings.ContainsRune("aeiou", rune(noun[0])) {
		return "an"
	}
	return "a"
}
