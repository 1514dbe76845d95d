package deploy_test

// Tests of the monitoring files under deploy/: the Prometheus scrape
// configuration, the alert rules and their unit tests, and the Grafana
// dashboards and provisioning. They check what the files promise each other
// and docker-compose.yml; promtool (Debian's prometheus package) checks
// the configuration and the PromQL, and runs the alerts' unit tests. That
// every metric they query is exposed by the binaries is checked by
// internal/e2e's TestMetrics, which scrapes the running binaries.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

const (
	prometheusConfig = "prometheus/prometheus.yml"
	alertRules       = "prometheus/alerts.yml"
	alertTests       = "prometheus/alerts_test.yml"
	dashboardDir     = "grafana/dashboards"
	datasourceFile   = "grafana/provisioning/datasources/prometheus.yml"
	providerFile     = "grafana/provisioning/dashboards/agentry.yml"
)

// promtool runs promtool with args and fails the test with its output if it
// fails. Without promtool on PATH it skips the test: the Go checks of the
// same files run in other tests.
func promtool(t *testing.T, args ...string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool is not on PATH, so promtool's checks are skipped (the Go checks of the same files ran): install Debian's prometheus package, apt-get install prometheus")
	}
	cmd := exec.Command(path, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
}

func readYAML(t *testing.T, file string, v any) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// mountTarget returns where service mounts source (a path relative to
// deploy/), or "".
func mountTarget(t *testing.T, service, source string) string {
	t.Helper()
	s, ok := loadCompose(t).Services[service]
	if !ok {
		t.Fatalf("docker-compose.yml has no %s service", service)
	}
	for _, v := range s.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) >= 2 && filepath.Clean(parts[0]) == filepath.Clean(source) {
			return parts[1]
		}
	}
	return ""
}

// --- Prometheus configuration -------------------------------------------------

type scrapeConfig struct {
	JobName       string `yaml:"job_name"`
	StaticConfigs []struct {
		Targets []string `yaml:"targets"`
	} `yaml:"static_configs"`
	DNSSDConfigs []struct {
		Names           []string `yaml:"names"`
		Type            string   `yaml:"type"`
		Port            int      `yaml:"port"`
		RefreshInterval string   `yaml:"refresh_interval"`
	} `yaml:"dns_sd_configs"`
}

type promConfig struct {
	Global struct {
		ScrapeInterval     string `yaml:"scrape_interval"`
		ScrapeTimeout      string `yaml:"scrape_timeout"`
		EvaluationInterval string `yaml:"evaluation_interval"`
	} `yaml:"global"`
	RuleFiles     []string       `yaml:"rule_files"`
	ScrapeConfigs []scrapeConfig `yaml:"scrape_configs"`
}

