package access

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/mail"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/redisx"
)

// Accounts is what the account flows need of the identity store.
type Accounts interface {
	Store
	CreateUser(ctx context.Context, email, name, passwordHash string, superadmin bool) (*platform.User, *platform.Organization, error)
	UserByEmail(ctx context.Context, email string) (*platform.User, error)
	UserByID(ctx context.Context, id string) (*platform.User, error)
	// SetPasswordHash replaces the hash old by hash; false if the hash is
	// no longer old (the password changed meanwhile).
	SetPasswordHash(ctx context.Context, userID, old, hash string) (bool, error)
	// CreateSession opens a session if the user's password hash is still
	// passwordHash (the one the login checked) and they are not disabled;
	// EUNAUTHORIZED otherwise.
	CreateSession(ctx context.Context, familyID, userID, passwordHash string, tokenHash []byte, expires time.Time, ip, userAgent string) error
	Rotate(ctx context.Context, old, next []byte, expires time.Time, ip, userAgent string) (*platform.Session, bool, error)
	RevokeFamily(ctx context.Context, userID, familyID string) error
	RevokeOtherSessions(ctx context.Context, userID, keep string) ([]string, error)
	CountSuperadmins(ctx context.Context) (int, error)
}

// Throttler counts failures (the redisx package implements it).
type Throttler interface {
	// Take counts an attempt before it is made; a wait over 0 refuses it.
	Take(ctx context.Context, limits ...redisx.Limit) (int, error)
	// Return gives back the count of an attempt that succeeded.
	Return(ctx context.Context, limits ...redisx.Limit) error
	Reset(ctx context.Context, keys ...string) error
}

// Service runs the account flows: registration, login, token refresh,
// logout, password change.
type Service struct {
	Accounts   Accounts
	Passwords  *Passwords
	Tokens     *Tokens
	Throttle   Throttler
	Audit      *Audit
	RefreshTTL time.Duration
	// MaxFailures failed logins per Window for one account from one address
	// lock that pair out until the window ends; the account as a whole and
	// the address as a whole get ten and twenty times as many.
	MaxFailures int
	Window      time.Duration
	// Invalidate drops cached identity facts on every replica.
	Invalidate func(ctx context.Context, keys ...string)
	// OnFailure, if set, is told why a login or refresh failed (metrics):
	// bad_password, throttled or refresh_reuse.
	OnFailure func(reason string)
}

func (s *Service) failed(reason string) {
	if s.OnFailure != nil {
		s.OnFailure(reason)
	}
}

// TokenPair is what a login or a refresh answers.
type TokenPair struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	TokenType    string `json:"token_type" example:"Bearer"`
	ExpiresIn    int    `json:"expires_in" doc:"Seconds the access token lives."`
}

