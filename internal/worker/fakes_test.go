package worker_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// results decodes the final results b published, keyed by correlation id.
func results(t *testing.T, b *queuetest.MemBroker) map[string]wire.Result {
	t.Helper()
	out := map[string]wire.Result{}
	for _, m := range b.Published() {
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

// fakeEngine answers with a function of the request.
type fakeEngine struct {
	mu      sync.Mutex
	batches [][]inference.Request
	answer  func(batch []inference.Request) ([]inference.Result, error)
	block   chan struct{} // when set, Infer waits on it
	list    bool          // one call takes a list of every kind
}

// TakesList makes the worker send lists when list is set, else one request
// per call (embeddings included).
func (e *fakeEngine) TakesList(inference.Kind) bool { return e.list }

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
	b      *queuetest.MemBroker
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

// setupEngine runs a worker on eng, whose calls fe records, at batch size 4.
func setupEngine(t *testing.T, cfg worker.Config, eng worker.Engine, fe *fakeEngine) *harness {
	t.Helper()
	return setupSized(t, cfg, eng, fe, 4)
}

// setupSized is setupEngine with the batch size the worker starts at.
func setupSized(t *testing.T, cfg worker.Config, eng worker.Engine, fe *fakeEngine, size int) *harness {
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
	h := &harness{b: queuetest.NewMemBroker(), e: e, s: &fixedSizer{size: size}, done: make(chan error, 1)}
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
