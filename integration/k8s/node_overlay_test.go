package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/wire"
)

// Helpers the node tests of issue 23's tests 2, 4, 5 and 6 share: an
// overlay applied as a user applies it, the pods of a component, their
// container logs as the kubelet keeps them, a gated engine stand-in and a
// results collector.

// apiPort is the apiserver's loopback port, for the in-cluster client's
// KUBERNETES_SERVICE_PORT (nodeOverlay).
func (nc *nodeCluster) apiPort(t *testing.T) int {
	t.Helper()
	u, err := url.Parse(nc.c.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// nodeLayer is nodeOverlay (the rabbitmq overlay with what this node forces)
// with one more kustomization on top, at k8stest/<name>, whose patches
// are what the test itself changes; it returns the files to render
// k8stest/<name> from.
func nodeLayer(base map[string]string, name, patches string) map[string]string {
	files := maps.Clone(base)
	files["k8stest/"+name+"/kustomization.yaml"] = `apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../node
patches:
` + patches
	return files
}

// applyNodeOverlay renders dir from files and applies it server-side, as a user
// does with `kubectl apply --server-side -k`: the namespace first, then
// the Secrets the overlay leaves to the operator (RabbitMQ's, pointed at
// the test broker; with rabbit false none), then every object keep
// returns true for. It returns the rendered objects and when it applied
// the rest.
func (nc *nodeCluster) applyNodeOverlay(t *testing.T, ctx context.Context, dir string, files map[string]string, ns string, rabbit bool, keep func(*unstructured.Unstructured) bool) ([]*unstructured.Unstructured, time.Time) {
	t.Helper()
	rendered, err := Kustomize(dir, files)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(rendered)
	if err != nil {
		t.Fatal(err)
	}
	var nss, rest []*unstructured.Unstructured
	for _, o := range objs {
		switch {
		case o.GetKind() == "Namespace":
			nss = append(nss, o)
		case keep(o):
			rest = append(rest, o)
		default:
			t.Logf("k8s: left out %s %s", o.GetKind(), o.GetName())
		}
	}
	if err := nc.c.ApplyObjects(ctx, nss); err != nil {
		t.Fatal(err)
	}
	if rabbit {
		createRabbitSecrets(t, ctx, nc.c, ns, nil)
	}
	applied := time.Now()
	if err := nc.c.ApplyObjects(ctx, rest); err != nil {
		t.Fatalf("%v\n%s", err, nc.c.Logs(20))
	}
	t.Logf("k8s: applied %d of %d objects of %s (server-side)", len(rest)+len(nss), len(objs), dir)
	return objs, applied
}

// notKEDA keeps every object but KEDA's (no KEDA operator runs in these
// tests: the replicas are the test's) and, unless gateway, the gateway's.
func notKEDA(gateway bool) func(*unstructured.Unstructured) bool {
	return func(o *unstructured.Unstructured) bool {
		if strings.HasPrefix(o.GetAPIVersion(), "keda.sh/") {
			return false
		}
		return gateway || !strings.Contains(o.GetName(), "gateway")
	}
}

func isPodReady(p *corev1.Pod) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// waitReadyPod waits until a pod of ns matching selector, not being deleted
// and not named in not, is Ready, and returns it.
func (nc *nodeCluster) waitReadyPod(t *testing.T, ctx context.Context, ns, selector string, within time.Duration, not ...string) corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	if !itest.Eventually(within, func() bool {
		pods, err := nc.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false
		}
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil && !slices.Contains(not, p.Name) && isPodReady(&p) {
				pod = p
				return true
			}
		}
		return false
	}) {
		pods, _ := nc.c.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		for _, p := range pods.Items {
			t.Logf("pod %s on %q: %+v", p.Name, p.Spec.NodeName, p.Status)
		}
		t.Fatalf("no Ready pod %s in %s within %s (not %v)\n%s", selector, ns, within, not, nc.n.Logs(30))
	}
	return pod
}

// waitPodGone waits until the pod is gone from the apiserver and returns
// its container's exit code when a poll saw it terminated (-1 when none
// did).
func (nc *nodeCluster) waitPodGone(t *testing.T, ctx context.Context, ns, name string, within time.Duration) int32 {
	t.Helper()
	exit := int32(-1)
	itest.WaitUntil(t, within, "pod "+name+" to be gone", func() bool {
		p, err := nc.c.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return strings.Contains(err.Error(), "not found")
		}
		for _, cs := range p.Status.ContainerStatuses {
			if cs.State.Terminated != nil {
				exit = cs.State.Terminated.ExitCode
			}
		}
		return false
	})
	return exit
}

// containerLog is what the pod's container has logged so far, from the
// kubelet's podLogsDir (CRI log format, one file per restart), or "" when
// the kubelet has no log for it (yet, or any more).
func (nc *nodeCluster) containerLog(ns, pod, container string) string {
	files, _ := filepath.Glob(filepath.Join(nc.n.Dir, "pod-logs", ns+"_"+pod+"_*", container, "*.log"))
	sort.Strings(files)
	var b strings.Builder
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err == nil {
			b.Write(data)
		}
	}
	return b.String()
}

