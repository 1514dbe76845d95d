package access

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"strings"
)

// API keys look like agk_<id>_<secret>: "agk_" and 12 base64url characters
// (9 random bytes) form the public prefix that identifies the key and is
// listed; the secret (32 random bytes) is shown once and only its SHA-256 is
// stored. A secret of 256 random bits needs no slow hash.
const (
	keyTag       = "agk_"
	keyPrefixLen = len(keyTag) + 12
)

// NewAPIKey returns a fresh key, its public prefix and the hash to store.
func NewAPIKey() (key, prefix string, hash []byte) {
	var p [9]byte
	var s [32]byte
	_, _ = rand.Read(p[:])
	_, _ = rand.Read(s[:])
	prefix = keyTag + base64.RawURLEncoding.EncodeToString(p[:])
	secret := base64.RawURLEncoding.EncodeToString(s[:])
	sum := sha256.Sum256([]byte(secret))
	return prefix + "_" + secret, prefix, sum[:]
}

// IsAPIKey reports whether a bearer credential looks like an API key.
func IsAPIKey(credential string) bool { return strings.HasPrefix(credential, keyTag) }

// SplitAPIKey returns the prefix of key and the hash of its secret.
func SplitAPIKey(key string) (prefix string, hash []byte, ok bool) {
	if !IsAPIKey(key) || len(key) > 128 {
		return "", nil, false
	}
	if len(key) < keyPrefixLen+2 || key[keyPrefixLen] != '_' {
		return "", nil, false
	}
	sum := sha256.Sum256([]byte(key[keyPrefixLen+1:]))
	return key[:keyPrefixLen], sum[:], true
}
