package deploy_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// workerDefaults are the worker's defaults as its Config's envDefault tags
// give them (cmd/worker is a main package: read from the source), with
// SOUS_DEAD_LETTER_QUEUE's derived one.
func workerDefaults(t *testing.T, queue string) map[string]string {
	t.Helper()
	out := programDefaults(t, "worker")
	if len(out) < 40 {
		t.Fatalf("found only %d variables in cmd/worker", len(out))
	}
	out["SOUS_DEAD_LETTER_QUEUE"] = queue + ".dlq"
	return out
}

// Every value of the base ConfigMap that is not the worker's default says
// why in a comment above it. SOUS_DEAD_LETTER_QUEUE was once sous.dead-letter,
// silently unlike the <queue>.dlq every doc and dashboard names.
func TestConfigMapDeviationsSayWhy(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join("k8s", "base", "configmap.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	queue := "sous.requests"
	kv := regexp.MustCompile(`^  ([A-Z0-9_]+): *(.*)$`)
	for _, l := range lines {
		if m := kv.FindStringSubmatch(l); m != nil && m[1] == "SOUS_QUEUE" {
			queue = strings.Trim(m[2], `"`)
		}
	}
	defaults := workerDefaults(t, queue)
	for i, l := range lines {
		m := kv.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		name, value := m[1], strings.Trim(m[2], `"`)
		def, known := defaults[name]
		if !known || value == def {
			continue // not the worker's (the engine's own), or its default
		}
		if i == 0 || !strings.HasPrefix(strings.TrimSpace(lines[i-1]), "#") {
			t.Errorf("configmap.yaml: %s is %q, not the worker's default %q, and no comment above it says why", name, value, def)
		}
	}
}
