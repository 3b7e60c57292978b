package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/podcost"
	"github.com/sous-run/sous/internal/wire"
)

// secondNode is the second node's name and address: with host networking
// a worker's port is a host port, so N replicas need N nodes
// (docs/design/kubelet.md, "Several replicas").
const secondNode = "127.0.0.2"

// nodeFleet is a control plane with two nodes, a fresh queue on the real
// broker, its results queue, and a gated Ollama stand-in, for one test of
// the rabbitmq overlay's workers on the node.
type nodeFleet struct {
	c       *ControlPlane
	nodes   []*Node
	conn    *amqp.Connection
	ch      *amqp.Channel
	queue   string
	results string
	engine  *gatedEngine
	apiPort int
}

// setupFleet starts what a fleet test needs: the control plane (with the
// HPA controller, the KEDA operator and KEDA's metrics adapter when keda
// is set, as keda_test.go and scaler_test.go run them), kube-scheduler and
// two kubelets (127.0.0.1 and 127.0.0.2), each with its own containerd.
// The engine holds the prompts hold says until it is released. Everything
// stops when t ends.
func setupFleet(t *testing.T, keda bool, hold func(prompt string) bool) *nodeFleet {
	t.Helper()
	nb := NeedNode(t) // first: it skips (or fails under CI=true) where no node can run
	b := NeedControlPlane(t)
	if keda {
		b = NeedKEDAAdapter(t)
		needManagementAPI(t)
	}
	needWorkerImage(t)
	f := &nodeFleet{engine: gatedStandIn(t, hold)}
	f.ch, f.queue = testQueue(t)
	f.results = f.queue + ".results"
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	f.conn = conn
	t.Cleanup(func() {
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(f.results, false, false, false)
			_, _ = ch.QueueDelete(f.queue+".dlq", false, false, false)
		}
		conn.Close()
	})
	// The results queue exists before any worker does, so that the test
	// reads it from the first result on; the worker uses a queue it finds
	// as it is.
	if _, err := f.ch.QueueDeclare(f.results, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatal(err)
	}

	began := time.Now()
	controllers := []string{DeploymentController, ReplicaSetController, NodeLifecycleController, ServiceAccountController, RootCAPublisher}
	if keda {
		controllers = append(controllers, HPAController)
	}
	f.c = Start(t, b, Options{Controllers: controllers})
	if keda {
		f.c.StartKEDA(t)
		f.c.StartKEDAAdapter(t)
	}
	for _, name := range []string{NodeName, secondNode} {
		f.nodes = append(f.nodes, f.c.StartNode(t, nb, NodeOptions{Name: name, Images: []string{workerImage}}))
	}
	with := ""
	if keda {
		with = ", KEDA (operator, metrics adapter)"
	}
	t.Logf("k8s: control plane%s and nodes %s, %s ready in %s", with, NodeName, secondNode, time.Since(began).Round(100*time.Millisecond))
	u, err := url.Parse(f.c.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	if f.apiPort, err = strconv.Atoi(u.Port()); err != nil {
		t.Fatal(err)
	}
	return f
}

// needWorkerImage fails t unless `make images` built the worker's image.
func needWorkerImage(t *testing.T) {
	t.Helper()
	if out, err := exec.Command("docker", "image", "inspect", "-f", "{{.Id}}", workerImage).CombinedOutput(); err != nil {
		t.Fatalf("k8s: %s is not in the local Docker engine (make images): %v: %s", workerImage, err, out)
	}
}

// logs is the tail of every node's and the control plane's logs.
func (f *nodeFleet) logs() string {
	var b strings.Builder
	for _, n := range f.nodes[1:] {
		b.WriteString(n.logs(20))
	}
	b.WriteString(f.nodes[0].Logs(20))
	return b.String()
}

