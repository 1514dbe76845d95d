package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"
)

// repoRoot is the repository, seen from this package's directory.
const repoRoot = "../.."

// TestMetrics runs the three binaries on one stack, makes each of them do
// a little of everything, scrapes their /metrics and checks that
//   - every metric the monitoring issue asks for is exposed by the binary
//     that owns it, and moved when it should have;
//   - agentry's metrics follow the Prometheus naming conventions and carry
//     no label that grows with agents, commands or users;
//   - every metric that a Grafana dashboard, an alert of
//     deploy/prometheus/alerts.yml or the chart's PrometheusRule refers to
//     is exposed by some binary.
func TestMetrics(t *testing.T) {
	t.Parallel()
	s := NewStack(t, nil)
	api := s.API()
	worker := s.Start("worker")
	sched := s.Start("scheduler")

	// The API: a user, refused credentials, a denied read, an unknown route.
	anon := s.Client(api)
	u := anon.NewUser("metrics")
	anon.Must(401, "POST", "/v1/auth/login", map[string]any{"email": u.Email, "password": "not-the-password-at-all"})
	anon.As("not-a-token", "").Must(401, "GET", "/v1/agents", nil)
	anon.Must(401, "GET", "/v1/agents", nil)
	agent := cmdAgent(t, u.Client, nil)
	anon.NewUser("stranger").Must(404, "GET", "/v1/agents/"+agent, nil)
	u.Must(404, "GET", "/v1/no-such-thing/"+agent, nil)

	// Realtime: a connection subscribed to the agent's events.
	ws := wsDial(t, api, u.Token)
	ws.subscribe("agent:"+agent, "")

	// Commands: two that succeed, one that is still running when the
	// scheduler leader refreshes the queue gauges, then is canceled.
	for i := range 2 {
		c := cmdDispatch(t, u.Client, agent, echo(fmt.Sprint("metrics ", i)))
		cmdWaitStatus(t, u.Client, c.ID, "succeeded", 30*time.Second)
	}
	long := cmdDispatch(t, u.Client, agent, sleep(60000))
	cmdWaitStatus(t, u.Client, long.ID, "running", 30*time.Second)
	// The scheduler's scrape is the one taken with the command in flight:
	// the leader refreshes the gauges every 10s, and the in-flight gauge
	// has no series once nothing is in flight.
	scraped := map[string]map[string]*dto.MetricFamily{}
	Eventually(t, 30*time.Second, "the scheduler leads and exports the queue gauges with a command in flight", func() bool {
		f := scrape(t, sched)
		v, _ := sampleValue(f["agentry_scheduler_leader"], nil)
		scraped["scheduler"] = f
		return v == 1 && f["agentry_queue_tasks"] != nil && f["agentry_commands_in_flight"] != nil
	})
	u.Must(200, "POST", "/v1/commands/"+long.ID+"/cancel", nil)
	cmdWaitStatus(t, u.Client, long.ID, "canceled", 30*time.Second)
	scraped["api"], scraped["worker"] = scrape(t, api), scrape(t, worker)

	t.Run("exposed", func(t *testing.T) { checkExposed(t, scraped) })
	t.Run("counted", func(t *testing.T) { checkCounted(t, scraped) })
	t.Run("conventions", func(t *testing.T) { checkConventions(t, scraped) })
	t.Run("referenced", func(t *testing.T) { checkReferenced(t, scraped) })
}

// exposedBy is, for each binary, the metrics it must expose: the issue's
// list, plus the Go runtime, process and database pool collectors that
// every binary has.
var exposedBy = map[string][]string{
	"api": {
		"agentry_http_requests_total", "agentry_http_request_duration_seconds", "agentry_http_requests_in_flight",
		"agentry_auth_failures_total", "agentry_access_denials_total",
		"agentry_ws_connections", "agentry_ws_subscriptions", "agentry_ws_messages_sent_total", "agentry_ws_slow_clients_dropped_total",
		"agentry_commands_dispatched_total",
	},
	"worker": {
		"agentry_commands_started_total", "agentry_commands_finished_total", "agentry_commands_retries_total",
		"agentry_commands_dispatch_to_start_seconds", "agentry_commands_run_seconds",
	},
	"scheduler": {
		"agentry_scheduler_leader", "agentry_scheduler_fires_total", "agentry_scheduler_misfires_total",
		"agentry_reconciler_repairs_total",
		"agentry_queue_tasks", "agentry_queue_oldest_pending_age_seconds",
		"agentry_commands_in_flight", "agentry_commands_waiting",
	},
	"*": {
		"agentry_build_info",
		"go_goroutines", "go_threads", "go_gc_duration_seconds", "go_memstats_heap_inuse_bytes", "go_info",
		"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
		"go_sql_max_open_connections", "go_sql_open_connections", "go_sql_in_use_connections", "go_sql_idle_connections",
		"go_sql_wait_count_total", "go_sql_wait_duration_seconds_total",
	},
}

