package worker_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func replyTo(to string) func(*queue.Delivery) { return func(d *queue.Delivery) { d.ReplyTo = to } }
func attempt(n int) func(*queue.Delivery)     { return func(d *queue.Delivery) { d.Attempt = n } }

func TestResultPublishedBeforeAck(t *testing.T) {
	t.Parallel()
	h := setup(t, worker.Config{}, &fakeEngine{})
	h.b.Send("m1", `{"prompt":"hello"}`, replyTo("amq.rabbitmq.reply-to.abc"))
	h.b.Send("m2", `{"messages":[{"role":"user","content":"hi"}]}`)
	h.b.WaitSettled(t, 2)
	h.stop(t)
	events := h.b.Events()
	for _, id := range []string{"m1", "m2"} {
		pub := slices.IndexFunc(events, func(e string) bool { return strings.HasPrefix(e, "publish:") && strings.HasSuffix(e, ":"+id) })
		ack := slices.Index(events, "ack:"+id+":")
		if pub < 0 || ack < 0 || pub > ack {
			t.Fatalf("%s: want publish before ack, events %v", id, events)
		}
	}
	if !slices.Contains(events, "publish:amq.rabbitmq.reply-to.abc:m1") || !slices.Contains(events, "publish:results:m2") {
		t.Fatalf("results not routed to reply_to / results queue: %v", events)
	}
	res := results(t, h.b)
	if r := res["m1"]; r.Status != wire.StatusOK || r.Response == nil || *r.Response != "echo: hello" || r.ID != "m1" || r.Worker != "w-test" || r.Batch == nil || r.Usage.OutputTokens != 2 {
		t.Fatalf("prompt result: %+v", r)
	}
	if r := res["m2"]; r.Message == nil || r.Message.Role != "assistant" {
		t.Fatalf("chat result: %+v", r)
	}
}

func TestBadInputDeadLettersWithoutHurtingBatchMates(t *testing.T) {
	t.Parallel()
	h := setup(t, worker.Config{}, &fakeEngine{})
	bad := map[string]string{
		"notjson":  `nope`,
		"badopt":   `{"prompt":"x","options":{"num_predict":"many"}}`,
		"noprompt": `{"model":"tiny"}`,
		"model":    `{"prompt":"x","model":"forbidden"}`,
		"utf8":     "{\"prompt\":\"\xff\"}",
		"expired":  `{"prompt":"x","deadline":"2001-01-01T00:00:00Z"}`,
	}
	for id, body := range bad {
		h.b.Send(id, body, replyTo("replies"))
	}
	h.b.Send("good", `{"prompt":"fine"}`)
	h.b.WaitSettled(t, len(bad)+1)
	for id := range bad {
		s, _ := h.b.Settlement(id)
		if s.Action != queue.DeadLetter || s.Reason == "" || s.Description == "" {
			t.Errorf("%s: settlement %+v, want dead-letter with a reason", id, s)
		}
	}
	if s, _ := h.b.Settlement("good"); s.Action != queue.Ack {
		t.Errorf("good message: %+v", s)
	}
	res := results(t, h.b)
	if r := res["badopt"]; r.Status != wire.StatusError || r.Error == nil || r.Error.Code != wire.ReasonInvalidOption {
		t.Errorf("error result for bad option: %+v", r)
	}
	if r := res["model"]; r.Error == nil || r.Error.Code != wire.ReasonModelNotAllowed {
		t.Errorf("error result for model: %+v", r)
	}
}

func TestRetryableThenMaxAttempts(t *testing.T) {
	t.Parallel()
	down := &inference.Error{Kind: inference.Retryable, Code: "engine_unavailable", Err: errors.New("connection refused")}
	e := &fakeEngine{answer: func([]inference.Request) ([]inference.Result, error) { return nil, down }}
	h := setup(t, worker.Config{MaxAttempts: 3}, e)
	h.b.Send("early", `{"prompt":"x"}`, attempt(2))
	h.b.Send("last", `{"prompt":"x"}`, attempt(3), replyTo("replies"))
	h.b.WaitSettled(t, 2)
	if s, _ := h.b.Settlement("early"); s.Action != queue.Requeue || s.Reason != "engine_unavailable" {
		t.Errorf("attempt 2 of 3: %+v, want requeue", s)
	}
	if s, _ := h.b.Settlement("last"); s.Action != queue.DeadLetter || s.Reason != "max_attempts" || !strings.Contains(s.Description, "engine_unavailable") {
		t.Errorf("attempt 3 of 3: %+v, want dead-letter max_attempts", s)
	}
	if r := results(t, h.b)["last"]; r.Error == nil || r.Error.Code != "max_attempts" {
		t.Errorf("no error result after the last attempt: %+v", r)
	}
	if _, ok := results(t, h.b)["early"]; ok {
		t.Error("a requeued request got a result")
	}
}

