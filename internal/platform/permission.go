package platform

import (
	"fmt"
	"strings"
)

// Permission is a resource type and an action, written "Type.action":
// "Agent.read", "Agent.*" (every action on agents), "*.read" (read
// anything), "*" (everything). Types are CamelCase; actions lower_snake.
type Permission struct {
	Type   string
	Action string
}

// String returns the permission in its written form.
func (p Permission) String() string {
	if p.Type == "*" && p.Action == "*" {
		return "*"
	}
	return p.Type + "." + p.Action
}

// Grants reports whether p covers action on resource type typ.
func (p Permission) Grants(typ, action string) bool {
	return (p.Type == "*" || p.Type == typ) && (p.Action == "*" || p.Action == action)
}

// Covers reports whether p covers every permission q does (used to keep an
// API key's scope within its creator's).
func (p Permission) Covers(q Permission) bool {
	return (p.Type == "*" || p.Type == q.Type) && (p.Action == "*" || p.Action == q.Action)
}

// ParsePermission parses "Type.action", "Type.*", "*.action" or "*".
func ParsePermission(s string) (Permission, error) {
	if s == "*" {
		return Permission{Type: "*", Action: "*"}, nil
	}
	typ, action, ok := strings.Cut(s, ".")
	if !ok {
		return Permission{}, fmt.Errorf("permission %q: want Type.action, such as Agent.read", s)
	}
	if typ != "*" && !IsTypeName(typ) {
		return Permission{}, fmt.Errorf("permission %q: %q is not a resource type (CamelCase letters)", s, typ)
	}
	if action != "*" && !IsActionName(action) {
		return Permission{}, fmt.Errorf("permission %q: %q is not an action (lower-case letters and underscores)", s, action)
	}
	return Permission{Type: typ, Action: action}, nil
}

// ParsePermissions parses each string, reporting the first bad one.
func ParsePermissions(ss []string) ([]Permission, error) {
	out := make([]Permission, 0, len(ss))
	for _, s := range ss {
		p, err := ParsePermission(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// IsTypeName reports whether s is a resource type name: an upper-case ASCII
// letter then ASCII letters and digits, at most 64 bytes.
func IsTypeName(s string) bool {
	if s == "" || len(s) > 64 || s[0] < 'A' || s[0] > 'Z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// IsActionName reports whether s is an action name: a lower-case ASCII
// letter then lower-case letters, digits and underscores, at most 64 bytes.
func IsActionName(s string) bool {
	if s == "" || len(s) > 64 || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}
