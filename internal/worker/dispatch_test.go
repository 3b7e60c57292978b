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
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// gateEngine answers each request by its prompt: "wait:NAME" blocks until
// open(NAME), anything else answers at once. It takes one request per call,
// like Ollama's /api/generate. With room set, more than room requests at
// once are refused as out of memory. With down set, it does not answer
// (Ping fails, calls are refused before they reach it).
type gateEngine struct {
	mu      sync.Mutex
	gates   map[string]chan struct{}
	started []string
	on      int
	peak    int
	calls   int
	room    int
	down    atomic.Bool
	refused atomic.Int64 // overloads answered
}

func newGateEngine() *gateEngine { return &gateEngine{gates: map[string]chan struct{}{}} }

func (e *gateEngine) gate(name string) chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	g, ok := e.gates[name]
	if !ok {
		g = make(chan struct{})
		e.gates[name] = g
	}
	return g
}

func (e *gateEngine) open(name string) { close(e.gate(name)) }

var errRefused = &inference.Error{Kind: inference.Retryable, Code: "engine_unavailable", NotRun: true,
	Err: &netDialError{}}

type netDialError struct{}

func (netDialError) Error() string { return "dial tcp 127.0.0.1:11434: connect: connection refused" }
func (netDialError) Unwrap() error { return syscall.ECONNREFUSED }

func (e *gateEngine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if len(reqs) != 1 {
		return nil, fmt.Errorf("gateEngine got a list of %d", len(reqs))
	}
	if e.down.Load() {
		return nil, errRefused
	}
	p := reqs[0].Prompt
	e.mu.Lock()
	e.calls++
	if e.room > 0 && e.on >= e.room {
		e.mu.Unlock()
		e.refused.Add(1)
		return nil, &inference.Error{Kind: inference.Overloaded, Code: "out_of_memory", Err: errors.New("cuda out of memory")}
	}
	e.on++
	e.peak = max(e.peak, e.on)
	e.started = append(e.started, p)
	e.mu.Unlock()
	defer func() { e.mu.Lock(); e.on--; e.mu.Unlock() }()
	if name, ok := strings.CutPrefix(p, "wait:"); ok {
		select {
		case <-e.gate(name):
		case <-ctx.Done():
			return nil, &inference.Error{Kind: inference.Retryable, Code: "canceled", Err: ctx.Err()}
		}
	}
	return []inference.Result{{Response: inference.Response{Text: "answer to " + p, DoneReason: "stop"}}}, nil
}

func (e *gateEngine) Ping(context.Context) error {
	if e.down.Load() {
		return errors.New("connection refused")
	}
	return nil
}

func (e *gateEngine) TakesList(inference.Kind) bool { return false }

func (e *gateEngine) snapshot() (started []string, peak, calls int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.started...), e.peak, e.calls
}

func startWorker(t *testing.T, cfg worker.Config, b worker.Broker, eng worker.Engine, limit int) (*worker.Worker, *fixedSizer, func()) {
	t.Helper()
	if cfg.Limits.MaxBodyBytes == 0 {
		cfg.Limits = wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny", "other"}}
	}
	cfg.ResultsQueue, cfg.WorkerID = "results", "w-test"
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff = time.Millisecond
	}
	s := &fixedSizer{size: limit}
	w := worker.New(cfg, b, eng, s, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("worker did not stop")
		}
	})
	t.Cleanup(stop)
	return w, s, stop
}

// TestRequestsGoTheMomentASlotFrees: with two slots, one long answer does
// not hold the other slot's queue back: short requests run one after the
// other beside it (the old batcher sent the four as one batch, or waited
// for the long one to end).
func TestRequestsGoTheMomentASlotFrees(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	startWorker(t, worker.Config{}, b, e, 2)
	b.Send("long", `{"prompt":"wait:long"}`)
	for i := range 5 {
		b.Send(fmt.Sprint("short-", i), `{"prompt":"short"}`)
	}
	b.WaitSettled(t, 5) // every short one, while the long one still runs
	if _, ok := b.Settlement("long"); ok {
		t.Fatal("the long request settled before it was let go")
	}
	e.open("long")
	b.WaitSettled(t, 6)
	for i := range 5 {
		if s, _ := b.Settlement(fmt.Sprint("short-", i)); s.Action != queue.Ack {
			t.Errorf("short-%d: %+v", i, s)
		}
	}
	if _, peak, calls := e.snapshot(); peak > 2 || calls != 6 {
		t.Fatalf("peak %d requests on the engine (limit 2), %d calls (want 6: one per request)", peak, calls)
	}
}

