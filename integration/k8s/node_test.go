package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/podcost"
	"github.com/sous-run/sous/internal/wire"
)

// workerImage is what `make images` builds; the node loads it from Docker.
const workerImage = "sous-worker:dev"

// nodeNS is the namespace the node tests' pods run in.
const nodeNS = "node-test"

// nodeCluster is a control plane with a node, a fresh queue on the real
// broker and an Ollama stand-in, for one test.
type nodeCluster struct {
	c       *ControlPlane
	n       *Node
	ch      *amqp.Channel
	queue   string
	results string
	engine  *standIn
}

// setupNode starts what a node test needs, or skips t where no node can
// run (NeedNode). Everything stops when t ends.
func setupNode(t *testing.T) *nodeCluster {
	t.Helper()
	nb := NeedNode(t) // first: it skips (fails under CI=true) where no node can run
	b := NeedControlPlane(t)
	if out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Id}}", workerImage).CombinedOutput(); err != nil {
		t.Fatalf("k8s: %s is not in the local Docker engine (make images): %v: %s", workerImage, err, out)
	}
	nc := &nodeCluster{engine: ollamaStandIn(t)}
	nc.ch, nc.queue = testQueue(t)
	nc.results = nc.queue + ".results"
	t.Cleanup(func() {
		_, _ = nc.ch.QueueDelete(nc.results, false, false, false)
		_, _ = nc.ch.QueueDelete(nc.queue+".dlq", false, false, false)
	})

	began := time.Now()
	nc.c = Start(t, b, Options{Controllers: []string{DeploymentController, ReplicaSetController, NodeLifecycleController, ServiceAccountController, RootCAPublisher}})
	nc.n = nc.c.StartNode(t, nb, NodeOptions{Images: []string{workerImage}})
	t.Logf("k8s: control plane and node ready in %s", time.Since(began).Round(100*time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := nc.c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: nodeNS}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The serviceaccount controller makes the namespace's "default"
	// ServiceAccount; admission refuses a pod until it exists.
	itest.WaitUntil(t, time.Minute, "the default ServiceAccount", func() bool {
		_, err := nc.c.Client.CoreV1().ServiceAccounts(nodeNS).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	})
	return nc
}

