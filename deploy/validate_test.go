package deploy_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metavalidation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/worker"
)

// object is one Kubernetes object read from a file or a kustomize render.
type object struct {
	where      string // file#index or "kustomize build <dir>"
	apiVersion string
	kind       string
	name       string
	json       []byte
	// typed is the decoded object (*appsv1.Deployment, *scaledObject, ...);
	// nil when the object did not decode.
	typed any
}

func (o object) String() string { return fmt.Sprintf("%s: %s %s", o.where, o.kind, o.name) }

// coreKinds are the built-in kinds the manifests may use, decoded strictly
// into their k8s.io/api types. Any other kind is refused: every manifest is
// validated or the test fails.
var coreKinds = map[string]func() any{
	"v1/ConfigMap":                             func() any { return &corev1.ConfigMap{} },
	"v1/Secret":                                func() any { return &corev1.Secret{} },
	"v1/ServiceAccount":                        func() any { return &corev1.ServiceAccount{} },
	"v1/Service":                               func() any { return &corev1.Service{} },
	"v1/PersistentVolumeClaim":                 func() any { return &corev1.PersistentVolumeClaim{} },
	"v1/Namespace":                             func() any { return &corev1.Namespace{} },
	"apps/v1/Deployment":                       func() any { return &appsv1.Deployment{} },
	"policy/v1/PodDisruptionBudget":            func() any { return &policyv1.PodDisruptionBudget{} },
	"batch/v1/Job":                             func() any { return &batchv1.Job{} },
	"rbac.authorization.k8s.io/v1/Role":        func() any { return &rbacv1.Role{} },
	"rbac.authorization.k8s.io/v1/RoleBinding": func() any { return &rbacv1.RoleBinding{} },
}

// scaledObject is the part of a KEDA ScaledObject the policy checks read,
// decoded after the CRD schema has validated the whole object.
type scaledObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		ScaleTargetRef struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Name       string `json:"name"`
			// EnvSourceContainerName is the container whose env *FromEnv reads.
			EnvSourceContainerName string `json:"envSourceContainerName"`
		} `json:"scaleTargetRef"`
		PollingInterval *int32 `json:"pollingInterval"`
		CooldownPeriod  *int32 `json:"cooldownPeriod"`
		MinReplicaCount *int32 `json:"minReplicaCount"`
		MaxReplicaCount *int32 `json:"maxReplicaCount"`
		Advanced        *struct {
			HorizontalPodAutoscalerConfig *struct {
				Behavior *autoscalingv2.HorizontalPodAutoscalerBehavior `json:"behavior"`
			} `json:"horizontalPodAutoscalerConfig"`
		} `json:"advanced"`
		Triggers []trigger `json:"triggers"`
	} `json:"spec"`
}

type trigger struct {
	Type              string            `json:"type"`
	Name              string            `json:"name"`
	Metadata          map[string]string `json:"metadata"`
	AuthenticationRef *struct {
		Name string `json:"name"`
		Kind string `json:"kind"`
	} `json:"authenticationRef"`
}

type triggerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		PodIdentity *struct {
			Provider   string `json:"provider"`
			IdentityID string `json:"identityId"`
		} `json:"podIdentity"`
		SecretTargetRef []struct {
			Parameter string `json:"parameter"`
			Name      string `json:"name"`
			Key       string `json:"key"`
		} `json:"secretTargetRef"`
		ConfigMapTargetRef []struct {
			Parameter string `json:"parameter"`
			Name      string `json:"name"`
			Key       string `json:"key"`
		} `json:"configMapTargetRef"`
		Env []struct {
			Parameter     string `json:"parameter"`
			Name          string `json:"name"`
			ContainerName string `json:"containerName"`
		} `json:"env"`
	} `json:"spec"`
}

// decodeDocs splits a YAML stream and validates each document: built-in
// kinds strictly against their Go types (unknown, misspelt, miscased or
// duplicate fields and wrong types fail), KEDA kinds against their CRD.
// A patch (partial) is decoded strictly but not held to what a whole object
// needs; the render it takes part in is.
func decodeDocs(ks *kedaSchemas, where string, b []byte, partial bool) ([]object, []error) {
	var objs []object
	var errs []error
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return objs, append(errs, fmt.Errorf("%s: %w", where, err))
		}
		if isBlankYAML(doc) {
			continue
		}
		w := where
		if !strings.HasPrefix(where, "kustomize build ") { // a render names objects by kind and name
			w = fmt.Sprintf("%s#%d", where, i)
		}
		o, oerrs := decodeObject(ks, w, doc, partial)
		errs = append(errs, oerrs...)
		if o != nil {
			objs = append(objs, *o)
		}
	}
	return objs, errs
}

func isBlankYAML(doc []byte) bool {
	for _, line := range strings.Split(string(doc), "\n") {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "#") && line != "---" {
			return false
		}
	}
	return true
}

func decodeObject(ks *kedaSchemas, where string, doc []byte, partial bool) (*object, []error) {
	j, err := yaml.YAMLToJSONStrict(doc) // refuses duplicate keys
	if err != nil {
		return nil, []error{fmt.Errorf("%s: %w", where, err)}
	}
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(j, &head); err != nil {
		return nil, []error{fmt.Errorf("%s: %w", where, err)}
	}
	o := &object{where: where, apiVersion: head.APIVersion, kind: head.Kind, name: head.Metadata.Name, json: j}
	fail := func(errs ...error) (*object, []error) {
		for i, err := range errs {
			errs[i] = fmt.Errorf("%s: %w", o, err)
		}
		return o, errs
	}
	var typed any
	var errs []error
	switch {
	case coreKinds[head.APIVersion+"/"+head.Kind] != nil:
		typed = coreKinds[head.APIVersion+"/"+head.Kind]()
		errs = strictDecode(j, typed)
	case head.APIVersion == "keda.sh/v1alpha1":
		if !partial {
			errs = ks.validateKEDA(head.Kind, j)
		}
		// The CRD leaves metadata to the API server: check it as ObjectMeta.
		var m struct {
			Metadata json.RawMessage `json:"metadata"`
		}
		if err := json.Unmarshal(j, &m); err != nil {
			return fail(err)
		}
		errs = append(errs, strictDecode(m.Metadata, &metav1.ObjectMeta{})...)
		switch head.Kind {
		case "ScaledObject":
			typed = &scaledObject{}
		case "TriggerAuthentication", "ClusterTriggerAuthentication":
			typed = &triggerAuthentication{}
		}
		if typed != nil {
			if err := json.Unmarshal(j, typed); err != nil {
				errs = append(errs, err)
			}
		}
	default:
		return fail(fmt.Errorf("no validator for apiVersion %q kind %q", head.APIVersion, head.Kind))
	}
	if !partial {
		errs = append(errs, validateMeta(typed)...)
	}
	if len(errs) > 0 {
		return fail(errs...)
	}
	if partial {
		return nil, nil
	}
	o.typed = typed
	return o, nil
}

