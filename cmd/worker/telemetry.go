package main

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"

	"github.com/sous-run/sous/internal/secret"
	"github.com/sous-run/sous/internal/sizing"
	"github.com/sous-run/sous/internal/telemetry"
)

// telemetryConfig holds the standard OpenTelemetry variables that decide
// what the worker exports. The SDK and its OTLP exporters read the rest
// themselves from the process environment: OTEL_EXPORTER_OTLP_HEADERS
// (often a secret; sous never reads or logs it), _TIMEOUT, _COMPRESSION,
// _CERTIFICATE, _INSECURE, OTEL_TRACES_SAMPLER_ARG, OTEL_BSP_*,
// OTEL_METRIC_EXPORT_INTERVAL and OTEL_RESOURCE_ATTRIBUTES. They are
// strings, checked by validate, so that a bad value is reported with its
// variable's name.
type telemetryConfig struct {
	// Disabled turns traces and metrics off, /metrics included
	// (OTEL_SDK_DISABLED, default false).
	Disabled string `env:"OTEL_SDK_DISABLED" envDefault:"false"`
	// ServiceName is service.name (OTEL_SERVICE_NAME, default sous-worker).
	ServiceName string `env:"OTEL_SERVICE_NAME"`
	// TracesExporter is otlp or none (OTEL_TRACES_EXPORTER; default otlp
	// when an OTLP endpoint is set, else none: no span is recorded).
	TracesExporter string `env:"OTEL_TRACES_EXPORTER"`
	// MetricsExporter is a comma-separated list of prometheus (served at
	// /metrics on SOUS_HTTP_ADDR), otlp and none (OTEL_METRICS_EXPORTER;
	// default prometheus, plus otlp when an OTLP endpoint is set).
	MetricsExporter string `env:"OTEL_METRICS_EXPORTER"`
	// Endpoint is the collector's base URL, such as
	// http://otel-collector:4318 (OTEL_EXPORTER_OTLP_ENDPOINT); the
	// signal-specific variables override it.
	Endpoint        string `env:"OTEL_EXPORTER_OTLP_ENDPOINT"`
	TracesEndpoint  string `env:"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"`
	MetricsEndpoint string `env:"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"`
	// Protocol is http/protobuf (default) or grpc
	// (OTEL_EXPORTER_OTLP_PROTOCOL); the signal-specific ones override it.
	Protocol        string `env:"OTEL_EXPORTER_OTLP_PROTOCOL" envDefault:"http/protobuf"`
	TracesProtocol  string `env:"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"`
	MetricsProtocol string `env:"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"`
	// Sampler is read by the SDK (OTEL_TRACES_SAMPLER, default
	// parentbased_always_on); always_off turns tracing off entirely.
	Sampler string `env:"OTEL_TRACES_SAMPLER"`
	// ScopeLabels puts otel_scope_name and otel_scope_version on every
	// series of /metrics (SOUS_METRICS_SCOPE_LABELS, default false: every
	// sous series has the same scope).
	ScopeLabels bool `env:"SOUS_METRICS_SCOPE_LABELS" envDefault:"false"`
}

var knownSamplers = []string{"always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"}

func (c telemetryConfig) validate() error {
	switch strings.ToLower(strings.TrimSpace(c.Disabled)) {
	case "true", "false", "":
	default:
		return bad("OTEL_SDK_DISABLED", "must be true or false")
	}
	switch c.TracesExporter {
	case "", "otlp", "none":
	default:
		return bad("OTEL_TRACES_EXPORTER", "%q is not supported; use otlp or none", c.TracesExporter)
	}
	for _, e := range c.metricsExporters() {
		if e != "prometheus" && e != "otlp" && e != "none" {
			return bad("OTEL_METRICS_EXPORTER", "%q is not supported; use prometheus, otlp or none", e)
		}
	}
	for _, p := range []struct{ name, v string }{
		{"OTEL_EXPORTER_OTLP_PROTOCOL", c.Protocol}, {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", c.TracesProtocol}, {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", c.MetricsProtocol},
	} {
		if p.v != "" && p.v != telemetry.ProtocolHTTP && p.v != telemetry.ProtocolGRPC {
			return bad(p.name, "%q is not supported; use %s or %s", p.v, telemetry.ProtocolHTTP, telemetry.ProtocolGRPC)
		}
	}
	if s := strings.ToLower(strings.TrimSpace(c.Sampler)); s != "" && !slices.Contains(knownSamplers, s) {
		return bad("OTEL_TRACES_SAMPLER", "%q is not a sampler the SDK knows; use one of %s", c.Sampler, strings.Join(knownSamplers, ", "))
	}
	return nil
}

func (c telemetryConfig) disabled() bool {
	return strings.EqualFold(strings.TrimSpace(c.Disabled), "true")
}

