package secrets

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

func key(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func newSealer(t *testing.T, k []byte) *Sealer {
	t.Helper()
	s, err := New(k)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestRoundTrip(t *testing.T) {
	s := newSealer(t, key(1))
	for _, value := range []string{"", "hunter2", "ünïcödé ✓", strings.Repeat("x", 65536), "with\x00nul"} {
		sealed := s.Seal("env-1", "TOKEN", value)
		if strings.Contains(sealed, value) && value != "" {
			t.Fatalf("the sealed value shows the plain text")
		}
		got, err := s.Open("env-1", "TOKEN", sealed)
		if err != nil {
			t.Fatalf("Open(%.20q): %v", value, err)
		}
		if got != value {
			t.Fatalf("want %.20q, got %.20q", value, got)
		}
	}
}

func TestSealIsRandomized(t *testing.T) {
	s := newSealer(t, key(1))
	a, b := s.Seal("env", "A", "same"), s.Seal("env", "A", "same")
	if a == b {
		t.Fatalf("sealing the same value twice gave the same text %q: the nonce repeats", a)
	}
}

func TestOpenRefuses(t *testing.T) {
	s := newSealer(t, key(1))
	sealed := s.Seal("env-1", "TOKEN", "hunter2")
	raw, _ := base64.StdEncoding.DecodeString(sealed)
	flipped := bytes.Clone(raw)
	flipped[len(flipped)-1] ^= 1
	cases := []struct {
		name         string
		sealer       *Sealer
		owner, label string
		sealed       string
	}{
		{"another environment", s, "env-2", "TOKEN", sealed},
		{"another name", s, "env-1", "OTHER", sealed},
		{"another name and environment", s, "env-2", "OTHER", sealed},
		{"owner and name shifted", s, "env-", "1TOKEN", sealed},
		{"the name's case", s, "env-1", "token", sealed},
		{"another key", newSealer(t, key(2)), "env-1", "TOKEN", sealed},
		{"tampered", s, "env-1", "TOKEN", base64.StdEncoding.EncodeToString(flipped)},
		{"truncated to the nonce", s, "env-1", "TOKEN", base64.StdEncoding.EncodeToString(raw[:12])},
		{"shorter than the nonce", s, "env-1", "TOKEN", base64.StdEncoding.EncodeToString(raw[:5])},
		{"empty", s, "env-1", "TOKEN", ""},
		{"not base64", s, "env-1", "TOKEN", "***"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.sealer.Open(tc.owner, tc.label, tc.sealed)
			if !errors.Is(err, ErrOpen) {
				t.Fatalf("want ErrOpen, got %q, %v", got, err)
			}
			if got != "" {
				t.Fatalf("a refused open returned %q", got)
			}
		})
	}
}

func TestNewRefusesBadKeys(t *testing.T) {
	for _, n := range []int{0, 16, 24, 31, 33, 64} {
		if _, err := New(make([]byte, n)); err == nil {
			t.Errorf("a %d-byte key: want an error", n)
		}
	}
}

func TestConcurrentUse(t *testing.T) {
	s := newSealer(t, key(3))
	done := make(chan error)
	for i := range 8 {
		go func() {
			name := string(rune('A' + i))
			var err error
			for range 100 {
				var got string
				if got, err = s.Open("env", name, s.Seal("env", name, name)); err == nil && got != name {
					err = errors.New("wrong value " + got)
				}
				if err != nil {
					break
				}
			}
			done <- err
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzSealOpen checks that any value round-trips, that a sealed value opens
// only for the owner and name it was sealed for, and that Open never
// panics on garbage. Owners are ids: they never hold a NUL, the separator
// of the additional data.
func FuzzSealOpen(f *testing.F) {
	f.Add("env-1", "TOKEN", "hunter2", "env-1", "OTHER", "")
	f.Add("env-", "1TOKEN", "", "env-1", "TOKEN", "AAAA")
	f.Add("6f1c0c8e-2d1a-4a57-9a0e-0b7f0c1d2e3f", "A", "v", "6f1c0c8e-2d1a-4a57-9a0e-0b7f0c1d2e3f", "A\x00", "%%%")
	s, err := New(key(7))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, owner, name, value, owner2, name2, garbage string) {
		if strings.ContainsRune(owner, 0) || strings.ContainsRune(owner2, 0) {
			t.Skip()
		}
		sealed := s.Seal(owner, name, value)
		got, err := s.Open(owner, name, sealed)
		if err != nil || got != value {
			t.Fatalf("round trip of %q for (%q, %q): got %q, %v", value, owner, name, got, err)
		}
		if owner2 != owner || name2 != name {
			if got, err := s.Open(owner2, name2, sealed); !errors.Is(err, ErrOpen) {
				t.Fatalf("sealed for (%q, %q), opened for (%q, %q): %q, %v", owner, name, owner2, name2, got, err)
			}
		}
		if got, err := s.Open(owner, name, garbage); err == nil && garbage != sealed {
			// Only a genuine sealed value opens; garbage that happens to be
			// one is as likely as forging GCM.
			t.Fatalf("garbage %q opened to %q", garbage, got)
		}
	})
}
