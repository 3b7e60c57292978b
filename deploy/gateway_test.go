package deploy_test

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// The gateway (cmd/gateway): its image target and its Deployment, which has
// rules of its own (no GPU, a fixed replica count, a Service in front).

const (
	gatewayAPIPort = 8081
	// gatewayOpsPort serves /healthz, /readyz and /metrics: the gateway's
	// SOUS_HTTP_ADDR default, not the worker's 8080, so that both run on
	// one machine without settings.
	gatewayOpsPort = 8082
)

// checkGateway: the gateway Deployment's rules.
func checkGateway(s set, d *appsv1.Deployment, ex examples) []error {
	var errs []error
	w, err := workerContainer(s, d, "gateway")
	if err != nil {
		return []error{err}
	}
	c := w.container
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		errs = append(errs, errors.New("spec.replicas must be at least 2: the gateway is not scaled by KEDA, and one replica makes every rollout or drain an outage"))
	}
	if _, ok := c.Resources.Limits[gpuResource]; ok {
		errs = append(errs, fmt.Errorf("container %s: asks for %s; the gateway is CPU only", c.Name, gpuResource))
	}
	if q, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok || q.IsZero() {
		errs = append(errs, fmt.Errorf("container %s: no memory request", c.Name))
	}
	if c.Image == "" || strings.HasSuffix(c.Image, ":latest") || !strings.ContainsAny(c.Image, ":@") {
		errs = append(errs, fmt.Errorf("container %s: image %q is not pinned to a tag or digest", c.Name, c.Image))
	}
	errs = append(errs, checkProbe(c, "livenessProbe", c.LivenessProbe, "/healthz", gatewayOpsPort)...)
	errs = append(errs, checkProbe(c, "readinessProbe", c.ReadinessProbe, "/readyz", gatewayOpsPort)...)
	if ann := d.Spec.Template.Annotations; ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != fmt.Sprint(gatewayOpsPort) || ann["prometheus.io/path"] != "/metrics" {
		errs = append(errs, fmt.Errorf("pod annotations: want prometheus.io/scrape \"true\", port \"%d\", path /metrics; got %v", gatewayOpsPort, ann))
	}
	if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == gatewayAPIPort }) {
		errs = append(errs, fmt.Errorf("container %s: no container port %d (SOUS_GATEWAY_ADDR)", c.Name, gatewayAPIPort))
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
		if secretEnv.MatchString(e.Name) && (e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil) {
			errs = append(errs, fmt.Errorf("env %s looks like a secret; read it with secretKeyRef", e.Name))
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
	if a := env["SOUS_GATEWAY_ADDR"].Value; a != fmt.Sprintf(":%d", gatewayAPIPort) {
		errs = append(errs, fmt.Errorf("SOUS_GATEWAY_ADDR %q: the Service targets :%d", a, gatewayAPIPort))
	}
	// Keys come from a Secret volume (updated in place, so reloads work).
	keys := env["SOUS_GATEWAY_KEYS_FILE"].Value
	if keys == "" {
		errs = append(errs, errors.New("no SOUS_GATEWAY_KEYS_FILE: anyone who reaches the Service could use the models"))
	} else if !mountsSecret(d, c, keys, ex) {
		errs = append(errs, fmt.Errorf("SOUS_GATEWAY_KEYS_FILE %s is not in a mounted Secret volume (without subPath) that an *.example.yaml documents", keys))
	}
	// Grace period > SOUS_DRAIN_TIMEOUT (the env overrides the ConfigMap).
	drainV := env["SOUS_DRAIN_TIMEOUT"].Value
	if drainV == "" {
		drainV = w.config["SOUS_DRAIN_TIMEOUT"]
	}
	if drainV != "" {
		drain, err := timeDuration(map[string]string{"SOUS_DRAIN_TIMEOUT": drainV}, "SOUS_DRAIN_TIMEOUT")
		if err != nil {
			errs = append(errs, err)
		} else if g := d.Spec.Template.Spec.TerminationGracePeriodSeconds; g == nil || secs(*g) <= drain {
			errs = append(errs, fmt.Errorf("terminationGracePeriodSeconds must exceed SOUS_DRAIN_TIMEOUT (%s): open streams get that long to finish", drain))
		}
	}
	// The env overrides the workers' ConfigMap, which sets :8080.
	addr, ok := env["SOUS_HTTP_ADDR"]
	if !ok {
		addr.Value, ok = w.config["SOUS_HTTP_ADDR"]
	}
	if ok && addr.Value != fmt.Sprintf(":%d", gatewayOpsPort) {
		errs = append(errs, fmt.Errorf("SOUS_HTTP_ADDR %q: probes and scrape expect :%d", addr.Value, gatewayOpsPort))
	}
	return errs
}

func mountsSecret(d *appsv1.Deployment, c *corev1.Container, file string, ex examples) bool {
	for _, m := range c.VolumeMounts {
		if m.SubPath != "" || !strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/") {
			continue
		}
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.Secret != nil {
				sec, ok := ex.secrets[v.Secret.SecretName]
				if !ok {
					return false
				}
				name := strings.TrimPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/")
				if len(v.Secret.Items) == 0 {
					_, ok := sec.StringData[name]
					return ok
				}
				for _, it := range v.Secret.Items {
					if it.Path == name {
						_, ok := sec.StringData[it.Key]
						return ok
					}
				}
			}
		}
	}
	return false
}