// TestWindowIsCapacity: with the engine stuck, a worker holds
// Capacity(limit) deliveries: limit on the engine, the rest waiting.
func TestWindowIsCapacity(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	w, _, _ := startWorker(t, worker.Config{}, b, e, 2)
	for i := range 50 {
		b.Send(fmt.Sprint("m", i), `{"prompt":"wait:all"}`)
	}
	waitFor(t, func() bool { return w.InFlight() == worker.Capacity(2) && w.OnEngine() == 2 })
	time.Sleep(20 * time.Millisecond) // nothing more may come in
	if w.InFlight() != 34 || w.OnEngine() != 2 {
		t.Fatalf("in flight %d, on engine %d; want 34 and 2", w.InFlight(), w.OnEngine())
	}
	e.open("all")
	b.WaitSettled(t, 50)
}

func TestCapacityAndHoldBound(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ limit, want int }{{0, 33}, {1, 33}, {4, 36}, {16, 48}, {32, 96}, {4096, 12288}, {30000, worker.MaxPrefetch}} {
		if got := worker.Capacity(tt.limit); got != tt.want {
			t.Errorf("Capacity(%d) = %d, want %d", tt.limit, got, tt.want)
		}
	}
	if got := worker.HoldBound(12*time.Minute, 5*time.Minute, 30*time.Second, 20*time.Millisecond); got != 17*time.Minute+31*time.Second+20*time.Millisecond { // the engine timeout's bound ends up to 1s late
		t.Errorf("HoldBound = %s", got)
	}
}

// TestOverloadIsRetriedHereWithoutAnAttempt: an engine that runs out of
// room at 2 of the 4 requests sous sends. The refused ones are not run, so
// they spend no attempt: they wait in the worker for room, the limit
// halves, and every request is answered on its first delivery.
func TestOverloadIsRetriedHereWithoutAnAttempt(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	e.room = 2
	b := queuetest.NewMemBroker()
	_, s, _ := startWorker(t, worker.Config{}, b, e, 4)
	for i := range 4 {
		b.Send(fmt.Sprint("m", i), `{"prompt":"wait:g"}`)
	}
	waitFor(t, func() bool { return e.refused.Load() >= 1 })
	e.open("g")
	b.WaitSettled(t, 4)
	for i := range 4 {
		if st, _ := b.Settlement(fmt.Sprint("m", i)); st.Action != queue.Ack {
			t.Errorf("m%d: %+v, want ack on the first delivery", i, st)
		}
	}
	if s.overloadCount() == 0 || s.Size() > 2 {
		t.Errorf("sizer: %d overloads, limit %d; want the limit halved", s.overloadCount(), s.Size())
	}
	if _, peak, _ := e.snapshot(); peak > 2 {
		t.Errorf("peak %d on an engine with room for 2", peak)
	}
}

// TestOverloadSpendsAttemptsOnAClock: an engine that never has room. The
// request is retried here with a growing pause, then goes back to the queue
// with an attempt counted, never in a hot loop (it took 362 µs for five
// attempts and a dead letter before).
func TestOverloadSpendsAttemptsOnAClock(t *testing.T) {
	t.Parallel()
	full := &alwaysFull{}
	b := queuetest.NewMemBroker()
	start := time.Now()
	startWorker(t, worker.Config{MaxAttempts: 5, RetryBackoff: 4 * time.Millisecond, RetryBackoffMax: time.Second}, b, full, 4)
	b.Send("m", `{"prompt":"x"}`, attempt(5))
	b.WaitSettled(t, 1)
	took := time.Since(start)
	st, _ := b.Settlement("m")
	if st.Action != queue.DeadLetter || st.Reason != "max_attempts" {
		t.Fatalf("%+v, want dead-letter after its last attempt", st)
	}
	// 1 + 5 local tries, paused 4, 8, 16, 32, 64 ms between them.
	if calls := full.calls.Load(); calls != 6 {
		t.Errorf("%d engine calls, want 6", calls)
	}
	if took < 124*time.Millisecond {
		t.Errorf("took %s: the retries were not paced", took)
	}
}

type alwaysFull struct{ calls atomic.Int64 }