// logLines returns the fields of every JSON line the pod's container
// logged whose msg is msg, from log (containerLog's).
func logLines(log, msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(log, "\n") {
		// CRI format: time stream tag message.
		parts := strings.SplitN(line, " ", 4)
		if len(parts) < 4 || !strings.Contains(parts[3], msg) {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(parts[3]), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// waitLog waits until cond holds for the pod's container log and returns
// the log; the kubelet removes a log with its pod, so the last one read
// is kept.
func (nc *nodeCluster) waitLog(t *testing.T, ns, pod, container, what string, within time.Duration, cond func(log string) bool) string {
	t.Helper()
	var seen string
	if !itest.Eventually(within, func() bool {
		if l := nc.containerLog(ns, pod, container); l != "" {
			seen = l
		}
		return cond(seen)
	}) {
		t.Fatalf("pod %s: never %s within %s; its log:\n%s", pod, what, within, seen)
	}
	return seen
}

// What the gate stand-in's chat answers, and the token counts it reports.
const (
	standInChat         = "Blue light scatters more than red in the air."
	standInPromptTokens = 5
	standInOutputTokens = 9
)

// gateStandIn is an Ollama stand-in (the part of Ollama's API the worker
// uses) whose generate echoes the prompt once its gate is open: while the
// gate is held, calls wait at the engine, so a test knows exactly which
// requests are in flight, with no timing.
type gateStandIn struct {
	url string

	mu       sync.Mutex
	gate     chan struct{} // nil: open
	inflight map[string]int
	calls    map[string]int // generate calls received, by prompt
}

func startGateStandIn(t *testing.T) *gateStandIn {
	t.Helper()
	e := &gateStandIn{inflight: map[string]int{}, calls: map[string]int{}}
	mux := standInMux()
	mux.HandleFunc("POST /api/generate", func(w http.ResponseWriter, r *http.Request) {
		req, ok := decodeGenerate(w, r)
		if !ok {
			return
		}
		e.mu.Lock()
		e.calls[req.Prompt]++
		e.inflight[req.Prompt]++
		gate := e.gate
		e.mu.Unlock()
		defer func() {
			e.mu.Lock()
			if e.inflight[req.Prompt]--; e.inflight[req.Prompt] == 0 {
				delete(e.inflight, req.Prompt)
			}
			e.mu.Unlock()
		}()
		if gate != nil {
			select {
			case <-gate:
			case <-r.Context().Done():
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
	// A chat answers standInChat, streamed one word a line when asked.
	mux.HandleFunc("POST /api/chat", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Model  string `json:"model"`
			Stream *bool  `json:"stream"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, `{"error":"bad request"}`, http.StatusBadRequest)
			return
		}
		e.mu.Lock()
		e.calls["chat"]++
		e.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		line := func(content string, done bool) {
			l := map[string]any{"model": req.Model, "created_at": time.Now().UTC().Format(time.RFC3339Nano),
				"message": map[string]any{"role": "assistant", "content": content}, "done": done}
			if done {
				l["done_reason"] = "stop"
				l["prompt_eval_count"], l["eval_count"] = standInPromptTokens, standInOutputTokens
			}
			_ = enc.Encode(l)
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
		}
		if req.Stream == nil || *req.Stream {
			words := strings.SplitAfter(standInChat, " ")
			for _, word := range words {
				line(word, false)
			}
			line("", true)
			return
		}
		line(standInChat, true)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		e.open()
		_ = srv.Close()
	})
	e.url = fmt.Sprintf("http://%s", ln.Addr())
	return e
}

// hold makes generate calls from now on wait until open.
func (e *gateStandIn) hold() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gate == nil {
		e.gate = make(chan struct{})
	}
}

// open lets every waiting and later call answer.
func (e *gateStandIn) open() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gate != nil {
		close(e.gate)
		e.gate = nil
	}
}

// inFlight returns the prompts whose calls are at the engine now.
func (e *gateStandIn) inFlight() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]string, 0, len(e.inflight))
	for p := range e.inflight {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// callsFor returns how many generate calls prompt got.
func (e *gateStandIn) callsFor(prompt string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.calls[prompt]
}

// resultLog consumes a results queue on a connection of its own and keeps
// every result, by request id, until t ends.
type resultLog struct {
	mu   sync.Mutex
	byID map[string][]wire.Result
	bad  []string
}

func collectResults(t *testing.T, queue string) *resultLog {
	t.Helper()
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// The worker declares the results queue (as it likes it); wait for it
	// rather than declare it here. A failed passive declare closes the
	// channel, so each try takes a fresh one.
	var ch *amqp.Channel
	itest.WaitUntil(t, 2*time.Minute, "the worker to declare "+queue, func() bool {
		c, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.QueueDeclarePassive(queue, true, false, false, false, nil); err != nil {
			return false
		}
		ch = c
		return true
	})
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		t.Fatalf("consume %s: %v", queue, err)
	}
	r := &resultLog{byID: map[string][]wire.Result{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for d := range deliveries {
			var res wire.Result
			r.mu.Lock()
			if err := json.Unmarshal(d.Body, &res); err != nil {
				r.bad = append(r.bad, string(d.Body))
			} else {
				r.byID[res.ID] = append(r.byID[res.ID], res)
			}
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		<-done
	})
	return r
}

// answered returns how many of ids have at least one result.
func (r *resultLog) answered(ids []string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, id := range ids {
		if len(r.byID[id]) > 0 {
			n++
		}
	}
	return n
}

// get returns id's results.
func (r *resultLog) get(id string) []wire.Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wire.Result(nil), r.byID[id]...)
}

// queueReady is how many messages queue holds ready for delivery.
func (nc *nodeCluster) queueReady(t *testing.T) int {
	t.Helper()
	q, err := nc.ch.QueueDeclarePassive(nc.queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"})
	if err != nil {
		t.Fatal(err)
	}
	return q.Messages
}
