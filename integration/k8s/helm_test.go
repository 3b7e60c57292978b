package k8s

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// helmNS is the namespace the chart is installed into.
const helmNS = "sous-helm"

// helm runs the built helm against cp with its config, cache and data in a
// directory of the test's, and returns what it printed.
func helm(t *testing.T, b Binaries, cp *ControlPlane, args ...string) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	home := t.TempDir()
	cmd := exec.Command(b.Helm, append(args, "--kubeconfig", cp.Kubeconfig)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
	)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("helm %s: %v\n%s\n%s", strings.Join(args, " "), err, out.String(), cp.Logs(20))
	}
	return out.String()
}

// TestHelmInstallScalesFromZero installs deploy/helm/sous with `helm
// install` into the real apiserver, with the real KEDA operator scaling
// the worker Deployment on the real broker's queue, as
// TestRabbitMQScalesFromZeroAndBack does for the overlay: KEDA reports
// the chart's ScaledObject Ready (it read the TriggerAuthentication, its
// Secret and the management API), creates its HPA, scales the workers to
// zero on an empty queue and wakes one on the first message; a `helm
// upgrade` then leaves KEDA's replica count alone (the chart sets no
// spec.replicas while KEDA owns it).
func TestHelmInstallScalesFromZero(t *testing.T) {
	b := NeedHelm(t)
	needManagementAPI(t)
	ch, queue := testQueue(t)

	cp := Start(t, b, Options{})
	cp.StartKEDA(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// The namespace labelled for the restricted Pod Security Standard and
	// the Secrets the chart reads and never holds, created first as
	// deploy/README.md says: the worker's pod must pass that admission for
	// the ReplicaSet controller to create it.
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: helmNS, Labels: map[string]string{"pod-security.kubernetes.io/enforce": "restricted"}}}
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	createRabbitSecrets(t, ctx, cp, helmNS, map[string]map[string]string{"sous-gateway-keys": {"keys": "# none\n"}})

	// What a test on one machine changes, as testOverlay does: a fresh
	// queue, and KEDA's timing in seconds rather than minutes.
	installed := time.Now()
	out := helm(t, b, cp, "install", "sous", "deploy/helm/sous", "--namespace", helmNS,
		"--set-string", "config.SOUS_QUEUE="+queue,
		"--set", fmt.Sprintf("keda.pollingInterval=%d,keda.cooldownPeriod=%d", pollingInterval, cooldownPeriod))
	t.Logf("k8s: helm install:\n%s", out)
	if status := helm(t, b, cp, "status", "sous", "--namespace", helmNS); !strings.Contains(status, "STATUS: deployed") {
		t.Fatalf("helm status:\n%s", status)
	}

	w := watcher{t: t, cp: cp, ns: helmNS, name: "sous-worker"}
	w.waitScaledObjectReady(ctx)
	if hpa := w.waitHPA(ctx, installed); hpa.Spec.ScaleTargetRef.Kind != "Deployment" || hpa.Spec.ScaleTargetRef.Name != w.name || hpa.Spec.MaxReplicas != maxReplicaCount {
		t.Fatalf("KEDA's HPA targets %s %s with max %d, want Deployment %s with the chart's maxReplicaCount %d", hpa.Spec.ScaleTargetRef.Kind, hpa.Spec.ScaleTargetRef.Name, hpa.Spec.MaxReplicas, w.name, maxReplicaCount)
	}
	w.transition(ctx, "installed, empty queue", installed, 0, 120*time.Second)

	if err := ch.PublishWithContext(ctx, "", queue, false, false, amqp.Publishing{Body: []byte(`{"prompt":"p"}`)}); err != nil {
		t.Fatal(err)
	}
	w.transition(ctx, "1 message published", time.Now(), 1, 120*time.Second)
	w.waitPods(ctx, 1, 60*time.Second)

	// An upgrade changes the configuration and leaves the replicas to KEDA:
	// the message is still queued, so KEDA keeps one worker.
	helm(t, b, cp, "upgrade", "sous", "deploy/helm/sous", "--namespace", helmNS, "--reuse-values",
		"--set-string", "config.SOUS_LOG_LEVEL=debug")
	cm, err := cp.Client.CoreV1().ConfigMaps(helmNS).Get(ctx, "sous-config", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cm.Data["SOUS_LOG_LEVEL"] != "debug" || cm.Data["SOUS_QUEUE"] != queue {
		t.Fatalf("after the upgrade the ConfigMap has SOUS_LOG_LEVEL %q, SOUS_QUEUE %q", cm.Data["SOUS_LOG_LEVEL"], cm.Data["SOUS_QUEUE"])
	}
	w.hold(ctx, "helm upgrade, 1 message queued", 1, 5*time.Second)

	// The other engine presets, the Service Bus broker and the work-aware
	// scaler (its Deployment, Service, PDB and ServiceAccount, the
	// ScaledObject's external trigger against KEDA's CRD), each as a
	// release of its own, through the apiserver's validation and admission
	// without being persisted (--dry-run=server).
	for _, set := range []string{"engine.kind=vllm", "engine.kind=llamacpp", "engine.kind=external", "broker.kind=servicebus", "config.SOUS_LANES=a=sous.a\\,b=sous.b",
		"scaler.enabled=true", "scaler.enabled=true,config.SOUS_LANES=a=sous.a\\,b=sous.b"} {
		name := "sous-" + strings.NewReplacer(".", "-", "=", "-", "\\,", "-", ",", "-", "_", "-").Replace(strings.ToLower(set))
		out := helm(t, b, cp, "install", name[:min(len(name), 40)], "deploy/helm/sous", "--namespace", helmNS, "--dry-run=server", "--set", set)
		if !strings.Contains(out, "STATUS: pending-install") {
			t.Fatalf("helm install --dry-run=server --set %s:\n%s", set, out)
		}
		t.Logf("k8s: helm install --dry-run=server --set %s: accepted", set)
	}
}
