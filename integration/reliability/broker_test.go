package reliability

import (
	"fmt"
	"testing"
	"time"
)

// TestBrokerRestart: a private node is stopped and started, then SIGKILLed
// and started, while the worker works through a stream of requests. The
// queues are durable quorum queues, requests and results persistent,
// publishes confirmed: no request is lost. Redeliveries may duplicate a
// result (at-least-once); the figures count them, and the time from the
// node listening again to the worker being ready again.
func TestBrokerRestart(t *testing.T) {
	t.Parallel()
	node := startNode(t, nodeOptions{})
	eng := newFakeEngine(t)
	eng.setDelay(100 * time.Millisecond)
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, brokerURL: node.URL(), engineURL: eng.URL()})
	l := watch(t, node.URL(), q)
	c := newClient(t, node.URL())
	const n = 400
	ids := c.publishRequests(q, "b", n)

	for i, how := range []string{"stop", "kill"} {
		at := (i + 1) * n / 4
		waitUntil(t, 60*time.Second, fmt.Sprintf("%d results before the %s", at, how), func() bool { return l.settled(ids) >= at })
		if how == "stop" {
			must(t, node.stop())
		} else {
			node.kill()
		}
		waitUntil(t, 30*time.Second, "the worker to notice", func() bool { return w.Get("/readyz") != 200 })
		time.Sleep(time.Second) // down for a moment: reconnect attempts fail
		boot, err := node.start()
		must(t, err)
		back := time.Now()
		w.WaitProbe(t, "/readyz", 60*time.Second)
		figure(t, how+"_node_boot_s", fmt.Sprintf("%.1f", boot.Seconds()))
		figure(t, how+"_reconnect_after_boot_s", fmt.Sprintf("%.1f", time.Since(back).Seconds()))
	}
	tl := l.waitSettled(t, ids, 120*time.Second)
	checkNoLoss(t, tl)
	figure(t, "tally", tl)
	figure(t, "lost", len(tl.missing))
	figure(t, "duplicates", tl.duplicates)
	if tl.dead > 0 {
		t.Errorf("%d requests dead-lettered by a broker restart", tl.dead)
	}
}