// checkService: a Service selects pods of a Deployment in the set and
// targets a port those pods name.
func checkService(s set, svc *corev1.Service) []error {
	var target *appsv1.Deployment
	for _, o := range s["Deployment"] {
		d := o.typed.(*appsv1.Deployment)
		if len(svc.Spec.Selector) > 0 && labelsMatch(svc.Spec.Selector, d.Spec.Template.Labels) {
			target = d
		}
	}
	if target == nil {
		return []error{errors.New("selector matches no Deployment's pods")}
	}
	var errs []error
	for _, p := range svc.Spec.Ports {
		found := false
		for _, c := range target.Spec.Template.Spec.Containers {
			for _, cp := range c.Ports {
				if (p.TargetPort.StrVal != "" && cp.Name == p.TargetPort.StrVal) || (p.TargetPort.StrVal == "" && int(cp.ContainerPort) == p.TargetPort.IntValue()) {
					found = true
				}
			}
		}
		if !found {
			errs = append(errs, fmt.Errorf("port %s: targetPort %s is no container port of Deployment %s", p.Name, p.TargetPort.String(), target.Name))
		}
	}
	return errs
}

// checkGatewayImage: the gateway target is built by the Makefile's own
// build-gateway target, runs the gateway as a numeric non-root user on the
// worker image's Debian release, and exposes the API port.
func checkGatewayImage(in dockerInputs) []error {
	stages, errs := dockerfileStages(in.files["Dockerfile"])
	if stages == nil {
		return errs
	}
	byName := map[string]*instructions.Stage{}
	for i := range stages {
		byName[stages[i].Name] = &stages[i]
	}
	b, g, w := byName["gateway-build"], byName["gateway"], byName["worker"]
	if b == nil || g == nil || w == nil {
		return append(errs, errors.New("Dockerfile: want stages gateway-build, gateway and worker"))
	}
	if !strings.Contains(string(in.files["Makefile"]), "\nbuild-gateway:\n\t$(GO_BUILD) ./cmd/gateway\n") {
		errs = append(errs, errors.New("Makefile: no build-gateway target running $(GO_BUILD) ./cmd/gateway"))
	}
	if !regexp.MustCompile(`\nbuild:[^\n]* build-gateway( |\n)`).Match(in.files["Makefile"]) {
		errs = append(errs, errors.New("Makefile: `make build` does not build the gateway"))
	}
	if b.BaseName != buildStage {
		errs = append(errs, fmt.Errorf("stage gateway-build: FROM %s, want the %s stage", b.BaseName, buildStage))
	}
	built := false
	for _, c := range b.Commands {
		if r, ok := c.(*instructions.RunCommand); ok && normalizeSpace(strings.Join(r.CmdLine, " ")) == "make build-gateway" {
			built = true
		}
	}
	if !built {
		errs = append(errs, errors.New("stage gateway-build: no RUN make build-gateway"))
	}
	release := func(st *instructions.Stage) string {
		name := strings.SplitN(st.BaseName, ":", 2)[0]
		return name[strings.LastIndex(name, "-")+1:]
	}
	if !strings.HasPrefix(g.BaseName, "gcr.io/distroless/base") || release(g) != release(w) {
		errs = append(errs, fmt.Errorf("stage gateway: base %s, want a distroless base with glibc on the worker's release (%s)", g.BaseName, release(w)))
	}
	var user, entry, copied string
	exposed, exposedOps := false, false
	for _, c := range g.Commands {
		switch c := c.(type) {
		case *instructions.UserCommand:
			user = c.User
		case *instructions.CopyCommand:
			if c.From == "gateway-build" && slices.Contains(c.SourcePaths, "/src/bin/gateway") {
				copied = c.DestPath
			}
		case *instructions.EntrypointCommand:
			if c.PrependShell || len(c.CmdLine) == 0 {
				errs = append(errs, errors.New("stage gateway: ENTRYPOINT must be exec form, so SIGTERM reaches the gateway"))
				continue
			}
			entry = c.CmdLine[0]
		case *instructions.ExposeCommand:
			exposed = exposed || slices.Contains(c.Ports, fmt.Sprint(gatewayAPIPort))
			exposedOps = exposedOps || slices.Contains(c.Ports, fmt.Sprint(gatewayOpsPort))
		}
	}
	if err := nonRootUser(user); err != nil {
		errs = append(errs, fmt.Errorf("stage gateway: %w", err))
	}
	if copied == "" || entry != copied {
		errs = append(errs, fmt.Errorf("stage gateway: ENTRYPOINT %q is not the gateway copied from gateway-build (%q)", entry, copied))
	}
	if !exposed {
		errs = append(errs, fmt.Errorf("stage gateway: no EXPOSE %d", gatewayAPIPort))
	}
	if !exposedOps {
		errs = append(errs, fmt.Errorf("stage gateway: no EXPOSE %d", gatewayOpsPort))
	}
	return errs
}

