package access_test

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/agentry/agentry/internal/access"
)

const (
	testSecret   = "a-test-secret-of-at-least-32-characters!"
	testIssuer   = "agentry"
	testAudience = "agentry-api"
)

func newTokens() *access.Tokens {
	return access.NewTokens(testSecret, testIssuer, testAudience, 15*time.Minute)
}

// goodClaims are the claims Tokens.Issue would write, for forging variants.
func goodClaims() jwt.MapClaims {
	now := time.Now()
	return jwt.MapClaims{
		"iss": testIssuer,
		"sub": "5f0c7a44-1111-4c2b-9a4e-0d6f3c1b2a90",
		"aud": []string{testAudience},
		"iat": now.Unix(),
		"nbf": now.Unix(),
		"exp": now.Add(10 * time.Minute).Unix(),
		"jti": "abc",
		"sid": "7d4e2c1a-2222-4b3c-8d5e-1f2a3b4c5d6e",
		"ver": 1,
	}
}

func sign(t testing.TB, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// hmacToken signs header.payload with HMAC-SHA256 whatever the header says.
func hmacToken(header map[string]any, claims jwt.MapClaims, secret string) string {
	h, _ := json.Marshal(header)
	c, _ := json.Marshal(claims)
	enc := base64.RawURLEncoding
	unsigned := enc.EncodeToString(h) + "." + enc.EncodeToString(c)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(unsigned))
	return unsigned + "." + enc.EncodeToString(mac.Sum(nil))
}

func TestTokensIssueParse(t *testing.T) {
	tokens := newTokens()
	tok, err := tokens.Issue("user-1", "session-1", 7)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tokens.Parse(tok)
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject != "user-1" || c.SessionID != "session-1" || c.TokenVersion != 7 || c.Issuer != testIssuer {
		t.Fatalf("claims: %+v", c)
	}
	if len(c.Audience) != 1 || c.Audience[0] != testAudience {
		t.Fatalf("audience: %v", c.Audience)
	}
	if got := c.ExpiresAt.Sub(c.IssuedAt.Time); got != 15*time.Minute {
		t.Fatalf("lifetime: want 15m, got %s", got)
	}
	other, _ := tokens.Issue("user-1", "session-1", 7)
	if other == tok {
		t.Fatal("two tokens are identical: no jti")
	}
}

func TestTokensRefused(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	with := func(edit func(jwt.MapClaims)) jwt.MapClaims {
		c := goodClaims()
		edit(c)
		return c
	}
	valid := sign(t, jwt.SigningMethodHS256, []byte(testSecret), goodClaims())
	parts := strings.Split(valid, ".")
	flip := func(s string, i int) string {
		b := []byte(s)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		return string(b)
	}
	payload, _ := json.Marshal(with(func(c jwt.MapClaims) { c["sub"] = "someone-else" }))

	cases := []struct {
		name  string
		token string
	}{
		{"empty", ""},
		{"garbage", "not.a.token"},
		{"two parts", parts[0] + "." + parts[1]},
		{"expired", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) {
			c["iat"], c["nbf"], c["exp"] = time.Now().Add(-time.Hour).Unix(), time.Now().Add(-time.Hour).Unix(), time.Now().Add(-time.Minute).Unix()
		}))},
		{"no expiry", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { delete(c, "exp") }))},
		{"issued in the future", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["iat"] = time.Now().Add(time.Hour).Unix() }))},
		{"not yet valid", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["nbf"] = time.Now().Add(time.Hour).Unix() }))},
		{"wrong audience", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["aud"] = []string{"another-api"} }))},
		{"no audience", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { delete(c, "aud") }))},
		{"wrong issuer", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["iss"] = "evil" }))},
		{"no issuer", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { delete(c, "iss") }))},
		{"missing sid", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { delete(c, "sid") }))},
		{"empty sid", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["sid"] = "" }))},
		{"missing sub", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { delete(c, "sub") }))},
		{"sid of the wrong type", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["sid"] = 42 }))},
		{"wrong secret", sign(t, jwt.SigningMethodHS256, []byte("another-secret-of-at-least-32-characters"), goodClaims())},
		{"alg none", sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, goodClaims())},
		{"alg none with the valid signature", hmacToken(map[string]any{"alg": "none", "typ": "JWT"}, goodClaims(), testSecret)},
		{"HS384", sign(t, jwt.SigningMethodHS384, []byte(testSecret), goodClaims())},
		{"HS512", sign(t, jwt.SigningMethodHS512, []byte(testSecret), goodClaims())},
		{"RS256", sign(t, jwt.SigningMethodRS256, rsaKey, goodClaims())},
		{"RS256 header over an HMAC signature", hmacToken(map[string]any{"alg": "RS256", "typ": "JWT"}, goodClaims(), testSecret)},
		{"tampered signature", parts[0] + "." + parts[1] + "." + flip(parts[2], 5)},
		{"signature removed", parts[0] + "." + parts[1] + "."},
		{"tampered payload", parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2]},
		{"too long", sign(t, jwt.SigningMethodHS256, []byte(testSecret), with(func(c jwt.MapClaims) { c["pad"] = strings.Repeat("x", 4096) }))},
	}
	tokens := newTokens()
	if _, err := tokens.Parse(valid); err != nil {
		t.Fatalf("the untampered token is refused: %v", err)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if c, err := tokens.Parse(tc.token); err == nil {
				t.Fatalf("accepted: %+v", c)
			} else if err != access.ErrBadToken {
				t.Fatalf("want ErrBadToken, got %v", err)
			}
		})
	}
}

