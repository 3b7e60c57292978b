package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// The release workflow (.github/workflows/release.yml) cannot run here: it
// is checked statically. actionlint (built from its Go module by
// scripts/build-tools.sh) checks its syntax, expressions, action inputs and
// job permissions; the checks below keep it calling the Makefile as it is
// and its actions pinned.

const releaseWorkflow = ".github/workflows/release.yml"

func TestReleaseWorkflowActionlint(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	out, err := exec.Command(filepath.Join(root, "scripts", "build-tools.sh"), "actionlint").Output()
	if err != nil {
		t.Fatalf("scripts/build-tools.sh actionlint: %v", err)
	}
	// No shellcheck or pyflakes: whether they are installed must not change
	// the verdict.
	cmd := exec.Command(strings.TrimSpace(string(out)), "-no-color", "-shellcheck=", "-pyflakes=", releaseWorkflow)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("actionlint %s: %v\n%s", releaseWorkflow, err, out)
	}
}

// workflow is what the checks read of a workflow file.
type workflow struct {
	Jobs map[string]struct {
		Steps []struct {
			Uses string `json:"uses"`
			Run  string `json:"run"`
		} `json:"steps"`
	} `json:"jobs"`
}

// makeTargets returns the targets the Makefile defines.
func makeTargets(t *testing.T, makefile string) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(makefile)
	if err != nil {
		t.Fatal(err)
	}
	targets := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^([a-zA-Z0-9_.-]+)\s*:([^=]|$)`).FindAllStringSubmatch(string(b), -1) {
		targets[m[1]] = true
	}
	return targets
}

// checkWorkflow returns what is wrong with a workflow, given the Makefile's
// targets: a `make` target that does not exist, an action not pinned by a
// full commit SHA, no `make push`.
func checkWorkflow(wf workflow, targets map[string]bool) []string {
	var errs []string
	makeCall := regexp.MustCompile(`(?m)(?:^|[;&|(]\s*|\s)make((?:\s+(?:-[a-zA-Z]+|[A-Z_]+=\S*))*)\s+([a-z][a-z0-9_-]*)`)
	pinned := regexp.MustCompile(`^[^@\s]+@[0-9a-f]{40}$`)
	pushes := false
	for name, job := range wf.Jobs {
		for _, s := range job.Steps {
			if s.Uses != "" && !strings.HasPrefix(s.Uses, "./") && !pinned.MatchString(s.Uses) {
				errs = append(errs, "job "+name+": "+s.Uses+" is not pinned by a full commit SHA")
			}
			for _, m := range makeCall.FindAllStringSubmatch(s.Run, -1) {
				if !targets[m[2]] {
					errs = append(errs, "job "+name+": make "+m[2]+": no such Makefile target")
				}
				pushes = pushes || m[2] == "push"
			}
		}
	}
	if !pushes {
		errs = append(errs, "no step runs make push")
	}
	return errs
}

func TestReleaseWorkflowCallsMakefile(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	b, err := os.ReadFile(filepath.Join(root, releaseWorkflow))
	if err != nil {
		t.Fatal(err)
	}
	var wf workflow
	if err := yaml.Unmarshal(b, &wf); err != nil {
		t.Fatalf("%s: %v", releaseWorkflow, err)
	}
	targets := makeTargets(t, filepath.Join(root, "Makefile"))
	for _, want := range []string{"build", "push", "test", "ollama"} {
		if !targets[want] {
			t.Fatalf("the Makefile parse found no %s target (found %v): the check would prove nothing", want, targets)
		}
	}
	if errs := checkWorkflow(wf, targets); len(errs) > 0 {
		t.Errorf("%s:\n%s", releaseWorkflow, strings.Join(errs, "\n"))
	}

	// The checks catch what they are for.
	for _, tt := range []struct {
		name, from, to, want string
	}{
		{"missing target", "run: make build", "run: make bulid", "make bulid: no such Makefile target"},
		{"target after variables", "make push REGISTRY=", "make pushh REGISTRY=", "make pushh: no such"},
		{"tag pin", "actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1", "actions/checkout@v7", "actions/checkout@v7 is not pinned"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(string(b), tt.from) {
				t.Fatalf("%s no longer contains %q", releaseWorkflow, tt.from)
			}
			var m workflow
			if err := yaml.Unmarshal([]byte(strings.Replace(string(b), tt.from, tt.to, 1)), &m); err != nil {
				t.Fatal(err)
			}
			errs := strings.Join(checkWorkflow(m, targets), "\n")
			if !strings.Contains(errs, tt.want) {
				t.Errorf("after %q -> %q: got %q, want %q", tt.from, tt.to, errs, tt.want)
			}
		})
	}
}
