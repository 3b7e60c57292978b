package k8s

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"google.golang.org/grpc"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/scaler"
	"github.com/sous-run/sous/internal/scaler/externalscaler"
	"github.com/sous-run/sous/internal/secret"
)

// The two fleets of TestScalerScalesOnSecondsOfWork: the same number of
// requests, priced by what their workers report.
const (
	// targetDrainSeconds is the rabbitmq-scaler overlay's, as it ships.
	targetDrainSeconds = 300
	// requests is what each queue gets.
	requests = 25
	// Limit and mean service time the workers report: one replica runs
	// 4 requests at once; a long answer takes 120 s on the engine, a short
	// one 2 s. Cost = mean service / limit: 30 s and 0.5 s of one
	// replica's time per request.
	reportedLimit = 4
	longServiceS  = 120.0
	shortServiceS = 2.0
)

// TestScalerScalesOnSecondsOfWork: sous's scaler (cmd/scaler's parts,
// started in this process as its run does) behind the rabbitmq-scaler
// overlay, applied twice, to the namespaces sous-long and sous-short, on
// a real apiserver with the real KEDA operator, KEDA's metrics adapter
// behind the aggregation layer and the real HPA controller. Each
// ScaledObject's external trigger names a queue of its own on the real
// broker, and "workers" report on the fanout exchange what a request of
// each costs: 120 s answers in one queue, 2 s answers in the other (these
// reports stand in for the workers'; the real worker's reports are tested
// by integration/lanes_test.go, TestLanesEndToEnd). Then:
//   - the first message in an empty queue wakes its fleet (KEDA: 0 -> 1);
//   - the same 25 requests in each queue: the long answers' fleet grows to
//     ceil(25 × 30 s / 300 s) = 3 replicas through the HPA, the short
//     answers' stays at ceil(25 × 0.5 s / 300 s) = 1, through two more HPA
//     syncs; KEDA's message-count trigger (value 96) would give both 1;
//   - both queues emptied: both fleets back to 0 after the cooldown.
//
// Only generous bounds on time; the verdicts are the replica counts.
func TestScalerScalesOnSecondsOfWork(t *testing.T) {
	b := NeedKEDAAdapter(t)
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatalf("RabbitMQ on 127.0.0.1:5672: %v (make rabbitmq starts it)", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	// Fresh names on the shared broker: the queues, the reports exchange
	// and the scaler's state queue, so that no other test's workers or
	// scaler take part.
	run := time.Now().UnixNano()
	longQ, shortQ := fmt.Sprintf("sous.k8s-test.long.%d", run), fmt.Sprintf("sous.k8s-test.short.%d", run)
	exchange := fmt.Sprintf("sous.reports.k8s-test.%d", run)
	state := fmt.Sprintf("sous.scaler.state.k8s-test.%d", run)
	for _, q := range []string{longQ, shortQ} {
		if _, err := ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeFanout, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c, err := conn.Channel(); err == nil {
			for _, q := range []string{longQ, shortQ, state} {
				_, _ = c.QueueDelete(q, false, false, false)
			}
			_ = c.ExchangeDelete(exchange, false, false)
			c.Close()
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	start := time.Now()
	tl := &timeline{t: t, start: start}
	t.Cleanup(tl.log) // also when a step fails
	sc := startScaler(t, exchange, state)
	tl.mark("scaler serving KEDA's gRPC on " + sc.addr)
	report(t, ctx, conn, exchange, map[string]float64{longQ: longServiceS, shortQ: shortServiceS})
	waitCosts(t, ctx, sc.view, map[string]float64{longQ: longServiceS / reportedLimit, shortQ: shortServiceS / reportedLimit})
	tl.mark(fmt.Sprintf("the scaler read the reports: a long answer costs %.1f s of one replica, a short one %.1f s", longServiceS/reportedLimit, shortServiceS/reportedLimit))

	cp := Start(t, b, Options{Controllers: []string{DeploymentController, ReplicaSetController, HPAController}})
	cp.StartKEDA(t)
	cp.StartKEDAAdapter(t)
	tl.mark("control plane, KEDA operator and metrics adapter up")

	long := watcher{t: t, cp: cp, ns: "sous-long", name: "sous-worker"}
	short := watcher{t: t, cp: cp, ns: "sous-short", name: "sous-worker"}
	appliedLong := applyScalerOverlay(t, ctx, cp, long.ns, longQ, sc.addr)
	appliedShort := applyScalerOverlay(t, ctx, cp, short.ns, shortQ, sc.addr)
	// The scaler's own Deployment (its pods stay Pending: the scaler that
	// answers runs in this process) passes the namespace's Pod Security
	// admission, restricted, as the workers' does.
	waitScalerPods(t, ctx, cp, long.ns, 2)
	long.waitScaledObjectReady(ctx)
	short.waitScaledObjectReady(ctx)
	long.transition(ctx, "long: applied, empty queue", appliedLong, 0, 60*time.Second)
	short.transition(ctx, "short: applied, empty queue", appliedShort, 0, 60*time.Second)
	tl.mark("both overlays applied; both fleets at 0 replicas")

	publish := func(q string, n int) {
		t.Helper()
		for i := range n {
			if err := ch.PublishWithContext(ctx, "", q, false, false, amqp.Publishing{DeliveryMode: amqp.Persistent, Body: fmt.Appendf(nil, `{"prompt":"p%d"}`, i)}); err != nil {
				t.Fatal(err)
			}
		}
	}

	// The first message wakes its fleet; the other stays at 0.
	first := time.Now()
	publish(shortQ, 1)
	short.transition(ctx, "short: first message (KEDA: 0 -> 1)", first, 1, 60*time.Second)
	tl.mark("1 message in the short queue: its fleet 0 -> 1")
	long.hold(ctx, "long: its queue still empty", 0, 5*time.Second)

	// The same number of requests in each queue.
	burst := time.Now()
	publish(shortQ, requests-1)
	publish(longQ, requests)
	tl.mark(fmt.Sprintf("%d requests in each queue", requests))
	wantLong := int32(math.Ceil(requests * longServiceS / reportedLimit / targetDrainSeconds))
	wantShort := int32(math.Ceil(requests * shortServiceS / reportedLimit / targetDrainSeconds))
	if wantLong != 3 || wantShort != 1 {
		t.Fatalf("the figures above give %d and %d replicas; the test is written for 3 and 1", wantLong, wantShort)
	}
	long.steps(ctx, fmt.Sprintf("long: %d × %.0f s = %.0f s of work (HPA: ceil(%.0f/%d) = %d)", requests, longServiceS/reportedLimit, requests*longServiceS/reportedLimit, requests*longServiceS/reportedLimit, targetDrainSeconds, wantLong), burst, wantLong, 120*time.Second)
	tl.mark(fmt.Sprintf("long answers: %d replicas", wantLong))
	long.hpaStatus(ctx)
	long.externalMetric(ctx)
	short.hpaStatus(ctx)
	short.externalMetric(ctx)
	// Two HPA syncs (15 s each) with the burst in both queues: the short
	// answers' fleet stays at 1, the long answers' at 3.
	holdAll(ctx, t, "the burst, two HPA syncs", 35*time.Second, held{long, wantLong}, held{short, wantShort})
	tl.mark(fmt.Sprintf("held: long %d replicas, short %d, through two HPA syncs", wantLong, wantShort))
	if l, s := long.replicas(ctx), short.replicas(ctx); l <= s {
		t.Fatalf("the same %d requests: long answers %d replicas, short answers %d; want more for the long", requests, l, s)
	}
	short.hpaStatus(ctx)

	// Both queues emptied: inactive at once (no message, no report of
	// work held), both fleets to 0 after the cooldown.
	for _, q := range []string{longQ, shortQ} {
		if _, err := ch.QueuePurge(q, false); err != nil {
			t.Fatal(err)
		}
	}
	emptied := time.Now()
	tl.mark("both queues emptied")
	long.transition(ctx, fmt.Sprintf("long: queue empty (cooldown %ds)", cooldownPeriod), emptied, 0, 90*time.Second)
	short.transition(ctx, fmt.Sprintf("short: queue empty (cooldown %ds)", cooldownPeriod), emptied, 0, 90*time.Second)
	long.waitPods(ctx, 0, 30*time.Second)
	short.waitPods(ctx, 0, 30*time.Second)
	tl.mark("both fleets back to 0 replicas")
}

// scalerOverlay is the project's rabbitmq-scaler overlay, rendered as it
// ships, with what a test on one machine must change (as testOverlay does
// for the rabbitmq overlay): the namespace (two fleets side by side), the
// queue (in the trigger and the workers' ConfigMap), the scaler's address
// (this process, not the Service: there is no kubelet to run its pods, nor
// a cluster network), and pollingInterval 15 s → 1 s, cooldownPeriod
// 600 s → 10 s. targetDrainSeconds stays 300.
func scalerOverlay(ns, queue, addr string) map[string]string {
	return map[string]string{"k8stest/" + ns + "/kustomization.yaml": fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: %s
resources:
  - ../../deploy/k8s/overlays/rabbitmq-scaler
patches:
  - target: {group: keda.sh, kind: ScaledObject, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/pollingInterval, value: %d}
      - {op: replace, path: /spec/cooldownPeriod, value: %d}
      - {op: test, path: /spec/triggers/0/type, value: external}
      - {op: test, path: /spec/triggers/0/metadata/targetDrainSeconds, value: "%d"}
      - {op: replace, path: /spec/triggers/0/metadata/scalerAddress, value: %q}
      - {op: replace, path: /spec/triggers/0/metadata/queue, value: %q}
  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_QUEUE, value: %q}
`, ns, pollingInterval, cooldownPeriod, targetDrainSeconds, addr, queue, queue)}
}

// applyScalerOverlay applies scalerOverlay as applyOverlay does (the
// Secret KEDA's management API trigger would read is created too, and
// read by nothing: this overlay's trigger needs none).
func applyScalerOverlay(t *testing.T, ctx context.Context, cp *ControlPlane, ns, queue, addr string) time.Time {
	t.Helper()
	applied, objs := applyOverlay(t, ctx, cp, "k8stest/"+ns, scalerOverlay(ns, queue, addr), ns)
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.GetKind()]++
		if o.GetKind() == "Namespace" && o.GetName() != ns {
			t.Fatalf("the overlay's Namespace is %s, want %s", o.GetName(), ns)
		}
	}
	if kinds["Namespace"] != 1 || kinds["TriggerAuthentication"] != 0 || kinds["ScaledObject"] != 1 {
		t.Fatalf("the overlay renders %v: want one Namespace, one ScaledObject, no TriggerAuthentication", kinds)
	}
	return applied
}

// waitScalerPods waits until the ReplicaSet controller has created want
// pods of the scaler's Deployment in ns: the apiserver admitted them.
func waitScalerPods(t *testing.T, ctx context.Context, cp *ControlPlane, ns string, want int) {
	t.Helper()
	start := time.Now()
	for {
		pods, err := cp.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sous,app.kubernetes.io/component=scaler"})
		if err != nil {
			t.Fatal(err)
		}
		if len(pods.Items) == want {
			t.Logf("k8s: %d pods of Deployment sous-scaler admitted in %s (Pod Security restricted) after %s", want, ns, time.Since(start).Round(100*time.Millisecond))
			return
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("%d pods of sous-scaler in %s, want %d within 30s (refused at admission?)\n%s", len(pods.Items), ns, want, cp.Logs(30))
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// runningScaler is cmd/scaler's parts in this process.
type runningScaler struct {
	addr string // 127.0.0.1:port, KEDA's scalerAddress
	view *fleet.View
}

// startScaler runs what cmd/scaler's run runs (scaler.NewRabbit reading
// the reports into a fleet.View, scaler.New behind a gRPC server) on a
// loopback port, with the test's exchange and state queue, until t ends.
// Its log is shown when t fails.
func startScaler(t *testing.T, exchange, state string) runningScaler {
	t.Helper()
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	rabbit := scaler.NewRabbit(scaler.RabbitConfig{URL: secret.Value(amqpURL), Exchange: exchange, StateQueue: state}, log)
	view := fleet.NewView(nil)
	ctx, cancel := context.WithCancel(context.Background())
	reports := make(chan struct{})
	go func() { defer close(reports); rabbit.Run(ctx, view) }()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	externalscaler.RegisterExternalScalerServer(srv, scaler.New(scaler.Config{PriorCost: 1}, view, rabbit, log))
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop() // KEDA's streams do not end on their own
		<-served
		cancel()
		<-reports
		rabbit.Close()
		if t.Failed() {
			t.Logf("scaler log (last lines):\n%s", itest.Tail(logs.String(), 40))
		}
	})
	return runningScaler{addr: lis.Addr().String(), view: view}
}

// report publishes a report per queue every second, as a worker of that
// queue does every SOUS_REPORT_INTERVAL, until t ends: limit
// reportedLimit, the queue's mean service time, nothing held.
func report(t *testing.T, ctx context.Context, conn *amqp.Connection, exchange string, serviceS map[string]float64) {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			for q, s := range serviceS {
				body, _ := json.Marshal(fleet.Report{Worker: "k8s-test-" + q, Lane: "default", Queue: q, At: time.Now(), Limit: reportedLimit, ServedPerS: reportedLimit / s, MeanServiceS: s})
				_ = ch.PublishWithContext(rctx, exchange, "", false, false, amqp.Publishing{ContentType: "application/json", Body: body})
			}
			select {
			case <-rctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() { stop(); <-done; ch.Close() })
}

// waitCosts waits until the scaler's view prices each queue as its reports say.
func waitCosts(t *testing.T, ctx context.Context, view *fleet.View, want map[string]float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok := true
		for q, c := range want {
			l := view.Lane(q, time.Now())
			ok = ok && l.Known && l.Cost == c
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the scaler never read the reports (want costs %v)", want)
		}
		sleep(ctx, 100*time.Millisecond)
	}
}

// held is a replica count a watcher's Deployment must keep.
type held struct {
	w watcher
	n int32
}

// holdAll checks that each Deployment's replicas stay as given for d.
func holdAll(ctx context.Context, t *testing.T, what string, d time.Duration, hs ...held) {
	t.Helper()
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		for _, h := range hs {
			if got := h.w.replicas(ctx); got != h.n {
				t.Fatalf("%s: %s's replicas went to %d, want them to stay %d\n%s\n%s", what, h.w.ns, got, h.n, h.w.hpaConditions(ctx), h.w.cp.Logs(30))
			}
		}
		sleep(ctx, 200*time.Millisecond)
	}
	var got []string
	for _, h := range hs {
		got = append(got, fmt.Sprintf("%s %d", h.w.ns, h.n))
	}
	t.Logf("k8s: HOLD %s: replicas stayed %s for %s", what, strings.Join(got, ", "), d)
}

// timeline collects what happened when, and logs it in one piece.
type timeline struct {
	t     *testing.T
	start time.Time
	lines []string
}

func (tl *timeline) mark(what string) {
	tl.lines = append(tl.lines, fmt.Sprintf("%7s  %s", time.Since(tl.start).Round(100*time.Millisecond), what))
}

func (tl *timeline) log() {
	tl.t.Logf("k8s: TIMELINE\n%s", strings.Join(tl.lines, "\n"))
}

// syncBuffer is a bytes.Buffer safe for the scaler's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