// strictDecode decodes j into v as the API server does: case-sensitive field
// names, no unknown or duplicate fields, types as declared.
func strictDecode(j []byte, v any) []error {
	strictErrs, err := kjson.UnmarshalStrict(j, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return []error{err}
	}
	return strictErrs
}

// validateMeta applies the API server's checks on names, labels and
// annotations, and on ConfigMap keys.
func validateMeta(typed any) []error {
	acc, ok := typed.(metav1.Object)
	if !ok {
		return nil
	}
	var errs []error
	if acc.GetName() == "" {
		errs = append(errs, errors.New("metadata.name is empty"))
	}
	for _, msg := range validation.IsDNS1123Subdomain(acc.GetName()) {
		errs = append(errs, fmt.Errorf("metadata.name %q: %s", acc.GetName(), msg))
	}
	for _, e := range metavalidation.ValidateLabels(acc.GetLabels(), field.NewPath("metadata", "labels")) {
		errs = append(errs, e)
	}
	for k := range acc.GetAnnotations() {
		for _, msg := range validation.IsQualifiedName(strings.ToLower(k)) {
			errs = append(errs, fmt.Errorf("metadata.annotations %q: %s", k, msg))
		}
	}
	if cm, ok := typed.(*corev1.ConfigMap); ok {
		for k := range cm.Data {
			for _, msg := range validation.IsConfigMapKey(k) {
				errs = append(errs, fmt.Errorf("data key %q: %s", k, msg))
			}
		}
	}
	if d, ok := typed.(*appsv1.Deployment); ok {
		if d.Spec.Selector == nil || !labelsMatch(d.Spec.Selector.MatchLabels, d.Spec.Template.Labels) {
			errs = append(errs, errors.New("spec.selector does not match the pod template's labels"))
		}
	}
	return errs
}

