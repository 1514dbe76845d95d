// Command bench is `make bench`: it measures agentry against bare
// baselines on this machine, in one run, over real HTTP on loopback, and
// prints one line per comparison:
//
//	BENCH <name> <value> <unit> vs <baseline> <value> <unit> ratio <r>
//
// Every server under test runs in its own process (this program re-executes
// itself with -serve for the baselines and the framework alone, and runs the
// real api binary for the full stack), so the load generator here is the
// only work in this process. Sub-benchmarks (the command pipeline, the
// WebSocket gateway, template instantiation) print their own BENCH lines.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	serve := flag.String("serve", "", "internal: serve a baseline (bare|framework) instead of benchmarking")
	dsn := flag.String("dsn", "", "internal: database URL for -serve")
	duration := flag.Duration("duration", 0, "how long each measurement runs (default 5s, or BENCH_DURATION)")
	only := flag.String("only", "", "run only the comparisons whose name contains this")
	cpuprofile := flag.String("cpuprofile", "", "write a CPU profile of the framework server's GET run to this file")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	if *serve != "" {
		err = serveBaseline(ctx, *serve, *dsn, *cpuprofile)
	} else {
		err = run(ctx, options{duration: *duration, only: *only, cpuprofile: *cpuprofile})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