// ValidEmail reports whether s is a plain email address: local@domain.tld,
// of printable characters (no control or invisible formatting character,
// such as a right-to-left override that would make it read as another
// address), with a domain of host name labels.
func ValidEmail(s string) bool {
	if len(s) > 254 || !utf8.ValidString(s) || strings.ContainsAny(s, " \t\r\n<>\uFFFD") {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	a, err := mail.ParseAddress(s)
	if err != nil || a.Address != s || a.Name != "" {
		return false
	}
	at := strings.LastIndexByte(s, '@')
	if at <= 0 {
		return false
	}
	labels := strings.Split(s[at+1:], ".")
	if len(labels) < 2 {
		return false
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 || strings.HasPrefix(l, "-") || strings.HasSuffix(l, "-") {
			return false
		}
		for _, r := range l {
			if r != '-' && !unicode.IsLetter(r) && !unicode.IsMark(r) && !unicode.IsDigit(r) {
				return false
			}
		}
	}
	return true
}

// normalEmail is the form of an email address accounts are stored and
// looked up under: trimmed and lower-case.
func normalEmail(s string) string { return strings.ToLower(strings.TrimSpace(s)) }

// CheckPassword returns the problems of a new password for email.
func CheckPassword(email, password, field string) []platform.FieldError {
	var out []platform.FieldError
	switch {
	case len(password) < 8:
		out = append(out, platform.FieldError{Field: field, Message: "must be at least 8 characters"})
	case len(password) > 256:
		out = append(out, platform.FieldError{Field: field, Message: "must be at most 256 characters"})
	case strings.EqualFold(strings.TrimSpace(password), strings.TrimSpace(email)):
		out = append(out, platform.FieldError{Field: field, Message: "must not be your email address"})
	}
	return out
}

// Register creates an account with its personal organization.
func (s *Service) Register(ctx context.Context, email, password, name string) (*platform.User, error) {
	email = strings.TrimSpace(email)
	var bad []platform.FieldError
	if !ValidEmail(email) {
		bad = append(bad, platform.FieldError{Field: "body.email", Message: "must be an email address such as ada@example.com"})
	}
	bad = append(bad, CheckPassword(email, password, "body.password")...)
	if strings.TrimSpace(name) == "" {
		bad = append(bad, platform.FieldError{Field: "body.name", Message: "must not be blank"})
	}
	if len(bad) > 0 {
		return nil, platform.Invalid("registration is invalid", bad...)
	}
	// Each registration hashes a password (19 MiB, tens of ms): bound how
	// many one address may make.
	ip := platform.RequestInfoFrom(ctx).IP
	limit := redisx.Limit{Key: "register:ip:" + ip, Max: 20 * s.MaxFailures, Window: s.Window}
	if wait, err := s.Throttle.Take(ctx, limit); err != nil {
		return nil, err
	} else if wait > 0 {
		return nil, &platform.Error{Code: platform.ETOOMANY, Message: "too many registrations from this address; wait before trying again", RetryAfter: wait}
	}
	hash, err := s.Passwords.Hash(password)
	if err != nil {
		return nil, err
	}
	u, org, err := s.Accounts.CreateUser(ctx, email, strings.TrimSpace(name), hash, false)
	if err != nil {
		return nil, err
	}
	s.Audit.Record(ctx, platform.AuditEvent{ActorID: &u.ID, ActorKind: platform.KindUser, OrgID: &org.ID, Action: "user.register", ResourceType: "User", ResourceID: &u.ID, Outcome: "ok"})
	return u, nil
}

// loginLimits are the failure counters of a login: email must be
// normalised (normalEmail) so that every spelling of one account shares
// them.
func (s *Service) loginLimits(email, ip string) []redisx.Limit {
	return []redisx.Limit{
		{Key: "login:pair:" + email + "|" + ip, Max: s.MaxFailures, Window: s.Window},
		{Key: "login:account:" + email, Max: 10 * s.MaxFailures, Window: s.Window},
		{Key: "login:ip:" + ip, Max: 20 * s.MaxFailures, Window: s.Window},
	}
}

// Login checks an email and password and opens a session. Failures are
// counted per account and address; once over the limit the answer is
// ETOOMANY with the seconds to wait, before any password is checked.
func (s *Service) Login(ctx context.Context, email, password string) (*TokenPair, error) {
	email = normalEmail(email)
	info := platform.RequestInfoFrom(ctx)
	limits := s.loginLimits(email, info.IP)
	// The attempt counts as a failure until it succeeds: logins sent at
	// once take turns at the limit.
	wait, err := s.Throttle.Take(ctx, limits...)
	if err != nil {
		return nil, err
	}
	if wait > 0 {
		s.Audit.Record(ctx, platform.AuditEvent{Action: "login", Outcome: "denied", Reason: "throttled", Details: platform.JSONObject{"email": email}})
		s.failed("throttled")
		return nil, &platform.Error{Code: platform.ETOOMANY, Message: "too many failed logins; wait before trying again", RetryAfter: wait}
	}
	fail := func(reason string, u *platform.User) (*TokenPair, error) {
		s.failed("bad_password")
		e := platform.AuditEvent{Action: "login", Outcome: "failed", Reason: reason, Details: platform.JSONObject{"email": email}}
		if u != nil {
			e.ActorID, e.ActorKind = &u.ID, platform.KindUser
		}
		s.Audit.Record(ctx, e)
		return nil, platform.Errorf(platform.EUNAUTHORIZED, "wrong email or password")
	}
	u, err := s.Accounts.UserByEmail(ctx, email)
	if platform.ErrorCode(err) == platform.ENOTFOUND {
		s.Passwords.Burn(password)
		return fail("unknown email", nil)
	}
	if err != nil {
		return nil, err
	}
	ok, rehash, err := s.Passwords.Verify(password, u.PasswordHash)
	if err != nil || !ok {
		return fail("wrong password", u)
	}
	if u.Disabled {
		return fail("account disabled", u)
	}
	if rehash {
		if hash, err := s.Passwords.Hash(password); err == nil {
			if ok, err := s.Accounts.SetPasswordHash(ctx, u.ID, u.PasswordHash, hash); err == nil && ok {
				u.PasswordHash = hash
			}
		}
	}
	_ = s.Throttle.Return(ctx, limits...)
	_ = s.Throttle.Reset(ctx, limits[0].Key)
	pair, err := s.openSession(ctx, u)
	if err != nil {
		return nil, err
	}
	s.Audit.Record(ctx, platform.AuditEvent{ActorID: &u.ID, ActorKind: platform.KindUser, Action: "login", Outcome: "ok"})
	return pair, nil
}

func newRefreshToken() (token string, hash []byte) {
	var b [32]byte
	_, _ = rand.Read(b[:])
	token = "agr_" + base64.RawURLEncoding.EncodeToString(b[:])
	sum := sha256.Sum256([]byte(token))
	return token, sum[:]
}

func hashRefresh(token string) []byte {
	sum := sha256.Sum256([]byte(token))
	return sum[:]
}

func (s *Service) openSession(ctx context.Context, u *platform.User) (*TokenPair, error) {
	info := platform.RequestInfoFrom(ctx)
	family := uuid.NewString()
	refresh, hash := newRefreshToken()
	// Only if the password is still the one checked: a login racing a
	// password change would otherwise open a session the change did not
	// see, and keep the old password's holder in.
	if err := s.Accounts.CreateSession(ctx, family, u.ID, u.PasswordHash, hash, time.Now().Add(s.RefreshTTL), info.IP, info.UserAgent); err != nil {
		return nil, err
	}
	return s.pair(u, family, refresh)
}

func (s *Service) pair(u *platform.User, family, refresh string) (*TokenPair, error) {
	access, err := s.Tokens.Issue(u.ID, family, u.TokenVersion)
	if err != nil {
		return nil, err
	}
	return &TokenPair{AccessToken: access, RefreshToken: refresh, TokenType: "Bearer", ExpiresIn: int(s.Tokens.TTL().Seconds())}, nil
}

// Refresh rotates a refresh token. Presenting a token that was already
// rotated revokes its whole session: whoever holds either copy is logged out.
func (s *Service) Refresh(ctx context.Context, token string) (*TokenPair, error) {
	info := platform.RequestInfoFrom(ctx)
	if !strings.HasPrefix(token, "agr_") || len(token) > 128 {
		return nil, platform.Errorf(platform.EUNAUTHORIZED, "invalid refresh token")
	}
	next, nextHash := newRefreshToken()
	sess, reused, err := s.Accounts.Rotate(ctx, hashRefresh(token), nextHash, time.Now().Add(s.RefreshTTL), info.IP, info.UserAgent)
	if err != nil {
		return nil, err
	}
	if reused {
		s.failed("refresh_reuse")
		s.Invalidate(ctx, sessionKey(sess.FamilyID))
		s.Audit.Record(ctx, platform.AuditEvent{ActorID: &sess.UserID, ActorKind: platform.KindUser, Action: "session.reuse_detected", Outcome: "denied",
			Reason: "a rotated refresh token was presented again; the session is revoked", Details: platform.JSONObject{"session_id": sess.FamilyID}})
		return nil, platform.Errorf(platform.EUNAUTHORIZED, "invalid refresh token")
	}
	u, err := s.Accounts.UserByID(ctx, sess.UserID)
	if err != nil {
		return nil, err
	}
	if u.Disabled {
		return nil, platform.Errorf(platform.EUNAUTHORIZED, "invalid refresh token")
	}
	return s.pair(u, sess.FamilyID, next)
}

// Logout revokes the caller's session: its refresh tokens at once, its
// access tokens on every replica within moments.
func (s *Service) Logout(ctx context.Context, p *platform.Principal) error {
	if p.SessionID == "" {
		return platform.Errorf(platform.EINVALID, "log out with an access token; API keys are revoked instead")
	}
	if err := s.Accounts.RevokeFamily(ctx, p.ID, p.SessionID); err != nil {
		return err
	}
	s.Invalidate(ctx, sessionKey(p.SessionID))
	s.Audit.Record(ctx, platform.AuditEvent{Action: "logout", Outcome: "ok", Details: platform.JSONObject{"session_id": p.SessionID}})
	return nil
}

// ChangePassword sets a new password after checking the current one, and
// revokes every other session of the user.
func (s *Service) ChangePassword(ctx context.Context, p *platform.Principal, current, next string) error {
	if p.Kind != platform.KindUser || p.SessionID == "" {
		return platform.Errorf(platform.EFORBIDDEN, "change your password with an access token from a login")
	}
	u, err := s.Accounts.UserByID(ctx, p.ID)
	if err != nil {
		return err
	}
	// Guessing the current password with a stolen access token counts as
	// failed logins do: the account locks out the same way.
	limits := s.loginLimits(normalEmail(u.Email), platform.RequestInfoFrom(ctx).IP)
	wait, err := s.Throttle.Take(ctx, limits...)
	if err != nil {
		return err
	}
	if wait > 0 {
		s.Audit.Record(ctx, platform.AuditEvent{Action: "user.password_change", Outcome: "denied", Reason: "throttled"})
		return &platform.Error{Code: platform.ETOOMANY, Message: "too many wrong passwords; wait before trying again", RetryAfter: wait}
	}
	ok, _, err := s.Passwords.Verify(current, u.PasswordHash)
	if err != nil || !ok {
		s.Audit.Record(ctx, platform.AuditEvent{Action: "user.password_change", Outcome: "failed", Reason: "wrong current password"})
		return platform.Invalid("the current password is wrong", platform.FieldError{Field: "body.current_password", Message: "does not match"})
	}
	_ = s.Throttle.Return(ctx, limits...)
	if bad := CheckPassword(u.Email, next, "body.new_password"); len(bad) > 0 {
		return platform.Invalid("the new password is invalid", bad...)
	}
	hash, err := s.Passwords.Hash(next)
	if err != nil {
		return err
	}
	if ok, err := s.Accounts.SetPasswordHash(ctx, u.ID, u.PasswordHash, hash); err != nil {
		return err
	} else if !ok {
		return platform.Errorf(platform.ECONFLICT, "the password changed meanwhile; log in again")
	}
	families, err := s.Accounts.RevokeOtherSessions(ctx, u.ID, p.SessionID)
	if err != nil {
		return err
	}
	keys := make([]string, len(families))
	for i, f := range families {
		keys[i] = sessionKey(f)
	}
	s.Invalidate(ctx, keys...)
	s.Audit.Record(ctx, platform.AuditEvent{Action: "user.password_change", Outcome: "ok", Details: platform.JSONObject{"sessions_revoked": len(families)}})
	return nil
}

// SeedAdmin creates the first superadmin unless one exists. It returns the
// user and whether it was created.
func (s *Service) SeedAdmin(ctx context.Context, email, password string) (*platform.User, bool, error) {
	n, err := s.Accounts.CountSuperadmins(ctx)
	if err != nil {
		return nil, false, err
	}
	if n > 0 {
		u, err := s.Accounts.UserByEmail(ctx, email)
		if err != nil {
			return nil, false, nil
		}
		return u, false, nil
	}
	if bad := CheckPassword(email, password, "admin_password"); len(bad) > 0 {
		return nil, false, platform.Invalid("AGENTRY_ADMIN_PASSWORD "+bad[0].Message, bad...)
	}
	hash, err := s.Passwords.Hash(password)
	if err != nil {
		return nil, false, err
	}
	u, _, err := s.Accounts.CreateUser(ctx, email, "Administrator", hash, true)
	if err != nil {
		return nil, false, err
	}
	return u, true, nil
}

// InvalidateUser drops the cached facts of a user on every replica (after
// a membership or role change).
func (s *Service) InvalidateUser(ctx context.Context, userIDs ...string) {
	keys := make([]string, len(userIDs))
	for i, id := range userIDs {
		keys[i] = factsKey(id) + "*"
	}
	s.Invalidate(ctx, keys...)
}

// InvalidateKey drops a cached API key on every replica.
func (s *Service) InvalidateKey(ctx context.Context, prefix string) {
	s.Invalidate(ctx, keyKey(prefix))
}

// InvalidateAll drops every cached identity fact (a role's permissions
// changed).
func (s *Service) InvalidateAll(ctx context.Context) { s.Invalidate(ctx, "facts:*") }