// FuzzParseToken checks that Parse never panics, and that whatever it
// accepts is an HS256 token signed with the secret, naming a subject and
// a session.
func FuzzParseToken(f *testing.F) {
	tokens := newTokens()
	valid, err := tokens.Issue("user-1", "session-1", 1)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add("")
	f.Add("a.b.c")
	f.Add("eyJhbGciOiJub25lIn0.e30.")
	f.Add(sign(f, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, goodClaims()))
	f.Add(sign(f, jwt.SigningMethodHS384, []byte(testSecret), goodClaims()))
	f.Add(hmacToken(map[string]any{"alg": "HS256"}, jwt.MapClaims{"iss": testIssuer, "aud": testAudience, "exp": 1 << 40, "sub": "u"}, testSecret))
	f.Add(hmacToken(map[string]any{"alg": "HS256", "crit": []string{"x"}}, goodClaims(), testSecret))
	f.Add(hmacToken(map[string]any{"alg": "HS256"}, jwt.MapClaims{"iss": testIssuer, "aud": testAudience, "exp": 1 << 40, "sub": "u", "sid": "s", "ver": "x"}, testSecret))
	f.Fuzz(func(t *testing.T, token string) {
		c, err := tokens.Parse(token)
		if err != nil {
			return
		}
		if c.Subject == "" || c.SessionID == "" {
			t.Fatalf("accepted without sub or sid: %q", token)
		}
		parts := strings.Split(token, ".")
		if len(parts) != 3 {
			t.Fatalf("accepted a token of %d parts: %q", len(parts), token)
		}
		header, err := base64.RawURLEncoding.DecodeString(parts[0])
		if err != nil {
			t.Fatalf("accepted an undecodable header: %q", token)
		}
		var h struct {
			Alg string `json:"alg"`
		}
		if err := json.Unmarshal(header, &h); err != nil || h.Alg != "HS256" {
			t.Fatalf("accepted alg %q: %q", h.Alg, token)
		}
		sig, err := base64.RawURLEncoding.DecodeString(parts[2])
		if err != nil {
			t.Fatalf("accepted an undecodable signature: %q", token)
		}
		mac := hmac.New(sha256.New, []byte(testSecret))
		mac.Write([]byte(parts[0] + "." + parts[1]))
		if !hmac.Equal(sig, mac.Sum(nil)) {
			t.Fatalf("accepted a token not signed with the secret: %q", token)
		}
	})
}
