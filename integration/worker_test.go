package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
)

// TestPromptAndChatEndToEnd: producer -> RabbitMQ -> worker -> real Ollama
// -> result on reply_to and on the results queue.
func TestPromptAndChatEndToEnd(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	w := startWorker(t, q)
	c := newClient(t)
	replies := q + ".replies"
	c.declare(replies)
	c.publish(q, "p1", replies, `{"prompt":"Why is the sky blue?","options":{"seed":1,"num_predict":8}}`)
	c.publish(q, "c1", replies, `{"messages":[{"role":"user","content":"hello"}],"options":{"num_predict":8}}`)
	c.publish(q, "alias", "", `{"prompt":"hi","model":"tiny","options":{"num_predict":4}}`)
	got := c.collect(replies, 2, 60*time.Second)
	p := decodeResult(t, got["p1"])
	if p.Status != wire.StatusOK || p.Response == nil || *p.Response == "" || p.Model != "tiny" || p.Usage == nil || p.Usage.OutputTokens == 0 || p.Usage.OutputTokens > 8 {
		t.Fatalf("prompt result: %s", got["p1"].Body)
	}
	if p.Batch == nil || p.Batch.Size < 1 || p.Worker != "it-"+q || p.Attempt != 1 {
		t.Fatalf("prompt result lacks batch/worker: %s", got["p1"].Body)
	}
	ch := decodeResult(t, got["c1"])
	if ch.Status != wire.StatusOK || ch.Message == nil || ch.Message.Role != "assistant" {
		t.Fatalf("chat result: %s", got["c1"].Body)
	}
	other := c.collect(results, 1, 60*time.Second)
	if r := decodeResult(t, other["alias"]); r.Status != wire.StatusOK {
		t.Fatalf("result without reply_to: %s", other["alias"].Body)
	}
	if c.depth(q) != 0 {
		t.Fatal("requests left in the queue after their results")
	}
	_ = w
}

// TestSousctlDirectReplyTo runs the producer CLI against the worker: direct
// reply-to, human output and JSON lines.
func TestSousctlDirectReplyTo(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	startWorker(t, q)
	var stderr strings.Builder
	cmd := exec.Command(filepath.Join(binDir, "sousctl"), "publish", "-url", brokerURL, "-queue", q, "-json", "hello there", "second prompt")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sousctl: %v\n%s%s", err, out, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `"status":"ok"`) || !strings.Contains(lines[1], `"status":"ok"`) {
		t.Fatalf("sousctl output:\n%s", out)
	}
	if !strings.HasPrefix(stderr.String(), "trace_id=") { // JSON mode keeps the trace id off stdout
		t.Fatalf("sousctl stderr: %q, want the trace id", stderr.String())
	}
	out, err = exec.Command(filepath.Join(binDir, "sousctl"), "publish", "-url", brokerURL, "-queue", q, "-stream", "-chat", "stream me").CombinedOutput()
	if err != nil || !strings.Contains(string(out), " ok model=tiny") {
		t.Fatalf("sousctl stream: %v\n%s", err, out)
	}
}

// TestBadInputDeadLettered: every kind of bad input is dead-lettered at once
// with a reason header and an error result; the good message in the same
// burst is answered; the worker keeps going.
func TestBadInputDeadLettered(t *testing.T) {
	t.Parallel()
	q, _ := names(t)
	startWorker(t, q, "SOUS_MAX_BODY_BYTES=2048", "SOUS_MODELS_ALLOWED=tiny,ghost")
	c := newClient(t)
	replies := q + ".replies"
	c.declare(replies)
	bad := map[string]struct{ body, reason string }{
		"notjson":  {`this is not json`, wire.ReasonInvalidJSON},
		"utf8":     {"{\"prompt\":\"\xc3\x28\"}", wire.ReasonInvalidUTF8},
		"types":    {`{"prompt":["a"]}`, wire.ReasonInvalidRequest},
		"option":   {`{"prompt":"x","options":{"num_predict":"many"}}`, wire.ReasonInvalidOption},
		"noprompt": {`{"model":"tiny"}`, wire.ReasonMissingPrompt},
		"unknown":  {`{"prompt":"x","model":"nope"}`, wire.ReasonModelNotAllowed},
		"big":      {`{"prompt":"` + strings.Repeat("x", 3000) + `"}`, wire.ReasonBodyTooLarge},
		"expired":  {`{"prompt":"x","deadline":"2020-01-01T00:00:00Z"}`, wire.ReasonExpired},
		// Allowed by the worker but absent from the engine: the engine's 404.
		"ghost": {`{"prompt":"x","model":"ghost"}`, "model_not_found"},
	}
	for id, b := range bad {
		c.publish(q, id, replies, b.body)
	}
	c.publish(q, "good", replies, `{"prompt":"fine","options":{"num_predict":4}}`)
	dead := c.collect(q+".dlq", len(bad), 60*time.Second)
	for id, b := range bad {
		d, ok := dead[id]
		if !ok {
			t.Errorf("%s not dead-lettered", id)
			continue
		}
		if d.Headers[queue.HeaderDeadLetterReason] != b.reason || d.Headers[queue.HeaderDeadLetterDescription] == "" {
			t.Errorf("%s: dead-letter headers %v, want reason %s", id, d.Headers, b.reason)
		}
	}
	res := c.collect(replies, len(bad)+1, 60*time.Second)
	for id, b := range bad {
		r := decodeResult(t, res[id])
		if r.Status != wire.StatusError || r.Error == nil || r.Error.Code != b.reason {
			t.Errorf("%s: error result %s", id, res[id].Body)
		}
	}
	if r := decodeResult(t, res["good"]); r.Status != wire.StatusOK {
		t.Errorf("good message in the same burst: %s", res["good"].Body)
	}
}

