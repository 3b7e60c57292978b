package deploy_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
)

// TestIgnoreFilesCoverBinaries: a binary that `go build ./cmd/NAME` writes at
// the repository root is neither committed (.gitignore) nor sent to a Docker
// build context (.dockerignore), for every command there is and will be.
// A 29 MB gateway binary was once committed at the root.
func TestIgnoreFilesCoverBinaries(t *testing.T) {
	t.Parallel()
	root := repoRoot(t)
	cmds, err := os.ReadDir(filepath.Join(root, "cmd"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	patterns, err := ignorefile.ReadAll(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range cmds {
		if c.IsDir() {
			names = append(names, c.Name(), "bin/"+c.Name())
		}
	}
	if len(names) < 8 {
		t.Fatalf("found only %v under cmd/", names)
	}
	for _, n := range names {
		if ok, _ := pm.MatchesOrParentMatches(n); !ok {
			t.Errorf(".dockerignore does not exclude the binary %s", n)
		}
		// git check-ignore exits 0 when the path is ignored; --no-index
		// judges the rules even for a path that is tracked.
		cmd := exec.Command("git", "check-ignore", "-q", "--no-index", n)
		cmd.Dir = root
		if err := cmd.Run(); err != nil {
			t.Errorf(".gitignore does not ignore the binary %s (git check-ignore: %v)", n, err)
		}
	}
	// The sources stay in both.
	for _, n := range []string{"cmd/gateway/main.go", "cmd/worker/main.go"} {
		if ok, _ := pm.MatchesOrParentMatches(n); ok {
			t.Errorf(".dockerignore excludes the source %s", n)
		}
		cmd := exec.Command("git", "check-ignore", "-q", "--no-index", n)
		cmd.Dir = root
		if cmd.Run() == nil {
			t.Errorf(".gitignore ignores the source %s", n)
		}
	}
}
