package deploy_test

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/yaml"

	"github.com/sous-run/sous/internal/envcheck"
	"github.com/sous-run/sous/internal/worker"
)

// helmChart is the chart, relative to the repo root.
const helmChart = "deploy/helm/sous"

// helmRelease is the release name the tests render: the one deploy/README.md
// gives, with which every object has the kustomize overlays' name.
const helmRelease = "sous"

// helmBin is helm as scripts/build-k8s.sh builds it (`make k8s`). Missing,
// the test is skipped with one line, or fails under CI=true (CI runs `make
// test`, which builds it), as integration/k8s does for the control plane.
func helmBin(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(repoRoot(t), ".cache", "k8s", "bin", "helm")
	if _, err := os.Stat(bin); err != nil {
		msg := fmt.Sprintf("helm: %s is missing: run `make k8s` (builds helm from its Go module, integration/k8s/tools/helm)", bin)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin
}

// runHelm runs helm with its config, cache and data in a temporary
// directory (nothing read from or written to the user's), and returns its
// standard output; a non-zero exit is returned as an error with stderr.
func runHelm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	bin := helmBin(t)
	home := t.TempDir()
	cmd := exec.Command(bin, args...)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+filepath.Join(home, "no-kubeconfig"),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("helm %s: %w\n%s%s", strings.Join(args, " "), err, stderr.String(), stdout.String())
	}
	return stdout.Bytes(), nil
}

// helmCase is one set of values the chart is linted and rendered with.
type helmCase struct {
	name   string
	values string // a values file's content, on top of the chart's values.yaml
}

// helmCases: the defaults, each engine preset on each broker, and the
// switches that change which objects render.
func helmCases() []helmCase {
	cases := []helmCase{{name: "defaults"}}
	for _, broker := range []string{"rabbitmq", "servicebus"} {
		for _, engine := range []string{"ollama", "vllm", "llamacpp", "external"} {
			cases = append(cases, helmCase{
				name:   broker + "/" + engine,
				values: fmt.Sprintf("broker: {kind: %s}\nengine: {kind: %s}\n", broker, engine),
			})
		}
	}
	return append(cases,
		helmCase{name: "servicebus/keda-connection-string", values: "broker: {kind: servicebus, servicebus: {kedaAuth: connection}}\n"},
		helmCase{name: "no-keda-no-gateway", values: "keda: {enabled: false}\ngateway: {enabled: false}\n"},
		helmCase{name: "existing-model-claim", values: "models: {existingClaim: my-models}\n"},
		helmCase{name: "service-monitor", values: "serviceMonitor: {enabled: true}\n"},
		// The work-aware scaler: one external trigger, on SOUS_QUEUE or every
		// lane's queue, and on Service Bus (rendered, with a warning).
		helmCase{name: "rabbitmq/scaler", values: helmScalerValues},
		helmCase{name: "rabbitmq/scaler-lanes", values: helmScalerValues + helmLanesValues},
		helmCase{name: "servicebus/scaler", values: "broker: {kind: servicebus}\n" + helmScalerValues},
	)
}

// helmScalerValues turn the work-aware scaler on, as the overlay
// deploy/k8s/overlays/rabbitmq-scaler does.
const helmScalerValues = "scaler: {enabled: true}\n"

// helmLanesValues are the lanes of deploy/k8s/overlays/rabbitmq-lanes, for
// the workers and the gateway.
const helmLanesValues = "config: {SOUS_LANES: \"interactive=sous.interactive,bulk=sous.bulk:share=0.2\"}\n" +
	"gateway: {config: {SOUS_GATEWAY_LANES: \"interactive=sous.interactive,bulk=sous.bulk\"}}\n"

// helmTemplate renders the chart as release helmRelease in namespace
// sous-helm with values (may be empty) and set: --set flags, or flags of
// their own when they start with "--" (a later --namespace wins).
func helmTemplate(t *testing.T, values string, set ...string) ([]byte, error) {
	t.Helper()
	args := []string{"template", helmRelease, helmChart, "--namespace", "sous-helm"}
	if values != "" {
		f := filepath.Join(t.TempDir(), "values.yaml")
		if err := os.WriteFile(f, []byte(values), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--values", f)
	}
	for _, s := range set {
		if strings.HasPrefix(s, "--") { // a flag of its own, such as --namespace=x
			args = append(args, s)
			continue
		}
		args = append(args, "--set", s)
	}
	return runHelm(t, args...)
}

// renderChart renders the chart and decodes every object as the overlays'
// renders are decoded: built-in kinds strictly into their k8s.io/api types,
// KEDA objects against the CRDs. A ServiceMonitor (no CRD here) is left out.
// Each object gets the release's namespace, where helm installs it (the
// templates name none), as an overlay's objects have the overlay's.
func renderChart(t *testing.T, ks *kedaSchemas, values string, set ...string) []object {
	t.Helper()
	out, err := helmTemplate(t, values, set...)
	if err != nil {
		t.Fatal(err)
	}
	var kept [][]byte
	for _, doc := range bytes.Split(out, []byte("\n---")) {
		if bytes.Contains(doc, []byte("\nkind: ServiceMonitor")) {
			continue
		}
		kept = append(kept, doc)
	}
	objs, errs := decodeDocs(ks, "helm template "+helmChart, bytes.Join(kept, []byte("\n---")), false)
	if len(errs) > 0 {
		t.Fatalf("helm template: %d problems:\n%v", len(errs), errors.Join(errs...))
	}
	ns := "sous-helm" // helmTemplate's, unless a --namespace= flag overrides it
	for _, s := range set {
		if n, ok := strings.CutPrefix(s, "--namespace="); ok {
			ns = n
		}
	}
	for _, o := range objs {
		if m, ok := o.typed.(metav1.Object); ok && m.GetNamespace() == "" {
			m.SetNamespace(ns)
		}
	}
	return objs
}

// exampleSecrets reads the example Secrets under deploy/: the Secrets, and
// their keys, that an install is documented to need.
func exampleSecrets(t *testing.T, ks *kedaSchemas, tr tree) examples {
	t.Helper()
	ex := examples{secrets: map[string]*corev1.Secret{}}
	for p, b := range tr {
		if !exampleFile.MatchString(p) {
			continue
		}
		objs, errs := decodeDocs(ks, p, b, false)
		if len(errs) > 0 {
			t.Fatal(errors.Join(errs...))
		}
		for _, o := range objs {
			if s, ok := o.typed.(*corev1.Secret); ok {
				ex.secrets[s.Name] = s
			}
		}
	}
	return ex
}

// presetOf is the engine preset a case's values choose (ollama when none).
func presetOf(values string) string {
	var v struct {
		Engine struct {
			Kind string `json:"kind"`
		} `json:"engine"`
	}
	_ = yaml.Unmarshal([]byte(values), &v)
	if v.Engine.Kind == "" {
		return "ollama"
	}
	return v.Engine.Kind
}

func TestHelmLint(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	for _, c := range helmCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			args := []string{"lint", "--strict", helmChart}
			if c.values != "" {
				f := filepath.Join(t.TempDir(), "values.yaml")
				if err := os.WriteFile(f, []byte(c.values), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--values", f)
			}
			if _, err := runHelm(t, args...); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestHelmTemplate renders every case and holds it to the rules the
// overlays are held to (validate_test.go): the restricted pod security
// standard, RBAC that allows only the deletion-cost patch, PDBs, KEDA
// objects valid against the CRDs with trigger metadata KEDA reads, scale
// to zero, and, for Ollama (the preset the overlays run), every sous rule
// of checkSet. The other presets get the rules that apply to them.
func TestHelmTemplate(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	ks, tr := setup(t)
	ex := exampleSecrets(t, ks, tr)
	for _, c := range helmCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			objs := renderChart(t, ks, c.values)
			s := indexSet(objs)
			var errs []error
			// checkSet holds a set to the overlays' shape: an engine in the
			// container, the model claim in the set, KEDA owning the replicas.
			if presetOf(c.values) != "external" && !strings.Contains(c.values, "existingClaim") && !strings.Contains(c.values, "enabled: false") {
				errs = checkSet(ks, objs, ex)
			} else {
				errs = checkSetOtherEngine(ks, s)
			}
			errs = append(errs, checkChartWorker(s, presetOf(c.values))...)
			if len(errs) > 0 {
				t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
			}
			if strings.Contains(c.values, "enabled: false") {
				return
			}
			if scaler := strings.Contains(c.values, helmScalerValues); scaler != (s["Deployment"][helmRelease+"-scaler"].typed != nil) {
				t.Errorf("the scaler Deployment rendered: %v, want %v", !scaler, scaler)
			}
			for _, kind := range []string{"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication", "Service"} {
				if kind == "TriggerAuthentication" && !needsTriggerAuth(objs) {
					if len(s[kind]) > 0 {
						t.Errorf("a TriggerAuthentication that no trigger reads: %v", slices.Sorted(maps.Keys(s[kind])))
					}
					continue // an external trigger reads none (scaler_test.go)
				}
				if len(s[kind]) == 0 {
					t.Errorf("no %s rendered", kind)
				}
			}
		})
	}
}