// TestEngineUnavailableKeepsTheRequestQueued: with no engine answering,
// the worker is not ready and takes nothing: the request stays in the
// queue, spending no attempt (before, it was requeued twice and
// dead-lettered max_attempts). When an engine answers at that address the
// request is answered on its first attempt.
func TestEngineUnavailableKeepsTheRequestQueued(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	addr := freeAddr(t) // nothing listens there yet
	w := startWorkerNoReady(t, q, "SOUS_ENGINE_URL=http://"+addr, "SOUS_MAX_ATTEMPTS=3")
	c := newClient(t)
	c.publish(q, "m", "", `{"prompt":"x"}`)
	time.Sleep(3 * time.Second) // several probes of the engine
	if n := c.depth(q); n != 1 {
		t.Fatalf("queue depth %d with the engine down, want the request still queued", n)
	}
	if n := c.depth(q + ".dlq"); n != 0 {
		t.Fatalf("%d dead letters with the engine down", n)
	}
	resp, err := http.Get("http://" + w.Addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "engine") {
		t.Fatalf("/readyz with the engine down = %d %q, want 503 naming the engine", resp.StatusCode, body)
	}
	resp, err = http.Get("http://" + w.Addr + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/healthz = %v %v", resp, err)
	}
	resp.Body.Close()

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/tags":
			_, _ = rw.Write([]byte(`{"models":[{"name":"tiny:latest","model":"tiny:latest"}]}`))
		case "/api/generate":
			_, _ = rw.Write([]byte(`{"model":"tiny","response":"back","done":true,"done_reason":"stop"}` + "\n"))
		default:
			_, _ = rw.Write([]byte(`{"version":"0.6.5"}`))
		}
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	r := decodeResult(t, c.collect(results, 1, 60*time.Second)["m"])
	if r.Status != wire.StatusOK || r.Attempt != 1 {
		t.Fatalf("result %+v, want ok on attempt 1", r)
	}
}

// startWorkerNoReady starts a worker whose engine is expected to be down:
// /readyz never passes, so it waits for /healthz (served from the start)
// and for the worker to say it works (queues declared, consuming).
func startWorkerNoReady(t *testing.T, q string, env ...string) *workerProc {
	t.Helper()
	w := startWorkerWait(t, q, "/healthz", env...)
	waitUntil(t, 60*time.Second, "the worker to start working", func() bool { return strings.Contains(w.Logs(), "ready to work") })
	return w
}

// TestSIGTERMDrains: SIGTERM under load exits 0 within the drain timeout;
// every request has a result or is back in the queue, none lost.
func TestSIGTERMDrains(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	w := startWorker(t, q, "SOUS_BATCH_MAX=2", "SOUS_ENGINE_PARALLEL=2", "SOUS_MAX_NUM_PREDICT=64")
	c := newClient(t)
	const n = 20
	for i := range n {
		c.publish(q, fmt.Sprint("s", i), "", `{"prompt":"count to ten","options":{"num_predict":64}}`)
	}
	waitUntil(t, 30*time.Second, "a first result", func() bool { return c.depth(results) > 0 })
	start := time.Now()
	if err := w.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := w.ExitCode(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM\n%s", code, w.Logs())
	}
	t.Logf("drained in %s", time.Since(start).Round(time.Millisecond))
	done := c.depth(results)
	left := c.depth(q)
	if done+left != n {
		t.Fatalf("%d results + %d requeued = %d, want %d: something was lost or duplicated", done, left, done+left, n)
	}
	if left == 0 {
		t.Log("note: the worker finished everything before the signal landed")
	}
}

