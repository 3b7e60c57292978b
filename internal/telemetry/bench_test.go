package telemetry_test

import (
	"context"
	"io"
	"log/slog"
	"strconv"
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

// observers are the designs compared: the worker's default, telemetry as
// the worker runs it with no OTLP endpoint (metrics for /metrics, no
// spans), and telemetry recording spans too (exported to a discarding
// exporter through the batch span processor, as with a collector).
func observers(b *testing.B) []struct {
	name string
	obs  worker.Observer
} {
	b.Helper()
	metricsOnly, err := telemetry.New(telemetry.Config{MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())), Queue: "q"})
	if err != nil {
		b.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
	b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	recording, err := telemetry.New(telemetry.Config{TracerProvider: tp, MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader())), Queue: "q"})
	if err != nil {
		b.Fatal(err)
	}
	return []struct {
		name string
		obs  worker.Observer
	}{
		{"observer=nop", worker.NopObserver{}},
		{"observer=metrics", metricsOnly},
		{"observer=traces+metrics", recording},
	}
}

// BenchmarkHooks is the cost of the hooks one message goes through, in a
// batch of one, with a traceparent to continue.
func BenchmarkHooks(b *testing.B) {
	for _, o := range observers(b) {
		b.Run(o.name, func(b *testing.B) {
			b.ReportAllocs()
			now := time.Now()
			res := []inference.Result{{Response: inference.Response{Usage: inference.Usage{InputTokens: 10, OutputTokens: 20}}}}
			for b.Loop() {
				d := &queue.Delivery{ID: "m", Attempt: 1, ReceivedAt: now, EnqueuedAt: now.Add(-time.Second), Headers: map[string]string{"traceparent": traceparent}}
				ctx := o.obs.Received(context.Background(), d)
				ev := &worker.BatchEvent{ID: "b", Reason: "idle", Kind: inference.Generate, Model: "tiny", Start: now, Items: []worker.BatchItem{{Ctx: ctx, Delivery: d}}}
				bctx := o.obs.BatchStarted(context.Background(), ev)
				_, end := o.obs.EngineCall(bctx, worker.EngineCall{Kind: inference.Generate, Model: "tiny", Size: 1})
				end(res)
				o.obs.BatchFinished(bctx, ev, time.Millisecond)
				m := &queue.Message{To: "results", CorrelationID: "m", MessageID: "m/result", Headers: map[string]string{"x-sous-status": "ok"}}
				o.obs.Publishing(ctx, m, wire.StatusOK)(nil)
				o.obs.Settling(ctx, d, queue.Settlement{Action: queue.Ack})(nil)
				o.obs.Done(ctx, d, worker.Outcome{Settlement: queue.Settlement{Action: queue.Ack}, Kind: inference.Generate, Model: "tiny", Usage: res[0].Response.Usage})
			}
		})
	}
}

// BenchmarkWorker runs messages through the whole worker with an instant
// engine, batches of up to 8: the overhead telemetry adds to the worker's
// own per-message cost.
func BenchmarkWorker(b *testing.B) {
	for _, o := range observers(b) {
		b.Run(o.name, func(b *testing.B) {
			b.ReportAllocs()
			br := queuetest.NewMemBroker()
			w := worker.New(worker.Config{
				ResultsQueue: "results",
				Limits:       wire.Limits{MaxBodyBytes: 1 << 20, DefaultModel: "tiny", AllowedModels: []string{"tiny"}},
				BatchWait:    time.Millisecond,
				Observer:     o.obs,
			}, br, &fakeEngine{}, fixedSizer{8}, slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn})))
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- w.Run(ctx) }()
			n := 0
			for b.Loop() {
				br.Send(strconv.Itoa(n), `{"prompt":"hello"}`, withHeader("traceparent", traceparent))
				n++
				if n%512 == 0 { // keep the fake queue from filling up
					for br.SettledCount() < n-256 {
						time.Sleep(50 * time.Microsecond)
					}
				}
			}
			for br.SettledCount() < n {
				time.Sleep(50 * time.Microsecond)
			}
			b.StopTimer()
			cancel()
			<-done
		})
	}
}
