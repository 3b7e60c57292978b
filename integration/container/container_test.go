package container

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"github.com/testcontainers/testcontainers-go"

	"github.com/sous-run/sous/integration/containertest"
	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/tinymodel"
	"github.com/sous-run/sous/soustest"
)

// runWorker starts img with soustest on the host's network and terminates
// it in t.Cleanup.
func runWorker(t *testing.T, img string, opts ...testcontainers.ContainerCustomizer) *soustest.Container {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	opts = append([]testcontainers.ContainerCustomizer{
		soustest.WithHostNetwork(),
		soustest.WithLogLevel("debug"),
		soustest.WithMaxNumPredict(16),
		containertest.Logger(t),
	}, opts...)
	c, err := soustest.Run(ctx, img, opts...)
	testcontainers.CleanupContainer(t, c)
	if err != nil {
		t.Fatalf("%v\n%s", err, logs(c))
	}
	return c
}

// logs is the tail of a container's log, for failure messages.
func logs(c testcontainers.Container) string {
	if c == nil {
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := c.Logs(ctx)
	if err != nil {
		return ""
	}
	defer r.Close()
	var b strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return itest.Tail(b.String(), 40)
}

// mainPid is the host pid of the container's first process (the worker).
func mainPid(t *testing.T, c testcontainers.Container) int {
	t.Helper()
	in, err := c.Inspect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if in.State == nil || in.State.Pid == 0 {
		t.Fatal("container has no running process")
	}
	return in.State.Pid
}

// uids is the Uid line of /proc/pid/status: real, effective, saved, fs.
func uids(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f, ok := strings.CutPrefix(line, "Uid:"); ok {
			return strings.Fields(f)
		}
	}
	t.Fatalf("no Uid line in /proc/%d/status", pid)
	return nil
}

// children are the command lines of pid's child processes.
func children(t *testing.T, pid int) map[int]string {
	t.Helper()
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	out := map[int]string{}
	for _, st := range stats {
		b, err := os.ReadFile(st)
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces, so cut after ')'.
		rest := string(b[strings.LastIndexByte(string(b), ')')+1:])
		f := strings.Fields(rest)
		if len(f) < 2 || f[1] != strconv.Itoa(pid) {
			continue
		}
		dir := filepath.Dir(st)
		cmd, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
		child, _ := strconv.Atoi(filepath.Base(dir))
		out[child] = strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " "))
	}
	return out
}

func checkOK(t *testing.T, what string, r soustest.Result, model string) {
	t.Helper()
	if r.Status != "ok" || r.Model != model {
		t.Fatalf("%s: %s", what, r.Raw)
	}
}