// TestBrokerConnectionLost: the worker's connection is cut mid-stream by a
// TCP proxy; it reconnects with backoff, resumes, and every request gets a
// result (at least once).
func TestBrokerConnectionLost(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	p := newProxy(t, "127.0.0.1:5672")
	startWorker(t, q, "SOUS_AMQP_URL=amqp://guest:guest@"+p.addr+"/")
	c := newClient(t)
	const n = 30
	for i := range n {
		c.publish(q, fmt.Sprint("r", i), "", `{"prompt":"x","options":{"num_predict":4}}`)
		if i == 10 {
			waitUntil(t, 30*time.Second, "some results", func() bool { return c.depth(results) > 0 })
			p.cut()
		}
	}
	got := c.collect(results, n, 90*time.Second)
	for i := range n {
		if _, ok := got[fmt.Sprint("r", i)]; !ok {
			t.Fatalf("request r%d got no result", i)
		}
	}
	if p.cuts.Load() == 0 {
		t.Fatal("the proxy never cut a connection")
	}
}

// TestExistingQueues: the worker uses queues that exist with other
// arguments (a classic queue), and with SOUS_DECLARE=false declares nothing.
func TestExistingQueues(t *testing.T) {
	t.Parallel()
	q, results := names(t)
	c := newClient(t)
	for _, name := range []string{q, q + ".dlq", results} {
		if _, err := c.ch.QueueDeclare(name, true, false, false, false, nil); err != nil { // classic
			t.Fatal(err)
		}
	}
	startWorker(t, q)
	c.publish(q, "e1", "", `{"prompt":"x","options":{"num_predict":4}}`)
	c.collect(results, 1, 60*time.Second)

	q2, results2 := names(t)
	for _, name := range []string{q2, q2 + ".dlq", results2} {
		c.declare(name)
	}
	startWorker(t, q2, "SOUS_DECLARE=false")
	c.publish(q2, "e2", "", `{"prompt":"x","options":{"num_predict":4}}`)
	c.collect(results2, 1, 60*time.Second)
}

// TestInvalidConfigExits2: a bad value stops the worker at start with exit
// code 2 and a message naming the variable, never the password.
func TestInvalidConfigExits2(t *testing.T) {
	t.Parallel()
	tests := []struct{ env, name string }{
		{"SOUS_BATCH_MAX=lots", "SOUS_BATCH_MAX"},
		{"SOUS_DRAIN_TIMEOUT=-1s", "SOUS_DRAIN_TIMEOUT"},
		{"SOUS_AMQP_URL=http://u:s3cretpw@host/", "SOUS_AMQP_URL"},
		{"SOUS_BROKER=kafka", "SOUS_BROKER"},
		{"SOUS_MODEL=", "SOUS_MODEL"},
		{"SOUS_ENGINE_PARALLEL=0", "SOUS_ENGINE_PARALLEL"},
	}
	for _, tt := range tests {
		cmd := exec.Command(filepath.Join(binDir, "worker"))
		cmd.Env = []string{"SOUS_MODEL=tiny", "SOUS_AMQP_URL=amqp://u:s3cretpw@127.0.0.1:1/", tt.env}
		out, err := cmd.CombinedOutput()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 2 {
			t.Errorf("%s: exit %v, want 2\n%s", tt.env, err, out)
		}
		if !strings.Contains(string(out), tt.name) {
			t.Errorf("%s: message does not name the variable: %s", tt.env, out)
		}
		if strings.Contains(string(out), "s3cretpw") {
			t.Errorf("%s: password leaked: %s", tt.env, out)
		}
	}
}

// proxy forwards TCP to target and can cut every connection.
type proxy struct {
	addr  string
	mu    sync.Mutex
	conns []net.Conn
	cuts  atomicInt
}

type atomicInt struct {
	mu sync.Mutex
	n  int
}

func (a *atomicInt) Add(d int) { a.mu.Lock(); a.n += d; a.mu.Unlock() }
func (a *atomicInt) Load() int { a.mu.Lock(); defer a.mu.Unlock(); return a.n }

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{addr: l.Addr().String()}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); l.Close(); p.cut(); wg.Wait() })
	wg.Go(func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			out, err := (&net.Dialer{}).DialContext(ctx, "tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, in, out)
			p.mu.Unlock()
			wg.Go(func() { pipe(in, out) })
			wg.Go(func() { pipe(out, in) })
		}
	})
	return p
}

func pipe(a, b net.Conn) {
	buf := make([]byte, 32*1024)
	for {
		n, err := a.Read(buf)
		if n > 0 {
			if _, werr := b.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	a.Close()
	b.Close()
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	if len(p.conns) > 0 {
		p.cuts.Add(1)
	}
	p.conns = nil
}

var _ = amqp.Table{}
