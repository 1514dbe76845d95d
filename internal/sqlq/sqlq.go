// Package sqlq helps build SQL statements whose fragments come from several
// places (a resource's filters, the access predicate of a principal): Args
// numbers positional parameters as they are added, so fragments compose
// without clashing.
package sqlq

import "strconv"

// Args collects the arguments of a statement under construction.
type Args []any

// Add appends v and returns its placeholder: $1, $2, …
func (a *Args) Add(v any) string {
	*a = append(*a, v)
	return "$" + strconv.Itoa(len(*a))
}

// Ident quotes a SQL identifier. Identifiers in agentry come from code, never
// from input; quoting keeps a reserved word usable as a column name.
func Ident(name string) string {
	out := make([]byte, 0, len(name)+2)
	out = append(out, '"')
	for i := 0; i < len(name); i++ {
		if name[i] == '"' {
			out = append(out, '"')
		}
		out = append(out, name[i])
	}
	return string(append(out, '"'))
}