// applyFleet renders the rabbitmq overlay through nodeOverlay (what the
// node forces, nothing else) and a layer of the test's own on top (layer:
// its patches), and applies it as a user would, without the gateway's
// objects (test 5's) and, unless keda, without KEDA's.
func (f *nodeFleet) applyFleet(t *testing.T, ctx context.Context, keda bool, layer string) time.Time {
	t.Helper()
	files := nodeOverlay(f.queue, f.engine.url, itest.FreePort(t), f.apiPort)
	files["k8stest/fleet/kustomization.yaml"] = `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../node
patches:
` + layer
	rendered, err := Kustomize("k8stest/fleet", files)
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
		case strings.Contains(o.GetName(), "gateway"), !keda && strings.HasPrefix(o.GetAPIVersion(), "keda.sh/"):
			t.Logf("k8s: left out %s %s", o.GetKind(), o.GetName())
		default:
			rest = append(rest, o)
		}
	}
	if err := f.c.ApplyObjects(ctx, ns); err != nil {
		t.Fatal(err)
	}
	createRabbitSecrets(t, ctx, f.c, rabbitNS, nil)
	applied := time.Now()
	if err := f.c.ApplyObjects(ctx, rest); err != nil {
		t.Fatalf("%v\n%s", err, f.c.Logs(20))
	}
	t.Logf("k8s: applied %d objects of the rabbitmq overlay (nodeOverlay and the test's layer)", len(rest)+len(ns))
	return applied
}

