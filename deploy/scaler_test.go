package deploy_test

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/sous-run/sous/internal/lanes"
	"github.com/sous-run/sous/internal/scaler"
)

// The work-aware scaler (cmd/scaler): its image target, its Deployment and
// Service (deploy/k8s/scaler), and the ScaledObject's external trigger that
// points KEDA at it (deploy/k8s/overlays/rabbitmq-scaler).

const (
	scalerComponent = "scaler"
	// scalerGRPCPort is SOUS_SCALER_ADDR's default: what KEDA calls.
	scalerGRPCPort = 9090
	// scalerOpsPort serves /healthz and /readyz (the scaler's
	// SOUS_HTTP_ADDR default).
	scalerOpsPort = 8083
)

// scalerKeys are the trigger metadata keys cmd/scaler reads, besides
// KEDA's own scalerAddress. KEDA passes every key of an external trigger
// through to the scaler, so scalers-schema.json does not list them.
func scalerKeys() []string { return []string{scaler.QueueKey, scaler.TargetDrainSecondsKey} }

// isScaler reports whether d is the scaler's Deployment.
func isScaler(d *appsv1.Deployment) bool {
	return d.Spec.Template.Labels["app.kubernetes.io/component"] == scalerComponent
}

// checkScaler: the scaler Deployment's rules. It is CPU only, not scaled by
// KEDA (it is what KEDA asks), and reads the broker with a secret URL.
func checkScaler(d *appsv1.Deployment, ex examples) []error {
	var errs []error
	cs := d.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		return []error{fmt.Errorf("%d containers, want the scaler alone", len(cs))}
	}
	c := &cs[0]
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		errs = append(errs, errors.New("spec.replicas must be at least 2: while no scaler answers, KEDA cannot read the metric, and one replica makes every rollout or drain such a gap"))
	}
	if _, ok := c.Resources.Limits[gpuResource]; ok {
		errs = append(errs, fmt.Errorf("container %s: asks for %s; the scaler is CPU only", c.Name, gpuResource))
	}
	if q, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok || q.IsZero() {
		errs = append(errs, fmt.Errorf("container %s: no memory request", c.Name))
	}
	if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.ContainsAny(c.Image, ":@") {
		errs = append(errs, fmt.Errorf("container %s: image %q is not pinned to a tag or digest", c.Name, c.Image))
	}
	if a := d.Spec.Template.Spec.AutomountServiceAccountToken; a == nil || *a {
		errs = append(errs, errors.New("automountServiceAccountToken must be false: the scaler does not call the Kubernetes API"))
	}
	errs = append(errs, checkProbe(c, "livenessProbe", c.LivenessProbe, "/healthz", scalerOpsPort)...)
	errs = append(errs, checkProbe(c, "readinessProbe", c.ReadinessProbe, "/readyz", scalerOpsPort)...)
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == scalerGRPCPort }) {
		errs = append(errs, fmt.Errorf("container %s: no container port %d (SOUS_SCALER_ADDR)", c.Name, scalerGRPCPort))
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
		if secretEnv.MatchString(e.Name) || strings.HasSuffix(e.Name, "_URL") {
			if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
				errs = append(errs, fmt.Errorf("env %s looks like a secret (a URL may carry a password); read it with secretKeyRef", e.Name))
				continue
			}
		}
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			if sec, ok := ex.secrets[ref.Name]; !ok {
				errs = append(errs, fmt.Errorf("env %s reads Secret %s, which no *.example.yaml documents", e.Name, ref.Name))
			} else if _, ok := sec.StringData[ref.Key]; !ok {
				errs = append(errs, fmt.Errorf("env %s reads key %s of Secret %s, which its example does not have", e.Name, ref.Key, ref.Name))
			}
		}
	}
	if len(c.EnvFrom) > 0 {
		errs = append(errs, errors.New("envFrom: the scaler reads none of the workers' configuration, and warns about every SOUS_* variable it does not know"))
	}
	switch b := env["SOUS_BROKER"].Value; b {
	case "", "rabbitmq":
		if _, ok := env["SOUS_AMQP_URL"]; !ok {
			errs = append(errs, errors.New("no SOUS_AMQP_URL: the scaler would measure the broker on localhost"))
		}
	case "servicebus":
		_, ns := env["SOUS_SERVICEBUS_NAMESPACE"]
		_, cs := env["SOUS_SERVICEBUS_CONNECTION_STRING"]
		if !ns && !cs {
			errs = append(errs, errors.New("SOUS_BROKER servicebus without SOUS_SERVICEBUS_NAMESPACE or SOUS_SERVICEBUS_CONNECTION_STRING: the scaler refuses to start"))
		}
	default:
		errs = append(errs, fmt.Errorf("SOUS_BROKER %q: the scaler knows rabbitmq and servicebus", b))
	}
	if a, ok := env["SOUS_SCALER_ADDR"]; ok && a.Value != fmt.Sprintf(":%d", scalerGRPCPort) {
		errs = append(errs, fmt.Errorf("SOUS_SCALER_ADDR %q: the container port and the Service expect :%d", a.Value, scalerGRPCPort))
	}
	if a, ok := env["SOUS_HTTP_ADDR"]; ok && a.Value != fmt.Sprintf(":%d", scalerOpsPort) {
		errs = append(errs, fmt.Errorf("SOUS_HTTP_ADDR %q: the probes expect :%d", a.Value, scalerOpsPort))
	}
	return errs
}

