package postgres

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/agentry/agentry/internal/platform"
	"github.com/agentry/agentry/internal/sqlq"
)

// IdentityStore keeps users, organizations, roles, memberships, sessions
// and API keys.
type IdentityStore struct {
	DB *sqlx.DB
}

const userColumns = `u.id, u.email, u.name, u.password_hash, u.is_superadmin, u.disabled, u.token_version, u.default_org_id, u.created_at, u.updated_at, u.version`

// InsertEntity adds an id of kind to the entities table, in tx.
func InsertEntity(ctx context.Context, tx *sqlx.Tx, id, kind string) error {
	_, err := tx.ExecContext(ctx, "INSERT INTO entities (id, kind) VALUES ($1, $2)", id, kind)
	return err
}

// CreateUser stores a new user with a personal organization it owns, and
// returns both. A taken email is ECONFLICT.
func (s *IdentityStore) CreateUser(ctx context.Context, email, name, passwordHash string, superadmin bool) (*platform.User, *platform.Organization, error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return nil, nil, err
	}
	defer tx.Rollback()
	id := uuid.NewString()
	if err := InsertEntity(ctx, tx, id, platform.KindUser); err != nil {
		return nil, nil, err
	}
	u := &platform.User{}
	// Inserts the user; returns the stored row.
	err = tx.GetContext(ctx, u, `INSERT INTO users AS u (id, email, name, password_hash, is_superadmin) VALUES ($1, $2, $3, $4, $5)
		RETURNING `+userColumns, id, strings.ToLower(email), name, passwordHash, superadmin)
	if err != nil {
		return nil, nil, mapUserError(err)
	}
	org, err := createOrganization(ctx, tx, id, name+"'s organization")
	if err != nil {
		return nil, nil, err
	}
	if _, err := tx.ExecContext(ctx, "UPDATE users SET default_org_id = $1 WHERE id = $2", org.ID, id); err != nil {
		return nil, nil, err
	}
	u.DefaultOrgID = &org.ID
	if err := tx.Commit(); err != nil {
		return nil, nil, err
	}
	return u, org, nil
}

func mapUserError(err error) error {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) && pqErr.Code.Name() == "unique_violation" {
		return &platform.Error{Code: platform.ECONFLICT, Message: "this email cannot be registered", Err: err}
	}
	return sqlq.MapError(err, "user not found")
}

// CreateOrganization creates an organization owned by userID, with its
// built-in roles and the user as its owner member.
func (s *IdentityStore) CreateOrganization(ctx context.Context, userID, name string) (*platform.Organization, error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	org, err := createOrganization(ctx, tx, userID, name)
	if err != nil {
		return nil, err
	}
	return org, tx.Commit()
}

