package commands

import (
	"context"
	"testing"
)

func TestTmpExplain(t *testing.T) {
	f := newFixture(t, Limits{OrgMaxInFlight: 1000, OrgMaxQueued: 1000})
	f.db.SetMaxOpenConns(1)
	agent := f.newAgent(f.org, map[string]any{"max_concurrency": 100})
	ctx := context.Background()
	// warm up with data
	for range 300 {
		c := f.insert(f.org, agent, nil)
		f.store.AdmitAgent(ctx, agent)
		f.store.Claim(ctx, c.ID, 1, "w", 3000)
		f.store.Finish(ctx, c.ID, 1, succeeded)
	}
	f.exec("LOAD 'auto_explain'")
	f.exec("SET auto_explain.log_min_duration = 0")
	f.exec("SET auto_explain.log_analyze = on")
	f.exec("SET auto_explain.log_nested_statements = on")
	f.exec("SET auto_explain.log_timing = on")
	f.exec("SET client_min_messages = log")
	c := f.insert(f.org, agent, nil)
	f.store.AdmitAgent(ctx, agent)
	f.store.Claim(ctx, c.ID, 1, "w", 3000)
	f.store.Finish(ctx, c.ID, 1, succeeded)
	f.exec("SET auto_explain.log_min_duration = -1")
}
