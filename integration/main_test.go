package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/wire"
)

var (
	binDir    string
	ollama    *ollamatest.Server
	brokerURL = "amqp://guest:guest@127.0.0.1:5672/"
	seq       atomic.Int64
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	url, stopBroker, err := ensureBroker(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer stopBroker()
	brokerURL = url
	dir, err := os.MkdirTemp("", "sous-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binDir = dir
	build := exec.Command("go", "build", "-race", "-o", binDir, "../cmd/worker", "../cmd/sousctl")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build binaries:", err)
		return 1
	}
	ollama, err = ollamatest.Start(ctx, ollamatest.Options{NumParallel: 4, Aliases: []string{"tiny-alias"}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start the dev Ollama:", err)
		return 1
	}
	defer ollama.Stop(context.Background())
	code := m.Run()
	queues.Delete(brokerURL)
	return code
}

// names returns fresh queue names for one test.
func names(t *testing.T) (requests, results string) {
	base := fmt.Sprintf("sous-it-%s-%d-%d", strings.ReplaceAll(t.Name(), "/", "-"), os.Getpid(), seq.Add(1))
	queues.Add(base, base+".dlq", base+".results", base+".replies")
	return base, base + ".results"
}

// queues are deleted from the shared broker after the run.
var queues itest.Queues

// workerProc is a running worker binary.
type workerProc = itest.Worker

func freeAddr(t *testing.T) string { return itest.FreeAddr(t) }

func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	itest.WaitUntil(t, within, what, cond)
}

// startWorker runs the worker binary on queue with env overrides and waits
// until it is ready.
func startWorker(t *testing.T, queue string, env ...string) *workerProc {
	t.Helper()
	return startWorkerWait(t, queue, "/readyz", env...)
}

func startWorkerWait(t *testing.T, queue, probe string, env ...string) *workerProc {
	t.Helper()
	return itest.StartWorker(t, itest.WorkerOptions{
		Bin:   filepath.Join(binDir, "worker"),
		Probe: probe,
		Env: append([]string{
			"SOUS_AMQP_URL=" + brokerURL, "SOUS_QUEUE=" + queue, "SOUS_RESULTS_QUEUE=" + queue + ".results",
			"SOUS_ENGINE_URL=" + ollama.URL(), "SOUS_MODEL=tiny",
			"SOUS_LOG_FORMAT=text", "SOUS_LOG_LEVEL=debug", "SOUS_MAX_NUM_PREDICT=16", "SOUS_WORKER_ID=it-" + queue,
			"SOUS_DRAIN_TIMEOUT=20s", "SOUS_RETRY_BACKOFF=50ms", "SOUS_RETRY_BACKOFF_MAX=200ms",
		}, env...),
	})
}

// client is a producer with its own connection.
type client struct {
	t    *testing.T
	conn *amqp.Connection
	ch   *amqp.Channel
}

func newClient(t *testing.T) *client {
	t.Helper()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatalf("connect to RabbitMQ at 127.0.0.1:5672 (`rabbitmq-server -detached`): %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	return &client{t: t, conn: conn, ch: ch}
}

func (c *client) declare(q string) {
	c.t.Helper()
	if _, err := c.ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); err != nil {
		c.t.Fatalf("declare %s: %v", q, err)
	}
}

func (c *client) publish(queue, id, replyTo, body string) {
	c.t.Helper()
	conf, err := c.ch.PublishWithDeferredConfirmWithContext(context.Background(), "", queue, false, false, amqp.Publishing{
		MessageId: id, ReplyTo: replyTo, ContentType: "application/json", DeliveryMode: amqp.Persistent, Timestamp: time.Now(), Body: []byte(body)})
	if err != nil {
		c.t.Fatal(err)
	}
	if !conf.Wait() {
		c.t.Fatal("publish not confirmed")
	}
}

// collect reads n messages from q (acking them), keyed by correlation id.
func (c *client) collect(q string, n int, within time.Duration) map[string]amqp.Delivery {
	c.t.Helper()
	ch, err := c.conn.Channel()
	if err != nil {
		c.t.Fatal(err)
	}
	defer ch.Close()
	ds, err := ch.Consume(q, "", true, false, false, false, nil)
	if err != nil {
		c.t.Fatalf("consume %s: %v", q, err)
	}
	out := map[string]amqp.Delivery{}
	timeout := time.After(within)
	for len(out) < n {
		select {
		case d := <-ds:
			key := d.CorrelationId
			if key == "" {
				key = d.MessageId
			}
			out[key] = d
		case <-timeout:
			c.t.Fatalf("got %d of %d messages from %s within %s", len(out), n, q, within)
		}
	}
	return out
}

// depth is the number of ready messages in q.
func (c *client) depth(q string) int {
	c.t.Helper()
	return itest.QueueDepth(c.t, c.conn, q)
}

func decodeResult(t *testing.T, d amqp.Delivery) wire.Result {
	t.Helper()
	var r wire.Result
	if err := json.Unmarshal(d.Body, &r); err != nil {
		t.Fatalf("result is not JSON: %v: %s", err, d.Body)
	}
	return r
}

// drain returns what is in q now, acking it.
func drain(t *testing.T, c *client, q string) []amqp.Delivery {
	t.Helper()
	return itest.Drain(t, c.conn, q)
}

// gate is a reverse proxy to an engine that holds generation and chat
// calls until release is called; other calls pass.
type gate struct {
	url  string
	open chan struct{}
	once sync.Once
	held atomic.Int64 // generation calls waiting at the gate now
	peak atomic.Int64 // the most that waited at once
}

func newGate(t *testing.T, target string) *gate {
	t.Helper()
	u, err := neturl.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{open: make(chan struct{})}
	proxy := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/api/generate" || r.URL.Path == "/api/chat" {
			n := g.held.Add(1)
			for p := g.peak.Load(); n > p && !g.peak.CompareAndSwap(p, n); p = g.peak.Load() {
			}
			defer g.held.Add(-1)
			select {
			case <-g.open:
			case <-r.Context().Done():
				return
			}
		}
		// Full duplex: otherwise the server closes the request body when the
		// engine's answer starts, the proxy's transport, still finishing the
		// body it forwards, fails and cuts the answer short ("ReverseProxy
		// read error during body copy: use of closed network connection",
		// golang/go#40747), now and then, on a loaded machine.
		_ = http.NewResponseController(w).EnableFullDuplex()
		proxy.ServeHTTP(w, r)
	}))
	g.url = srv.URL
	t.Cleanup(func() { g.release(); srv.Close() })
	return g
}

func (g *gate) release() { g.once.Do(func() { close(g.open) }) }
