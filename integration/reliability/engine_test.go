package reliability

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/ollamatest"
	"github.com/sous-run/sous/internal/queue"
)

// TestOllamaKilledMidBatch: the real Ollama is SIGKILLed while a batch runs
// on it and brought back a moment later. The batch fails as
// engine_unavailable, is requeued, and every request is answered once the
// engine is back, with the worker's default retry pacing (500ms doubling
// to 30s, 5 attempts).
func TestOllamaKilledMidBatch(t *testing.T) {
	t.Parallel()
	srv := ollamatest.StartT(t, ollamatest.Options{NumParallel: 4})
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, engineURL: srv.URL(), env: []string{
		"SOUS_MODELS_ALLOWED=tiny," + ollamatest.EndlessModelName, "SOUS_MAX_NUM_PREDICT=100000",
		"SOUS_RETRY_BACKOFF=500ms", "SOUS_RETRY_BACKOFF_MAX=30s", "SOUS_BATCH_MAX=4",
	}})
	l := watch(t, sharedURL, q)
	c := newClient(t, sharedURL)
	const n = 8
	var ids []string
	var ms []msg
	for i := range n {
		id := fmt.Sprint("o", i)
		ids = append(ids, id)
		ms = append(ms, msg{id: id, body: `{"prompt":"go on","model":"` + ollamatest.EndlessModelName + `","options":{"num_predict":600}}`})
	}
	must(t, c.publishAll(q, ms))
	waitUntil(t, 60*time.Second, "a request on the engine", func() bool { return strings.Contains(w.Logs(), `"msg":"engine call"`) })
	time.Sleep(300 * time.Millisecond)
	killed := time.Now()
	srv.Kill()
	waitUntil(t, 30*time.Second, "the worker to see the engine fail", func() bool {
		return strings.Contains(w.Logs(), "engine call failed")
	})
	time.Sleep(time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	must(t, srv.Restart(ctx))
	figure(t, "engine_outage_s", fmt.Sprintf("%.1f", time.Since(killed).Seconds()))
	tl := l.waitSettled(t, ids, 3*time.Minute)
	checkNoLoss(t, tl)
	figure(t, "tally", tl)
	if tl.dead+tl.deadAndAns > 0 {
		t.Errorf("%d requests dead-lettered by a short engine outage", tl.dead+tl.deadAndAns)
	}
	if !strings.Contains(w.Logs(), `"action":"requeue"`) {
		t.Errorf("no request was requeued: the kill missed the batch")
	}
}

// TestEngineHangs: an engine that accepts calls and never answers. Each
// call is cut at SOUS_ENGINE_TIMEOUT, the batch requeued, and after
// SOUS_MAX_ATTEMPTS the request is dead-lettered with the reason, with an
// error result to the producer. The worker stays alive and answers again
// as soon as the engine does.
func TestEngineHangs(t *testing.T) {
	t.Parallel()
	eng := newFakeEngine(t)
	eng.hang.Store(true)
	q := names(t)
	w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), env: []string{
		"SOUS_ENGINE_TIMEOUT=1s", "SOUS_MAX_ATTEMPTS=3"}})
	l := watch(t, sharedURL, q)
	c := newClient(t, sharedURL)
	start := time.Now()
	hung := c.publishRequests(q, "h", 4)
	tl := l.waitSettled(t, hung, 60*time.Second)
	figure(t, "dead_letter_after_s", fmt.Sprintf("%.1f", time.Since(start).Seconds()))
	checkNoLoss(t, tl)
	for _, id := range hung {
		ds := l.deadLetters(id)
		if len(ds) != 1 {
			t.Errorf("%s: %d dead letters, want 1", id, len(ds))
			continue
		}
		desc, _ := ds[0].Headers[queue.HeaderDeadLetterDescription].(string)
		if deadReason(ds[0]) != "max_attempts" || !strings.Contains(desc, "engine_timeout") {
			t.Errorf("%s: dead letter reason %q description %q, want max_attempts after engine_timeout", id, deadReason(ds[0]), desc)
		}
		if r, ok := l.errorResult(id); !ok || r.Error == nil || r.Error.Code != "max_attempts" {
			t.Errorf("%s: no max_attempts error result", id)
		}
	}
	if w.Get("/healthz") != 200 {
		t.Fatal("worker not alive after the engine hung")
	}
	eng.hang.Store(false)
	ok := c.publishRequests(q, "ok", 4)
	tl = l.waitSettled(t, ok, 30*time.Second)
	if tl.answered != len(ok) {
		t.Errorf("after the engine recovered: %s", tl)
	}
	for _, id := range ok {
		if _, bad := l.errorResult(id); bad {
			t.Errorf("%s answered with an error after the engine recovered", id)
		}
	}
}

// TestEngineOutageDeadLetters measures what an engine outage costs with
// the worker's defaults (SOUS_RETRY_BACKOFF=500ms doubling to 30s,
// SOUS_MAX_ATTEMPTS=5): every failed batch spends an attempt of each of its
// requests, so requests are dead-lettered as max_attempts although nothing
// is wrong with them. Under light load (one request) the fifth failure
// comes 0.5+1+2+4 = 7.5s into the outage; under load the failures spread
// over more requests. Nothing is lost: each request is answered or
// dead-lettered. The figures are what docs/reliability.md quotes.
func TestEngineOutageDeadLetters(t *testing.T) {
	t.Parallel()
	const outage = 12 * time.Second
	for _, n := range []int{1, 32} {
		t.Run(fmt.Sprintf("requests=%d", n), func(t *testing.T) {
			t.Parallel()
			eng := newFakeEngine(t)
			eng.status.Store(500)
			q := names(t)
			w := startWorker(t, workerOpts{queue: q, engineURL: eng.URL(), probe: "/healthz", env: []string{
				"SOUS_RETRY_BACKOFF=500ms", "SOUS_RETRY_BACKOFF_MAX=30s", "SOUS_MAX_ATTEMPTS=5", "SOUS_LOG_LEVEL=info"}})
			l := watch(t, sharedURL, q)
			c := newClient(t, sharedURL)
			// /healthz answers before the queues are declared.
			waitUntil(t, 30*time.Second, "the worker to open the broker", func() bool { return strings.Contains(w.Logs(), "ready to work") })
			ids := c.publishRequests(q, "u", n)
			time.Sleep(outage)
			eng.status.Store(0)
			tl := l.waitSettled(t, ids, 90*time.Second)
			checkNoLoss(t, tl)
			figure(t, "outage_s", outage.Seconds())
			figure(t, "tally", tl)
			figure(t, "dead_lettered_by_outage", tl.dead+tl.deadAndAns)
		})
	}
}
