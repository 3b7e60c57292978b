package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
)

const sbNS = "sous-servicebus" // the servicebus overlay's namespace

// TestServiceBusScaledObjectAccepted applies the servicebus overlay to a
// real apiserver with the real KEDA operator, its metrics adapter and the
// HPA controller, and records how far it gets without Azure. KEDA accepts
// the ScaledObject and creates its HPA; the scaler itself cannot read the
// queue, and the test asserts the error KEDA reports, for both ways the
// project ships to authenticate:
//
//   - as shipped, workload identity: the operator has no federated token
//     (no Azure, no workload identity webhook), so it cannot get a token;
//   - the connection-string TriggerAuthentication, pointed at sbpeer, the
//     project's AMQP 1.0 double of Service Bus: KEDA's azure-servicebus
//     scaler reads the queue's ActiveMessageCount with the SDK's admin
//     client, an HTTPS (ATOM) GET https://<namespace>/<queue>, which
//     sbpeer, an AMQP peer, does not serve; the TLS handshake fails.
//
// So 0 → 1 → N on Service Bus is not shown here: that needs the admin
// API (real Service Bus, or an HTTPS double of GetQueueRuntimeProperties
// the operator trusts).
func TestServiceBusScaledObjectAccepted(t *testing.T) {
	b := NeedKEDAAdapter(t)
	peer := sbpeer.Start(t, sbpeer.Options{})

	cp := Start(t, b, Options{Controllers: []string{DeploymentController, ReplicaSetController, HPAController}})
	cp.StartKEDA(t)
	cp.StartKEDAAdapter(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	w := watcher{t: t, cp: cp, ns: sbNS, name: "sous-worker"}

	// 1. The overlay as it ships.
	rendered, err := Kustomize("deploy/k8s/overlays/servicebus", nil)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(rendered)
	if err != nil {
		t.Fatal(err)
	}
	applied := time.Now()
	if err := cp.ApplyObjects(ctx, objs); err != nil {
		t.Fatalf("%v\n%s", err, cp.Logs(20))
	}
	t.Logf("k8s: applied %d objects of deploy/k8s/overlays/servicebus (server-side)", len(objs))
	h := w.waitHPA(ctx, applied)
	t.Logf("k8s: KEDA created HPA %s: min %d max %d, external metric %s target averageValue %s",
		h.GetName(), *h.Spec.MinReplicas, h.Spec.MaxReplicas, h.Spec.Metrics[0].External.Metric.Name, h.Spec.Metrics[0].External.Target.AverageValue)
	if got := h.Spec.Metrics[0].External.Target.AverageValue.String(); got != "96" || h.Spec.MaxReplicas != maxReplicaCount {
		t.Fatalf("HPA target %s max %d, want the ScaledObject's messageCount 96 and maxReplicaCount %d", got, h.Spec.MaxReplicas, maxReplicaCount)
	}
	// Without the workload identity webhook's AZURE_CLIENT_ID,
	// AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE the operator cannot
	// build the workload identity credential (it logs why); what is left
	// of KEDA's chain is the Azure CLI credential, registered only where
	// /bin/sh exists (not in KEDA's image), which finds no az.
	msg := w.waitScalerFailed(ctx, applied, "ChainedTokenCredential")
	t.Logf("k8s: SERVICEBUS workload identity: KEDA reports KEDAScalerFailed after %s: %s", time.Since(applied).Round(100*time.Millisecond), oneLine(msg))
	if l := cp.LogLines("keda-operator", "workload-identity token provider"); len(l) > 0 {
		t.Logf("k8s: keda-operator (%d times): %s", len(l), oneLine(l[0]))
	}
	w.waitTriggerError(ctx)

	// 2. The connection-string TriggerAuthentication as it ships, its
	// Secret pointing at sbpeer.
	conn, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy/keda/servicebus/triggerauthentication-connection.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	rendered, err = Kustomize("k8stest/servicebus", map[string]string{
		"k8stest/servicebus/triggerauthentication-connection.yaml": string(conn),
		"k8stest/servicebus/kustomization.yaml": `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: sous-servicebus
resources:
  - ../../deploy/k8s/overlays/servicebus
  - triggerauthentication-connection.yaml
patches:
  - target: {group: keda.sh, kind: ScaledObject, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/triggers/0/authenticationRef/name, value: sous-servicebus-connection}
`,
	})
	if err != nil {
		t.Fatal(err)
	}
	if objs, err = Decode(rendered); err != nil {
		t.Fatal(err)
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sous-keda-servicebus", Namespace: sbNS}, StringData: map[string]string{"connection": peer.ConnectionString()}}
	if _, err := cp.Client.CoreV1().Secrets(sbNS).Create(ctx, s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	switched := time.Now()
	if err := cp.ApplyObjects(ctx, objs); err != nil {
		t.Fatalf("%v\n%s", err, cp.Logs(20))
	}
	addr := fmt.Sprintf("127.0.0.1:%d", peer.Port)
	msg = w.waitScalerFailed(ctx, switched, addr)
	t.Logf("k8s: SERVICEBUS connection string to sbpeer (%s): KEDA reports KEDAScalerFailed after %s: %s", addr, time.Since(switched).Round(100*time.Millisecond), oneLine(msg))
	w.waitTriggerError(ctx)
	w.logHPAConditions(ctx)
	// Not asserted: KEDA leaves the Deployment alone on a failing trigger
	// (executor: not active and an error, no fallback), but a scale loop
	// that finds its scalers cache closed under it (ErrCacheClosed, when
	// an error elsewhere cleared the cache) skips the trigger, which then
	// counts as neither active nor failing, and scales to zero (seen in 2
	// of 10 runs; deploy/TESTING.md).
	r := w.replicas(ctx)
	t.Logf("k8s: the Deployment has %d replica(s) (1 is the default; KEDA leaves it on a failing trigger)", r)
	if r != 1 {
		for _, l := range cp.LogLines("keda-operator", "ScaleTarget") {
			t.Logf("k8s: keda-operator: %s", oneLine(l))
		}
		for _, l := range cp.LogLines("keda-operator", "scalers_cache") {
			if strings.HasPrefix(l, "20") { // log lines, not stack frames
				t.Logf("k8s: keda-operator: %s", oneLine(l))
			}
		}
	}
	if n := len(peer.Find(func(e sbpeer.Event) bool { return e.Name == "cbs" || e.Name == "attach" })); n != 0 {
		t.Fatalf("KEDA spoke AMQP to sbpeer (%d cbs/attach events); its scaler was expected to use only the admin (HTTPS) API", n)
	}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// waitHPA waits for KEDA's HPA of the ScaledObject.
func (w watcher) waitHPA(ctx context.Context, since time.Time) *autoscalingv2.HorizontalPodAutoscaler {
	w.t.Helper()
	for {
		h, err := w.cp.Client.AutoscalingV2().HorizontalPodAutoscalers(w.ns).Get(ctx, kedaHPA, metav1.GetOptions{})
		if err == nil {
			if len(h.Spec.Metrics) == 0 || h.Spec.Metrics[0].External == nil {
				w.t.Fatalf("KEDA's HPA has no external metric: %+v", h.Spec.Metrics)
			}
			w.t.Logf("k8s: KEDA created HPA %s after %s", kedaHPA, time.Since(since).Round(100*time.Millisecond))
			return h
		}
		if time.Since(since) > 60*time.Second {
			w.t.Fatalf("no HPA %s within 60s: %v\n%s", kedaHPA, err, w.cp.Logs(40))
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

// waitScalerFailed waits for a KEDAScalerFailed event on the ScaledObject
// newer than since whose message contains want, and returns the message.
func (w watcher) waitScalerFailed(ctx context.Context, since time.Time, want string) string {
	w.t.Helper()
	for {
		evs, err := w.cp.Client.CoreV1().Events(w.ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.kind=ScaledObject,involvedObject.name=" + w.name + ",reason=KEDAScalerFailed"})
		if err != nil {
			w.t.Fatal(err)
		}
		for _, e := range evs.Items {
			if eventTime(e).After(since.Add(-time.Second)) && strings.Contains(e.Message, want) {
				return e.Message
			}
		}
		if time.Since(since) > 90*time.Second {
			w.t.Fatalf("no KEDAScalerFailed event containing %q within 90s (events: %+v)\n%s", want, evs.Items, w.cp.Logs(40))
		}
		sleep(ctx, 500*time.Millisecond)
	}
}

func eventTime(e corev1.Event) time.Time {
	for _, t := range []time.Time{e.EventTime.Time, e.LastTimestamp.Time, e.FirstTimestamp.Time} {
		if !t.IsZero() {
			return t
		}
	}
	return e.CreationTimestamp.Time
}

// waitTriggerError waits for KEDA to mark the ScaledObject not Ready
// because of its trigger, and logs its conditions.
func (w watcher) waitTriggerError(ctx context.Context) {
	w.t.Helper()
	start := time.Now()
	for {
		so, err := w.cp.Dynamic.Resource(ScaledObjects).Namespace(w.ns).Get(ctx, w.name, metav1.GetOptions{})
		if err != nil {
			w.t.Fatal(err)
		}
		conds, _, _ := unstructured.NestedSlice(so.Object, "status", "conditions")
		var ready map[string]any
		for _, c := range conds {
			if m, _ := c.(map[string]any); m["type"] == "Ready" {
				ready = m
			}
		}
		if ready["status"] == "False" && ready["reason"] == "TriggerError" {
			for _, c := range conds {
				if m, _ := c.(map[string]any); m["type"] != "Paused" && m["type"] != "Fallback" {
					w.t.Logf("k8s: ScaledObject %s=%v %v: %v", m["type"], m["status"], m["reason"], m["message"])
				}
			}
			return
		}
		if time.Since(start) > 60*time.Second {
			w.t.Fatalf("ScaledObject not Ready=False/TriggerError within 60s: %v\n%s", conds, w.cp.Logs(40))
		}
		sleep(ctx, 500*time.Millisecond)
	}
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func (w watcher) logHPAConditions(ctx context.Context) {
	w.t.Helper()
	for _, line := range strings.Split(strings.TrimSpace(w.hpaConditions(ctx)), "\n") {
		w.t.Logf("k8s: %s", line)
	}
}