func labelsMatch(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// validateTree validates every manifest under deploy/ in tr, renders every
// kustomization, and checks the rendered sets against the sous rules.
func validateTree(ks *kedaSchemas, tr tree) []error {
	var errs []error
	var files, kustomizations []string
	for p := range tr {
		if !strings.HasPrefix(p, "deploy/") || !(strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			continue
		}
		if strings.HasPrefix(p, "deploy/monitoring/") {
			continue // Prometheus rules and their tests: monitoring_test.go checks them with promtool
		}
		if path.Base(p) == "kustomization.yaml" {
			kustomizations = append(kustomizations, path.Dir(p))
		} else {
			files = append(files, p)
		}
	}
	sort.Strings(files)
	sort.Strings(kustomizations)

	patches := map[string]bool{}
	for _, dir := range kustomizations {
		for _, p := range kustomizationPatches(tr, dir) {
			patches[p] = true
		}
	}
	ex := examples{secrets: map[string]*corev1.Secret{}}
	for _, f := range files {
		objs, ferrs := decodeDocs(ks, f, tr[f], patches[f])
		errs = append(errs, ferrs...)
		for _, o := range objs {
			if s, ok := o.typed.(*corev1.Secret); ok {
				errs = append(errs, checkExampleSecret(f, s)...)
				ex.secrets[s.Name] = s
			}
		}
	}

	renders := map[string][]object{}
	for _, dir := range kustomizations {
		errs = append(errs, checkKustomization(tr, dir)...)
		if isComponent(tr, dir) {
			continue // rendered as part of the kustomizations that include it
		}
		objs, rerrs := render(ks, tr, dir)
		errs = append(errs, rerrs...)
		renders[dir] = objs
	}
	for _, dir := range kustomizations {
		errs = append(errs, checkSet(ks, renders[dir], ex)...)
	}
	for _, dir := range kustomizations {
		if strings.HasPrefix(dir, "deploy/k8s/overlays/") && !isComponent(tr, dir) {
			errs = append(errs, checkOverlayComplete(dir, renders[dir])...)
		}
	}
	var rendered []object
	for _, dir := range kustomizations {
		rendered = append(rendered, renders[dir]...)
	}
	errs = append(errs, checkJobs(rendered, renders["deploy/k8s/base"])...)
	if len(renders) == 0 || renders["deploy/k8s/base"] == nil {
		errs = append(errs, errors.New("deploy/k8s/base has no kustomization"))
	}
	return errs
}

// examples holds the example Secrets: the documentation of which Secrets, with
// which keys, the manifests expect to exist.
type examples struct {
	secrets map[string]*corev1.Secret
}

var (
	exampleFile     = regexp.MustCompile(`(^|/)[^/]*\.example\.ya?ml$`)
	sensitiveKey    = regexp.MustCompile(`(?i)password|secret|token|key|connection|url|credential`)
	placeholderText = "REPLACE-WITH-"
)

// checkExampleSecret: Secrets in the repo are examples, named so, with
// placeholders where a credential would be, in stringData so that a reviewer
// sees them.
func checkExampleSecret(file string, s *corev1.Secret) []error {
	var errs []error
	if !exampleFile.MatchString(file) {
		errs = append(errs, fmt.Errorf("%s: Secret %s outside a *.example.yaml file; real Secrets are created by hand, never committed", file, s.Name))
	}
	if len(s.Data) > 0 {
		errs = append(errs, fmt.Errorf("%s: Secret %s uses data (base64); use stringData so the placeholder is visible", file, s.Name))
	}
	for k, v := range s.StringData {
		if k == "host" || k == "username" {
			continue // locations and names, not credentials
		}
		if sensitiveKey.MatchString(k) && !strings.Contains(v, placeholderText) {
			errs = append(errs, fmt.Errorf("%s: Secret %s key %s holds no %q placeholder; an example must not carry a credential", file, s.Name, k, placeholderText))
		}
	}
	return errs
}

// kustomizationPatches lists the patch files of the kustomization in dir.
func kustomizationPatches(tr tree, dir string) []string {
	var k types.Kustomization
	if err := yaml.Unmarshal(tr[dir+"/kustomization.yaml"], &k); err != nil {
		return nil // checkKustomization reports it
	}
	var ps []string
	for _, p := range k.Patches {
		if p.Path != "" {
			ps = append(ps, path.Clean(path.Join(dir, p.Path)))
		}
	}
	return ps
}

// checkKustomization decodes a kustomization strictly and checks that every
// file it names exists and that it never applies an example.
func checkKustomization(tr tree, dir string) []error {
	p := dir + "/kustomization.yaml"
	j, err := yaml.YAMLToJSONStrict(tr[p])
	if err != nil {
		return []error{fmt.Errorf("%s: %w", p, err)}
	}
	var k types.Kustomization
	var errs []error
	for _, err := range strictDecode(j, &k) {
		errs = append(errs, fmt.Errorf("%s: %w", p, err))
	}
	switch k.APIVersion + "/" + k.Kind {
	case "kustomize.config.k8s.io/v1beta1/Kustomization", "kustomize.config.k8s.io/v1alpha1/Component":
	default:
		errs = append(errs, fmt.Errorf("%s: apiVersion/kind %s/%s, want kustomize.config.k8s.io/v1beta1/Kustomization or kustomize.config.k8s.io/v1alpha1/Component", p, k.APIVersion, k.Kind))
	}
	refs := append([]string{}, k.Resources...)
	refs = append(refs, k.Components...)
	for _, patch := range k.Patches {
		if patch.Path != "" {
			refs = append(refs, patch.Path)
		}
	}
	for _, ref := range refs {
		target := path.Clean(path.Join(dir, ref))
		if exampleFile.MatchString(target) {
			errs = append(errs, fmt.Errorf("%s: applies example %s; examples hold placeholders and are never applied", p, ref))
		}
		if _, isFile := tr[target]; isFile {
			continue
		}
		if _, isDir := tr[target+"/kustomization.yaml"]; isDir {
			continue
		}
		errs = append(errs, fmt.Errorf("%s: %s does not exist (no file, no directory with a kustomization.yaml)", p, ref))
	}
	return errs
}

// isComponent reports whether the kustomization in dir is a Component: a
// piece other kustomizations include (components:), never built on its own.
func isComponent(tr tree, dir string) bool {
	var k types.Kustomization
	if err := yaml.Unmarshal(tr[dir+"/kustomization.yaml"], &k); err != nil {
		return false // checkKustomization reports it
	}
	return k.Kind == types.ComponentKind
}

var krustyMu sync.Mutex

// render runs kustomize (krusty, in memory, no network) on dir and validates
// each rendered object again: patches can break what the files had right.
func render(ks *kedaSchemas, tr tree, dir string) ([]object, []error) {
	fs := filesys.MakeFsInMemory()
	for p, b := range tr {
		if err := fs.WriteFile("/"+p, b); err != nil {
			return nil, []error{err}
		}
	}
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	// kustomize keeps its OpenAPI schema in package state without a lock
	// (kyaml/openapi): two builds at once race, so parallel tests take turns.
	krustyMu.Lock()
	res, err := k.Run(fs, "/"+dir)
	var out []byte
	if err == nil {
		out, err = res.AsYaml()
	}
	krustyMu.Unlock()
	if err != nil {
		return nil, []error{fmt.Errorf("kustomize build %s: %w", dir, err)}
	}
	return decodeDocs(ks, "kustomize build "+dir, out, false)
}

// checkOverlayComplete: an overlay renders everything a running deployment needs.
func checkOverlayComplete(dir string, objs []object) []error {
	want := []string{"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"}
	have := map[string]bool{}
	for _, o := range objs {
		have[o.kind] = true
	}
	var errs []error
	for _, k := range want {
		if k == "TriggerAuthentication" && !needsTriggerAuth(objs) {
			continue // no trigger reads one (an external trigger: scaler_test.go)
		}
		if !have[k] {
			errs = append(errs, fmt.Errorf("kustomize build %s: no %s", dir, k))
		}
	}
	return errs
}

// set indexes a rendered set of objects by kind and name.
type set map[string]map[string]object

func indexSet(objs []object) set {
	s := set{}
	for _, o := range objs {
		if o.typed == nil {
			continue
		}
		if s[o.kind] == nil {
			s[o.kind] = map[string]object{}
		}
		s[o.kind][o.name] = o
	}
	return s
}

func (s set) configMap(name string) *corev1.ConfigMap {
	if o, ok := s["ConfigMap"][name]; ok {
		return o.typed.(*corev1.ConfigMap)
	}
	return nil
}

// checkSet applies the sous rules to one rendered kustomization.
func checkSet(ks *kedaSchemas, objs []object, ex examples) []error {
	s := indexSet(objs)
	var errs []error
	for _, o := range s["Deployment"] {
		d := o.typed.(*appsv1.Deployment)
		errs = append(errs, prefix(o, checkPodSpec(&d.Spec.Template.Spec))...)
		if d.Spec.Template.Labels["app.kubernetes.io/component"] == "gateway" {
			errs = append(errs, prefix(o, checkGateway(s, d, ex))...) // gateway_test.go
			continue
		}
		if isScaler(d) {
			errs = append(errs, prefix(o, checkScaler(d, ex))...) // scaler_test.go
			continue
		}
		errs = append(errs, prefix(o, checkWorker(s, d, ex))...)
	}
	for _, o := range s["Service"] {
		errs = append(errs, prefix(o, checkService(s, o.typed.(*corev1.Service)))...)
	}
	for _, o := range s["ServiceAccount"] {
		sa := o.typed.(*corev1.ServiceAccount)
		if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
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
		errs = append(errs, prefix(o, checkScaledObject(ks, s, o.typed.(*scaledObject)))...)
	}
	for _, o := range s["TriggerAuthentication"] {
		for _, ref := range o.typed.(*triggerAuthentication).Spec.SecretTargetRef {
			if sec, ok := ex.secrets[ref.Name]; !ok {
				errs = append(errs, fmt.Errorf("%s: reads Secret %s, which no *.example.yaml documents", o, ref.Name))
			} else if _, ok := sec.StringData[ref.Key]; !ok {
				errs = append(errs, fmt.Errorf("%s: reads key %s of Secret %s, which its example does not have", o, ref.Key, ref.Name))
			}
		}
	}
	return errs
}

func prefix(o object, errs []error) []error {
	for i, err := range errs {
		errs[i] = fmt.Errorf("%s: %w", o, err)
	}
	return errs
}

// checkPodSpec: the restricted Pod Security Standard and then some.
func checkPodSpec(ps *corev1.PodSpec) []error {
	var errs []error
	psc := ps.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	writable := map[string]bool{}
	for _, v := range ps.Volumes {
		if v.EmptyDir != nil {
			writable[v.Name] = true
		}
	}
	for _, c := range ps.Containers {
		sc := c.SecurityContext
		if sc == nil {
			sc = &corev1.SecurityContext{}
		}
		name := "container " + c.Name
		if !isTrue(sc.RunAsNonRoot) && !(sc.RunAsNonRoot == nil && isTrue(psc.RunAsNonRoot)) {
			errs = append(errs, fmt.Errorf("%s: runAsNonRoot must be true", name))
		}
		if uid := effectiveUID(psc, sc); uid == nil || *uid == 0 {
			errs = append(errs, fmt.Errorf("%s: runAsUser must be a non-zero UID, so runAsNonRoot is checked against it", name))
		}
		if !isTrue(sc.ReadOnlyRootFilesystem) {
			errs = append(errs, fmt.Errorf("%s: readOnlyRootFilesystem must be true", name))
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			errs = append(errs, fmt.Errorf("%s: allowPrivilegeEscalation must be false", name))
		}
		if isTrue(sc.Privileged) {
			errs = append(errs, fmt.Errorf("%s: privileged", name))
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			errs = append(errs, fmt.Errorf("%s: capabilities must drop ALL", name))
		}
		if sc.Capabilities != nil && len(sc.Capabilities.Add) > 0 {
			errs = append(errs, fmt.Errorf("%s: adds capabilities %v", name, sc.Capabilities.Add))
		}
		seccomp := sc.SeccompProfile
		if seccomp == nil {
			seccomp = psc.SeccompProfile
		}
		if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
			errs = append(errs, fmt.Errorf("%s: seccompProfile must be RuntimeDefault", name))
		}
		tmp := false
		for _, m := range c.VolumeMounts {
			if m.MountPath == "/tmp" && writable[m.Name] && !m.ReadOnly {
				tmp = true
			}
		}
		if !tmp {
			errs = append(errs, fmt.Errorf("%s: read-only root filesystem without an emptyDir at /tmp for scratch", name))
		}
	}
	return errs
}