func createOrganization(ctx context.Context, tx *sqlx.Tx, ownerID, name string) (*platform.Organization, error) {
	id := uuid.NewString()
	if err := InsertEntity(ctx, tx, id, platform.KindOrganization); err != nil {
		return nil, err
	}
	org := &platform.Organization{}
	// Inserts the organization; it is its own tenant.
	if err := tx.GetContext(ctx, org, `INSERT INTO organizations (id, org_id, owner_id, name) VALUES ($1, $1, $2, $3)
		RETURNING id, org_id, owner_id, name, org_max_in_flight, created_at, updated_at, version`, id, ownerID, name); err != nil {
		return nil, sqlq.MapError(err, "organization not found")
	}
	var ownerRole string
	for _, r := range platform.BuiltinRoles {
		roleID := uuid.NewString()
		if err := InsertEntity(ctx, tx, roleID, platform.KindRole); err != nil {
			return nil, err
		}
		perms, _ := json.Marshal(r.Permissions)
		if _, err := tx.ExecContext(ctx, `INSERT INTO roles (id, org_id, owner_id, name, description, builtin, permissions)
			VALUES ($1, $2, $2, $3, $4, true, $5)`, roleID, id, r.Name, r.Description, perms); err != nil {
			return nil, err
		}
		if r.Name == platform.RoleOwner {
			ownerRole = roleID
		}
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO memberships (id, org_id, owner_id, user_id, role_id) VALUES ($1, $2, $2, $3, $4)`,
		uuid.NewString(), id, ownerID, ownerRole); err != nil {
		return nil, err
	}
	return org, nil
}

// UserByEmail returns the user with email (any case), or ENOTFOUND.
func (s *IdentityStore) UserByEmail(ctx context.Context, email string) (*platform.User, error) {
	u := &platform.User{}
	err := s.DB.GetContext(ctx, u, "SELECT "+userColumns+" FROM users u WHERE lower(u.email) = lower($1)", email)
	return u, sqlq.MapError(err, "user not found")
}

// UserByID returns the user id, or ENOTFOUND.
func (s *IdentityStore) UserByID(ctx context.Context, id string) (*platform.User, error) {
	u := &platform.User{}
	err := s.DB.GetContext(ctx, u, "SELECT "+userColumns+" FROM users u WHERE u.id = $1", id)
	return u, sqlq.MapError(err, "user not found")
}

// SetPasswordHash replaces the user's password hash.
func (s *IdentityStore) SetPasswordHash(ctx context.Context, userID, old, hash string) (bool, error) {
	res, err := s.DB.ExecContext(ctx, "UPDATE users SET password_hash = $1, updated_at = now(), version = version + 1 WHERE id = $2 AND password_hash = $3", hash, userID, old)
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// UpdateUser changes what a user may change of themselves: their name and
// default organization (which they must belong to).
func (s *IdentityStore) UpdateUser(ctx context.Context, userID string, name *string, defaultOrg *string) (*platform.User, error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	if defaultOrg != nil {
		var n int
		if err := tx.GetContext(ctx, &n, "SELECT count(*) FROM memberships WHERE org_id = $1 AND user_id = $2", *defaultOrg, userID); err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, platform.Invalid("not a member of that organization", platform.FieldError{Field: "body.default_org_id", Message: "you do not belong to this organization"})
		}
	}
	u := &platform.User{}
	err = tx.GetContext(ctx, u, `UPDATE users AS u SET name = COALESCE($2, u.name), default_org_id = COALESCE($3, u.default_org_id),
		updated_at = now(), version = u.version + 1 WHERE u.id = $1 RETURNING `+userColumns, userID, name, defaultOrg)
	if err != nil {
		return nil, sqlq.MapError(err, "user not found")
	}
	return u, tx.Commit()
}

// SetUserFlags lets a superadmin disable a user or change the superadmin
// role. Disabling bumps the token version, refusing every access token at
// once, and revokes every refresh token: enabling the user again does not
// bring back the sessions of before.
func (s *IdentityStore) SetUserFlags(ctx context.Context, userID string, disabled, superadmin *bool) (*platform.User, error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	if disabled != nil && *disabled || superadmin != nil && !*superadmin {
		// The platform keeps an enabled superadmin. Changes that could take
		// the last away take turns, or two superadmins demoting each other
		// at once would each see the other and leave none.
		if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock(hashtextextended('agentry:superadmins', 0))"); err != nil {
			return nil, err
		}
		var others int
		if err := tx.GetContext(ctx, &others, "SELECT count(*) FROM users WHERE is_superadmin AND NOT disabled AND id <> $1", userID); err != nil {
			return nil, err
		}
		var target bool
		if err := tx.GetContext(ctx, &target, "SELECT is_superadmin AND NOT disabled FROM users WHERE id = $1", userID); err != nil {
			return nil, sqlq.MapError(err, "user not found")
		}
		if target && others == 0 {
			return nil, platform.Errorf(platform.ECONFLICT, "the platform keeps at least one enabled superadmin")
		}
	}
	u := &platform.User{}
	err = tx.GetContext(ctx, u, `WITH ended AS (
			UPDATE refresh_tokens SET revoked_at = now() WHERE $2 IS TRUE AND user_id = $1 AND revoked_at IS NULL)
		UPDATE users AS u SET disabled = COALESCE($2, u.disabled), is_superadmin = COALESCE($3, u.is_superadmin),
		token_version = u.token_version + CASE WHEN $2 IS TRUE OR $3 IS FALSE THEN 1 ELSE 0 END,
		updated_at = now(), version = u.version + 1 WHERE u.id = $1 RETURNING `+userColumns, userID, disabled, superadmin)
	if err != nil {
		return nil, sqlq.MapError(err, "user not found")
	}
	return u, tx.Commit()
}

// ListUsers pages through every user, for superadmins.
func (s *IdentityStore) ListUsers(ctx context.Context, email string, limit, offset int) ([]platform.User, int64, error) {
	var total int64
	pattern := "%" + strings.ToLower(strings.NewReplacer(`\`, `\\`, "%", `\%`, "_", `\_`).Replace(email)) + "%"
	if err := s.DB.GetContext(ctx, &total, "SELECT count(*) FROM users u WHERE lower(u.email) LIKE $1", pattern); err != nil {
		return nil, 0, err
	}
	users := []platform.User{}
	err := s.DB.SelectContext(ctx, &users, "SELECT "+userColumns+" FROM users u WHERE lower(u.email) LIKE $1 ORDER BY u.created_at, u.id LIMIT $2 OFFSET $3", pattern, limit, offset)
	return users, total, err
}

// Facts loads what a request acting as userID in orgID needs: the user,
// whether they belong to the organization, and their roles there.
func (s *IdentityStore) Facts(ctx context.Context, userID, orgID string) (*platform.PrincipalFacts, error) {
	u, err := s.UserByID(ctx, userID)
	if err != nil {
		return nil, err
	}
	f := &platform.PrincipalFacts{User: *u}
	if orgID == "" {
		return f, nil
	}
	if err := s.loadRoles(ctx, f, "SELECT r.id, r.name, r.permissions FROM memberships m JOIN roles r ON r.id = m.role_id WHERE m.user_id = $1 AND m.org_id = $2", userID, orgID); err != nil {
		return nil, err
	}
	return f, nil
}

func (s *IdentityStore) loadRoles(ctx context.Context, f *platform.PrincipalFacts, q string, args ...any) error {
	rows, err := s.DB.QueryContext(ctx, q, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var ref platform.RoleRef
		var perms platform.JSONList
		if err := rows.Scan(&ref.ID, &ref.Name, &perms); err != nil {
			return err
		}
		f.Member = true
		f.Roles = append(f.Roles, ref)
		for _, text := range perms {
			if p, err := platform.ParsePermission(text); err == nil {
				f.Permissions = append(f.Permissions, p)
			}
		}
	}
	return rows.Err()
}

// Memberships lists the organizations a user belongs to, with their role.
func (s *IdentityStore) Memberships(ctx context.Context, userID string) ([]platform.Membership, error) {
	out := []platform.Membership{}
	err := s.DB.SelectContext(ctx, &out, `SELECT m.org_id, m.user_id, m.role_id, r.name AS role_name
		FROM memberships m JOIN roles r ON r.id = m.role_id WHERE m.user_id = $1 ORDER BY m.created_at`, userID)
	return out, err
}

// CreateSession stores the first refresh token of a new family.
func (s *IdentityStore) CreateSession(ctx context.Context, familyID, userID, passwordHash string, tokenHash []byte, expires time.Time, ip, userAgent string) error {
	res, err := s.DB.ExecContext(ctx, `INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at, ip, user_agent)
		SELECT $1, $2, u.id, $4, $5, $6, $7 FROM users u WHERE u.id = $3 AND u.password_hash = $8 AND NOT u.disabled`,
		uuid.NewString(), familyID, userID, tokenHash, expires, ip, platform.Storable(userAgent, 256), passwordHash)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return platform.Errorf(platform.EUNAUTHORIZED, "wrong email or password")
	}
	return nil
}

// Rotate exchanges the refresh token with hash old for one with hash next
// in the same family. It returns the old token's session. A token that was
// already rotated or revoked is reuse: the whole family is revoked and
// reused is true. An unknown or expired token is EUNAUTHORIZED.
func (s *IdentityStore) Rotate(ctx context.Context, old, next []byte, expires time.Time, ip, userAgent string) (sess *platform.Session, reused bool, err error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return nil, false, err
	}
	defer tx.Rollback()
	sess = &platform.Session{}
	// Locks the presented token's row.
	err = tx.GetContext(ctx, sess, `SELECT id, family_id, user_id, expires_at, rotated_at, revoked_at FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE`, old)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, platform.Errorf(platform.EUNAUTHORIZED, "invalid refresh token")
	}
	if err != nil {
		return nil, false, err
	}
	if sess.RotatedAt != nil || sess.RevokedAt != nil {
		if _, err := tx.ExecContext(ctx, "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL", sess.FamilyID); err != nil {
			return nil, false, err
		}
		return sess, true, tx.Commit()
	}
	if time.Now().After(sess.ExpiresAt) {
		return nil, false, platform.Errorf(platform.EUNAUTHORIZED, "invalid refresh token")
	}
	if _, err := tx.ExecContext(ctx, "UPDATE refresh_tokens SET rotated_at = now() WHERE id = $1", sess.ID); err != nil {
		return nil, false, err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at, ip, user_agent)
		VALUES ($1, $2, $3, $4, $5, $6, $7)`, uuid.NewString(), sess.FamilyID, sess.UserID, next, expires, ip, platform.Storable(userAgent, 256)); err != nil {
		return nil, false, err
	}
	return sess, false, tx.Commit()
}

