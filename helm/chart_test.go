package helm_test

import (
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

const (
	releaseName = "demo"
	namespace   = "agentry"
	// fullname is the name prefix of releaseName's objects.
	fullname = releaseName + "-agentry"
)

// kubeVersion is the cluster version the chart is rendered and linted for.
var kubeVersion = chartutil.KubeVersion{Version: "v1.33.0", Major: "1", Minor: "33"}

// kinds maps the apiVersion/kind of every object the chart may render to
// the Go type it must decode into strictly.
var kinds = map[string]func() any{
	"v1/ConfigMap":                            func() any { return new(corev1.ConfigMap) },
	"v1/Secret":                               func() any { return new(corev1.Secret) },
	"v1/Service":                              func() any { return new(corev1.Service) },
	"v1/ServiceAccount":                       func() any { return new(corev1.ServiceAccount) },
	"apps/v1/Deployment":                      func() any { return new(appsv1.Deployment) },
	"batch/v1/Job":                            func() any { return new(batchv1.Job) },
	"policy/v1/PodDisruptionBudget":           func() any { return new(policyv1.PodDisruptionBudget) },
	"autoscaling/v2/HorizontalPodAutoscaler":  func() any { return new(autoscalingv2.HorizontalPodAutoscaler) },
	"networking.k8s.io/v1/Ingress":            func() any { return new(networkingv1.Ingress) },
	"keda.sh/v1alpha1/ScaledObject":           func() any { return new(ScaledObject) },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return new(ServiceMonitor) },
	"monitoring.coreos.com/v1/PrometheusRule": func() any { return new(PrometheusRule) },
}

// renderCase is one set of values the chart must render.
type renderCase struct {
	name string
	// files are values files, applied in order like helm's -f.
	files []string
	// values is YAML applied last, like --set.
	values string
	// kinds, if set, is how many objects of each kind the case renders
	// (kinds not listed: none).
	kinds map[string]int
	// bare renders without testSecrets, which every other case starts
	// from (production, the default, refuses to render without them).
	bare bool
}

// testSecrets are the settings a production install must be given.
const testSecrets = `
secrets:
  databaseUrl: postgres://agentry:pw@db:5432/agentry?sslmode=require
  redisUrl: rediss://:pw@redis:6379/0
  jwtSecret: 0123456789abcdef0123456789abcdef0123
  secretsKey: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
`

// defaultKinds is what the default values render.
var defaultKinds = map[string]int{
	"ConfigMap": 2, "Secret": 2, "ServiceAccount": 1, "Service": 3, "Deployment": 3,
	"Job": 1, "PodDisruptionBudget": 3, "HorizontalPodAutoscaler": 1,
}

func with(base map[string]int, changes map[string]int) map[string]int {
	out := maps.Clone(base)
	for kind, n := range changes {
		if n == 0 {
			delete(out, kind)
		} else {
			out[kind] = n
		}
	}
	return out
}