func isTrue(b *bool) bool { return b != nil && *b }

func effectiveUID(psc *corev1.PodSecurityContext, sc *corev1.SecurityContext) *int64 {
	if sc.RunAsUser != nil {
		return sc.RunAsUser
	}
	return psc.RunAsUser
}

const (
	gpuResource          = corev1.ResourceName("nvidia.com/gpu")
	workerPort           = 8080
	secretLookingEnvName = `(?i)(PASSWORD|SECRET|TOKEN|CONNECTION_STRING|AMQP_URL|API_KEY|PRIVATE_KEY)`
)

var secretEnv = regexp.MustCompile(secretLookingEnvName)

// workerEnv is what the worker container sees: its env plus the ConfigMaps it
// reads with envFrom (those in the set).
type workerEnv struct {
	container *corev1.Container
	config    map[string]string // merged envFrom ConfigMaps
	names     map[string]bool   // every env var name the container has
}

func workerContainer(s set, d *appsv1.Deployment, name string) (*workerEnv, error) {
	cs := d.Spec.Template.Spec.Containers
	if len(cs) == 0 {
		return nil, errors.New("no containers")
	}
	c := &cs[0]
	if name != "" {
		c = nil
		for i := range cs {
			if cs[i].Name == name {
				c = &cs[i]
			}
		}
		if c == nil {
			return nil, fmt.Errorf("no container %q", name)
		}
	}
	w := &workerEnv{container: c, config: map[string]string{}, names: map[string]bool{}}
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil {
			if cm := s.configMap(ef.ConfigMapRef.Name); cm != nil {
				for k, v := range cm.Data {
					w.config[ef.Prefix+k] = v
					w.names[ef.Prefix+k] = true
				}
			}
		}
		if ef.SecretRef != nil {
			if o, ok := s["Secret"][ef.SecretRef.Name]; ok {
				for k := range o.typed.(*corev1.Secret).StringData {
					w.names[ef.Prefix+k] = true
				}
			}
		}
	}
	for _, e := range c.Env {
		w.names[e.Name] = true
	}
	return w, nil
}

