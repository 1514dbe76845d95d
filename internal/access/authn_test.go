package access_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/platform"
)

// fakeStore is an in-memory access.Store.
type fakeStore struct {
	mu      sync.Mutex
	users   map[string]*platform.User
	roles   map[string][]platform.RoleRef // userID|orgID → roles
	perms   map[string][]string           // roleID → permissions
	revoked map[string]bool               // session family → revoked
	keys    map[string]*platform.APIKey   // prefix → key
	kinds   map[string]string             // entity → kind
	touched []string
	facts   int // Facts calls
}

func newFakeStore() *fakeStore {
	return &fakeStore{users: map[string]*platform.User{}, roles: map[string][]platform.RoleRef{}, perms: map[string][]string{},
		revoked: map[string]bool{}, keys: map[string]*platform.APIKey{}, kinds: map[string]string{}}
}

func (s *fakeStore) Facts(_ context.Context, userID, orgID string) (*platform.PrincipalFacts, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.facts++
	u, ok := s.users[userID]
	if !ok {
		return nil, platform.Errorf(platform.ENOTFOUND, "user not found")
	}
	f := &platform.PrincipalFacts{User: *u}
	// Like PostgreSQL, compare organization ids as UUIDs.
	if id, err := uuid.Parse(orgID); err == nil {
		orgID = id.String()
	}
	for _, r := range s.roles[userID+"|"+orgID] {
		f.Member = true
		f.Roles = append(f.Roles, r)
		ps, _ := platform.ParsePermissions(s.perms[r.ID])
		f.Permissions = append(f.Permissions, ps...)
	}
	return f, nil
}

func (s *fakeStore) SessionRevoked(_ context.Context, family string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.revoked[family], nil
}

func (s *fakeStore) KeyByPrefix(_ context.Context, prefix string) (*platform.APIKey, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.keys[prefix]
	if !ok {
		return nil, "", platform.Errorf(platform.ENOTFOUND, "api key not found")
	}
	cp := *k
	return &cp, s.kinds[k.EntityID], nil
}

func (s *fakeStore) TouchKey(_ context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.touched = append(s.touched, id)
	return nil
}

func (s *fakeStore) Record(context.Context, platform.AuditEvent) error { return nil }

// authnWorld is one user, member of two organizations, with a session.
type authnWorld struct {
	store   *fakeStore
	tokens  *access.Tokens
	authn   *access.Authenticator
	user    *platform.User
	home    string // the user's default organization, where it is owner
	second  string // an organization where it is viewer
	foreign string // an organization it does not belong to
	session string
}

func newAuthnWorld(t *testing.T) *authnWorld {
	t.Helper()
	w := &authnWorld{store: newFakeStore(), tokens: newTokens(), home: uuid.NewString(), second: uuid.NewString(), foreign: uuid.NewString(), session: uuid.NewString()}
	w.authn = access.NewAuthenticator(w.tokens, w.store, time.Minute)
	w.user = &platform.User{ID: uuid.NewString(), Email: "ada@example.com", TokenVersion: 3, DefaultOrgID: &w.home}
	w.store.users[w.user.ID] = w.user
	w.store.kinds[w.user.ID] = platform.KindUser
	owner, viewer := platform.RoleRef{ID: uuid.NewString(), Name: "owner"}, platform.RoleRef{ID: uuid.NewString(), Name: "viewer"}
	w.store.perms[owner.ID] = []string{"*"}
	w.store.perms[viewer.ID] = []string{"Agent.read"}
	w.store.roles[w.user.ID+"|"+w.home] = []platform.RoleRef{owner}
	w.store.roles[w.user.ID+"|"+w.second] = []platform.RoleRef{viewer}
	return w
}

