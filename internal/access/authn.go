package access

import (
	"context"
	"crypto/subtle"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/cache"
	"github.com/agentry/agentry/internal/platform"
)

// Store is what authentication reads and writes of identities. The
// postgres package implements it.
type Store interface {
	Facts(ctx context.Context, userID, orgID string) (*platform.PrincipalFacts, error)
	SessionRevoked(ctx context.Context, familyID string) (bool, error)
	KeyByPrefix(ctx context.Context, prefix string) (*platform.APIKey, string, error)
	TouchKey(ctx context.Context, id string) error
	Record(ctx context.Context, e platform.AuditEvent) error
}

// Cache keys the authenticator uses; the service invalidates them on change.
func factsKey(userID string) string   { return "facts:" + userID + ":" }
func sessionKey(family string) string { return "session:" + family }
func keyKey(prefix string) string     { return "key:" + prefix }

type cachedKey struct {
	key  *platform.APIKey
	kind string
}

// Authenticator turns a request's credentials into the principal it acts as.
// What it loads (a user's roles in an organization, whether a session is
// revoked, an API key) is cached in the process for a few seconds and
// dropped on every replica as soon as it changes, through the cache bus.
type Authenticator struct {
	tokens *Tokens
	store  Store

	facts    *cache.Local[*platform.PrincipalFacts]
	sessions *cache.Local[bool]
	keys     *cache.Local[cachedKey]

	touchMu sync.Mutex
	touched map[string]time.Time
}

// NewAuthenticator returns an authenticator whose cached facts live ttl.
func NewAuthenticator(tokens *Tokens, store Store, ttl time.Duration) *Authenticator {
	return &Authenticator{
		tokens:   tokens,
		store:    store,
		facts:    cache.NewLocal[*platform.PrincipalFacts](100_000, ttl),
		sessions: cache.NewLocal[bool](100_000, ttl),
		keys:     cache.NewLocal[cachedKey](100_000, ttl),
		touched:  map[string]time.Time{},
	}
}

// Invalidate drops cached facts; the cache bus calls it on every replica.
func (a *Authenticator) Invalidate(keys ...string) {
	a.facts.Delete(keys...)
	a.sessions.Delete(keys...)
	a.keys.Delete(keys...)
}

// Reasons authentication fails, for metrics; the client only hears
// "invalid credentials".
const (
	FailNoCredentials = "missing"
	FailBadToken      = "bad_token"
	FailRevoked       = "revoked"
	FailBadKey        = "bad_key"
	FailDisabled      = "disabled"
	FailNotMember     = "not_member"
)

// AuthError is an authentication failure with its reason.
type AuthError struct {
	Reason string
	Err    *platform.Error
}

func (e *AuthError) Error() string { return e.Err.Error() }
func (e *AuthError) Unwrap() error { return e.Err }

func unauthorized(reason string) error {
	return &AuthError{Reason: reason, Err: platform.Errorf(platform.EUNAUTHORIZED, "invalid or missing credentials")}
}