// checkSetOtherEngine: checkSet's rules but those about Ollama (its model
// store at OLLAMA_MODELS, its slots), for the presets that run another
// engine; checkChartWorker checks what they have instead.
func checkSetOtherEngine(ks *kedaSchemas, s set) []error {
	var errs []error
	for _, o := range s["Deployment"] {
		errs = append(errs, prefix(o, checkPodSpec(&o.typed.(*appsv1.Deployment).Spec.Template.Spec))...)
	}
	for _, o := range s["ServiceAccount"] {
		if sa := o.typed.(*corev1.ServiceAccount); sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
			errs = append(errs, fmt.Errorf("%s: automountServiceAccountToken must be false", o))
		}
	}
	for _, o := range s["Role"] {
		errs = append(errs, prefix(o, checkRole(o.typed.(*rbacv1.Role)))...)
	}
	for _, o := range s["PodDisruptionBudget"] {
		errs = append(errs, prefix(o, checkPDB(s, o.typed.(*policyv1.PodDisruptionBudget)))...)
	}
	for _, o := range s["ScaledObject"] {
		so := o.typed.(*scaledObject)
		errs = append(errs, prefix(o, checkScaleDown(so))...)
		errs = append(errs, prefix(o, checkTriggers(ks, s, so, nil))...)
		if so.Spec.MinReplicaCount == nil || *so.Spec.MinReplicaCount != 0 {
			errs = append(errs, fmt.Errorf("%s: minReplicaCount must be 0: scale to zero", o))
		}
	}
	return errs
}

// chartPresets is what each engine preset must render: the image, the
// engine, the binary the worker runs as its child ("" for none), the GPUs
// and whether the model volume is mounted.
var chartPresets = map[string]struct {
	repository, engine, exec string
	gpu                      int64
	models                   bool
}{
	"ollama":   {"sous-worker-ollama", "ollama", "ollama", 1, true},
	"vllm":     {"sous-worker-vllm", "openai", "vllm", 1, true},
	"llamacpp": {"sous-worker-llamacpp", "openai", "llama-server", 1, true},
	"external": {"sous-worker", "openai", "", 0, false},
}

