package k8s

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/sous-run/sous/integration/itest"
)

// sbNodeOverlay is the servicebus overlay as a user applies it, with what
// this node forces changed as nodeOverlay changes it for the rabbitmq one
// (the namespace's Pod Security level, the local image, the stand-in
// engine, host networking on the pod's IP, no GPU or 2-CPU requests, the
// apiserver's loopback address for the in-cluster client, the model
// volume an emptyDir: the overlay's azurefile-csi-premium claim has no
// provisioner here and would keep the pod Pending), a 1 s readiness
// period, and the gateway at 0 replicas. Nothing of the broker is changed: the worker gets
// the overlay's namespace (sous-example.servicebus.windows.net) and its
// workload identity, neither of which exists here.
func sbNodeOverlay(engine string, httpPort, apiPort int) map[string]string {
	return map[string]string{"k8stest/sbnode/kustomization.yaml": fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy/k8s/overlays/servicebus
images:
  - name: ghcr.io/sous-run/sous-worker-ollama
    newName: sous-worker
    newTag: dev
patches:
  - target: {kind: Namespace}
    patch: |-
      - {op: replace, path: /metadata/labels/pod-security.kubernetes.io~1enforce, value: privileged}
  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_ENGINE_URL, value: %[1]q}
      - {op: replace, path: /data/SOUS_ENGINE_EXEC, value: ""}
      - {op: replace, path: /data/SOUS_MODEL, value: tiny}
      - {op: replace, path: /data/SOUS_MODELS_ALLOWED, value: tiny}
  - target: {kind: Deployment, name: sous-worker}
    patch: |-
      - {op: add, path: /spec/replicas, value: 1}
      - {op: add, path: /spec/template/spec/hostNetwork, value: true}
      - {op: replace, path: /spec/template/spec/containers/0/imagePullPolicy, value: Never}
      - {op: replace, path: /spec/template/spec/containers/0/resources, value: {}}
      - {op: replace, path: /spec/template/spec/containers/0/ports/0/containerPort, value: %[2]d}
      - {op: replace, path: /spec/template/spec/containers/0/readinessProbe/periodSeconds, value: 1}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: SOUS_HTTP_ADDR, value: "$(POD_IP):%[2]d"}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: KUBERNETES_SERVICE_HOST, value: "127.0.0.1"}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: KUBERNETES_SERVICE_PORT, value: "%[3]d"}}
      - {op: replace, path: /spec/template/spec/volumes/0, value: {name: models, emptyDir: {}}}
  - target: {kind: Deployment, name: sous-gateway}
    patch: |-
      - {op: replace, path: /spec/replicas, value: 0}
`, engine, httpPort, apiPort)}
}

// TestNodeOverlaysApply is the test 6: both shipped overlays,
// deploy/k8s/overlays/rabbitmq and deploy/k8s/overlays/servicebus,
// rendered with kustomize and applied server-side to one cluster, each in
// its own namespace, with KEDA's CRDs installed (no KEDA operator: the
// replicas are the test's), every object of each, KEDA's and the
// gateway's included (the gateway at 0 replicas: it runs in test 5). The
// only changes are the test's kustomize patches (nodeOverlay,
// sbNodeOverlay).
//
// RabbitMQ: every object is there, and the worker pod is Ready and
// answers a request from the real broker.
//
// Service Bus has no namespace here (no Azure, no name resolution, no
// workload identity webhook), so what is sound to assert is that a user
// applying it gets objects the apiserver accepted and a pod that is
// scheduled and started and says what is wrong, not one that looks
// healthy or fails without a word: every object is there (the
// ScaledObject and both TriggerAuthentications accepted by KEDA's CRDs,
// the ServiceAccounts with the workload identity client-id annotation,
// the Role and RoleBinding), the pod is scheduled on the node and its
// container started, the worker's own /readyz answers 503 with a reason
// that names Service Bus, the pod's Ready condition is False, and the
// container's log names the namespace it cannot reach. Whether the
// worker then keeps retrying or exits (a restart, CrashLoopBackOff) is
// logged, not asserted: either is a clear report.
func TestNodeOverlaysApply(t *testing.T) {
	nc := setupNode(t)
	b := NeedKEDA(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	began := time.Now()
	if err := nc.c.ApplyDir(ctx, b.KEDACRDs); err != nil {
		t.Fatalf("KEDA's CRDs: %v", err)
	}
	for _, r := range []string{"scaledobjects", "triggerauthentications"} {
		if err := nc.c.WaitServed(ctx, schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: r}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("k8s: KEDA's CRDs served in %s", time.Since(began).Round(100*time.Millisecond))

	// RabbitMQ, with the gateway at 0 replicas.
	rmqFiles := nodeLayer(nodeOverlay(nc.queue, nc.engine.url, itest.FreePort(t), nc.apiPort(t)), "overlays-rabbitmq", `  - target: {kind: Deployment, name: sous-gateway}
    patch: |-
      - {op: replace, path: /spec/replicas, value: 0}
