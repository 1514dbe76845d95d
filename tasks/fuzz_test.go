package tasks

import (
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzDecode feeds every registered task any payload: each answers a
// payload or an ErrBadPayload (never retried), and never panics.
func FuzzDecode(f *testing.F) {
	for _, seed := range []string{
		`{"message":"hi"}`, `{"milliseconds":100,"steps":3}`, `{"url":"https://example.com/"}`,
		`{"method":"POST","url":"http://10.0.0.1/","headers":{"A":"b"},"body":"x"}`,
		`null`, `[]`, `{}`, `{"message":1}`, `{"a":1} {"b":2}`, `{"milliseconds":-1}`, "\x00", `{"url":"\u0000"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		for _, d := range All() {
			p, err := d.Decode(json.RawMessage(raw))
			if err != nil {
				if !errors.Is(err, ErrBadPayload) {
					t.Fatalf("%s: %q: an error that is not ErrBadPayload: %v", d.Type, raw, err)
				}
				continue
			}
			if _, err := json.Marshal(p); err != nil {
				t.Fatalf("%s: %q decoded to a payload that does not encode: %v", d.Type, raw, err)
			}
		}
	})
}

// FuzzParsePage feeds the scraper any page: it answers a title of at most
// maxTitle bytes of valid UTF-8 and at most max distinct absolute http(s)
// links, and never panics.
func FuzzParsePage(f *testing.F) {
	for _, seed := range []string{
		`<html><head><title>Hello</title></head><body><a href="/a">a</a><a href="https://x.test/b#f">b</a></body></html>`,
		`<title>Broken<a href="/x">`,
		`<a href="javascript:alert(1)">`, `<a href="//other.test/p">`, `<a href=" http://[::1]:80/ ">`,
		`<title>` + strings.Repeat("é", 2000) + `</title>`, "<title>\xff\xfe</title>",
	} {
		f.Add(seed, 10)
	}
	base, _ := url.Parse("https://example.com/dir/page")
	f.Fuzz(func(t *testing.T, doc string, max int) {
		max = max&0xff + 1
		title, links := parsePage(doc, base, max)
		if len(title) > maxTitle || !utf8.ValidString(title) {
			t.Fatalf("title of %d bytes (valid UTF-8: %v)", len(title), utf8.ValidString(title))
		}
		if len(links) > max {
			t.Fatalf("%d links, max %d", len(links), max)
		}
		seen := map[string]bool{}
		for _, l := range links {
			u, err := url.Parse(l)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || seen[l] {
				t.Fatalf("link %q: not a distinct absolute http(s) URL (%v)", l, err)
			}
			seen[l] = true
		}
	})
}