func (c telemetryConfig) metricsExporters() []string {
	var out []string
	for e := range strings.SplitSeq(c.MetricsExporter, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// tracesOn says whether spans are recorded and exported over OTLP.
func (c telemetryConfig) tracesOn() bool {
	if c.disabled() || strings.EqualFold(strings.TrimSpace(c.Sampler), "always_off") {
		return false
	}
	switch c.TracesExporter {
	case "otlp":
		return true
	case "none":
		return false
	}
	return c.Endpoint != "" || c.TracesEndpoint != ""
}

// metricReaders says where metrics go: the /metrics endpoint, OTLP, both
// or neither.
func (c telemetryConfig) metricReaders() (prom, otlp bool) {
	if c.disabled() {
		return false, false
	}
	list := c.metricsExporters()
	if len(list) == 0 {
		return true, c.Endpoint != "" || c.MetricsEndpoint != ""
	}
	return slices.Contains(list, "prometheus"), slices.Contains(list, "otlp")
}

func orDefault(v, def string) string {
	if v != "" {
		return v
	}
	return def
}

// observability is the worker's telemetry: the Observer the worker reports
// to, the /metrics handler (nil when off) and the providers to flush.
type observability struct {
	obs     *telemetry.Observer
	metrics http.Handler
	tp      *sdktrace.TracerProvider // nil when traces are off
	mp      *sdkmetric.MeterProvider // nil when metrics are off
}

// startTelemetry builds the providers the configuration asks for. With no
// OTLP endpoint set, no span is recorded and nothing leaves the process;
// metrics are kept for /metrics only. snapshot feeds the sizer gauges.
func startTelemetry(ctx context.Context, cfg Config, snapshot func() sizing.Snapshot, log *slog.Logger) (*observability, error) {
	tc := cfg.Telemetry
	o := &observability{}
	tcfg := telemetry.Config{System: cfg.Broker, Queue: cfg.Queue, EngineProvider: cfg.Engine, Model: cfg.Model}
	prom, otlpMetrics := tc.metricReaders()
	traces := tc.tracesOn()
	var res *resource.Resource
	if traces || prom || otlpMetrics {
		// The SDK reports export failures here; keep them in the JSON log.
		// (The SDK offers no other hook than this process-wide one.)
		otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
			log.Warn("opentelemetry", "err", err)
		}))
		res = newResource(ctx, cfg, log)
	}
	if traces {
		exp, err := telemetry.NewSpanExporter(ctx, orDefault(tc.TracesProtocol, tc.Protocol))
		if err != nil {
			return nil, bad("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "%v", err)
		}
		// The sampler comes from OTEL_TRACES_SAMPLER(_ARG).
		o.tp = sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
		tcfg.TracerProvider = o.tp
	}
	var readers []sdkmetric.Option
	if prom {
		r, h, err := telemetry.NewPrometheus(cfg.Telemetry.ScopeLabels)
		if err != nil {
			return nil, err
		}
		readers = append(readers, sdkmetric.WithReader(r))
		o.metrics = h
	}
	if otlpMetrics {
		exp, err := telemetry.NewMetricExporter(ctx, orDefault(tc.MetricsProtocol, tc.Protocol))
		if err != nil {
			return nil, bad("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "%v", err)
		}
		// The interval comes from OTEL_METRIC_EXPORT_INTERVAL (default 60s).
		readers = append(readers, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)))
	}
	if len(readers) > 0 {
		o.mp = sdkmetric.NewMeterProvider(append(readers, sdkmetric.WithResource(res))...)
		tcfg.MeterProvider = o.mp
	}
	obs, err := telemetry.New(tcfg)
	if err != nil {
		o.close(log)
		return nil, err
	}
	if err := obs.ObserveSizer(snapshot); err != nil {
		o.close(log)
		return nil, err
	}
	o.obs = obs
	endpoint := "none"
	if e := orDefault(tc.TracesEndpoint, tc.Endpoint); e != "" {
		endpoint = secret.URL(e)
	}
	log.Info("telemetry",
		"traces", onOff(traces), "traces_endpoint", endpoint,
		"metrics_endpoint", onOff(prom), "metrics_otlp", onOff(otlpMetrics))
	return o, nil
}

// close flushes what is buffered (the last spans of a drain) and stops the
// exporters, within a few seconds.
func (o *observability) close(log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	if o.tp != nil {
		errs = append(errs, o.tp.Shutdown(ctx))
	}
	if o.mp != nil {
		errs = append(errs, o.mp.Shutdown(ctx))
	}
	if err := errors.Join(errs...); err != nil {
		log.Warn("telemetry shutdown", "err", err)
	}
}

// newResource describes the worker. A malformed OTEL_RESOURCE_ATTRIBUTES
// is logged and the rest kept, as the specification asks.
func newResource(ctx context.Context, cfg Config, log *slog.Logger) *resource.Resource {
	version := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		version = bi.Main.Version
	}
	// Defaults first, so that OTEL_RESOURCE_ATTRIBUTES and
	// OTEL_SERVICE_NAME override them.
	opts := []resource.Option{
		resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithAttributes(semconv.ServiceName("sous-worker"), semconv.ServiceVersion(version), semconv.ServiceInstanceID(cfg.WorkerID)),
		resource.WithFromEnv(),
		resource.WithTelemetrySDK(),
	}
	if cfg.Telemetry.ServiceName != "" {
		opts = append(opts, resource.WithAttributes(semconv.ServiceName(cfg.Telemetry.ServiceName)))
	}
	res, err := resource.New(ctx, opts...)
	if err != nil {
		log.Warn("telemetry resource", "err", err)
	}
	if res == nil {
		res = resource.Default()
	}
	return res
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