// RevokeFamily revokes every refresh token of a session.
func (s *IdentityStore) RevokeFamily(ctx context.Context, userID, familyID string) error {
	_, err := s.DB.ExecContext(ctx, "UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND family_id = $2 AND revoked_at IS NULL", userID, familyID)
	return err
}

// RevokeOtherSessions revokes every session of the user but keep, and
// returns the revoked family ids.
func (s *IdentityStore) RevokeOtherSessions(ctx context.Context, userID, keep string) ([]string, error) {
	var families []string
	// Revokes the tokens; returns each revoked family once.
	err := s.DB.SelectContext(ctx, &families, `WITH revoked AS (UPDATE refresh_tokens SET revoked_at = now()
		WHERE user_id = $1 AND family_id <> $2 AND revoked_at IS NULL RETURNING family_id) SELECT DISTINCT family_id FROM revoked`, userID, keep)
	return families, err
}

// SessionRevoked reports whether a session's family has been revoked.
func (s *IdentityStore) SessionRevoked(ctx context.Context, familyID string) (bool, error) {
	var live bool
	// True when some token of the family is neither revoked nor expired.
	err := s.DB.GetContext(ctx, &live, "SELECT EXISTS (SELECT 1 FROM refresh_tokens WHERE family_id = $1 AND revoked_at IS NULL AND expires_at > now())", familyID)
	return !live, err
}

