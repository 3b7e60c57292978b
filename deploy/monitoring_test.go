package deploy_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// The alert rules and the dashboard of deploy/monitoring: promtool accepts
// the rules and their unit tests pass (series in, alerts out); the
// PrometheusRule holds the same groups as the plain rules file; every sous_*
// metric the rules and the dashboard name is one docs/observability.md's
// metrics table lists (and so, by internal/telemetry's docs test, one the
// worker exports).

func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI=true and no promtool: scripts/ensure-promtool.sh installs it")
		}
		t.Skip("no promtool (scripts/ensure-promtool.sh installs it)")
	}
	return p
}

func TestAlertRulesPassPromtool(t *testing.T) {
	t.Parallel()
	bin := promtool(t)
	for _, args := range [][]string{{"check", "rules", "rules.yaml"}, {"test", "rules", "rules_test.yaml"}} {
		cmd := exec.Command(bin, args...)
		cmd.Dir = "monitoring"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// The PrometheusRule's groups, written out as a plain rules file, pass too.
	pr := readYAML(t, "monitoring/prometheusrule.yaml")
	b, err := yaml.Marshal(map[string]any{"groups": pr["spec"].(map[string]any)["groups"]})
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "prometheusrule-groups.yaml")
	if err := os.WriteFile(f, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "check", "rules", f).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules on the PrometheusRule's groups: %v\n%s", err, out)
	}
}

func readYAML(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

func TestPrometheusRuleMatchesRulesFile(t *testing.T) {
	t.Parallel()
	plain := readYAML(t, "monitoring/rules.yaml")
	pr := readYAML(t, "monitoring/prometheusrule.yaml")
	if pr["kind"] != "PrometheusRule" || pr["apiVersion"] != "monitoring.coreos.com/v1" {
		t.Errorf("prometheusrule.yaml is a %v %v", pr["apiVersion"], pr["kind"])
	}
	spec, _ := pr["spec"].(map[string]any)
	if !reflect.DeepEqual(plain["groups"], spec["groups"]) {
		t.Error("prometheusrule.yaml's spec.groups differ from rules.yaml's groups: change both")
	}
}

func TestMonitoringNamesDocumentedMetrics(t *testing.T) {
	t.Parallel()
	doc, err := os.ReadFile("../docs/observability.md")
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(sous_[a-z0-9_]+)` \\(").FindAllStringSubmatch(string(doc), -1) {
		documented[m[1]] = true
	}
	if len(documented) < 10 {
		t.Fatalf("docs/observability.md's metrics table: %v", documented)
	}
	var exprs []string
	plain := readYAML(t, "monitoring/rules.yaml")
	for _, g := range plain["groups"].([]any) {
		for _, r := range g.(map[string]any)["rules"].([]any) {
			exprs = append(exprs, r.(map[string]any)["expr"].(string))
		}
	}
	b, err := os.ReadFile("monitoring/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID    string
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	if dash.UID == "" || len(dash.Panels) < 8 {
		t.Errorf("grafana-dashboard.json: uid %q, %d panels", dash.UID, len(dash.Panels))
	}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 || p.Targets[0].Expr == "" {
			t.Errorf("dashboard panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	name := regexp.MustCompile(`\bsous_[a-z0-9_]*[a-z0-9]\b`)
	suffix := regexp.MustCompile(`_(bucket|sum|count)$`)
	labels := map[string]bool{}
	for _, m := range regexp.MustCompile("`(sous_[a-z_]+)`").FindAllStringSubmatch(string(doc), -1) {
		labels[m[1]] = true
	}
	var unknown []string
	for _, e := range exprs {
		for _, n := range name.FindAllString(e, -1) {
			if documented[n] || documented[suffix.ReplaceAllString(n, "")] || labels[n] && !strings.HasSuffix(n, "_total") {
				continue
			}
			unknown = append(unknown, n)
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		t.Errorf("the rules or the dashboard name %v, which docs/observability.md's metrics table does not list", slices.Compact(unknown))
	}
}
