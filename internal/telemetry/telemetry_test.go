package telemetry_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/queue"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const (
	producerTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	producerSpan  = "00f067aa0ba902b7"
	traceparent   = "00-" + producerTrace + "-" + producerSpan + "-01"
)

func attrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	out := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		out[kv.Key] = kv.Value
	}
	return out
}

// wantAttrs checks that s has each attribute of want, with its value.
func wantAttrs(t *testing.T, s sdktrace.ReadOnlySpan, want map[string]any) {
	t.Helper()
	got := attrs(s)
	for k, v := range want {
		g, ok := got[attribute.Key(k)]
		if !ok {
			t.Errorf("span %q: no attribute %s (has %v)", s.Name(), k, s.Attributes())
			continue
		}
		if g.AsInterface() != v {
			t.Errorf("span %q: %s = %v (%T), want %v (%T)", s.Name(), k, g.AsInterface(), g.AsInterface(), v, v)
		}
	}
}

func TestMessageContinuesProducerTrace(t *testing.T) {
	t.Parallel()
	h := setup(t, options{})
	h.b.Send("m1", `{"prompt":"hello"}`, withHeader("traceparent", traceparent), withHeader("tracestate", "vendor=x"), withReplyTo("amq.rabbitmq.reply-to.g1h2AA"), func(d *queue.Delivery) { d.CorrelationID = "c1" })
	h.waitSpans(t, "process requests", 1)

	names := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range h.spans.Ended() {
		if s.SpanContext().TraceID().String() != producerTrace {
			t.Errorf("span %q is in trace %s, want the producer's %s", s.Name(), s.SpanContext().TraceID(), producerTrace)
		}
		names[s.Name()] = s
	}
	for _, n := range []string{"process requests", "batch tiny", "text_completion tiny", "publish", "ack requests"} {
		if names[n] == nil {
			t.Fatalf("no span %q; spans: %v", n, keys(names))
		}
	}
	process := names["process requests"]
	if process.Parent().SpanID().String() != producerSpan || !process.Parent().IsRemote() {
		t.Errorf("process span's parent is %v, want the producer's span %s", process.Parent(), producerSpan)
	}
	if process.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("process span kind %v", process.SpanKind())
	}
	wantAttrs(t, process, map[string]any{
		"messaging.system":                  "rabbitmq",
		"messaging.destination.name":        "requests",
		"messaging.operation.type":          "process",
		"messaging.operation.name":          "process",
		"messaging.message.id":              "m1",
		"messaging.message.conversation_id": "c1",
		"sous.attempt":                      int64(1),
		"sous.settle.action":                "ack",
		"gen_ai.request.model":              "tiny",
		"gen_ai.usage.input_tokens":         int64(3),
		"gen_ai.usage.output_tokens":        int64(5),
	})
	if process.Status().Code == codes.Error {
		t.Errorf("process span status %v", process.Status())
	}

	bt := names["batch tiny"]
	if bt.Parent().SpanID() != process.SpanContext().SpanID() {
		t.Errorf("a one-message batch should be the message span's child; parent %v", bt.Parent())
	}
	wantAttrs(t, bt, map[string]any{"messaging.batch.message_count": int64(1), "sous.batch.reason": "idle", "gen_ai.request.model": "tiny"})
	if !linksTo(bt, process) || !linksTo(process, bt) {
		t.Error("batch and message spans should link to each other")
	}

	engine := names["text_completion tiny"]
	if engine.Parent().SpanID() != bt.SpanContext().SpanID() || engine.SpanKind() != trace.SpanKindClient {
		t.Errorf("engine span: parent %v kind %v, want a client child of the batch span", engine.Parent(), engine.SpanKind())
	}
	wantAttrs(t, engine, map[string]any{
		"gen_ai.operation.name":      "text_completion",
		"gen_ai.provider.name":       "ollama",
		"gen_ai.request.model":       "tiny",
		"gen_ai.usage.input_tokens":  int64(3),
		"gen_ai.usage.output_tokens": int64(5),
	})

	pub := names["publish"] // the reply-to address stays out of the name
	if pub.Parent().SpanID() != process.SpanContext().SpanID() || pub.SpanKind() != trace.SpanKindProducer {
		t.Errorf("publish span: parent %v kind %v", pub.Parent(), pub.SpanKind())
	}
	wantAttrs(t, pub, map[string]any{
		"messaging.operation.type":        "send",
		"messaging.operation.name":        "publish",
		"messaging.destination.name":      "amq.rabbitmq.reply-to.g1h2AA",
		"messaging.destination.temporary": true,
		"messaging.message.id":            "c1/result",
		"sous.result.status":              "ok",
	})

	settle := names["ack requests"]
	if settle.Parent().SpanID() != process.SpanContext().SpanID() {
		t.Errorf("settle span's parent %v", settle.Parent())
	}
	wantAttrs(t, settle, map[string]any{"messaging.operation.type": "settle", "messaging.operation.name": "ack", "messaging.message.id": "m1"})

	// The result carries the publish span's context: the producer's
	// consumer continues the same trace.
	res, ok := h.b.Result("c1")
	if !ok {
		t.Fatal("no result published")
	}
	want := "00-" + producerTrace + "-" + pub.SpanContext().SpanID().String() + "-01"
	if res.Headers["traceparent"] != want {
		t.Errorf("result traceparent %q, want %q", res.Headers["traceparent"], want)
	}
	if res.Headers["tracestate"] != "vendor=x" {
		t.Errorf("result tracestate %q, want the request's", res.Headers["tracestate"])
	}

	// Logs written while the message was handled carry its trace id.
	if !strings.Contains(h.logs.String(), `"trace_id":"`+producerTrace+`"`) {
		t.Errorf("no log line with the trace id:\n%s", h.logs)
	}
}