func (a *alwaysFull) Infer(context.Context, []inference.Request) ([]inference.Result, error) {
	a.calls.Add(1)
	return nil, &inference.Error{Kind: inference.Overloaded, Code: "engine_busy", Status: 503, Err: errors.New("server busy")}
}

// TestEngineOutageTakesNoWorkAndCountsNoAttempts: while the engine is down
// the worker takes nothing from the broker, says so on /readyz, and hands
// back what it held with no attempt counted; when the engine answers again
// it takes work again.
func TestEngineOutageTakesNoWorkAndCountsNoAttempts(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	e.down.Store(true)
	b := queuetest.NewMemBroker()
	w, _, _ := startWorker(t, worker.Config{RetryBackoffMax: 10 * time.Millisecond}, b, e, 2)
	for i := range 3 {
		b.Send(fmt.Sprint("early-", i), `{"prompt":"x"}`)
	}
	time.Sleep(50 * time.Millisecond)
	if n := b.SettledCount(); n != 0 || w.InFlight() != 0 {
		t.Fatalf("%d settled, %d in flight while the engine was down from the start; want nothing taken", n, w.InFlight())
	}
	if err := w.Ready(context.Background()); err == nil || !strings.Contains(err.Error(), "engine") {
		t.Fatalf("Ready while the engine is down: %v", err)
	}
	e.down.Store(false)
	b.WaitSettled(t, 3)
	waitFor(t, func() bool { return w.Ready(context.Background()) == nil })

	// Down again, mid-run: the request it was refused for goes back
	// uncounted, and nothing more is taken until it answers.
	e.down.Store(true)
	b.Send("refused", `{"prompt":"x"}`)
	b.WaitSettled(t, 4)
	if st, _ := b.Settlement("refused"); st.Action != queue.Requeue || st.Reason != queue.ReasonEngineDown || queue.Counts(st.Reason) {
		t.Fatalf("refused: %+v, want an uncounted requeue", st)
	}
	b.Send("later", `{"prompt":"x"}`)
	time.Sleep(50 * time.Millisecond)
	if _, ok := b.Settlement("later"); ok {
		t.Fatal("took work while the engine was down")
	}
	e.down.Store(false)
	b.WaitSettled(t, 5)
	if st, _ := b.Settlement("later"); st.Action != queue.Ack {
		t.Fatalf("later: %+v", st)
	}
	if r := results(t, b); len(r) != 4 {
		t.Fatalf("%d results, want 4 (none for the request handed back)", len(r))
	}
}

// modelEngine lists its models.
type modelEngine struct {
	*gateEngine
	mu     sync.Mutex
	models []string
}

func (m *modelEngine) Models(context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.models, nil
}

func (m *modelEngine) set(models ...string) { m.mu.Lock(); m.models = models; m.mu.Unlock() }

// TestMissingDefaultModelIsTheWorkersFault: an engine without SOUS_MODEL
// keeps the worker not ready and taking nothing (it used to say ready and
// dead-letter every request model_not_found).
func TestMissingDefaultModelIsTheWorkersFault(t *testing.T) {
	t.Parallel()
	e := &modelEngine{gateEngine: newGateEngine(), models: []string{"llama3.2:latest"}}
	b := queuetest.NewMemBroker()
	w, _, _ := startWorker(t, worker.Config{RetryBackoffMax: 10 * time.Millisecond}, b, e, 2)
	b.Send("m", `{"prompt":"x"}`)
	time.Sleep(50 * time.Millisecond)
	err := w.Ready(context.Background())
	if err == nil || !strings.Contains(err.Error(), `no model "tiny"`) || !strings.Contains(err.Error(), "SOUS_MODEL") || !strings.Contains(err.Error(), "llama3.2:latest") {
		t.Fatalf("Ready = %v; want it to name the missing model, the variable and what the engine has", err)
	}
	if b.SettledCount() != 0 {
		t.Fatal("took work without the model")
	}
	e.set("tiny:latest") // Ollama's implicit tag
	b.WaitSettled(t, 1)
	if st, _ := b.Settlement("m"); st.Action != queue.Ack {
		t.Fatalf("%+v", st)
	}
}

// failingDLQ refuses every dead-letter, as a missing or full dead-letter
// queue does; with block set, each refusal waits for it to close first (a
// publish that waits for its confirm).
type failingDLQ struct {
	*queuetest.MemBroker
	block   chan struct{}
	refused atomic.Int64

	mu        sync.Mutex
	requeueOK []bool // whether each requeue's context was still live
}

