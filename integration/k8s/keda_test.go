package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

const (
	amqpURL       = "amqp://guest:guest@127.0.0.1:5672/"
	managementURL = "http://127.0.0.1:15672"
	rabbitNS      = "sous-rabbitmq" // the rabbitmq overlay's namespace
	// The test overlay's ScaledObject timing (see testOverlay).
	pollingInterval = 1
	cooldownPeriod  = 10
)

// testOverlay is the project's rabbitmq overlay, rendered as it ships,
// with what a test on one machine must change: the queue (a fresh one per
// run on the shared broker, in the ScaledObject and the ConfigMap alike),
// and the ScaledObject's pollingInterval (15 s → 1 s) and cooldownPeriod
// (600 s → 10 s), so the test takes seconds rather than ten minutes. The
// broker's address is in the Secrets the test creates, as an operator
// would (the overlay never ships them).
func testOverlay(queue string) map[string]string {
	return map[string]string{"k8stest/rabbitmq/kustomization.yaml": fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy/k8s/overlays/rabbitmq
patches:
  - target: {group: keda.sh, kind: ScaledObject, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/pollingInterval, value: %d}
      - {op: replace, path: /spec/cooldownPeriod, value: %d}
      - {op: replace, path: /spec/triggers/0/metadata/queueName, value: %q}
  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_QUEUE, value: %q}
`, pollingInterval, cooldownPeriod, queue, queue)}
}

// TestRabbitMQScalesFromZeroAndBack applies the rabbitmq overlay to a real
// apiserver and lets the real KEDA operator scale the worker Deployment on
// the real broker's queue, through the management API as the project's
// ScaledObject says (protocol http).
func TestRabbitMQScalesFromZeroAndBack(t *testing.T) {
	b := NeedKEDA(t)
	needManagementAPI(t)
	ch, queue := testQueue(t)

	cp := Start(t, b, Options{})
	cp.StartKEDA(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	applied := applyRabbitMQOverlay(t, ctx, cp, queue)

	w := watcher{t: t, cp: cp, ns: rabbitNS, name: "sous-worker"}
	w.waitScaledObjectReady(ctx)

	// The Deployment has no spec.replicas (KEDA owns it), so the apiserver
	// defaults it to 1; KEDA takes it to 0 while the queue is empty.
	w.transition(ctx, "applied, empty queue", applied, 0, 60*time.Second)
	w.hold(ctx, "empty queue", 0, 5*time.Second)

	// Messages: 0 → 1.
	for i := range 3 {
		if err := ch.PublishWithContext(ctx, "", queue, false, false, amqp.Publishing{Body: fmt.Appendf(nil, `{"prompt":"p%d"}`, i)}); err != nil {
			t.Fatal(err)
		}
	}
	w.transition(ctx, "3 messages published", time.Now(), 1, 60*time.Second)
	w.waitPods(ctx, 1, 30*time.Second)

	// A worker takes the messages and holds them unacknowledged while it
	// runs the batch: nothing is ready, 3 are in flight. With protocol
	// http KEDA counts them, so the worker is kept past the cooldown.
	if err := ch.Qos(10, 0, false); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.ConsumeWithContext(ctx, queue, "k8s-test-worker", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	var held []amqp.Delivery
	for len(held) < 3 {
		select {
		case d := <-deliveries:
			held = append(held, d)
		case <-ctx.Done():
			t.Fatal("the consumer got no deliveries")
		}
	}
	waitQueueStats(t, ctx, queue, 0, 3)
	w.hold(ctx, "3 in flight, 0 ready", 1, (cooldownPeriod+5)*time.Second)

	// The batch is done: acked, the queue is empty and idle; after the
	// cooldown KEDA takes the worker away.
	for _, d := range held {
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	}
	acked := time.Now()
	w.transition(ctx, fmt.Sprintf("batch acked, queue empty (cooldown %ds, management stats refresh ~5s)", cooldownPeriod), acked, 0, 90*time.Second)
	w.waitPods(ctx, 0, 30*time.Second)
}

// watcher reads a Deployment's replicas and its pods.
type watcher struct {
	t        *testing.T
	cp       *ControlPlane
	ns, name string
}

func (w watcher) replicas(ctx context.Context) int32 {
	d, err := w.cp.Client.AppsV1().Deployments(w.ns).Get(ctx, w.name, metav1.GetOptions{})
	if err != nil {
		w.t.Fatalf("get deployment: %v", err)
	}
	if d.Spec.Replicas == nil {
		return 1
	}
	return *d.Spec.Replicas
}

// transition waits until spec.replicas is want and logs how long it took
// since since.
func (w watcher) transition(ctx context.Context, what string, since time.Time, want int32, within time.Duration) {
	w.t.Helper()
	from := w.replicas(ctx)
	deadline := time.Now().Add(within)
	for w.replicas(ctx) != want {
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: replicas stayed %d, want %d within %s\n%s", what, w.replicas(ctx), want, within, w.cp.Logs(30))
		}
		sleep(ctx, 100*time.Millisecond)
	}
	if from == want {
		w.t.Logf("k8s: TRANSITION %s: replicas already %d when first read, %s after", what, want, time.Since(since).Round(100*time.Millisecond))
		return
	}
	w.t.Logf("k8s: TRANSITION %s: replicas %d -> %d after %s", what, from, want, time.Since(since).Round(100*time.Millisecond))
}

// hold checks that spec.replicas stays want for d.
func (w watcher) hold(ctx context.Context, what string, want int32, d time.Duration) {
	w.t.Helper()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if got := w.replicas(ctx); got != want {
			w.t.Fatalf("%s: replicas went to %d, want it to stay %d\n%s", what, got, want, w.cp.Logs(30))
		}
		sleep(ctx, 200*time.Millisecond)
	}
	w.t.Logf("k8s: HOLD %s: replicas stayed %d for %s", what, want, d)
}

// waitPods waits until the ReplicaSet controller has made the Deployment's
// pod count want (pods stay Pending: there is no kubelet).
func (w watcher) waitPods(ctx context.Context, want int, within time.Duration) {
	w.t.Helper()
	start := time.Now()
	for {
		pods, err := w.cp.Client.CoreV1().Pods(w.ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sous,app.kubernetes.io/component=worker"})
		if err != nil {
			w.t.Fatal(err)
		}
		live := 0
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil {
				live++
			}
		}
		if live == want {
			w.t.Logf("k8s: the ReplicaSet controller made it %d pod(s) in %s", want, time.Since(start).Round(100*time.Millisecond))
			return
		}
		if time.Since(start) > within {
			w.t.Fatalf("%d pods, want %d within %s\n%s", live, want, within, w.cp.Logs(30))
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// waitScaledObjectReady waits for KEDA to report the ScaledObject Ready:
// it read the TriggerAuthentication, its Secret and the management API.
func (w watcher) waitScaledObjectReady(ctx context.Context) {
	w.t.Helper()
	start := time.Now()
	for {
		so, err := w.cp.Dynamic.Resource(ScaledObjects).Namespace(w.ns).Get(ctx, w.name, metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(so.Object, "status", "conditions")
			for _, c := range conds {
				m, _ := c.(map[string]any)
				if m["type"] == "Ready" && m["status"] == "True" {
					w.t.Logf("k8s: KEDA reports the ScaledObject Ready after %s", time.Since(start).Round(100*time.Millisecond))
					return
				}
			}
		}
		if time.Since(start) > 60*time.Second {
			w.t.Fatalf("ScaledObject not Ready within 60s: %v\n%s", err, w.cp.Logs(40))
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func needManagementAPI(t *testing.T) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, managementURL+"/api/overview", nil)
	req.SetBasicAuth("guest", "guest")
	resp, err := http.DefaultClient.Do(req)
	if err == nil {
		resp.Body.Close()
	}
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("RabbitMQ's management API does not answer on %s (%v): KEDA's scaler reads it (protocol http); `make rabbitmq` enables it (rabbitmq-plugins enable rabbitmq_management)", managementURL, err)
	}
}

// waitQueueStats waits until the management API (what KEDA reads) shows
// ready and unacked messages in queue.
func waitQueueStats(t *testing.T, ctx context.Context, queue string, ready, unacked int) {
	t.Helper()
	start := time.Now()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, managementURL+"/api/queues/%2F/"+url.PathEscape(queue), nil)
		req.SetBasicAuth("guest", "guest")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			var q struct {
				Ready   int `json:"messages_ready"`
				Unacked int `json:"messages_unacknowledged"`
			}
			err = json.NewDecoder(resp.Body).Decode(&q)
			resp.Body.Close()
			if err == nil && q.Ready == ready && q.Unacked == unacked {
				t.Logf("k8s: the management API shows %d ready, %d unacked after %s", ready, unacked, time.Since(start).Round(100*time.Millisecond))
				return
			}
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("management API: queue %s never showed %d ready, %d unacked (%v)", queue, ready, unacked, err)
		}
		sleep(ctx, 250*time.Millisecond)
	}
}

// testQueue declares a fresh queue on the real broker, as the worker
// declares its request queue (a quorum queue), and deletes it when t
// ends; it returns a channel to publish and consume on.
func testQueue(t *testing.T) (*amqp.Channel, string) {
	t.Helper()
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatalf("RabbitMQ on 127.0.0.1:5672: %v (make rabbitmq starts it)", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	queue := fmt.Sprintf("sous.k8s-test.%d", time.Now().UnixNano())
	if _, err := ch.QueueDeclare(queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c, err := conn.Channel(); err == nil {
			_, _ = c.QueueDelete(queue, false, false, false)
			c.Close()
		}
	})
	return ch, queue
}

// applyRabbitMQOverlay applies testOverlay(queue) with the Secrets the
// overlay leaves to the operator, and returns when it applied the
// ScaledObject.
func applyRabbitMQOverlay(t *testing.T, ctx context.Context, cp *ControlPlane, queue string) time.Time {
	t.Helper()
	applied, _ := applyOverlay(t, ctx, cp, "k8stest/rabbitmq", testOverlay(queue), rabbitNS)
	return applied
}

// applyOverlay renders the test kustomization dir (files: what the test
// changes in a shipped overlay) and applies it to namespace ns as an
// operator would: the namespace first, then the RabbitMQ Secrets the
// overlays leave to the operator (deploy/README.md), then everything
// else, so that a ScaledObject finds its TriggerAuthentication's Secret at
// once. It returns when it applied the rest, and the rendered objects.
func applyOverlay(t *testing.T, ctx context.Context, cp *ControlPlane, dir string, files map[string]string, ns string) (time.Time, []*unstructured.Unstructured) {
	t.Helper()
	rendered, err := Kustomize(dir, files)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(rendered)
	if err != nil {
		t.Fatal(err)
	}
	var rest []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == "Namespace" {
			if err := cp.ApplyObjects(ctx, []*unstructured.Unstructured{o}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		rest = append(rest, o)
	}
	createRabbitSecrets(t, ctx, cp, ns, nil)
	applied := time.Now()
	if err := cp.ApplyObjects(ctx, rest); err != nil {
		t.Fatalf("%v\n%s", err, cp.Logs(20))
	}
	t.Logf("k8s: applied %d objects of %s (server-side)", len(objs), dir)
	return applied, objs
}

// createRabbitSecrets creates, in ns, the Secrets the RabbitMQ overlays
// and the chart read and never hold (the workers' AMQP URL, KEDA's
// management API), pointed at the test broker, plus extra.
func createRabbitSecrets(t *testing.T, ctx context.Context, cp *ControlPlane, ns string, extra map[string]map[string]string) {
	t.Helper()
	secrets := map[string]map[string]string{
		"sous-rabbitmq":      {"amqp-url": amqpURL + "%2F"},
		"sous-keda-rabbitmq": {"host": managementURL + "/", "username": "guest", "password": "guest"},
	}
	maps.Copy(secrets, extra)
	for name, data := range secrets {
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, StringData: data}
		if _, err := cp.Client.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}