func TestGatewayImage(t *testing.T) {
	t.Parallel()
	good := dockerSetup(t)
	if errs := checkGatewayImage(good); len(errs) > 0 {
		t.Fatalf("%d problems:\n%v", len(errs), errors.Join(errs...))
	}
	const df = "Dockerfile"
	for _, tt := range []struct {
		name string
		m    mutation
		want string
	}{
		{"as root", mutation{df, "USER 65532:65532\n# 8081", "USER 0\n# 8081"}, "stage gateway: USER 0 runs as root"},
		{"other build", mutation{df, "    make build-gateway", "    go build -o bin/ ./cmd/gateway"}, "no RUN make build-gateway"},
		{"not in make build", mutation{"Makefile", "build: build-gateway build-scaler\n", "build: build-scaler\n"}, "does not build the gateway"},
		{"static base", mutation{df, "GATEWAY_BASE=gcr.io/distroless/base-nossl-debian12:nonroot", "GATEWAY_BASE=gcr.io/distroless/static-debian12:nonroot"}, "want a distroless base with glibc"},
		{"other release", mutation{df, "GATEWAY_BASE=gcr.io/distroless/base-nossl-debian12:nonroot", "GATEWAY_BASE=gcr.io/distroless/base-nossl-debian13:nonroot"}, "want a distroless base with glibc"},
		{"wrong entrypoint", mutation{df, `ENTRYPOINT ["/usr/local/bin/sous-gateway"]`, `ENTRYPOINT ["/usr/local/bin/gateway"]`}, "is not the gateway copied"},
		{"no API port", mutation{df, "EXPOSE 8081 8082", "EXPOSE 8082"}, "no EXPOSE 8081"},
		{"no ops port", mutation{df, "EXPOSE 8081 8082", "EXPOSE 8081"}, "no EXPOSE 8082"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in := good
			in.files = tt.m.apply(t, good.files)
			requireErr(t, checkGatewayImage(in), tt.want)
		})
	}
}

