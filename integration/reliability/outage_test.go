package reliability

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/integration/itest"
)

// switchable serves the fake engine on a fixed loopback address that can be
// taken down (connections refused) and brought back.
type switchable struct {
	t    testing.TB
	addr string
	h    http.Handler
	mu   sync.Mutex
	srv  *http.Server
}

func newSwitchable(t testing.TB, eng *fakeEngine) *switchable {
	s := &switchable{t: t, addr: freeAddr(t), h: eng.srv.Config.Handler}
	t.Cleanup(s.down)
	return s
}

func (s *switchable) URL() string { return "http://" + s.addr }

func (s *switchable) up() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.t.Fatalf("engine listen on %s: %v", s.addr, err)
	}
	s.srv = &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.srv.Serve(ln) }()
}

func (s *switchable) down() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		_ = s.srv.Close()
		s.srv = nil
	}
}

// TestEngineDownKeepsRequestsQueued: the engine is down for 60 s (never
// started: connections refused) under a steady stream of requests. The
// worker says it is not ready, takes nothing from the queue, counts no
// attempt, and answers every request once the engine is up. Before, each
// request used its five attempts in 7.5 s and was dead-lettered
// max_attempts: the queue emptied into the dead-letter queue.
func TestEngineDownKeepsRequestsQueued(t *testing.T) {
	t.Parallel()
	outage := 60 * time.Second
	if testing.Short() {
		outage = 10 * time.Second
	}
	eng := newFakeEngine(t)
	sw := newSwitchable(t, eng)
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, engineURL: sw.URL(), probe: "/healthz", env: []string{
		"SOUS_RETRY_BACKOFF=500ms", "SOUS_RETRY_BACKOFF_MAX=5s", "SOUS_MAX_ATTEMPTS=5"}})
	l := watch(t, sharedURL, q)
	c := newClient(t, sharedURL)
	// /healthz answers before the queues are declared: wait until the
	// worker has opened the broker and found the engine down.
	waitUntil(t, 10*time.Second, "the worker to find the engine down", func() bool {
		return strings.Contains(w.Logs(), "the engine cannot take work")
	})
	if code, body := w.GetBody("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "engine") {
		t.Fatalf("/readyz with the engine down: %d %q, want 503 naming the engine", code, body)
	}
	var ids []string
	start := time.Now()
	for i := 0; time.Since(start) < outage; i++ { // a request every 500 ms
		ids = append(ids, c.publishRequests(q, fmt.Sprintf("d%d-", i), 1)...)
		time.Sleep(500 * time.Millisecond)
	}
	conn, err := amqp.Dial(sharedURL)
	must(t, err)
	defer conn.Close()
	if depth := itest.QueueDepth(t, conn, q); depth != len(ids) {
		t.Errorf("queue depth %d after the outage, want all %d requests still queued", depth, len(ids))
	}
	sw.up()
	tl := l.waitSettled(t, ids, 2*time.Minute)
	checkNoLoss(t, tl)
	figure(t, "outage_s", outage.Seconds())
	figure(t, "tally", tl)
	if tl.dead+tl.deadAndAns != 0 || tl.answered != len(ids) {
		t.Errorf("after a %s outage: %s; want every request answered, none dead-lettered", outage, tl)
	}
	waitUntil(t, 30*time.Second, "/readyz once the engine is up", func() bool { return w.Get("/readyz") == http.StatusOK })

	// Killed mid-run: what the worker held goes back, uncounted.
	sw.down()
	more := c.publishRequests(q, "k", 20)
	time.Sleep(5 * time.Second)
	sw.up()
	tl = l.waitSettled(t, more, 2*time.Minute)
	checkNoLoss(t, tl)
	if tl.dead+tl.deadAndAns != 0 {
		t.Errorf("engine down mid-run: %s", tl)
	}
}

// TestWrongModelStaysNotReady: SOUS_MODEL names a model the engine does
// not have. The worker says so on /readyz and in its log, and takes no
// work (before: ready, and every request dead-lettered model_not_found).
func TestWrongModelStaysNotReady(t *testing.T) {
	t.Parallel()
	eng := newFakeEngine(t)
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), probe: "/healthz", env: []string{"SOUS_MODEL=no-such-model"}})
	c := newClient(t, sharedURL)
	// /healthz answers before the worker has declared its queues: publish
	// once it has said what is wrong, after opening the broker.
	waitUntil(t, 10*time.Second, "a log line naming the missing model", func() bool {
		return strings.Contains(w.Logs(), `no model \"no-such-model\" (SOUS_MODEL)`)
	})
	ids := c.publishRequests(q, "w", 3)
	code, body := w.GetBody("/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "no-such-model") {
		t.Fatalf("/readyz: %d %q", code, body)
	}
	conn, err := amqp.Dial(sharedURL)
	must(t, err)
	defer conn.Close()
	time.Sleep(time.Second)
	if depth := itest.QueueDepth(t, conn, q); depth != len(ids) {
		t.Fatalf("queue depth %d, want the %d requests left queued\n%s", depth, len(ids), w.Logs())
	}
}