// externalQueues is the queues an external trigger names (metadata queue,
// comma-separated, as cmd/scaler splits it).
func externalQueues(tr trigger) []string {
	var qs []string
	for _, q := range strings.Split(tr.Metadata[scaler.QueueKey], ",") {
		if q = strings.TrimSpace(q); q != "" {
			qs = append(qs, q)
		}
	}
	return qs
}

// needsTriggerAuth reports whether a ScaledObject among objs has a trigger
// that reads a TriggerAuthentication.
func needsTriggerAuth(objs []object) bool {
	for _, o := range objs {
		if so, ok := o.typed.(*scaledObject); ok {
			for _, tr := range so.Spec.Triggers {
				if tr.AuthenticationRef != nil {
					return true
				}
			}
		}
	}
	return false
}

// checkExternalTrigger: an external trigger asks sous's scaler, at the
// Service of the scaler Deployment in the ScaledObject's namespace, for the
// seconds of work in the worker's lane queues, and gives it exactly the
// metadata cmd/scaler reads.
func checkExternalTrigger(where string, s set, so *scaledObject, tr trigger, w *workerEnv) []error {
	var errs []error
	m := tr.Metadata
	for _, k := range scalerKeys() {
		if m[k] == "" {
			errs = append(errs, fmt.Errorf("%s: metadata %s is required: cmd/scaler refuses the trigger without it", where, k))
		}
	}
	if v := m[scaler.TargetDrainSecondsKey]; v != "" {
		if f, err := strconv.ParseFloat(v, 64); err != nil || !(f > 0) || f > 1e9 {
			errs = append(errs, fmt.Errorf("%s: targetDrainSeconds %q must be a number of seconds above 0, such as \"300\"", where, v))
		}
	}
	if ls, err := workerLanes(w); err == nil {
		for _, q := range externalQueues(tr) {
			if slices.ContainsFunc(ls, func(l lanes.Lane) bool { return l.Queue == q }) {
				continue
			}
			if w.config["SOUS_LANES"] == "" {
				errs = append(errs, fmt.Errorf("%s: queue %q is not SOUS_QUEUE %q", where, q, w.config["SOUS_QUEUE"]))
			} else {
				errs = append(errs, fmt.Errorf("%s: queue %q is not a lane's queue in SOUS_LANES %q", where, q, w.config["SOUS_LANES"]))
			}
		}
	}
	return append(errs, checkScalerAddress(where, s, so, m["scalerAddress"], w)...)
}

// scalerHost is <service>.<namespace>.svc, optionally with the cluster
// domain after it.
var scalerHost = regexp.MustCompile(`^([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.[a-z0-9.-]+)?$`)