func TestBatchLinksEveryMessage(t *testing.T) {
	t.Parallel()
	h := setup(t, options{batchSize: 3, batchWait: time.Hour, startLater: true})
	traces := []string{"11111111111111111111111111111111", "22222222222222222222222222222222", "33333333333333333333333333333333"}
	for i, tr := range traces {
		h.b.Send(string(rune('a'+i)), `{"prompt":"x"}`, withHeader("traceparent", "00-"+tr+"-"+producerSpan+"-01"))
	}
	h.start()
	h.waitSpans(t, "process requests", 3)
	batches := h.ended("batch tiny")
	if len(batches) != 1 {
		t.Fatalf("%d batch spans, want 1", len(batches))
	}
	bt := batches[0]
	if bt.Parent().IsValid() {
		t.Errorf("a batch of several traces should be a root; parent %v", bt.Parent())
	}
	wantAttrs(t, bt, map[string]any{"messaging.batch.message_count": int64(3), "sous.batch.reason": "full"})
	for _, p := range h.ended("process requests") {
		if !linksTo(bt, p) || !linksTo(p, bt) {
			t.Errorf("batch span and the span of trace %s are not linked both ways", p.SpanContext().TraceID())
		}
	}
	engine := h.ended("text_completion tiny")
	if len(engine) != 1 || engine[0].SpanContext().TraceID() != bt.SpanContext().TraceID() {
		t.Fatalf("engine span should be in the batch's trace: %v", engine)
	}
	wantAttrs(t, engine[0], map[string]any{"gen_ai.usage.input_tokens": int64(9), "gen_ai.usage.output_tokens": int64(15), "messaging.batch.message_count": int64(3)})
}

