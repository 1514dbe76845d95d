package access_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/access"
	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/postgres"
	"github.com/agentry/agentry/internal/redisx"
	"github.com/agentry/agentry/internal/testenv"
)

// cheapPasswords keep argon2id's format at a cost tests can afford.
var cheapPasswords = access.NewPasswords(access.PasswordParams{Memory: 64, Time: 1, Threads: 1, SaltLen: 16, KeyLen: 32})

type accountsWorld struct {
	svc         *access.Service
	store       *postgres.IdentityStore
	mu          sync.Mutex
	invalidated []string
}

// newAccounts returns the account flows on a fresh schema and Redis prefix.
func newAccounts(t *testing.T) *accountsWorld {
	t.Helper()
	db := testenv.Postgres(t)
	rdb, prefix := testenv.Redis(t)
	w := &accountsWorld{store: &postgres.IdentityStore{DB: db}}
	w.svc = &access.Service{
		Accounts:    w.store,
		Passwords:   cheapPasswords,
		Tokens:      newTokens(),
		Throttle:    redisx.NewThrottle(rdb, prefix),
		Audit:       &access.Audit{Store: w.store},
		RefreshTTL:  time.Hour,
		MaxFailures: 3,
		Window:      time.Minute,
		Invalidate: func(_ context.Context, keys ...string) {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.invalidated = append(w.invalidated, keys...)
		},
	}
	return w
}

func from(ip string) context.Context {
	return platform.WithRequestInfo(context.Background(), platform.RequestInfo{ID: "req", IP: ip, UserAgent: "test"})
}

func fields(err error) []string {
	var perr *platform.Error
	if !errors.As(err, &perr) {
		return nil
	}
	out := make([]string, len(perr.Fields))
	for i, f := range perr.Fields {
		out[i] = f.Field
	}
	return out
}

func TestRegister(t *testing.T) {
	w := newAccounts(t)
	ctx := from("10.0.0.1")
	u, err := w.svc.Register(ctx, " Ada@Example.com ", "correct horse", "Ada")
	if err != nil {
		t.Fatal(err)
	}
	if u.Email != "ada@example.com" || u.IsSuperadmin || u.DefaultOrgID == nil || u.PasswordHash == "" || !strings.HasPrefix(u.PasswordHash, "$argon2id$") {
		t.Fatalf("user: %+v", u)
	}
	for _, tc := range []struct {
		name, email, password, userName string
		want                            []string
	}{
		{"bad email", "ada", "correct horse", "Ada", []string{"body.email"}},
		{"email with a display name", "Ada <ada@example.org>", "correct horse", "Ada", []string{"body.email"}},
		{"email without a dot in the domain", "ada@localhost", "correct horse", "Ada", []string{"body.email"}},
		{"short password", "bob@example.com", "short", "Bob", []string{"body.password"}},
		{"password is the email", "bob@example.com", "BOB@example.com", "Bob", []string{"body.password"}},
		{"blank name", "bob@example.com", "correct horse", "  ", []string{"body.name"}},
		{"everything wrong", "bob", "x", "", []string{"body.email", "body.password", "body.name"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := w.svc.Register(ctx, tc.email, tc.password, tc.userName)
			if platform.ErrorCode(err) != platform.EINVALID || strings.Join(fields(err), ",") != strings.Join(tc.want, ",") {
				t.Fatalf("want EINVALID on %v, got %v (%v)", tc.want, err, fields(err))
			}
		})
	}
	t.Run("duplicate email, any case", func(t *testing.T) {
		_, err := w.svc.Register(ctx, "ADA@example.COM", "another password", "Impostor")
		if platform.ErrorCode(err) != platform.ECONFLICT {
			t.Fatalf("want ECONFLICT, got %v", err)
		}
		if msg := platform.ErrorMessage(err); strings.Contains(msg, u.ID) || strings.Contains(strings.ToLower(msg), "ada") {
			t.Fatalf("the conflict tells too much: %q", msg)
		}
	})
}

