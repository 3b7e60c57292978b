package k8s

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	// The project's ScaledObject (deploy/keda/rabbitmq), as it ships.
	valuePerReplica = 96
	maxReplicaCount = 4
	// KEDA names the HPA it creates for a ScaledObject keda-hpa-<name>.
	kedaHPA = "keda-hpa-sous-worker"
)

// TestRabbitMQScalesOneToN: the rabbitmq overlay on a real apiserver with
// the real KEDA operator, KEDA's real metrics adapter behind the
// apiserver's aggregation layer and the real HPA controller. KEDA takes
// the worker from 0 to 1 on the first message; from there the HPA asks
// external.metrics.k8s.io for the queue's length, which the aggregator
// proxies to the adapter, which asks the operator, which asks RabbitMQ's
// management API: replicas = ceil(messages / 96), at most 4, and no more
// than 2 added per 60 s (the ScaledObject's scaleUp policy).
func TestRabbitMQScalesOneToN(t *testing.T) {
	b := NeedKEDAAdapter(t)
	needManagementAPI(t)
	ch, queue := testQueue(t)

	cp := Start(t, b, Options{Controllers: []string{DeploymentController, ReplicaSetController, HPAController}})
	cp.StartKEDA(t)
	cp.StartKEDAAdapter(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	applied := applyRabbitMQOverlay(t, ctx, cp, queue)

	w := watcher{t: t, cp: cp, ns: rabbitNS, name: "sous-worker"}
	w.waitScaledObjectReady(ctx)
	w.transition(ctx, "applied, empty queue", applied, 0, 60*time.Second)

	publish := func(n int) {
		t.Helper()
		for i := range n {
			if err := ch.PublishWithContext(ctx, "", queue, false, false, amqp.Publishing{Body: fmt.Appendf(nil, `{"prompt":"p%d"}`, i)}); err != nil {
				t.Fatal(err)
			}
		}
	}

	// 150 messages: KEDA wakes the worker (0 -> 1), then the HPA asks for
	// ceil(150/96) = 2. The scaleUp policy would allow 3 (1 + 2 per
	// 60 s): holding 2 through two HPA syncs shows the 2 is the
	// arithmetic, not the policy.
	published := time.Now()
	publish(150)
	w.transition(ctx, "150 messages published (KEDA: 0 -> 1)", published, 1, 60*time.Second)
	waitQueueStats(t, ctx, queue, 150, 0)
	twoAt := w.steps(ctx, "150 messages (HPA: ceil(150/96) = 2)", published, ceilDiv(150, valuePerReplica), 90*time.Second)
	w.hpaStatus(ctx)
	w.externalMetric(ctx)
	w.hold(ctx, "150 messages, two HPA syncs", 2, 35*time.Second)

	// 350 more, 500 in all: ceil(500/96) = 6, bounded by maxReplicaCount 4.
	more := time.Now()
	publish(350)
	waitQueueStats(t, ctx, queue, 500, 0)
	fourAt := w.steps(ctx, fmt.Sprintf("500 messages (HPA: ceil(500/96) = %d, maxReplicaCount %d)", ceilDiv(500, valuePerReplica), maxReplicaCount), more, maxReplicaCount, 120*time.Second)
	// The policy allows 1 -> 3 within 60 s of the 1 -> 2 step, so the
	// fourth replica cannot come before that step leaves the window (less
	// the time this test took to see the step).
	gap := fourAt.Sub(twoAt)
	t.Logf("k8s: 2 -> 4 came %s after 1 -> 2 (scaleUp policy: at most 2 pods added per 60 s)", gap.Round(100*time.Millisecond))
	if gap < 55*time.Second {
		t.Fatalf("the fourth replica came %s after the second: the scaleUp policy (2 pods per 60 s) was not applied", gap)
	}
	w.waitPods(ctx, maxReplicaCount, 30*time.Second)
	w.hpaStatus(ctx)
	w.hold(ctx, "500 messages, two HPA syncs", maxReplicaCount, 35*time.Second)
}

func ceilDiv(a, b int32) int32 { return (a + b - 1) / b }

// steps waits until spec.replicas is want, logging every value it passes
// through with the time since since; it fails if the replicas ever exceed
// maxReplicaCount. It returns when want was first seen.
func (w watcher) steps(ctx context.Context, what string, since time.Time, want int32, within time.Duration) time.Time {
	w.t.Helper()
	last := w.replicas(ctx)
	deadline := time.Now().Add(within)
	for last != want {
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: replicas stayed %d, want %d within %s\n%s\n%s", what, last, want, within, w.hpaConditions(ctx), w.cp.Logs(30))
		}
		sleep(ctx, 100*time.Millisecond)
		got := w.replicas(ctx)
		if got == last {
			continue
		}
		if got > maxReplicaCount {
			w.t.Fatalf("%s: replicas %d, above maxReplicaCount %d", what, got, maxReplicaCount)
		}
		w.t.Logf("k8s: TRANSITION %s: replicas %d -> %d after %s", what, last, got, time.Since(since).Round(100*time.Millisecond))
		last = got
	}
	return time.Now()
}

