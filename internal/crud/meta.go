package crud

import (
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/agentry/agentry/internal/sqlq"
)

// column is one stored field of a model.
type column struct {
	name  string // SQL column
	json  string // JSON name, "" when the field is not serialised
	index []int  // field index path from the model's root
	typ   reflect.Type
	uuid  bool     // the field carries format:"uuid"
	enum  []string // the values its enum tag allows, if it has one
}

// model is what the framework knows of a row type, computed once at
// registration by reflection.
type model struct {
	typ    reflect.Type
	cols   []*column
	byName map[string]*column
	byJSON map[string]*column
	// selectList is "t.col1, t.col2, …" in cols order.
	selectList string
}

func modelOf(t reflect.Type) *model {
	if t.Kind() != reflect.Struct {
		panic(fmt.Sprintf("crud: %s is not a struct", t))
	}
	m := &model{typ: t, byName: map[string]*column{}, byJSON: map[string]*column{}}
	m.walk(t, nil)
	for _, required := range []string{"id", "org_id", "owner_id", "created_at", "updated_at", "version"} {
		if m.byName[required] == nil {
			panic(fmt.Sprintf("crud: %s has no %q column; embed crud.Base", t, required))
		}
	}
	names := make([]string, len(m.cols))
	for i, c := range m.cols {
		names[i] = "t." + sqlq.Ident(c.name)
	}
	m.selectList = strings.Join(names, ", ")
	return m
}

func (m *model) walk(t reflect.Type, prefix []int) {
	for i := range t.NumField() {
		f := t.Field(i)
		index := append(append([]int(nil), prefix...), i)
		if f.Anonymous && f.Type.Kind() == reflect.Struct && f.Tag.Get("db") == "" {
			m.walk(f.Type, index)
			continue
		}
		if !f.IsExported() {
			continue
		}
		name := f.Tag.Get("db")
		if name == "" || name == "-" {
			continue
		}
		c := &column{name: name, index: index, typ: f.Type, json: jsonName(f), uuid: f.Tag.Get("format") == "uuid"}
		if e := f.Tag.Get("enum"); e != "" {
			c.enum = strings.Split(e, ",")
		}
		m.cols = append(m.cols, c)
		m.byName[name] = c
		if c.json != "" {
			m.byJSON[c.json] = c
		}
	}
}

// jsonName returns the JSON name encoding/json gives f, or "" when skipped.
func jsonName(f reflect.StructField) string {
	tag := f.Tag.Get("json")
	if tag == "-" {
		return ""
	}
	name, _, _ := strings.Cut(tag, ",")
	if name == "" {
		return f.Name
	}
	return name
}

// ptrs returns pointers to v's column fields, in cols order, for Scan.
func (m *model) ptrs(v reflect.Value) []any {
	out := make([]any, len(m.cols), len(m.cols)+1)
	for i, c := range m.cols {
		out[i] = v.FieldByIndex(c.index).Addr().Interface()
	}
	return out
}

// values returns v's values for the named columns, for an INSERT or UPDATE.
func (m *model) values(v reflect.Value, names []string) []any {
	out := make([]any, len(names))
	for i, n := range names {
		out[i] = v.FieldByIndex(m.byName[n].index).Interface()
	}
	return out
}

// pgCast is the SQL type a keyset cursor value of Go type t is cast to.
func pgCast(t reflect.Type) (string, bool) {
	switch t {
	case reflect.TypeFor[time.Time]():
		return "timestamptz", true
	}
	switch t.Kind() {
	case reflect.String:
		return "text", true
	case reflect.Int, reflect.Int32, reflect.Int64:
		return "bigint", true
	case reflect.Float64:
		return "double precision", true
	case reflect.Bool:
		return "boolean", true
	}
	return "", false
}

// fieldMap pairs the fields of an input type with the model fields they set.
type fieldMap struct {
	pairs []fieldPair
	// columns are the model columns the input sets.
	columns []string
}

type fieldPair struct {
	in, row []int
	json    string
}

// mapInput matches each field of the input type In to the model field of the
// same JSON name (or the one its `crud:"name"` tag names). A field tagged
// `crud:"-"` is left to the resource's hooks.
func mapInput(in reflect.Type, m *model) fieldMap {
	var fm fieldMap
	var walk func(t reflect.Type, prefix []int)
	walk = func(t reflect.Type, prefix []int) {
		for i := range t.NumField() {
			f := t.Field(i)
			index := append(append([]int(nil), prefix...), i)
			if f.Anonymous && f.Type.Kind() == reflect.Struct {
				walk(f.Type, index)
				continue
			}
			if !f.IsExported() {
				continue
			}
			name := jsonName(f)
			target := name
			if tag, ok := f.Tag.Lookup("crud"); ok {
				if tag == "-" {
					continue
				}
				target = tag
			}
			if name == "" {
				continue
			}
			c := m.byJSON[target]
			if c == nil {
				panic(fmt.Sprintf("crud: input %s field %s sets %q, which %s does not have; tag it crud:\"-\" and set it in a hook", in, f.Name, target, m.typ))
			}
			if c.typ != f.Type {
				panic(fmt.Sprintf("crud: input %s field %s is %s but %s.%s is %s", in, f.Name, f.Type, m.typ, c.json, c.typ))
			}
			switch c.name {
			case "id", "org_id", "owner_id", "created_at", "updated_at", "version":
				panic(fmt.Sprintf("crud: input %s must not set server-owned field %q", in, c.name))
			}
			fm.pairs = append(fm.pairs, fieldPair{in: index, row: c.index, json: name})
			fm.columns = append(fm.columns, c.name)
		}
	}
	walk(in, nil)
	return fm
}

// toRow copies the mapped input fields into the row.
func (fm fieldMap) toRow(in, row reflect.Value) {
	for _, p := range fm.pairs {
		row.FieldByIndex(p.row).Set(in.FieldByIndex(p.in))
	}
}

// fromRow copies the mapped row fields into the input (to patch them).
func (fm fieldMap) fromRow(row, in reflect.Value) {
	for _, p := range fm.pairs {
		in.FieldByIndex(p.in).Set(row.FieldByIndex(p.row))
	}
}