// TestMetricsPrometheusConfig: Prometheus scrapes each binary on the port
// its container serves (the one its health check calls), finds the
// replicas of the scalable services through Docker's DNS, and loads the
// alert rules from where compose mounts them.
func TestMetricsPrometheusConfig(t *testing.T) {
	var cfg promConfig
	readYAML(t, prometheusConfig, &cfg)

	if got := mountTarget(t, "prometheus", "./"+prometheusConfig); got != "/etc/prometheus/prometheus.yml" {
		t.Errorf("compose mounts %s at %q; the prometheus command reads /etc/prometheus/prometheus.yml", prometheusConfig, got)
	}
	rulesAt := mountTarget(t, "prometheus", "./"+alertRules)
	if rulesAt == "" {
		t.Errorf("compose does not mount %s into prometheus", alertRules)
	}
	if !slices.Equal(cfg.RuleFiles, []string{rulesAt}) {
		t.Errorf("rule_files %q, want [%q] (where compose mounts %s)", cfg.RuleFiles, rulesAt, alertRules)
	}

	compose := loadCompose(t)
	healthPort := regexp.MustCompile(`^https?://127\.0\.0\.1:(\d+)/`)
	jobs := map[string]scrapeConfig{}
	for _, sc := range cfg.ScrapeConfigs {
		if _, dup := jobs[sc.JobName]; dup {
			t.Errorf("job %s: scraped twice", sc.JobName)
		}
		jobs[sc.JobName] = sc
	}
	for _, c := range []struct {
		service string
		dns     bool // replicas scale, so each must be found and scraped
	}{{"api", false}, {"worker", true}, {"scheduler", true}} {
		job := "agentry-" + c.service
		sc, ok := jobs[job]
		if !ok {
			t.Errorf("no scrape job %s", job)
			continue
		}
		var port string
		if hc := compose.Services[c.service].Healthcheck; hc != nil {
			for _, arg := range hc.Test {
				if m := healthPort.FindStringSubmatch(arg); m != nil {
					port = m[1]
				}
			}
		}
		if port == "" {
			t.Errorf("%s: no http://127.0.0.1:PORT/ health check in docker-compose.yml to learn its port from", c.service)
			continue
		}
		var targets []string
		for _, s := range sc.StaticConfigs {
			targets = append(targets, s.Targets...)
		}
		for _, d := range sc.DNSSDConfigs {
			if d.Type != "A" {
				t.Errorf("job %s: dns_sd_configs type %q, want A (Docker's DNS answers A records)", job, d.Type)
			}
			for _, name := range d.Names {
				targets = append(targets, fmt.Sprintf("%s:%d", name, d.Port))
			}
		}
		if want := []string{c.service + ":" + port}; !slices.Equal(targets, want) {
			t.Errorf("job %s: targets %q, want %q", job, targets, want)
		}
		if c.dns && len(sc.DNSSDConfigs) == 0 {
			t.Errorf("job %s: %s scales with --scale, so find its replicas with dns_sd_configs", job, c.service)
		}
	}

	interval, err := time.ParseDuration(cfg.Global.ScrapeInterval)
	if err != nil {
		t.Fatalf("global.scrape_interval: %v", err)
	}
	var ds datasources
	readYAML(t, datasourceFile, &ds)
	for _, d := range ds.Datasources {
		if d.JSONData.TimeInterval != "" && d.JSONData.TimeInterval != cfg.Global.ScrapeInterval {
			t.Errorf("%s: data source %s timeInterval %s, but Prometheus scrapes every %s", datasourceFile, d.Name, d.JSONData.TimeInterval, interval)
		}
	}

	t.Run("promtool", func(t *testing.T) {
		// --syntax-only: rule_files name the path inside the container.
		promtool(t, "check", "config", "--syntax-only", prometheusConfig)
	})
}

// --- alert rules --------------------------------------------------------------

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

