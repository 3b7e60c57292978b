package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// fakeBroker is an in-memory Broker that records the order of events.
type fakeBroker struct {
	mu        sync.Mutex
	queue     chan *queue.Delivery
	events    []string // "publish:<to>:<corr>", "ack:<id>", "requeue:<id>:<reason>", "dead:<id>:<reason>"
	published []queue.Message
	settled   map[string]queue.Settlement
	failPub   func(m queue.Message) error
	stopped   bool
	changed   chan struct{}
}

func newBroker() *fakeBroker {
	return &fakeBroker{queue: make(chan *queue.Delivery, 1000), settled: map[string]queue.Settlement{}, changed: make(chan struct{}, 1)}
}

func (b *fakeBroker) send(id, body string, opts ...func(*queue.Delivery)) {
	d := &queue.Delivery{ID: id, Body: []byte(body), Attempt: 1, ReceivedAt: time.Now(), EnqueuedAt: time.Now().Add(-time.Millisecond)}
	for _, o := range opts {
		o(d)
	}
	b.queue <- d
}

func (b *fakeBroker) Receive(ctx context.Context, max int) ([]*queue.Delivery, error) {
	b.mu.Lock()
	stopped := b.stopped
	b.mu.Unlock()
	if stopped {
		return nil, queue.ErrClosed
	}
	var out []*queue.Delivery
	select {
	case d := <-b.queue:
		out = append(out, d)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	for len(out) < max {
		select {
		case d := <-b.queue:
			out = append(out, d)
		default:
			return out, nil
		}
	}
	return out, nil
}

func (b *fakeBroker) Publish(_ context.Context, m queue.Message) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failPub != nil {
		if err := b.failPub(m); err != nil {
			return err
		}
	}
	b.published = append(b.published, m)
	b.events = append(b.events, "publish:"+m.To+":"+m.CorrelationID)
	return nil
}

func (b *fakeBroker) Settle(_ context.Context, d *queue.Delivery, s queue.Settlement) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, dup := b.settled[d.ID]; dup {
		return fmt.Errorf("delivery %s settled twice", d.ID)
	}
	b.settled[d.ID] = s
	b.events = append(b.events, fmt.Sprintf("%s:%s:%s", s.Action, d.ID, s.Reason))
	select {
	case b.changed <- struct{}{}:
	default:
	}
	return nil
}

func (b *fakeBroker) StopReceiving(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stopped = true
	return nil
}

func (b *fakeBroker) settlement(id string) (queue.Settlement, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.settled[id]
	return s, ok
}

func (b *fakeBroker) results(t *testing.T) map[string]wire.Result {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]wire.Result{}
	for _, m := range b.published {
		if m.Headers["x-sous-status"] == "chunk" {
			continue
		}
		var r wire.Result
		if err := json.Unmarshal(m.Body, &r); err != nil {
			t.Fatalf("published a non-JSON result: %v", err)
		}
		out[m.CorrelationID] = r
	}
	return out
}

// waitSettled waits until n deliveries are settled.
func (b *fakeBroker) waitSettled(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		b.mu.Lock()
		got := len(b.settled)
		b.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-b.changed:
		case <-time.After(10 * time.Millisecond):
		case <-deadline:
			t.Fatalf("only %d of %d deliveries settled", got, n)
		}
	}
}

// fakeEngine answers with a function of the request.
type fakeEngine struct {
	mu      sync.Mutex
	batches [][]inference.Request
	answer  func(batch []inference.Request) ([]inference.Result, error)
	block   chan struct{} // when set, Infer waits on it
}

func (e *fakeEngine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	e.mu.Lock()
	e.batches = append(e.batches, reqs)
	e.mu.Unlock()
	if e.block != nil {
		select {
		case <-e.block:
		case <-ctx.Done():
			return nil, &inference.Error{Kind: inference.Retryable, Code: "canceled", Err: ctx.Err()}
		}
	}
	if e.answer != nil {
		return e.answer(reqs)
	}
	out := make([]inference.Result, len(reqs))
	for i, r := range reqs {
		if r.Stream != nil {
			for _, w := range []string{"echo", ": ", r.Prompt} {
				r.Stream(w)
			}
		}
		out[i].Response = inference.Response{Text: "echo: " + r.Prompt, DoneReason: "stop", Usage: inference.Usage{InputTokens: 1, OutputTokens: 2}}
	}
	return out, nil
}

func (e *fakeEngine) sizes() []int {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []int
	for _, b := range e.batches {
		out = append(out, len(b))
	}
	return out
}

type fixedSizer struct {
	mu        sync.Mutex
	size      int
	overloads int
	successes int
}

func (s *fixedSizer) Size() int { s.mu.Lock(); defer s.mu.Unlock(); return s.size }
func (s *fixedSizer) Overloaded(int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.overloads++
	s.size = max(1, s.size/2)
}
func (s *fixedSizer) Succeeded(int) { s.mu.Lock(); defer s.mu.Unlock(); s.successes++ }

type harness struct {
	b      *fakeBroker
	e      *fakeEngine
	s      *fixedSizer
	w      *worker.Worker
	cancel context.CancelFunc
	done   chan error
}

func setup(t *testing.T, cfg worker.Config, e *fakeEngine) *harness {
	t.Helper()
	return setupEngine(t, cfg, e, e)
}

// setupEngine runs a worker on eng, whose calls fe records.
func setupEngine(t *testing.T, cfg worker.Config, eng worker.Engine, fe *fakeEngine) *harness {
	t.Helper()
	e := fe
	if cfg.Limits.MaxBodyBytes == 0 {
		cfg.Limits = wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny", "other"}}
	}
	cfg.ResultsQueue = "results"
	cfg.WorkerID = "w-test"
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff = time.Millisecond
	}
	h := &harness{b: newBroker(), e: e, s: &fixedSizer{size: 4}, done: make(chan error, 1)}
	h.w = worker.New(cfg, h.b, eng, h.s, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-h.done:
		case <-time.After(10 * time.Second):
			t.Error("worker did not stop")
		}
	})
	return h
}

func (h *harness) stop(t *testing.T) {
	t.Helper()
	h.cancel()
	select {
	case err := <-h.done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("worker did not stop")
	}
	h.done <- nil // for the cleanup
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

func (s *fixedSizer) set(n int) { s.mu.Lock(); defer s.mu.Unlock(); s.size = n }
func (s *fixedSizer) overloadCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.overloads
}