// checkScalerAddress: scalerAddress names a Service in the set, in the
// ScaledObject's namespace, by a port that reaches the scaler's gRPC port;
// and that scaler reads the workers' broker.
func checkScalerAddress(where string, s set, so *scaledObject, addr string, w *workerEnv) []error {
	want := fmt.Sprintf("sous-scaler.%s.svc:%d", so.Namespace, scalerGRPCPort)
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return []error{fmt.Errorf("%s: scalerAddress %q is not host:port; want %s", where, addr, want)}
	}
	hm := scalerHost.FindStringSubmatch(host)
	if hm == nil {
		return []error{fmt.Errorf("%s: scalerAddress %q: want the scaler's Service by its cluster name, %s", where, addr, want)}
	}
	if s["Service"] == nil {
		return nil // a set without the scaler (keda/ alone)
	}
	if hm[2] != so.Namespace {
		return []error{fmt.Errorf("%s: scalerAddress %q: namespace %s is not the ScaledObject's, %s", where, addr, hm[2], so.Namespace)}
	}
	o, ok := s["Service"][hm[1]]
	if !ok {
		return []error{fmt.Errorf("%s: scalerAddress %q: no Service %s in the set", where, addr, hm[1])}
	}
	svc := o.typed.(*corev1.Service)
	var d *appsv1.Deployment
	for _, od := range s["Deployment"] {
		if dd := od.typed.(*appsv1.Deployment); isScaler(dd) && labelsMatch(svc.Spec.Selector, dd.Spec.Template.Labels) {
			d = dd
		}
	}
	if d == nil {
		return []error{fmt.Errorf("%s: scalerAddress %q: Service %s selects no scaler Deployment", where, addr, svc.Name)}
	}
	reaches := false
	for _, p := range svc.Spec.Ports {
		if strconv.Itoa(int(p.Port)) != port {
			continue
		}
		for _, c := range d.Spec.Template.Spec.Containers {
			for _, cp := range c.Ports {
				named := p.TargetPort.StrVal != "" && cp.Name == p.TargetPort.StrVal
				numbered := p.TargetPort.StrVal == "" && int(cp.ContainerPort) == p.TargetPort.IntValue()
				reaches = reaches || (named || numbered) && cp.ContainerPort == scalerGRPCPort
			}
		}
	}
	if !reaches {
		return []error{fmt.Errorf("%s: scalerAddress %q: port %s of Service %s does not reach the scaler's gRPC port %d", where, addr, port, svc.Name, scalerGRPCPort)}
	}
	// The scaler measures the broker the workers take from.
	if len(d.Spec.Template.Spec.Containers) > 0 {
		if sv, wv := secretRef(&d.Spec.Template.Spec.Containers[0], "SOUS_AMQP_URL"), secretRef(w.container, "SOUS_AMQP_URL"); sv != wv {
			return []error{fmt.Errorf("%s: the scaler reads SOUS_AMQP_URL from %s, the workers from %s: it would measure another broker", where, sv, wv)}
		}
	}
	return nil
}

// secretRef names the Secret key an env var is read from ("" when none).
func secretRef(c *corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			return fmt.Sprintf("Secret %s key %s", e.ValueFrom.SecretKeyRef.Name, e.ValueFrom.SecretKeyRef.Key)
		}
	}
	return "no Secret"
}