func renderCases(t *testing.T) []renderCase {
	t.Helper()
	cases := []renderCase{
		{name: "defaults", kinds: defaultKinds},
		{name: "production settings from extraEnvFrom", bare: true, values: `
extraEnvFrom: [{secretRef: {name: agentry-env}}]`},
	}
	examples, err := filepath.Glob("examples/*.yaml")
	if err != nil || len(examples) == 0 {
		t.Fatalf("no example values files under examples/ (err %v)", err)
	}
	for _, file := range examples {
		// With the secret settings each example's header passes on the
		// command line.
		cases = append(cases, renderCase{name: "example " + filepath.Base(file), files: []string{file}, values: `
secrets: {adminPassword: a long first password}`})
	}
	return append(cases,
		renderCase{
			name: "ingress",
			values: `
api:
  ingress:
    enabled: true
    className: nginx
    hosts:
      - paths: [{path: /}]
      - host: agentry.example.com
        paths: [{path: /, pathType: Prefix}]
      - host: api.example.com
        paths: [{path: /v1, pathType: Prefix}, {path: /docs}]
    tls: [{secretName: agentry-tls, hosts: [agentry.example.com, api.example.com]}]
`,
			kinds: with(defaultKinds, map[string]int{"Ingress": 1}),
		},
		renderCase{
			name: "keda",
			values: `
worker:
  autoscaling:
    enabled: true
    kind: keda
    minReplicas: 0
    maxReplicas: 50
    keda:
      authenticationRef: prometheus-auth
      activationThreshold: 5
      fallback: {failureThreshold: 3, replicas: 4}
`,
			kinds: with(defaultKinds, map[string]int{"ScaledObject": 1}),
		},
		renderCase{
			name: "worker hpa on an external metric",
			values: `
worker:
  autoscaling:
    enabled: true
    kind: hpa
    targetQueueDepthPerReplica: 30
    hpa:
      metricSelector: {matchLabels: {namespace: agentry}}
`,
			kinds: with(defaultKinds, map[string]int{"HorizontalPodAutoscaler": 2}),
		},
		renderCase{
			name: "prometheus operator",
			values: `
metrics:
  serviceMonitor: {enabled: true, labels: {release: prometheus}, interval: 15s}
  prometheusRule:
    enabled: true
    labels: {release: prometheus}
    additionalRules:
      - record: agentry:queue_depth
        expr: sum(agentry_queue_tasks{state="pending"}) + sum(agentry_commands_waiting)
`,
			kinds: with(defaultKinds, map[string]int{"ServiceMonitor": 1, "PrometheusRule": 1}),
		},
		renderCase{
			name: "existing secret with admin seeding",
			values: `
existingSecret: agentry-settings
config: {adminEmail: admin@example.com}
migrations: {seedAdmin: true}
`,
			// No chart Secret and no hook Secret: both use the existing one.
			kinds: with(defaultKinds, map[string]int{"Secret": 0}),
		},
		renderCase{
			name: "everything on",
			values: `
nameOverride: platform
commonLabels: {team: agents}
image: {digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
imagePullSecrets: [{name: regcred}]
serviceAccount: {create: false, name: agentry-workload}
config:
  env: production
  publicUrl: https://agentry.example.com
  allowedOrigins: [https://agentry.example.com, https://app.example.com]
  trustedProxies: [10.0.0.0/8, 192.168.0.0/16]
  egressAllowCidrs: [10.20.0.0/16]
  adminEmail: admin@example.com
  shutdownTimeoutSeconds: 120
  extra: {AGENTRY_COMMAND_TIMEOUT: 10m, AGENTRY_DB_MAX_OPEN_CONNS: 40, AGENTRY_MAX_BODY_BYTES: 2097152, AGENTRY_EVENT_STREAM_MAX_LEN: 5000000}
secrets:
  databaseUrl: postgres://agentry:pw@db:5432/agentry?sslmode=require
  redisUrl: rediss://:pw@redis:6379/0
  jwtSecret: 0123456789abcdef0123456789abcdef0123
  secretsKey: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
  adminPassword: a long first password
extraEnv: [{name: GOMAXPROCS, value: "2"}]
extraEnvFrom: [{configMapRef: {name: proxy-settings}}]
podAnnotations: {example.com/team: agents}
podLabels: {tier: backend}
api:
  podAnnotations: {example.com/api: "yes"}
  extraEnv: [{name: GOMEMLIMIT, value: 400MiB}]
  ingress: {enabled: true}
  autoscaling: {targetMemoryUtilizationPercentage: 80}
worker:
  autoscaling: {enabled: true}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions: [{key: workload, operator: In, values: [workers]}]
migrations:
  seedAdmin: true
  nodeSelector: {kubernetes.io/os: linux}
metrics:
  serviceMonitor: {enabled: true}
  prometheusRule: {enabled: true}
`,
			kinds: with(defaultKinds, map[string]int{
				"ServiceAccount": 0, "Ingress": 1, "ScaledObject": 1, "ServiceMonitor": 1, "PrometheusRule": 1,
			}),
		},
		renderCase{
			name: "optional parts off",
			values: `
fullnameOverride: demo-agentry
config: {env: development}
api:
  autoscaling: {enabled: false}
  preStopSleepSeconds: 0
  pdb: {enabled: false}
  topologySpreadConstraints: []
worker: {pdb: {enabled: false}}
scheduler: {pdb: {enabled: false}}
migrations: {enabled: false}
`,
			kinds: with(defaultKinds, map[string]int{
				"ConfigMap": 1, "Secret": 1, "Job": 0, "PodDisruptionBudget": 0, "HorizontalPodAutoscaler": 0,
			}),
		},
	)
}

// TestRender renders every case, decodes every object strictly and checks
// what the chart promises.
func TestRender(t *testing.T) {
	for _, c := range renderCases(t) {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r, err := render(t, c)
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			if c.kinds != nil {
				got := map[string]int{}
				for _, o := range r.objects {
					got[o.kind]++
				}
				if !maps.Equal(got, c.kinds) {
					t.Errorf("objects by kind: got %v, want %v", got, c.kinds)
				}
			}
			checkRelease(t, r)
		})
	}
}

