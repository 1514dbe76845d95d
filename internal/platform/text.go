package platform

import (
	"strings"
	"unicode/utf8"
)

// Storable makes s text PostgreSQL stores: valid UTF-8 without NUL, of at
// most max bytes, cut at a character. For text from outside (a request's
// header, a handler's message) that is recorded rather than refused.
func Storable(s string, max int) string {
	s = strings.ToValidUTF8(strings.ReplaceAll(s, "\x00", ""), "\uFFFD")
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}