// checkScalerImage: the scaler target is built by the Makefile's own
// build-scaler target, on the gateway's base (a build argument, so that
// `make images` can give it a stand-in), runs the scaler as a numeric
// non-root user, and exposes its gRPC and health ports.
func checkScalerImage(in dockerInputs) []error {
	stages, errs := dockerfileStages(in.files["Dockerfile"])
	if stages == nil {
		return errs
	}
	byName := map[string]*instructions.Stage{}
	for i := range stages {
		byName[stages[i].Name] = &stages[i]
	}
	b, sc, w := byName["scaler-build"], byName["scaler"], byName["worker"]
	if b == nil || sc == nil || w == nil {
		return append(errs, errors.New("Dockerfile: want stages scaler-build, scaler and worker"))
	}
	mk := string(in.files["Makefile"])
	if !strings.Contains(mk, "\nbuild-scaler:\n\t$(GO_BUILD) ./cmd/scaler\n") {
		errs = append(errs, errors.New("Makefile: no build-scaler target running $(GO_BUILD) ./cmd/scaler"))
	}
	if !regexp.MustCompile(`\nbuild:[^\n]* build-scaler( |\n)`).MatchString(mk) {
		errs = append(errs, errors.New("Makefile: `make build` does not build the scaler"))
	}
	if b.BaseName != buildStage {
		errs = append(errs, fmt.Errorf("stage scaler-build: FROM %s, want the %s stage", b.BaseName, buildStage))
	}
	built := false
	for _, c := range b.Commands {
		if r, ok := c.(*instructions.RunCommand); ok && normalizeSpace(strings.Join(r.CmdLine, " ")) == "make build-scaler" {
			built = true
		}
	}
	if !built {
		errs = append(errs, errors.New("stage scaler-build: no RUN make build-scaler"))
	}
	// scripts/images.sh gives stand-in bases as build arguments only.
	if !regexp.MustCompile(`(?m)^FROM \$\{GATEWAY_BASE\} AS scaler$`).Match(in.files["Dockerfile"]) {
		errs = append(errs, errors.New("stage scaler: want FROM ${GATEWAY_BASE}, the gateway's base, which `make images` replaces with its stand-in"))
	}
	release := func(st *instructions.Stage) string {
		name := strings.SplitN(st.BaseName, ":", 2)[0]
		return name[strings.LastIndex(name, "-")+1:]
	}
	if !strings.HasPrefix(sc.BaseName, "gcr.io/distroless/base") || release(sc) != release(w) {
		errs = append(errs, fmt.Errorf("stage scaler: base %s, want a distroless base with glibc on the worker's release (%s)", sc.BaseName, release(w)))
	}
	var user, entry, copied string
	exposed := map[int]bool{}
	for _, c := range sc.Commands {
		switch c := c.(type) {
		case *instructions.UserCommand:
			user = c.User
		case *instructions.CopyCommand:
			if c.From == "scaler-build" && slices.Contains(c.SourcePaths, "/src/bin/scaler") {
				copied = c.DestPath
			}
		case *instructions.EntrypointCommand:
			if c.PrependShell || len(c.CmdLine) == 0 {
				errs = append(errs, errors.New("stage scaler: ENTRYPOINT must be exec form, so SIGTERM reaches the scaler"))
				continue
			}
			entry = c.CmdLine[0]
		case *instructions.ExposeCommand:
			for _, p := range c.Ports {
				if n, err := strconv.Atoi(strings.TrimSuffix(p, "/tcp")); err == nil {
					exposed[n] = true
				}
			}
		}
	}
	if err := nonRootUser(user); err != nil {
		errs = append(errs, fmt.Errorf("stage scaler: %w", err))
	}
	if copied == "" || entry != copied {
		errs = append(errs, fmt.Errorf("stage scaler: ENTRYPOINT %q is not the scaler copied from scaler-build (%q)", entry, copied))
	}
	for _, p := range []int{scalerGRPCPort, scalerOpsPort} {
		if !exposed[p] {
			errs = append(errs, fmt.Errorf("stage scaler: no EXPOSE %d", p))
		}
	}
	return errs
}

