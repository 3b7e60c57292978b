package reliability

import (
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/itest"
)

// TestConnectionClosedMidBatch closes the worker's connection from the
// broker's management API while a batch runs on the engine, as an operator
// does from the management UI. The broker requeues every delivery of the
// closed connection and redelivers it on the worker's next one, so the
// results of the old copies must not be published: each would duplicate
// the redelivered copy's result (and its ack would fail anyway). Every
// request is answered exactly once.
func TestConnectionClosedMidBatch(t *testing.T) {
	t.Parallel()
	eng := newFakeEngine(t)
	eng.setDelay(3 * time.Second)
	q := names(t)
	l := watch(t, sharedURL, q)
	w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL()})
	conn := "sous-worker rel-" + q
	itest.WaitConnection(t, conn, 30*time.Second) // so that the close below acts at once
	c := newClient(t, sharedURL)
	ids := c.publishRequests(q, "c", 8)
	waitUntil(t, 30*time.Second, "a batch on the engine", func() bool { return eng.inflight.Load() > 0 })
	if n := itest.CloseConnections(t, conn, 20*time.Second); n != 1 {
		t.Fatalf("closed %d connections of the worker, want 1", n)
	}
	inflight := eng.inflight.Load()
	if inflight == 0 {
		t.Fatal("the batch ended before the connection was closed: nothing was in flight to go stale")
	}
	tl := l.waitSettled(t, ids, 60*time.Second)
	checkNoLoss(t, tl)
	if !strings.Contains(w.Logs(), "broker reconnected") {
		t.Error("the worker never logged a reconnect")
	}
	figure(t, "inflight_at_close", inflight)
	figure(t, "tally", tl)
	figure(t, "engine_calls", eng.calls.Load())
	figure(t, "duplicates", tl.duplicates)
	if tl.duplicates > 0 || tl.dead > 0 {
		t.Errorf("%d duplicate results and %d dead letters after the broker closed the connection mid-batch, want none", tl.duplicates, tl.dead)
	}
}