func TestLoginThrottle(t *testing.T) {
	w := newAccounts(t)
	if _, err := w.svc.Register(from("10.0.0.1"), "ada@example.com", "correct horse", "Ada"); err != nil {
		t.Fatal(err)
	}
	attacker, victim := from("10.6.6.6"), from("10.1.1.1")
	for i := range 3 {
		_, err := w.svc.Login(attacker, "ada@example.com", "wrong password")
		if platform.ErrorCode(err) != platform.EUNAUTHORIZED {
			t.Fatalf("failure %d: want EUNAUTHORIZED, got %v", i+1, err)
		}
	}
	// Locked out, even with the right password, and under any spelling
	// of the same email.
	for _, email := range []string{"ada@example.com", "ADA@example.com", " ada@example.com", "ada@example.com\t", "\u00a0ada@example.com"} {
		_, err := w.svc.Login(attacker, email, "correct horse")
		var perr *platform.Error
		if !errors.As(err, &perr) || perr.Code != platform.ETOOMANY || perr.RetryAfter < 1 || perr.RetryAfter > 61 {
			t.Fatalf("login as %q after 3 failures: want ETOOMANY with a wait of at most the window, got %v", email, err)
		}
	}
	// Someone else, elsewhere, logs in.
	if _, err := w.svc.Login(victim, "ada@example.com", "correct horse"); err != nil {
		t.Fatalf("the right password from another address: %v", err)
	}
	// An unknown email fails the same way as a wrong password.
	_, errUnknown := w.svc.Login(victim, "nobody@example.com", "correct horse")
	_, errWrong := w.svc.Login(victim, "ada@example.com", "wrong password")
	if platform.ErrorCode(errUnknown) != platform.EUNAUTHORIZED || platform.ErrorMessage(errUnknown) != platform.ErrorMessage(errWrong) {
		t.Fatalf("unknown email %v, wrong password %v", errUnknown, errWrong)
	}
}

// Logins sent at once take turns at the limit: only as many as it allows
// have their password checked (a burst was checked whole, then counted).
func TestLoginThrottleUnderBurst(t *testing.T) {
	w := newAccounts(t)
	if _, err := w.svc.Register(from("10.0.0.1"), "ada@example.com", "correct horse", "Ada"); err != nil {
		t.Fatal(err)
	}
	attacker := from("10.6.6.6")
	var wg sync.WaitGroup
	var checked, refused atomic.Int32
	for range 30 {
		wg.Go(func() {
			_, err := w.svc.Login(attacker, "ada@example.com", "wrong password")
			switch platform.ErrorCode(err) {
			case platform.EUNAUTHORIZED:
				checked.Add(1)
			case platform.ETOOMANY:
				refused.Add(1)
			default:
				t.Errorf("a login of the burst: %v", err)
			}
		})
	}
	wg.Wait()
	if checked.Load() != 3 || refused.Load() != 27 {
		t.Fatalf("30 wrong logins at once: %d checked, %d refused; want 3 (MaxFailures) and 27", checked.Load(), refused.Load())
	}
	if _, err := w.svc.Login(attacker, "ada@example.com", "correct horse"); platform.ErrorCode(err) != platform.ETOOMANY {
		t.Fatalf("the right password after the burst: %v (want too many)", err)
	}
}

// changedMeanwhile is the identity store with a password change committed
// between a login's check of the password and its session.
type changedMeanwhile struct {
	*postgres.IdentityStore
	change func()
}

func (c changedMeanwhile) CreateSession(ctx context.Context, familyID, userID, passwordHash string, tokenHash []byte, expires time.Time, ip, userAgent string) error {
	c.change()
	return c.IdentityStore.CreateSession(ctx, familyID, userID, passwordHash, tokenHash, expires, ip, userAgent)
}