func TestPermanentEngineError(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{answer: func(reqs []inference.Request) ([]inference.Result, error) {
		out := make([]inference.Result, len(reqs))
		for i := range out {
			out[i].Err = &inference.Error{Kind: inference.Permanent, Code: "model_not_found", Status: 404, Err: errors.New(`model "tiny" not found`)}
		}
		return out, nil
	}}
	h := setup(t, worker.Config{}, e)
	// A model the request chose itself: the request's error, not the
	// worker's (TestMissingDefaultModelIsTheWorkersFault has the other).
	h.b.Send("m", `{"prompt":"x","model":"other"}`)
	h.b.WaitSettled(t, 1)
	if s, _ := h.b.Settlement("m"); s.Action != queue.DeadLetter || s.Reason != "model_not_found" {
		t.Fatalf("%+v", s)
	}
}

func TestPublishFailureRequeuesNeverAcks(t *testing.T) {
	t.Parallel()
	h := setup(t, worker.Config{}, &fakeEngine{})
	h.b.SetPublishHook(func(queue.Message) error { return errors.New("broker nacked") })
	h.b.Send("m", `{"prompt":"x"}`)
	h.b.WaitSettled(t, 1)
	if s, _ := h.b.Settlement("m"); s.Action != queue.Requeue || s.Reason != "publish_failed" {
		t.Fatalf("%+v, want requeue", s)
	}
}

// TestNextBatchRunsWhileResultsAreConfirmed: a batch leaves the engine
// before its results are confirmed, and the window (worker.Capacity) has
// room for that third stage, so slow confirmations neither idle the engine
// nor stop the worker from receiving.
func TestNextBatchRunsWhileResultsAreConfirmed(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{}
	h := setupSized(t, worker.Config{}, e, e, 1) // from the start: no window of 4 × 3
	confirm := make(chan struct{})
	release := sync.OnceFunc(func() { close(confirm) })
	t.Cleanup(release) // before the worker's own cleanup stops it
	h.b.SetPublishHook(func(queue.Message) error { <-confirm; return nil })
	for _, id := range []string{"a", "b", "c", "d"} {
		h.b.Send(id, `{"prompt":"x"}`)
	}
	// Every result waits for its confirm, yet each request ran on the
	// engine (limit 1) as soon as the one before it answered: the window
	// (Capacity(1) = 33) has room for what is being confirmed.
	waitFor(t, func() bool { return len(e.sizes()) == 4 && h.w.InFlight() == 4 })
	if got := h.b.SettledCount(); got != 0 {
		t.Fatalf("%d settled before any result was confirmed", got)
	}
	release()
	h.b.WaitSettled(t, 4)
	if n := len(e.sizes()); n != 4 {
		t.Fatalf("%d engine calls, want 4", n)
	}
}

func TestShutdownRequeuesWaitingAndFinishesRunning(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{block: make(chan struct{})}
	h := setup(t, worker.Config{BatchWait: time.Hour, DrainTimeout: 5 * time.Second}, e)
	h.s.set(1) // one on the engine: the second waits
	h.b.Send("running", `{"prompt":"x"}`)
	waitFor(t, func() bool { return len(e.sizes()) == 1 })
	h.b.Send("waiting", `{"prompt":"x"}`)
	waitFor(t, func() bool { return h.w.InFlight() == 2 })
	h.cancel()
	waitFor(t, func() bool { _, ok := h.b.Settlement("waiting"); return ok })
	if s, _ := h.b.Settlement("waiting"); s.Action != queue.Requeue || s.Reason != "shutdown" {
		t.Fatalf("waiting item: %+v, want requeue", s)
	}
	close(e.block) // the running batch finishes within the drain budget
	h.stop(t)
	if s, _ := h.b.Settlement("running"); s.Action != queue.Ack {
		t.Fatalf("running item: %+v, want ack", s)
	}
}

