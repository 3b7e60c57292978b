package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/sous-run/sous/internal/telemetry"
)

// producerTrace is the trace one `sousctl publish` starts: a root span for
// the run and a producer span per request, whose context goes into the
// request's traceparent header so that the worker continues the trace.
// Spans are exported over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (and OTEL_TRACES_EXPORTER is
// not none); otherwise they are made but not sent, so that the trace id
// still ties the worker's spans and logs together. A nil *producerTrace
// does nothing.
type producerTrace struct {
	tp     *sdktrace.TracerProvider
	tracer trace.Tracer
	ctx    context.Context
	root   trace.Span
}

func startTrace(ctx context.Context, stderr io.Writer) *producerTrace {
	var opts []sdktrace.TracerProviderOption
	endpoint := os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") + os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	if endpoint != "" && os.Getenv("OTEL_TRACES_EXPORTER") != "none" {
		protocol := os.Getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
		if protocol == "" {
			protocol = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
		}
		exp, err := telemetry.NewSpanExporter(ctx, protocol)
		if err != nil {
			fmt.Fprintf(stderr, "sousctl: telemetry: %v; spans are not exported\n", err)
		} else {
			opts = append(opts, sdktrace.WithBatcher(exp))
			otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
				fmt.Fprintf(stderr, "sousctl: telemetry: %v\n", err)
			}))
		}
	}
	res, _ := resource.New(ctx,
		resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithAttributes(semconv.ServiceName("sousctl")),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if res != nil {
		opts = append(opts, sdktrace.WithResource(res))
	}
	// Every request's trace is recorded by default (parentbased_always_on):
	// the worker records its part too, whether or not sousctl exports its
	// own spans.
	t := &producerTrace{tp: sdktrace.NewTracerProvider(opts...)}
	t.tracer = t.tp.Tracer("github.com/sous-run/sous/cmd/sousctl", trace.WithSchemaURL(semconv.SchemaURL))
	t.ctx, t.root = t.tracer.Start(ctx, "sousctl publish")
	return t
}

// traceID is the run's trace id in hex.
func (t *producerTrace) traceID() string {
	if t == nil {
		return ""
	}
	return t.root.SpanContext().TraceID().String()
}

// send starts the producer span of request id published to queue and
// returns the headers that carry its context; end ends the span.
func (t *producerTrace) send(queue, id string) (_ amqp.Table, end func(error)) {
	if t == nil {
		return nil, func(error) {}
	}
	ctx, span := t.tracer.Start(t.ctx, "publish "+queue,
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(
			semconv.MessagingSystemRabbitMQ,
			semconv.MessagingOperationTypeSend,
			semconv.MessagingOperationName("publish"),
			semconv.MessagingDestinationName(queue),
			semconv.MessagingRabbitMQDestinationRoutingKey(queue),
			semconv.MessagingMessageID(id),
		))
	carrier := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, carrier)
	h := make(amqp.Table, len(carrier))
	for k, v := range carrier {
		h[k] = v
	}
	return h, func(err error) {
		if err != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		span.End()
	}
}

// finish ends the run's span, marked failed when failure (already
// scrubbed of secrets) is not empty, and flushes the spans to the
// collector within a few seconds.
func (t *producerTrace) finish(failure string) {
	if t == nil {
		return
	}
	if failure != "" {
		t.root.SetStatus(codes.Error, failure)
	}
	t.root.End()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = t.tp.Shutdown(ctx)
}
