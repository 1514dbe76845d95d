package helm_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

// composeAlerts is the docker compose stack's alert file, where every alert
// has a promtool unit test.
const composeAlerts = "../deploy/prometheus/alerts.yml"

// chartOnlyAlerts are alerts the chart has and the compose stack does not.
var chartOnlyAlerts = []string{"AgentryQueueBacklog"}

// renderRules renders the chart's PrometheusRule with its default
// thresholds and returns its alerts by name.
func renderRules(t *testing.T) map[string]Rule {
	t.Helper()
	return renderRulesWith(t, `metrics: {prometheusRule: {enabled: true}}`)
}

// renderRulesWith renders the chart's PrometheusRule with values and
// returns its alerts by name.
func renderRulesWith(t *testing.T, values string) map[string]Rule {
	t.Helper()
	r, err := render(t, renderCase{name: "rules", values: values})
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	rules := all[*PrometheusRule](r)
	if len(rules) != 1 {
		t.Fatalf("rendered %d PrometheusRules, want 1", len(rules))
	}
	out := map[string]Rule{}
	for _, g := range rules[0].Spec.Groups {
		for _, rule := range g.Rules {
			if _, dup := out[rule.Alert]; dup {
				t.Errorf("alert %s defined twice", rule.Alert)
			}
			out[rule.Alert] = rule
		}
	}
	return out
}

// unscoped parses expr and returns it, printed, without its job and
// namespace matchers: what is left is the same for the chart and compose.
func unscoped(t *testing.T, where, expr string) string {
	t.Helper()
	e, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
	if err != nil {
		t.Fatalf("%s: bad PromQL %q: %v", where, expr, err)
	}
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			vs.LabelMatchers = slices.DeleteFunc(vs.LabelMatchers, func(m *labels.Matcher) bool {
				return m.Name == "job" || m.Name == "namespace"
			})
		}
		return nil
	})
	return e.String()
}

// TestPrometheusRuleMatchesCompose: the chart carries every alert of
// deploy/prometheus/alerts.yml with the same query (but for the chart's
// job and namespace matchers, and at the chart's default thresholds), the
// same for and the same severity, so the compose stack's unit tests and
// runbooks hold for both.
func TestPrometheusRuleMatchesCompose(t *testing.T) {
	chart := renderRules(t)
	data, err := os.ReadFile(composeAlerts)
	if err != nil {
		t.Fatal(err)
	}
	var compose struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []Rule `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(data, &compose); err != nil {
		t.Fatalf("%s: %v", composeAlerts, err)
	}
	var names []string
	for _, g := range compose.Groups {
		for _, want := range g.Rules {
			if want.Alert == "" {
				continue
			}
			names = append(names, want.Alert)
			got, ok := chart[want.Alert]
			if !ok {
				t.Errorf("the chart has no alert %s (%s has)", want.Alert, composeAlerts)
				continue
			}
			if g, w := unscoped(t, "chart "+want.Alert, got.Expr.String()), unscoped(t, "compose "+want.Alert, want.Expr.String()); g != w {
				t.Errorf("%s: the chart queries\n\t%s\nbut compose\n\t%s", want.Alert, g, w)
			}
			if got.For != want.For {
				t.Errorf("%s: for %s in the chart, %s in compose", want.Alert, got.For, want.For)
			}
			if got.Labels["severity"] != want.Labels["severity"] {
				t.Errorf("%s: severity %s in the chart, %s in compose", want.Alert, got.Labels["severity"], want.Labels["severity"])
			}
		}
	}
	for name := range chart {
		if !slices.Contains(names, name) && !slices.Contains(chartOnlyAlerts, name) {
			t.Errorf("the chart's alert %s is not in %s: add it there, with unit tests", name, composeAlerts)
		}
	}
}

// TestPrometheusRuleScope: every selector of every alert names this
// release's jobs and namespace, so that two installations that share a
// Prometheus do not alert on each other's metrics; every alert says what
// to do.
func TestPrometheusRuleScope(t *testing.T) {
	jobs := []string{fullname + "-api", fullname + "-worker", fullname + "-scheduler"}
	for name, rule := range renderRules(t) {
		e, err := parser.NewParser(parser.Options{}).ParseExpr(rule.Expr.String())
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
			vs, ok := n.(*parser.VectorSelector)
			if !ok {
				return nil
			}
			var job, ns bool
			for _, m := range vs.LabelMatchers {
				switch m.Name {
				case "namespace":
					ns = m.Type == labels.MatchEqual && m.Value == namespace
				case "job":
					job = slices.ContainsFunc(jobs, m.Matches)
					for _, other := range []string{"other-agentry-api", fullname + "-apix"} {
						job = job && !m.Matches(other)
					}
				}
			}
			if !job || !ns {
				t.Errorf("%s: selector %s is not narrowed to the release's jobs %v in namespace %s", name, vs, jobs, namespace)
			}
			return nil
		})
		if rule.For == "" || rule.Labels["severity"] == "" {
			t.Errorf("%s: for %q, severity %q; both are needed", name, rule.For, rule.Labels["severity"])
		}
		if rule.Annotations["summary"] == "" || !strings.Contains(rule.Annotations["description"], "Runbook:") {
			t.Errorf("%s: needs a summary and a description with a Runbook: hint", name)
		}
	}
}

// TestPrometheusRulePromtool gives the rendered rules to promtool, which
// also checks the annotations' templates (the chart escapes them from
// Helm). It needs Debian's prometheus package.
func TestPrometheusRulePromtool(t *testing.T) {
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool is not on PATH: install Debian's prometheus package (apt-get install prometheus) to check the rendered rules")
	}
	r, err := render(t, renderCase{name: "rules", values: `metrics: {prometheusRule: {enabled: true}}`})
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	for _, p := range all[*PrometheusRule](r) {
		data, err := yaml.Marshal(p.Spec)
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(t.TempDir(), "rules.yml")
		if err := os.WriteFile(file, data, 0o644); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		cmd := exec.Command(path, "check", "rules", file)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Errorf("promtool check rules: %v\n%s\n%s", err, out.String(), data)
		}
	}
}

// Workers scaled to zero when idle are no outage: AgentryWorkersDown then
// fires only while tasks wait. Command failures the scheduler's reconciler
// records (a worker lost with no retries left) count too.
func TestRulesFollowTheDeployment(t *testing.T) {
	down := func(values string) string {
		rule, ok := renderRulesWith(t, values)["AgentryWorkersDown"]
		if !ok {
			t.Fatal("no AgentryWorkersDown")
		}
		unscoped(t, "AgentryWorkersDown", rule.Expr.String()) // parses
		return rule.Expr.String()
	}
	if expr := down(`metrics: {prometheusRule: {enabled: true}}`); strings.Contains(expr, "agentry_queue_tasks") {
		t.Errorf("fixed workers: want any absence alerted, got %s", expr)
	}
	toZero := `{metrics: {prometheusRule: {enabled: true}}, worker: {autoscaling: {enabled: true, kind: keda, minReplicas: 0}}}`
	if expr := down(toZero); !strings.Contains(expr, "agentry_queue_tasks{job=") || !strings.Contains(expr, `state="pending"`) {
		t.Errorf("workers scaled to zero: want the alert to need pending tasks, got %s", expr)
	}
	rule := renderRules(t)["AgentryCommandsFailing"]
	failing := rule.Expr.String()
	if !strings.Contains(failing, "-scheduler") {
		t.Errorf("AgentryCommandsFailing leaves out the scheduler's outcomes: %s", failing)
	}
}
