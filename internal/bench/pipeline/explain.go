package main

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/agentry/agentry/internal/bench/benchkit"
)

// snapshot is what the explanation compares before and after a run.
type snapshot struct {
	cpu      map[string]time.Duration // by process: api, worker, redis (the whole server)
	backends map[int]time.Duration    // the stack's PostgreSQL backends, by pid
	xacts    int64                    // committed PostgreSQL transactions of the database
	tuples   map[string][2]int64      // per table of the schema: inserted, updated
	redis    int64                    // Redis commands served
	redisBy  map[string][2]int64      // Redis commands served by name: calls, microseconds
	commands int64
}

func (e *env) snapshot(ctx context.Context) snapshot {
	s := snapshot{cpu: map[string]time.Duration{}, tuples: map[string][2]int64{}}
	s.cpu["api"] = cpuOf(e.api.Pid())
	s.cpu["worker"] = cpuOf(e.worker.Pid())
	var pids []int
	_ = e.db.SelectContext(ctx, &pids, `SELECT pid FROM pg_stat_activity WHERE application_name = $1`, e.app)
	s.backends = map[int]time.Duration{}
	for _, pid := range pids {
		s.backends[pid] = cpuOf(pid)
	}
	s.cpu["redis"] = benchkit.CPUTimeOf("redis-server")
	_ = e.db.GetContext(ctx, &s.xacts, `SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()`)
	var rows []struct {
		Table string `db:"relname"`
		Ins   int64  `db:"n_tup_ins"`
		Upd   int64  `db:"n_tup_upd"`
	}
	// Statistics are sent to the collector at the end of transactions, a
	// little late: give them a moment.
	time.Sleep(600 * time.Millisecond)
	_ = e.db.SelectContext(ctx, &rows, `SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_user_tables WHERE schemaname = current_schema()`)
	for _, r := range rows {
		s.tuples[r.Table] = [2]int64{r.Ins, r.Upd}
	}
	info, _ := e.rdb.Info(ctx, "stats").Result()
	for _, l := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "total_commands_processed:"); ok {
			s.redis, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	s.redisBy = map[string][2]int64{}
	stats, _ := e.rdb.Info(ctx, "commandstats").Result()
	for _, l := range strings.Split(stats, "\n") {
		// cmdstat_xadd:calls=10,usec=40,usec_per_call=4.00,...
		name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(l), "cmdstat_"), ":")
		if !ok || strings.HasPrefix(l, "#") {
			continue
		}
		var v [2]int64
		for _, kv := range strings.Split(rest, ",") {
			if n, ok := strings.CutPrefix(kv, "calls="); ok {
				v[0], _ = strconv.ParseInt(n, 10, 64)
			} else if n, ok := strings.CutPrefix(kv, "usec="); ok {
				v[1], _ = strconv.ParseInt(n, 10, 64)
			}
		}
		s.redisBy[name] = v
	}
	_ = e.db.GetContext(ctx, &s.commands, `SELECT count(*) FROM commands`)
	return s
}

// explain prints where the pipeline's time went between two snapshots.
func explain(e *env, run string, before, after snapshot) {
	n := float64(after.commands - before.commands)
	if n <= 0 {
		return
	}
	fmt.Printf("\nwhere the time goes (%s, %d commands; redis counters are the whole server's):\n", run, int(n))
	// Backends that lived through the run (a pool keeps them).
	var pg time.Duration
	for pid, cpu := range after.backends {
		pg += cpu - before.backends[pid]
	}
	after.cpu["postgres"] = pg
	for _, name := range []string{"api", "worker", "postgres", "redis"} {
		d := after.cpu[name] - before.cpu[name]
		fmt.Printf("  cpu %-9s %7.1f ms per 1000 commands\n", name, float64(d.Microseconds())/n)
	}
	fmt.Printf("  postgres transactions per command: %.2f (the whole database)\n", float64(after.xacts-before.xacts)/n)
	for table, a := range after.tuples {
		b := before.tuples[table]
		ins, upd := float64(a[0]-b[0])/n, float64(a[1]-b[1])/n
		if ins+upd >= 0.05 {
			fmt.Printf("  rows of %-15s inserted %.2f, updated %.2f per command\n", table, ins, upd)
		}
	}
	fmt.Printf("  redis commands per command: %.1f (whole server)\n", float64(after.redis-before.redis)/n)
	type stat struct {
		name        string
		calls, usec float64
	}
	var top []stat
	for name, a := range after.redisBy {
		b := before.redisBy[name]
		if calls := float64(a[0]-b[0]) / n; calls >= 0.05 {
			top = append(top, stat{name, calls, float64(a[1]-b[1]) / n})
		}
	}
	slices.SortFunc(top, func(a, b stat) int { return cmp.Compare(b.usec, a.usec) })
	for _, t := range top {
		fmt.Printf("    redis %-14s %5.2f calls, %6.1f µs per command\n", t.name, t.calls, t.usec)
	}
}

// cpuOf is the CPU time of a process so far, 0 if it is gone.
func cpuOf(pid int) time.Duration {
	d, _ := benchkit.CPUTime(pid)
	return d
}