// TestRenderRejects checks that values which cannot work stop the render
// with a message naming the value: values.schema.json checks each value,
// agentry.validate the ones that depend on each other.
func TestRenderRejects(t *testing.T) {
	cases := []struct {
		name, values, want string
		bare               bool
	}{
		// values.schema.json
		{"unknown env", `config: {env: staging}`, "/config/env", false},
		{"short jwt secret", `secrets: {jwtSecret: short}`, "/secrets/jwtSecret", false},
		{"secrets key not 32 bytes", `secrets: {secretsKey: c2hvcnQ=}`, "/secrets/secretsKey", false},
		{"unknown autoscaling kind", `worker: {autoscaling: {enabled: true, kind: vpa}}`, "/worker/autoscaling/kind", false},
		{"extra setting not AGENTRY_", `config: {extra: {command_timeout: 5m}}`, "command_timeout", false},
		{"no drain", `config: {shutdownTimeoutSeconds: 0}`, "/config/shutdownTimeoutSeconds", false},
		{"misspelt value", `worker: {autoscalling: {enabled: true}}`, "autoscalling", false},
		{"string for a number", `api: {replicas: "2"}`, "/api/replicas", false},
		// agentry.validate
		{"hpa to zero", `worker: {autoscaling: {enabled: true, kind: hpa, minReplicas: 0}}`, "worker.autoscaling.minReplicas", false},
		{"api hpa without target", `api: {autoscaling: {targetCPUUtilizationPercentage: 0}}`, "api.autoscaling", false},
		{"seed without email", `migrations: {seedAdmin: true}`, "config.adminEmail", false},
		{"production without secrets", `config: {env: production}`, "secrets.databaseUrl, secrets.jwtSecret, secrets.redisUrl, secrets.secretsKey", true},
		{"production with some secrets in extraEnv", `
config: {env: production}
extraEnv: [{name: AGENTRY_DATABASE_URL, value: "postgres://x@db/agentry"}, {name: AGENTRY_JWT_SECRET, valueFrom: {secretKeyRef: {name: jwt, key: secret}}}]`, "secrets.redisUrl, secrets.secretsKey (", true},
		{"production without a secrets key", `
config: {env: production}
secrets:
  databaseUrl: postgres://agentry:pw@db:5432/agentry?sslmode=require
  redisUrl: rediss://:pw@redis:6379/0
  jwtSecret: 0123456789abcdef0123456789abcdef0123`, "secrets.secretsKey", true},
		{"production seed without password", `
config: {env: production, adminEmail: admin@example.com}
secrets:
  databaseUrl: postgres://agentry:pw@db:5432/agentry?sslmode=require
  redisUrl: rediss://:pw@redis:6379/0
  jwtSecret: 0123456789abcdef0123456789abcdef0123
  secretsKey: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
migrations: {seedAdmin: true}`, "secrets.adminPassword", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, err := render(t, renderCase{name: c.name, values: c.values, bare: c.bare})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("render error: got %v, want one mentioning %q", err, c.want)
			}
		})
	}
}

// TestLint runs helm lint for the default values and every example.
func TestLint(t *testing.T) {
	cases := renderCases(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			vals, err := userValues(c)
			if err != nil {
				t.Fatal(err)
			}
			linter := lint.AllWithKubeVersion(".", vals, namespace, &kubeVersion)
			for _, msg := range linter.Messages {
				if msg.Severity >= support.WarningSev {
					t.Errorf("helm lint: %s", msg)
				}
			}
		})
	}
}

// TestChartKubeVersion checks that the chart accepts the Kubernetes version
// the tests render for.
func TestChartKubeVersion(t *testing.T) {
	ch, err := loader.Load(".")
	if err != nil {
		t.Fatal(err)
	}
	if !chartutil.IsCompatibleRange(ch.Metadata.KubeVersion, kubeVersion.Version) {
		t.Errorf("Chart.yaml kubeVersion %q excludes %s", ch.Metadata.KubeVersion, kubeVersion.Version)
	}
}

// object is one rendered Kubernetes object.
type object struct {
	kind  string
	name  string
	meta  metav1.Object
	typed any // *corev1.Service, *ScaledObject, ...
}

// hook reports the object's helm.sh/hook events and weight; events is empty
// for objects that are part of the release proper.
func (o object) hook() (events []string, weight string) {
	annotations := o.meta.GetAnnotations()
	if h := annotations["helm.sh/hook"]; h != "" {
		events = strings.Split(h, ",")
	}
	return events, annotations["helm.sh/hook-weight"]
}

type release struct {
	objects []object
	notes   string
	values  chartutil.Values // .Values as the templates saw them
}

func userValues(c renderCase) (map[string]any, error) {
	vals := map[string]any{}
	if !c.bare {
		v, err := chartutil.ReadValues([]byte(testSecrets))
		if err != nil {
			return nil, err
		}
		vals = v
	}
	for _, file := range c.files {
		v, err := chartutil.ReadValuesFile(file)
		if err != nil {
			return nil, err
		}
		mergeValues(vals, v)
	}
	v, err := chartutil.ReadValues([]byte(c.values))
	if err != nil {
		return nil, fmt.Errorf("case values: %w", err)
	}
	mergeValues(vals, v)
	return vals, nil
}

// mergeValues merges src into dst, maps recursively, as helm merges -f files.
func mergeValues(dst, src map[string]any) {
	for k, v := range src {
		if sub, ok := v.(map[string]any); ok {
			if d, ok := dst[k].(map[string]any); ok {
				mergeValues(d, sub)
				continue
			}
		}
		dst[k] = v
	}
}

