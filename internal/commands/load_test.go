package commands

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"

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

// insertAdmitted stores commands for agent of org together, as dispatches
// arriving at once are, admitting what the limits allow.
func (f *fixture) insertAdmitted(org, agent string, priorities ...int) []*platform.Command {
	f.t.Helper()
	cs := make([]*platform.Command, len(priorities))
	for i, p := range priorities {
		cs[i] = &platform.Command{
			Base:    platform.Base{ID: uuid.NewString(), OrgID: org, OwnerID: f.user},
			AgentID: agent, Task: "agent:echo", Payload: json.RawMessage(`{}`), TimeoutS: 60, Priority: p,
		}
	}
	out, err := f.store.InsertMany(context.Background(), cs, true)
	if err != nil {
		f.t.Fatalf("insert: %v", err)
	}
	return out
}

// admittedOf tells which of cs were admitted as they were stored.
func admittedOf(cs []*platform.Command) []bool {
	out := make([]bool, len(cs))
	for i, c := range cs {
		out[i] = c.AdmittedAt != nil
	}
	return out
}

// A dispatch admits its command as it stores it when nothing stands in the
// way, and otherwise leaves it waiting, as admission would: behind the
// agent's backlog, within its max_concurrency (highest priority first) and
// the organization's limits, never for a disabled agent.
func TestInsertAdmitsWithinLimits(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Limits{OrgMaxInFlight: 5, OrgMaxQueued: 100})
	a := f.newAgent(f.org, map[string]any{"max_concurrency": 2})

	got := f.insertAdmitted(f.org, a, 0, 5, 1)
	if want := []bool{false, true, true}; !slices.Equal(admittedOf(got), want) {
		t.Fatalf("three for an agent of max_concurrency 2: admitted %v, want %v (highest priority first)", admittedOf(got), want)
	}
	if c := f.get(got[1].ID); c.AdmittedAt == nil {
		t.Fatal("the admission was not stored")
	}
	f.checkLoad(f.org, "two admitted as inserted", [2]int{2, 2})
	f.claim(got[1].ID, 1)
	f.finish(got[1].ID, 1, succeeded)
	// The agent has room again, but its waiting command goes first (of
	// equal priority: admission takes the highest first).
	if later := f.insertAdmitted(f.org, a, 0); later[0].AdmittedAt != nil {
		t.Fatal("a new command was admitted ahead of the agent's waiting one")
	}
	if ids := f.admit(a); !slices.Equal(ids, []string{got[0].ID}) {
		t.Fatalf("admission after: got %v, want the older waiting command %s", ids, got[0].ID)
	}

	// The organization's limit: 5 in flight, 2 of them a's.
	b := f.newAgent(f.org, map[string]any{"max_concurrency": 10})
	if got := f.insertAdmitted(f.org, b, 0, 0, 0, 0); !slices.Equal(admittedOf(got), []bool{true, true, true, false}) {
		t.Fatalf("at the organization's limit: admitted %v, want the first three", admittedOf(got))
	}
	f.checkLoad(f.org, "the organization full", [2]int{5, 5})

	// Another organization is not held back by this one; a disabled agent
	// admits nothing.
	org2, _ := f.newOrg()
	c := f.newAgent(org2, nil)
	if got := f.insertAdmitted(org2, c, 0); got[0].AdmittedAt == nil {
		t.Fatal("another organization's command waits")
	}
	d := f.newAgent(org2, nil)
	f.exec(`UPDATE agents SET status = 'disabled' WHERE id = $1`, d)
	if got := f.insertAdmitted(org2, d, 0); got[0].AdmittedAt != nil {
		t.Fatal("a disabled agent's command was admitted")
	}
	f.checkLoad(org2, "the other organization", [2]int{1, 1})
}
