package reliability

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestConsumerTimeout runs a hanging engine against a private node whose
// consumer_timeout is 4s (checked every 500ms; RabbitMQ 3.10's default is
// 30 min, checked every minute).
//
// Within the limit (SOUS_ENGINE_TIMEOUT=800ms + 200ms backoff + 20ms
// batch window is under 4s; requests wait at most half the rest for a slot) the worker cuts each engine
// call, requeues, and dead-letters after SOUS_MAX_ATTEMPTS with its own
// reason; the broker never closes its channel.
//
// Beyond it (SOUS_ENGINE_TIMEOUT=20s, the check disabled with
// SOUS_AMQP_CONSUMER_TIMEOUT=0), the broker closes the worker's channel
// with PRECONDITION_FAILED after 4s, the worker reconnects, the message
// comes back, and the cycle repeats until the broker's own delivery limit
// dead-letters it without a reason: nothing is lost, but every cycle
// wastes an engine call and the producer gets no error result. That is why
// the worker refuses to start when worker.HoldBound does not fit in
// SOUS_AMQP_CONSUMER_TIMEOUT (TestConsumerTimeoutEnforced).
func TestConsumerTimeout(t *testing.T) {
	t.Parallel()
	node := startNode(t, nodeOptions{
		conf:     []string{"consumer_timeout = 4000"},
		advanced: []string{"{channel_tick_interval, 500}"},
	})
	tests := []struct {
		name          string
		engineTimeout string
		// consumerTimeout is what the worker is told of the broker's.
		consumerTimeout string
		within          bool
	}{
		{name: "within", engineTimeout: "800ms", consumerTimeout: "4s", within: true},
		{name: "beyond", engineTimeout: "20s", consumerTimeout: "0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			eng := newFakeEngine(t)
			eng.hang.Store(true)
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, brokerURL: node.URL(), engineURL: eng.URL(), env: []string{
				"SOUS_ENGINE_TIMEOUT=" + tt.engineTimeout, "SOUS_MAX_ATTEMPTS=3",
				"SOUS_AMQP_CONSUMER_TIMEOUT=" + tt.consumerTimeout, "SOUS_LOG_LEVEL=info"}})
			l := watch(t, node.URL(), q)
			c := newClient(t, node.URL())
			start := time.Now()
			ids := c.publishRequests(q, "t", 1)
			tl := l.waitSettled(t, ids, 90*time.Second)
			checkNoLoss(t, tl)
			figure(t, "dead_letter_after_s", fmt.Sprintf("%.1f", time.Since(start).Seconds()))
			figure(t, "engine_calls", eng.calls.Load())
			logs := w.Logs()
			closed := strings.Count(logs, "delivery acknowledgement")
			figure(t, "channels_closed_by_broker", closed)
			ds := l.deadLetters(ids[0])
			if len(ds) == 0 {
				t.Fatalf("not dead-lettered: %s", tl)
			}
			figure(t, "dead_letter_reason", fmt.Sprintf("%q", deadReason(ds[0])))
			if tt.within {
				if closed > 0 || strings.Contains(logs, "broker reconnected") {
					t.Errorf("the broker closed the worker's channel although SOUS_ENGINE_TIMEOUT is within consumer_timeout")
				}
				if deadReason(ds[0]) != "max_attempts" {
					t.Errorf("dead-letter reason %q, want max_attempts", deadReason(ds[0]))
				}
				return
			}
			if closed == 0 {
				t.Errorf("the broker never closed the channel: the test does not show what it means to")
			}
		})
	}
}

// TestConsumerTimeoutEnforced: the worker refuses to start, with exit code
// 2 and a message naming SOUS_ENGINE_TIMEOUT, when a delivery could outlive
// the broker's consumer_timeout (SOUS_AMQP_CONSUMER_TIMEOUT).
func TestConsumerTimeoutEnforced(t *testing.T) {
	t.Parallel()
	tests := []struct {
		env  []string
		want int
	}{
		{[]string{"SOUS_AMQP_CONSUMER_TIMEOUT=4s", "SOUS_ENGINE_TIMEOUT=20s"}, 2},
		{[]string{"SOUS_ENGINE_TIMEOUT=29m40s"}, 2},                                                                                      // 30m default: 29m40s + 30s backoff reaches it
		{[]string{"SOUS_AMQP_CONSUMER_TIMEOUT=-1s"}, 2},                                                                                  // not a timeout
		{[]string{"SOUS_AMQP_CONSUMER_TIMEOUT=1h", "SOUS_ENGINE_TIMEOUT=14m"}, 0},                                                        // a broker configured for it
		{[]string{"SOUS_AMQP_CONSUMER_TIMEOUT=0", "SOUS_ENGINE_TIMEOUT=2h"}, 0},                                                          // check off
		{[]string{"SOUS_ENGINE_TIMEOUT=20m"}, 0},                                                                                         // fits; requests wait at most (30m - 20m30s) / 2 for a slot
		{[]string{"SOUS_ENGINE_TIMEOUT=20s", "SOUS_RETRY_BACKOFF=1s", "SOUS_RETRY_BACKOFF_MAX=1m", "SOUS_AMQP_CONSUMER_TIMEOUT=80s"}, 2}, // 20s + 1m reaches 80s
	}
	for _, tt := range tests {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		cmd := exec.CommandContext(ctx, filepath.Join(binDir, "worker"))
		// An address where nothing listens: a valid configuration keeps
		// retrying the broker until the context kills it.
		cmd.Env = append(os.Environ(), "SOUS_MODEL=tiny", "SOUS_AMQP_URL=amqp://u:p@127.0.0.1:1/", "SOUS_HTTP_ADDR=off", "GORACE=atexit_sleep_ms=0")
		cmd.Env = append(cmd.Env, tt.env...)
		out, err := cmd.CombinedOutput()
		cancel()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		switch {
		case tt.want == 2 && code != 2:
			t.Errorf("%v: exit %d, want 2\n%s", tt.env, code, out)
		case tt.want == 2 && !strings.Contains(string(out), "SOUS_ENGINE_TIMEOUT") && !strings.Contains(string(out), "SOUS_AMQP_CONSUMER_TIMEOUT"):
			t.Errorf("%v: the message names neither variable: %s", tt.env, out)
		case tt.want == 0 && code == 2:
			t.Errorf("%v: refused a valid configuration: %s", tt.env, out)
		}
		if tt.want == 2 {
			figure(t, strings.Join(tt.env, " "), strings.TrimSpace(string(out)))
		}
	}
}