// workerPod is a host-network sous-worker pod on the test's queue and
// engine, Ready by the worker's /readyz on a loopback port of its own.
func (nc *nodeCluster) workerPod(t *testing.T, name string, grace int64, env ...corev1.EnvVar) *corev1.Pod {
	t.Helper()
	httpPort := itest.FreePort(t)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: nodeNS},
		Spec: corev1.PodSpec{
			HostNetwork:                   true,
			TerminationGracePeriodSeconds: new(grace),
			Containers: []corev1.Container{{
				Name:            "worker",
				Image:           workerImage,
				ImagePullPolicy: corev1.PullNever,
				Env: append([]corev1.EnvVar{
					{Name: "SOUS_AMQP_URL", Value: amqpURL},
					{Name: "SOUS_QUEUE", Value: nc.queue},
					{Name: "SOUS_RESULTS_QUEUE", Value: nc.results},
					{Name: "SOUS_ENGINE_URL", Value: nc.engine.url},
					{Name: "SOUS_MODEL", Value: "tiny"},
					{Name: "SOUS_HTTP_ADDR", Value: "127.0.0.1:" + strconv.Itoa(httpPort)},
				}, env...),
				ReadinessProbe: &corev1.Probe{
					ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
						Host: "127.0.0.1", Path: "/readyz", Port: intstr.FromInt(httpPort),
					}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
}

// runReady creates pod and waits until it is Ready; it logs the timeline
// and returns the pod as the apiserver has it.
func (nc *nodeCluster) runReady(t *testing.T, ctx context.Context, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	created := time.Now()
	if _, err := nc.c.Client.CoreV1().Pods(nodeNS).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var scheduled, running, ready time.Duration
	var last *corev1.Pod
	if !itest.Eventually(3*time.Minute, func() bool {
		p, err := nc.c.Client.CoreV1().Pods(nodeNS).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		last = p
		if scheduled == 0 && p.Spec.NodeName != "" {
			scheduled = time.Since(created)
		}
		if running == 0 && p.Status.Phase == corev1.PodRunning {
			running = time.Since(created)
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
				ready = time.Since(created)
				return true
			}
		}
		return false
	}) {
		var status any
		if last != nil {
			status = last.Status
		}
		t.Fatalf("pod %s not Ready in 3m (scheduled %s, running %s): status %+v\n%s", pod.Name, scheduled, running, status, nc.n.Logs(30))
	}
	t.Logf("k8s: pod %s created → scheduled on %s %s → Running %s → Ready %s", pod.Name, NodeName,
		scheduled.Round(100*time.Millisecond), running.Round(100*time.Millisecond), ready.Round(100*time.Millisecond))
	return last
}

// publish puts one request with id (and the id as its prompt) on the queue.
func (nc *nodeCluster) publish(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	if err := nc.ch.PublishWithContext(ctx, "", nc.queue, false, false, amqp.Publishing{
		MessageId: id, ContentType: "application/json", DeliveryMode: amqp.Persistent,
		Body: []byte(`{"prompt":"` + id + `","options":{"num_predict":4}}`),
	}); err != nil {
		t.Fatal(err)
	}
}

// result waits up to within for the next result and checks it is id's
// echo.
func (nc *nodeCluster) result(t *testing.T, id string, within time.Duration) wire.Result {
	t.Helper()
	var res wire.Result
	itest.WaitUntil(t, within, "the result for "+id, func() bool {
		d, ok, err := nc.ch.Get(nc.results, true)
		if err != nil || !ok {
			return false
		}
		if err := json.Unmarshal(d.Body, &res); err != nil {
			t.Fatalf("result %s: %v", d.Body, err)
		}
		return true
	})
	if res.ID != id || res.Status != wire.StatusOK || res.Response == nil || *res.Response != "echo:"+id {
		t.Fatalf("result for %s: %+v", id, res)
	}
	return res
}

// deletePod deletes the pod, as a user or a controller would: the kubelet
// then sends its container SIGTERM, and SIGKILL after its grace period.
func (nc *nodeCluster) deletePod(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	if err := nc.c.Client.CoreV1().Pods(nodeNS).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

// waitGone waits until the kubelet has stopped the pod and the apiserver
// no longer has it; it returns the container's exit code when a poll saw
// it terminated (-1 when none did: the pod can be gone between two polls).
func (nc *nodeCluster) waitGone(t *testing.T, ctx context.Context, name string) int32 {
	t.Helper()
	exit := int32(-1)
	itest.WaitUntil(t, time.Minute, "the kubelet to stop pod "+name+" and the pod to be gone", func() bool {
		p, err := nc.c.Client.CoreV1().Pods(nodeNS).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true
		}
		if err == nil {
			for _, cs := range p.Status.ContainerStatuses {
				if cs.State.Terminated != nil {
					exit = cs.State.Terminated.ExitCode
				}
			}
		}
		return false
	})
	return exit
}

// TestNodeRunsAPod is the first step of issue 23: a real kube-scheduler
// and kubelet (with a private containerd) beside the control plane, and
// one host-network sous-worker pod from the local image, scheduled,
// Running, and Ready by its own /readyz probe (the real broker connected,
// the engine, an Ollama stand-in in this test, answering with the model),
// with its service-account token mounted (one the apiserver takes as the
// pod's ServiceAccount), answering one request from the real broker, then
// deleted: the kubelet stops its container.
func TestNodeRunsAPod(t *testing.T) {
	nc := setupNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p := nc.runReady(t, ctx, nc.workerPod(t, "sous-worker", 10))

	// The kubelet mounted the pod's projected service-account token (a
	// TokenRequest to the apiserver): the apiserver takes it as the pod's
	// ServiceAccount.
	tokens, _ := filepath.Glob(filepath.Join(nc.n.Dir, "kubelet", "pods", string(p.UID), "volumes", "kubernetes.io~projected", "*", "token"))
	if len(tokens) != 1 {
		t.Fatalf("the pod's projected token: found %v", tokens)
	}
	token, err := os.ReadFile(tokens[0])
	if err != nil {
		t.Fatal(err)
	}
	asPod := rest.AnonymousClientConfig(nc.c.Config)
	asPod.BearerToken = string(token)
	podClient, err := kubernetes.NewForConfig(asPod)
	if err != nil {
		t.Fatal(err)
	}
	review, err := podClient.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the pod's token: %v", err)
	}
	if want := "system:serviceaccount:" + nodeNS + ":default"; review.Status.UserInfo.Username != want {
		t.Fatalf("the pod's token is %q, want %q", review.Status.UserInfo.Username, want)
	}
	t.Logf("k8s: the pod's projected token authenticates as %s", review.Status.UserInfo.Username)

	// The pod does work: one request through the real broker, answered by
	// the worker in the pod (the stand-in engine echoes the prompt).
	published := time.Now()
	nc.publish(t, ctx, "node-1")
	res := nc.result(t, "node-1", time.Minute)
	t.Logf("k8s: the pod answered node-1 (worker %s) in %s", res.Worker, time.Since(published).Round(100*time.Millisecond))

	deleted := time.Now()
	nc.deletePod(t, ctx, p.Name)
	exit := nc.waitGone(t, ctx, p.Name)
	t.Logf("k8s: pod deleted and gone in %s (exit code seen: %d)", time.Since(deleted).Round(100*time.Millisecond), exit)
}

