package telemetry

import (
	"context"
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/otlptranslator"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// OTLP protocols, as OTEL_EXPORTER_OTLP_PROTOCOL names them.
const (
	ProtocolHTTP = "http/protobuf"
	ProtocolGRPC = "grpc"
)

// NewSpanExporter returns an OTLP span exporter speaking protocol
// (ProtocolHTTP when empty). The exporter takes its endpoint, headers,
// timeout, compression and TLS settings from the standard
// OTEL_EXPORTER_OTLP_* variables; it does not connect until it exports.
func NewSpanExporter(ctx context.Context, protocol string) (sdktrace.SpanExporter, error) {
	switch protocol {
	case "", ProtocolHTTP:
		return otlptracehttp.New(ctx)
	case ProtocolGRPC:
		return otlptracegrpc.New(ctx)
	}
	return nil, fmt.Errorf("OTLP protocol %q is not supported; use %s or %s", protocol, ProtocolHTTP, ProtocolGRPC)
}

// NewMetricExporter is NewSpanExporter for metrics.
func NewMetricExporter(ctx context.Context, protocol string) (sdkmetric.Exporter, error) {
	switch protocol {
	case "", ProtocolHTTP:
		return otlpmetrichttp.New(ctx)
	case ProtocolGRPC:
		return otlpmetricgrpc.New(ctx)
	}
	return nil, fmt.Errorf("OTLP protocol %q is not supported; use %s or %s", protocol, ProtocolHTTP, ProtocolGRPC)
}

// NewPrometheus returns a metric reader to give a MeterProvider and the
// handler that serves what it reads in the Prometheus text format (or
// OpenMetrics, where the scraper asks for it), for GET /metrics. The
// registry is its own, not Prometheus's global one, and also holds the Go
// runtime and process collectors. Names are translated the Prometheus way:
// dots become underscores, units and _total are appended. Series carry no
// otel_scope_name and otel_scope_version labels (every sous series has the
// same scope: they only add bytes and cardinality to every query) unless
// scopeLabels asks for them.
func NewPrometheus(scopeLabels bool) (sdkmetric.Reader, http.Handler, error) {
	reg := prometheus.NewRegistry()
	if err := reg.Register(collectors.NewGoCollector()); err != nil {
		return nil, nil, err
	}
	if err := reg.Register(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})); err != nil {
		return nil, nil, err
	}
	opts := []otelprom.Option{
		otelprom.WithRegisterer(reg),
		otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithSuffixes),
	}
	if !scopeLabels {
		opts = append(opts, otelprom.WithoutScopeInfo())
	}
	exp, err := otelprom.New(opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	return exp, promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, EnableOpenMetrics: true}), nil
}