type ruleTests struct {
	RuleFiles          []string `yaml:"rule_files"`
	EvaluationInterval string   `yaml:"evaluation_interval"`
	Tests              []struct {
		Name        string `yaml:"name"`
		Interval    string `yaml:"interval"`
		InputSeries []struct {
			Series string `yaml:"series"`
			Values string `yaml:"values"`
		} `yaml:"input_series"`
		AlertRuleTests []struct {
			EvalTime  string `yaml:"eval_time"`
			Alertname string `yaml:"alertname"`
			ExpAlerts []struct {
				ExpLabels      map[string]string `yaml:"exp_labels"`
				ExpAnnotations map[string]string `yaml:"exp_annotations"`
			} `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

// TestMetricsAlertRules: every alert waits (for), says how bad it is and
// what to do, and promtool accepts the file.
func TestMetricsAlertRules(t *testing.T) {
	var rules ruleFile
	readYAML(t, alertRules, &rules)
	seen := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Record != "" {
				continue
			}
			where := g.Name + "/" + r.Alert
			if seen[r.Alert] {
				t.Errorf("%s: alert defined twice", where)
			}
			seen[r.Alert] = true
			if !strings.HasPrefix(r.Alert, "Agentry") {
				t.Errorf("%s: alert names start with Agentry", where)
			}
			if d, err := time.ParseDuration(r.For); err != nil || d <= 0 {
				t.Errorf("%s: for %q; an alert waits out blips", where, r.For)
			}
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: severity %q, want critical or warning", where, s)
			}
			for _, a := range []string{"summary", "description"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("%s: no %s annotation", where, a)
				}
			}
			if !strings.Contains(r.Annotations["description"], "Runbook:") {
				t.Errorf("%s: the description has no Runbook: hint", where)
			}
		}
	}
	for _, want := range []string{
		"AgentryAPIHighErrorRatio", "AgentryAPIHighLatencyP99", "AgentryQueueBacklogOld",
		"AgentryNoSchedulerLeader", "AgentryReconcilerRepairing", "AgentryWorkersDown",
	} {
		if !seen[want] {
			t.Errorf("%s: no alert %s", alertRules, want)
		}
	}
	t.Run("promtool", func(t *testing.T) { promtool(t, "check", "rules", alertRules) })
}

// TestMetricsAlertUnitTests: alerts_test.yml tests alerts.yml, with a case
// where each alert fires and one where it does not; promtool runs them.
func TestMetricsAlertUnitTests(t *testing.T) {
	var rules ruleFile
	readYAML(t, alertRules, &rules)
	var tests ruleTests
	readYAML(t, alertTests, &tests)
	if !slices.Equal(tests.RuleFiles, []string{filepath.Base(alertRules)}) {
		t.Errorf("%s: rule_files %q, want [%s]", alertTests, tests.RuleFiles, filepath.Base(alertRules))
	}
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range tests.Tests {
		for _, a := range tc.AlertRuleTests {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			} else {
				quiet[a.Alertname] = true
			}
		}
	}
	alerts := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts[r.Alert] = true
			if !fires[r.Alert] {
				t.Errorf("%s: no case where %s fires", alertTests, r.Alert)
			}
			if !quiet[r.Alert] {
				t.Errorf("%s: no case where %s does not fire", alertTests, r.Alert)
			}
		}
	}
	for name := range fires {
		if !alerts[name] {
			t.Errorf("%s: tests %s, which %s does not define", alertTests, name, alertRules)
		}
	}
	t.Run("promtool", func(t *testing.T) { promtool(t, "test", "rules", alertTests) })
}

// --- Grafana ------------------------------------------------------------------

type datasources struct {
	APIVersion  int `yaml:"apiVersion"`
	Datasources []struct {
		Name      string `yaml:"name"`
		UID       string `yaml:"uid"`
		Type      string `yaml:"type"`
		Access    string `yaml:"access"`
		URL       string `yaml:"url"`
		IsDefault bool   `yaml:"isDefault"`
		Editable  bool   `yaml:"editable"`
		JSONData  struct {
			HTTPMethod     string `yaml:"httpMethod"`
			TimeInterval   string `yaml:"timeInterval"`
			PrometheusType string `yaml:"prometheusType"`
		} `yaml:"jsonData"`
	} `yaml:"datasources"`
}

type dashboardProviders struct {
	APIVersion int `yaml:"apiVersion"`
	Providers  []struct {
		Name                  string `yaml:"name"`
		Folder                string `yaml:"folder"`
		Type                  string `yaml:"type"`
		DisableDeletion       bool   `yaml:"disableDeletion"`
		AllowUIUpdates        bool   `yaml:"allowUiUpdates"`
		UpdateIntervalSeconds int    `yaml:"updateIntervalSeconds"`
		Options               struct {
			Path                      string `yaml:"path"`
			FoldersFromFilesStructure bool   `yaml:"foldersFromFilesStructure"`
		} `yaml:"options"`
	} `yaml:"providers"`
}

// dashboard is the part of Grafana's dashboard JSON the tests read.
type dashboard struct {
	UID           string   `json:"uid"`
	Title         string   `json:"title"`
	SchemaVersion int      `json:"schemaVersion"`
	ID            *int     `json:"id"`
	Tags          []string `json:"tags"`
	Panels        []panel  `json:"panels"`
	Templating    struct {
		List []struct {
			Name    string          `json:"name"`
			Type    string          `json:"type"`
			Query   json.RawMessage `json:"query"`
			Current struct {
				Value any `json:"value"`
			} `json:"current"`
			Datasource *datasourceRef `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int                      `json:"id"`
	Type       string                   `json:"type"`
	Title      string                   `json:"title"`
	GridPos    struct{ H, W, X, Y int } `json:"gridPos"`
	Datasource *datasourceRef           `json:"datasource"`
	Targets    []struct {
		RefID      string         `json:"refId"`
		Expr       string         `json:"expr"`
		Datasource *datasourceRef `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// wantDashboards are the dashboards the issue asks for.
var wantDashboards = []string{"api.json", "commands-and-queues.json", "overview.json", "realtime.json"}

func loadDashboards(t *testing.T) map[string]dashboard {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dashboardDir, "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]dashboard{}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var d dashboard
		if err := json.Unmarshal(data, &d); err != nil {
			t.Errorf("%s: not a dashboard: %v", file, err)
			continue
		}
		out[filepath.Base(file)] = d
	}
	var names []string
	for name := range out {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, want := range wantDashboards {
		if _, ok := out[want]; !ok {
			t.Errorf("no %s/%s (have %q)", dashboardDir, want, names)
		}
	}
	return out
}

// allPanels returns the panels of d, those in collapsed rows included.
func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

// TestMetricsGrafanaProvisioning: Grafana finds the Prometheus data source
// the dashboards default to, and loads the dashboards from where compose
// mounts them.
func TestMetricsGrafanaProvisioning(t *testing.T) {
	provisioning := mountTarget(t, "grafana", "./grafana/provisioning")
	if provisioning == "" {
		t.Fatal("compose does not mount ./grafana/provisioning into grafana")
	}
	if env := loadCompose(t).Services["grafana"].Environment["GF_PATHS_PROVISIONING"]; env != "" && env != provisioning {
		t.Errorf("grafana: GF_PATHS_PROVISIONING %q, but provisioning is mounted at %q", env, provisioning)
	}
	var ds datasources
	readYAML(t, datasourceFile, &ds)
	if ds.APIVersion != 1 || len(ds.Datasources) != 1 {
		t.Fatalf("%s: want apiVersion 1 and one data source, got %+v", datasourceFile, ds)
	}
	prom := ds.Datasources[0]
	if prom.Type != "prometheus" || prom.UID == "" || prom.URL != "http://prometheus:9090" {
		t.Errorf("%s: %+v, want a prometheus data source with a uid at http://prometheus:9090 (the compose service)", datasourceFile, prom)
	}

	var providers dashboardProviders
	readYAML(t, providerFile, &providers)
	dashboardsAt := mountTarget(t, "grafana", "./"+dashboardDir)
	if dashboardsAt == "" {
		t.Fatalf("compose does not mount ./%s into grafana", dashboardDir)
	}
	if len(providers.Providers) != 1 || providers.Providers[0].Type != "file" || providers.Providers[0].Options.Path != dashboardsAt {
		t.Errorf("%s: %+v, want one file provider reading %s", providerFile, providers.Providers, dashboardsAt)
	}

	for file, d := range loadDashboards(t) {
		var found bool
		for _, v := range d.Templating.List {
			if v.Type == "datasource" && v.Name == "datasource" {
				found = true
				if v.Current.Value != prom.UID {
					t.Errorf("%s: the datasource variable defaults to %v, want the provisioned uid %q", file, v.Current.Value, prom.UID)
				}
			}
		}
		if !found {
			t.Errorf("%s: no datasource variable", file)
		}
	}
}

// TestMetricsDashboards: each dashboard is a valid Grafana dashboard with
// a unique uid, unique panel ids, panels that fit the 24-column grid
// without overlapping, and every query on the datasource variable.
func TestMetricsDashboards(t *testing.T) {
	uids := map[string]string{}
	for file, d := range loadDashboards(t) {
		if d.UID == "" || d.Title == "" {
			t.Errorf("%s: uid %q, title %q; both are needed", file, d.UID, d.Title)
		}
		if other, dup := uids[d.UID]; dup {
			t.Errorf("%s: uid %q is also %s's", file, d.UID, other)
		}
		uids[d.UID] = file
		if d.ID != nil {
			t.Errorf("%s: id %d; provisioned dashboards have id null (Grafana assigns it)", file, *d.ID)
		}
		if d.SchemaVersion < 39 {
			t.Errorf("%s: schemaVersion %d, want 39 or later", file, d.SchemaVersion)
		}
		if !slices.Contains(d.Tags, "agentry") {
			t.Errorf("%s: not tagged agentry (the dashboards' links list that tag)", file)
		}
		for _, v := range d.Templating.List {
			if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != "${datasource}") {
				t.Errorf("%s: variable %s does not query ${datasource}", file, v.Name)
			}
		}
		ids := map[int]string{}
		type cell struct{ x, y int }
		taken := map[cell]string{}
		queries := 0
		for _, p := range allPanels(d.Panels) {
			where := fmt.Sprintf("%s: panel %d %q", file, p.ID, p.Title)
			if p.ID <= 0 {
				t.Errorf("%s: no id", where)
			} else if other, dup := ids[p.ID]; dup {
				t.Errorf("%s: id also used by %q", where, other)
			}
			ids[p.ID] = p.Title
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
				t.Errorf("%s: gridPos %+v is outside the 24-column grid", where, g)
			}
			for x := g.X; x < g.X+g.W; x++ {
				for y := g.Y; y < g.Y+g.H; y++ {
					if other, ok := taken[cell{x, y}]; ok {
						t.Errorf("%s: overlaps %q at column %d, row %d", where, other, x, y)
						x, y = g.X+g.W, g.Y+g.H // once per pair is enough
						continue
					}
					taken[cell{x, y}] = p.Title
				}
			}
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
				t.Errorf("%s: datasource %+v, want uid ${datasource}", where, p.Datasource)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: no query", where)
			}
			refs := map[string]bool{}
			for _, q := range p.Targets {
				queries++
				if strings.TrimSpace(q.Expr) == "" {
					t.Errorf("%s: target %s has no expr", where, q.RefID)
				}
				if q.Datasource != nil && q.Datasource.UID != "${datasource}" {
					t.Errorf("%s: target %s queries %+v, want uid ${datasource}", where, q.RefID, q.Datasource)
				}
				if refs[q.RefID] {
					t.Errorf("%s: refId %s twice", where, q.RefID)
				}
				refs[q.RefID] = true
			}
		}
		if queries == 0 {
			t.Errorf("%s: no queries", file)
		}
	}
}

// grafanaVariables are the variables Grafana replaces in a query before it
// reaches Prometheus, with a value of the right kind.
var grafanaVariables = strings.NewReplacer(
	"$__rate_interval", "1m", "$__interval", "15s", "$__range", "1h",
	"$datasource", "x", "${datasource}", "x",
)

var otherVariable = regexp.MustCompile(`\$\{\w+\}|\$\w+`)

// TestMetricsDashboardQueries gives promtool every dashboard query, as a
// recording rule, to parse: a typo in a panel's PromQL fails here rather
// than as an empty panel.
func TestMetricsDashboardQueries(t *testing.T) {
	type rule struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	type group struct {
		Name  string `yaml:"name"`
		Rules []rule `yaml:"rules"`
	}
	var groups []group
	for file, d := range loadDashboards(t) {
		g := group{Name: file}
		for _, p := range allPanels(d.Panels) {
			for _, q := range p.Targets {
				expr := otherVariable.ReplaceAllString(grafanaVariables.Replace(q.Expr), ".*")
				g.Rules = append(g.Rules, rule{Record: fmt.Sprintf("dashboard:panel_%d_%s", p.ID, strings.ToLower(q.RefID)), Expr: expr})
			}
		}
		groups = append(groups, g)
	}
	slices.SortFunc(groups, func(a, b group) int { return strings.Compare(a.Name, b.Name) })
	data, err := yaml.Marshal(map[string]any{"groups": groups})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "dashboard-queries.yml")
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	promtool(t, "check", "rules", "--lint=none", file)
}
