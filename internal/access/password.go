package access

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/argon2"
)

// PasswordParams are argon2id's cost parameters.
type PasswordParams struct {
	Memory  uint32 // KiB
	Time    uint32
	Threads uint8
	SaltLen uint32
	KeyLen  uint32
}

// DefaultPasswordParams follow OWASP's password storage cheat sheet:
// argon2id with 19 MiB of memory, 2 iterations, 1 degree of parallelism.
var DefaultPasswordParams = PasswordParams{Memory: 19 * 1024, Time: 2, Threads: 1, SaltLen: 16, KeyLen: 32}

// Passwords hashes and verifies passwords with argon2id, in the PHC string
// format: $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>.
type Passwords struct {
	Params PasswordParams
	// dummy is verified against when a login names no account, so that
	// unknown and known emails take the same time.
	dummy string
}

// NewPasswords returns a hasher with the given parameters.
func NewPasswords(params PasswordParams) *Passwords {
	p := &Passwords{Params: params}
	p.dummy, _ = p.Hash("dummy password for timing")
	return p
}

// Hash returns the PHC string of password under fresh salt.
func (p *Passwords) Hash(password string) (string, error) {
	salt := make([]byte, p.Params.SaltLen)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	key := argon2.IDKey([]byte(password), salt, p.Params.Time, p.Params.Memory, p.Params.Threads, p.Params.KeyLen)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.Params.Memory, p.Params.Time, p.Params.Threads, b64.EncodeToString(salt), b64.EncodeToString(key)), nil
}

var errBadHash = errors.New("malformed password hash")

// Verify reports whether password matches the PHC string encoded, and
// whether encoded should be rehashed because its parameters are not the
// current ones.
func (p *Passwords) Verify(password, encoded string) (ok, rehash bool, err error) {
	parts := strings.Split(encoded, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return false, false, errBadHash
	}
	var version int
	if _, err := fmt.Sscanf(parts[2], "v=%d", &version); err != nil || version != argon2.Version {
		return false, false, errBadHash
	}
	var params PasswordParams
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &params.Memory, &params.Time, &params.Threads); err != nil {
		return false, false, errBadHash
	}
	b64 := base64.RawStdEncoding
	salt, err := b64.DecodeString(parts[4])
	if err != nil {
		return false, false, errBadHash
	}
	want, err := b64.DecodeString(parts[5])
	if err != nil || len(want) == 0 || params.Memory == 0 || params.Time == 0 || params.Threads == 0 || params.Memory > 1<<22 || params.Time > 64 {
		return false, false, errBadHash
	}
	got := argon2.IDKey([]byte(password), salt, params.Time, params.Memory, params.Threads, uint32(len(want)))
	if subtle.ConstantTimeCompare(got, want) != 1 {
		return false, false, nil
	}
	cur := p.Params
	rehash = params.Memory != cur.Memory || params.Time != cur.Time || params.Threads != cur.Threads ||
		uint32(len(salt)) != cur.SaltLen || uint32(len(want)) != cur.KeyLen
	return true, rehash, nil
}

// Burn spends the time of one verification, for logins naming no account.
func (p *Passwords) Burn(password string) { _, _, _ = p.Verify(password, p.dummy) }