// checkWorker: the sous worker Deployment's own rules.
func checkWorker(s set, d *appsv1.Deployment, ex examples) []error {
	var errs []error
	w, err := workerContainer(s, d, "")
	if err != nil {
		return []error{err}
	}
	c := w.container
	if d.Spec.Replicas != nil {
		errs = append(errs, errors.New("spec.replicas is set; KEDA owns the replica count and every apply would reset it"))
	}
	if q, ok := c.Resources.Limits[gpuResource]; !ok || q.Value() < 1 {
		errs = append(errs, fmt.Errorf("container %s: no %s in resources.limits", c.Name, gpuResource))
	}
	if q, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok || q.IsZero() {
		errs = append(errs, fmt.Errorf("container %s: no memory request; the model must fit", c.Name))
	}
	tolerates := false
	for _, t := range d.Spec.Template.Spec.Tolerations {
		if t.Key == string(gpuResource) && (t.Operator == corev1.TolerationOpExists || t.Operator == "") {
			tolerates = true
		}
	}
	if !tolerates {
		errs = append(errs, fmt.Errorf("no toleration for %s: GPU nodes are usually tainted", gpuResource))
	}
	if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.ContainsAny(c.Image, ":@") {
		errs = append(errs, fmt.Errorf("container %s: image %q is not pinned to a tag or digest", c.Name, c.Image))
	}
	errs = append(errs, checkProbe(c, "livenessProbe", c.LivenessProbe, "/healthz", workerPort)...)
	errs = append(errs, checkProbe(c, "readinessProbe", c.ReadinessProbe, "/readyz", workerPort)...)
	ann := d.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(workerPort) || ann["prometheus.io/path"] != "/metrics" {
		errs = append(errs, fmt.Errorf("pod annotations: want prometheus.io/scrape \"true\", port \"%d\", path /metrics; got %v", workerPort, ann))
	}
	errs = append(errs, checkPodDeletionCost(s, d, c)...)
	if d.Spec.Template.Spec.ServiceAccountName == "" {
		errs = append(errs, errors.New("no serviceAccountName"))
	} else if s["ServiceAccount"] != nil {
		if _, ok := s["ServiceAccount"][d.Spec.Template.Spec.ServiceAccountName]; !ok {
			errs = append(errs, fmt.Errorf("serviceAccountName %s is not in the set", d.Spec.Template.Spec.ServiceAccountName))
		}
	}

	// Configuration comes from a ConfigMap in the set; secrets from Secrets.
	hasConfig := false
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil {
			hasConfig = true
			if s.configMap(ef.ConfigMapRef.Name) == nil {
				errs = append(errs, fmt.Errorf("envFrom ConfigMap %s is not in the set", ef.ConfigMapRef.Name))
			}
		}
	}
	if !hasConfig {
		errs = append(errs, errors.New("no envFrom configMapRef: configuration belongs in a ConfigMap"))
	}
	for k := range w.config {
		if secretEnv.MatchString(k) {
			errs = append(errs, fmt.Errorf("ConfigMap key %s looks like a secret; read it from a Secret with secretKeyRef", k))
		}
	}
	for _, e := range c.Env {
		if secretEnv.MatchString(e.Name) && (e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil) {
			errs = append(errs, fmt.Errorf("env %s looks like a secret; read it with secretKeyRef", e.Name))
		}
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			sec, ok := ex.secrets[ref.Name]
			if !ok {
				errs = append(errs, fmt.Errorf("env %s reads Secret %s, which no *.example.yaml documents", e.Name, ref.Name))
			} else if _, ok := sec.StringData[ref.Key]; !ok {
				errs = append(errs, fmt.Errorf("env %s reads key %s of Secret %s, which its example does not have", e.Name, ref.Key, ref.Name))
			}
		}
	}
	if len(w.config) == 0 {
		return errs // base-less sets (keda/ alone) have nothing more to check
	}

	// Grace period > SOUS_DRAIN_TIMEOUT + the longest batch.
	drain, err := timeDuration(w.config, "SOUS_DRAIN_TIMEOUT")
	if err != nil {
		errs = append(errs, err)
	}
	longest, err := timeDuration(w.config, "SOUS_ENGINE_TIMEOUT")
	if err != nil {
		errs = append(errs, fmt.Errorf("%w (it bounds one batch; the grace period is derived from it)", err))
	}
	grace := d.Spec.Template.Spec.TerminationGracePeriodSeconds
	if grace == nil {
		errs = append(errs, errors.New("terminationGracePeriodSeconds not set (default 30 s)"))
	} else if need := drain + longest; secs(int64(*grace)) <= need {
		errs = append(errs, fmt.Errorf("terminationGracePeriodSeconds %d must exceed SOUS_DRAIN_TIMEOUT (%s) + longest batch, SOUS_ENGINE_TIMEOUT (%s) = %s", *grace, drain, longest, need))
	}

	// The model volume is mounted where the engine reads it: Ollama's
	// OLLAMA_MODELS, or the model path another engine's command names.
	models, what := engineModels(w.config)
	if models == "" {
		errs = append(errs, fmt.Errorf("ConfigMap has no %s", what))
	}
	mounted := false
	for _, m := range c.VolumeMounts {
		if models == "" || (m.MountPath != models && !strings.HasPrefix(models, strings.TrimSuffix(m.MountPath, "/")+"/")) {
			continue
		}
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.PersistentVolumeClaim != nil {
				mounted = true
				if _, ok := s["PersistentVolumeClaim"][v.PersistentVolumeClaim.ClaimName]; !ok {
					errs = append(errs, fmt.Errorf("volume %s: PersistentVolumeClaim %s is not in the set", v.Name, v.PersistentVolumeClaim.ClaimName))
				}
			}
		}
	}
	if !mounted {
		errs = append(errs, fmt.Errorf("no PersistentVolumeClaim mounted at %s (%s)", what, models))
	}
	if p, n := w.config["SOUS_ENGINE_PARALLEL"], w.config["OLLAMA_NUM_PARALLEL"]; p != "" && n != "" && p != n {
		errs = append(errs, fmt.Errorf("SOUS_ENGINE_PARALLEL %q and OLLAMA_NUM_PARALLEL %q differ: requests would queue in the engine or slots stay idle", p, n))
	}
	if addr := w.config["SOUS_HTTP_ADDR"]; addr != fmt.Sprintf(":%d", workerPort) {
		errs = append(errs, fmt.Errorf("SOUS_HTTP_ADDR %q: probes and scrape expect :%d", addr, workerPort))
	}
	return errs
}

func secs(n int64) time.Duration { return time.Duration(n) * time.Second }

// engineModels is where the engine in the worker's container reads its
// model: OLLAMA_MODELS for Ollama, else the first absolute path among
// SOUS_ENGINE_EXEC's arguments (vLLM's model directory, llama-server's
// --model file). what names it for messages.
func engineModels(config map[string]string) (path, what string) {
	args := strings.Fields(config["SOUS_ENGINE_EXEC"])
	if config["SOUS_ENGINE"] == "ollama" || len(args) > 0 && filepath.Base(args[0]) == "ollama" {
		return config["OLLAMA_MODELS"], "OLLAMA_MODELS"
	}
	for _, a := range args[min(1, len(args)):] {
		if strings.HasPrefix(a, "/") {
			return a, "the model path in SOUS_ENGINE_EXEC"
		}
	}
	return "", "a model path in SOUS_ENGINE_EXEC"
}

// timeDuration parses a Go duration from the worker's configuration.
func timeDuration(config map[string]string, key string) (time.Duration, error) {
	d, err := time.ParseDuration(config[key])
	if err != nil {
		return 0, fmt.Errorf("ConfigMap %s: %w", key, err)
	}
	return d, nil
}