func (f *failingDLQ) Settle(ctx context.Context, d *queue.Delivery, s queue.Settlement) error {
	if s.Action == queue.DeadLetter {
		if f.block != nil {
			<-f.block
		}
		f.refused.Add(1)
		return errors.New("dead-letter copy to \"q.dlq\": NOT_FOUND")
	}
	if s.Action == queue.Requeue {
		f.mu.Lock()
		f.requeueOK = append(f.requeueOK, ctx.Err() == nil)
		f.mu.Unlock()
	}
	return f.MemBroker.Settle(ctx, d, s)
}

type settlements struct {
	worker.NopObserver
	mu  sync.Mutex
	got []queue.Settlement
}

func (s *settlements) Done(_ context.Context, _ *queue.Delivery, o worker.Outcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, o.Settlement)
}

// TestFailedDeadLetterKeepsTheRequest: a dead-letter the broker refuses is
// the worker's fault: the request goes back to the queue at once, on a
// live context, with no attempt counted and marked as answered; the
// worker then takes no new work while the pause lasts, and /readyz says
// so. The valid request received with it is answered. Before, the requeue
// waited inside the settle for a pause that reached RetryBackoffMax, and
// ran on the settle's expired context from the 7th failure in a row: the
// copy failed, a nack lost the mark and counted a delivery, and past the
// delivery limit the broker dropped the request.
func TestFailedDeadLetterKeepsTheRequest(t *testing.T) {
	t.Parallel()
	b := &failingDLQ{MemBroker: queuetest.NewMemBroker()}
	obs := &settlements{}
	b.Send("bad", `not json`, replyTo("replies"))
	b.Send("good", `{"prompt":"fine"}`, replyTo("replies"))
	// A pause longer than any test: nothing may wait for it.
	w, _, stop := startWorker(t, worker.Config{Observer: obs, RetryBackoff: time.Hour, RetryBackoffMax: time.Hour}, b, newGateEngine(), 2)
	b.WaitSettled(t, 2)
	st, _ := b.Settlement("bad")
	if st.Action != queue.Requeue || st.Reason != queue.ReasonDeadLetterFailed || st.Headers["x-sous-answered"] != wire.ReasonInvalidJSON {
		t.Fatalf("%+v, want a requeue marked as answered", st)
	}
	if queue.Counts(st.Reason) {
		t.Error("a failed dead-letter spends an attempt; it is the worker's fault")
	}
	if s, _ := b.Settlement("good"); s.Action != queue.Ack {
		t.Errorf("good: %+v", s)
	}
	b.mu.Lock()
	if !slices.Equal(b.requeueOK, []bool{true}) {
		t.Errorf("requeue contexts live: %v", b.requeueOK)
	}
	b.mu.Unlock()
	err := w.Ready(context.Background())
	if err == nil || !strings.Contains(err.Error(), "dead-lettering fails") || !strings.Contains(err.Error(), "taking no new work") {
		t.Errorf("Ready = %v, want it to say dead-lettering fails and no work is taken", err)
	}
	obs.mu.Lock()
	for _, s := range obs.got {
		if s.Action == queue.DeadLetter {
			t.Errorf("observer told of a dead-letter; the broker took a requeue")
		}
	}
	obs.mu.Unlock()
	// Sent during the pause: never received (what a worker received, it
	// settles before Run returns).
	b.Send("later", `{"prompt":"x"}`)
	stop()
	if _, ok := b.Settlement("later"); ok {
		t.Error("a request was taken while dead-lettering failed")
	}
}

// TestFailedDeadLetterPausesAndRetries: after the pause the worker takes
// work again; the marked copy comes back and is dead-lettered with no
// engine call and no second error result.
func TestFailedDeadLetterPausesAndRetries(t *testing.T) {
	t.Parallel()
	b := &failingDLQ{MemBroker: queuetest.NewMemBroker()}
	e := newGateEngine()
	startWorker(t, worker.Config{RetryBackoff: 20 * time.Millisecond}, b, e, 2)
	b.Send("bad", `not json`, replyTo("replies"))
	b.WaitSettled(t, 1)
	st, _ := b.Settlement("bad")
	b.Send("bad-again", `not json`, replyTo("replies"), func(d *queue.Delivery) { d.Headers = st.Headers })
	b.Send("good", `{"prompt":"fine"}`, replyTo("replies"))
	b.WaitSettled(t, 3)
	if n := b.refused.Load(); n != 2 {
		t.Errorf("%d dead-letters tried, want 2", n)
	}
	if s, _ := b.Settlement("good"); s.Action != queue.Ack {
		t.Errorf("good after the pause: %+v", s)
	}
	res := results(t, b.MemBroker)
	if r := res["bad"]; r.Status != wire.StatusError {
		t.Errorf("bad: %+v", r)
	}
	if len(res) != 2 { // bad's error result, good's answer
		t.Errorf("%d results, want 2 (one error result for bad): %v", len(res), res)
	}
}

