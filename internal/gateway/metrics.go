package gateway

import (
	"context"
	"net/http"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// metrics are the gateway's instruments. Their attributes are the route,
// the status, the error code and, with lanes, the lane (sous.lane, one of
// SOUS_GATEWAY_LANES: an unknown lane is a 400 without it): never a key,
// a key's name or a model a client made up (unknown models are a 404
// without the model).
type metrics struct {
	requests metric.Int64Counter
	duration metric.Float64Histogram
	open     metric.Int64UpDownCounter
}

func newMetrics(m metric.Meter) metrics {
	if m == nil {
		m = noop.NewMeterProvider().Meter("")
	}
	var out metrics
	// Instrument creation fails only for invalid names; these are constant.
	out.requests, _ = m.Int64Counter("sous.gateway.requests", metric.WithUnit("{request}"),
		metric.WithDescription("HTTP requests answered, by route, status and error code"))
	out.duration, _ = m.Float64Histogram("sous.gateway.request.duration", metric.WithUnit("s"),
		metric.WithDescription("time from the HTTP request to the end of its answer (a stream's last event)"),
		metric.WithExplicitBucketBoundaries(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
	out.open, _ = m.Int64UpDownCounter("sous.gateway.open_requests", metric.WithUnit("{request}"),
		metric.WithDescription("requests waiting for or streaming their answer"))
	return out
}

// outcome is what a request ended with, for the metrics.
type outcome struct {
	status int
	code   string // the error's code; empty on success
	lane   string // the lane it was sent to; empty without lanes, or before one was chosen
}

func (m metrics) record(route string, start time.Time, o outcome) {
	kv := []attribute.KeyValue{
		attribute.String("http.route", route),
		attribute.Int("http.response.status_code", o.status),
		attribute.String("error.type", o.code),
	}
	if o.lane != "" {
		kv = append(kv, attribute.String("sous.lane", o.lane))
	}
	attrs := metric.WithAttributes(kv...)
	ctx := context.Background()
	m.requests.Add(ctx, 1, attrs)
	m.duration.Record(ctx, time.Since(start).Seconds(), attrs)
}

// statusRecorder remembers the status a handler wrote, and the lane.
type statusRecorder struct {
	http.ResponseWriter
	status int
	lane   string
}

// setLane notes the request's lane for the metrics.
func setLane(w http.ResponseWriter, lane string) {
	if r, ok := w.(*statusRecorder); ok {
		r.lane = lane
	}
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach Flush and the deadlines.
func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }
