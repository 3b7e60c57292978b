package deploy_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// repoRoot returns the directory holding go.mod, above the test's working
// directory (deploy/).
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the working directory")
		}
		dir = parent
	}
}

// schemaDir is ../shared/schemas/keda relative to the repo root. The schemas
// are data the tests cannot do without: missing is a failure, not a skip.
func schemaDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "..", "shared", "schemas", "keda")
	if _, err := os.Stat(filepath.Join(dir, "scalers-schema.json")); err != nil {
		t.Fatalf("KEDA schemas missing (expected ../shared/schemas/keda relative to the repo root): %v", err)
	}
	return dir
}

// tree is a set of files by slash-separated path relative to the repo root.
// Tests mutate copies of it to prove that each check refuses a broken file.
type tree map[string][]byte

// loadTree reads every file under deploy/ with one of exts (the Helm chart
// aside), and the named files at the repo root.
func loadTree(t *testing.T, exts []string, rootFiles ...string) tree {
	t.Helper()
	root := repoRoot(t)
	tr := tree{}
	err := filepath.WalkDir(filepath.Join(root, "deploy"), func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && path == filepath.Join(root, helmChart) {
			// Go templates, not manifests: helm_test.go renders the chart
			// and checks what it renders.
			return filepath.SkipDir
		}
		if err != nil || d.IsDir() {
			return err
		}
		for _, ext := range exts {
			if strings.HasSuffix(path, ext) {
				rel, err := filepath.Rel(root, path)
				if err != nil {
					return err
				}
				b, err := os.ReadFile(path)
				tr[filepath.ToSlash(rel)] = b
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range rootFiles {
		b, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		tr[name] = b
	}
	return tr
}

// clone returns a copy of tr whose file contents may be changed freely.
func (tr tree) clone() tree {
	c := make(tree, len(tr))
	for k, v := range tr {
		c[k] = append([]byte(nil), v...)
	}
	return c
}

// mutation breaks one file of a tree by replacing old with new (once).
type mutation struct {
	file, old, new string
}

// apply returns a copy of tr with m applied. It fails the test unless old
// occurs exactly once in the file, so a mutation cannot silently test nothing
// (or something else, such as a comment).
func (m mutation) apply(t *testing.T, tr tree) tree {
	t.Helper()
	c := tr.clone()
	b, ok := c[m.file]
	if !ok && m.old != "" {
		t.Fatalf("mutation: no file %s", m.file)
	}
	if m.old == "" { // append
		c[m.file] = append(b, m.new...)
		return c
	}
	if n := strings.Count(string(b), m.old); n != 1 {
		t.Fatalf("mutation: %q occurs %d times in %s, want once", m.old, n, m.file)
	}
	c[m.file] = []byte(strings.Replace(string(b), m.old, m.new, 1))
	return c
}

// requireErr asserts that errs holds an error containing want, or, when want
// is empty, that errs is empty.
func requireErr(t *testing.T, errs []error, want string) {
	t.Helper()
	if want == "" {
		if len(errs) > 0 {
			t.Fatalf("want no error, got:\n%v", errors.Join(errs...))
		}
		return
	}
	for _, err := range errs {
		if strings.Contains(err.Error(), want) {
			return
		}
	}
	if len(errs) == 0 {
		t.Fatalf("want an error containing %q, got none", want)
	}
	t.Fatalf("want an error containing %q, got:\n%v", want, errors.Join(errs...))
}