// TestAnsweredRequestIsNotRunAgain: a request marked as answered (its error
// result went out before its dead-letter failed) is dead-lettered when it
// comes back, with no engine call and no second result, even if the engine
// could answer it now.
func TestAnsweredRequestIsNotRunAgain(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	startWorker(t, worker.Config{}, b, e, 2)
	b.Send("m", `{"prompt":"fine"}`, func(d *queue.Delivery) { d.Headers = map[string]string{"x-sous-answered": "max_attempts"} })
	b.WaitSettled(t, 1)
	if st, _ := b.Settlement("m"); st.Action != queue.DeadLetter || st.Reason != "max_attempts" {
		t.Fatalf("%+v, want a dead-letter for max_attempts", st)
	}
	if _, _, calls := e.snapshot(); calls != 0 {
		t.Errorf("%d engine calls for a request already answered", calls)
	}
	if n := len(b.Published()); n != 0 {
		t.Errorf("%d results for a request already answered", n)
	}
}

// TestBadInputDoesNotHoldBackValidWork: while dead-letters are slow to
// fail, the valid requests received with malformed ones are answered:
// bad input used to be settled on the receive loop, which waited for each.
func TestBadInputDoesNotHoldBackValidWork(t *testing.T) {
	t.Parallel()
	b := &failingDLQ{MemBroker: queuetest.NewMemBroker(), block: make(chan struct{})}
	for i := range 3 {
		b.Send(fmt.Sprint("bad-", i), `not json`, replyTo("replies"))
		b.Send(fmt.Sprint("good-", i), `{"prompt":"fine"}`, replyTo("replies"))
	}
	startWorker(t, worker.Config{RetryBackoff: time.Millisecond}, b, newGateEngine(), 2)
	b.WaitSettled(t, 3)
	for i := range 3 {
		if s, ok := b.Settlement(fmt.Sprint("good-", i)); !ok || s.Action != queue.Ack {
			t.Errorf("good-%d: %+v (settled %v)", i, s, ok)
		}
	}
	close(b.block)
	b.WaitSettled(t, 6)
}

// panicky panics in the hooks that run after the broker took a settlement,
// and in the ends of the engine call's and the publish's.
type panicky struct{ worker.NopObserver }

func (panicky) Settling(context.Context, *queue.Delivery, queue.Settlement) func(error) {
	return func(error) { panic("settling hook") }
}
func (panicky) Done(context.Context, *queue.Delivery, worker.Outcome) { panic("done hook") }
func (panicky) Publishing(context.Context, *queue.Message, string) func(error) {
	return func(error) { panic("publishing hook") }
}
func (panicky) EngineCall(ctx context.Context, _ worker.EngineCall) (context.Context, func([]inference.Result)) {
	return ctx, func([]inference.Result) { panic("engine call hook") }
}

// TestObserverPanicsAfterTheAckDoNotSettleTwice: a panic in a hook after
// the broker took the ack used to requeue the delivery as well (a 406 that
// closes the channel), and a panic in Done ended the process.
func TestObserverPanicsAfterTheAckDoNotSettleTwice(t *testing.T) {
	t.Parallel()
	b := queuetest.NewMemBroker()
	startWorker(t, worker.Config{Observer: panicky{}}, b, newGateEngine(), 2)
	b.Send("a", `{"prompt":"x"}`)
	b.Send("b", `{"prompt":"y"}`)
	b.WaitSettled(t, 2)
	for _, ev := range b.Events() {
		if strings.HasPrefix(ev, "requeue:") {
			t.Fatalf("settled twice: %v", b.Events())
		}
	}
	if n := len(b.Published()); n != 2 {
		t.Fatalf("%d results published, want 2", n)
	}
	for _, id := range []string{"a", "b"} {
		if st, _ := b.Settlement(id); st.Action != queue.Ack {
			t.Errorf("%s settled %v, want ack: a panicking hook changed what happened to it", id, st)
		}
	}
}