// workerPods lists the overlay's worker pods.
func (f *nodeFleet) workerPods(ctx context.Context) ([]corev1.Pod, error) {
	l, err := f.c.Client.CoreV1().Pods(rabbitNS).List(ctx, metav1.ListOptions{LabelSelector: workerSelector})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

// replicas is the worker Deployment's spec.replicas (1 when unset, as the
// apiserver defaults it).
func (f *nodeFleet) replicas(ctx context.Context) (int32, error) {
	d, err := f.c.Client.AppsV1().Deployments(rabbitNS).Get(ctx, "sous-worker", metav1.GetOptions{})
	if err != nil {
		return 0, err
	}
	if d.Spec.Replicas == nil {
		return 1, nil
	}
	return *d.Spec.Replicas, nil
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// readyOn is the nodes with a Ready, live worker pod, and those pods.
func readyOn(pods []corev1.Pod) (map[string]string, []corev1.Pod) {
	nodes := map[string]string{}
	var ready []corev1.Pod
	for _, p := range pods {
		if p.DeletionTimestamp == nil && podReady(&p) {
			nodes[p.Spec.NodeName] = p.Name
			ready = append(ready, p)
		}
	}
	return nodes, ready
}

// publishConfirmed publishes n requests, ids prefix-000 … and each id as
// its prompt, on a channel in confirm mode, and returns once the broker
// has confirmed them all: none is lost before a worker sees it.
func (f *nodeFleet) publishConfirmed(t *testing.T, ctx context.Context, prefix string, n int) []string {
	t.Helper()
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, n)
	confirms := make([]*amqp.DeferredConfirmation, n)
	for i := range n {
		ids[i] = fmt.Sprintf("%s-%03d", prefix, i)
		confirms[i], err = ch.PublishWithDeferredConfirmWithContext(ctx, "", f.queue, false, false, amqp.Publishing{
			MessageId: ids[i], ContentType: "application/json", DeliveryMode: amqp.Persistent,
			Body: []byte(`{"prompt":"` + ids[i] + `","options":{"num_predict":4}}`),
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for i, c := range confirms {
		ok, err := c.WaitContext(ctx)
		if err != nil || !ok {
			t.Fatalf("the broker did not confirm %s: ack %v, %v", ids[i], ok, err)
		}
	}
	return ids
}

// resultCounter counts the results on the fleet's results queue by
// correlation id, from a consumer of its own, until t ends.
type resultCounter struct {
	mu    sync.Mutex
	count map[string]int
	bad   []string // results that are not an OK echo of their id
	first time.Time
	total int
}

func (f *nodeFleet) countResults(t *testing.T) *resultCounter {
	t.Helper()
	ch, err := f.conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(f.results, "k8s-test-results", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	rc := &resultCounter{count: map[string]int{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for d := range deliveries {
			var res wire.Result
			err := json.Unmarshal(d.Body, &res)
			rc.mu.Lock()
			if rc.total == 0 {
				rc.first = time.Now()
			}
			rc.total++
			switch {
			case err != nil:
				rc.bad = append(rc.bad, string(d.Body))
			default:
				rc.count[res.ID]++
				if res.Status != wire.StatusOK || res.Response == nil || *res.Response != "echo:"+res.ID {
					rc.bad = append(rc.bad, string(d.Body))
				}
			}
			rc.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ch.Close() // closes deliveries
		<-done
	})
	return rc
}

// snapshot returns the results so far: the distinct ids, the total, the
// first result's time, and the bad ones.
func (rc *resultCounter) snapshot() (distinct, total int, first time.Time, bad []string) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return len(rc.count), rc.total, rc.first, slices.Clone(rc.bad)
}

// missingAndDuplicated compares the results with ids.
func (rc *resultCounter) missingAndDuplicated(ids []string) (missing []string, dups map[string]int) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	dups = map[string]int{}
	for _, id := range ids {
		switch n := rc.count[id]; {
		case n == 0:
			missing = append(missing, id)
		case n > 1:
			dups[id] = n
		}
	}
	for id, n := range rc.count {
		if !slices.Contains(ids, id) {
			dups[id] = n // a result for a request nobody sent
		}
	}
	return missing, dups
}

// queueDepth reads the request queue's ready and unacknowledged messages
// from the management API, as KEDA's scaler does (protocol http).
func queueDepth(ctx context.Context, queue string) (ready, unacked int, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, managementURL+"/api/queues/%2F/"+url.PathEscape(queue), nil)
	if err != nil {
		return 0, 0, err
	}
	req.SetBasicAuth("guest", "guest")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("management API: %s", resp.Status)
	}
	var q struct {
		Ready   *int `json:"messages_ready"`
		Unacked *int `json:"messages_unacknowledged"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&q); err != nil {
		return 0, 0, err
	}
	if q.Ready == nil || q.Unacked == nil {
		return 0, 0, fmt.Errorf("management API: no message counts for %s yet", queue)
	}
	return *q.Ready, *q.Unacked, nil
}

// events is a test's timeline: named instants, printed in order.
type events struct {
	start time.Time
	at    []struct {
		when time.Time
		what string
	}
}

func (e *events) add(when time.Time, what string) {
	e.at = append(e.at, struct {
		when time.Time
		what string
	}{when, what})
}

func (e *events) log(t *testing.T) {
	sort.SliceStable(e.at, func(i, j int) bool { return e.at[i].when.Before(e.at[j].when) })
	var b strings.Builder
	for _, ev := range e.at {
		fmt.Fprintf(&b, "\n%8s  %s", ev.when.Sub(e.start).Round(100*time.Millisecond), ev.what)
	}
	t.Logf("k8s: TIMELINE (from the publish)%s", b.String())
}

// kedaRequests is what TestNodeKEDAScalesPodsZeroToNToZero publishes:
// ceil(300 / 96) = 4 replicas' worth by the ScaledObject's value (96
// messages per worker), capped by its maxReplicaCount, 2 here.
const kedaRequests = 300

// TestNodeKEDAScalesPodsZeroToNToZero is the test 1: the rabbitmq
// overlay applied as a user applies it (nodeOverlay: what this node
// forces), with its ScaledObject and TriggerAuthentication, on a cluster
// with the KEDA operator, KEDA's metrics adapter, the HPA controller, a
// scheduler and two kubelets. 300 prompts on the real broker: KEDA wakes
// the Deployment from zero, the HPA takes it to 2 (ceil(300/96) = 4,
// capped at maxReplicaCount 2: two nodes), the pods are scheduled one per
// node, pass their readiness probe (the worker's /readyz) and drain the
// queue; every request is answered exactly once (results counted by
// correlation id; none lost, none twice: no pod stops while it holds work
// here, so a duplicate is a failure); the queue empties and KEDA takes the
// Deployment back to zero replicas and no pods. The stand-in engine holds
// every answer until both pods are Ready, so that the scale-up to 2 is
// seen whatever the machine's speed (one pod would otherwise drain the
// queue before the HPA's next sync).
//
// What the test changes besides nodeOverlay (its own layer): spec.replicas
// left out again (KEDA owns it, as shipped); the ScaledObject's queue,
// pollingInterval 15 s → 1 s, cooldownPeriod 600 s → 10 s,
// maxReplicaCount 4 → 2; SOUS_ENGINE_TIMEOUT 120 s → 600 s, since the
// engine holds the first answers until the second pod is Ready, a wait
// that a loaded machine may stretch.
func TestNodeKEDAScalesPodsZeroToNToZero(t *testing.T) {
	f := setupFleet(t, true, func(string) bool { return true })
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	layer := fmt.Sprintf(`  - target: {kind: Deployment, name: sous-worker}
    patch: |-
      - {op: remove, path: /spec/replicas}
  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_ENGINE_TIMEOUT, value: 600s}
  - target: {group: keda.sh, kind: ScaledObject, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/pollingInterval, value: %d}
      - {op: replace, path: /spec/cooldownPeriod, value: %d}
      - {op: replace, path: /spec/maxReplicaCount, value: 2}
      - {op: replace, path: /spec/triggers/0/metadata/queueName, value: %q}
`, pollingInterval, cooldownPeriod, f.queue)
	applied := f.applyFleet(t, ctx, true, layer)
	w := watcher{t: t, cp: f.c, ns: rabbitNS, name: "sous-worker"}
	w.waitScaledObjectReady(ctx)
	// The Deployment has no spec.replicas: the apiserver defaults it to 1,
	// and KEDA takes it to 0 while the queue is empty.
	w.transition(ctx, "applied, empty queue", applied, 0, 2*time.Minute)
	itest.WaitUntil(t, 3*time.Minute, "no worker pods before the publish", func() bool {
		pods, err := f.workerPods(ctx)
		return err == nil && len(pods) == 0
	})
	results := f.countResults(t)

	tl := &events{}
	t.Cleanup(func() {
		if tl.start.IsZero() {
			return
		}
		tl.log(t) // also when a step fails
	})
	tl.start = time.Now()
	ids := f.publishConfirmed(t, ctx, "keda", kedaRequests)
	tl.add(tl.start, fmt.Sprintf("publish %d prompts", kedaRequests))
	tl.add(time.Now(), fmt.Sprintf("all %d confirmed by the broker", kedaRequests))

	// What the poll below has seen first, for the timeline.
	seen := map[string]bool{}
	once := func(what string) {
		if !seen[what] {
			seen[what] = true
			tl.add(time.Now(), what)
		}
	}
	var maxReplicas int32
	readyNodes := map[string]string{}
	poll := func() {
		if r, err := f.replicas(ctx); err == nil {
			if r > maxReplicas {
				maxReplicas = r
			}
			if r > 0 {
				once(fmt.Sprintf("replicas %d", r))
			}
		}
		pods, err := f.workerPods(ctx)
		if err != nil {
			return
		}
		for _, p := range pods {
			if p.Spec.NodeName != "" {
				once("first pod scheduled")
			}
			if p.Status.Phase == corev1.PodRunning {
				once("first pod Running")
			}
		}
		nodes, _ := readyOn(pods)
		for n, p := range nodes {
			readyNodes[n] = p
		}
		if len(nodes) > 0 {
			once("first pod Ready")
		}
		if len(nodes) == 2 {
			once("2 pods Ready, one per node")
		}
	}
	if !itest.Eventually(5*time.Minute, func() bool { poll(); return len(readyNodes) == 2 && maxReplicas == 2 }) {
		pods, _ := f.workerPods(ctx)
		for _, p := range pods {
			t.Logf("pod %s on %q: %+v", p.Name, p.Spec.NodeName, p.Status)
		}
		w.hpaStatus(ctx)
		t.Fatalf("KEDA and the HPA did not bring the Deployment to 2 Ready pods on 2 nodes in 5m: max replicas %d, Ready on %v\n%s", maxReplicas, readyNodes, f.logs())
	}
	calls := f.engine.calls.Load()
	f.engine.release()
	tl.add(time.Now(), fmt.Sprintf("engine released (%d generates were held)", calls))

	if !itest.Eventually(5*time.Minute, func() bool {
		poll()
		distinct, _, first, _ := results.snapshot()
		if !first.IsZero() && !seen["first result"] {
			seen["first result"] = true
			tl.add(first, "first result")
		}
		return distinct == kedaRequests
	}) {
		distinct, total, _, _ := results.snapshot()
		t.Fatalf("%d distinct results (%d in all) of %d in 5m\n%s", distinct, total, kedaRequests, f.logs())
	}
	once(fmt.Sprintf("all %d answered", kedaRequests))

	var ready, unacked int
	if !itest.Eventually(3*time.Minute, func() bool {
		var err error
		ready, unacked, err = queueDepth(ctx, f.queue)
		return err == nil && ready == 0 && unacked == 0
	}) {
		t.Fatalf("the request queue is not empty: %d ready, %d unacked", ready, unacked)
	}
	once("queue empty (management API: 0 ready, 0 unacked)")

	if !itest.Eventually(5*time.Minute, func() bool {
		r, err := f.replicas(ctx)
		if err != nil || r != 0 {
			return false
		}
		once("zero replicas")
		pods, err := f.workerPods(ctx)
		return err == nil && len(pods) == 0
	}) {
		r, _ := f.replicas(ctx)
		pods, _ := f.workerPods(ctx)
		t.Fatalf("KEDA did not take the Deployment back to zero: replicas %d, %d pods\n%s", r, len(pods), f.logs())
	}
	once("no worker pods left")

	distinct, total, _, bad := results.snapshot()
	missing, dups := results.missingAndDuplicated(ids)
	t.Logf("k8s: %d requests, %d results, %d distinct; missing %d, duplicated %d; max replicas %d; Ready pods on %v",
		kedaRequests, total, distinct, len(missing), len(dups), maxReplicas, readyNodes)
	if len(bad) > 0 {
		t.Errorf("%d results are not the engine's echo of their request, first: %s", len(bad), bad[0])
	}
	if len(missing) > 0 || len(dups) > 0 || total != kedaRequests {
		t.Errorf("want every request answered exactly once: missing %v, duplicated %v, %d results for %d requests", missing, dups, total, kedaRequests)
	}
}

// holdMarker in a prompt makes the gated stand-in hold its answer until
// the test releases it.
const holdMarker = "hold:"

// TestNodeScaleInSparesBusyPod is the test 3: the rabbitmq
// overlay's Deployment at two replicas on two nodes (nodeOverlay, the
// test's layer sets replicas 2; no KEDA: the test scales as the HPA
// would, through the scale subresource). One pod takes a long request
// (the stand-in engine holds prompts marked "hold:"), and its worker
// patches its own pod's controller.kubernetes.io/pod-deletion-cost through
// the apiserver, with its ServiceAccount's projected token and the
// overlay's Role (the patch's field manager is the worker's, "sous-worker");
// the idle one says 0. Scaled 2 → 1, the real ReplicaSet controller
// deletes the idle pod and keeps the busy one, whose long result then
// arrives exactly once.
func TestNodeScaleInSparesBusyPod(t *testing.T) {
	f := setupFleet(t, false, func(p string) bool { return strings.HasPrefix(p, holdMarker) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	f.applyFleet(t, ctx, false, `  - target: {kind: Deployment, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/replicas, value: 2}
`)
	var pods []corev1.Pod
	if !itest.Eventually(5*time.Minute, func() bool {
		all, err := f.workerPods(ctx)
		if err != nil {
			return false
		}
		nodes, ready := readyOn(all)
		pods = ready
		return len(nodes) == 2
	}) {
		t.Fatalf("two Ready worker pods on two nodes in 5m: %d\n%s", len(pods), f.logs())
	}
	for _, p := range pods {
		t.Logf("k8s: pod %s Ready on %s (created %s)", p.Name, p.Spec.NodeName, p.CreationTimestamp.Format(time.RFC3339))
	}
	// Each worker says it is idle when it starts.
	itest.WaitUntil(t, 2*time.Minute, "both workers to patch their pods' deletion cost to 0", func() bool {
		return f.costs(ctx, pods) == "0,0"
	})

	results := f.countResults(t)
	const long = holdMarker + "long-1"
	if err := f.ch.PublishWithContext(ctx, "", f.queue, false, false, amqp.Publishing{
		MessageId: long, ContentType: "application/json", DeliveryMode: amqp.Persistent,
		Body: []byte(`{"prompt":"` + long + `","options":{"num_predict":4}}`),
	}); err != nil {
		t.Fatal(err)
	}
	itest.WaitUntil(t, 2*time.Minute, "the long request at the engine", func() bool { return f.engine.held.Load() == 1 })
	var busy, idle corev1.Pod
	itest.WaitUntil(t, 2*time.Minute, "the busy worker to patch its pod's deletion cost above 0", func() bool {
		costs := strings.Split(f.costs(ctx, pods), ",")
		if len(costs) != 2 {
			return false
		}
		busyCost := func(c string) bool { n, err := strconv.Atoi(c); return err == nil && n > 0 }
		switch {
		case busyCost(costs[0]) && costs[1] == "0":
			busy, idle = pods[0], pods[1]
		case costs[0] == "0" && busyCost(costs[1]):
			busy, idle = pods[1], pods[0]
		default:
			return false
		}
		return true
	})
	// The annotation on the busy pod is the worker's own patch: the
	// apiserver records its field manager, and the token it came with
	// is the pod's ServiceAccount's (the overlay's Role allows patch, the
	// admin's client never wrote the annotation).
	p, err := f.c.Client.CoreV1().Pods(rabbitNS).Get(ctx, busy.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if m := annotationManager(p, podcost.Annotation); m != "sous-worker" {
		t.Fatalf("pod %s: %s is managed by %q, want the worker's patch (sous-worker); managedFields %+v", busy.Name, podcost.Annotation, m, p.ManagedFields)
	}
	// Without the costs the controller deletes the newer pod first, and
	// among pods created in the same second the one Ready for less time
	// (on a log scale), then the lower UID's: the busy one is often the
	// one it would pick, never one it is bound to keep.
	risk := "created in the same second as the idle one: without the costs, ready time and UID would decide"
	switch {
	case busy.CreationTimestamp.After(idle.CreationTimestamp.Time):
		risk = "newer than the idle one: without the costs it would go first"
	case idle.CreationTimestamp.After(busy.CreationTimestamp.Time):
		risk = "older than the idle one: the controller would keep it even without the costs"
	}
	t.Logf("k8s: busy %s on %s (cost %s, patched by the worker as sous-worker), idle %s on %s (cost 0); the busy pod is %s",
		busy.Name, busy.Spec.NodeName, p.Annotations[podcost.Annotation], idle.Name, idle.Spec.NodeName, risk)
	// The ReplicaSet controller ranks pods from its informer's cache: wait
	// until that cache holds the patch before scaling in.
	replicaSetSawPods(t, ctx, f.c, rabbitNS, "sous-worker")

	scaled := time.Now()
	left := scaleTo(t, ctx, f.c, 1)
	deleted := gone([]corev1.Pod{busy, idle}, left)
	t.Logf("k8s: scaled 2 → 1: the ReplicaSet controller deleted %s in %s; left %v", deleted, time.Since(scaled).Round(100*time.Millisecond), names(left))
	if deleted != idle.Name || len(left) != 1 || left[0].Name != busy.Name {
		t.Fatalf("scale-in deleted %q and left %v; want the idle %s deleted and the busy %s kept\n%s", deleted, names(left), idle.Name, busy.Name, f.logs())
	}

	released := time.Now()
	f.engine.release()
	itest.WaitUntil(t, 2*time.Minute, "the long result", func() bool {
		distinct, _, _, _ := results.snapshot()
		return distinct == 1
	})
	t.Logf("k8s: the long result arrived %s after the release", time.Since(released).Round(100*time.Millisecond))
	// Exactly once: once the request is settled (nothing ready or unacked
	// in its queue) no second result can come.
	var ready, unacked int
	if !itest.Eventually(3*time.Minute, func() bool {
		var err error
		ready, unacked, err = queueDepth(ctx, f.queue)
		return err == nil && ready == 0 && unacked == 0
	}) {
		t.Fatalf("the request queue is not empty: %d ready, %d unacked", ready, unacked)
	}
	gonePod := time.Now()
	itest.WaitUntil(t, 3*time.Minute, "the idle pod "+idle.Name+" to be gone", func() bool {
		_, err := f.c.Client.CoreV1().Pods(rabbitNS).Get(ctx, idle.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	t.Logf("k8s: the idle pod gone %s after the long result", time.Since(gonePod).Round(100*time.Millisecond))
	p, err = f.c.Client.CoreV1().Pods(rabbitNS).Get(ctx, busy.Name, metav1.GetOptions{})
	if err != nil || p.DeletionTimestamp != nil || !podReady(p) {
		t.Fatalf("the busy pod %s after its long request: %v, %+v", busy.Name, err, p.Status)
	}
	_, total, _, bad := results.snapshot()
	missing, dups := results.missingAndDuplicated([]string{long})
	if len(bad) > 0 || len(missing) > 0 || len(dups) > 0 || total != 1 {
		t.Fatalf("want the long result exactly once: %d results, missing %v, duplicated %v, bad %v", total, missing, dups, bad)
	}
	t.Logf("k8s: the long result arrived exactly once; the busy pod %s is still Ready on %s", busy.Name, busy.Spec.NodeName)
}

// replicaSetSawPods returns once the ReplicaSet controller's pod cache
// holds every pod change made before the call, without guessing how long
// its watch takes. It creates a pod that matches the Deployment's current
// ReplicaSet but has no owner and can never be scheduled: the controller
// adopts it only from its cache, and its pod watch delivers changes in
// order, so by then the cache holds everything earlier. Adopted, the
// ReplicaSet has one pod too many and deletes the unscheduled one first
// (an unassigned pod ranks below every assigned one); the call returns
// once it is gone, leaving the ReplicaSet as it was.
func replicaSetSawPods(t *testing.T, ctx context.Context, cp *ControlPlane, ns, deployment string) {
	t.Helper()
	d, err := cp.Client.AppsV1().Deployments(ns).Get(ctx, deployment, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rss, err := cp.Client.AppsV1().ReplicaSets(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var labels map[string]string
	for _, rs := range rss.Items {
		owned := slices.ContainsFunc(rs.OwnerReferences, func(o metav1.OwnerReference) bool { return o.UID == d.UID })
		if owned && rs.Spec.Replicas != nil && *rs.Spec.Replicas > 0 {
			labels = rs.Spec.Selector.MatchLabels
		}
	}
	if labels == nil {
		t.Fatalf("no ReplicaSet of %s/%s with replicas", ns, deployment)
	}
	no, yes := false, true
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "cache-barrier-", Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{
			NodeSelector:                 map[string]string{"sous.test/never": "true"},
			AutomountServiceAccountToken: &no,
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot:   &yes,
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{{
				Name: "pause", Image: PauseImage, ImagePullPolicy: corev1.PullNever,
				SecurityContext: &corev1.SecurityContext{
					AllowPrivilegeEscalation: &no,
					Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
				},
			}},
		},
	}
	pod, err = cp.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	itest.WaitUntil(t, 2*time.Minute, "the ReplicaSet controller to adopt and delete the cache barrier pod "+pod.Name, func() bool {
		_, err := cp.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	})
	t.Logf("k8s: the ReplicaSet controller's pod cache caught up (barrier pod adopted and deleted in %s)", time.Since(began).Round(100*time.Millisecond))
}

// costs is the deletion-cost annotations of pods, in order, comma-joined
// ("-" where a pod has none).
func (f *nodeFleet) costs(ctx context.Context, pods []corev1.Pod) string {
	var out []string
	for _, p := range pods {
		got, err := f.c.Client.CoreV1().Pods(rabbitNS).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			return ""
		}
		c, ok := got.Annotations[podcost.Annotation]
		if !ok {
			c = "-"
		}
		out = append(out, c)
	}
	return strings.Join(out, ",")
}

// annotationManager is the field manager that owns annotation on p.
func annotationManager(p *corev1.Pod, annotation string) string {
	key := "f:" + annotation
	for _, m := range p.ManagedFields {
		if m.FieldsV1 == nil {
			continue
		}
		var fields map[string]any
		if json.Unmarshal(m.FieldsV1.Raw, &fields) != nil {
			continue
		}
		meta, _ := fields["f:metadata"].(map[string]any)
		ann, _ := meta["f:annotations"].(map[string]any)
		if _, ok := ann[key]; ok {
			return m.Manager
		}
	}
	return ""
}

// gatedEngine is an Ollama stand-in like ollamaStandIn: the part of
// Ollama's API the worker's readiness asks, and a generate that echoes
// the prompt; a prompt hold says is held until release (or until its
// request ends), so a test decides when that work finishes.
type gatedEngine struct {
	url     string
	hold    func(prompt string) bool
	open    chan struct{} // closed by release
	release func()
	calls   atomic.Int64 // generates received
	held    atomic.Int64 // generates waiting for the release now
}

func gatedStandIn(t *testing.T, hold func(prompt string) bool) *gatedEngine {
	t.Helper()
	g := &gatedEngine{hold: hold, open: make(chan struct{})}
	var once sync.Once
	g.release = func() { once.Do(func() { close(g.open) }) }
	mux := standInMux()
	mux.HandleFunc("POST /api/generate", func(w http.ResponseWriter, r *http.Request) {
		req, ok := decodeGenerate(w, r)
		if !ok {
			return
		}
		g.calls.Add(1)
		if g.hold(req.Prompt) {
			g.held.Add(1)
			select {
			case <-g.open:
				g.held.Add(-1)
			case <-r.Context().Done():
				g.held.Add(-1)
				return
			}
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
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		g.release() // held handlers return
		_ = srv.Close()
		<-served
	})
	g.url = "http://" + ln.Addr().String()
	return g
}