func TestGatewayManifestChecks(t *testing.T) {
	t.Parallel()
	ks, good := setup(t)
	const (
		dep   = "deploy/k8s/gateway/deployment.yaml"
		svc   = "deploy/k8s/gateway/service.yaml"
		kust  = "deploy/k8s/overlays/rabbitmq/kustomization.yaml"
		rmqGW = "deploy/k8s/overlays/rabbitmq/gateway.yaml"
		sbGW  = "deploy/k8s/overlays/servicebus/gateway.yaml"
	)
	for _, tt := range []struct {
		name string
		m    mutation
		want string
	}{
		{"one replica", mutation{dep, "replicas: 2", "replicas: 1"}, "spec.replicas must be at least 2"},
		{"asks for a GPU", mutation{dep, "            limits:\n              memory: 512Mi\n", "            limits:\n              memory: 512Mi\n              nvidia.com/gpu: 1\n"}, "the gateway is CPU only"},
		{"no keys", mutation{dep, "            - name: SOUS_GATEWAY_KEYS_FILE\n              value: /etc/sous-gateway/keys\n", ""}, "no SOUS_GATEWAY_KEYS_FILE"},
		{"keys not mounted", mutation{dep, "value: /etc/sous-gateway/keys", "value: /etc/keys"}, "is not in a mounted Secret volume"},
		{"short grace", mutation{dep, "terminationGracePeriodSeconds: 75", "terminationGracePeriodSeconds: 30"}, "must exceed SOUS_DRAIN_TIMEOUT (1m0s)"},
		{"service misses the pods", mutation{svc, "    app.kubernetes.io/component: gateway\n  ports", "    app.kubernetes.io/component: gateways\n  ports"}, "Service sous-gateway: selector matches no Deployment's pods"},
		{"service targets no port", mutation{svc, "targetPort: api", "targetPort: web"}, "targetPort web is no container port"},
		{"URL as a literal", mutation{rmqGW, "            - name: SOUS_AMQP_URL\n              valueFrom:\n                secretKeyRef:\n                  name: sous-rabbitmq\n                  key: amqp-url\n", "            - name: SOUS_AMQP_URL\n              value: amqp://sous:pw@rabbitmq:5672/\n"}, "env SOUS_AMQP_URL looks like a secret"},
		{"connection string as a literal", mutation{sbGW, "            - name: SOUS_SERVICEBUS_CONNECTION_STRING\n              valueFrom:\n                secretKeyRef:\n                  name: sous-servicebus\n                  key: connection-string\n                  optional: true\n", "            - name: SOUS_SERVICEBUS_CONNECTION_STRING\n              value: Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=s\n"}, "env SOUS_SERVICEBUS_CONNECTION_STRING looks like a secret"},
		// Without the gateway and its patch (removed below).
		{"overlay without the gateway", mutation{kust, "  - ../../gateway\npatches:\n  - path: config.yaml\n  - path: deployment.yaml\n  - path: gateway.yaml\n", "patches:\n  - path: config.yaml\n  - path: deployment.yaml\n"}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tr := tt.m.apply(t, good)
			if tt.m.file == kust && tt.want == "" {
				delete(tr, rmqGW)
			}
			requireErr(t, validateTree(ks, tr), tt.want)
		})
	}
}