// A login that checked the old password while it was being changed opens
// no session: the change's revocation of the others would miss it, and the
// old password's holder would stay in.
func TestLoginRacingPasswordChange(t *testing.T) {
	ctx := context.Background()
	w := newAccounts(t)
	if _, err := w.svc.Register(from("10.0.0.1"), "ada@example.com", "correct horse", "Ada"); err != nil {
		t.Fatal(err)
	}
	mine, err := w.svc.Login(from("10.0.0.1"), "ada@example.com", "correct horse")
	if err != nil {
		t.Fatal(err)
	}
	p, err := w.svc.Tokens.Parse(mine.AccessToken)
	if err != nil {
		t.Fatal(err)
	}
	changed := false
	w.svc.Accounts = changedMeanwhile{w.store, func() {
		if changed {
			return
		}
		changed = true
		principal := &platform.Principal{ID: p.Subject, Kind: platform.KindUser, SessionID: p.SessionID}
		if err := w.svc.ChangePassword(ctx, principal, "correct horse", "a brand new password"); err != nil {
			t.Fatal(err)
		}
	}}
	if _, err := w.svc.Login(from("10.6.6.6"), "ada@example.com", "correct horse"); platform.ErrorCode(err) != platform.EUNAUTHORIZED {
		t.Fatalf("a login with the old password, racing its change: %v (want unauthorized)", err)
	}
}

func TestRefreshLogoutPassword(t *testing.T) {
	w := newAccounts(t)
	ctx := from("10.0.0.1")
	u, err := w.svc.Register(ctx, "ada@example.com", "correct horse", "Ada")
	if err != nil {
		t.Fatal(err)
	}
	principal := func(pair *access.TokenPair) *platform.Principal {
		t.Helper()
		c, err := w.svc.Tokens.Parse(pair.AccessToken)
		if err != nil {
			t.Fatal(err)
		}
		return &platform.Principal{ID: c.Subject, Kind: platform.KindUser, SessionID: c.SessionID}
	}
	revoked := func(pair *access.TokenPair) bool {
		t.Helper()
		r, err := w.store.SessionRevoked(ctx, principal(pair).SessionID)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}

	t.Run("rotation and reuse", func(t *testing.T) {
		first, err := w.svc.Login(ctx, "ada@example.com", "correct horse")
		if err != nil {
			t.Fatal(err)
		}
		second, err := w.svc.Refresh(ctx, first.RefreshToken)
		if err != nil {
			t.Fatal(err)
		}
		if second.RefreshToken == first.RefreshToken || principal(second).SessionID != principal(first).SessionID {
			t.Fatal("refresh did not rotate within the session")
		}
		if _, err := w.svc.Refresh(ctx, first.RefreshToken); platform.ErrorCode(err) != platform.EUNAUTHORIZED {
			t.Fatalf("reusing a rotated token: %v", err)
		}
		if _, err := w.svc.Refresh(ctx, second.RefreshToken); platform.ErrorCode(err) != platform.EUNAUTHORIZED {
			t.Fatalf("the family survives reuse: %v", err)
		}
		if !revoked(second) {
			t.Fatal("the session is not revoked")
		}
		for _, bad := range []string{"", "agr_unknown", "not-a-token", "agr_" + strings.Repeat("x", 200)} {
			if _, err := w.svc.Refresh(ctx, bad); platform.ErrorCode(err) != platform.EUNAUTHORIZED {
				t.Fatalf("refresh %q: %v", bad, err)
			}
		}
	})
	t.Run("logout", func(t *testing.T) {
		pair, err := w.svc.Login(ctx, "ada@example.com", "correct horse")
		if err != nil {
			t.Fatal(err)
		}
		if err := w.svc.Logout(ctx, principal(pair)); err != nil {
			t.Fatal(err)
		}
		if !revoked(pair) {
			t.Fatal("the session is not revoked")
		}
		if _, err := w.svc.Refresh(ctx, pair.RefreshToken); platform.ErrorCode(err) != platform.EUNAUTHORIZED {
			t.Fatalf("refresh after logout: %v", err)
		}
		if err := w.svc.Logout(ctx, &platform.Principal{ID: u.ID, KeyID: "k"}); platform.ErrorCode(err) != platform.EINVALID {
			t.Fatalf("logout with a key: %v", err)
		}
	})
	t.Run("password change revokes the other sessions", func(t *testing.T) {
		here, err := w.svc.Login(ctx, "ada@example.com", "correct horse")
		if err != nil {
			t.Fatal(err)
		}
		there, err := w.svc.Login(ctx, "ada@example.com", "correct horse")
		if err != nil {
			t.Fatal(err)
		}
		p := principal(here)
		if err := w.svc.ChangePassword(ctx, p, "wrong", "a new password"); platform.ErrorCode(err) != platform.EINVALID {
			t.Fatalf("wrong current password: %v", err)
		}
		if err := w.svc.ChangePassword(ctx, p, "correct horse", "short"); platform.ErrorCode(err) != platform.EINVALID {
			t.Fatalf("short new password: %v", err)
		}
		if err := w.svc.ChangePassword(ctx, p, "correct horse", "a new password"); err != nil {
			t.Fatal(err)
		}
		if revoked(here) || !revoked(there) {
			t.Fatalf("revoked: this session %v, the other %v", revoked(here), revoked(there))
		}
		if _, err := w.svc.Login(ctx, "ada@example.com", "correct horse"); platform.ErrorCode(err) != platform.EUNAUTHORIZED {
			t.Fatalf("the old password: %v", err)
		}
		if _, err := w.svc.Login(ctx, "ada@example.com", "a new password"); err != nil {
			t.Fatalf("the new password: %v", err)
		}
	})
	t.Run("guessing the current password locks out as failed logins do", func(t *testing.T) {
		pair, err := w.svc.Login(ctx, "ada@example.com", "a new password")
		if err != nil {
			t.Fatal(err)
		}
		p := principal(pair)
		for i := range 3 { // MaxFailures
			if err := w.svc.ChangePassword(ctx, p, fmt.Sprintf("guess %d", i), "another password"); platform.ErrorCode(err) != platform.EINVALID {
				t.Fatalf("guess %d: %v", i, err)
			}
		}
		if err := w.svc.ChangePassword(ctx, p, "a new password", "another password"); platform.ErrorCode(err) != platform.ETOOMANY {
			t.Fatalf("after 3 wrong guesses, even the right password: %v (want too many)", err)
		}
		if _, err := w.svc.Login(ctx, "ada@example.com", "a new password"); platform.ErrorCode(err) != platform.ETOOMANY {
			t.Fatalf("a login after 3 wrong guesses: %v (want too many)", err)
		}
	})
}

