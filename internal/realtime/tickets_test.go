package realtime

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/testenv"
)

func TestTicketIsSingleUse(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	tickets := NewTickets(rdb, prefix, 30*time.Second)
	ctx := context.Background()
	claims := TicketClaims{UserID: "u1", OrgID: "o1", SessionID: "s1"}
	ticket, err := tickets.Issue(ctx, claims)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ticket, "agt_") || len(ticket) < 40 {
		t.Fatalf("want an agt_ ticket of 32 random bytes, got %q", ticket)
	}
	// Only the hash is stored.
	keys, _ := rdb.Keys(ctx, prefix+"*").Result()
	for _, k := range keys {
		if strings.Contains(k, ticket) {
			t.Fatalf("the ticket itself is in a key: %s", k)
		}
	}
	if ttl := rdb.PTTL(ctx, tickets.key(ticket)).Val(); ttl <= 0 || ttl > 30*time.Second {
		t.Fatalf("ticket TTL: want (0, 30s], got %s", ttl)
	}

	// Redeemed by many at once, it works once.
	var wg sync.WaitGroup
	got := make(chan *TicketClaims, 10)
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := tickets.Redeem(ctx, ticket)
			if err != nil {
				t.Error(err)
			}
			got <- c
		}()
	}
	wg.Wait()
	close(got)
	wins := 0
	for c := range got {
		if c != nil {
			wins++
			if *c != claims {
				t.Fatalf("claims: want %+v, got %+v", claims, *c)
			}
		}
	}
	if wins != 1 {
		t.Fatalf("want the ticket redeemed once, got %d", wins)
	}
}

func TestTicketRefusals(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	tickets := NewTickets(rdb, prefix, 30*time.Second)
	other := NewTickets(rdb, prefix+"other", 30*time.Second)
	foreign, err := other.Issue(ctx, TicketClaims{UserID: "u"})
	if err != nil {
		t.Fatal(err)
	}
	for name, ticket := range map[string]string{
		"empty":                       "",
		"unknown":                     "agt_nope",
		"another installation's":      foreign,
		"too long":                    strings.Repeat("a", 101),
		"garbage in the stored value": "agt_garbage",
	} {
		if name == "garbage in the stored value" {
			rdb.Set(ctx, tickets.key(ticket), "not json", time.Minute)
		}
		c, err := tickets.Redeem(ctx, ticket)
		if c != nil || err != nil {
			t.Errorf("%s ticket: want nil, nil; got %+v, %v", name, c, err)
		}
	}
}

func TestTicketExpires(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	tickets := NewTickets(rdb, prefix, 50*time.Millisecond)
	if tickets.TTL() != 50*time.Millisecond {
		t.Fatalf("TTL: got %s", tickets.TTL())
	}
	ticket, err := tickets.Issue(ctx, TicketClaims{UserID: "u1"})
	if err != nil {
		t.Fatal(err)
	}
	// Wait for Redis to expire it (EXISTS does not redeem it).
	deadline := time.Now().Add(5 * time.Second)
	for rdb.Exists(ctx, tickets.key(ticket)).Val() == 1 {
		if time.Now().After(deadline) {
			t.Fatal("the ticket did not expire")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if c, err := tickets.Redeem(ctx, ticket); c != nil || err != nil {
		t.Fatalf("expired ticket: want nil, nil; got %+v, %v", c, err)
	}
}