// keepAlive is how long the engine keeps the model loaded after a call: the
// worker's SOUS_ENGINE_KEEP_ALIVE when positive (sent with each request),
// else OLLAMA_KEEP_ALIVE parsed as ollama does (a duration or seconds,
// default 5m, negative for "forever").
func keepAlive(config map[string]string) (time.Duration, error) {
	if v := config["SOUS_ENGINE_KEEP_ALIVE"]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return 0, fmt.Errorf("ConfigMap SOUS_ENGINE_KEEP_ALIVE: %w", err)
		}
		if d > 0 {
			return d, nil
		}
	}
	v, ok := config["OLLAMA_KEEP_ALIVE"]
	if !ok {
		return 5 * time.Minute, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		n, nerr := strconv.ParseInt(v, 10, 64)
		if nerr != nil {
			return 0, fmt.Errorf("ConfigMap OLLAMA_KEEP_ALIVE %q: %w", v, err)
		}
		d = secs(n)
	}
	if d < 0 {
		return 0, errors.New("OLLAMA_KEEP_ALIVE is negative (forever): no cooldown can be longer; set a duration")
	}
	return d, nil
}

// workerCapacity is the most messages one worker holds (received, not yet
// settled): worker.Capacity of the in-flight limit, min(SOUS_BATCH_MAX,
// SOUS_ENGINE_PARALLEL). Defaults as in cmd/worker (an auto
// SOUS_ENGINE_PARALLEL counts as the default 4: a manifest must say the
// slots for KEDA's value to be right).
func workerCapacity(config map[string]string) (int, error) {
	get := func(key string, def int) (int, error) {
		v, ok := config[key]
		if !ok {
			return def, nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return 0, fmt.Errorf("ConfigMap %s %q: want a positive integer", key, v)
		}
		return n, nil
	}
	batch, err := get("SOUS_BATCH_MAX", 32)
	if err != nil {
		return 0, err
	}
	parallel, err := get("SOUS_ENGINE_PARALLEL", 4)
	if err != nil {
		return 0, err
	}
	return worker.Capacity(min(batch, parallel)), nil
}

func checkProbe(c *corev1.Container, name string, p *corev1.Probe, want string, wantPort int) []error {
	if p == nil || p.HTTPGet == nil {
		return []error{fmt.Errorf("container %s: %s must be an httpGet on %s", c.Name, name, want)}
	}
	var errs []error
	if p.HTTPGet.Path != want {
		errs = append(errs, fmt.Errorf("container %s: %s path %q, want %s", c.Name, name, p.HTTPGet.Path, want))
	}
	port := p.HTTPGet.Port.IntValue()
	if p.HTTPGet.Port.StrVal != "" {
		port = 0
		for _, cp := range c.Ports {
			if cp.Name == p.HTTPGet.Port.StrVal {
				port = int(cp.ContainerPort)
			}
		}
	}
	if port != wantPort {
		errs = append(errs, fmt.Errorf("container %s: %s port %s is not %d", c.Name, name, p.HTTPGet.Port.String(), wantPort))
	}
	return errs
}

// checkPDB: the budget selects the workers and lets a drain evict one.
func checkPDB(s set, pdb *policyv1.PodDisruptionBudget) []error {
	var errs []error
	if pdb.Spec.Selector == nil {
		return []error{errors.New("no selector")}
	}
	matched := false
	for _, o := range s["Deployment"] {
		if labelsMatch(pdb.Spec.Selector.MatchLabels, o.typed.(*appsv1.Deployment).Spec.Template.Labels) {
			matched = true
		}
	}
	if !matched && s["Deployment"] != nil {
		errs = append(errs, errors.New("selector matches no Deployment's pods"))
	}
	if pdb.Spec.MinAvailable != nil {
		errs = append(errs, errors.New("minAvailable blocks every drain of a node running the only worker; use maxUnavailable"))
	}
	if pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() < 1 && pdb.Spec.MaxUnavailable.StrVal == "" {
		errs = append(errs, errors.New("maxUnavailable must allow at least one eviction"))
	}
	return errs
}

// checkScaledObject: scale to zero without stranding or killing work.
func checkScaledObject(ks *kedaSchemas, s set, so *scaledObject) []error {
	var errs []error
	ref := so.Spec.ScaleTargetRef
	if ref.Kind != "" && ref.Kind != "Deployment" {
		errs = append(errs, fmt.Errorf("scaleTargetRef kind %s, want Deployment", ref.Kind))
	}
	o, ok := s["Deployment"][ref.Name]
	if !ok {
		if s["Deployment"] == nil {
			return append(errs, checkTriggers(ks, s, so, nil)...) // keda/ rendered alone
		}
		return append(errs, fmt.Errorf("scaleTargetRef %s is not a Deployment in the set", ref.Name))
	}
	d := o.typed.(*appsv1.Deployment)
	w, err := workerContainer(s, d, ref.EnvSourceContainerName)
	if err != nil {
		return append(errs, err)
	}
	if so.Spec.MinReplicaCount == nil || *so.Spec.MinReplicaCount != 0 {
		errs = append(errs, errors.New("minReplicaCount must be 0: scale to zero"))
	}
	cooldown := 300 * time.Second // KEDA's default
	if so.Spec.CooldownPeriod != nil {
		cooldown = secs(int64(*so.Spec.CooldownPeriod))
	}
	if keep, err := keepAlive(w.config); err != nil {
		errs = append(errs, err)
	} else if cooldown <= keep {
		errs = append(errs, fmt.Errorf("cooldownPeriod %s must be longer than the model keep-alive (%s)", cooldown, keep))
	}
	if longest, err := timeDuration(w.config, "SOUS_ENGINE_TIMEOUT"); err == nil && cooldown <= longest {
		errs = append(errs, fmt.Errorf("cooldownPeriod %s must be longer than the longest batch, SOUS_ENGINE_TIMEOUT (%s)", cooldown, longest))
	}
	errs = append(errs, checkScaleDown(so)...)
	errs = append(errs, checkTriggers(ks, s, so, w)...)
	return errs
}