func TestSeedAdmin(t *testing.T) {
	w := newAccounts(t)
	ctx := context.Background()
	if _, _, err := w.svc.SeedAdmin(ctx, "root@example.com", "short"); platform.ErrorCode(err) != platform.EINVALID {
		t.Fatalf("short password: %v", err)
	}
	u, created, err := w.svc.SeedAdmin(ctx, "root@example.com", "a long admin password")
	if err != nil || !created || !u.IsSuperadmin {
		t.Fatalf("first seed: %+v, %v, %v", u, created, err)
	}
	again, created, err := w.svc.SeedAdmin(ctx, "root@example.com", "another password")
	if err != nil || created || again.ID != u.ID {
		t.Fatalf("second seed: %+v, %v, %v", again, created, err)
	}
}

func TestPasswords(t *testing.T) {
	p := cheapPasswords
	hash, err := p.Hash("correct horse")
	if err != nil {
		t.Fatal(err)
	}
	if ok, rehash, err := p.Verify("correct horse", hash); !ok || rehash || err != nil {
		t.Fatalf("verify: %v %v %v", ok, rehash, err)
	}
	if ok, _, _ := p.Verify("correct horsf", hash); ok {
		t.Fatal("a wrong password verifies")
	}
	stronger := access.NewPasswords(access.PasswordParams{Memory: 128, Time: 1, Threads: 1, SaltLen: 16, KeyLen: 32})
	if ok, rehash, _ := stronger.Verify("correct horse", hash); !ok || !rehash {
		t.Fatalf("old parameters: ok=%v rehash=%v", ok, rehash)
	}
	for _, bad := range []string{"", "plain", "$argon2i$v=19$m=64,t=1,p=1$c2FsdA$aGFzaA", "$argon2id$v=19$m=0,t=1,p=1$c2FsdA$aGFzaA",
		"$argon2id$v=19$m=99999999,t=1,p=1$c2FsdA$aGFzaA", "$argon2id$v=19$m=64,t=1,p=1$!!$aGFzaA", "$argon2id$v=18$m=64,t=1,p=1$c2FsdA$aGFzaA"} {
		if ok, _, err := p.Verify("x", bad); ok || err == nil {
			t.Errorf("Verify(%q): ok=%v err=%v", bad, ok, err)
		}
	}
}