// KeyByPrefix returns the API key with prefix and the kind of the entity it
// authenticates as, or ENOTFOUND.
func (s *IdentityStore) KeyByPrefix(ctx context.Context, prefix string) (*platform.APIKey, string, error) {
	var row struct {
		platform.APIKey
		Kind string `db:"kind"`
	}
	err := s.DB.GetContext(ctx, &row, `SELECT k.id, k.org_id, k.owner_id, k.entity_id, k.name, k.prefix, k.secret_hash, k.permissions,
		k.expires_at, k.last_used_at, k.revoked_at, k.created_at, k.updated_at, k.version, e.kind
		FROM api_keys k JOIN entities e ON e.id = k.entity_id WHERE k.prefix = $1`, prefix)
	if err != nil {
		return nil, "", sqlq.MapError(err, "api key not found")
	}
	return &row.APIKey, row.Kind, nil
}

// TouchKey records that a key was used, at most once a minute.
func (s *IdentityStore) TouchKey(ctx context.Context, id string) error {
	_, err := s.DB.ExecContext(ctx, "UPDATE api_keys SET last_used_at = now() WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')", id)
	return err
}

// AgentOrg returns the organization of an agent entity.
func (s *IdentityStore) AgentOrg(ctx context.Context, agentID string) (string, error) {
	var org string
	err := s.DB.GetContext(ctx, &org, "SELECT org_id FROM agents WHERE id = $1", agentID)
	return org, sqlq.MapError(err, "agent not found")
}

// CountSuperadmins returns how many superadmins exist.
func (s *IdentityStore) CountSuperadmins(ctx context.Context) (int, error) {
	var n int
	err := s.DB.GetContext(ctx, &n, "SELECT count(*) FROM users WHERE is_superadmin")
	return n, err
}

// OrganizationsOf lists the organizations a user belongs to.
func (s *IdentityStore) OrganizationsOf(ctx context.Context, userID string) ([]platform.Organization, error) {
	out := []platform.Organization{}
	err := s.DB.SelectContext(ctx, &out, `SELECT o.id, o.org_id, o.owner_id, o.name, o.org_max_in_flight, o.created_at, o.updated_at, o.version
		FROM organizations o JOIN memberships m ON m.org_id = o.id WHERE m.user_id = $1 ORDER BY o.created_at, o.id`, userID)
	return out, err
}

// Organization returns one organization, or ENOTFOUND.
func (s *IdentityStore) Organization(ctx context.Context, id string) (*platform.Organization, error) {
	o := &platform.Organization{}
	err := s.DB.GetContext(ctx, o, `SELECT id, org_id, owner_id, name, org_max_in_flight, created_at, updated_at, version FROM organizations WHERE id = $1`, id)
	return o, sqlq.MapError(err, "organization not found")
}

