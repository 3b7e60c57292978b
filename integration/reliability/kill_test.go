package reliability

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// TestWorkerSIGKILLLoop kills the worker with SIGKILL in the middle of a
// batch, again and again, over a stream of requests, starting a new one
// each time. Every request must end with a result or in the dead-letter
// queue (a request in flight at SOUS_MAX_ATTEMPTS kills is dead-lettered
// by the broker's x-delivery-limit); none may be missing. Duplicates are
// expected (a result published, its ack lost with the process) and
// counted.
func TestWorkerSIGKILLLoop(t *testing.T) {
	t.Parallel()
	const (
		n     = 400
		kills = 10
	)
	eng := newFakeEngine(t)
	eng.setDelay(100 * time.Millisecond)
	q := names(t)
	l := watch(t, sharedURL, q)
	opts := workerOpts{queue: q, engineURL: eng.URL(), env: []string{"SOUS_LOG_LEVEL=info"}}
	w := startWorker(t, opts) // declares the queues
	c := newClient(t, sharedURL)
	ids := c.publishRequests(q, "k", n)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	for i := range kills {
		// A batch in flight, and progress since the last kill, so that a
		// kill catches new deliveries rather than the same ones again.
		want := l.settled(ids) + 25
		waitUntil(t, 60*time.Second, fmt.Sprintf("kill %d: progress and a batch in flight", i+1), func() bool {
			return l.settled(ids) >= want && eng.inflight.Load() > 0
		})
		// Land anywhere in the batch: in the engine call, in publishing
		// the results, between a publish and its ack.
		time.Sleep(time.Duration(rng.IntN(250)) * time.Millisecond)
		w.Kill()
		w = startWorker(t, opts)
	}
	tl := l.waitSettled(t, ids, 120*time.Second)
	checkNoLoss(t, tl)
	figure(t, "kills", kills)
	figure(t, "tally", tl)
	figure(t, "lost", len(tl.missing))
	figure(t, "duplicates", tl.duplicates)
	figure(t, "dead_lettered", tl.dead)
	if d := c.depth(q); d != 0 {
		t.Errorf("%d requests still queued after every id was settled", d)
	}
}
