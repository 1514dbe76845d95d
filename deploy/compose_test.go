// Package deploy_test checks deploy/docker-compose.yml without a Docker
// engine: the file decodes strictly into the part of the Compose
// specification it uses, every agentry service runs one of the three
// binaries with a subcommand it has, the start order refers to services that
// exist and can satisfy it, and bind mounts stay inside deploy/.
package deploy_test

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// composeFile is the part of the Compose specification the file may use.
// Decoding is strict, so a misspelt key fails the test as it would fail
// `docker compose config`.
type composeFile struct {
	Name     string             `yaml:"name"`
	Services map[string]service `yaml:"services"`
	Volumes  map[string]any     `yaml:"volumes"`
	// Extensions holds the x-* keys (YAML anchors to merge into services).
	Extensions map[string]any `yaml:",inline"`
}

type service struct {
	Image           string               `yaml:"image"`
	Build           *build               `yaml:"build"`
	Command         []string             `yaml:"command"`
	Entrypoint      []string             `yaml:"entrypoint"`
	Environment     map[string]string    `yaml:"environment"`
	Ports           []string             `yaml:"ports"`
	Volumes         []string             `yaml:"volumes"`
	Healthcheck     *healthcheck         `yaml:"healthcheck"`
	DependsOn       map[string]dependsOn `yaml:"depends_on"`
	Restart         string               `yaml:"restart"`
	ContainerName   string               `yaml:"container_name"`
	User            string               `yaml:"user"`
	ReadOnly        bool                 `yaml:"read_only"`
	StopGracePeriod string               `yaml:"stop_grace_period"`
}

type build struct {
	Context    string            `yaml:"context"`
	Dockerfile string            `yaml:"dockerfile"`
	Target     string            `yaml:"target"`
	Args       map[string]string `yaml:"args"`
}

type healthcheck struct {
	Test        []string `yaml:"test"`
	Interval    string   `yaml:"interval"`
	Timeout     string   `yaml:"timeout"`
	Retries     int      `yaml:"retries"`
	StartPeriod string   `yaml:"start_period"`
}

type dependsOn struct {
	Condition string `yaml:"condition"`
	Restart   bool   `yaml:"restart"`
	Required  *bool  `yaml:"required"`
}

// subcommands lists, for each binary, the arguments it accepts as a command.
var subcommands = map[string][][]string{
	"api":       {{}, {"serve"}, {"migrate", "up"}, {"migrate", "status"}, {"seed-admin"}},
	"worker":    {{}},
	"scheduler": {{}},
}

// binDir is where the image puts the binaries.
const binDir = "/usr/local/bin/"

func loadCompose(t *testing.T) composeFile {
	t.Helper()
	data, err := os.ReadFile("docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var f composeFile
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	for key := range f.Extensions {
		if !strings.HasPrefix(key, "x-") {
			t.Errorf("docker-compose.yml: unknown top-level key %q", key)
		}
	}
	if len(f.Services) == 0 {
		t.Fatal("docker-compose.yml: no services")
	}
	return f
}

// isAgentry reports whether a service runs the agentry image.
func isAgentry(s service) bool {
	return s.Build != nil && filepath.ToSlash(s.Build.Dockerfile) == "deploy/Dockerfile"
}

// isOneShot reports whether a service is meant to run once and exit.
func isOneShot(s service) bool { return s.Restart == "no" }

func TestComposeServicesRunRealCommands(t *testing.T) {
	f := loadCompose(t)
	var binaries []string
	for name, s := range f.Services {
		if s.Image == "" && s.Build == nil {
			t.Errorf("%s: neither image nor build", name)
		}
		if !isAgentry(s) {
			continue
		}
		argv := slices.Concat(s.Entrypoint, s.Command)
		if len(argv) == 0 || !strings.HasPrefix(argv[0], binDir) {
			t.Errorf("%s: runs %q; want %s<binary> [subcommand]", name, argv, binDir)
			continue
		}
		binary := strings.TrimPrefix(argv[0], binDir)
		binaries = append(binaries, binary)
		if info, err := os.Stat(filepath.Join("..", "cmd", binary)); err != nil || !info.IsDir() {
			t.Errorf("%s: runs %s, but there is no cmd/%s", name, argv[0], binary)
		}
		if !slices.ContainsFunc(subcommands[binary], func(args []string) bool { return slices.Equal(args, argv[1:]) }) {
			t.Errorf("%s: runs %q; %s accepts %q", name, argv, binary, subcommands[binary])
		}
	}
	for _, want := range []string{"api", "worker", "scheduler"} {
		if !slices.Contains(binaries, want) {
			t.Errorf("no service runs %s", want)
		}
	}
}

func TestComposeBuildsTheImage(t *testing.T) {
	f := loadCompose(t)
	for name, s := range f.Services {
		if !isAgentry(s) {
			continue
		}
		root := filepath.Clean(s.Build.Context)
		if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
			t.Errorf("%s: build context %q is not the repository root: %v", name, s.Build.Context, err)
		}
		dockerfile, err := os.ReadFile(filepath.Join(root, s.Build.Dockerfile))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		stages := regexp.MustCompile(`(?mi)^FROM\s+\S+\s+AS\s+(\S+)\s*$`).FindAllStringSubmatch(string(dockerfile), -1)
		if s.Build.Target != "" && !slices.ContainsFunc(stages, func(m []string) bool { return m[1] == s.Build.Target }) {
			t.Errorf("%s: build target %q is not a stage of %s", name, s.Build.Target, s.Build.Dockerfile)
		}
		// Only the debug stage has the busybox tools that health checks may call.
		if hc := s.Healthcheck; hc != nil && len(hc.Test) > 1 && strings.HasPrefix(hc.Test[1], "/busybox/") && s.Build.Target != "debug" {
			t.Errorf("%s: health check runs %s, which only the debug target has", name, hc.Test[1])
		}
	}
}

