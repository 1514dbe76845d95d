package realtime

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"time"

	"github.com/redis/go-redis/v9"
)

// Tickets are the short-lived, single-use credentials of browser WebSocket
// handshakes (browsers cannot set an Authorization header on a WebSocket).
// Only the ticket's hash is stored, in Redis, for TTL.
type Tickets struct {
	rdb    redis.UniversalClient
	prefix string
	ttl    time.Duration
}

// NewTickets returns a ticket store whose tickets live ttl.
func NewTickets(rdb redis.UniversalClient, prefix string, ttl time.Duration) *Tickets {
	return &Tickets{rdb: rdb, prefix: prefix + ":wsticket:", ttl: ttl}
}

// TicketClaims are what a ticket stands for: a user's session in an
// organization.
type TicketClaims struct {
	UserID    string `json:"u"`
	OrgID     string `json:"o"`
	SessionID string `json:"s"`
}

// TTL is how long a ticket lives.
func (t *Tickets) TTL() time.Duration { return t.ttl }

func (t *Tickets) key(ticket string) string {
	sum := sha256.Sum256([]byte(ticket))
	return t.prefix + hex.EncodeToString(sum[:])
}

// Issue returns a new ticket for claims.
func (t *Tickets) Issue(ctx context.Context, claims TicketClaims) (string, error) {
	var b [32]byte
	_, _ = rand.Read(b[:])
	ticket := "agt_" + base64.RawURLEncoding.EncodeToString(b[:])
	data, _ := json.Marshal(claims)
	if err := t.rdb.Set(ctx, t.key(ticket), data, t.ttl).Err(); err != nil {
		return "", err
	}
	return ticket, nil
}

// Redeem returns the claims of a ticket and destroys it; nil for an
// unknown, used or expired ticket.
func (t *Tickets) Redeem(ctx context.Context, ticket string) (*TicketClaims, error) {
	if len(ticket) > 100 {
		return nil, nil
	}
	data, err := t.rdb.GetDel(ctx, t.key(ticket)).Bytes()
	if err == redis.Nil {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var c TicketClaims
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, nil
	}
	return &c, nil
}
