// Package telemetry turns the worker's events into OpenTelemetry traces and
// metrics, and adds trace ids to logs.
//
// Observer implements worker.Observer. For each delivery it continues the
// producer's trace from the W3C trace context in the message headers
// (traceparent, tracestate) and starts a "process <queue>" consumer span
// that lasts until the delivery is settled; the result's publish span is its
// child and its context goes into the result's headers, so the producer's
// span, the worker's spans and the result form one trace. A batch gets its
// own span, linked to every message span it serves (and each message span
// links back to it); the batch span is the message span's child when the
// batch holds one message. Engine calls are GenAI client spans under the
// batch span. Span and attribute names follow the OpenTelemetry semantic
// conventions: messaging from semconv v1.43.0, which matches the SDK, and
// gen_ai from v1.41.0, the last Go semconv package that has them (v1.42.0
// moved the GenAI conventions to their own repository).
//
// Without a TracerProvider no span is recorded, yet trace context still
// flows: a request's traceparent is passed on to its result and appears in
// the worker's logs. Without a MeterProvider no metric is recorded.
//
// No message body, prompt, header other than trace context, or secret is
// ever put in a span or metric. Metric attributes have bounded values:
// models come from the allowed list, reasons and error types are codes.
//
// Concurrency: an Observer is safe for concurrent use once New returns;
// ObserveSizer is meant to be called once, before the worker runs.
// LogHandler is as safe as the handler it wraps.
package telemetry