// checkChartWorker: the worker Deployment of the chart, for every preset.
func checkChartWorker(s set, preset string) []error {
	want, ok := chartPresets[preset]
	if !ok {
		return []error{fmt.Errorf("no expectations for preset %q", preset)}
	}
	o, ok := s["Deployment"][helmRelease+"-worker"]
	if !ok {
		return []error{errors.New("no Deployment sous-worker")}
	}
	d := o.typed.(*appsv1.Deployment)
	w, err := workerContainer(s, d, "worker")
	if err != nil {
		return []error{err}
	}
	c := w.container
	var errs []error
	if !strings.Contains(c.Image, "/"+want.repository+":") && !strings.Contains(c.Image, "/"+want.repository+"@") {
		errs = append(errs, fmt.Errorf("image %s, want repository %s", c.Image, want.repository))
	}
	if got := w.config["SOUS_ENGINE"]; got != want.engine {
		errs = append(errs, fmt.Errorf("SOUS_ENGINE %q, want %q", got, want.engine))
	}
	if got := strings.Fields(w.config["SOUS_ENGINE_EXEC"]); want.exec == "" && len(got) > 0 || want.exec != "" && (len(got) == 0 || path.Base(got[0]) != want.exec) {
		errs = append(errs, fmt.Errorf("SOUS_ENGINE_EXEC %q, want it to run %q", w.config["SOUS_ENGINE_EXEC"], want.exec))
	}
	if w.config["SOUS_ENGINE_URL"] == "" || w.config["SOUS_MODEL"] == "" {
		errs = append(errs, errors.New("SOUS_ENGINE_URL and SOUS_MODEL must be set"))
	}
	gpu := c.Resources.Limits[gpuResource]
	if gpu.Value() != want.gpu {
		errs = append(errs, fmt.Errorf("%s limit %s, want %d", gpuResource, gpu.String(), want.gpu))
	}
	mounted := ""
	for _, m := range c.VolumeMounts {
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.PersistentVolumeClaim != nil && m.ReadOnly {
				mounted = m.MountPath
			}
		}
	}
	if want.models != (mounted != "") {
		errs = append(errs, fmt.Errorf("model volume mounted at %q; want one: %v", mounted, want.models))
	}
	if want.models && !strings.Contains(w.config["SOUS_ENGINE_EXEC"]+w.config["OLLAMA_MODELS"], mounted) {
		errs = append(errs, fmt.Errorf("the engine does not read its model from the volume at %s", mounted))
	}
	// The engine's own port is not the worker's.
	if u := w.config["SOUS_ENGINE_URL"]; strings.Contains(u, fmt.Sprintf(":%d", workerPort)) {
		errs = append(errs, fmt.Errorf("SOUS_ENGINE_URL %s uses the worker's port %d", u, workerPort))
	}
	errs = append(errs, checkProbe(c, "startupProbe", c.StartupProbe, "/healthz", workerPort)...)
	errs = append(errs, checkProbe(c, "livenessProbe", c.LivenessProbe, "/healthz", workerPort)...)
	errs = append(errs, checkProbe(c, "readinessProbe", c.ReadinessProbe, "/readyz", workerPort)...)
	errs = append(errs, checkPodDeletionCost(s, d, c)...)
	drain, err1 := timeDuration(w.config, "SOUS_DRAIN_TIMEOUT")
	longest, err2 := timeDuration(w.config, "SOUS_ENGINE_TIMEOUT")
	if err := errors.Join(err1, err2); err != nil {
		errs = append(errs, err)
	} else if g := d.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || secs(*g) <= drain+longest {
		errs = append(errs, fmt.Errorf("terminationGracePeriodSeconds must exceed SOUS_DRAIN_TIMEOUT + SOUS_ENGINE_TIMEOUT = %s", drain+longest))
	}
	// The KEDA value is the most messages one worker holds.
	for _, so := range s["ScaledObject"] {
		for _, tr := range so.typed.(*scaledObject).Spec.Triggers {
			if tr.Type == "external" {
				continue // the work-aware scaler's: checkExternalTrigger
			}
			key := map[string]string{"rabbitmq": "value", "azure-servicebus": "messageCount"}[tr.Type]
			if got, want := tr.Metadata[key], strconv.Itoa(chartCapacity(w.config)); got != want {
				errs = append(errs, fmt.Errorf("trigger %s %s %q, want %s = worker.Capacity", tr.Type, key, got, want))
			}
			if tr.Metadata["queueName"] != w.config["SOUS_QUEUE"] {
				errs = append(errs, fmt.Errorf("trigger queueName %q is not SOUS_QUEUE %q", tr.Metadata["queueName"], w.config["SOUS_QUEUE"]))
			}
		}
	}
	if _, keda := s["ScaledObject"]; keda == (d.Spec.Replicas != nil) {
		errs = append(errs, errors.New("spec.replicas must be set exactly when there is no ScaledObject"))
	}
	return errs
}

// chartCapacity is worker.Capacity of the in-flight limit: min(SOUS_BATCH_MAX,
// SOUS_ENGINE_PARALLEL), or SOUS_BATCH_MAX alone when the slots are auto
// (they adapt up to it).
func chartCapacity(config map[string]string) int {
	limit := 32
	if n, err := strconv.Atoi(config["SOUS_BATCH_MAX"]); err == nil {
		limit = n
	}
	if n, err := strconv.Atoi(config["SOUS_ENGINE_PARALLEL"]); err == nil {
		limit = min(limit, n)
	}
	return worker.Capacity(limit)
}

// TestHelmImages: by default the chart runs the images deploy/k8s/images
// names, and image.* overrides them all.
func TestHelmImages(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	ks, tr := setup(t)
	var k types.Kustomization
	if err := yaml.Unmarshal(tr[imagesDir+"/kustomization.yaml"], &k); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for _, img := range k.Images {
		want[img.Name] = img.NewName + ":" + img.NewTag
	}
	images := func(objs []object) map[string]string {
		out := map[string]string{}
		for _, o := range objs {
			if d, ok := o.typed.(*appsv1.Deployment); ok {
				for _, c := range d.Spec.Template.Spec.Containers {
					out[c.Name] = c.Image
				}
			}
		}
		return out
	}
	got := images(renderChart(t, ks, ""))
	if got["worker"] != want["sous-worker-ollama"] || got["gateway"] != want["sous-gateway"] {
		t.Errorf("default images %v, want deploy/k8s/images' %v", got, want)
	}
	// The presets' images follow the same registry and tag.
	reg, tag, _ := strings.Cut(want["sous-worker-ollama"], ":")
	reg = strings.TrimSuffix(reg, "/sous-worker-ollama")
	for preset, p := range chartPresets {
		got := images(renderChart(t, ks, "engine: {kind: "+preset+"}\n"))
		if w := reg + "/" + p.repository + ":" + tag; got["worker"] != w {
			t.Errorf("%s: worker image %s, want %s", preset, got["worker"], w)
		}
	}
	digest := "sha256:" + strings.Repeat("ab", 32)
	got = images(renderChart(t, ks, "", "image.registry=registry.test/team", "image.tag=1.2.3"))
	if got["worker"] != "registry.test/team/sous-worker-ollama:1.2.3" || got["gateway"] != "registry.test/team/sous-gateway:1.2.3" {
		t.Errorf("image.registry and image.tag: %v", got)
	}
	got = images(renderChart(t, ks, "", "image.registry=registry.test", "image.repository=x/worker", "image.digest="+digest, "gateway.image.digest="+digest))
	if got["worker"] != "registry.test/x/worker@"+digest || got["gateway"] != "registry.test/sous-gateway@"+digest {
		t.Errorf("image.repository and digests: %v", got)
	}
	// The scaler's image follows the same scheme.
	if got := images(renderChart(t, ks, helmScalerValues)); got["scaler"] != want["sous-scaler"] {
		t.Errorf("default scaler image %s, want deploy/k8s/images' %s", got["scaler"], want["sous-scaler"])
	}
	got = images(renderChart(t, ks, helmScalerValues, "image.registry=registry.test/team", "image.tag=1.2.3"))
	if got["scaler"] != "registry.test/team/sous-scaler:1.2.3" {
		t.Errorf("image.registry and image.tag: scaler image %s", got["scaler"])
	}
	got = images(renderChart(t, ks, helmScalerValues, "image.registry=registry.test", "scaler.image.digest="+digest))
	if got["scaler"] != "registry.test/sous-scaler@"+digest {
		t.Errorf("scaler.image.digest: scaler image %s", got["scaler"])
	}
}

