package commands

import (
	"context"
	"testing"
	"time"
)

// BenchmarkLifecycle is one command's statements end to end, one at a time:
// insert, admit, claim, outcome. It measures what PostgreSQL costs per
// command, with nothing else competing.
func BenchmarkLifecycle(b *testing.B) {
	f := newFixture(b, Limits{OrgMaxInFlight: 1000, OrgMaxQueued: 1000})
	f.db.SetMaxOpenConns(1)
	// The WAL flush is waiting, not work: leave it out.
	f.exec("SET synchronous_commit = off")
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 100})
	ctx := context.Background()
	var spent [5]time.Duration
	lap := func(i int, start time.Time) time.Time {
		now := time.Now()
		spent[i] += now.Sub(start)
		return now
	}
	b.ResetTimer()
	for b.Loop() {
		at := time.Now()
		c := f.insert(f.org, agent, nil)
		at = lap(0, at)
		if got, err := f.store.AdmitAgent(ctx, agent); err != nil || len(got) != 1 {
			b.Fatalf("admit: %v %v", got, err)
		}
		at = lap(1, at)
		if cl, err := f.store.Claim(ctx, c.ID, 1, "w", 3000); err != nil || cl == nil {
			b.Fatalf("claim: %v", err)
		}
		at = lap(2, at)
		if done, err := f.store.Finish(ctx, c.ID, 1, succeeded); err != nil || done == nil {
			b.Fatalf("finish: %v", err)
		}
		at = lap(3, at)
		if got, err := f.store.AdmitAgent(ctx, agent); err != nil || len(got) != 0 {
			b.Fatalf("admit after: %v %v", got, err)
		}
		lap(4, at)
	}
	for i, name := range []string{"insert", "admit", "claim", "finish", "admit_none"} {
		b.ReportMetric(float64(spent[i].Microseconds())/float64(b.N), name+"_us")
	}
}