func TestComposeStartOrder(t *testing.T) {
	f := loadCompose(t)
	for name, s := range f.Services {
		if s.Healthcheck == nil && !isOneShot(s) {
			t.Errorf("%s: neither a health check nor a one-shot (restart: \"no\")", name)
		}
		if hc := s.Healthcheck; hc != nil && (len(hc.Test) < 2 || (hc.Test[0] != "CMD" && hc.Test[0] != "CMD-SHELL")) {
			t.Errorf("%s: health check test %q is not [CMD ...] or [CMD-SHELL ...]", name, hc.Test)
		}
		for target, dep := range s.DependsOn {
			other, ok := f.Services[target]
			switch {
			case !ok:
				t.Errorf("%s: depends on %s, which is not a service", name, target)
			case target == name:
				t.Errorf("%s: depends on itself", name)
			case dep.Condition == "service_healthy" && other.Healthcheck == nil:
				t.Errorf("%s: waits for %s to be healthy, but %s has no health check", name, target, target)
			case dep.Condition == "service_completed_successfully" && !isOneShot(other):
				t.Errorf("%s: waits for %s to complete, but %s is not a one-shot", name, target, target)
			case dep.Condition != "service_started" && dep.Condition != "service_healthy" && dep.Condition != "service_completed_successfully":
				t.Errorf("%s: depends on %s with condition %q", name, target, dep.Condition)
			}
		}
	}
	// Everything that talks to Postgres waits for the migrations.
	for name, s := range f.Services {
		if isAgentry(s) && name != "migrate" && s.DependsOn["migrate"].Condition != "service_completed_successfully" {
			t.Errorf("%s: does not wait for migrate to complete", name)
		}
	}
	if f.Services["migrate"].DependsOn["postgres"].Condition != "service_healthy" {
		t.Error("migrate: does not wait for postgres to be healthy")
	}
	// Everything that connects to Redis at start waits for it: a one-shot
	// that fails once never runs again.
	for name, s := range f.Services {
		if isAgentry(s) && name != "migrate" && s.DependsOn["redis"].Condition != "service_healthy" {
			t.Errorf("%s: does not wait for redis to be healthy", name)
		}
	}
}

// TestComposePublishesOnLoopback: the stack runs with development secrets
// and default passwords, so it is reachable from this machine only, unless
// AGENTRY_BIND says otherwise.
func TestComposePublishesOnLoopback(t *testing.T) {
	f := loadCompose(t)
	for name, s := range f.Services {
		for _, p := range s.Ports {
			if !strings.HasPrefix(p, "${AGENTRY_BIND:-127.0.0.1}:") {
				t.Errorf("%s: port %q is published on every interface", name, p)
			}
		}
	}
}

func TestComposeWorkerScales(t *testing.T) {
	f := loadCompose(t)
	w, ok := f.Services["worker"]
	if !ok {
		t.Fatal("no worker service")
	}
	if w.ContainerName != "" {
		t.Errorf("worker: container_name %q stops `--scale worker=N`", w.ContainerName)
	}
	if len(w.Ports) != 0 {
		t.Errorf("worker: host ports %q stop `--scale worker=N`", w.Ports)
	}
	// SIGKILL must not come before the worker has drained its commands.
	drain, err := time.ParseDuration(w.Environment["AGENTRY_SHUTDOWN_TIMEOUT"])
	if err != nil {
		t.Fatalf("worker: AGENTRY_SHUTDOWN_TIMEOUT: %v", err)
	}
	grace, err := time.ParseDuration(w.StopGracePeriod)
	if err != nil || grace <= drain {
		t.Errorf("worker: stop_grace_period %q, want longer than AGENTRY_SHUTDOWN_TIMEOUT %v", w.StopGracePeriod, drain)
	}
}

// TestComposeMounts: bind mounts come from deploy/ (whether or not the files
// exist yet), and named volumes are declared.
func TestComposeMounts(t *testing.T) {
	f := loadCompose(t)
	deploy, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range f.Services {
		for _, v := range s.Volumes {
			source, _, ok := strings.Cut(v, ":")
			if !ok {
				t.Errorf("%s: volume %q has no target", name, v)
				continue
			}
			if !strings.HasPrefix(source, ".") && !strings.HasPrefix(source, "/") {
				if _, declared := f.Volumes[source]; !declared {
					t.Errorf("%s: named volume %q is not declared under volumes", name, source)
				}
				continue
			}
			rel, err := filepath.Rel(deploy, filepath.Join(deploy, source))
			if err != nil || filepath.IsAbs(source) || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
				t.Errorf("%s: bind mount %q is not under deploy/", name, source)
			}
		}
	}
}