// checkScaleDown: the HPA removes at most one worker per minute, after a
// stabilization window of at least five minutes.
func checkScaleDown(so *scaledObject) []error {
	adv := so.Spec.Advanced
	if adv == nil || adv.HorizontalPodAutoscalerConfig == nil || adv.HorizontalPodAutoscalerConfig.Behavior == nil || adv.HorizontalPodAutoscalerConfig.Behavior.ScaleDown == nil {
		return []error{errors.New("no advanced.horizontalPodAutoscalerConfig.behavior.scaleDown: the HPA default removes all pods at once")}
	}
	sd := adv.HorizontalPodAutoscalerConfig.Behavior.ScaleDown
	var errs []error
	if sd.StabilizationWindowSeconds == nil || *sd.StabilizationWindowSeconds < 300 {
		errs = append(errs, errors.New("scale down: stabilizationWindowSeconds must be at least 300"))
	}
	slow := func(p autoscalingv2.HPAScalingPolicy) bool {
		return p.Type == autoscalingv2.PodsScalingPolicy && p.Value <= 1 && p.PeriodSeconds >= 60
	}
	sel := autoscalingv2.MaxChangePolicySelect
	if sd.SelectPolicy != nil {
		sel = *sd.SelectPolicy
	}
	switch sel {
	case autoscalingv2.DisabledPolicySelect:
	case autoscalingv2.MinChangePolicySelect:
		anySlow := false
		for _, p := range sd.Policies {
			anySlow = anySlow || slow(p)
		}
		if !anySlow {
			errs = append(errs, errors.New("scale down too fast: no policy limits it to 1 pod per 60 s or more"))
		}
	default:
		if len(sd.Policies) == 0 {
			errs = append(errs, errors.New("scale down too fast: no policies"))
		}
		for _, p := range sd.Policies {
			if !slow(p) {
				errs = append(errs, fmt.Errorf("scale down too fast: policy %s %d per %ds (selectPolicy Max applies the fastest)", p.Type, p.Value, p.PeriodSeconds))
			}
		}
	}
	return errs
}

// checkTriggers checks every trigger's metadata against the scaler schema and
// the sous rules for its type. w is nil when the scale target is not in the set.
func checkTriggers(ks *kedaSchemas, s set, so *scaledObject, w *workerEnv) []error {
	var errs []error
	for i, tr := range so.Spec.Triggers {
		where := fmt.Sprintf("trigger %d (%s)", i, tr.Type)
		params, ok := ks.scalers[tr.Type]
		if !ok {
			errs = append(errs, fmt.Errorf("%s: unknown trigger type", where))
			continue
		}
		provided := map[string]bool{}
		for k, v := range tr.Metadata {
			if base, fromEnv := strings.CutSuffix(k, "FromEnv"); fromEnv {
				p, ok := params[base]
				if !ok || !p.EnvVariableReadable {
					errs = append(errs, fmt.Errorf("%s: metadata %s: %s cannot be read from the environment", where, k, base))
					continue
				}
				provided[base] = true
				if w != nil && !w.names[v] {
					errs = append(errs, fmt.Errorf("%s: metadata %s: %s is not in the env of container %s", where, k, v, w.container.Name))
				}
				continue
			}
			if tr.Type == "external" && slices.Contains(scalerKeys(), k) {
				continue // passed through to sous's scaler (scaler_test.go)
			}
			p, ok := params[k]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: unknown metadata key %q", where, k))
				continue
			}
			if !p.MetadataVariableReadable {
				errs = append(errs, fmt.Errorf("%s: metadata key %q is read only from a TriggerAuthentication or the environment", where, k))
			}
			if p.Deprecated != "" {
				errs = append(errs, fmt.Errorf("%s: metadata key %q is deprecated: %s", where, k, p.Deprecated))
			}
			if len(p.AllowedValue) > 0 && !slices.Contains(p.AllowedValue, v) {
				errs = append(errs, fmt.Errorf("%s: metadata %s: %q not one of %v", where, k, v, p.AllowedValue))
			}
			provided[k] = true
		}
		if tr.AuthenticationRef != nil {
			kind := tr.AuthenticationRef.Kind
			if kind == "" {
				kind = "TriggerAuthentication"
			}
			o, ok := s[kind][tr.AuthenticationRef.Name]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: authenticationRef %s %s is not in the set", where, kind, tr.AuthenticationRef.Name))
			} else {
				for _, name := range triggerAuthParams(o.typed.(*triggerAuthentication)) {
					p, ok := params[name]
					if !ok || !p.TriggerAuthenticationVariableReadable {
						errs = append(errs, fmt.Errorf("%s: %s %s gives parameter %q, which %s does not read from a TriggerAuthentication", where, kind, o.name, name, tr.Type))
					}
					provided[name] = true
				}
			}
		}
		for name, p := range params {
			if p.required() && !provided[name] {
				errs = append(errs, fmt.Errorf("%s: required parameter %q not given (metadata, %sFromEnv or TriggerAuthentication)", where, name, name))
			}
		}
		if w != nil && tr.Type == "external" {
			errs = append(errs, checkExternalTrigger(where, s, so, tr, w)...) // scaler_test.go
		} else if w != nil {
			errs = append(errs, checkSousTrigger(where, so, tr, w)...)
		}
	}
	if w != nil {
		errs = append(errs, checkLaneTriggers(so, w)...)
	}
	return errs
}

// workerLanes is the lanes the worker's config gives it (SOUS_LANES, else
// one lane on SOUS_QUEUE).
func workerLanes(w *workerEnv) ([]lanes.Lane, error) {
	return lanes.Parse(w.config["SOUS_LANES"], w.config["SOUS_QUEUE"])
}

// checkLaneTriggers: every lane's queue has a trigger, or KEDA would not
// scale from zero on work that arrives in it alone.
func checkLaneTriggers(so *scaledObject, w *workerEnv) []error {
	ls, err := workerLanes(w)
	if err != nil {
		return []error{fmt.Errorf("ScaledObject %s: SOUS_LANES: %v", so.Name, err)}
	}
	var errs []error
	for _, l := range ls {
		found := false
		for _, tr := range so.Spec.Triggers {
			found = found || tr.Metadata["queueName"] == l.Queue || tr.Type == "external" && slices.Contains(externalQueues(tr), l.Queue)
		}
		if !found {
			errs = append(errs, fmt.Errorf("ScaledObject %s: lane %s's queue %q has no trigger: work that arrives in it alone would not scale the workers from zero", so.Name, l.Name, l.Queue))
		}
	}
	return errs
}