// render renders the chart as `helm install` would, in strict mode (a
// template reading a value that does not exist fails), and decodes every
// object strictly into its Go type.
func render(t *testing.T, c renderCase) (*release, error) {
	t.Helper()
	ch, err := loader.Load(".")
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	vals, err := userValues(c)
	if err != nil {
		t.Fatal(err)
	}
	caps := chartutil.DefaultCapabilities.Copy()
	caps.KubeVersion = kubeVersion
	top, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: namespace, Revision: 1, IsInstall: true,
	}, caps)
	if err != nil {
		return nil, err
	}
	files, err := engine.Engine{Strict: true}.Render(ch, top)
	if err != nil {
		return nil, err
	}
	r := &release{}
	r.values, _ = top.Table("Values")
	for _, source := range slices.Sorted(maps.Keys(files)) {
		content := files[source]
		switch {
		case strings.HasSuffix(source, "NOTES.txt"):
			r.notes = content
			continue
		case strings.HasPrefix(filepath.Base(source), "_"):
			continue
		}
		for _, doc := range releaseutil.SplitManifests(content) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			o, err := decode(doc)
			if err != nil {
				t.Errorf("%s: %v\n%s", source, err, doc)
				continue
			}
			r.objects = append(r.objects, o)
		}
	}
	return r, nil
}

// decode decodes one YAML document into the Go type of its kind, failing on
// unknown or duplicate fields.
func decode(doc string) (object, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
		return object{}, err
	}
	newObject, ok := kinds[tm.APIVersion+"/"+tm.Kind]
	if !ok {
		return object{}, fmt.Errorf("%s %s: a kind the tests do not know", tm.APIVersion, tm.Kind)
	}
	typed := newObject()
	if err := yaml.UnmarshalStrict([]byte(doc), typed); err != nil {
		return object{}, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	// Every kind embeds ObjectMeta.
	meta := typed.(metav1.Object)
	return object{kind: tm.Kind, name: meta.GetName(), meta: meta, typed: typed}, nil
}