// TestWorkerImageAnswersAsNonRoot: the worker image, on the local broker
// and the dev Ollama, runs as 65532 and answers a prompt and a chat, the
// scripted model's exact answers.
func TestWorkerImageAnswersAsNonRoot(t *testing.T) {
	containertest.Require(t)
	t.Parallel()
	q, _ := names(t)
	c := runWorker(t, containertest.WorkerImage,
		soustest.WithAMQPURL(brokerURL), soustest.WithQueue(q), soustest.WithResultsQueue(q+".results"),
		soustest.WithEngineURL(ollama.URL()), soustest.WithModel(ollamatest.ScriptedModelName), soustest.WithWorkerID("ct-"+q))
	in, err := c.Inspect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if in.Config.User != "65532:65532" {
		t.Fatalf("image user %q, want 65532:65532", in.Config.User)
	}
	if got := uids(t, mainPid(t, c)); strings.Join(got, " ") != "65532 65532 65532 65532" {
		t.Fatalf("the worker runs with uids %v, want 65532", got)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := c.Prompt(ctx, tinymodel.SkyQuestion)
	if err != nil {
		t.Fatalf("%v\n%s", err, logs(c))
	}
	checkOK(t, "prompt", r, ollamatest.ScriptedModelName)
	if r.Response != tinymodel.SkyAnswer || r.Worker != "ct-"+q {
		t.Fatalf("prompt result: %s", r.Raw)
	}
	if err := c.Publish(ctx, "chat-1", `{"messages":[{"role":"user","content":"hello"}],"options":{"num_predict":8}}`); err != nil {
		t.Fatal(err)
	}
	r, err = c.Await(ctx, "chat-1")
	if err != nil {
		t.Fatalf("%v\n%s", err, logs(c))
	}
	checkOK(t, "chat", r, ollamatest.ScriptedModelName)
	if r.Message == nil || r.Message.Role != "assistant" || r.Message.Content != tinymodel.FallbackAnswer {
		t.Fatalf("chat result: %s", r.Raw)
	}
}

// TestWorkerOllamaImageRunsItsEngine: the worker-ollama image starts
// `ollama serve` as the worker's child, loads the tiny model the image
// carries, and answers.
func TestWorkerOllamaImageRunsItsEngine(t *testing.T) {
	containertest.Require(t)
	t.Parallel()
	q, _ := names(t)
	c := runWorker(t, containertest.WorkerOllamaImage,
		soustest.WithAMQPURL(brokerURL), soustest.WithQueue(q), soustest.WithResultsQueue(q+".results"),
		soustest.WithModel("tiny"))
	pid := mainPid(t, c)
	if got := uids(t, pid); got[1] != "65532" {
		t.Fatalf("the worker runs with uids %v, want 65532", got)
	}
	var engine string
	for child, cmd := range children(t, pid) {
		if cmd == "ollama serve" {
			engine = strconv.Itoa(child)
			if got := uids(t, child); got[1] != "65532" {
				t.Fatalf("ollama serve runs with uids %v, want 65532", got)
			}
		}
	}
	if engine == "" {
		t.Fatalf("no `ollama serve` among the worker's children: %v", children(t, pid))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The random-weight model can end an answer before its first token; a
	// fixed seed makes this prompt's answer the same every run (8 tokens,
	// as TestPromptAndChatEndToEnd sees on the dev Ollama).
	if err := c.Publish(ctx, "p-1", `{"prompt":"Why is the sky blue?","options":{"seed":1,"num_predict":8}}`); err != nil {
		t.Fatal(err)
	}
	r, err := c.Await(ctx, "p-1")
	if err != nil {
		t.Fatalf("%v\n%s", err, logs(c))
	}
	checkOK(t, "prompt", r, "tiny")
	if r.Response == "" {
		t.Fatalf("prompt result: %s", r.Raw)
	}
}

// TestDockerStopDrains: `docker stop` while a batch is on the engine sends
// SIGTERM; the worker stops receiving, lets that batch finish, returns what
// it had prefetched, and exits 0 within the grace period: every request has
// a result or is back in the queue, none lost.
func TestDockerStopDrains(t *testing.T) {
	containertest.Require(t)
	t.Parallel()
	q, results := names(t)
	g := newGate(t, ollama.URL())
	c := runWorker(t, containertest.WorkerImage,
		soustest.WithAMQPURL(brokerURL), soustest.WithQueue(q), soustest.WithResultsQueue(results),
		soustest.WithEngineURL(g.url), soustest.WithModel("tiny"),
		soustest.WithBatchMax(2), soustest.WithSetting("SOUS_ENGINE_PARALLEL", "2"),
		soustest.WithSetting("SOUS_BATCH_CONCURRENCY", "1"), soustest.WithDrainTimeout(20*time.Second))
	g.arm()
	conn := dial(t, brokerURL)
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	const n = 6
	for i := range n {
		conf, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), "", q, false, false, amqp.Publishing{
			MessageId: fmt.Sprint("s", i), ContentType: "application/json", DeliveryMode: amqp.Persistent,
			Body: []byte(`{"prompt":"count to ten","options":{"num_predict":8}}`)})
		if err != nil || !conf.Wait() {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	itest.WaitUntil(t, 60*time.Second, "a batch on the engine", func() bool { return g.held.Load() >= 1 })

	const grace = 30 * time.Second
	start := time.Now()
	stopped := make(chan error, 1)
	go func() {
		timeout := grace
		stopped <- c.Stop(context.Background(), &timeout)
	}()
	itest.WaitUntil(t, grace, "the worker to start draining", func() bool { return strings.Contains(logs(c), "draining") })
	g.release()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	in, err := c.Inspect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if in.State.ExitCode != 0 || took >= grace {
		t.Fatalf("docker stop: exit code %d after %s (grace %s)\n%s", in.State.ExitCode, took, grace, logs(c))
	}
	t.Logf("drained in %s", took.Round(time.Millisecond))
	done := itest.QueueDepth(t, conn, results)
	left := itest.QueueDepth(t, conn, q)
	if done+left != n || done == 0 || left == 0 {
		t.Fatalf("%d results + %d requeued, want %d in all, with the batch on the engine finished and the rest requeued\n%s", done, left, n, logs(c))
	}
}

// gate is a reverse proxy to an engine that, once armed, holds generation
// and chat calls until released; other calls pass.
type gate struct {
	url   string
	armed atomic.Bool
	held  atomic.Int64
	open  chan struct{}
	once  sync.Once
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
		if g.armed.Load() && (r.URL.Path == "/api/generate" || r.URL.Path == "/api/chat") {
			g.held.Add(1)
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

func (g *gate) arm()     { g.armed.Store(true) }
func (g *gate) release() { g.once.Do(func() { close(g.open) }) }

// TestTestcontainersBrokerAndWorker: RabbitMQ and the worker, both started
// with testcontainers-go, pass the end-to-end checks of the RABBITMQ_URL
// path: prompt and chat answered, a bad request answered with an error and
// dead-lettered, nothing left in the queue.
func TestTestcontainersBrokerAndWorker(t *testing.T) {
	containertest.Require(t)
	t.Parallel()
	url := containertest.RabbitMQ(t)
	const q = "sous.requests"
	c := runWorker(t, containertest.WorkerImage,
		soustest.WithAMQPURL(url), soustest.WithEngineURL(ollama.URL()), soustest.WithModel(ollamatest.ScriptedModelName))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := c.Prompt(ctx, tinymodel.SkyQuestion)
	if err != nil {
		t.Fatalf("%v\n%s", err, logs(c))
	}
	checkOK(t, "prompt", r, ollamatest.ScriptedModelName)
	if r.Response != tinymodel.SkyAnswer {
		t.Fatalf("prompt result: %s", r.Raw)
	}
	if err := c.Publish(ctx, "chat", map[string]any{"messages": []map[string]string{{"role": "user", "content": "hello"}}}); err != nil {
		t.Fatal(err)
	}
	if r, err = c.Await(ctx, "chat"); err != nil {
		t.Fatal(err)
	}
	checkOK(t, "chat", r, ollamatest.ScriptedModelName)
	if err := c.Publish(ctx, "bad", json.RawMessage(`{"prompt":"x","options":{"num_predict":"many"}}`)); err != nil {
		t.Fatal(err)
	}
	if r, err = c.Await(ctx, "bad"); err != nil {
		t.Fatal(err)
	}
	if r.Status != "error" || r.Error == nil || r.Error.Code == "" {
		t.Fatalf("bad request: %s", r.Raw)
	}
	conn := dial(t, url)
	itest.WaitUntil(t, 30*time.Second, "the bad request in the dead-letter queue", func() bool { return itest.QueueDepth(t, conn, q+".dlq") == 1 })
	if d := itest.QueueDepth(t, conn, q); d != 0 {
		t.Fatalf("%d requests left in %s", d, q)
	}
}