// TestDrainCutSaysNothingOfTheEngine: calls cut off by the drain deadline
// neither grow the limit nor count as successes.
func TestDrainCutSaysNothingOfTheEngine(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	w, s, stop := startWorker(t, worker.Config{DrainTimeout: 30 * time.Millisecond}, b, e, 2)
	b.Send("m", `{"prompt":"wait:never"}`)
	waitFor(t, func() bool { return w.OnEngine() == 1 })
	stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.successes != 0 || s.overloads != 0 {
		t.Fatalf("sizer told %d successes, %d overloads by a call the drain cut", s.successes, s.overloads)
	}
	if st, _ := b.Settlement("m"); st.Action != queue.Requeue || st.Reason != queue.ReasonShutdown {
		t.Fatalf("%+v", st)
	}
}

// TestNoKeyStarves: a steady inflow of one model does not hold back a
// request for another: it runs once it is the oldest waiting. Before, the
// first key's group was served as long as it had leftovers, and one
// other-key request among 1000 ran last.
//
// The verdict holds under any scheduling: each wave is received before the
// next is sent, and every call blocks, so the slots that free hold exactly
// the first requests the dispatcher chose. (Reading the order in which
// calls reached the engine was a flake: a loaded machine can run a later
// call's goroutine first.)
func TestNoKeyStarves(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	w, _, _ := startWorker(t, worker.Config{}, b, e, 4)
	for i := range 4 {
		b.Send(fmt.Sprint("a", i), `{"prompt":"wait:hold"}`)
	}
	waitFor(t, func() bool { return w.OnEngine() == 4 })
	b.Send("a4", `{"prompt":"wait:rest"}`) // the steady group waits, older than "other"
	waitFor(t, func() bool { return w.InFlight() == 5 })
	b.Send("other", `{"prompt":"wait:rest other","model":"other"}`)
	waitFor(t, func() bool { return w.InFlight() == 6 })
	for i := range 200 {
		b.Send(fmt.Sprint("b", i), `{"prompt":"wait:rest"}`)
	}
	// As many as the worker holds, so b's wait beside "other".
	waitFor(t, func() bool { return w.InFlight() == worker.Capacity(4) })
	e.open("hold")
	waitFor(t, func() bool { started, _, _ := e.snapshot(); return len(started) == 8 })
	// The 4 freed slots: a4, then "other", the oldest waiting after it.
	started, _, _ := e.snapshot()
	if !slices.Contains(started[4:8], "wait:rest other") {
		t.Errorf("the 4 freed slots went to %q; the other model's request, second oldest waiting, is not among them", started[4:8])
	}
	e.open("rest")
	e.open("rest other")
	b.WaitSettled(t, 206)
}

// TestWaitBoundHandsBack: a request that waits for a slot longer than
// MaxWait goes back to the queue, uncounted, instead of being held until
// the broker's consumer_timeout takes it (and every other delivery on the
// channel) back.
func TestWaitBoundHandsBack(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	startWorker(t, worker.Config{MaxWait: 50 * time.Millisecond}, b, e, 1)
	b.Send("running", `{"prompt":"wait:long"}`)
	b.Send("waiting", `{"prompt":"x"}`)
	b.WaitSettled(t, 1)
	st, _ := b.Settlement("waiting")
	if st.Action != queue.Requeue || st.Reason != queue.ReasonHeldTooLong || queue.Counts(st.Reason) {
		t.Fatalf("waiting: %+v, want an uncounted requeue", st)
	}
	e.open("long")
	b.WaitSettled(t, 2)
}

// TestLargerLimitIsUsedAtOnce: when the in-flight limit grows (the
// sizer's OnChange calls SizeChanged), a waiting request goes to the
// engine at once, not when the call in progress ends.
func TestLargerLimitIsUsedAtOnce(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	w, s, _ := startWorker(t, worker.Config{}, b, e, 1)
	b.Send("a", `{"prompt":"wait:a"}`)
	b.Send("b", `{"prompt":"wait:b"}`)
	waitFor(t, func() bool { started, _, _ := e.snapshot(); return len(started) == 1 })
	s.set(2)
	w.SizeChanged()
	waitFor(t, func() bool { started, _, _ := e.snapshot(); return len(started) == 2 })
	e.open("a")
	e.open("b")
	b.WaitSettled(t, 2)
}