// all returns the rendered objects of Go type T.
func all[T any](r *release) []T {
	var out []T
	for _, o := range r.objects {
		if v, ok := o.typed.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// find returns the object of the given kind and name, or nil.
func (r *release) find(kind, name string) *object {
	for i, o := range r.objects {
		if o.kind == kind && o.name == name {
			return &r.objects[i]
		}
	}
	return nil
}

func (r *release) value(path string) any {
	v, err := r.values.PathValue(path)
	if err != nil {
		return nil
	}
	return v
}

// settings returns the AGENTRY_* variables of the release's ConfigMap.
func (r *release) settings(t *testing.T) map[string]string {
	t.Helper()
	o := r.find("ConfigMap", r.fullname())
	if o == nil {
		t.Fatalf("no ConfigMap %s", r.fullname())
	}
	return o.typed.(*corev1.ConfigMap).Data
}

// fullname is the release's name prefix, as the chart computes it for the
// overrides the cases use.
func (r *release) fullname() string {
	if f, _ := r.value("fullnameOverride").(string); f != "" {
		return f
	}
	if n, _ := r.value("nameOverride").(string); n != "" {
		return releaseName + "-" + n
	}
	return fullname
}

func checkRelease(t *testing.T, r *release) {
	t.Helper()
	checkMetadata(t, r)
	checkDeployments(t, r)
	checkMigrationJob(t, r)
	checkServices(t, r)
	checkScalers(t, r)
	checkDisruptionBudgets(t, r)
	checkMonitoring(t, r)
	checkSecrets(t, r)
	if strings.TrimSpace(r.notes) == "" {
		t.Error("NOTES.txt renders empty")
	}
}

// checkMetadata: names are valid and unique, labels are valid and carry the
// standard app.kubernetes.io labels, and nothing hard-codes a namespace.
func checkMetadata(t *testing.T, r *release) {
	t.Helper()
	seen := map[string]bool{}
	for _, o := range r.objects {
		id := o.kind + "/" + o.name
		if seen[id] {
			t.Errorf("%s rendered twice", id)
		}
		seen[id] = true
		nameErrs := validation.IsDNS1123Subdomain(o.name)
		if o.kind == "Service" {
			nameErrs = validation.IsDNS1035Label(o.name)
		}
		for _, msg := range nameErrs {
			t.Errorf("%s: bad name: %s", id, msg)
		}
		if ns := o.meta.GetNamespace(); ns != "" {
			t.Errorf("%s: sets namespace %q; the release namespace applies", id, ns)
		}
		checkLabels(t, id, o.meta.GetLabels())
		for _, key := range []string{"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"} {
			if o.meta.GetLabels()[key] == "" {
				t.Errorf("%s: no label %s", id, key)
			}
		}
	}
}

func checkLabels(t *testing.T, where string, set map[string]string) {
	t.Helper()
	for k, v := range set {
		for _, msg := range validation.IsQualifiedName(k) {
			t.Errorf("%s: label key %q: %s", where, k, msg)
		}
		for _, msg := range validation.IsValidLabelValue(v) {
			t.Errorf("%s: label %s=%q: %s", where, k, v, msg)
		}
	}
}

// binaryAddr is the setting naming the listen address of each binary.
var binaryAddr = map[string]string{
	"api":       "AGENTRY_HTTP_ADDR",
	"worker":    "AGENTRY_WORKER_ADDR",
	"scheduler": "AGENTRY_SCHEDULER_ADDR",
}

func checkDeployments(t *testing.T, r *release) {
	t.Helper()
	settings := r.settings(t)
	for name, v := range settings {
		// Numbers are written as the settings read them: a value file's
		// large whole numbers must not turn into 2.097152e+06.
		if strings.ContainsAny(v, "eE") && strings.ContainsAny(v, "+-") && strings.IndexFunc(v, func(r rune) bool { return r >= '0' && r <= '9' }) == 0 {
			t.Errorf("ConfigMap %s = %q: a number in scientific notation, which no setting reads", name, v)
		}
	}
	drain, err := time.ParseDuration(settings["AGENTRY_SHUTDOWN_TIMEOUT"])
	if err != nil {
		t.Fatalf("AGENTRY_SHUTDOWN_TIMEOUT: %v", err)
	}
	scaled := scaledDeployments(r)
	deployments := all[*appsv1.Deployment](r)
	var components []string
	for _, d := range deployments {
		id := "Deployment/" + d.Name
		component := d.Spec.Template.Labels["app.kubernetes.io/component"]
		components = append(components, component)
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("%s: selector %v does not select its own pods (%v)", id, d.Spec.Selector, err)
		}
		checkLabels(t, id+" pod", d.Spec.Template.Labels)
		if scaled[d.Name] != (d.Spec.Replicas == nil) {
			t.Errorf("%s: autoscaled %v but spec.replicas %v; an autoscaled Deployment must leave replicas to its scaler",
				id, scaled[d.Name], d.Spec.Replicas)
		}
		if d.Spec.Strategy.Type != appsv1.RollingUpdateDeploymentStrategyType {
			t.Errorf("%s: strategy %q, want RollingUpdate", id, d.Spec.Strategy.Type)
		}
		pod := d.Spec.Template.Spec
		checkPodSecurity(t, id, pod)
		checkEnvSources(t, r, id, pod, false)
		if len(pod.Containers) != 1 {
			t.Fatalf("%s: %d containers, want 1", id, len(pod.Containers))
		}
		c := pod.Containers[0]
		if want := "/usr/local/bin/" + component; len(c.Command) != 1 || c.Command[0] != want {
			t.Errorf("%s: command %q, want [%s]", id, c.Command, want)
		}
		port := containerPort(c, "http")
		if port == 0 {
			t.Fatalf("%s: no container port named http", id)
		}
		if want := fmt.Sprintf(":%d", port); settings[binaryAddr[component]] != want {
			t.Errorf("%s: %s is %q but the container port is %d", id, binaryAddr[component], settings[binaryAddr[component]], port)
		}
		checkProbe(t, id+" startupProbe", c.StartupProbe, "/healthz")
		checkProbe(t, id+" livenessProbe", c.LivenessProbe, "/healthz")
		checkProbe(t, id+" readinessProbe", c.ReadinessProbe, "/readyz")
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
			t.Errorf("%s: no cpu and memory requests: %v", id, c.Resources.Requests)
		}
		// SIGKILL must not come before the preStop sleep and the drain are over.
		var preStop time.Duration
		if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Sleep != nil {
			preStop = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
		}
		if pod.TerminationGracePeriodSeconds == nil {
			t.Errorf("%s: no terminationGracePeriodSeconds", id)
		} else if grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second; grace <= preStop+drain {
			t.Errorf("%s: terminationGracePeriodSeconds %v, want more than preStop %v + drain %v", id, grace, preStop, drain)
		}
		if d.Spec.Template.Annotations["checksum/config"] == "" {
			t.Errorf("%s: pods lack annotation checksum/config, so settings changes would not roll them", id)
		}
	}
	slices.Sort(components)
	if want := []string{"api", "scheduler", "worker"}; !slices.Equal(components, want) {
		t.Errorf("Deployments for %v, want %v", components, want)
	}
}

// scaledDeployments returns the names of the Deployments an HPA or a KEDA
// ScaledObject scales, and checks that every scaler targets one.
func scaledDeployments(r *release) map[string]bool {
	scaled := map[string]bool{}
	for _, h := range all[*autoscalingv2.HorizontalPodAutoscaler](r) {
		scaled[h.Spec.ScaleTargetRef.Name] = true
	}
	for _, s := range all[*ScaledObject](r) {
		scaled[s.Spec.ScaleTargetRef.Name] = true
	}
	return scaled
}