func checkExposed(t *testing.T, scraped map[string]map[string]*dto.MetricFamily) {
	for binary, families := range scraped {
		for _, name := range slices.Concat(exposedBy[binary], exposedBy["*"]) {
			if families[name] == nil {
				t.Errorf("%s does not expose %s", binary, name)
			}
		}
		if v, ok := sampleValue(families["agentry_build_info"], map[string]string{"binary": binary}); !ok || v != 1 {
			t.Errorf("%s: agentry_build_info{binary=%q} is %v (present %v), want 1", binary, binary, v, ok)
		}
	}
	// The queue gauges are the scheduler leader's alone, so that sums over
	// replicas do not double.
	for _, binary := range []string{"api", "worker"} {
		for _, name := range []string{"agentry_queue_tasks", "agentry_queue_oldest_pending_age_seconds", "agentry_scheduler_leader"} {
			if scraped[binary][name] != nil {
				t.Errorf("%s exposes %s, which only the scheduler should", binary, name)
			}
		}
	}
}

// checkCounted: what the test did shows in the metrics of the binary that
// did it.
func checkCounted(t *testing.T, scraped map[string]map[string]*dto.MetricFamily) {
	api, worker, sched := scraped["api"], scraped["worker"], scraped["scheduler"]
	for _, c := range []struct {
		binary, name string
		labels       map[string]string
		atLeast      float64
	}{
		{"api", "agentry_http_requests_total", map[string]string{"method": "POST", "route": "/v1/agents/:id/commands", "status": "202"}, 3},
		{"api", "agentry_http_requests_total", map[string]string{"method": "POST", "route": "/v1/auth/login", "status": "401"}, 1},
		{"api", "agentry_http_requests_total", map[string]string{"method": "GET", "route": "unmatched", "status": "404"}, 1},
		{"api", "agentry_auth_failures_total", map[string]string{"reason": "bad_token"}, 1},
		{"api", "agentry_auth_failures_total", map[string]string{"reason": "missing"}, 1},
		{"api", "agentry_access_denials_total", nil, 1},
		{"api", "agentry_commands_dispatched_total", map[string]string{"task": "agent:echo"}, 2},
		{"api", "agentry_ws_connections", nil, 1},
		{"api", "agentry_ws_subscriptions", nil, 1},
		{"api", "agentry_ws_messages_sent_total", nil, 1},
		{"worker", "agentry_commands_started_total", map[string]string{"task": "agent:echo"}, 2},
		{"worker", "agentry_commands_finished_total", map[string]string{"task": "agent:echo", "outcome": "succeeded"}, 2},
		{"worker", "agentry_commands_finished_total", map[string]string{"task": "agent:sleep", "outcome": "canceled"}, 1},
		{"scheduler", "agentry_scheduler_leader", nil, 1},
		{"scheduler", "agentry_commands_in_flight", nil, 1},
	} {
		v, ok := sampleValue(scraped[c.binary][c.name], c.labels)
		if !ok || v < c.atLeast {
			t.Errorf("%s: %s%v is %v (present %v), want at least %v", c.binary, c.name, c.labels, v, ok, c.atLeast)
		}
	}
	for _, h := range []struct {
		families map[string]*dto.MetricFamily
		name     string
		labels   map[string]string
	}{
		{api, "agentry_http_request_duration_seconds", map[string]string{"method": "POST", "route": "/v1/agents/:id/commands"}},
		{worker, "agentry_commands_dispatch_to_start_seconds", map[string]string{"task": "agent:echo"}},
		{worker, "agentry_commands_run_seconds", map[string]string{"task": "agent:echo"}},
	} {
		if n := sampleCount(h.families[h.name], h.labels); n < 2 {
			t.Errorf("%s%v observed %d times, want at least 2", h.name, h.labels, n)
		}
	}
	if tasks := sched["agentry_queue_tasks"]; tasks != nil {
		var states []string
		for _, m := range tasks.Metric {
			states = append(states, labelsOf(m)["state"])
		}
		slices.Sort(states)
		if want := []string{"active", "archived", "pending", "retry", "scheduled"}; !slices.Equal(states, want) {
			t.Errorf("agentry_queue_tasks states %v, want %v", states, want)
		}
	}
}