func TestScalerImage(t *testing.T) {
	t.Parallel()
	good := dockerSetup(t)
	if errs := checkScalerImage(good); len(errs) > 0 {
		t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
	}
	const df = "Dockerfile"
	for _, tt := range []struct {
		name string
		m    mutation
		want string
	}{
		{"as root", mutation{df, "USER 65532:65532\n# 9090", "USER 0\n# 9090"}, "stage scaler: USER 0 runs as root"},
		{"other build", mutation{df, "    make build-scaler", "    go build -o bin/ ./cmd/scaler"}, "no RUN make build-scaler"},
		{"Makefile builds it otherwise", mutation{"Makefile", "build-scaler:\n\t$(GO_BUILD) ./cmd/scaler\n", "build-scaler:\n\tgo build -o bin/ ./cmd/scaler\n"}, "no build-scaler target running $(GO_BUILD) ./cmd/scaler"},
		{"not in make build", mutation{"Makefile", "build: build-gateway build-scaler\n", "build: build-gateway\n"}, "does not build the scaler"},
		{"base not a build argument", mutation{df, "FROM ${GATEWAY_BASE} AS scaler", "FROM gcr.io/distroless/base-nossl-debian12:nonroot AS scaler"}, "want FROM ${GATEWAY_BASE}"},
		{"static base", mutation{df, "FROM ${GATEWAY_BASE} AS scaler", "FROM gcr.io/distroless/static-debian12:nonroot AS scaler"}, "want a distroless base with glibc"},
		{"wrong entrypoint", mutation{df, `ENTRYPOINT ["/usr/local/bin/sous-scaler"]`, `ENTRYPOINT ["/usr/local/bin/scaler"]`}, "is not the scaler copied"},
		{"shell-form entrypoint", mutation{df, `ENTRYPOINT ["/usr/local/bin/sous-scaler"]`, `ENTRYPOINT /usr/local/bin/sous-scaler`}, "ENTRYPOINT must be exec form"},
		{"no gRPC port", mutation{df, "EXPOSE 9090 8083", "EXPOSE 8083"}, "no EXPOSE 9090"},
		{"no health port", mutation{df, "EXPOSE 9090 8083", "EXPOSE 9090"}, "no EXPOSE 8083"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in := good
			in.files = tt.m.apply(t, good.files)
			requireErr(t, checkScalerImage(in), tt.want)
		})
	}
}