func containerPort(c corev1.Container, name string) int32 {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	return 0
}

func checkProbe(t *testing.T, where string, p *corev1.Probe, path string) {
	t.Helper()
	switch {
	case p == nil:
		t.Errorf("%s: missing", where)
	case p.HTTPGet == nil:
		t.Errorf("%s: not an httpGet probe", where)
	case p.HTTPGet.Path != path || p.HTTPGet.Port.String() != "http":
		t.Errorf("%s: GET %s on port %s, want GET %s on port http", where, p.HTTPGet.Path, p.HTTPGet.Port.String(), path)
	}
}

// checkPodSecurity: every container runs as a non-root user, on a read-only
// root filesystem, without privilege escalation or capabilities.
func checkPodSecurity(t *testing.T, where string, pod corev1.PodSpec) {
	t.Helper()
	podNonRoot := pod.SecurityContext != nil && pod.SecurityContext.RunAsNonRoot != nil && *pod.SecurityContext.RunAsNonRoot
	for _, c := range slices.Concat(pod.InitContainers, pod.Containers) {
		id := where + " container " + c.Name
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("%s: no securityContext", id)
			continue
		}
		if !podNonRoot && (sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot) {
			t.Errorf("%s: runAsNonRoot is not true", id)
		}
		if sc.RunAsNonRoot != nil && !*sc.RunAsNonRoot {
			t.Errorf("%s: runAsNonRoot is false", id)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: readOnlyRootFilesystem is not true", id)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: allowPrivilegeEscalation is not false", id)
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: capabilities are not dropped", id)
		}
		if c.Image == "" || !strings.ContainsAny(c.Image, ":@") {
			t.Errorf("%s: image %q has no tag or digest", id, c.Image)
		}
	}
}

// checkEnvSources: every ConfigMap and Secret a pod takes settings from is
// rendered by the chart or is the existingSecret. A hook pod may only use
// hooks that run before it, since the release's own objects do not exist yet
// when a pre-install hook runs.
func checkEnvSources(t *testing.T, r *release, where string, pod corev1.PodSpec, hook bool) {
	t.Helper()
	existingSecret, _ := r.value("existingSecret").(string)
	extra := map[string]bool{}
	list, _ := r.value("extraEnvFrom").([]any)
	for _, item := range list {
		source, _ := item.(map[string]any)
		for _, ref := range source { // {configMapRef: {name: ...}}, {secretRef: ...}
			if ref, ok := ref.(map[string]any); ok {
				name, _ := ref["name"].(string)
				extra[name] = true
			}
		}
	}
	for _, c := range slices.Concat(pod.InitContainers, pod.Containers) {
		var sawConfig, sawSecret bool
		for _, from := range c.EnvFrom {
			kind, name := "ConfigMap", ""
			switch {
			case from.ConfigMapRef != nil:
				name = from.ConfigMapRef.Name
				sawConfig = sawConfig || !extra[name]
			case from.SecretRef != nil:
				kind, name = "Secret", from.SecretRef.Name
				sawSecret = sawSecret || !extra[name]
			}
			if extra[name] || (kind == "Secret" && name == existingSecret) {
				continue
			}
			src := r.find(kind, name)
			if src == nil {
				t.Errorf("%s container %s: envFrom %s %s, which the chart does not render", where, c.Name, kind, name)
				continue
			}
			srcEvents, _ := src.hook()
			if !hook && len(srcEvents) > 0 {
				t.Errorf("%s container %s: envFrom %s %s, a hook object that is deleted after the hook", where, c.Name, kind, name)
			}
			if hook && !slices.Equal(srcEvents, jobHookEvents(r)) {
				t.Errorf("%s container %s: envFrom %s %s, with hook events %v; the Job runs on %v, when it may not exist",
					where, c.Name, kind, name, srcEvents, jobHookEvents(r))
			}
		}
		if !sawConfig || !sawSecret {
			t.Errorf("%s container %s: settings from ConfigMap %v, Secret %v; want both", where, c.Name, sawConfig, sawSecret)
		}
	}
}

func jobHookEvents(r *release) []string {
	for _, o := range r.objects {
		if o.kind == "Job" {
			events, _ := o.hook()
			return events
		}
	}
	return nil
}