// TestNodeSIGTERMDrains deletes a pod while its worker has a request at
// the engine: Kubernetes' SIGTERM (the kubelet's, through containerd)
// makes the worker finish that request within its drain budget, publish
// the result and exit 0, inside terminationGracePeriodSeconds. The first
// step of the test 4, with one request and no prefetch backlog.
func TestNodeSIGTERMDrains(t *testing.T) {
	nc := setupNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const grace = 20
	p := nc.runReady(t, ctx, nc.workerPod(t, "sous-worker", grace,
		corev1.EnvVar{Name: "SOUS_DRAIN_TIMEOUT", Value: "15s"}))

	nc.engine.delay.Store(int64(4 * time.Second))
	calls := nc.engine.calls.Load()
	nc.publish(t, ctx, "drain-1")
	itest.WaitUntil(t, time.Minute, "drain-1 at the engine", func() bool { return nc.engine.calls.Load() > calls })

	deleted := time.Now()
	nc.deletePod(t, ctx, p.Name)
	res := nc.result(t, "drain-1", time.Minute)
	t.Logf("k8s: drain-1 answered %s after the delete (worker %s)", time.Since(deleted).Round(100*time.Millisecond), res.Worker)
	exit := nc.waitGone(t, ctx, p.Name)
	t.Logf("k8s: pod gone %s after the delete (grace %ds; exit code seen: %d)", time.Since(deleted).Round(100*time.Millisecond), grace, exit)
	if exit != -1 && exit != 0 {
		t.Errorf("the worker exited %d on SIGTERM, want 0 (137 is the kubelet's SIGKILL after the grace period)", exit)
	}
	q, err := nc.ch.QueueDeclarePassive(nc.queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"})
	if err != nil {
		t.Fatal(err)
	}
	if q.Messages != 0 {
		t.Errorf("%d requests left in %s", q.Messages, nc.queue)
	}
}

// TestNodeTwoReplicasOnTwoNodes runs a Deployment of two host-network
// workers on two nodes (kubelets named 127.0.0.1 and 127.0.0.2, each with
// its own containerd and cgroupRoot): a host-network pod's port is a host
// port, so the scheduler puts one on each node, and each worker listens on
// its own pod IP (the node's loopback address, from the downward API).
// Both become Ready and both requests are answered: what the issue's
// 0 → N → 0 needs from the node.
func TestNodeTwoReplicasOnTwoNodes(t *testing.T) {
	nc := setupNode(t)
	second := nc.c.StartNode(t, NeedNode(t), NodeOptions{Name: "127.0.0.2", Images: []string{workerImage}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	port := itest.FreePort(t)
	labels := map[string]string{"app": "sous-worker"}
	pod := nc.workerPod(t, "template", 10,
		corev1.EnvVar{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
	)
	c := &pod.Spec.Containers[0]
	for i, e := range c.Env {
		if e.Name == "SOUS_HTTP_ADDR" {
			c.Env = append(c.Env[:i], c.Env[i+1:]...)
			break
		}
	}
	// After POD_IP: $(VAR) expands only variables defined before it.
	c.Env = append(c.Env, corev1.EnvVar{Name: "SOUS_HTTP_ADDR", Value: "$(POD_IP):" + strconv.Itoa(port)})
	c.Ports = []corev1.ContainerPort{{Name: "http", ContainerPort: int32(port)}}
	c.ReadinessProbe.HTTPGet = &corev1.HTTPGetAction{Path: "/readyz", Port: intstr.FromString("http")}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: "sous-worker", Namespace: nodeNS},
		Spec: appsv1.DeploymentSpec{
			Replicas: new(int32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: pod.Spec},
		},
	}
	created := time.Now()
	if _, err := nc.c.Client.AppsV1().Deployments(nodeNS).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var nodes map[string]bool
	if !itest.Eventually(3*time.Minute, func() bool {
		pods, err := nc.c.Client.CoreV1().Pods(nodeNS).List(ctx, metav1.ListOptions{LabelSelector: "app=sous-worker"})
		if err != nil {
			return false
		}
		nodes = map[string]bool{}
		for _, p := range pods.Items {
			for _, cond := range p.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
					nodes[p.Spec.NodeName+" ("+p.Status.PodIP+")"] = true
				}
			}
		}
		return len(nodes) == 2
	}) {
		pods, _ := nc.c.Client.CoreV1().Pods(nodeNS).List(ctx, metav1.ListOptions{})
		for _, p := range pods.Items {
			t.Logf("pod %s on %q: %+v", p.Name, p.Spec.NodeName, p.Status)
		}
		t.Fatalf("two Ready pods in 3m: ready on %v\n%s%s", nodes, second.logs(20), nc.n.Logs(20))
	}
	t.Logf("k8s: Deployment created → 2 pods Ready in %s, on %v", time.Since(created).Round(100*time.Millisecond), nodes)

	nc.publish(t, ctx, "two-1")
	nc.publish(t, ctx, "two-2")
	got := map[string]bool{}
	for range 2 {
		var res wire.Result
		itest.WaitUntil(t, time.Minute, "two results", func() bool {
			d, ok, err := nc.ch.Get(nc.results, true)
			if err != nil || !ok {
				return false
			}
			return json.Unmarshal(d.Body, &res) == nil
		})
		if res.Status != wire.StatusOK || res.Response == nil || *res.Response != "echo:"+res.ID {
			t.Fatalf("result: %+v", res)
		}
		got[res.ID] = true
	}
	if !got["two-1"] || !got["two-2"] {
		t.Fatalf("results for %v, want two-1 and two-2", got)
	}
	t.Logf("k8s: both requests answered")
}

