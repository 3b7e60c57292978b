package reliability

import (
	"fmt"
	"syscall"
	"testing"
	"time"
)

// TestSIGTERMUnderLoad: SIGTERM while batches run. The worker stops
// receiving, lets running batches finish within SOUS_DRAIN_TIMEOUT, returns
// what it had prefetched, and exits 0 within the budget. Afterwards every
// request has exactly one result or is back in the queue: nothing lost,
// nothing duplicated. When the engine is slower than the budget, the
// running batch is cut off and requeued, no result published.
func TestSIGTERMUnderLoad(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		delay  time.Duration // per engine call
		drain  time.Duration // SOUS_DRAIN_TIMEOUT
		n      int
		finish bool // whether the running batch finishes within the budget
	}{
		{name: "finishes", delay: 300 * time.Millisecond, drain: 10 * time.Second, n: 200, finish: true},
		{name: "cut_off", delay: time.Minute, drain: 2 * time.Second, n: 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			eng := newFakeEngine(t)
			eng.setDelay(tt.delay)
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), env: []string{
				fmt.Sprintf("SOUS_DRAIN_TIMEOUT=%s", tt.drain), "SOUS_LOG_LEVEL=info"}})
			l := watch(t, sharedURL, q)
			c := newClient(t, sharedURL)
			ids := c.publishRequests(q, "d", tt.n)
			waitUntil(t, 60*time.Second, "a batch in flight", func() bool {
				return eng.inflight.Load() > 0 && (!tt.finish || l.settled(ids) >= 20)
			})
			start := time.Now()
			if err := w.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			code := w.ExitCode(t, tt.drain+15*time.Second)
			took := time.Since(start)
			figure(t, "drain_s", fmt.Sprintf("%.2f", took.Seconds()))
			figure(t, "drain_timeout_s", tt.drain.Seconds())
			if code != 0 {
				t.Errorf("exit code %d after SIGTERM", code)
			}
			if took > tt.drain+time.Second {
				t.Errorf("exited %s after SIGTERM; SOUS_DRAIN_TIMEOUT is %s", took.Round(time.Millisecond), tt.drain)
			}
			time.Sleep(500 * time.Millisecond) // let the follower catch up
			queued := map[string]int{}
			for _, d := range c.drain(q) {
				queued[d.MessageId]++
			}
			tl := l.tally(ids)
			lost, dup, both := 0, 0, 0
			for _, id := range ids {
				r := l.resultCount(id)
				switch {
				case r == 0 && queued[id] == 0 && len(l.deadLetters(id)) == 0:
					lost++
				case r > 1 || queued[id] > 1:
					dup++
				case r == 1 && queued[id] == 1:
					both++
				}
			}
			figure(t, "answered", tl.answered)
			figure(t, "requeued", len(queued))
			figure(t, "lost", lost)
			figure(t, "duplicated", dup+both)
			if lost > 0 || dup > 0 || both > 0 {
				t.Errorf("after SIGTERM: %d lost, %d with two results or copies, %d both answered and requeued", lost, dup, both)
			}
			if tt.finish && tl.answered < 20 {
				t.Errorf("only %d answered", tl.answered)
			}
			if !tt.finish && tl.answered != 0 {
				t.Errorf("%d results published for batches cut off by the drain timeout", tl.answered)
			}
			for _, id := range ids {
				for _, d := range l.deadLetters(id) {
					t.Errorf("%s dead-lettered on shutdown (reason %q, attempt %v): a batch the drain cut off must go back to the queue, whatever its attempt",
						id, deadReason(d), d.Headers["x-sous-attempts"])
				}
			}
		})
	}
}

// TestDrainCutOffOnLastAttempt: a batch the drain timeout cuts off failed
// through no fault of its requests, so they go back to the queue, even on
// their last attempt. The request here is on attempt 2 of 2 (a first
// worker was SIGKILLed while running it); SIGTERM cuts its batch off.
// (Until f71501d the worker took the cancelled call for an engine failure
// and dead-lettered the request as max_attempts, with an error result.)
func TestDrainCutOffOnLastAttempt(t *testing.T) {
	t.Parallel()
	eng := newFakeEngine(t)
	eng.setDelay(time.Minute)
	q := names(t)
	opts := workerOpts{queue: q, engineURL: eng.URL(), env: []string{"SOUS_DRAIN_TIMEOUT=2s", "SOUS_MAX_ATTEMPTS=2", "SOUS_LOG_LEVEL=info"}}
	w := startWorker(t, opts)
	l := watch(t, sharedURL, q)
	c := newClient(t, sharedURL)
	ids := c.publishRequests(q, "last", 1)
	waitUntil(t, 30*time.Second, "attempt 1 on the engine", func() bool { return eng.calls.Load() >= 1 && eng.inflight.Load() >= 1 })
	w.Kill()
	w = startWorker(t, opts)
	waitUntil(t, 30*time.Second, "attempt 2 on the engine", func() bool { return eng.calls.Load() >= 2 && eng.inflight.Load() >= 1 })
	if err := w.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := w.ExitCode(t, 20*time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
	time.Sleep(500 * time.Millisecond)
	queued := len(c.drain(q))
	for _, d := range l.deadLetters(ids[0]) {
		t.Errorf("dead-lettered on shutdown (reason %q, attempt %v): a batch the drain cut off must go back to the queue, whatever its attempt",
			deadReason(d), d.Headers["x-sous-attempts"])
	}
	if r, ok := l.errorResult(ids[0]); ok {
		t.Errorf("the producer got an error result for a request the worker merely stopped: %+v", r.Error)
	}
	if queued != 1 {
		t.Errorf("%d copies back in the queue, want 1", queued)
	}
}