// Authenticate returns the principal of r: the bearer access token or API
// key of its Authorization header, acting in the organization of its
// X-Org-ID header (or the user's default one).
func (a *Authenticator) Authenticate(ctx context.Context, r *http.Request) (*platform.Principal, error) {
	auth := r.Header.Get("Authorization")
	scheme, credential, ok := strings.Cut(auth, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || credential == "" {
		return nil, unauthorized(FailNoCredentials)
	}
	orgID, err := canonicalOrg(r.Header.Get("X-Org-ID"))
	if err != nil {
		return nil, err
	}
	if IsAPIKey(credential) {
		return a.fromKey(ctx, credential, orgID)
	}
	return a.FromToken(ctx, credential, orgID)
}

// canonicalOrg returns the canonical form of an organization id a client
// sent (lower case, with hyphens), "" for none. Decisions compare ids as
// strings, so an id in any other spelling would miss the organization's
// ACL entries and its resources.
func canonicalOrg(orgID string) (string, error) {
	if orgID == "" {
		return "", nil
	}
	id, err := uuid.Parse(orgID)
	if err != nil {
		return "", platform.Invalid("X-Org-ID must be an organization id", platform.FieldError{Field: "header.X-Org-ID", Message: "not a UUID"})
	}
	return id.String(), nil
}

// FromToken returns the principal of an access token acting in orgID ("":
// the user's default organization).
func (a *Authenticator) FromToken(ctx context.Context, token, orgID string) (*platform.Principal, error) {
	orgID, err := canonicalOrg(orgID)
	if err != nil {
		return nil, err
	}
	claims, err := a.tokens.Parse(token)
	if err != nil {
		return nil, unauthorized(FailBadToken)
	}
	revoked, err := a.sessionRevoked(ctx, claims.SessionID)
	if err != nil {
		return nil, err
	}
	if revoked {
		return nil, unauthorized(FailRevoked)
	}
	f, err := a.loadFacts(ctx, claims.Subject, orgID)
	if err != nil {
		return nil, err
	}
	if f.User.TokenVersion != claims.TokenVersion {
		return nil, unauthorized(FailRevoked)
	}
	if orgID == "" && f.User.DefaultOrgID != nil {
		home, err := a.loadFacts(ctx, claims.Subject, *f.User.DefaultOrgID)
		if err != nil {
			return nil, err
		}
		// A default organization the user was removed from is no default:
		// they act in none (and may choose another), not refused outright.
		if home.Member || home.User.IsSuperadmin {
			orgID, f = *f.User.DefaultOrgID, home
		}
	}
	p, err := userPrincipal(f, orgID)
	if err != nil {
		return nil, err
	}
	p.SessionID = claims.SessionID
	return p, nil
}

func userPrincipal(f *platform.PrincipalFacts, orgID string) (*platform.Principal, error) {
	if f.User.Disabled {
		return nil, unauthorized(FailDisabled)
	}
	if orgID != "" && !f.Member && !f.User.IsSuperadmin {
		return nil, &AuthError{Reason: FailNotMember, Err: platform.Errorf(platform.EFORBIDDEN, "you do not belong to organization %s", orgID)}
	}
	return &platform.Principal{
		ID:          f.User.ID,
		Kind:        platform.KindUser,
		Email:       f.User.Email,
		OrgID:       orgID,
		Roles:       f.Roles,
		Permissions: f.Permissions,
		Superadmin:  f.User.IsSuperadmin,
	}, nil
}

func (a *Authenticator) loadFacts(ctx context.Context, userID, orgID string) (*platform.PrincipalFacts, error) {
	key := factsKey(userID) + orgID
	if f, ok := a.facts.Get(key); ok {
		return f, nil
	}
	f, err := a.store.Facts(ctx, userID, orgID)
	if platform.ErrorCode(err) == platform.ENOTFOUND {
		return nil, unauthorized(FailBadToken)
	}
	if err != nil {
		return nil, err
	}
	a.facts.Set(key, f)
	return f, nil
}

func (a *Authenticator) sessionRevoked(ctx context.Context, family string) (bool, error) {
	if revoked, ok := a.sessions.Get(sessionKey(family)); ok {
		return revoked, nil
	}
	revoked, err := a.store.SessionRevoked(ctx, family)
	if err != nil {
		return false, err
	}
	a.sessions.Set(sessionKey(family), revoked)
	return revoked, nil
}

func (a *Authenticator) fromKey(ctx context.Context, credential, orgID string) (*platform.Principal, error) {
	prefix, hash, ok := SplitAPIKey(credential)
	if !ok {
		return nil, unauthorized(FailBadKey)
	}
	ck, ok := a.keys.Get(keyKey(prefix))
	if !ok {
		key, kind, err := a.store.KeyByPrefix(ctx, prefix)
		if platform.ErrorCode(err) == platform.ENOTFOUND {
			return nil, unauthorized(FailBadKey)
		}
		if err != nil {
			return nil, err
		}
		ck = cachedKey{key: key, kind: kind}
		a.keys.Set(keyKey(prefix), ck)
	}
	key := ck.key
	if subtle.ConstantTimeCompare(hash, key.SecretHash) != 1 || key.RevokedAt != nil ||
		(key.ExpiresAt != nil && time.Now().After(*key.ExpiresAt)) {
		return nil, unauthorized(FailBadKey)
	}
	if orgID != "" && orgID != key.OrgID {
		return nil, &AuthError{Reason: FailNotMember, Err: platform.Errorf(platform.EFORBIDDEN, "this API key acts only in organization %s", key.OrgID)}
	}
	scope, _ := platform.ParsePermissions(key.Permissions)
	var p *platform.Principal
	switch ck.kind {
	case platform.KindUser:
		f, err := a.loadFacts(ctx, key.EntityID, key.OrgID)
		if err != nil {
			return nil, err
		}
		if p, err = userPrincipal(f, key.OrgID); err != nil {
			return nil, err
		}
		if !f.Member {
			return nil, unauthorized(FailNotMember)
		}
		// A superadmin's key is a superadmin only with the whole scope (*):
		// one of narrower scope stays in its organization, as anyone's.
		p.Superadmin = p.Superadmin && slices.ContainsFunc(scope, func(q platform.Permission) bool { return q.String() == "*" })
	case platform.KindAgent:
		// An agent's key acts within its creator's permissions as they are
		// now: a creator removed from the organization, disabled or
		// demoted takes the key's power down with them.
		f, err := a.loadFacts(ctx, key.OwnerID, key.OrgID)
		if err != nil {
			return nil, err
		}
		creator, err := userPrincipal(f, key.OrgID)
		if err != nil {
			return nil, err
		}
		if !f.Member && !creator.Superadmin {
			return nil, unauthorized(FailNotMember)
		}
		if !creator.Superadmin {
			if scope = intersect(scope, creator.Permissions); len(scope) == 0 {
				return nil, unauthorized(FailNotMember)
			}
		}
		p = &platform.Principal{ID: key.EntityID, Kind: platform.KindAgent, OrgID: key.OrgID, Permissions: scope}
	default:
		return nil, unauthorized(FailBadKey)
	}
	p.KeyID = key.ID
	p.KeyScope = scope
	a.touch(ctx, key.ID)
	return p, nil
}

// touch records a key's use at most once a minute per process.
func (a *Authenticator) touch(ctx context.Context, id string) {
	a.touchMu.Lock()
	last := a.touched[id]
	now := time.Now()
	if now.Sub(last) < time.Minute {
		a.touchMu.Unlock()
		return
	}
	a.touched[id] = now
	if len(a.touched) > 100_000 {
		clear(a.touched)
	}
	a.touchMu.Unlock()
	_ = a.store.TouchKey(context.WithoutCancel(ctx), id)
}

// IsAuthError reports whether err is an authentication failure, and why.
func IsAuthError(err error) (string, bool) {
	var ae *AuthError
	if errors.As(err, &ae) {
		return ae.Reason, true
	}
	return "", false
}

// AuthReason names why authentication failed, for metrics.
func (e *AuthError) AuthReason() string { return e.Reason }

// intersect returns permissions granting only what both a and b grant:
// those of each that one of the other covers. (Where two wildcards cross,
// as Agent.* and *.read, it grants less than both would: never more.)
func intersect(a, b []platform.Permission) []platform.Permission {
	var out []platform.Permission
	add := func(from, other []platform.Permission) {
		for _, p := range from {
			for _, q := range other {
				if q.Covers(p) && !slices.Contains(out, p) {
					out = append(out, p)
					break
				}
			}
		}
	}
	add(a, b)
	add(b, a)
	return out
}