// nodeOverlay is the project's rabbitmq overlay as a user applies it, with
// what this node needs changed in a kustomize patch, nothing else: the
// local image (sous-worker:dev, never pulled, the stand-in engine's URL
// instead of an engine child), one replica (no KEDA runs here), host
// networking with the worker listening on its pod IP, no GPU limit or
// 2-CPU/16-GiB requests (this machine has 2 CPUs and no GPU), the model
// volume an emptyDir (no storage provisioner), the test's queue, the
// apiserver's loopback address for the in-cluster client (no kube-proxy),
// and the namespace's Pod Security level: the overlay enforces
// "restricted", which refuses host networking and host ports ("violates
// PodSecurity "restricted:latest": host namespaces (hostNetwork=true),
// hostPort ..."), so the test's namespace is "privileged"; the pod's own
// security context stays as shipped.
func nodeOverlay(queue, engine string, httpPort, apiPort int) map[string]string {
	return map[string]string{"k8stest/node/kustomization.yaml": fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy/k8s/overlays/rabbitmq
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
      - {op: replace, path: /data/SOUS_QUEUE, value: %[1]q}
      - {op: replace, path: /data/SOUS_RESULTS_QUEUE, value: %[2]q}
      - {op: replace, path: /data/SOUS_DEAD_LETTER_QUEUE, value: %[3]q}
      - {op: replace, path: /data/SOUS_ENGINE_URL, value: %[4]q}
      - {op: replace, path: /data/SOUS_ENGINE_EXEC, value: ""}
      - {op: replace, path: /data/SOUS_MODEL, value: tiny}
      - {op: replace, path: /data/SOUS_MODELS_ALLOWED, value: tiny}
  - target: {kind: Deployment, name: sous-worker}
    patch: |-
      - {op: add, path: /spec/replicas, value: 1}
      - {op: add, path: /spec/template/spec/hostNetwork, value: true}
      - {op: replace, path: /spec/template/spec/containers/0/imagePullPolicy, value: Never}
      - {op: replace, path: /spec/template/spec/containers/0/resources, value: {}}
      - {op: replace, path: /spec/template/spec/containers/0/ports/0/containerPort, value: %[5]d}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: SOUS_HTTP_ADDR, value: "$(POD_IP):%[5]d"}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: KUBERNETES_SERVICE_HOST, value: "127.0.0.1"}}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: KUBERNETES_SERVICE_PORT, value: "%[6]d"}}
      - {op: replace, path: /spec/template/spec/volumes/0, value: {name: models, emptyDir: {}}}