// UpdateOrganization renames an organization or sets its limit of
// commands in flight (clearMax: back to the platform's). With ceiling 0 or
// more, a new limit may not exceed the larger of ceiling and the limit the
// organization has now (EFORBIDDEN): the check and the write see the same
// row, locked, so a limit lowered meanwhile is the one judged. With
// ifVersion, the organization must be at that version (EPRECONDITION).
func (s *IdentityStore) UpdateOrganization(ctx context.Context, id string, name *string, maxInFlight *int, clearMax bool, ifVersion int64, ceiling int) (*platform.Organization, error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	const columns = "id, org_id, owner_id, name, org_max_in_flight, created_at, updated_at, version"
	o := &platform.Organization{}
	if err := tx.GetContext(ctx, o, "SELECT "+columns+" FROM organizations WHERE id = $1 FOR NO KEY UPDATE", id); err != nil {
		return nil, sqlq.MapError(err, "organization not found")
	}
	if ifVersion > 0 && o.Version != ifVersion {
		return nil, platform.Errorf(platform.EPRECONDITION, "the organization has changed; fetch it again and retry")
	}
	if ceiling >= 0 && maxInFlight != nil {
		allowed := ceiling
		if o.OrgMaxInFlight != nil {
			allowed = max(allowed, *o.OrgMaxInFlight)
		}
		if allowed > 0 && *maxInFlight > allowed {
			return nil, platform.Errorf(platform.EFORBIDDEN, "only a superadmin may raise org_max_in_flight above %d", allowed)
		}
	}
	err = tx.GetContext(ctx, o, `UPDATE organizations SET name = COALESCE($2, name),
		org_max_in_flight = CASE WHEN $4 THEN NULL ELSE COALESCE($3, org_max_in_flight) END,
		updated_at = now(), version = version + 1
		WHERE id = $1 RETURNING `+columns, id, name, maxInFlight, clearMax)
	if err != nil {
		return nil, sqlq.MapError(err, "organization not found")
	}
	return o, tx.Commit()
}

