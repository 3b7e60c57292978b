package reliability

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.uber.org/goleak"
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
	deleteSharedQueues()
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
	queuesMu.Lock()
	queues = append(queues, base, base+".dlq", base+".results", base+".replies")
	queuesMu.Unlock()
	return base
}

var (
	queuesMu sync.Mutex
	queues   []string
)

func deleteSharedQueues() {
	conn, err := amqp.Dial(sharedURL)
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	queuesMu.Lock()
	defer queuesMu.Unlock()
	for _, q := range queues {
		_, _ = ch.QueueDelete(q, false, false, false)
	}
}

// workerProc is a running worker binary.
type workerProc struct {
	cmd    *exec.Cmd
	addr   string // its HTTP address on loopback
	mu     sync.Mutex
	log    strings.Builder
	exited chan struct{}
	err    error
}

// workerOpts say how to start a worker.
type workerOpts struct {
	bin       string // default: the race-built worker
	brokerURL string // default: the shared broker
	engineURL string // required
	queue     string // required
	probe     string // what to wait for: "/readyz" (default), "/healthz" or "none"
	env       []string
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func freePort(t testing.TB) int {
	_, p, _ := net.SplitHostPort(freeAddr(t))
	n, _ := strconv.Atoi(p)
	return n
}

// startWorker runs the worker and waits for its probe. The process is
// SIGKILLed at cleanup if it still runs; its log is printed if the test
// failed.
func startWorker(t testing.TB, o workerOpts) *workerProc {
	t.Helper()
	if o.bin == "" {
		o.bin = filepath.Join(binDir, "worker")
	}
	if o.brokerURL == "" {
		o.brokerURL = sharedURL
	}
	if o.probe == "" {
		o.probe = "/readyz"
	}
	addr := freeAddr(t)
	cmd := exec.Command(o.bin)
	cmd.Env = append(os.Environ(),
		"SOUS_AMQP_URL="+o.brokerURL, "SOUS_QUEUE="+o.queue, "SOUS_RESULTS_QUEUE="+o.queue+".results",
		"SOUS_ENGINE_URL="+o.engineURL, "SOUS_MODEL=tiny", "SOUS_HTTP_ADDR="+addr,
		"SOUS_LOG_FORMAT=json", "SOUS_LOG_LEVEL=debug", "SOUS_WORKER_ID=rel-"+o.queue,
		"SOUS_DRAIN_TIMEOUT=20s", "SOUS_RETRY_BACKOFF=50ms", "SOUS_RETRY_BACKOFF_MAX=200ms",
		"SOUS_BATCH_MAX=8",
		// The race runtime sleeps 1s at exit by default; exit times here
		// are the worker's own.
		"GORACE=atexit_sleep_ms=0",
	)
	cmd.Env = append(cmd.Env, o.env...)
	w := &workerProc{cmd: cmd, addr: addr, exited: make(chan struct{})}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 4<<20)
		for sc.Scan() {
			w.mu.Lock()
			w.log.WriteString(sc.Text() + "\n")
			w.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() {
		w.err = cmd.Wait()
		pw.Close()
		<-scanned
		close(w.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-w.exited
		if strings.Contains(w.logs(), "WARNING: DATA RACE") {
			t.Errorf("the race detector fired in worker %d", cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("worker %d log (last 60 lines):\n%s", cmd.Process.Pid, tail(w.logs(), 60))
		}
	})
	if o.probe != "none" {
		w.waitProbe(t, o.probe, 60*time.Second)
	}
	return w
}

func (w *workerProc) waitProbe(t testing.TB, probe string, within time.Duration) {
	t.Helper()
	waitUntil(t, within, "worker "+probe, func() bool {
		select {
		case <-w.exited:
			t.Fatalf("worker exited early: %v\n%s", w.err, tail(w.logs(), 40))
		default:
		}
		return w.get(probe) == http.StatusOK
	})
}

// get returns the status of GET path on the worker's HTTP address, 0 when
// it does not answer.
func (w *workerProc) get(path string) int {
	code, _ := w.getBody(path)
	return code
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

func (w *workerProc) getBody(path string) (int, string) {
	resp, err := httpClient.Get("http://" + w.addr + path)
	if err != nil {
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	return resp.StatusCode, string(b)
}

func (w *workerProc) pid() int { return w.cmd.Process.Pid }

func (w *workerProc) logs() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.log.String()
}

func (w *workerProc) kill() {
	_ = w.cmd.Process.Signal(syscall.SIGKILL)
	<-w.exited
}

// exitCode waits for the process to exit and returns its code (-1 for a
// signal).
func (w *workerProc) exitCode(t testing.TB, within time.Duration) int {
	t.Helper()
	select {
	case <-w.exited:
	case <-time.After(within):
		t.Fatalf("worker did not exit within %s", within)
	}
	if w.err == nil {
		return 0
	}
	if ee, ok := w.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("wait: %v", w.err)
	return -1
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitUntil polls cond until it holds or within passes.
func waitUntil(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	if !eventually(within, cond) {
		t.Fatalf("timed out after %s waiting for %s", within, what)
	}
}

func eventually(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// figure logs a figure for docs/reliability.md.
func figure(t testing.TB, name string, value any) {
	t.Helper()
	t.Logf("FIGURE %s %s=%v", t.Name(), name, value)
}