func TestDrainTimeoutRequeuesRunning(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{block: make(chan struct{})} // never released
	h := setup(t, worker.Config{DrainTimeout: 100 * time.Millisecond}, e)
	h.b.Send("stuck", `{"prompt":"x"}`)
	waitFor(t, func() bool { return len(e.sizes()) == 1 })
	h.stop(t)
	if s, _ := h.b.Settlement("stuck"); s.Action != queue.Requeue {
		t.Fatalf("stuck item: %+v, want requeue after the drain timeout", s)
	}
}

func TestEnginePanicDoesNotStopWorker(t *testing.T) {
	t.Parallel()
	calls := 0
	e := &fakeEngine{}
	e.answer = func(reqs []inference.Request) ([]inference.Result, error) {
		calls++
		if calls == 1 {
			panic("driver bug")
		}
		return []inference.Result{{Response: inference.Response{Text: "fine"}}}, nil
	}
	h := setup(t, worker.Config{}, e)
	h.b.Send("boom", `{"prompt":"x"}`)
	h.b.WaitSettled(t, 1)
	h.b.Send("next", `{"prompt":"y"}`)
	h.b.WaitSettled(t, 2)
	if s, _ := h.b.Settlement("boom"); s.Action != queue.Requeue {
		t.Errorf("panicking batch: %+v, want requeue", s)
	}
	if s, _ := h.b.Settlement("next"); s.Action != queue.Ack {
		t.Errorf("next: %+v, want ack", s)
	}
}

