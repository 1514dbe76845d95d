// Command devrun is `make run`'s supervisor: it starts the api, worker and
// scheduler binaries from a directory, prefixes each line they print with the
// binary's name, prints where everything is, and on Ctrl-C (or when one
// binary exits) stops all three with SIGTERM and waits for them.
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	dir := "bin"
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, dir, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "devrun:", err)
		os.Exit(1)
	}
}

var colors = map[string]string{"api": "\033[36m", "worker": "\033[33m", "scheduler": "\033[35m"}

func run(ctx context.Context, dir string, out io.Writer) error {
	var mu sync.Mutex // one line at a time on out
	var wg sync.WaitGroup
	exited := make(chan string, 3)
	var procs []*exec.Cmd
	for _, name := range []string{"api", "worker", "scheduler"} {
		cmd := exec.Command(filepath.Join(dir, name))
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		stdout, _ := cmd.StdoutPipe()
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			for _, p := range procs {
				_ = p.Process.Signal(syscall.SIGTERM)
			}
			return fmt.Errorf("start %s: %w", name, err)
		}
		procs = append(procs, cmd)
		prefix := fmt.Sprintf("%s%-9s|\033[0m ", colors[name], name)
		var streams sync.WaitGroup
		for _, r := range []io.Reader{stdout, stderr} {
			streams.Add(1)
			go func() {
				defer streams.Done()
				sc := bufio.NewScanner(r)
				sc.Buffer(make([]byte, 64*1024), 1<<20)
				for sc.Scan() {
					mu.Lock()
					fmt.Fprintln(out, prefix+sc.Text())
					mu.Unlock()
				}
			}()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			streams.Wait()
			err := cmd.Wait()
			mu.Lock()
			fmt.Fprintf(out, "%s exited: %v\n", prefix, errString(err))
			mu.Unlock()
			exited <- name
		}()
	}
	mu.Lock()
	fmt.Fprintln(out, strings.Join([]string{
		"",
		"agentry is starting:",
		"  API      http://localhost:8080",
		"  docs     http://localhost:8080/docs (OpenAPI: http://localhost:8080/openapi.json)",
		"  metrics  http://localhost:8080/metrics (worker :9091/metrics, scheduler :9092/metrics)",
		"Press Ctrl-C to stop all three.",
		"",
	}, "\n"))
	mu.Unlock()

	failed := ""
	select {
	case <-ctx.Done():
	case failed = <-exited:
	}
	for _, p := range procs {
		_ = p.Process.Signal(syscall.SIGTERM)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(40 * time.Second):
		for _, p := range procs {
			_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
		}
		<-done
	}
	if failed != "" {
		return fmt.Errorf("%s stopped, so the others were stopped too", failed)
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}