func (w *authnWorld) token(t *testing.T) string {
	t.Helper()
	tok, err := w.tokens.Issue(w.user.ID, w.session, w.user.TokenVersion)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// key stores an API key of entity (kind) in org and returns its secret.
func (w *authnWorld) key(entity, kind, org string, perms []string, edit func(*platform.APIKey)) string {
	secret, prefix, hash := access.NewAPIKey()
	k := &platform.APIKey{Base: platform.Base{ID: uuid.NewString(), OrgID: org, OwnerID: w.user.ID}, EntityID: entity, Prefix: prefix, SecretHash: hash, Permissions: perms}
	if edit != nil {
		edit(k)
	}
	w.store.mu.Lock()
	w.store.keys[prefix] = k
	w.store.kinds[entity] = kind
	w.store.mu.Unlock()
	return secret
}

func request(credential, org string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/v1/agents", nil)
	if credential != "" {
		r.Header.Set("Authorization", "Bearer "+credential)
	}
	if org != "" {
		r.Header.Set("X-Org-ID", org)
	}
	return r
}

// refused checks that err is an authentication failure with the code and
// reason.
func refused(t *testing.T, p *platform.Principal, err error, code, reason string) {
	t.Helper()
	if err == nil {
		t.Fatalf("want %s (%s), got principal %+v", code, reason, p)
	}
	if got := platform.ErrorCode(err); got != code {
		t.Fatalf("want %s, got %v", code, err)
	}
	if reason == "" {
		return
	}
	if got, ok := access.IsAuthError(err); !ok || got != reason {
		t.Fatalf("want reason %q, got %q (%v)", reason, got, err)
	}
}

func TestAuthenticateToken(t *testing.T) {
	ctx := context.Background()
	w := newAuthnWorld(t)
	tok := w.token(t)

	t.Run("default organization", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request(tok, ""))
		if err != nil {
			t.Fatal(err)
		}
		if p.ID != w.user.ID || p.Kind != platform.KindUser || p.OrgID != w.home || p.SessionID != w.session || !p.HasRole("owner") || p.KeyID != "" {
			t.Fatalf("principal: %+v", p)
		}
	})
	t.Run("X-Org-ID of another membership", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request(tok, w.second))
		if err != nil {
			t.Fatal(err)
		}
		if p.OrgID != w.second || !p.HasRole("viewer") || p.HasRole("owner") || len(p.Permissions) != 1 {
			t.Fatalf("principal: %+v", p)
		}
	})
	t.Run("X-Org-ID in upper case", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request(tok, strings.ToUpper(w.second)))
		if err != nil {
			t.Fatal(err)
		}
		// Decisions compare organization ids as strings: the id must be
		// the canonical one, or a deny entry of the organization is missed.
		if p.OrgID != w.second {
			t.Fatalf("OrgID %q, want the canonical %q", p.OrgID, w.second)
		}
	})
	t.Run("X-Org-ID of an organization it does not belong to", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request(tok, w.foreign))
		refused(t, p, err, platform.EFORBIDDEN, access.FailNotMember)
	})
	t.Run("X-Org-ID not a UUID", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request(tok, "acme"))
		refused(t, p, err, platform.EINVALID, "")
	})
	t.Run("no credentials", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request("", ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailNoCredentials)
	})
	t.Run("not a bearer", func(t *testing.T) {
		r := request("", "")
		r.Header.Set("Authorization", "Basic "+tok)
		p, err := w.authn.Authenticate(ctx, r)
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailNoCredentials)
	})
	t.Run("bad token", func(t *testing.T) {
		p, err := w.authn.Authenticate(ctx, request(tok+"x", ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadToken)
	})
	t.Run("user deleted", func(t *testing.T) {
		tok, _ := w.tokens.Issue(uuid.NewString(), w.session, 1)
		p, err := w.authn.Authenticate(ctx, request(tok, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadToken)
	})
	t.Run("superadmin acts in any organization", func(t *testing.T) {
		w := newAuthnWorld(t)
		w.user.IsSuperadmin = true
		p, err := w.authn.Authenticate(ctx, request(w.token(t), w.foreign))
		if err != nil {
			t.Fatal(err)
		}
		if p.OrgID != w.foreign || !p.Superadmin || len(p.Roles) != 0 {
			t.Fatalf("principal: %+v", p)
		}
	})
}

func TestAuthenticateRevocation(t *testing.T) {
	ctx := context.Background()
	t.Run("disabled user", func(t *testing.T) {
		w := newAuthnWorld(t)
		w.user.Disabled = true
		p, err := w.authn.Authenticate(ctx, request(w.token(t), ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailDisabled)
	})
	t.Run("token_version bump", func(t *testing.T) {
		w := newAuthnWorld(t)
		tok := w.token(t)
		if _, err := w.authn.Authenticate(ctx, request(tok, "")); err != nil {
			t.Fatal(err)
		}
		w.store.mu.Lock()
		w.user.TokenVersion++
		w.store.mu.Unlock()
		svc := &access.Service{Invalidate: func(_ context.Context, keys ...string) { w.authn.Invalidate(keys...) }}
		svc.InvalidateUser(ctx, w.user.ID)
		p, err := w.authn.Authenticate(ctx, request(tok, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailRevoked)
		if _, err := w.authn.Authenticate(ctx, request(w.token(t), "")); err != nil {
			t.Fatalf("a token of the new version: %v", err)
		}
	})
	t.Run("revoked session", func(t *testing.T) {
		w := newAuthnWorld(t)
		w.store.revoked[w.session] = true
		p, err := w.authn.Authenticate(ctx, request(w.token(t), ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailRevoked)
	})
	t.Run("session revoked after use, cache invalidated", func(t *testing.T) {
		w := newAuthnWorld(t)
		tok := w.token(t)
		if _, err := w.authn.Authenticate(ctx, request(tok, "")); err != nil {
			t.Fatal(err)
		}
		w.store.mu.Lock()
		w.store.revoked[w.session] = true
		w.store.mu.Unlock()
		w.authn.Invalidate("session:" + w.session)
		p, err := w.authn.Authenticate(ctx, request(tok, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailRevoked)
	})
	t.Run("facts are cached", func(t *testing.T) {
		w := newAuthnWorld(t)
		tok := w.token(t)
		for range 5 {
			if _, err := w.authn.Authenticate(ctx, request(tok, w.second)); err != nil {
				t.Fatal(err)
			}
		}
		if w.store.facts != 1 {
			t.Fatalf("want 1 load of the facts, got %d", w.store.facts)
		}
	})
}

func TestAuthenticateKey(t *testing.T) {
	ctx := context.Background()
	w := newAuthnWorld(t)
	svc := &access.Service{Invalidate: func(_ context.Context, keys ...string) { w.authn.Invalidate(keys...) }}
	past, future := time.Now().Add(-time.Minute), time.Now().Add(time.Hour)

	t.Run("user key", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"Agent.read"}, nil)
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		if err != nil {
			t.Fatal(err)
		}
		if p.ID != w.user.ID || p.Kind != platform.KindUser || p.OrgID != w.home || p.KeyID == "" || len(p.KeyScope) != 1 || !p.HasRole("owner") || p.SessionID != "" {
			t.Fatalf("principal: %+v", p)
		}
		if len(w.store.touched) != 1 {
			t.Fatalf("the key's use is not recorded: %v", w.store.touched)
		}
	})
	t.Run("agent key", func(t *testing.T) {
		agent := uuid.NewString()
		key := w.key(agent, platform.KindAgent, w.home, []string{"Agent.read", "Command.read"}, nil)
		p, err := w.authn.Authenticate(ctx, request(key, w.home))
		if err != nil {
			t.Fatal(err)
		}
		if p.ID != agent || p.Kind != platform.KindAgent || p.OrgID != w.home || len(p.Permissions) != 2 || len(p.KeyScope) != 2 || p.Superadmin {
			t.Fatalf("principal: %+v", p)
		}
	})
	t.Run("a superadmin's narrow key is not a superadmin's", func(t *testing.T) {
		w := newAuthnWorld(t)
		w.user.IsSuperadmin = true
		narrow := w.key(w.user.ID, platform.KindUser, w.home, []string{"Agent.read"}, nil)
		p, err := w.authn.Authenticate(ctx, request(narrow, ""))
		if err != nil {
			t.Fatal(err)
		}
		if p.Superadmin {
			t.Fatalf("a key scoped to Agent.read crosses organizations as a superadmin: %+v", p)
		}
		full := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, nil)
		if p, err = w.authn.Authenticate(ctx, request(full, "")); err != nil || !p.Superadmin {
			t.Fatalf("a superadmin's * key: %+v, %v", p, err)
		}
	})
	t.Run("key that does not expire yet", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, func(k *platform.APIKey) { k.ExpiresAt = &future })
		if _, err := w.authn.Authenticate(ctx, request(key, "")); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("revoked key", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, func(k *platform.APIKey) { k.RevokedAt = &past })
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
	})
	t.Run("key revoked after use", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, nil)
		if _, err := w.authn.Authenticate(ctx, request(key, "")); err != nil {
			t.Fatal(err)
		}
		prefix, _, _ := access.SplitAPIKey(key)
		w.store.mu.Lock()
		w.store.keys[prefix].RevokedAt = &past
		w.store.mu.Unlock()
		svc.InvalidateKey(ctx, prefix)
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
	})
	t.Run("expired key", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, func(k *platform.APIKey) { k.ExpiresAt = &past })
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
	})
	t.Run("wrong secret", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, nil)
		p, err := w.authn.Authenticate(ctx, request(key[:len(key)-1]+"x", ""))
		if key[len(key)-1] == 'x' {
			p, err = w.authn.Authenticate(ctx, request(key[:len(key)-1]+"y", ""))
		}
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
	})
	t.Run("unknown key", func(t *testing.T) {
		key, _, _ := access.NewAPIKey()
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
	})
	t.Run("malformed key", func(t *testing.T) {
		for _, key := range []string{"agk_", "agk_short", "agk_abcdefghijklXsecret", "agk_abcdefghijkl_" + strings.Repeat("x", 200)} {
			p, err := w.authn.Authenticate(ctx, request(key, ""))
			refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
		}
	})
	t.Run("key used with another organization's X-Org-ID", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, nil)
		for _, org := range []string{w.second, w.foreign} {
			p, err := w.authn.Authenticate(ctx, request(key, org))
			refused(t, p, err, platform.EFORBIDDEN, access.FailNotMember)
		}
		if _, err := w.authn.Authenticate(ctx, request(key, strings.ToUpper(w.home))); err != nil {
			t.Fatalf("its own organization in upper case: %v", err)
		}
	})
	t.Run("key of a user who left the organization", func(t *testing.T) {
		key := w.key(w.user.ID, platform.KindUser, w.foreign, []string{"*"}, nil)
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EFORBIDDEN, access.FailNotMember)
	})
	t.Run("key of a disabled user", func(t *testing.T) {
		w := newAuthnWorld(t)
		w.user.Disabled = true
		key := w.key(w.user.ID, platform.KindUser, w.home, []string{"*"}, nil)
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailDisabled)
	})
	t.Run("key of an entity of another kind", func(t *testing.T) {
		key := w.key(uuid.NewString(), platform.KindOrganization, w.home, []string{"*"}, nil)
		p, err := w.authn.Authenticate(ctx, request(key, ""))
		refused(t, p, err, platform.EUNAUTHORIZED, access.FailBadKey)
	})
}

func TestAPIKeyFormat(t *testing.T) {
	key, prefix, hash := access.NewAPIKey()
	if !access.IsAPIKey(key) || !strings.HasPrefix(key, prefix+"_") || len(prefix) != 16 {
		t.Fatalf("key %q, prefix %q", key, prefix)
	}
	gotPrefix, gotHash, ok := access.SplitAPIKey(key)
	if !ok || gotPrefix != prefix || string(gotHash) != string(hash) {
		t.Fatalf("SplitAPIKey(%q) = %q, %x, %v", key, gotPrefix, gotHash, ok)
	}
	other, _, _ := access.NewAPIKey()
	if other == key {
		t.Fatal("two identical keys")
	}
}