func TestStreamingChunksThenResult(t *testing.T) {
	t.Parallel()
	h := setup(t, worker.Config{StreamBytes: 1}, &fakeEngine{})
	h.b.Send("s", `{"prompt":"abc","stream":true}`, replyTo("replies"), attempt(2))
	h.b.WaitSettled(t, 1)
	published := h.b.Published()
	var text strings.Builder
	var chunks []wire.Chunk
	for _, m := range published[:len(published)-1] {
		var c wire.Chunk
		if err := jsonUnmarshal(m.Body, &c); err != nil || m.CorrelationID != "s" {
			t.Fatalf("bad chunk %s: %v", m.Body, err)
		}
		chunks = append(chunks, c)
		text.WriteString(c.Delta)
	}
	if len(chunks) != 3 || text.String() != "echo: abc" || !chunks[0].Restart || chunks[1].Restart || chunks[2].Seq != 2 {
		t.Fatalf("chunks %+v", chunks)
	}
	var final wire.Result
	_ = jsonUnmarshal(published[len(published)-1].Body, &final)
	if final.Done == nil || !*final.Done || *final.Response != "echo: abc" {
		t.Fatalf("final %+v", final)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	// Generous: only a failing run waits this long, and a loaded machine
	// must not turn a slow pass into a failure.
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 30s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// staleBroker reports every delivery's lock as lost.
type staleBroker struct{ *queuetest.MemBroker }

func (staleBroker) Stale(*queue.Delivery) bool { return true }

func TestLostLockIsNotAnswered(t *testing.T) {
	t.Parallel()
	b := queuetest.NewMemBroker()
	w := worker.New(worker.Config{ResultsQueue: "results", Limits: wire.Limits{MaxBodyBytes: 1024, DefaultModel: "tiny"}}, staleBroker{b}, &fakeEngine{}, &fixedSizer{size: 1}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	b.Send("m", `{"prompt":"x"}`)
	b.WaitSettled(t, 1)
	cancel()
	<-done
	if s, _ := b.Settlement("m"); s.Action != queue.Requeue || s.Reason != "lock_lost" {
		t.Fatalf("%+v", s)
	}
	if len(results(t, b)) != 0 {
		t.Fatal("a result was published for a delivery whose lock was lost")
	}
}

// TestLostLockSendsNoChunks: a stream whose delivery lost its lock sends
// no chunks, as it sends no result: the redelivered copy streams instead
// (chunks used to go out without the check results get).
func TestLostLockSendsNoChunks(t *testing.T) {
	t.Parallel()
	b := queuetest.NewMemBroker()
	w := worker.New(worker.Config{ResultsQueue: "results", StreamBytes: 1, Limits: wire.Limits{MaxBodyBytes: 1024, DefaultModel: "tiny"}}, staleBroker{b}, &fakeEngine{}, &fixedSizer{size: 1}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	b.Send("s", `{"prompt":"abc","stream":true}`, replyTo("replies"))
	b.WaitSettled(t, 1)
	cancel()
	<-done
	if s, _ := b.Settlement("s"); s.Action != queue.Requeue || s.Reason != "lock_lost" {
		t.Fatalf("%+v", s)
	}
	if p := b.Published(); len(p) != 0 {
		t.Fatalf("%d messages published for a delivery whose lock was lost (first: %s %s)", len(p), p[0].Headers["x-sous-status"], p[0].Body)
	}
}

func TestPermanentBatchErrorFindsTheCulprit(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{block: make(chan struct{}), list: true}
	e.answer = func(reqs []inference.Request) ([]inference.Result, error) {
		for _, r := range reqs {
			if r.Prompt == "too long" {
				return nil, &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Status: 400, Err: errors.New("input exceeds the context")}
			}
		}
		out := make([]inference.Result, len(reqs))
		for i := range out {
			out[i].Response.Text = "ok"
		}
		return out, nil
	}
	h := setup(t, worker.Config{BatchWait: time.Hour}, e)
	h.s.set(8)
	h.b.Send("first", `{"prompt":"x"}`)
	waitFor(t, func() bool { return len(e.sizes()) == 1 })
	for _, id := range []string{"a", "b", "c"} {
		h.b.Send(id, `{"prompt":"fine"}`)
	}
	h.b.Send("bad", `{"prompt":"too long"}`)
	waitFor(t, func() bool { return h.w.InFlight() == 5 })
	close(e.block)
	h.b.WaitSettled(t, 5)
	for _, id := range []string{"a", "b", "c"} {
		if s, _ := h.b.Settlement(id); s.Action != queue.Ack {
			t.Errorf("%s: %+v, want ack: a batch-mate's bad input must not sink it", id, s)
		}
	}
	if s, _ := h.b.Settlement("bad"); s.Action != queue.DeadLetter || s.Reason != "engine_rejected" {
		t.Errorf("bad: %+v", s)
	}
}

func TestDrainCancelOnTheLastAttemptRequeues(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{block: make(chan struct{})} // never released: the drain deadline cancels it
	h := setup(t, worker.Config{DrainTimeout: 50 * time.Millisecond, MaxAttempts: 3}, e)
	h.b.Send("last", `{"prompt":"x"}`, attempt(3), replyTo("replies"))
	waitFor(t, func() bool { return len(e.sizes()) == 1 })
	h.stop(t)
	if s, _ := h.b.Settlement("last"); s.Action != queue.Requeue || s.Reason != queue.ReasonShutdown {
		t.Fatalf("%+v: a shutdown is not the engine failing; want a requeue", s)
	}
	if len(results(t, h.b)) != 0 {
		t.Fatal("an error result was sent for a request cut off by shutdown")
	}
}

func TestGoneReplyQueueIsNotRetried(t *testing.T) {
	t.Parallel()
	h := setup(t, worker.Config{}, &fakeEngine{})
	h.b.SetPublishHook(func(m queue.Message) error {
		if m.To == "gone" || m.To == "results" { // the results queue is missing too
			return fmt.Errorf("publish: %w", queue.ErrUnroutable)
		}
		return nil
	})
	h.b.Send("m", `{"prompt":"x"}`, replyTo("gone"))
	h.b.Send("n", `{"prompt":"x"}`)
	h.b.WaitSettled(t, 2)
	if s, _ := h.b.Settlement("m"); s.Action != queue.Ack {
		t.Errorf("result for a vanished requester: %+v, want ack", s)
	}
	if s, _ := h.b.Settlement("n"); s.Action != queue.Requeue || s.Reason != "publish_failed" {
		t.Errorf("missing results queue: %+v, want requeue", s)
	}
}

func TestLongCorrelationIDGetsABoundedResultID(t *testing.T) {
	t.Parallel()
	h := setup(t, worker.Config{}, &fakeEngine{})
	long := strings.Repeat("c", 255)
	h.b.Send("m", `{"prompt":"x"}`, func(d *queue.Delivery) { d.CorrelationID = long })
	h.b.WaitSettled(t, 1)
	if m := h.b.Published()[0]; len(m.MessageID) > 255 || m.CorrelationID != long {
		t.Fatalf("message id %d bytes, correlation kept: %v", len(m.MessageID), m.CorrelationID == long)
	}
}