func (w watcher) hpa(ctx context.Context) *autoscalingv2.HorizontalPodAutoscaler {
	h, err := w.cp.Client.AutoscalingV2().HorizontalPodAutoscalers(w.ns).Get(ctx, kedaHPA, metav1.GetOptions{})
	if err != nil {
		w.t.Fatalf("get KEDA's HPA: %v", err)
	}
	return h
}

// hpaStatus logs what the HPA last read from external.metrics.k8s.io and
// what it decided.
func (w watcher) hpaStatus(ctx context.Context) {
	w.t.Helper()
	h := w.hpa(ctx)
	var got []string
	for _, m := range h.Status.CurrentMetrics {
		if m.External != nil && m.External.Current.AverageValue != nil {
			got = append(got, fmt.Sprintf("%s averageValue %s", m.External.Metric.Name, m.External.Current.AverageValue))
		}
	}
	w.t.Logf("k8s: HPA %s: min %d max %d, current %d desired %d; external metrics read: %s",
		h.Name, *h.Spec.MinReplicas, h.Spec.MaxReplicas, h.Status.CurrentReplicas, h.Status.DesiredReplicas, strings.Join(got, ", "))
}

func (w watcher) hpaConditions(ctx context.Context) string {
	h, err := w.cp.Client.AutoscalingV2().HorizontalPodAutoscalers(w.ns).Get(ctx, kedaHPA, metav1.GetOptions{})
	if err != nil {
		return fmt.Sprintf("HPA: %v", err)
	}
	var b strings.Builder
	for _, c := range h.Status.Conditions {
		fmt.Fprintf(&b, "HPA condition %s=%s %s: %s\n", c.Type, c.Status, c.Reason, c.Message)
	}
	return b.String()
}

// externalMetric reads the HPA's metric through the aggregator, as the
// HPA controller does, and logs it.
func (w watcher) externalMetric(ctx context.Context) {
	w.t.Helper()
	h := w.hpa(ctx)
	if len(h.Spec.Metrics) == 0 || h.Spec.Metrics[0].External == nil {
		w.t.Fatalf("KEDA's HPA has no external metric: %+v", h.Spec.Metrics)
	}
	name := h.Spec.Metrics[0].External.Metric.Name
	sel := metav1.FormatLabelSelector(h.Spec.Metrics[0].External.Metric.Selector)
	raw, err := w.cp.Client.Discovery().RESTClient().Get().
		AbsPath("/apis/external.metrics.k8s.io/v1beta1/namespaces", w.ns, name).
		Param("labelSelector", sel).DoRaw(ctx)
	if err != nil {
		w.t.Fatalf("GET external.metrics.k8s.io %s: %v", name, err)
	}
	w.t.Logf("k8s: GET /apis/external.metrics.k8s.io/v1beta1/namespaces/%s/%s?labelSelector=%s (aggregator -> KEDA adapter -> operator -> the trigger's scaler): %s",
		w.ns, name, url.QueryEscape(sel), strings.TrimSpace(string(raw)))
}