// allowedLabels are the label names agentry's metrics may have: each takes
// a bounded set of values. Nothing names an agent, a command, a user or a
// request; organizations only on the in-flight gauge, which holds the
// organizations with commands in flight now.
var allowedLabels = map[string]bool{
	"method": true, "route": true, "status": true, // HTTP
	"reason": true,                               // auth failures, denials
	"task":   true, "outcome": true, "org": true, // commands
	"queue": true, "state": true, "kind": true, // queues, reconciler
	"binary": true, "version": true, // build info
}

var (
	metricName = regexp.MustCompile(`^agentry_[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	// timeWord marks a name that measures time and must be in seconds.
	timeWord = regexp.MustCompile(`(^|_)(duration|latency|age|elapsed|time|wait)(_|$)`)
	uuidLike = regexp.MustCompile(`[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-`)
)

func checkConventions(t *testing.T, scraped map[string]map[string]*dto.MetricFamily) {
	seen := map[string]bool{}
	for binary, families := range scraped {
		for name, f := range families {
			if !strings.HasPrefix(name, "agentry_") || seen[name] {
				continue
			}
			seen[name] = true
			where := binary + ": " + name
			if !metricName.MatchString(name) {
				t.Errorf("%s: not a snake_case agentry_ name", where)
			}
			if help := strings.TrimSpace(f.GetHelp()); help == "" || help == name {
				t.Errorf("%s: no HELP text", where)
			}
			isCounter := f.GetType() == dto.MetricType_COUNTER
			if isCounter != strings.HasSuffix(name, "_total") {
				t.Errorf("%s: a %s; counters and only counters end in _total", where, f.GetType())
			}
			base := strings.TrimSuffix(name, "_total")
			if timeWord.MatchString(strings.TrimPrefix(base, "agentry_")) && !strings.HasSuffix(base, "_seconds") {
				t.Errorf("%s: measures time, so it must end in _seconds", where)
			}
			switch f.GetType() {
			case dto.MetricType_HISTOGRAM, dto.MetricType_SUMMARY:
				if !strings.HasSuffix(name, "_seconds") && !strings.HasSuffix(name, "_bytes") {
					t.Errorf("%s: a %s must name its unit (_seconds, _bytes)", where, f.GetType())
				}
			case dto.MetricType_UNTYPED:
				t.Errorf("%s: untyped", where)
			}
			for _, m := range f.Metric {
				for _, l := range m.Label {
					if !allowedLabels[l.GetName()] {
						t.Errorf("%s: label %q is not one of the allowed labels (per-agent, per-command or per-user labels are not)", where, l.GetName())
					}
					if uuidLike.MatchString(l.GetValue()) && l.GetName() != "org" {
						t.Errorf("%s: label %s=%q holds an id", where, l.GetName(), l.GetValue())
					}
				}
			}
		}
	}
}

// checkReferenced: every metric the dashboards and alerts query is exposed.
func checkReferenced(t *testing.T, scraped map[string]map[string]*dto.MetricFamily) {
	exposed := map[string]bool{"up": true} // up is Prometheus's own, per target
	for _, families := range scraped {
		for name, f := range families {
			exposed[name] = true
			switch f.GetType() {
			case dto.MetricType_HISTOGRAM:
				exposed[name+"_bucket"], exposed[name+"_sum"], exposed[name+"_count"] = true, true, true
			case dto.MetricType_SUMMARY:
				exposed[name+"_sum"], exposed[name+"_count"] = true, true
			}
		}
	}
	refs := referencedMetrics(t)
	if len(refs) < 20 {
		t.Fatalf("found only %d metric references in the dashboards and rules; is the extraction broken?", len(refs))
	}
	for name, where := range refs {
		if !exposed[name] {
			slices.Sort(where)
			t.Errorf("%s is not exposed by any binary; referenced by %s", name, strings.Join(slices.Compact(where), ", "))
		}
	}
}

// referencedMetrics maps each metric name the dashboards, the compose
// stack's alerts and the chart's PrometheusRule query to where.
func referencedMetrics(t *testing.T) map[string][]string {
	t.Helper()
	refs := map[string][]string{}
	add := func(where, expr string) {
		for _, name := range promqlMetrics(expr) {
			refs[name] = append(refs[name], where)
		}
	}

	dashboards, err := filepath.Glob(filepath.Join(repoRoot, "deploy/grafana/dashboards/*.json"))
	if err != nil || len(dashboards) == 0 {
		t.Fatalf("no dashboards under deploy/grafana/dashboards (err %v)", err)
	}
	for _, file := range dashboards {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var d any
		if err := json.Unmarshal(data, &d); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		where := "deploy/grafana/dashboards/" + filepath.Base(file)
		walkDashboard(d, func(expr string) { add(where, expr) })
	}

	data, err := os.ReadFile(filepath.Join(repoRoot, "deploy/prometheus/alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct{ Alert, Record, Expr string }
		}
	}
	if err := yaml.Unmarshal(data, &rules); err != nil {
		t.Fatalf("deploy/prometheus/alerts.yml: %v", err)
	}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			add("deploy/prometheus/alerts.yml "+r.Alert+r.Record, r.Expr)
		}
	}

	tmpl, err := os.ReadFile(filepath.Join(repoRoot, "helm/templates/prometheusrule.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, expr := range templateExprs(string(tmpl)) {
		add("helm/templates/prometheusrule.yaml", expr)
	}
	return refs
}

// walkDashboard calls fn with every PromQL query of a Grafana dashboard:
// the panels' targets (expr) and the query variables of the templating.
func walkDashboard(v any, fn func(expr string)) {
	switch v := v.(type) {
	case map[string]any:
		if expr, ok := v["expr"].(string); ok {
			fn(expr)
		}
		if v["type"] == "query" {
			q := v["query"]
			if m, ok := q.(map[string]any); ok {
				q = m["query"]
			}
			if q, ok := q.(string); ok {
				fn(grafanaVariableQuery(q))
			}
		}
		for _, sub := range v {
			walkDashboard(sub, fn)
		}
	case []any:
		for _, sub := range v {
			walkDashboard(sub, fn)
		}
	}
}

var (
	labelValuesQuery = regexp.MustCompile(`^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$`)
	queryResultQuery = regexp.MustCompile(`^\s*query_result\((.*)\)\s*$`)
)

// grafanaVariableQuery returns the PromQL inside a Grafana Prometheus
// variable query (label_values(expr, label), query_result(expr)), or ""
// for the forms that hold none (label_values(label), label_names()).
func grafanaVariableQuery(q string) string {
	if m := labelValuesQuery.FindStringSubmatch(q); m != nil {
		return m[1]
	}
	if m := queryResultQuery.FindStringSubmatch(q); m != nil {
		return m[1]
	}
	return ""
}

var (
	templateAction = regexp.MustCompile(`\{\{.*?\}\}`)
	exprLine       = regexp.MustCompile(`^(\s*)expr:\s*(.*)$`)
)

// templateExprs returns the expr values of a Helm template of rules, with
// the template actions removed (what they print is a label matcher's value
// or a threshold).
func templateExprs(tmpl string) []string {
	lines := strings.Split(tmpl, "\n")
	var out []string
	for i := 0; i < len(lines); i++ {
		m := exprLine.FindStringSubmatch(lines[i])
		if m == nil {
			continue
		}
		if v := strings.TrimSpace(m[2]); !strings.HasPrefix(v, "|") && !strings.HasPrefix(v, ">") {
			out = append(out, templateAction.ReplaceAllString(v, "0"))
			continue
		}
		var block []string
		for i+1 < len(lines) && (strings.TrimSpace(lines[i+1]) == "" || indent(lines[i+1]) > len(m[1])) {
			i++
			block = append(block, lines[i])
		}
		out = append(out, templateAction.ReplaceAllString(strings.Join(block, "\n"), "0"))
	}
	return out
}

func indent(s string) int { return len(s) - len(strings.TrimLeft(s, " ")) }

var (
	grafanaVariable = regexp.MustCompile(`\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z_][A-Za-z0-9_]*\]\]`)
	stringLiteral   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	labelMatchers   = regexp.MustCompile(`\{[^{}]*\}`)
	rangeOrSubquery = regexp.MustCompile(`\[[^\[\]]*\]`)
	labelList       = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)`)
	identifier      = regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*`)
	// promqlWords are PromQL's keywords and literals; functions and
	// aggregations are recognised by the parenthesis after them.
	promqlWords = map[string]bool{
		"and": true, "or": true, "unless": true, "atan2": true, "bool": true, "offset": true,
		"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
		"inf": true, "nan": true,
	}
)

// promqlMetrics returns the metric names a PromQL expression selects. It
// is a scanner, not a parser: it drops Grafana variables, string literals,
// label matchers, ranges and grouping label lists, then keeps the
// identifiers that are neither keywords nor followed by a parenthesis
// (functions and aggregations) nor part of a number or a duration.
func promqlMetrics(expr string) []string {
	expr = grafanaVariable.ReplaceAllString(expr, " ")
	expr = stringLiteral.ReplaceAllString(expr, `""`)
	expr = labelMatchers.ReplaceAllString(expr, " ")
	expr = rangeOrSubquery.ReplaceAllString(expr, " ")
	expr = labelList.ReplaceAllString(expr, " ")
	var names []string
	for _, loc := range identifier.FindAllStringIndex(expr, -1) {
		name := expr[loc[0]:loc[1]]
		if loc[0] > 0 {
			if prev := expr[loc[0]-1]; prev == '.' || prev >= '0' && prev <= '9' {
				continue // 5m, 1e3, 0.5
			}
		}
		if strings.HasPrefix(strings.TrimLeft(expr[loc[1]:], " \t\n"), "(") || promqlWords[strings.ToLower(name)] {
			continue
		}
		names = append(names, name)
	}
	return names
}

func TestPromQLMetrics(t *testing.T) {
	for _, c := range []struct {
		expr string
		want []string
	}{
		{`up`, []string{"up"}},
		{`sum by (job) (rate(agentry_http_requests_total{status=~"5..", route!="/v1/ws"}[5m])) / sum without (status) (rate(agentry_http_requests_total[$__rate_interval]))`,
			[]string{"agentry_http_requests_total", "agentry_http_requests_total"}},
		{`histogram_quantile(0.99, sum by (le) (rate(agentry_http_request_duration_seconds_bucket{job=~"$job"}[5m]))) > 2`,
			[]string{"agentry_http_request_duration_seconds_bucket"}},
		{`absent(up{job="agentry-worker"} == 1) or vector(0) and on() go_goroutines offset 5m > 1e3`, []string{"up", "go_goroutines"}},
		{`label_replace(rate(x_total[1m]), "code", "${1}xx", "status", "(.)..")`, []string{"x_total"}},
		{`a * on (job, instance) group_left (binary) agentry_build_info`, []string{"a", "agentry_build_info"}},
		{`max_over_time(agentry_queue_tasks[1h:5m]) > bool Inf`, []string{"agentry_queue_tasks"}},
		{grafanaVariableQuery(`label_values(agentry_build_info{binary="api"}, job)`), []string{"agentry_build_info"}},
		{grafanaVariableQuery(`label_values(job)`), nil},
	} {
		if got := promqlMetrics(c.expr); !slices.Equal(got, c.want) {
			t.Errorf("promqlMetrics(%q) = %v, want %v", c.expr, got, c.want)
		}
	}
	tmpl := "      rules:\n        - alert: A\n          expr: absent(up{job={{ $job | quote }}} == 1)\n" +
		"        - alert: B\n          expr: |-\n            sum(rate(x_total{ {{- $api }}}[5m]))\n              > {{ .t }}\n          for: 5m\n"
	got := templateExprs(tmpl)
	if len(got) != 2 || !slices.Equal(promqlMetrics(got[0]), []string{"up"}) || !slices.Equal(promqlMetrics(got[1]), []string{"x_total"}) {
		t.Errorf("templateExprs: %q", got)
	}
}

// scrape reads the metrics of p.
func scrape(t *testing.T, p *Proc) map[string]*dto.MetricFamily {
	t.Helper()
	res, err := http.Get(p.URL + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", p.Name, err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("scrape %s: status %d", p.Name, res.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(res.Body)
	if err != nil {
		t.Fatalf("scrape %s: %v", p.Name, err)
	}
	return families
}

func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.Label {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// matching returns the series of f whose labels include want.
func matching(f *dto.MetricFamily, want map[string]string) []*dto.Metric {
	if f == nil {
		return nil
	}
	var out []*dto.Metric
	for _, m := range f.Metric {
		have := labelsOf(m)
		ok := true
		for k, v := range want {
			ok = ok && have[k] == v
		}
		if ok {
			out = append(out, m)
		}
	}
	return out
}

// sampleValue sums the counter or gauge series of f whose labels include
// want; ok is false if there are none.
func sampleValue(f *dto.MetricFamily, want map[string]string) (sum float64, ok bool) {
	for _, m := range matching(f, want) {
		ok = true
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Untyped != nil:
			sum += m.Untyped.GetValue()
		}
	}
	return sum, ok
}

// sampleCount sums the observations of the histogram series of f whose
// labels include want.
func sampleCount(f *dto.MetricFamily, want map[string]string) uint64 {
	var n uint64
	for _, m := range matching(f, want) {
		n += m.GetHistogram().GetSampleCount()
	}
	return n
}
