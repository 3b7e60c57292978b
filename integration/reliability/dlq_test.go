package reliability

import (
	"fmt"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/sous-run/sous/internal/wire"
)

// TestDeadLetterQueueDeleted deletes the dead-letter queue under a running
// worker (the defaults, but SOUS_MAX_ATTEMPTS=2), then publishes 10
// malformed and 10 valid requests, interleaved. Before, the valid ones
// waited behind each malformed one's settle (none answered within 150 s),
// and past the delivery limit the broker dropped the malformed ones.
//
// "declare" (SOUS_DECLARE=true, the default): the worker declares the
// dead-letter queue again; the malformed requests land there, each with one
// error result; the valid ones are answered.
//
// "operator's queues" (SOUS_DECLARE=false): dead-lettering fails until the
// test declares the queue again, as an operator would. The valid ones are
// answered; the malformed ones stay in the request queue (the worker takes
// no new work while the pause after each failure lasts, and /readyz says
// why), each with one error result, and reach the dead-letter queue once
// it is back.
func TestDeadLetterQueueDeleted(t *testing.T) {
	t.Parallel()
	for _, declare := range []bool{true, false} {
		name := map[bool]string{true: "declare", false: "operator's queues"}[declare]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			eng := newFakeEngine(t)
			q := names(t)
			c := newClient(t, sharedURL)
			if !declare {
				c.declare(q+".dlq", q+".results")
				if _, err := c.ch.QueueDeclare(q, true, false, false, false, amqp.Table{"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": q + ".dlq"}); err != nil {
					t.Fatal(err)
				}
			}
			w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), env: []string{
				"SOUS_MAX_ATTEMPTS=2", "SOUS_DECLARE=" + fmt.Sprint(declare), "SOUS_LOG_LEVEL=info",
				// the defaults, which the helper shortens
				"SOUS_RETRY_BACKOFF=500ms", "SOUS_RETRY_BACKOFF_MAX=30s"}})
			// Results only: a follower of the dead-letter queue would
			// declare it again itself.
			l := newLedger()
			l.follow(t, sharedURL, q+".results", "results", nil)
			if _, err := c.ch.QueueDelete(q+".dlq", false, false, false); err != nil {
				t.Fatal(err)
			}
			var bad, good []string
			var ms []msg
			for i := range 10 {
				b, g := fmt.Sprint("bad", i), fmt.Sprint("good", i)
				bad, good = append(bad, b), append(good, g)
				ms = append(ms, msg{id: b, body: `{"prompt": not json`}, msg{id: g, body: request(g)})
			}
			start := time.Now()
			if err := c.publishAll(q, ms); err != nil {
				t.Fatal(err)
			}
			tl := l.waitSettled(t, good, 120*time.Second)
			figure(t, "valid_answered", fmt.Sprintf("%d of %d in %.1fs", tl.answered, len(good), time.Since(start).Seconds()))
			if tl.answered != len(good) || tl.duplicates > 0 || len(tl.wrong) > 0 {
				t.Errorf("valid requests: %s", tl)
			}
			if !declare {
				// Kept in the request queue while the dead-letter queue is
				// missing; the worker says why it is not ready.
				waitUntil(t, 120*time.Second, "the malformed requests back in the request queue", func() bool { return c.depth(q) == len(bad) })
				figure(t, "malformed_in_request_queue_while_dlq_missing", c.depth(q))
				code, body := w.GetBody("/readyz")
				figure(t, "readyz", fmt.Sprintf("%d %s", code, strings.TrimSpace(body)))
				if code == 200 || !strings.Contains(body, "dead-lettering fails") {
					t.Errorf("/readyz %d %q while dead-lettering fails", code, body)
				}
				c.declare(q + ".dlq") // the operator brings it back
			}
			dead := map[string]int{}
			waitUntil(t, 120*time.Second, "every malformed request in the dead-letter queue", func() bool {
				for _, d := range c.drain(q + ".dlq") {
					dead[d.MessageId]++
				}
				return len(dead) == len(bad)
			})
			figure(t, "malformed_dead_lettered", fmt.Sprintf("%d of %d after %.1fs", len(dead), len(bad), time.Since(start).Seconds()))
			errResults, extra := 0, 0
			for _, id := range bad {
				if dead[id] != 1 {
					t.Errorf("%s dead-lettered %d times", id, dead[id])
				}
				n := l.resultCount(id)
				errResults += min(n, 1)
				extra += max(0, n-1)
				if r, ok := l.errorResult(id); !ok || r.Status != wire.StatusError {
					t.Errorf("%s: no error result", id)
				}
			}
			figure(t, "error_results", fmt.Sprintf("%d for %d malformed requests (%d beyond one each)", errResults, len(bad), extra))
			if extra > 0 {
				t.Errorf("%d error results beyond one per request", extra)
			}
			if n := c.depth(q); n != 0 {
				t.Errorf("%d requests left in the request queue", n)
			}
			if !declare {
				figure(t, "dead_letter_failures_logged", strings.Count(w.Logs(), "dead-lettering failed"))
			} else {
				figure(t, "dead_letter_queue_declared_again", strings.Count(w.Logs(), "declared it again"))
			}
		})
	}
}