func TestScalerManifestChecks(t *testing.T) {
	t.Parallel()
	ks, good := setup(t)
	const (
		dep  = "deploy/k8s/scaler/deployment.yaml"
		svc  = "deploy/k8s/scaler/service.yaml"
		so   = "deploy/k8s/overlays/rabbitmq-scaler/scaledobject.yaml"
		kust = "deploy/k8s/overlays/rabbitmq-scaler/kustomization.yaml"
	)
	for _, tt := range []struct {
		name string
		m    mutation
		want string
	}{
		{"one replica", mutation{dep, "replicas: 2", "replicas: 1"}, "spec.replicas must be at least 2"},
		{"asks for a GPU", mutation{dep, "            limits:\n              memory: 128Mi\n", "            limits:\n              memory: 128Mi\n              nvidia.com/gpu: 1\n"}, "the scaler is CPU only"},
		{"token mounted", mutation{dep, "      automountServiceAccountToken: false\n", "      automountServiceAccountToken: true\n"}, "the scaler does not call the Kubernetes API"},
		{"liveness on the gRPC port", mutation{dep, "path: /healthz\n              port: http", "path: /healthz\n              port: grpc"}, "livenessProbe port grpc is not 8083"},
		{"readiness path", mutation{dep, "path: /readyz", "path: /ready"}, `readinessProbe path "/ready", want /readyz`},
		{"no gRPC port", mutation{dep, "              containerPort: 9090\n", "              containerPort: 9091\n"}, "no container port 9090"},
		{"address env disagrees", mutation{dep, "value: \":9090\"", "value: \":9091\""}, `SOUS_SCALER_ADDR ":9091"`},
		{"URL as a literal", mutation{dep, "            - name: SOUS_AMQP_URL\n              valueFrom:\n                secretKeyRef:\n                  name: sous-rabbitmq\n                  key: amqp-url\n", "            - name: SOUS_AMQP_URL\n              value: amqp://sous:pw@rabbitmq:5672/\n"}, "env SOUS_AMQP_URL looks like a secret"},
		{"management URL as a literal", mutation{dep, "            - name: SOUS_SCALER_MANAGEMENT_URL\n              valueFrom:\n                secretKeyRef:\n                  name: sous-scaler\n                  key: management-url\n                  optional: true\n", "            - name: SOUS_SCALER_MANAGEMENT_URL\n              value: http://keda:pw@rabbitmq:15672\n"}, "env SOUS_SCALER_MANAGEMENT_URL looks like a secret"},
		{"no broker URL", mutation{dep, "            - name: SOUS_AMQP_URL\n              valueFrom:\n                secretKeyRef:\n                  name: sous-rabbitmq\n                  key: amqp-url\n", ""}, "no SOUS_AMQP_URL"},
		{"another broker than the workers'", mutation{dep, "                  name: sous-rabbitmq\n", "                  name: sous-scaler\n"}, "the scaler reads SOUS_AMQP_URL from Secret sous-scaler key amqp-url, the workers from Secret sous-rabbitmq key amqp-url"},
		{"the workers' ConfigMap", mutation{dep, "          env:\n", "          envFrom:\n            - configMapRef:\n                name: sous-config\n          env:\n"}, "envFrom: the scaler reads none of the workers' configuration"},
		{"writable root filesystem", mutation{dep, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"}, "container scaler: readOnlyRootFilesystem must be true"},
		{"service targets another port", mutation{svc, "targetPort: grpc", "targetPort: http"}, "port 9090 of Service sous-scaler does not reach the scaler's gRPC port 9090"},
		{"service misses the pods", mutation{svc, "    app.kubernetes.io/component: scaler\n  ports", "    app.kubernetes.io/component: scalers\n  ports"}, "Service sous-scaler: selector matches no Deployment's pods"},
		{"address not a cluster name", mutation{so, "scalerAddress: sous-scaler.sous-rabbitmq.svc:9090", "scalerAddress: 10.0.0.7:9090"}, "want the scaler's Service by its cluster name, sous-scaler.sous-rabbitmq.svc:9090"},
		{"address with the cluster domain is fine", mutation{so, "scalerAddress: sous-scaler.sous-rabbitmq.svc:9090", "scalerAddress: sous-scaler.sous-rabbitmq.svc.cluster.local:9090"}, ""},
		{"overlay in another namespace", mutation{kust, "namespace: sous-rabbitmq", "namespace: sous-work"}, `namespace sous-rabbitmq is not the ScaledObject's, sous-work`},
		{"unknown key", mutation{so, "        queue: sous.requests\n", "        queue: sous.requests\n        queues: sous.requests\n"}, `unknown metadata key "queues"`},
		{"target not a number", mutation{so, `targetDrainSeconds: "300"`, `targetDrainSeconds: 5m`}, `targetDrainSeconds "5m" must be a number of seconds`},
		{"scaler left out", mutation{kust, "  - ../../scaler\n", ""}, "scalerAddress \"sous-scaler.sous-rabbitmq.svc:9090\": no Service sous-scaler in the set"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			requireErr(t, validateTree(ks, tt.m.apply(t, good)), tt.want)
		})
	}
}

// TestScalerLanes: the scaler overlay on top of the lanes overlay, with one
// external trigger listing both lanes' queues, passes; with a lane left out
// of the list it does not.
func TestScalerLanes(t *testing.T) {
	t.Parallel()
	ks, good := setup(t)
	const dir = "deploy/k8s/overlays/test-lanes-scaler/"
	for _, tt := range []struct {
		name, queues, want string
	}{
		{"both lanes", "sous.interactive,sous.bulk", ""},
		{"a lane left out", "sous.interactive", `lane bulk's queue "sous.bulk" has no trigger`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tr := good.clone()
			tr[dir+"kustomization.yaml"] = []byte(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: sous-lanes
resources:
  - ../rabbitmq-lanes
  - ../../scaler
patches:
  - path: scaledobject.yaml
  - patch: |-
      $patch: delete
      apiVersion: keda.sh/v1alpha1
      kind: TriggerAuthentication
      metadata:
        name: sous-rabbitmq-management
`)
			tr[dir+"scaledobject.yaml"] = []byte(`apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: sous-worker
spec:
  triggers:
    - type: external
      metadata:
        scalerAddress: sous-scaler.sous-lanes.svc:9090
        queue: ` + tt.queues + `
        targetDrainSeconds: "300"
`)
			requireErr(t, validateTree(ks, tr), tt.want)
		})
	}
}
