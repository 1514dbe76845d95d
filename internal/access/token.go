package access

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Claims are the claims of an access token.
type Claims struct {
	jwt.RegisteredClaims
	// SessionID is the refresh-token family the token was issued in;
	// revoking the session refuses the token.
	SessionID string `json:"sid"`
	// TokenVersion must equal the user's: bumping it refuses every token.
	TokenVersion int64 `json:"ver"`
}

// Tokens issues and verifies access tokens: HS256 JWTs with a pinned
// algorithm, issuer and audience, and a required expiry.
type Tokens struct {
	secret   []byte
	issuer   string
	audience string
	ttl      time.Duration
	parser   *jwt.Parser
	now      func() time.Time
}

// NewTokens returns a token issuer and verifier.
func NewTokens(secret, issuer, audience string, ttl time.Duration) *Tokens {
	t := &Tokens{secret: []byte(secret), issuer: issuer, audience: audience, ttl: ttl, now: time.Now}
	t.parser = jwt.NewParser(
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithIssuer(issuer),
		jwt.WithAudience(audience),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(5*time.Second),
		jwt.WithTimeFunc(func() time.Time { return t.now() }),
	)
	return t
}

// TTL is how long an access token lives.
func (t *Tokens) TTL() time.Duration { return t.ttl }

// Issue returns a signed access token for user in session.
func (t *Tokens) Issue(userID, sessionID string, tokenVersion int64) (string, error) {
	now := t.now()
	var jti [12]byte
	_, _ = rand.Read(jti[:])
	claims := Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    t.issuer,
			Subject:   userID,
			Audience:  jwt.ClaimStrings{t.audience},
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(t.ttl)),
			ID:        hex.EncodeToString(jti[:]),
		},
		SessionID:    sessionID,
		TokenVersion: tokenVersion,
	}
	return jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(t.secret)
}

// ErrBadToken is every reason a token is refused; the reason is not told
// to the client.
var ErrBadToken = errors.New("invalid or expired access token")

// Parse verifies token and returns its claims.
func (t *Tokens) Parse(token string) (*Claims, error) {
	if len(token) > 4096 {
		return nil, ErrBadToken
	}
	claims := &Claims{}
	parsed, err := t.parser.ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return t.secret, nil })
	if err != nil || !parsed.Valid || claims.Subject == "" || claims.SessionID == "" {
		return nil, ErrBadToken
	}
	return claims, nil
}