`)
	rmqObjs, applied := nc.applyNodeOverlay(t, ctx, "k8stest/overlays-rabbitmq", rmqFiles, rabbitNS, true, func(*unstructured.Unstructured) bool { return true })
	// Service Bus, beside it.
	sbPort := itest.FreePort(t)
	sbObjs, sbApplied := nc.applyNodeOverlay(t, ctx, "k8stest/sbnode", sbNodeOverlay(nc.engine.url, sbPort, nc.apiPort(t)), sbNS, false, func(*unstructured.Unstructured) bool { return true })

	for name, set := range map[string][]*unstructured.Unstructured{"rabbitmq": rmqObjs, "servicebus": sbObjs} {
		kinds := nc.objectsThere(t, ctx, set)
		for _, k := range []string{"Namespace", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget", "PersistentVolumeClaim", "ScaledObject", "TriggerAuthentication", "Service"} {
			if kinds[k] == 0 {
				t.Errorf("no %s among the overlay's objects %v", k, kinds)
			}
		}
		t.Logf("k8s: %s: every object there: %v", name, kinds)
	}
	sa, err := nc.c.Client.CoreV1().ServiceAccounts(sbNS).Get(ctx, "sous-worker", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sa.Annotations["azure.workload.identity/client-id"] == "" {
		t.Errorf("the servicebus worker's ServiceAccount lacks its workload identity client-id: %v", sa.Annotations)
	}

	// RabbitMQ runs work.
	const sel = "app.kubernetes.io/component=worker"
	pod := nc.waitReadyPod(t, ctx, rabbitNS, sel, 3*time.Minute)
	t.Logf("k8s: rabbitmq: worker pod %s Ready %s after the apply", pod.Name, time.Since(applied).Round(100*time.Millisecond))
	nc.publish(t, ctx, "overlays-1")
	nc.result(t, "overlays-1", time.Minute)
	t.Logf("k8s: rabbitmq: overlays-1 answered")

	// Service Bus: scheduled, started, not ready, and saying why.
	var sbPod corev1.Pod
	itest.WaitUntil(t, 3*time.Minute, "the servicebus worker pod scheduled and its container started", func() bool {
		pods, err := nc.c.Client.CoreV1().Pods(sbNS).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil || len(pods.Items) == 0 {
			return false
		}
		sbPod = pods.Items[0]
		for _, cs := range sbPod.Status.ContainerStatuses {
			if cs.State.Running != nil || cs.State.Terminated != nil || cs.LastTerminationState.Terminated != nil {
				return sbPod.Spec.NodeName == nc.n.Name
			}
		}
		return false
	})
	t.Logf("k8s: servicebus: worker pod %s scheduled on %s and started %s after the apply", sbPod.Name, sbPod.Spec.NodeName, time.Since(sbApplied).Round(100*time.Millisecond))

	var why string
	readyz := fmt.Sprintf("http://%s:%d/readyz", nc.n.Name, sbPort)
	itest.WaitUntil(t, 3*time.Minute, "the servicebus worker's /readyz to say why it is not ready", func() bool {
		resp, err := http.Get(readyz)
		if err != nil {
			return false
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		why = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body)))
		lower := strings.ToLower(why)
		return resp.StatusCode == http.StatusServiceUnavailable && (strings.Contains(lower, "servicebus") || strings.Contains(lower, "service bus"))
	})
	t.Logf("k8s: servicebus: the worker's /readyz: %s", why)

	log := nc.waitLog(t, sbNS, sbPod.Name, "worker", "name the Service Bus namespace", 3*time.Minute, func(log string) bool {
		return strings.Contains(log, "sous-example.servicebus.windows.net")
	})
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, `"level":"ERROR"`) || strings.Contains(line, `"level":"WARN"`) {
			t.Logf("k8s: servicebus: worker log: %s", line)
		}
	}
	p, err := nc.c.Client.CoreV1().Pods(sbNS).Get(ctx, sbPod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if isPodReady(p) {
		t.Errorf("the servicebus worker pod is Ready without a Service Bus namespace: %+v", p.Status)
	}
	for _, cs := range p.Status.ContainerStatuses {
		t.Logf("k8s: servicebus: container %s: ready %v, restarts %d, state %+v, last %+v", cs.Name, cs.Ready, cs.RestartCount, cs.State, cs.LastTerminationState)
	}
}

// objectsThere gets each object back from the apiserver (the apply was
// accepted and the object kept) and counts them by kind.
func (nc *nodeCluster) objectsThere(t *testing.T, ctx context.Context, objs []*unstructured.Unstructured) map[string]int {
	t.Helper()
	kinds := map[string]int{}
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := nc.c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
		}
		ri := nc.c.Dynamic.Resource(m.Resource)
		if m.Scope.Name() == apimeta.RESTScopeNameNamespace {
			_, err = ri.Namespace(o.GetNamespace()).Get(ctx, o.GetName(), metav1.GetOptions{})
		} else {
			_, err = ri.Get(ctx, o.GetName(), metav1.GetOptions{})
		}
		if err != nil {
			t.Errorf("%s %s/%s is not there: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
			continue
		}
		kinds[o.GetKind()]++
	}
	return kinds
}