// checkMigrationJob: the migration Job is a pre-install and pre-upgrade hook
// running `api migrate up` first, after the hook objects it reads.
func checkMigrationJob(t *testing.T, r *release) {
	t.Helper()
	enabled, _ := r.value("migrations.enabled").(bool)
	jobs := all[*batchv1.Job](r)
	if !enabled {
		if len(jobs) != 0 {
			t.Errorf("migrations.enabled is false but %d Jobs render", len(jobs))
		}
		return
	}
	if len(jobs) != 1 {
		t.Fatalf("%d Jobs, want the migration Job", len(jobs))
	}
	job := jobs[0]
	id := "Job/" + job.Name
	events, weight := r.find("Job", job.Name).hook()
	if !slices.Contains(events, "pre-install") || !slices.Contains(events, "pre-upgrade") {
		t.Errorf("%s: helm.sh/hook %q, want pre-install and pre-upgrade", id, job.Annotations["helm.sh/hook"])
	}
	for _, o := range r.objects {
		if e, w := o.hook(); len(e) > 0 && o.kind != "Job" && !(atoi(t, w) < atoi(t, weight)) {
			t.Errorf("%s %s: hook weight %s does not run before the Job's %s", o.kind, o.name, w, weight)
		}
	}
	pod := job.Spec.Template.Spec
	if pod.RestartPolicy != corev1.RestartPolicyNever {
		t.Errorf("%s: restartPolicy %q, want Never", id, pod.RestartPolicy)
	}
	if sa := pod.ServiceAccountName; sa != "" && r.find("ServiceAccount", sa) != nil {
		t.Errorf("%s: uses ServiceAccount %s, which the release creates only after pre-install hooks", id, sa)
	}
	checkPodSecurity(t, id, pod)
	checkEnvSources(t, r, id, pod, true)
	steps := slices.Concat(pod.InitContainers, pod.Containers)
	var run [][]string
	for _, c := range steps {
		run = append(run, slices.Concat(c.Command, c.Args))
	}
	want := [][]string{{"/usr/local/bin/api", "migrate", "up"}}
	if seed, _ := r.value("migrations.seedAdmin").(bool); seed {
		want = append(want, []string{"/usr/local/bin/api", "seed-admin"})
	}
	if !slices.EqualFunc(run, want, slices.Equal) {
		t.Errorf("%s runs %q, want %q in that order", id, run, want)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	if s == "" {
		return 0
	}
	var n int
	if _, err := fmt.Sscan(s, &n); err != nil {
		t.Errorf("hook weight %q: %v", s, err)
	}
	return n
}

// checkServices: each Service selects the pods of exactly one Deployment and
// targets a port they name; Ingress backends name a Service port.
func checkServices(t *testing.T, r *release) {
	t.Helper()
	for _, s := range all[*corev1.Service](r) {
		id := "Service/" + s.Name
		d := selectedDeployment(t, r, id, labels.SelectorFromSet(s.Spec.Selector))
		if d == nil {
			continue
		}
		for _, p := range s.Spec.Ports {
			if containerPort(d.Spec.Template.Spec.Containers[0], p.TargetPort.String()) == 0 {
				t.Errorf("%s: port %s targets %s, which Deployment/%s does not name", id, p.Name, p.TargetPort.String(), d.Name)
			}
		}
	}
	for _, in := range all[*networkingv1.Ingress](r) {
		for _, rule := range in.Spec.Rules {
			for _, path := range rule.HTTP.Paths {
				b := path.Backend.Service
				o := r.find("Service", b.Name)
				if o == nil {
					t.Errorf("Ingress/%s: backend Service %s is not rendered", in.Name, b.Name)
					continue
				}
				if !slices.ContainsFunc(o.typed.(*corev1.Service).Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == b.Port.Name }) {
					t.Errorf("Ingress/%s: backend port %q is not a port of Service %s", in.Name, b.Port.Name, b.Name)
				}
			}
		}
	}
}

// selectedDeployment returns the one Deployment whose pods sel selects.
func selectedDeployment(t *testing.T, r *release, where string, sel labels.Selector) *appsv1.Deployment {
	t.Helper()
	var found []*appsv1.Deployment
	for _, d := range all[*appsv1.Deployment](r) {
		if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			found = append(found, d)
		}
	}
	if len(found) != 1 {
		t.Errorf("%s: selector %s selects the pods of %d Deployments, want 1", where, sel, len(found))
		return nil
	}
	return found[0]
}

