package reliability

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/integration/itest"
)

var (
	// binDir holds the worker built with -race (workerBin) and, for the
	// soak, without it (plainWorkerBin, built on first use).
	binDir    string
	sharedURL = "amqp://guest:guest@127.0.0.1:5672/"
	seq       atomic.Int64

	plainOnce sync.Once
	plainErr  error
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if u := os.Getenv("RABBITMQ_URL"); u != "" {
		sharedURL = u
	}
	dir, err := os.MkdirTemp("", "sous-rel-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binDir = dir
	build := exec.Command("go", "build", "-race", "-o", filepath.Join(binDir, "worker"), "../../cmd/worker")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build the worker:", err)
		return 1
	}
	code := m.Run()
	queues.Delete(sharedURL)
	stopAllNodes() // normally a no-op: each test stops its own
	if code == 0 {
		if err := goleak.Find(
			// The amqp091 heartbeater of a connection closed a moment ago.
			goleak.IgnoreAnyFunction("github.com/rabbitmq/amqp091-go.(*Connection).heartbeater"),
			goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
			// toxiproxy v2.5.0 can leave a toxic's stub blocked on a link
			// that closed while the toxic was being added or removed; its
			// API offers no way to wait for it.
			goleak.IgnoreAnyFunction("github.com/Shopify/toxiproxy/v2/toxics.(*ToxicStub).Run"),
			// Likewise a link's reader, blocked handing bytes to that stub.
			goleak.IgnoreAnyFunction("github.com/Shopify/toxiproxy/v2.(*ToxicLink).read"),
		); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			return 1
		}
	}
	return code
}

// plainWorker returns the worker built without the race detector, whose
// memory figures mean something (the race detector's shadow memory grows
// with every allocation it has seen).
func plainWorker(t testing.TB) string {
	t.Helper()
	path := filepath.Join(binDir, "worker-plain")
	plainOnce.Do(func() {
		out, err := exec.Command("go", "build", "-o", path, "../../cmd/worker").CombinedOutput()
		if err != nil {
			plainErr = fmt.Errorf("build the plain worker: %v\n%s", err, out)
		}
	})
	if plainErr != nil {
		t.Fatal(plainErr)
	}
	return path
}

// names returns a fresh request queue name for one test on the shared
// broker; its .dlq and .results are deleted at the end of the run.
func names(t testing.TB) string {
	base := fmt.Sprintf("sous-rel-%s-%d-%d", strings.NewReplacer("/", "-", " ", "_").Replace(t.Name()), os.Getpid(), seq.Add(1))
	queues.Add(base, base+".dlq", base+".results", base+".replies")
	return base
}

// queues are deleted from the shared broker after the run.
var queues itest.Queues

// workerProc is a running worker binary.
type workerProc = itest.Worker

// workerOpts say how to start a worker.
type workerOpts struct {
	bin       string // default: the race-built worker
	brokerURL string // default: the shared broker
	engineURL string // required
	queue     string // required
	probe     string // what to wait for: "/readyz" (default), "/healthz" or "none"
	env       []string
}

func freeAddr(t testing.TB) string { return itest.FreeAddr(t) }

func freePort(t testing.TB) int { return itest.FreePort(t) }

// startWorker runs the worker and waits for its probe (itest.StartWorker).
func startWorker(t testing.TB, o workerOpts) *workerProc {
	t.Helper()
	if o.bin == "" {
		o.bin = filepath.Join(binDir, "worker")
	}
	if o.brokerURL == "" {
		o.brokerURL = sharedURL
	}
	return itest.StartWorker(t, itest.WorkerOptions{
		Bin:   o.bin,
		Probe: o.probe,
		Env: append([]string{
			"SOUS_AMQP_URL=" + o.brokerURL, "SOUS_QUEUE=" + o.queue, "SOUS_RESULTS_QUEUE=" + o.queue + ".results",
			"SOUS_ENGINE_URL=" + o.engineURL, "SOUS_MODEL=tiny",
			"SOUS_LOG_FORMAT=json", "SOUS_LOG_LEVEL=debug", "SOUS_WORKER_ID=rel-" + o.queue,
			"SOUS_DRAIN_TIMEOUT=20s", "SOUS_RETRY_BACKOFF=50ms", "SOUS_RETRY_BACKOFF_MAX=200ms",
			"SOUS_BATCH_MAX=8",
		}, o.env...),
	})
}

func tail(s string, n int) string { return itest.Tail(s, n) }

// waitUntil polls cond until it holds or within passes.
func waitUntil(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	itest.WaitUntil(t, within, what, cond)
}

func eventually(within time.Duration, cond func() bool) bool { return itest.Eventually(within, cond) }

// figure logs a figure for docs/reliability.md.
func figure(t testing.TB, name string, value any) {
	t.Helper()
	t.Logf("FIGURE %s %s=%v", t.Name(), name, value)
}

var httpClient = &http.Client{Timeout: 5 * time.Second}