`, queue, queue+".results", queue+".dlq", engine, httpPort, apiPort)}
}

// TestNodeOverlayWorkerReady applies the rabbitmq overlay (nodeOverlay)
// and runs its worker on the node: the Deployment's pod, with the
// overlay's security context (non-root, read-only root file system, no
// capabilities, RuntimeDefault seccomp), probes, ServiceAccount and RBAC,
// becomes Ready, answers a request, and patches its own pod's deletion
// cost through the apiserver. KEDA's objects and the gateway are
// left out: no KEDA operator runs here, and the gateway is test 5's.
func TestNodeOverlayWorkerReady(t *testing.T) {
	nc := setupNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	u, err := url.Parse(nc.c.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	apiPort, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	rendered, err := Kustomize("k8stest/node", nodeOverlay(nc.queue, nc.engine.url, itest.FreePort(t), apiPort))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(rendered)
	if err != nil {
		t.Fatal(err)
	}
	var ns, rest []*unstructured.Unstructured
	for _, o := range objs {
		switch {
		case o.GetKind() == "Namespace":
			ns = append(ns, o)
		case strings.HasPrefix(o.GetAPIVersion(), "keda.sh/"), strings.Contains(o.GetName(), "gateway"):
			t.Logf("k8s: left out %s %s", o.GetKind(), o.GetName())
		default:
			rest = append(rest, o)
		}
	}
	if err := nc.c.ApplyObjects(ctx, ns); err != nil {
		t.Fatal(err)
	}
	createRabbitSecrets(t, ctx, nc.c, rabbitNS, nil)
	applied := time.Now()
	if err := nc.c.ApplyObjects(ctx, rest); err != nil {
		t.Fatalf("%v\n%s", err, nc.c.Logs(20))
	}
	var pod corev1.Pod
	if !itest.Eventually(3*time.Minute, func() bool {
		pods, err := nc.c.Client.CoreV1().Pods(rabbitNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=worker"})
		if err != nil {
			return false
		}
		for _, p := range pods.Items {
			for _, cond := range p.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
					pod = p
					return true
				}
			}
		}
		return false
	}) {
		pods, _ := nc.c.Client.CoreV1().Pods(rabbitNS).List(ctx, metav1.ListOptions{})
		for _, p := range pods.Items {
			t.Logf("pod %s on %q: %+v", p.Name, p.Spec.NodeName, p.Status)
		}
		t.Fatalf("no Ready worker pod in 3m\n%s", nc.n.Logs(30))
	}
	t.Logf("k8s: overlay applied → worker pod %s Ready on %s in %s", pod.Name, pod.Spec.NodeName, time.Since(applied).Round(100*time.Millisecond))

	nc.publish(t, ctx, "overlay-1")
	nc.result(t, "overlay-1", time.Minute)
	// The worker keeps its pod's deletion cost current through the
	// apiserver, with its own ServiceAccount token and the overlay's Role:
	// the path busy-aware scale-in (the test 3) rests on.
	var cost string
	itest.WaitUntil(t, 30*time.Second, "the worker to patch its pod's deletion cost", func() bool {
		p, err := nc.c.Client.CoreV1().Pods(rabbitNS).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		c, ok := p.Annotations[podcost.Annotation]
		cost = c
		return ok
	})
	t.Logf("k8s: overlay-1 answered; the worker patched its pod's deletion cost to %q", cost)
}

// standIn is an Ollama stand-in: the part of Ollama's API that the
// worker's readiness asks (version, the model list) and a generate that
// echoes the prompt after delay, on loopback, where a host-network pod
// reaches it.
type standIn struct {
	url   string
	delay atomic.Int64 // nanoseconds before each generate answers
	calls atomic.Int64 // generates received
}

// standInMux answers the part of Ollama's API that the worker's readiness
// asks (the version, the model list, the root); each stand-in adds its
// generate (and chat) to it.
func standInMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/version", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"version":"0.6.5"}`))
	})
	mux.HandleFunc("GET /api/tags", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"models":[{"name":"tiny:latest","model":"tiny:latest"}]}`))
	})
	mux.HandleFunc("GET /", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("Ollama is running")) })
	return mux
}

// generateReq is the part of a generate request the stand-ins read.
type generateReq struct {
	Model  string `json:"model"`
	Prompt string `json:"prompt"`
}

// decodeGenerate reads a generate request, or answers 400 and returns false.
func decodeGenerate(w http.ResponseWriter, r *http.Request) (generateReq, bool) {
	var req generateReq
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, `{"error":"bad request"}`, http.StatusBadRequest)
		return req, false
	}
	return req, true
}

func ollamaStandIn(t *testing.T) *standIn {
	t.Helper()
	s := &standIn{}
	mux := standInMux()
	mux.HandleFunc("POST /api/generate", func(w http.ResponseWriter, r *http.Request) {
		req, ok := decodeGenerate(w, r)
		if !ok {
			return
		}
		s.calls.Add(1)
		select {
		case <-time.After(time.Duration(s.delay.Load())):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"model": req.Model, "created_at": time.Now().UTC().Format(time.RFC3339Nano),
			"response": "echo:" + req.Prompt, "done": true, "done_reason": "stop",
			"prompt_eval_count": 1, "eval_count": 1,
		})
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	s.url = fmt.Sprintf("http://%s", ln.Addr())
	return s
}