// checkScalers: autoscalers target a rendered Deployment with sane bounds; the
// worker's scale on queue depth.
func checkScalers(t *testing.T, r *release) {
	t.Helper()
	targets := map[string]int{}
	for _, h := range all[*autoscalingv2.HorizontalPodAutoscaler](r) {
		id := "HorizontalPodAutoscaler/" + h.Name
		targets[h.Spec.ScaleTargetRef.Name]++
		if ref := h.Spec.ScaleTargetRef; ref.Kind != "Deployment" || r.find("Deployment", ref.Name) == nil {
			t.Errorf("%s: scales %s %s, which is not a rendered Deployment", id, ref.Kind, ref.Name)
		}
		if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 1 || *h.Spec.MinReplicas > h.Spec.MaxReplicas {
			t.Errorf("%s: replicas %v..%d", id, h.Spec.MinReplicas, h.Spec.MaxReplicas)
		}
		if len(h.Spec.Metrics) == 0 {
			t.Errorf("%s: no metrics", id)
		}
	}
	for _, s := range all[*ScaledObject](r) {
		id := "ScaledObject/" + s.Name
		targets[s.Spec.ScaleTargetRef.Name]++
		if ref := s.Spec.ScaleTargetRef; r.find("Deployment", ref.Name) == nil {
			t.Errorf("%s: scales %s, which is not a rendered Deployment", id, ref.Name)
		}
		if len(s.Spec.Triggers) != 1 || s.Spec.Triggers[0].Type != "prometheus" {
			t.Fatalf("%s: triggers %+v, want one prometheus trigger", id, s.Spec.Triggers)
		}
		md := s.Spec.Triggers[0].Metadata
		for _, key := range []string{"serverAddress", "query", "threshold"} {
			if md[key] == "" {
				t.Errorf("%s: trigger metadata lacks %s", id, key)
			}
		}
		if !strings.Contains(md["query"], "agentry_queue_tasks") || !strings.Contains(md["query"], "agentry_commands_waiting") {
			t.Errorf("%s: query %q does not measure the queue depth", id, md["query"])
		}
		var threshold float64
		if _, err := fmt.Sscan(md["threshold"], &threshold); err != nil || threshold <= 0 {
			t.Errorf("%s: threshold %q is not a positive number", id, md["threshold"])
		}
	}
	for name, n := range targets {
		if n > 1 {
			t.Errorf("Deployment/%s has %d autoscalers", name, n)
		}
	}
}

func checkDisruptionBudgets(t *testing.T, r *release) {
	t.Helper()
	for _, p := range all[*policyv1.PodDisruptionBudget](r) {
		id := "PodDisruptionBudget/" + p.Name
		sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err != nil {
			t.Errorf("%s: %v", id, err)
			continue
		}
		selectedDeployment(t, r, id, sel)
		if (p.Spec.MaxUnavailable == nil) == (p.Spec.MinAvailable == nil) {
			t.Errorf("%s: set exactly one of maxUnavailable and minAvailable", id)
		}
	}
}

// checkMonitoring: the ServiceMonitor scrapes the api, worker and scheduler
// Services on a port they have; every rule is an alert or a recording rule.
func checkMonitoring(t *testing.T, r *release) {
	t.Helper()
	for _, m := range all[*ServiceMonitor](r) {
		id := "ServiceMonitor/" + m.Name
		sel, err := metav1.LabelSelectorAsSelector(&m.Spec.Selector)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		var scraped []string
		for _, s := range all[*corev1.Service](r) {
			if !sel.Matches(labels.Set(s.Labels)) {
				continue
			}
			scraped = append(scraped, s.Labels["app.kubernetes.io/component"])
			for _, e := range m.Spec.Endpoints {
				if !slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == e.Port }) {
					t.Errorf("%s: endpoint port %q is not a port of Service %s", id, e.Port, s.Name)
				}
			}
		}
		slices.Sort(scraped)
		if want := []string{"api", "scheduler", "worker"}; !slices.Equal(scraped, want) {
			t.Errorf("%s: scrapes Services of %v, want %v", id, scraped, want)
		}
		for _, e := range m.Spec.Endpoints {
			if e.Path != "/metrics" {
				t.Errorf("%s: path %q, want /metrics", id, e.Path)
			}
		}
	}
	for _, p := range all[*PrometheusRule](r) {
		for _, g := range p.Spec.Groups {
			if len(g.Rules) == 0 {
				t.Errorf("PrometheusRule/%s group %s: no rules", p.Name, g.Name)
			}
			for _, rule := range g.Rules {
				if (rule.Alert == "") == (rule.Record == "") || strings.TrimSpace(rule.Expr.String()) == "" {
					t.Errorf("PrometheusRule/%s: rule %+v is neither a complete alert nor a recording rule", p.Name, rule)
				}
				checkPromQL(t, "PrometheusRule/"+p.Name+" "+rule.Alert+rule.Record, rule.Expr.String())
			}
		}
	}
	for _, s := range all[*ScaledObject](r) {
		checkPromQL(t, "ScaledObject/"+s.Name, s.Spec.Triggers[0].Metadata["query"])
	}
}

// checkSecrets: only the migration Job's hook Secret holds the admin password.
func checkSecrets(t *testing.T, r *release) {
	t.Helper()
	for _, s := range all[*corev1.Secret](r) {
		if events, _ := r.find("Secret", s.Name).hook(); len(events) == 0 {
			if _, ok := s.Data["AGENTRY_ADMIN_PASSWORD"]; ok {
				t.Errorf("Secret/%s: gives AGENTRY_ADMIN_PASSWORD to every pod", s.Name)
			}
		}
		for key := range s.Data {
			if !strings.HasPrefix(key, "AGENTRY_") {
				t.Errorf("Secret/%s: key %s is not an AGENTRY_* setting", s.Name, key)
			}
		}
	}
}
