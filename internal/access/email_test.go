package access

import (
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

func TestValidEmail(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		email string
		ok    bool
	}{
		{"ada@example.com", true},
		{"ada.lovelace+tag@mail.example.co.uk", true},
		{"jörg@münchen.example", true},
		{"jorg@mu\u0308nchen.example", true}, // decomposed: u and a combining diaeresis
		{"user@example.भारत", true},
		{"user@ตัวอย่าง.ไทย", true},
		{"not-an-email", false},
		{"ada@localhost", false},
		{"ada@example.com.", false},
		{"ada@-example.com", false},
		{"ada@exa_mple.com", false},
		{"x\u202e@example.com", false},            // a right-to-left override
		{"ada\u200b@example.com", false},          // a zero-width space
		{"fz@example.com\U0001F600\u202e", false}, // an emoji and an override after the domain
		{"ada@exam\U0001F600ple.com", false},      // an emoji in the domain
		{"a\ufffd@example.com", false},            // a replaced broken character
		{"a\xff@example.com", false},              // not UTF-8
		{"Ada <ada@example.com>", false},
	} {
		if got := ValidEmail(tc.email); got != tc.ok {
			t.Errorf("ValidEmail(%q) = %v, want %v", tc.email, got, tc.ok)
		}
	}
}

// FuzzValidEmail: any string is judged without panic, and an accepted one
// is valid UTF-8 of printable characters with a dotted domain.
func FuzzValidEmail(f *testing.F) {
	for _, s := range []string{"ada@example.com", "x\u202e@example.com", "@", "a@b.c", "\"a b\"@example.com"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !ValidEmail(s) {
			return
		}
		at := strings.LastIndexByte(s, '@')
		if !utf8.ValidString(s) || at <= 0 || !strings.Contains(s[at:], ".") {
			t.Fatalf("accepted %q", s)
		}
		for _, r := range s {
			if !unicode.IsPrint(r) || r == ' ' {
				t.Fatalf("accepted %q, with %U", s, r)
			}
		}
	})
}
