package telemetry_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/telemetry"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

// fakeEngine answers every request, optionally after release is closed.
type fakeEngine struct {
	answer  func(reqs []inference.Request) ([]inference.Result, error)
	release chan struct{}
	calls   chan int // receives each call's size when set
}

// TakesList: the engine takes lists of every kind, so messages queued
// together share a call and its batch span, as embeddings do on a real
// engine.
func (*fakeEngine) TakesList(inference.Kind) bool { return true }

func (e *fakeEngine) Infer(ctx context.Context, reqs []inference.Request) ([]inference.Result, error) {
	if e.calls != nil {
		e.calls <- len(reqs)
	}
	if e.release != nil {
		select {
		case <-e.release:
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
			r.Stream("echo: " + r.Prompt)
		}
		out[i].Response = inference.Response{Text: "echo: " + r.Prompt, DoneReason: "stop", Usage: inference.Usage{InputTokens: 3, OutputTokens: 5}}
	}
	return out, nil
}

type fixedSizer struct{ size int }

func (s fixedSizer) Size() int      { return s.size }
func (s fixedSizer) Overloaded(int) {}
func (s fixedSizer) Succeeded(int)  {}

// harness runs a worker with an Observer that records into memory.
type harness struct {
	b      *queuetest.MemBroker
	spans  *tracetest.SpanRecorder
	reader *sdkmetric.ManualReader
	obs    *telemetry.Observer
	logs   *syncBuffer
	// start runs the worker; setup calls it unless options.startLater.
	start func()
}

type options struct {
	noTracing bool
	batchSize int
	batchWait time.Duration
	engine    *fakeEngine
	// startLater leaves the worker stopped until harness.start, so that
	// messages sent before it form one batch.
	startLater bool
	// reader, when set, also reads the metrics (a Prometheus exporter).
	reader sdkmetric.Reader
	// model is telemetry.Config.Model.
	model string
}

func setup(t *testing.T, o options) *harness {
	t.Helper()
	h := &harness{b: queuetest.NewMemBroker(), spans: tracetest.NewSpanRecorder(), reader: sdkmetric.NewManualReader(), logs: &syncBuffer{}}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(h.spans))
	readers := []sdkmetric.Option{sdkmetric.WithReader(h.reader)}
	if o.reader != nil {
		readers = append(readers, sdkmetric.WithReader(o.reader))
	}
	mp := sdkmetric.NewMeterProvider(readers...)
	t.Cleanup(func() {
		_ = tp.Shutdown(context.Background())
		_ = mp.Shutdown(context.Background())
	})
	cfg := telemetry.Config{TracerProvider: tp, MeterProvider: mp, Queue: "requests", Model: o.model}
	if o.noTracing {
		cfg.TracerProvider = nil
	}
	obs, err := telemetry.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.obs = obs
	if o.engine == nil {
		o.engine = &fakeEngine{}
	}
	if o.batchSize == 0 {
		o.batchSize = 4
	}
	log := slog.New(telemetry.LogHandler(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	w := worker.New(worker.Config{
		WorkerID:     "w-test",
		ResultsQueue: "results",
		Limits:       wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny"}},
		MaxAttempts:  3,
		BatchWait:    o.batchWait,
		RetryBackoff: time.Millisecond,
		Observer:     obs,
	}, h.b, o.engine, fixedSizer{o.batchSize}, log)
	h.start = func() {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Error("worker did not stop")
			}
		})
	}
	if !o.startLater {
		h.start()
	}
	return h
}

// waitFor polls cond until it holds or 5s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitSpans waits until a span named name has ended n times.
func (h *harness) waitSpans(t *testing.T, name string, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d %q spans", n, name), func() bool { return len(h.ended(name)) >= n })
}

func (h *harness) ended(name string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range h.spans.Ended() {
		if s.Name() == name {
			out = append(out, s)
		}
	}
	return out
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func withHeader(k, v string) func(*queue.Delivery) {
	return func(d *queue.Delivery) {
		if d.Headers == nil {
			d.Headers = map[string]string{}
		}
		d.Headers[k] = v
	}
}

func withAttempt(n int) func(*queue.Delivery) { return func(d *queue.Delivery) { d.Attempt = n } }

func withReplyTo(to string) func(*queue.Delivery) { return func(d *queue.Delivery) { d.ReplyTo = to } }
