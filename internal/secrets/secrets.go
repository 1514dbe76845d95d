// Package secrets seals environment secrets at rest with AES-256-GCM. Each
// value is bound to its environment and name (as additional data), so a
// sealed value copied to another environment or name does not open.
package secrets

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
)

// Sealer seals and opens secret values with one key.
type Sealer struct {
	aead cipher.AEAD
}

// New returns a sealer for a 32-byte key.
func New(key []byte) (*Sealer, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("secrets: key must be 32 bytes, not %d", len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: aead}, nil
}

func aad(owner, name string) []byte { return []byte(owner + "\x00" + name) }

// Seal encrypts value for the secret name of owner.
func (s *Sealer) Seal(owner, name, value string) string {
	nonce := make([]byte, s.aead.NonceSize())
	_, _ = rand.Read(nonce)
	sealed := s.aead.Seal(nonce, nonce, []byte(value), aad(owner, name))
	return base64.StdEncoding.EncodeToString(sealed)
}

// ErrOpen is returned for a sealed value that does not open with this key,
// owner and name.
var ErrOpen = errors.New("secrets: cannot open sealed value")

// Open decrypts a sealed value of the secret name of owner.
func (s *Sealer) Open(owner, name, sealed string) (string, error) {
	data, err := base64.StdEncoding.DecodeString(sealed)
	if err != nil || len(data) < s.aead.NonceSize() {
		return "", ErrOpen
	}
	n := s.aead.NonceSize()
	plain, err := s.aead.Open(nil, data[:n], data[n:], aad(owner, name))
	if err != nil {
		return "", ErrOpen
	}
	return string(plain), nil
}
