package commands

import (
	"context"
	"testing"
	"time"

	"github.com/agentry/agentry/internal/platform"
)

// load reads an organization's counts from org_load, and recounts them
// from its commands.
func (f *fixture) load(org string) (counted, recounted [2]int) {
	f.t.Helper()
	if err := f.db.QueryRow(`SELECT COALESCE(sum(inflight), 0), COALESCE(sum(queued), 0) FROM org_load WHERE org_id = $1`, org).
		Scan(&counted[0], &counted[1]); err != nil {
		f.t.Fatal(err)
	}
	if err := f.db.QueryRow(`SELECT count(*) FILTER (WHERE status IN ('queued', 'running')), count(*) FILTER (WHERE status = 'queued')
		FROM commands WHERE org_id = $1 AND admitted_at IS NOT NULL`, org).Scan(&recounted[0], &recounted[1]); err != nil {
		f.t.Fatal(err)
	}
	return counted, recounted
}

// checkLoad fails the test unless org_load holds want (in flight, queued)
// and agrees with the commands.
func (f *fixture) checkLoad(org string, step string, want [2]int) {
	f.t.Helper()
	counted, recounted := f.load(org)
	if counted != recounted || counted != want {
		f.t.Fatalf("%s: org_load says %v in flight/queued, the commands %v, want %v", step, counted, recounted, want)
	}
}

// The organization's load that admission reads follows every transition,
// whoever makes it, including a cascade delete.
func TestOrgLoadFollowsTransitions(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 100, OrgMaxQueued: 100})
	ctx := context.Background()
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 10})
	var ids []string
	for range 6 {
		ids = append(ids, f.insert(f.org, agent, nil).ID)
	}
	f.checkLoad(f.org, "inserted", [2]int{0, 0})
	if got := f.admit(agent); len(got) != 6 {
		t.Fatalf("want 6 admitted, got %d", len(got))
	}
	f.checkLoad(f.org, "admitted", [2]int{6, 6})
	f.claim(ids[0], 1)
	f.claim(ids[1], 1)
	f.claim(ids[2], 1)
	f.checkLoad(f.org, "three claimed", [2]int{6, 3})
	f.finish(ids[0], 1, succeeded)
	f.checkLoad(f.org, "one succeeded", [2]int{5, 3})
	at := time.Now().Add(time.Hour)
	f.finish(ids[1], 1, Outcome{Status: platform.CommandQueued, Event: "retrying", Failed: true, NotBefore: &at, Error: ptr("boom")})
	f.checkLoad(f.org, "one to retry", [2]int{5, 4})
	if _, err := f.store.Cancel(ctx, ids[3]); err != nil {
		t.Fatal(err)
	}
	f.checkLoad(f.org, "a queued one canceled", [2]int{4, 3})
	f.exec(`UPDATE commands SET lease_until = now() - interval '1 second' WHERE id = $1`, ids[2])
	if _, err := f.store.ExpireLeases(ctx, 10); err != nil {
		t.Fatal(err)
	}
	f.checkLoad(f.org, "a lease expired", [2]int{4, 4})
	f.exec(`DELETE FROM commands WHERE id = $1`, ids[4])
	f.checkLoad(f.org, "one deleted", [2]int{3, 3})
	f.exec(`DELETE FROM agents WHERE id = $1`, agent)
	f.checkLoad(f.org, "the agent deleted", [2]int{0, 0})
}

// An outcome tells the worker to admit for the whole organization only
// when the organization was at its limit and something waits.
func TestFinishTellsOrgFull(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 2, OrgMaxQueued: 100})
	ctx := context.Background()
	a, b := f.newAgent(f.org, map[string]any{"max_concurrency": 5}), f.newAgent(f.org, map[string]any{"max_concurrency": 5})
	first := f.insert(f.org, a, nil)
	f.admit(a)
	f.claim(first.ID, 1)
	got, err := f.store.Finish(ctx, first.ID, 1, succeeded)
	if err != nil || got == nil || got.OrgFull {
		t.Fatalf("under the limit: want org_full false, got %+v (%v)", got, err)
	}
	x := f.insert(f.org, a, nil)
	f.insert(f.org, a, nil)
	f.admit(a)
	waiting := f.insert(f.org, b, nil)
	if len(f.admit(b)) != 0 {
		t.Fatal("admitted over the organization's limit")
	}
	f.claim(x.ID, 1)
	got, err = f.store.Finish(ctx, x.ID, 1, succeeded)
	if err != nil || got == nil || !got.OrgFull {
		t.Fatalf("at the limit with a command waiting: want org_full, got %+v (%v)", got, err)
	}
	admitted, err := f.store.AdmitOrg(ctx, f.org)
	if err != nil || len(admitted) != 1 || admitted[0].ID != waiting.ID {
		t.Fatalf("want the other agent's command admitted, got %+v (%v)", admitted, err)
	}
}