// DeleteOrganization deletes an organization and everything in it.
func (s *IdentityStore) DeleteOrganization(ctx context.Context, id string) error {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "UPDATE users SET default_org_id = NULL WHERE default_org_id = $1", id); err != nil {
		return err
	}
	// Memberships first (they reference the roles), then the entities of
	// the organization (roles, agents), then the organization itself.
	if _, err := tx.ExecContext(ctx, "DELETE FROM memberships WHERE org_id = $1", id); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM entities WHERE id IN (SELECT id FROM roles WHERE org_id = $1 UNION ALL SELECT id FROM agents WHERE org_id = $1)`, id); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, "DELETE FROM entities WHERE id = $1", id); err != nil {
		return sqlq.MapError(err, "organization not found")
	}
	return tx.Commit()
}

// RoleByName returns the role of an organization with name, in tx.
func (s *IdentityStore) RoleByName(ctx context.Context, tx *sqlx.Tx, orgID, name string) (platform.RoleRef, error) {
	var r platform.RoleRef
	err := tx.GetContext(ctx, &r, "SELECT id, name FROM roles WHERE org_id = $1 AND name = $2", orgID, name)
	return r, sqlq.MapError(err, "role not found")
}

// RoleName returns the name of a role, in tx.
func (s *IdentityStore) RoleName(ctx context.Context, tx *sqlx.Tx, roleID string) (string, error) {
	var name string
	err := tx.GetContext(ctx, &name, "SELECT name FROM roles WHERE id = $1", roleID)
	return name, sqlq.MapError(err, "role not found")
}

// LeaveOrganization ends userID's membership of orgID (see EndMembership):
// ENOTFOUND if they are not a member, ECONFLICT if they are its last
// owner. It returns the membership's id and the revoked keys' prefixes.
func (s *IdentityStore) LeaveOrganization(ctx context.Context, orgID, userID string) (string, []string, error) {
	tx, err := s.DB.BeginTxx(ctx, nil)
	if err != nil {
		return "", nil, err
	}
	defer tx.Rollback()
	// The membership, then the organization: the order a removal by an
	// admin locks them in, so that the two never wait on each other.
	var m struct {
		ID   string `db:"id"`
		Role string `db:"name"`
	}
	err = tx.GetContext(ctx, &m, `SELECT m.id, r.name FROM memberships m JOIN roles r ON r.id = m.role_id
		WHERE m.org_id = $1 AND m.user_id = $2 FOR UPDATE OF m`, orgID, userID)
	if err != nil {
		return "", nil, sqlq.MapError(err, "you are not a member of this organization")
	}
	if m.Role == platform.RoleOwner {
		owners, err := s.CountOwners(ctx, tx, orgID)
		if err != nil {
			return "", nil, sqlq.MapError(err, "organization not found")
		}
		if owners <= 1 {
			return "", nil, platform.Errorf(platform.ECONFLICT, "you are the organization's last owner: make another owner first, or delete the organization")
		}
	}
	if _, err := tx.ExecContext(ctx, "DELETE FROM memberships WHERE id = $1", m.ID); err != nil {
		return "", nil, err
	}
	revoked, err := s.EndMembership(ctx, tx, orgID, userID)
	if err != nil {
		return "", nil, err
	}
	return m.ID, revoked, tx.Commit()
}

// EndMembership does, in tx, what ends with userID's membership of orgID:
// it revokes the API keys they made there (theirs and their agents':
// refused while they are not a member, they would work again if they were
// invited back), and the organization is no longer their default. It
// returns the revoked keys' prefixes, for the caches.
func (s *IdentityStore) EndMembership(ctx context.Context, tx *sqlx.Tx, orgID, userID string) ([]string, error) {
	// Waits for the keys being made under the membership (CreateKey holds
	// it), so that the revocation below sees them.
	if _, err := tx.ExecContext(ctx, "SELECT 1 FROM memberships WHERE org_id = $1 AND user_id = $2 FOR UPDATE", orgID, userID); err != nil {
		return nil, err
	}
	if _, err := tx.ExecContext(ctx, "UPDATE users SET default_org_id = NULL WHERE id = $1 AND default_org_id = $2", userID, orgID); err != nil {
		return nil, err
	}
	var prefixes []string
	err := tx.SelectContext(ctx, &prefixes, `UPDATE api_keys SET revoked_at = now()
		WHERE org_id = $1 AND owner_id = $2 AND revoked_at IS NULL RETURNING prefix`, orgID, userID)
	return prefixes, err
}

// MemberRole returns the name of userID's role in orgID, in tx
// (ENOTFOUND: not a member).
func (s *IdentityStore) MemberRole(ctx context.Context, tx *sqlx.Tx, orgID, userID string) (string, error) {
	var name string
	err := tx.GetContext(ctx, &name, `SELECT r.name FROM memberships m JOIN roles r ON r.id = m.role_id WHERE m.org_id = $1 AND m.user_id = $2`, orgID, userID)
	return name, sqlq.MapError(err, "not a member")
}

// CountOwners returns how many owners an organization has, in tx. It
// first locks the organization until tx ends, so that transactions that
// change owners take turns: two owners removing each other at once would
// each count two and leave none.
func (s *IdentityStore) CountOwners(ctx context.Context, tx *sqlx.Tx, orgID string) (int, error) {
	if _, err := tx.ExecContext(ctx, "SELECT 1 FROM organizations WHERE id = $1 FOR NO KEY UPDATE", orgID); err != nil {
		return 0, sqlq.MapError(err, "organization not found") // a deadlock is a conflict to retry
	}
	var n int
	err := tx.GetContext(ctx, &n, "SELECT count(*) FROM memberships m JOIN roles r ON r.id = m.role_id WHERE m.org_id = $1 AND r.name = 'owner'", orgID)
	return n, err
}

// RoleMembers returns how many members hold a role, in tx.
func (s *IdentityStore) RoleMembers(ctx context.Context, tx *sqlx.Tx, roleID string) (int, error) {
	var n int
	err := tx.GetContext(ctx, &n, "SELECT count(*) FROM memberships WHERE role_id = $1", roleID)
	return n, err
}

// DeleteEntity removes an entity (a deleted role's or agent's id), in tx.
func (s *IdentityStore) DeleteEntity(ctx context.Context, tx *sqlx.Tx, id string) error {
	_, err := tx.ExecContext(ctx, "DELETE FROM entities WHERE id = $1", id)
	return err
}

// NewEntity adds an id of kind to the entities table, in tx.
func (s *IdentityStore) NewEntity(ctx context.Context, tx *sqlx.Tx, id, kind string) error {
	return InsertEntity(ctx, tx, id, kind)
}

// Record writes one audit event. It never fails the request that caused
// it: a failure is returned for the caller to log.
func (s *IdentityStore) Record(ctx context.Context, e platform.AuditEvent) error {
	_, err := s.DB.ExecContext(ctx, `INSERT INTO audit_log (org_id, actor_id, actor_kind, action, resource_type, resource_id, outcome, reason, ip, user_agent, request_id, details)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`,
		e.OrgID, e.ActorID, e.ActorKind, e.Action, e.ResourceType, e.ResourceID, e.Outcome, e.Reason, e.IP, platform.Storable(e.UserAgent, 256), e.RequestID, e.Details)
	return err
}

// ListAudit returns a page of an organization's audit log, newest first,
// and how many events match in all.
func (s *IdentityStore) ListAudit(ctx context.Context, f platform.AuditFilter) ([]platform.AuditEvent, int64, error) {
	var args sqlq.Args
	where := []string{"org_id = " + args.Add(f.OrgID)}
	if f.Action != "" {
		where = append(where, "action = "+args.Add(f.Action))
	}
	if f.Outcome != "" {
		where = append(where, "outcome = "+args.Add(f.Outcome))
	}
	if f.ActorID != "" {
		where = append(where, "actor_id = "+args.Add(f.ActorID)+"::uuid")
	}
	if f.Since != nil {
		where = append(where, "created_at >= "+args.Add(*f.Since))
	}
	if f.Until != nil {
		where = append(where, "created_at < "+args.Add(*f.Until))
	}
	cond := strings.Join(where, " AND ")
	var total int64
	if err := s.DB.GetContext(ctx, &total, "SELECT count(*) FROM audit_log WHERE "+cond, args...); err != nil {
		return nil, 0, err
	}
	out := []platform.AuditEvent{}
	err := s.DB.SelectContext(ctx, &out, `SELECT id, org_id, actor_id, actor_kind, action, resource_type, resource_id, outcome, reason, ip, user_agent, request_id, details, created_at
		FROM audit_log WHERE `+cond+" ORDER BY created_at DESC, id DESC LIMIT "+args.Add(f.Limit)+" OFFSET "+args.Add(f.Offset), args...)
	return out, total, err
}

// CreateKey stores a new API key.
func (s *IdentityStore) CreateKey(ctx context.Context, k *platform.APIKey) error {
	// Inserts the key while its maker is a member, holding their membership
	// until the insert commits: a removal at the same moment either comes
	// first (no key) or waits and revokes it (see EndMembership). Returns
	// the key's timestamps and version.
	err := s.DB.QueryRowxContext(ctx, `WITH member AS (
			SELECT 1 FROM memberships WHERE org_id = $2 AND user_id = $3 FOR KEY SHARE)
		INSERT INTO api_keys (id, org_id, owner_id, entity_id, name, prefix, secret_hash, permissions, expires_at)
		SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE EXISTS (SELECT 1 FROM member)
		RETURNING created_at, updated_at, version`,
		k.ID, k.OrgID, k.OwnerID, k.EntityID, k.Name, k.Prefix, k.SecretHash, k.Permissions, k.ExpiresAt).Scan(&k.CreatedAt, &k.UpdatedAt, &k.Version)
	if errors.Is(err, sql.ErrNoRows) {
		return platform.Errorf(platform.EFORBIDDEN, "you are not a member of this organization")
	}
	return err
}

// RevokeKey marks a key revoked (in tx, after the caller loaded it).
func (s *IdentityStore) RevokeKey(ctx context.Context, tx *sqlx.Tx, id string) (*time.Time, error) {
	var at time.Time
	err := tx.GetContext(ctx, &at, "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), updated_at = now(), version = version + 1 WHERE id = $1 RETURNING revoked_at", id)
	return &at, sqlq.MapError(err, "api key not found")
}

// ACLEntry returns one entry of an organization.
func (s *IdentityStore) ACLEntry(ctx context.Context, orgID, id string) (*platform.ACLEntry, error) {
	e := &platform.ACLEntry{}
	err := s.DB.GetContext(ctx, e, `SELECT id, org_id, resource_type, COALESCE(resource_id::text, '') AS resource_id, action, principal_id, effect
		FROM acl_entries WHERE org_id = $1 AND id = $2`, orgID, id)
	return e, sqlq.MapError(err, "acl entry not found")
}
