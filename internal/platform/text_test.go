package platform

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestStorable(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, in string
		max      int
		want     string
	}{
		{"short", "curl/8.0", 256, "curl/8.0"},
		{"cut at a character", strings.Repeat("a", 255) + "é", 256, strings.Repeat("a", 255)},
		{"NUL dropped", "a\x00b", 256, "ab"},
		{"invalid UTF-8 replaced", "a\xffb", 256, "a\uFFFDb"},
	}
	for _, tc := range cases {
		got := Storable(tc.in, tc.max)
		if got != tc.want || !utf8.ValidString(got) || len(got) > tc.max {
			t.Errorf("%s: Storable(%q, %d) = %q, want %q", tc.name, tc.in, tc.max, got, tc.want)
		}
	}
}
