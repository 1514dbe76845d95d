// Package benchkit is what agentry's benchmark harnesses share: the BENCH
// line they print, running a binary under test, and reading a process's
// CPU time and memory.
package benchkit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Compare prints one comparison:
//
//	BENCH <name> <value> <unit> vs <baseline> <value> <unit> ratio <r>
func Compare(name string, v float64, unit, base string, bv float64, bunit string) {
	r := 0.0
	if bv != 0 {
		r = v / bv
	}
	fmt.Printf("BENCH %s %s %s vs %s %s %s ratio %.2f\n", name, Num(v), unit, base, Num(bv), bunit, r)
}

// Value prints one figure without a baseline: BENCH <name> <value> <unit>.
func Value(name string, v float64, unit string) {
	fmt.Printf("BENCH %s %s %s\n", name, Num(v), unit)
}

// Num formats a figure: whole above 100, two decimals below.
func Num(v float64) string {
	if v >= 100 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// Proc is a running binary under test.
type Proc struct {
	Cmd *exec.Cmd
	// URL is where it said it listens ("… listening on <url>").
	URL  string
	log  *os.File
	done chan struct{}
}

// Start runs cmd, its standard error going to a file (as a container
// runtime would take it), and waits until it prints where it listens.
func Start(ctx context.Context, cmd *exec.Cmd) (*Proc, error) {
	log, err := os.CreateTemp("", "agentry-bench-"+filepath.Base(cmd.Path)+"-*.log")
	if err != nil {
		return nil, err
	}
	cmd.Stderr = log
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{Cmd: cmd, log: log, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() { // read to the end, or the binary blocks writing
			if _, url, ok := strings.Cut(sc.Text(), "listening on "); ok {
				select {
				case urls <- url:
				default:
				}
			}
		}
	}()
	select {
	case p.URL = <-urls:
		return p, nil
	case <-p.done:
		err = fmt.Errorf("%s exited:\n%s", cmd.Path, p.Logs())
	case <-time.After(30 * time.Second):
		err = fmt.Errorf("%s did not listen within 30s:\n%s", cmd.Path, p.Logs())
	case <-ctx.Done():
		err = ctx.Err()
	}
	p.Stop()
	return nil, err
}

// WaitReady waits until the binary's /readyz answers 200.
func (p *Proc) WaitReady(ctx context.Context, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		res, err := http.Get(p.URL + "/readyz")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready within %s:\n%s", p.Cmd.Path, within, p.Logs())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// StartReady is Start, then WaitReady within 30 s; a binary that does not
// get ready is stopped.
func StartReady(ctx context.Context, cmd *exec.Cmd) (*Proc, error) {
	p, err := Start(ctx, cmd)
	if err != nil {
		return nil, err
	}
	if err := p.WaitReady(ctx, 30*time.Second); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// Pid is the binary's process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Logs returns what the binary wrote to its standard error so far.
func (p *Proc) Logs() string {
	data, _ := os.ReadFile(p.log.Name())
	return string(data)
}

// Stop sends SIGTERM, kills the binary if it has not exited within 20
// seconds, and removes its log.
func (p *Proc) Stop() {
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		_ = p.Cmd.Process.Kill()
		<-p.done
	}
	p.log.Close()
	os.Remove(p.log.Name())
}

// clockTick is USER_HZ, 100 on Linux.
const clockTick = 100

// CPUTime is the user and system CPU time a process used so far.
func CPUTime(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: fields count from
	// after its ')'; utime and stime are the 14th and 15th of the line.
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, errors.New("short /proc/" + strconv.Itoa(pid) + "/stat")
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / clockTick, nil
}

// CPUTimeOf sums CPUTime over every process named comm.
func CPUTimeOf(comm string) time.Duration {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var total time.Duration
	for _, d := range dirs {
		name, err := os.ReadFile(d + "/comm")
		if err != nil || strings.TrimSpace(string(name)) != comm {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(d))
		cpu, _ := CPUTime(pid)
		total += cpu
	}
	return total
}

// RSSKB is a process's resident set size in kB.
func RSSKB(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		}
	}
	return 0, errors.New("no VmRSS in /proc/" + strconv.Itoa(pid) + "/status")
}

// PostJSON posts body as JSON to url and decodes the JSON answer; a status
// of 300 or more is an error naming it.
func PostJSON(url string, body any) (map[string]any, error) {
	data, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	res, err := http.Post(url, "application/json", bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("%s: %d, not JSON: %w", url, res.StatusCode, err)
	}
	if res.StatusCode >= 300 {
		return nil, fmt.Errorf("%s: %d %v", url, res.StatusCode, out)
	}
	return out, nil
}

// SignUp registers a user on the API at base and logs it in; it returns
// the user (with its default_org_id) and an access token.
func SignUp(base, email, password string) (map[string]any, string, error) {
	user, err := PostJSON(base+"/v1/auth/register", map[string]any{"email": email, "password": password, "name": "Bench"})
	if err != nil {
		return nil, "", err
	}
	tok, err := PostJSON(base+"/v1/auth/login", map[string]any{"email": email, "password": password})
	if err != nil {
		return nil, "", err
	}
	token, _ := tok["access_token"].(string)
	return user, token, nil
}