func TestErrorsRecordedWithClass(t *testing.T) {
	t.Parallel()
	// A request the engine refuses as wrong (the default model missing would
	// be the worker's fault, not the request's).
	notFound := &inference.Error{Kind: inference.Permanent, Code: "engine_rejected", Status: 400, Err: errors.New(`invalid option`)}
	down := &inference.Error{Kind: inference.Retryable, Code: "engine_unavailable", Err: errors.New("connection refused")}
	cases := []struct {
		name       string
		body       string
		attempt    int
		engineErr  error
		action     string
		errorType  string
		class      string
		engineSpan bool
	}{
		{name: "bad input", body: `nope`, action: "dead_letter", errorType: "invalid_json", class: "input"},
		{name: "permanent", body: `{"prompt":"x"}`, engineErr: notFound, action: "dead_letter", errorType: "engine_rejected", class: "permanent", engineSpan: true},
		{name: "retryable", body: `{"prompt":"x"}`, engineErr: down, action: "requeue", errorType: "engine_unavailable", class: "retryable", engineSpan: true},
		{name: "last attempt", body: `{"prompt":"x"}`, attempt: 3, engineErr: down, action: "dead_letter", errorType: "max_attempts", class: "retryable", engineSpan: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := &fakeEngine{answer: func(reqs []inference.Request) ([]inference.Result, error) { return nil, tc.engineErr }}
			h := setup(t, options{engine: e})
			h.b.Send("m", tc.body, withAttempt(max(1, tc.attempt)))
			h.waitSpans(t, "process requests", 1)
			p := h.ended("process requests")[0]
			if p.Status().Code != codes.Error || !strings.HasPrefix(p.Status().Description, tc.errorType) {
				t.Errorf("status %+v, want an error starting with %s", p.Status(), tc.errorType)
			}
			wantAttrs(t, p, map[string]any{"sous.settle.action": tc.action, "error.type": tc.errorType, "sous.error.class": tc.class})
			if !tc.engineSpan {
				return
			}
			es := h.ended("text_completion tiny")
			if len(es) != 1 || es[0].Status().Code != codes.Error {
				t.Fatalf("engine span %v, want one with an error status", es)
			}
			wantAttrs(t, es[0], map[string]any{"error.type": inference.CodeOf(tc.engineErr), "sous.error.class": inference.KindOf(tc.engineErr).String()})
		})
	}
}

// Without a tracer, nothing is recorded, yet the request's trace context
// still reaches its result and the logs.
func TestWithoutTracingContextStillFlows(t *testing.T) {
	t.Parallel()
	h := setup(t, options{noTracing: true})
	h.b.Send("m1", `{"prompt":"hello"}`, withHeader("traceparent", traceparent))
	waitFor(t, "settlement", func() bool { _, ok := h.b.Settlement("m1"); return ok })
	if n := len(h.spans.Ended()) + len(h.spans.Started()); n != 0 {
		t.Errorf("%d spans recorded without a tracer", n)
	}
	res, _ := h.b.Result("m1")
	if res.Headers["traceparent"] != traceparent {
		t.Errorf("result traceparent %q, want the request's %q", res.Headers["traceparent"], traceparent)
	}
}

// A message without trace context starts a trace of its own, which the
// result carries.
func TestMessageWithoutTraceContext(t *testing.T) {
	t.Parallel()
	h := setup(t, options{})
	h.b.Send("m1", `{"prompt":"hello"}`)
	h.waitSpans(t, "process requests", 1)
	p := h.ended("process requests")[0]
	if p.Parent().IsValid() {
		t.Errorf("process span has parent %v, want a root", p.Parent())
	}
	res, _ := h.b.Result("m1")
	sc := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier(res.Headers)))
	if sc.TraceID() != p.SpanContext().TraceID() {
		t.Errorf("result trace %v, want the message's %v", sc.TraceID(), p.SpanContext().TraceID())
	}
}

func TestStreamChunksCarryTraceContext(t *testing.T) {
	t.Parallel()
	e := &fakeEngine{answer: func(reqs []inference.Request) ([]inference.Result, error) {
		out := make([]inference.Result, len(reqs))
		for i, r := range reqs {
			r.Stream("a")
			r.Stream("b")
			out[i].Response.Text = "ab"
		}
		return out, nil
	}}
	h := setup(t, options{engine: e})
	h.b.Send("s", `{"prompt":"x","stream":true}`, withHeader("traceparent", traceparent))
	h.waitSpans(t, "process requests", 1)
	chunks := 0
	for _, m := range h.b.Published() {
		if m.Headers["x-sous-status"] != "chunk" {
			continue
		}
		chunks++
		if !strings.Contains(m.Headers["traceparent"], producerTrace) {
			t.Errorf("chunk without the trace: %v", m.Headers)
		}
		var c map[string]any
		if err := json.Unmarshal(m.Body, &c); err != nil {
			t.Fatal(err)
		}
	}
	if chunks == 0 {
		t.Fatal("no chunks published")
	}
	if n := len(h.ended("publish results")); n != 1 {
		t.Errorf("%d publish spans, want 1: chunks get none", n)
	}
}

func linksTo(from, to sdktrace.ReadOnlySpan) bool {
	for _, l := range from.Links() {
		if l.SpanContext.SpanID() == to.SpanContext().SpanID() && l.SpanContext.TraceID() == to.SpanContext().TraceID() {
			return true
		}
	}
	return false
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
