package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/integration/itest"
	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/worker"
)

func TestTelemetryConfig(t *testing.T) {
	t.Parallel()
	base := []string{"SOUS_MODEL=tiny"}
	tests := []struct {
		name        string
		env         []string
		traces      bool
		prom, otlp  bool
		badVariable string
	}{
		{name: "nothing set: /metrics only, no spans", prom: true},
		{name: "endpoint: traces and metrics over OTLP", env: []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318"}, traces: true, prom: true, otlp: true},
		{name: "traces endpoint only", env: []string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://collector:4318/v1/traces"}, traces: true, prom: true},
		{name: "sampling off", env: []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318", "OTEL_TRACES_SAMPLER=always_off"}, prom: true, otlp: true},
		{name: "traces exporter none", env: []string{"OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318", "OTEL_TRACES_EXPORTER=none"}, prom: true, otlp: true},
		{name: "explicit otlp without endpoint", env: []string{"OTEL_TRACES_EXPORTER=otlp"}, traces: true, prom: true},
		{name: "metrics otlp only", env: []string{"OTEL_METRICS_EXPORTER=otlp"}, otlp: true},
		{name: "metrics none", env: []string{"OTEL_METRICS_EXPORTER=none"}},
		{name: "metrics both", env: []string{"OTEL_METRICS_EXPORTER=prometheus, otlp"}, prom: true, otlp: true},
		{name: "sdk disabled", env: []string{"OTEL_SDK_DISABLED=true", "OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4318"}},
		{name: "grpc", env: []string{"OTEL_EXPORTER_OTLP_PROTOCOL=grpc", "OTEL_EXPORTER_OTLP_ENDPOINT=http://c:4317"}, traces: true, prom: true, otlp: true},
		{name: "bad exporter", env: []string{"OTEL_TRACES_EXPORTER=zipkin"}, badVariable: "OTEL_TRACES_EXPORTER"},
		{name: "bad metrics exporter", env: []string{"OTEL_METRICS_EXPORTER=console"}, badVariable: "OTEL_METRICS_EXPORTER"},
		{name: "bad protocol", env: []string{"OTEL_EXPORTER_OTLP_PROTOCOL=http/json"}, badVariable: "OTEL_EXPORTER_OTLP_PROTOCOL"},
		{name: "bad traces protocol", env: []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=thrift"}, badVariable: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"},
		{name: "bad sampler", env: []string{"OTEL_TRACES_SAMPLER=sometimes"}, badVariable: "OTEL_TRACES_SAMPLER"},
		{name: "bad disabled", env: []string{"OTEL_SDK_DISABLED=maybe"}, badVariable: "OTEL_SDK_DISABLED"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := loadConfig(append(base, tc.env...))
			if tc.badVariable != "" {
				var ce *configError
				if !errors.As(err, &ce) || ce.Var != tc.badVariable {
					t.Fatalf("error %v, want one naming %s", err, tc.badVariable)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.Telemetry.tracesOn(); got != tc.traces {
				t.Errorf("traces %v, want %v", got, tc.traces)
			}
			if prom, otlp := cfg.Telemetry.metricReaders(); prom != tc.prom || otlp != tc.otlp {
				t.Errorf("metrics prometheus=%v otlp=%v, want %v %v", prom, otlp, tc.prom, tc.otlp)
			}
		})
	}
}

type alwaysReady struct{}

func (alwaysReady) Ready(context.Context) error { return nil }

// TestMetricsEndpoint scrapes /metrics through the worker's own HTTP server
// after the Observer saw a message through, and finds the sous metrics
// under their Prometheus names.
func TestMetricsEndpoint(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	addr := itest.FreeAddr(t)
	cfg, err := loadConfig([]string{
		"SOUS_MODEL=tiny", "SOUS_HTTP_ADDR=" + addr, "SOUS_WORKER_ID=w-metrics",
		"SOUS_AMQP_URL=amqp://sous:s3cretpw@broker:5672/",
		"OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer t0psecret",
	})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	snap := sizing.Snapshot{Decision: sizing.Decision{Size: 8, Reason: sizing.ReasonMemory}, Ceiling: 32, FreeBytes: 10 << 30, ReadAt: time.Now()}
	tel, err := startTelemetry(context.Background(), cfg, func() sizing.Snapshot { return snap }, log)
	if err != nil {
		t.Fatal(err)
	}
	defer tel.close(log)
	if tel.tp != nil {
		t.Error("spans are recorded without an OTLP endpoint")
	}
	srv, err := startHTTP(cfg, alwaysReady{}, tel.metrics, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}()

	// One message through the Observer, as the worker would report it.
	now := time.Now()
	d := &queue.Delivery{ID: "m1", Attempt: 2, ReceivedAt: now, EnqueuedAt: now.Add(-time.Second)}
	o := tel.obs
	ctx := o.Received(context.Background(), d)
	bctx := o.BatchStarted(context.Background(), &worker.BatchEvent{ID: "b1", Reason: "idle", Kind: inference.Chat, Model: "tiny", Start: now, Items: []worker.BatchItem{{Ctx: ctx, Delivery: d}}})
	_, end := o.EngineCall(bctx, worker.EngineCall{Kind: inference.Chat, Model: "tiny", Size: 1})
	time.Sleep(time.Millisecond) // a measurable engine duration for the token rate
	end([]inference.Result{{Response: inference.Response{Usage: inference.Usage{InputTokens: 7, OutputTokens: 11}}}})
	o.BatchFinished(bctx, nil, 0)
	m := &queue.Message{To: "sous.results", Headers: map[string]string{}}
	o.Publishing(ctx, m, "ok")(nil)
	o.Settling(ctx, d, queue.Settlement{Action: queue.Ack})(nil)
	o.Done(ctx, d, worker.Outcome{Settlement: queue.Settlement{Action: queue.Ack}, Kind: inference.Chat, Model: "tiny"})
	o.EngineHealth(nil)
	o.BrokerReconnected()

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	text := string(body)
	for _, want := range []string{
		`sous_messages_received_total{messaging_destination_name="sous.requests"`,
		`sous_messages_redelivered_total{`,
		`sous_messages_in_flight{`,
		`sous_messages_settled_total{`,
		`sous_settle_action="ack"`,
		`sous_results_total{`,
		`sous_result_status="ok"`,
		`sous_queue_time_seconds_bucket{`,
		`sous_batch_wait_seconds_bucket{`,
		`sous_batch_size_bucket{`,
		`sous_batch_reason="idle"`,
		`sous_engine_duration_seconds_bucket{`,
		`gen_ai_operation_name="chat"`,
		`sous_engine_tokens_total{`,
		`gen_ai_token_type="output"`,
		`sous_engine_token_rate_per_second_bucket{`,
		`sous_engine_up `, // no labels: no otel_scope_* either (SOUS_METRICS_SCOPE_LABELS)
		`sous_broker_reconnects_total{`,
		`sous_batch_limit{`,
		`sous_batch_limit_reason="memory"`,
		`sous_batch_ceiling `,         // no labels: no otel_scope_* either (SOUS_METRICS_SCOPE_LABELS)
		`sous_gpu_memory_free_bytes `, // no labels: no otel_scope_* either (SOUS_METRICS_SCOPE_LABELS)
		`target_info{`,
		`service_name="sous-worker"`,
		`service_instance_id="w-metrics"`,
		`go_goroutines `,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics has no %s", want)
		}
	}
	if strings.Contains(text, "otel_scope_") {
		t.Error("/metrics has otel_scope_* labels without SOUS_METRICS_SCOPE_LABELS=true")
	}
	for _, secret := range []string{"s3cretpw", "t0psecret", "m1"} {
		if strings.Contains(text, secret) {
			t.Errorf("/metrics shows %q", secret)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", text)
	}
}

// With metrics turned off there is no /metrics route.
func TestMetricsEndpointOff(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	addr := itest.FreeAddr(t)
	cfg, err := loadConfig([]string{"SOUS_MODEL=tiny", "SOUS_HTTP_ADDR=" + addr, "OTEL_SDK_DISABLED=true"})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tel, err := startTelemetry(context.Background(), cfg, func() sizing.Snapshot { return sizing.Snapshot{} }, log)
	if err != nil {
		t.Fatal(err)
	}
	defer tel.close(log)
	srv, err := startHTTP(cfg, alwaysReady{}, tel.metrics, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Close() }()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /metrics with OTEL_SDK_DISABLED: %s, want 404", resp.Status)
	}
}
