package telemetry_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"go.opentelemetry.io/otel/trace"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/telemetry"
)

// collected is one collection, looked up by metric name and attributes.
type collected map[string]metricdata.Aggregation

func collect(t *testing.T, r *sdkmetric.ManualReader) collected {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := collected{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m.Data
		}
	}
	return out
}

func matches(set attribute.Set, want []attribute.KeyValue) bool {
	for _, kv := range want {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

// sum adds the points of a counter or gauge whose attributes include want.
func (c collected) sum(name string, want ...attribute.KeyValue) int64 {
	var n int64
	switch d := c[name].(type) {
	case metricdata.Sum[int64]:
		for _, p := range d.DataPoints {
			if matches(p.Attributes, want) {
				n += p.Value
			}
		}
	case metricdata.Gauge[int64]:
		for _, p := range d.DataPoints {
			if matches(p.Attributes, want) {
				n += p.Value
			}
		}
	}
	return n
}

// count is the number of samples of a histogram whose attributes include
// want, and their sum.
func (c collected) count(name string, want ...attribute.KeyValue) (n uint64, sum float64) {
	switch d := c[name].(type) {
	case metricdata.Histogram[float64]:
		for _, p := range d.DataPoints {
			if matches(p.Attributes, want) {
				n += p.Count
				sum += p.Sum
			}
		}
	case metricdata.Histogram[int64]:
		for _, p := range d.DataPoints {
			if matches(p.Attributes, want) {
				n += p.Count
				sum += float64(p.Sum)
			}
		}
	}
	return n, sum
}

func TestMetricsMoveAsBatchRuns(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{release: make(chan struct{}), calls: make(chan int, 8)}
	h := setup(t, options{engine: e, batchSize: 2, batchWait: time.Hour, startLater: true})
	h.b.Send("a", `{"prompt":"x"}`)
	h.b.Send("b", `{"prompt":"y"}`, withAttempt(2))
	h.start()
	<-e.calls // the batch of two is at the engine

	m := collect(t, h.reader)
	if got := m.sum(telemetry.MetricReceived); got != 2 {
		t.Errorf("received %d, want 2", got)
	}
	if got := m.sum(telemetry.MetricInFlight, attribute.String("messaging.destination.name", "requests")); got != 2 {
		t.Errorf("in flight %d while the batch runs, want 2", got)
	}
	if got := m.sum(telemetry.MetricRedelivered); got != 1 {
		t.Errorf("redelivered %d, want 1", got)
	}
	if n, sum := m.count(telemetry.MetricBatchSize, attribute.String("sous.batch.reason", "full")); n != 1 || sum != 2 {
		t.Errorf("batch size: %d samples summing %v, want one batch of 2", n, sum)
	}
	if n, sum := m.count(telemetry.MetricQueueTime); n != 2 || sum < 0.09 {
		t.Errorf("queue time: %d samples summing %vs, want 2 of 50ms", n, sum)
	}
	if n, _ := m.count(telemetry.MetricBatchWait, attribute.String("gen_ai.request.model", "tiny")); n != 2 {
		t.Errorf("batch wait: %d samples, want 2", n)
	}

	close(e.release)
	waitFor(t, "two settlements", func() bool { return h.b.SettledCount() == 2 })
	waitFor(t, "in flight back to 0", func() bool { return collect(t, h.reader).sum(telemetry.MetricInFlight) == 0 })
	m = collect(t, h.reader)
	tiny := attribute.String("gen_ai.request.model", "tiny")
	if got := m.sum(telemetry.MetricEngineTokens, tiny, attribute.String("gen_ai.token.type", "input")); got != 6 {
		t.Errorf("input tokens %d, want 6", got)
	}
	if got := m.sum(telemetry.MetricEngineTokens, tiny, attribute.String("gen_ai.token.type", "output")); got != 10 {
		t.Errorf("output tokens %d, want 10", got)
	}
	if n, _ := m.count(telemetry.MetricEngineTime, tiny, attribute.String("gen_ai.operation.name", "text_completion")); n != 1 {
		t.Errorf("engine duration: %d samples, want 1", n)
	}
	if n, sum := m.count(telemetry.MetricEngineRate, tiny); n != 1 || sum <= 0 {
		t.Errorf("token rate: %d samples summing %v", n, sum)
	}
	if got := m.sum(telemetry.MetricResults, attribute.String("sous.result.status", "ok")); got != 2 {
		t.Errorf("ok results %d, want 2", got)
	}
	if got := m.sum(telemetry.MetricSettled, attribute.String("sous.settle.action", "ack")); got != 2 {
		t.Errorf("acks %d, want 2", got)
	}
	if got := m.sum(telemetry.MetricEngineUp); got != 1 {
		t.Errorf("engine up %d, want 1", got)
	}
}

func TestFailureMetrics(t *testing.T) {
	t.Parallel()
	down := &inference.Error{Kind: inference.Retryable, Code: "engine_unavailable", Err: errors.New("connection refused")}
	e := &fakeEngine{answer: func([]inference.Request) ([]inference.Result, error) { return nil, down }}
	h := setup(t, options{engine: e})
	h.b.Send("bad", `nope`, withReplyTo("replies"))
	h.b.Send("down", `{"prompt":"x"}`, withAttempt(3))
	waitFor(t, "two settlements", func() bool { return h.b.SettledCount() == 2 })
	waitFor(t, "in flight back to 0", func() bool { return collect(t, h.reader).sum(telemetry.MetricInFlight) == 0 })
	m := collect(t, h.reader)
	for _, reason := range []string{"invalid_json", "max_attempts"} {
		if got := m.sum(telemetry.MetricDeadLetters, attribute.String("sous.settle.reason", reason)); got != 1 {
			t.Errorf("dead letters for %s: %d, want 1", reason, got)
		}
	}
	if got := m.sum(telemetry.MetricResults, attribute.String("sous.result.status", "error")); got != 2 {
		t.Errorf("error results %d, want 2", got)
	}
	if n, _ := m.count(telemetry.MetricEngineTime, attribute.String("error.type", "engine_unavailable")); n != 1 {
		t.Errorf("failed engine calls %d, want 1", n)
	}
	if got := m.sum(telemetry.MetricEngineUp); got != 0 {
		t.Errorf("engine up %d after a total retryable failure, want 0", got)
	}
	if _, ok := m[telemetry.MetricEngineUp]; !ok {
		t.Error("no engine up gauge")
	}
}

func TestSizerAndReconnectMetrics(t *testing.T) {
	t.Parallel()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	o, err := telemetry.New(telemetry.Config{MeterProvider: mp, Queue: "q"})
	if err != nil {
		t.Fatal(err)
	}
	snap := sizing.Snapshot{Decision: sizing.Decision{Size: 6, Reason: sizing.ReasonMemory}, Ceiling: 16}
	if err := o.ObserveSizer(func() sizing.Snapshot { return snap }); err != nil {
		t.Fatal(err)
	}
	m := collect(t, reader)
	if got := m.sum(telemetry.MetricBatchLimit, attribute.String("sous.batch.limit.reason", "memory")); got != 6 {
		t.Errorf("batch limit %d, want 6", got)
	}
	if got := m.sum(telemetry.MetricBatchCeiling); got != 16 {
		t.Errorf("ceiling %d, want 16", got)
	}
	if _, ok := m[telemetry.MetricGPUFreeMemory]; ok {
		t.Error("free memory reported before any reading")
	}
	if _, ok := m[telemetry.MetricEngineUp]; ok {
		t.Error("engine up reported before any verdict")
	}

	snap.FreeBytes, snap.ReadAt = 3<<30, time.Now()
	o.BrokerReconnected()
	o.BrokerReconnected()
	m = collect(t, reader)
	if got := m.sum(telemetry.MetricGPUFreeMemory); got != 3<<30 {
		t.Errorf("free memory %d, want 3 GiB", got)
	}
	if got := m.sum(telemetry.MetricReconnects, attribute.String("messaging.destination.name", "q")); got != 2 {
		t.Errorf("reconnects %d, want 2", got)
	}
}

func TestLogHandler(t *testing.T) {
	t.Parallel()
	var buf syncBuffer
	log := slog.New(telemetry.LogHandler(slog.NewJSONHandler(&buf, nil))).With("worker", "w1")
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: [16]byte{1}, SpanID: [8]byte{2}, TraceFlags: trace.FlagsSampled})
	ctx := trace.ContextWithSpanContext(context.Background(), sc)
	log.InfoContext(ctx, "with span")
	log.Info("without")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines", len(lines))
	}
	if !strings.Contains(lines[0], `"trace_id":"01000000000000000000000000000000","span_id":"0200000000000000"`) || !strings.Contains(lines[0], `"worker":"w1"`) {
		t.Errorf("line with a span: %s", lines[0])
	}
	if strings.Contains(lines[1], "trace_id") {
		t.Errorf("line without a span: %s", lines[1])
	}
	if h := telemetry.LogHandler(log.Handler()); h != log.Handler() {
		t.Error("wrapping twice should not add the ids twice")
	}
}