// chartSecretSettings are the secret settings, reached through a Secret
// reference in values rather than the ConfigMap: the values that name the
// Secret, and the env var the worker (and gateway) then get.
var chartSecretSettings = map[string]string{
	"SOUS_AMQP_URL":                     "broker.rabbitmq.urlSecret.name=s",
	"SOUS_SERVICEBUS_CONNECTION_STRING": "broker.kind=servicebus",
	"SOUS_ENGINE_API_KEY":               "engine.apiKeySecret.name=s",
}

// chartGatewaySettings are the gateway's settings that follow other values.
var chartGatewaySettings = map[string]string{
	"SOUS_GATEWAY_ADDR":      "gateway.port",
	"SOUS_GATEWAY_KEYS_FILE": "gateway.keysSecret",
}

// sourceVariables are the SOUS_* variables a Config struct of cmd/dir reads
// (its env tags, read from the source: a main package cannot be imported).
func sourceVariables(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	for name := range programDefaults(t, dir) {
		if strings.HasPrefix(name, "SOUS_") {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// readmeDefaults are the README's configuration tables: variable -> the
// default column's first `literal`, "" where it has none (– or words).
func readmeDefaults(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| `(SOUS_[A-Z0-9_]+)` \\| ([^|]*) \\|")
	lit := regexp.MustCompile("^`([^`]*)`")
	out := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(string(b), -1) {
		def := ""
		if l := lit.FindStringSubmatch(strings.TrimSpace(m[2])); l != nil {
			def = l[1]
		}
		out[m[1]] = def
	}
	if len(out) < 60 {
		t.Fatalf("found only %d SOUS_* rows in README.md's tables; did their format change?", len(out))
	}
	return out
}

// valuesSettings reads a map of settings (config:, or gateway: config:
// with parent "gateway:") from values.yaml's text: name -> value, and
// whether a comment line is right above it. block is the first such line
// after parent's ("": from the top).
func valuesSettings(t *testing.T, text, parent, block, indent string) (values map[string]string, commented map[string]bool) {
	t.Helper()
	values, commented = map[string]string{}, map[string]bool{}
	lines := strings.Split(text, "\n")
	from := 0
	if parent != "" {
		if from = slices.Index(lines, parent); from < 0 {
			t.Fatalf("values.yaml has no line %q", parent)
		}
	}
	start := slices.Index(lines[from:], block)
	if start < 0 {
		t.Fatalf("values.yaml has no line %q after %q", block, parent)
	}
	start += from
	kv := regexp.MustCompile(`^` + indent + `(SOUS_[A-Z0-9_]+): *(.*)$`)
	for i := start + 1; i < len(lines); i++ {
		l := lines[i]
		if strings.TrimSpace(l) == "" || strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		if !strings.HasPrefix(l, indent) {
			break
		}
		m := kv.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("values.yaml %s: line %q is not a SOUS_* setting", block, l)
		}
		v := m[2]
		if u, err := strconv.Unquote(v); err == nil {
			v = u
		}
		values[m[1]] = v
		commented[m[1]] = strings.HasPrefix(strings.TrimSpace(lines[i-1]), "#")
	}
	return values, commented
}

// TestHelmValuesReachEverySetting: every SOUS_* variable the worker's and
// the gateway's Config read can be set through the chart's values, and
// reaches the container with the value given; values.yaml lists each with
// the README's default (or empty: the program's own default applies), and
// a value that differs says why in a comment above it. A new knob in either
// Config fails this test until values.yaml has it.
func TestHelmValuesReachEverySetting(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	ks, _ := setup(t)
	b, err := os.ReadFile(filepath.Join(repoRoot(t), helmChart, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	workerValues, workerCommented := valuesSettings(t, string(b), "", "config:", "  ")
	gatewayValues, gatewayCommented := valuesSettings(t, string(b), "gateway:", "  config:", "    ")
	defaults := readmeDefaults(t)
	known := map[string]bool{}
	for _, n := range envcheck.Names {
		known[n] = true
	}

	// Every value is a known variable, with the README's default or a reason.
	for _, vs := range []struct {
		values    map[string]string
		commented map[string]bool
		where     string
	}{{workerValues, workerCommented, "config"}, {gatewayValues, gatewayCommented, "gateway.config"}} {
		for name, v := range vs.values {
			def, ok := defaults[name]
			if !ok || !known[name] {
				t.Errorf("values.yaml %s.%s: no sous program reads it (not in README.md's tables or envcheck.Names)", vs.where, name)
				continue
			}
			if v != "" && v != def && !vs.commented[name] {
				t.Errorf("values.yaml %s.%s is %q, not README.md's default %q, and no comment above it says why", vs.where, name, v, def)
			}
			if v == "" && def != "" && !vs.commented[name] {
				t.Errorf("values.yaml %s.%s is empty where README.md's default is %q: write the default, or say above it what sets it", vs.where, name, def)
			}
		}
	}

	// Every variable a Config reads has a way in.
	gatewayOwn := func(n string) bool { return strings.HasPrefix(n, "SOUS_GATEWAY_") }
	var sentinels []string
	want := map[string]string{} // variable -> value it must reach the container with
	for _, dir := range []string{"worker", "gateway"} {
		for _, name := range sourceVariables(t, dir) {
			switch {
			case chartSecretSettings[name] != "" || chartGatewaySettings[name] != "":
				continue // checked below
			case gatewayOwn(name):
				if _, ok := gatewayValues[name]; !ok {
					t.Errorf("cmd/gateway reads %s, which values.yaml's gateway.config does not list", name)
					continue
				}
				want[name] = "v-" + strings.ToLower(name)
				sentinels = append(sentinels, "gateway.config."+name+"="+want[name])
			default:
				if _, ok := workerValues[name]; !ok {
					t.Errorf("cmd/%s reads %s, which values.yaml's config does not list", dir, name)
					continue
				}
				want[name] = "v-" + strings.ToLower(name)
				sentinels = append(sentinels, "config."+name+"="+want[name])
			}
		}
	}
	slices.Sort(sentinels)
	sentinels = slices.Compact(sentinels)
	if t.Failed() {
		return
	}
	// Rendered with every setting given, each reaches its container. Strings
	// only: --set-string, so that a sentinel is never read as a number.
	args := []string{"template", helmRelease, helmChart}
	for _, s := range sentinels {
		args = append(args, "--set-string", s)
	}
	args = append(args, "--set", "keda.enabled=false")
	out, err := runHelm(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	objs, errs := decodeDocs(ks, "helm template "+helmChart, out, false)
	if len(errs) > 0 {
		t.Fatal(errors.Join(errs...))
	}
	s := indexSet(objs)
	env := map[string]map[string]string{}
	for _, c := range []string{"worker", "gateway"} {
		o, ok := s["Deployment"][helmRelease+"-"+c]
		if !ok {
			t.Fatalf("no Deployment %s-%s", helmRelease, c)
		}
		w, err := workerContainer(s, o.typed.(*appsv1.Deployment), c)
		if err != nil {
			t.Fatal(err)
		}
		env[c] = maps.Clone(w.config)
		for _, e := range w.container.Env {
			env[c][e.Name] = e.Value
		}
	}
	for name, v := range want {
		c := "worker"
		if gatewayOwn(name) {
			c = "gateway"
		}
		if env[c][name] != v {
			t.Errorf("config %s=%s: the %s container has %s=%q", name, v, c, name, env[c][name])
		}
	}

	// The secrets reach both containers through a secretKeyRef.
	for name, set := range chartSecretSettings {
		objs := renderChart(t, ks, "", set)
		for _, c := range []string{"worker", "gateway"} {
			if name == "SOUS_ENGINE_API_KEY" && c == "gateway" {
				continue // the engine is the worker's
			}
			d := indexSet(objs)["Deployment"][helmRelease+"-"+c].typed.(*appsv1.Deployment)
			found := false
			for _, e := range d.Spec.Template.Spec.Containers[0].Env {
				found = found || e.Name == name && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil
			}
			if !found {
				t.Errorf("--set %s: the %s container has no %s from a Secret", set, c, name)
			}
		}
	}
	for name, value := range chartGatewaySettings {
		objs := renderChart(t, ks, "", value+"=9999")
		d := indexSet(objs)["Deployment"][helmRelease+"-gateway"].typed.(*appsv1.Deployment)
		found := false
		for _, e := range d.Spec.Template.Spec.Containers[0].Env {
			found = found || e.Name == name && e.Value != ""
		}
		if !found {
			t.Errorf("--set %s: the gateway has no %s", value, name)
		}
	}
}

// chartScalerSettings are the scaler's SOUS_SCALER_* settings that follow
// other values: the value, and how its setting to 9999 reaches the scaler.
var chartScalerSettings = map[string]struct{ set, want string }{
	"SOUS_SCALER_ADDR": {"scaler.port=9999", ":9999"},
}

// TestHelmScalerValuesReachEverySetting: every SOUS_SCALER_* variable
// cmd/scaler's Config reads can be set through the chart's values and
// reaches the scaler's container: scaler.config lists each (with README.md's
// default, or a comment saying why not), SOUS_SCALER_ADDR follows
// scaler.port (the Service and the trigger's scalerAddress with it), and
// SOUS_SCALER_MANAGEMENT_URL comes from the Secret scaler.managementUrlSecret
// names, never a value. The scaler's other variables (the broker's, the
// log's) are the workers' and reach it through scaler.extraEnv.
func TestHelmScalerValuesReachEverySetting(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	ks, _ := setup(t)
	b, err := os.ReadFile(filepath.Join(repoRoot(t), helmChart, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	values, commented := valuesSettings(t, string(b), "scaler:", "  config:", "    ")
	defaults := readmeDefaults(t)
	for name, v := range values {
		def, ok := defaults[name]
		switch {
		case !strings.HasPrefix(name, "SOUS_SCALER_"):
			t.Errorf("values.yaml scaler.config.%s: scaler.config holds SOUS_SCALER_* settings only", name)
		case !ok || !slices.Contains(envcheck.Names, name):
			t.Errorf("values.yaml scaler.config.%s: no sous program reads it (not in README.md's tables or envcheck.Names)", name)
		case v != "" && v != def && !commented[name]:
			t.Errorf("values.yaml scaler.config.%s is %q, not README.md's default %q, and no comment above it says why", name, v, def)
		case v == "" && def != "" && !commented[name]:
			t.Errorf("values.yaml scaler.config.%s is empty where README.md's default is %q: write the default, or say above it what sets it", name, def)
		}
	}

	const secretSetting = "SOUS_SCALER_MANAGEMENT_URL"
	args := []string{"scaler.enabled=true"}
	want := map[string]string{} // variable -> value it must reach the container with
	for _, name := range sourceVariables(t, "scaler") {
		if !strings.HasPrefix(name, "SOUS_SCALER_") || name == secretSetting {
			continue
		}
		if f, ok := chartScalerSettings[name]; ok {
			args, want[name] = append(args, f.set), f.want
			continue
		}
		if _, ok := values[name]; !ok {
			t.Errorf("cmd/scaler reads %s, which values.yaml's scaler.config does not list", name)
			continue
		}
		want[name] = "v-" + strings.ToLower(name)
		args = append(args, "--set-string=scaler.config."+name+"="+want[name])
	}
	if t.Failed() {
		return
	}
	if !slices.Contains(sourceVariables(t, "scaler"), secretSetting) {
		t.Fatalf("cmd/scaler no longer reads %s: update this test", secretSetting)
	}
	scalerEnv := func(s set) map[string]corev1.EnvVar {
		o, ok := s["Deployment"][helmRelease+"-scaler"]
		if !ok {
			t.Fatalf("no Deployment %s-scaler", helmRelease)
		}
		env := map[string]corev1.EnvVar{}
		for _, e := range o.typed.(*appsv1.Deployment).Spec.Template.Spec.Containers[0].Env {
			env[e.Name] = e
		}
		return env
	}
	s := indexSet(renderChart(t, ks, "", args...))
	env := scalerEnv(s)
	for name, v := range want {
		if env[name].Value != v {
			t.Errorf("%s: the scaler container has %s=%q, want %q", strings.Join(args, " "), name, env[name].Value, v)
		}
	}
	// The port moves the Service and the trigger with it.
	if svc := s["Service"][helmRelease+"-scaler"].typed.(*corev1.Service); svc.Spec.Ports[0].Port != 9999 {
		t.Errorf("scaler.port=9999: Service port %d", svc.Spec.Ports[0].Port)
	}
	if tr := s["ScaledObject"][helmRelease+"-worker"].typed.(*scaledObject).Spec.Triggers; len(tr) != 1 || !strings.HasSuffix(tr[0].Metadata["scalerAddress"], ":9999") {
		t.Errorf("scaler.port=9999: triggers %+v, want one whose scalerAddress ends in :9999", tr)
	}

	// The management URL: from the named Secret, optional; none without a name.
	ref := scalerEnv(indexSet(renderChart(t, ks, helmScalerValues, "scaler.managementUrlSecret.name=s", "scaler.managementUrlSecret.key=k")))[secretSetting].ValueFrom
	if ref == nil || ref.SecretKeyRef == nil || ref.SecretKeyRef.Name != "s" || ref.SecretKeyRef.Key != "k" || !isTrue(ref.SecretKeyRef.Optional) {
		t.Errorf("scaler.managementUrlSecret s/k: %s from %+v, want an optional secretKeyRef to Secret s key k", secretSetting, ref)
	}
	if e, ok := scalerEnv(indexSet(renderChart(t, ks, helmScalerValues, "scaler.managementUrlSecret.name=")))[secretSetting]; ok {
		t.Errorf("scaler.managementUrlSecret.name empty: the scaler still has %s (%+v)", secretSetting, e)
	}
}

// TestHelmAgreesWithKustomize renders each overlay and the chart on the same
// broker (release sous, so the names match) and compares what matters: the
// probes, the grace periods and the timeouts they cover, RBAC, the PDBs,
// the security contexts, resources, the KEDA ScaledObject (triggers and
// their metadata, authentication, timing, HPA behaviour) and the worker's
// configuration, a setting absent on one side counting as the worker's
// default.
// The lanes overlay is compared too (a trigger per lane queue), the
// rabbitmq-scaler overlay with scaler.enabled (the scaler's Deployment,
// Service, PDB and ServiceAccount, one external trigger and no
// TriggerAuthentication), and the vLLM and llama.cpp overlays with the
// chart's presets of the same names.
func TestHelmAgreesWithKustomize(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	ks, tr := setup(t)
	for _, c := range []struct{ overlay, namespace, values string }{
		{"rabbitmq", "sous-rabbitmq", "broker: {kind: rabbitmq}\n"},
		// The overlay's storage class for the model volume.
		{"servicebus", "sous-servicebus", "broker: {kind: servicebus}\nmodels: {storageClassName: azurefile-csi-premium}\n"},
		// Its lanes, as the overlay's ConfigMap has them.
		{"rabbitmq-lanes", "sous-lanes", helmLanesValues},
		// The work-aware scaler: its Deployment, Service, PDB and
		// ServiceAccount, the external trigger, no TriggerAuthentication.
		{"rabbitmq-scaler", "sous-rabbitmq", helmScalerValues},
		// The engine presets and the engine overlays (on RabbitMQ).
		{"vllm", "sous-vllm", "engine: {kind: vllm}\n"},
		{"llamacpp", "sous-llamacpp", "engine: {kind: llamacpp}\nconfig: {SOUS_BATCH_MAX: \"8\"}\n"},
	} {
		broker := c.overlay
		t.Run(broker, func(t *testing.T) {
			t.Parallel()
			kobjs, errs := render(ks, tr, "deploy/k8s/overlays/"+broker)
			if len(errs) > 0 {
				t.Fatal(errors.Join(errs...))
			}
			hobjs := renderChart(t, ks, c.values, "--namespace="+c.namespace) // the overlay's
			defaults := map[string]map[string]string{"sous-worker": workerDefaults(t, "sous.requests")}
			defaults["sous-gateway"] = maps.Clone(defaults["sous-worker"])
			for k, v := range programDefaults(t, "gateway") {
				if v != "" { // an empty tag is a derived default, such as <SOUS_QUEUE>.dlq
					defaults["sous-gateway"][k] = v
				}
			}
			// The scaler reads no ConfigMap: its own defaults alone.
			defaults["sous-scaler"] = programDefaults(t, "scaler")
			if errs := compareRenders(indexSet(kobjs), indexSet(hobjs), defaults); len(errs) > 0 {
				t.Fatalf("the chart and deploy/k8s/overlays/%s disagree:\n%v", broker, errors.Join(errs...))
			}
		})
	}
}

// programDefaults are the defaults of cmd/dir (gateway, scaler): its
// Config's envDefault tags, read from the source as workerDefaults does.
func programDefaults(t *testing.T, dir string) map[string]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot(t), "cmd", dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	tag := regexp.MustCompile(`env:"([A-Z0-9_]+)"(?: envDefault:"([^"]*)")?`)
	out := map[string]string{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range tag.FindAllStringSubmatch(string(b), -1) {
			out[m[1]] = m[2]
		}
	}
	if len(out) < 15 {
		t.Fatalf("found only %d variables in cmd/%s", len(out), dir)
	}
	return out
}

// chartOnlyDifferences are the worker settings on which the chart and the
// overlays differ on purpose, and why.
var chartOnlyDifferences = map[string]string{
	// The overlays send to a Collector in the observability namespace; a
	// chart cannot assume one (extraConfig sets it).
	"OTEL_EXPORTER_OTLP_ENDPOINT": "no default collector",
}

// compareRenders compares the kustomize render k with the chart's h.
// defaults are each Deployment's program's defaults.
func compareRenders(k, h set, defaults map[string]map[string]string) []error {
	var errs []error
	diff := func(what string, a, b any) {
		if !reflect.DeepEqual(a, b) {
			ja, _ := yaml.Marshal(a)
			jb, _ := yaml.Marshal(b)
			errs = append(errs, fmt.Errorf("%s:\n  kustomize: %s\n  chart:     %s", what, strings.ReplaceAll(string(ja), "\n", "\n             "), strings.ReplaceAll(string(jb), "\n", "\n             ")))
		}
	}
	for _, name := range []string{"sous-worker", "sous-gateway", "sous-scaler"} {
		ko, ok1 := k["Deployment"][name]
		ho, ok2 := h["Deployment"][name]
		if !ok1 && !ok2 && name == "sous-scaler" {
			continue // neither deploys the work-aware scaler
		}
		if !ok1 || !ok2 {
			errs = append(errs, fmt.Errorf("Deployment %s: in kustomize %v, in the chart %v", name, ok1, ok2))
			continue
		}
		kd, hd := ko.typed.(*appsv1.Deployment), ho.typed.(*appsv1.Deployment)
		kp, hp := kd.Spec.Template.Spec, hd.Spec.Template.Spec
		kc, hc := kp.Containers[0], hp.Containers[0]
		diff(name+" startupProbe", kc.StartupProbe, hc.StartupProbe)
		diff(name+" livenessProbe", kc.LivenessProbe, hc.LivenessProbe)
		diff(name+" readinessProbe", kc.ReadinessProbe, hc.ReadinessProbe)
		diff(name+" ports", kc.Ports, hc.Ports)
		diff(name+" terminationGracePeriodSeconds", kp.TerminationGracePeriodSeconds, hp.TerminationGracePeriodSeconds)
		diff(name+" pod securityContext", kp.SecurityContext, hp.SecurityContext)
		diff(name+" container securityContext", kc.SecurityContext, hc.SecurityContext)
		diff(name+" resources", kc.Resources, hc.Resources)
		diff(name+" tolerations", kp.Tolerations, hp.Tolerations)
		diff(name+" automountServiceAccountToken", kp.AutomountServiceAccountToken, hp.AutomountServiceAccountToken)
		diff(name+" serviceAccountName", kp.ServiceAccountName, hp.ServiceAccountName)
		diff(name+" strategy", kd.Spec.Strategy, hd.Spec.Strategy)
		diff(name+" replicas", kd.Spec.Replicas, hd.Spec.Replicas)
		// Mounts and volumes in any order.
		byPath := func(a, b corev1.VolumeMount) int { return strings.Compare(a.MountPath, b.MountPath) }
		byName := func(a, b corev1.Volume) int { return strings.Compare(a.Name, b.Name) }
		diff(name+" volume mounts", slices.SortedFunc(slices.Values(kc.VolumeMounts), byPath), slices.SortedFunc(slices.Values(hc.VolumeMounts), byPath))
		diff(name+" volumes", slices.SortedFunc(slices.Values(kp.Volumes), byName), slices.SortedFunc(slices.Values(hp.Volumes), byName))
		diff(name+" workload identity label", kd.Spec.Template.Labels["azure.workload.identity/use"], hd.Spec.Template.Labels["azure.workload.identity/use"])
		kenv, henv := envFromSecrets(kc), envFromSecrets(hc)
		diff(name+" env from the downward API and Secrets", kenv, henv)
		diff(name+" scrape annotations", scrape(kd), scrape(hd))
		// What the container's environment holds, the ConfigMap included.
		kw, err1 := workerContainer(k, kd, "")
		hw, err2 := workerContainer(h, hd, "")
		if err := errors.Join(err1, err2); err != nil {
			errs = append(errs, err)
			continue
		}
		kcfg, hcfg := effectiveEnv(kw, defaults[name]), effectiveEnv(hw, defaults[name])
		for _, key := range slices.Sorted(maps.Keys(mergeKeys(kcfg, hcfg))) {
			if _, ok := chartOnlyDifferences[key]; ok {
				continue
			}
			if strings.HasPrefix(key, "SOUS_GATEWAY_") && name != "sous-gateway" {
				continue // the overlays' shared ConfigMap hands them to the workers too, which do not read them
			}
			if kcfg[key] != hcfg[key] {
				errs = append(errs, fmt.Errorf("%s: %s is %q in kustomize, %q in the chart", name, key, kcfg[key], hcfg[key]))
			}
		}
		// The grace period covers the drain and the longest batch in both.
		if name == "sous-worker" {
			for which, cfg := range map[string]map[string]string{"kustomize": kcfg, "chart": hcfg} {
				drain, err1 := timeDuration(cfg, "SOUS_DRAIN_TIMEOUT")
				longest, err2 := timeDuration(cfg, "SOUS_ENGINE_TIMEOUT")
				g := kp.TerminationGracePeriodSeconds
				if which == "chart" {
					g = hp.TerminationGracePeriodSeconds
				}
				if err := errors.Join(err1, err2); err != nil || g == nil || secs(*g) <= drain+longest {
					errs = append(errs, fmt.Errorf("%s: terminationGracePeriodSeconds does not exceed SOUS_DRAIN_TIMEOUT + SOUS_ENGINE_TIMEOUT (%v)", which, err))
				}
			}
		}
	}
	for _, kind := range []string{"Role", "RoleBinding", "ServiceAccount", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication", "Service", "PersistentVolumeClaim"} {
		names := mergeKeys(k[kind], h[kind])
		for _, name := range slices.Sorted(maps.Keys(names)) {
			ko, ok1 := k[kind][name]
			ho, ok2 := h[kind][name]
			if !ok1 || !ok2 {
				errs = append(errs, fmt.Errorf("%s %s: in kustomize %v, in the chart %v", kind, name, ok1, ok2))
				continue
			}
			switch kt := ko.typed.(type) {
			case *rbacv1.Role:
				diff("Role "+name+" rules", kt.Rules, ho.typed.(*rbacv1.Role).Rules)
			case *rbacv1.RoleBinding:
				hb := ho.typed.(*rbacv1.RoleBinding)
				diff("RoleBinding "+name, []any{kt.RoleRef, kt.Subjects}, []any{hb.RoleRef, hb.Subjects})
			case *corev1.ServiceAccount:
				hs := ho.typed.(*corev1.ServiceAccount)
				diff("ServiceAccount "+name, []any{kt.AutomountServiceAccountToken, kt.Annotations}, []any{hs.AutomountServiceAccountToken, hs.Annotations})
			case *policyv1.PodDisruptionBudget:
				hp := ho.typed.(*policyv1.PodDisruptionBudget)
				diff("PodDisruptionBudget "+name, []any{kt.Spec.MaxUnavailable, kt.Spec.MinAvailable, kt.Spec.UnhealthyPodEvictionPolicy}, []any{hp.Spec.MaxUnavailable, hp.Spec.MinAvailable, hp.Spec.UnhealthyPodEvictionPolicy})
			case *scaledObject:
				hs := ho.typed.(*scaledObject)
				diff("ScaledObject "+name+" spec", kt.Spec, hs.Spec)
			case *triggerAuthentication:
				diff("TriggerAuthentication "+name+" spec", kt.Spec, ho.typed.(*triggerAuthentication).Spec)
			case *corev1.Service:
				hs := ho.typed.(*corev1.Service)
				diff("Service "+name, []any{kt.Spec.Type, kt.Spec.Ports}, []any{hs.Spec.Type, hs.Spec.Ports})
			case *corev1.PersistentVolumeClaim:
				hp := ho.typed.(*corev1.PersistentVolumeClaim)
				diff("PersistentVolumeClaim "+name, []any{kt.Spec.AccessModes, kt.Spec.Resources, kt.Spec.StorageClassName}, []any{hp.Spec.AccessModes, hp.Spec.Resources, hp.Spec.StorageClassName})
			}
		}
	}
	return errs
}

// envFromSecrets is a container's env that is not a plain value (the
// downward API, secretKeyRef), by name.
func envFromSecrets(c corev1.Container) map[string]*corev1.EnvVarSource {
	out := map[string]*corev1.EnvVarSource{}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			out[e.Name] = e.ValueFrom
		}
	}
	return out
}

func scrape(d *appsv1.Deployment) map[string]string {
	out := map[string]string{}
	for k, v := range d.Spec.Template.Annotations {
		if strings.HasPrefix(k, "prometheus.io/") {
			out[k] = v
		}
	}
	return out
}

// effectiveEnv is what a container's program reads: its ConfigMaps, its env
// values over them, and the worker's default for each of its variables the
// two leave out.
func effectiveEnv(w *workerEnv, defaults map[string]string) map[string]string {
	out := maps.Clone(defaults)
	maps.Copy(out, w.config)
	for _, e := range w.container.Env {
		if e.ValueFrom == nil {
			out[e.Name] = e.Value
		}
	}
	// SOUS_MODELS_ALLOWED defaults to SOUS_MODEL alone.
	if out["SOUS_MODELS_ALLOWED"] == "" {
		out["SOUS_MODELS_ALLOWED"] = out["SOUS_MODEL"]
	}
	return out
}

func mergeKeys[V any](a, b map[string]V) map[string]bool {
	out := map[string]bool{}
	for k := range a {
		out[k] = true
	}
	for k := range b {
		out[k] = true
	}
	return out
}

// TestHelmRefusesBadValues: values that cannot work stop helm with a
// message naming the value, rather than rendering something broken.
func TestHelmRefusesBadValues(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	for _, c := range []struct{ set, want string }{
		{"engine.kind=tgi", `engine.kind "tgi"`},
		{"broker.kind=kafka", `broker.kind "kafka"`},
		{"config.SOUS_AMQP_URL=amqp://u:p@h/", "config.SOUS_AMQP_URL is a secret"},
		{"config.OLLAMA_HOST=x", "config.OLLAMA_HOST: config holds SOUS_* settings only"},
		{"gateway.config.SOUS_QUEUE=x", "gateway.config.SOUS_QUEUE: gateway.config holds SOUS_GATEWAY_* settings only"},
		{"scaler.enabled=true,scaler.config.SOUS_LOG_LEVEL=debug", "scaler.config.SOUS_LOG_LEVEL: scaler.config holds SOUS_SCALER_* settings only"},
		{"scaler.enabled=true,scaler.config.SOUS_SCALER_MANAGEMENT_URL=http://u:p@h/", "scaler.config.SOUS_SCALER_MANAGEMENT_URL is a secret"},
		{"scaler.enabled=true,scaler.config.SOUS_SCALER_ADDR=:1", "scaler.config.SOUS_SCALER_ADDR follows scaler.port"},
	} {
		t.Run(c.set, func(t *testing.T) {
			t.Parallel()
			_, err := helmTemplate(t, "", c.set)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("--set %s: want an error containing %q, got %v", c.set, c.want, err)
			}
		})
	}
}

// TestHelmServiceMonitor: off by default; on, it selects a metrics Service
// for the workers and one for the gateway, each on the pods' http port.
func TestHelmServiceMonitor(t *testing.T) {
	t.Parallel()
	helmBin(t) // skip (or fail under CI) once, not in every subtest
	ks, _ := setup(t)
	monitors := func(out []byte) []map[string]any {
		docs, err := yamlDocs(out)
		if err != nil {
			t.Fatal(err)
		}
		var sm []map[string]any
		for _, d := range docs {
			if d["kind"] == "ServiceMonitor" {
				sm = append(sm, d)
			}
		}
		return sm
	}
	out, err := helmTemplate(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if sm := monitors(out); len(sm) != 0 {
		t.Fatalf("a ServiceMonitor by default: %v", sm)
	}
	out, err = helmTemplate(t, "", "serviceMonitor.enabled=true")
	if err != nil {
		t.Fatal(err)
	}
	sm := monitors(out)
	if len(sm) != 1 || sm[0]["apiVersion"] != "monitoring.coreos.com/v1" {
		t.Fatalf("want one monitoring.coreos.com/v1 ServiceMonitor, got %v", sm)
	}
	var spec struct {
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"endpoints"`
	}
	b, _ := yaml.Marshal(sm[0]["spec"])
	if err := yaml.UnmarshalStrict(b, &spec); err != nil {
		t.Fatal(err)
	}
	if len(spec.Endpoints) != 1 || spec.Endpoints[0].Port != "http" || spec.Endpoints[0].Path != "/metrics" {
		t.Fatalf("endpoints %+v, want port http, path /metrics", spec.Endpoints)
	}
	s := indexSet(renderChart(t, ks, "", "serviceMonitor.enabled=true"))
	selected := map[string]bool{}
	for _, o := range s["Service"] {
		svc := o.typed.(*corev1.Service)
		if !labelsMatch(spec.Selector.MatchLabels, svc.Labels) {
			continue
		}
		for _, d := range s["Deployment"] {
			dep := d.typed.(*appsv1.Deployment)
			if !labelsMatch(svc.Spec.Selector, dep.Spec.Template.Labels) {
				continue
			}
			for _, p := range svc.Spec.Ports {
				if p.Name == "http" && p.TargetPort.StrVal == "http" {
					selected[dep.Name] = true
				}
			}
		}
	}
	if !selected[helmRelease+"-worker"] || !selected[helmRelease+"-gateway"] || len(selected) != 2 {
		t.Fatalf("the ServiceMonitor reaches the http port of %v, want the worker and the gateway", slices.Sorted(maps.Keys(selected)))
	}
}
