package k8s

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// drainSlots is the worker's in-flight limit in TestNodeRolloutDrainsPrefetched
// (SOUS_ENGINE_PARALLEL and SOUS_BATCH_MAX): requests at the engine at
// once; its prefetch (worker.Capacity) is well above it.
const drainSlots = 4

// TestNodeRolloutDrainsPrefetched is the test 4: the rabbitmq
// overlay's Deployment as a user applies it (nodeOverlay, plus the test's
// own patch: an in-flight limit of 4, a 60 s drain budget inside a 90 s
// grace period, a 1 s readiness period, and the pod's name as the
// worker's id, which is its host name in a pod without host networking),
// with 4 requests at the engine and more prefetched when its pod goes,
// twice: the pod deleted (as a user or a node drain does), then the
// Deployment rolled (its template's restartedAt annotation changed, as
// `kubectl rollout restart` does; maxSurge 0, so the old pod goes first).
//
// The engine stand-in holds every call until the test opens its gate, so
// the requests in flight are known exactly. What the worker guarantees on
// SIGTERM (docs/reliability.md, "SIGTERM under load" and "prefetched
// deliveries go back at shutdown"; internal/queue/rabbitmq handBack): it
// stops its consumer, hands back every prefetched delivery it has not
// started as a copy without spending an attempt (one log line counts
// them), lets the calls in flight finish within SOUS_DRAIN_TIMEOUT,
// publishes their results and exits 0. So the test asserts, each time:
// the old pod logs the hand-back with every prefetched delivery copied
// (none nacked back, none left to the broker) before its in-flight calls
// end; each request in flight at the delete was called once at the engine
// and answered by the old pod; the old container exits 0 (not 137, the
// kubelet's SIGKILL at the end of the grace period); the next pod answers
// the rest; every request is answered, none lost, and none twice: the
// drain is clean by design, so a duplicate is a failure (and logged).
func TestNodeRolloutDrainsPrefetched(t *testing.T) {
	nc := setupNode(t)
	engine := startGateStandIn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	const grace = 90
	files := nodeLayer(nodeOverlay(nc.queue, engine.url, itest.FreePort(t), nc.apiPort(t)), "drain", fmt.Sprintf(`  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_ENGINE_PARALLEL, value: "%[1]d"}
      - {op: replace, path: /data/SOUS_BATCH_MAX, value: "%[1]d"}
      - {op: replace, path: /data/SOUS_DRAIN_TIMEOUT, value: 60s}
  - target: {kind: Deployment, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/template/spec/terminationGracePeriodSeconds, value: %[2]d}
      - {op: replace, path: /spec/template/spec/containers/0/readinessProbe/periodSeconds, value: 1}
      - {op: add, path: /spec/template/spec/containers/0/env/-, value: {name: SOUS_WORKER_ID, value: "$(POD_NAME)"}}
`, drainSlots, grace))
	_, applied := nc.applyNodeOverlay(t, ctx, "k8stest/drain", files, rabbitNS, true, notKEDA(false))
	const sel = "app.kubernetes.io/component=worker"
	first := nc.waitReadyPod(t, ctx, rabbitNS, sel, 3*time.Minute)
	t.Logf("k8s: overlay applied → worker pod %s Ready in %s", first.Name, time.Since(applied).Round(100*time.Millisecond))
	res := collectResults(t, nc.results)

	// The worker holds at most its window (its prefetch): drainSlots at
	// the engine, the rest prefetched.
	window := worker.Capacity(drainSlots)
	var all []string
	// round publishes n requests, waits until drainSlots are at the engine
	// and more are prefetched, stops the old pod with stop, and checks the
	// drain; it returns the next pod.
	round := func(name string, old corev1.Pod, n int, stop func()) corev1.Pod {
		t.Helper()
		engine.hold()
		ids := make([]string, n)
		for i := range ids {
			ids[i] = fmt.Sprintf("%s-%03d", name, i)
			nc.publish(t, ctx, ids[i])
		}
		all = append(all, ids...)
		var ready int
		if !itest.Eventually(2*time.Minute, func() bool {
			ready = nc.queueReady(t)
			return len(engine.inFlight()) == drainSlots && ready == n-window
		}) {
			t.Fatalf("%s: never %d at the engine and the worker's window (%d) full: at the engine %v, %d of %d ready in the queue", name, drainSlots, window, engine.inFlight(), ready, n)
		}
		inflight := engine.inFlight()
		t.Logf("k8s: %s: %d published; %v at the engine, %d prefetched, %d still in the queue", name, n, inflight, n-len(inflight)-ready, ready)

		// Every delivery the worker holds beyond those at the engine was
		// prefetched: its window is full, so it takes no more until the
		// stop.
		prefetched := n - len(inflight) - ready
		stopped := time.Now()
		stop()
		var handedBack []string
		log := nc.waitLog(t, rabbitNS, old.Name, "worker", fmt.Sprintf("handed back its %d prefetched deliveries", prefetched), time.Minute, func(log string) bool {
			handedBack = handedBack[:0]
			for _, l := range logLines(log, "settled") {
				if l["action"] == "requeue" && l["reason"] == "shutdown" {
					handedBack = append(handedBack, fmt.Sprint(l["id"]))
				}
			}
			// Deliveries the driver held and the worker had not received
			// yet go back in the driver (one line counts them).
			for _, l := range logLines(log, "handed back prefetched deliveries") {
				copied, _ := l["copied"].(float64)
				for range int(copied) {
					handedBack = append(handedBack, "(driver)")
				}
			}
			return len(handedBack) >= prefetched
		})
		t.Logf("k8s: %s: the old pod handed back %d prefetched deliveries %s after the stop", name, len(handedBack), time.Since(stopped).Round(100*time.Millisecond))
		if len(handedBack) != prefetched {
			t.Errorf("%s: handed back %d, want the %d prefetched", name, len(handedBack), prefetched)
		}
		for _, id := range handedBack {
			if slices.Contains(inflight, id) {
				t.Errorf("%s: %s was at the engine and was handed back; the drain lets calls in flight finish", name, id)
			}
		}
		if l := logLines(log, "handed back prefetched deliveries"); len(l) > 0 && (l[0]["nacked_back"] != float64(0) || l[0]["left_to_the_broker"] != float64(0)) {
			t.Errorf("%s: the driver's hand-back, want every delivery copied: %v", name, l[0])
		}
		// The calls in flight are still held: nothing that was on the
		// engine can have been answered before the hand-back.
		now := engine.inFlight()
		for _, id := range inflight {
			if !slices.Contains(now, id) {
				t.Errorf("%s: %s left the engine before its gate opened (at the engine after the hand-back: %v); the drain lets calls in flight finish", name, id, now)
			}
		}
		engine.open()

		exit := nc.waitPodGone(t, ctx, rabbitNS, old.Name, 3*time.Minute)
		t.Logf("k8s: %s: old pod %s gone %s after the stop (grace %ds; exit code seen: %d)", name, old.Name, time.Since(stopped).Round(100*time.Millisecond), grace, exit)
		if exit != -1 && exit != 0 {
			t.Errorf("%s: the worker exited %d on SIGTERM, want 0 (137 is the kubelet's SIGKILL after the grace period)", name, exit)
		}
		next := nc.waitReadyPod(t, ctx, rabbitNS, sel, 3*time.Minute, old.Name)
		t.Logf("k8s: %s: next pod %s Ready %s after the stop", name, next.Name, time.Since(stopped).Round(100*time.Millisecond))
		if !itest.Eventually(3*time.Minute, func() bool { return res.answered(ids) == n }) {
			t.Fatalf("%s: %d of %d answered in 3m after the next pod was Ready; %d ready in the queue", name, res.answered(ids), n, nc.queueReady(t))
		}
		t.Logf("k8s: %s: all %d answered %s after the stop", name, n, time.Since(stopped).Round(100*time.Millisecond))

		byOld, byNext := 0, 0
		for _, id := range ids {
			for _, r := range res.get(id) {
				if r.Status != wire.StatusOK || r.Response == nil || *r.Response != "echo:"+id {
					t.Errorf("%s: result for %s: %+v", name, id, r)
				}
				switch r.Worker {
				case old.Name:
					byOld++
				case next.Name:
					byNext++
				default:
					t.Errorf("%s: %s answered by %q, neither the old pod %s nor the next %s", name, id, r.Worker, old.Name, next.Name)
				}
			}
		}
		for _, id := range inflight {
			rs := res.get(id)
			if len(rs) != 1 || rs[0].Worker != old.Name || engine.callsFor(id) != 1 {
				t.Errorf("%s: %s was at the engine at the stop: %d engine calls, results %+v; want one call, answered by the old pod %s", name, id, engine.callsFor(id), rs, old.Name)
			}
		}
		t.Logf("k8s: %s: %d answered by the old pod %s (the %d in flight), %d by the next %s", name, byOld, old.Name, len(inflight), byNext, next.Name)
		if byNext == 0 {
			t.Errorf("%s: the next pod answered nothing; the prefetched requests should have gone back to it", name)
		}
		return next
	}

	second := round("deleted", first, 60, func() {
		if err := nc.c.Client.CoreV1().Pods(rabbitNS).Delete(ctx, first.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})
	_ = round("rolled", second, 60, func() {
		patch := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339))
		if _, err := nc.c.Client.AppsV1().Deployments(rabbitNS).Patch(ctx, "sous-worker", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{FieldManager: "kubectl-rollout"}); err != nil {
			t.Fatal(err)
		}
	})

	// None lost, none twice (counted after both rounds, so that a late
	// duplicate of the first round is seen too).
	var dups []string
	for _, id := range all {
		if rs := res.get(id); len(rs) > 1 {
			dups = append(dups, fmt.Sprintf("%s ×%d (attempts/workers %v)", id, len(rs), attemptsOf(rs)))
		}
	}
	t.Logf("k8s: %d requests, %d answered, %d duplicates %v", len(all), res.answered(all), len(dups), dups)
	if len(dups) > 0 {
		t.Errorf("duplicates: %v; a clean drain answers each request once", dups)
	}
	if left := nc.queueReady(t); left != 0 {
		t.Errorf("%d requests left in %s", left, nc.queue)
	}
	// Last: a passive declare of a queue that is not there closes nc.ch.
	if q, err := nc.ch.QueueDeclarePassive(nc.queue+".dlq", true, false, false, false, nil); err == nil && q.Messages != 0 {
		t.Errorf("%d requests dead-lettered", q.Messages)
	}
}

func attemptsOf(rs []wire.Result) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = fmt.Sprintf("%d/%s", r.Attempt, r.Worker)
	}
	return out
}