// checkSousTrigger: the numbers behind scaling on queue depth (deploy/README.md).
func checkSousTrigger(where string, so *scaledObject, tr trigger, w *workerEnv) []error {
	var errs []error
	m := tr.Metadata
	var valueKey, activationKey string
	switch tr.Type {
	case "rabbitmq":
		valueKey, activationKey = "value", "activationValue"
		if m["protocol"] != "http" {
			errs = append(errs, fmt.Errorf("%s: protocol %q, want http: amqp counts only ready messages, so a worker busy with its last batch would be scaled to zero", where, m["protocol"]))
		}
		if m["mode"] != "QueueLength" {
			errs = append(errs, fmt.Errorf("%s: mode %q, want QueueLength", where, m["mode"]))
		}
		if m["excludeUnacknowledged"] == "true" {
			errs = append(errs, fmt.Errorf("%s: excludeUnacknowledged drops the in-flight batch from the count", where))
		}
	case "azure-servicebus":
		valueKey, activationKey = "messageCount", "activationMessageCount"
		if ns := w.config["SOUS_SERVICEBUS_NAMESPACE"]; ns != "" && strings.Split(ns, ".")[0] != m["namespace"] {
			errs = append(errs, fmt.Errorf("%s: namespace %q is not the one of SOUS_SERVICEBUS_NAMESPACE %q", where, m["namespace"], ns))
		}
	default:
		return append(errs, fmt.Errorf("%s: sous scales on rabbitmq or azure-servicebus", where))
	}
	if ls, err := workerLanes(w); err == nil && !slices.ContainsFunc(ls, func(l lanes.Lane) bool { return l.Queue == m["queueName"] }) {
		if w.config["SOUS_LANES"] == "" {
			errs = append(errs, fmt.Errorf("%s: queueName %q is not SOUS_QUEUE %q", where, m["queueName"], w.config["SOUS_QUEUE"]))
		} else {
			errs = append(errs, fmt.Errorf("%s: queueName %q is not a lane's queue in SOUS_LANES %q", where, m["queueName"], w.config["SOUS_LANES"]))
		}
	}
	if capacity, err := workerCapacity(w.config); err != nil {
		errs = append(errs, err)
	} else if m[valueKey] != strconv.Itoa(capacity) {
		errs = append(errs, fmt.Errorf("%s: %s %q, want %d = worker.Capacity: max(3 x limit, limit + 32) with limit = min(SOUS_BATCH_MAX, SOUS_ENGINE_PARALLEL), the most messages one worker holds", where, valueKey, m[valueKey], capacity))
	}
	if act := m[activationKey]; act != "" && act != "0" && so.Spec.MinReplicaCount != nil && *so.Spec.MinReplicaCount == 0 {
		errs = append(errs, fmt.Errorf("%s: %s %q with minReplicaCount 0 strands up to that many messages; use 0 (activate on the first message)", where, activationKey, act))
	}
	if tr.Type == "rabbitmq" && m[activationKey] == "" {
		errs = append(errs, fmt.Errorf("%s: set %s explicitly", where, activationKey))
	}
	return errs
}

// checkJobs: Jobs (deploy/k8s/jobs, applied apart from the overlays) run the
// workers' image with the same hardening. rendered holds every
// kustomization's objects; a Job file that no kustomization includes is
// refused by checkImages (images_test.go).
func checkJobs(rendered []object, base []object) []error {
	var errs []error
	var image string
	for _, o := range base {
		if d, ok := o.typed.(*appsv1.Deployment); ok && len(d.Spec.Template.Spec.Containers) > 0 {
			image = d.Spec.Template.Spec.Containers[0].Image
		}
	}
	for _, o := range rendered {
		j, ok := o.typed.(*batchv1.Job)
		if !ok {
			continue
		}
		errs = append(errs, prefix(o, checkPodSpec(&j.Spec.Template.Spec))...)
		if a := j.Spec.Template.Spec.AutomountServiceAccountToken; a == nil || *a {
			errs = append(errs, fmt.Errorf("%s: automountServiceAccountToken must be false: the job does not call the Kubernetes API", o))
		}
		for _, c := range j.Spec.Template.Spec.Containers {
			if c.Image != image {
				errs = append(errs, fmt.Errorf("%s: image %s, want the workers' image %s (same engine, same model store)", o, c.Image, image))
			}
		}
	}
	return errs
}

// checkRole: the worker's only Kubernetes API call is patching its own
// pod's pod-deletion-cost; a Role that allows more is a finding.
func checkRole(r *rbacv1.Role) []error {
	var errs []error
	for _, rule := range r.Rules {
		if !slices.Equal(rule.APIGroups, []string{""}) || !slices.Equal(rule.Resources, []string{"pods"}) || !slices.Equal(rule.Verbs, []string{"patch"}) || len(rule.ResourceNames) > 0 || len(rule.NonResourceURLs) > 0 {
			errs = append(errs, fmt.Errorf("rule %v allows more than patch on pods (the worker's only API call: its pod-deletion-cost)", rule))
		}
	}
	if len(r.Rules) != 1 {
		errs = append(errs, fmt.Errorf("%d rules, want the one that allows patch on pods", len(r.Rules)))
	}
	return errs
}

// checkPodDeletionCost: busy-aware scale-in needs the pod's name and
// namespace from the downward API, a mounted token and, when the set has
// RBAC objects, a RoleBinding that gives the pod's ServiceAccount a Role
// allowing patch on pods.
func checkPodDeletionCost(s set, d *appsv1.Deployment, c *corev1.Container) []error {
	var errs []error
	want := map[string]string{"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
	for _, e := range c.Env {
		if path, ok := want[e.Name]; ok && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == path {
			delete(want, e.Name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		errs = append(errs, fmt.Errorf("container %s: no env %s from the downward API (fieldRef %s): the worker patches its own pod's pod-deletion-cost", c.Name, name, want[name]))
	}
	ps := d.Spec.Template.Spec
	if ps.AutomountServiceAccountToken == nil || !*ps.AutomountServiceAccountToken {
		errs = append(errs, errors.New("automountServiceAccountToken must be true on the worker's pod: it patches its own pod-deletion-cost (its ServiceAccount keeps false for anything else)"))
	}
	if s["RoleBinding"] == nil && s["Role"] == nil {
		return errs // a set without the base (keda/ alone)
	}
	bound := false
	for _, o := range s["RoleBinding"] {
		rb := o.typed.(*rbacv1.RoleBinding)
		if rb.RoleRef.Kind != "Role" {
			continue
		}
		r, ok := s["Role"][rb.RoleRef.Name]
		if !ok || len(checkRole(r.typed.(*rbacv1.Role))) > 0 {
			continue
		}
		for _, sub := range rb.Subjects {
			if sub.Kind == "ServiceAccount" && sub.Name == ps.ServiceAccountName {
				bound = true
			}
		}
	}
	if !bound {
		errs = append(errs, fmt.Errorf("no RoleBinding gives ServiceAccount %s a Role allowing patch on pods: its pod-deletion-cost patches would be refused", ps.ServiceAccountName))
	}
	return errs
}
