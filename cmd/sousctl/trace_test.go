package main

import (
	"context"
	"io"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestProducerTraceInjectsTraceparent(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	tr := startTrace(context.Background(), io.Discard)
	id := tr.traceID()
	if len(id) != 32 || strings.Trim(id, "0") == "" {
		t.Fatalf("trace id %q", id)
	}
	seen := map[string]bool{}
	for _, req := range []string{"r1", "r2"} {
		h, end := tr.send("sous.requests", req)
		tp, _ := h["traceparent"].(string)
		// 00-<trace id>-<span id>-<flags>: every request in the run's
		// trace, each with its own producer span, sampled.
		parts := strings.Split(tp, "-")
		if len(parts) != 4 || parts[1] != id || parts[3] != "01" {
			t.Fatalf("%s: traceparent %q, want one in trace %s, sampled", req, tp, id)
		}
		if seen[parts[2]] {
			t.Errorf("%s: producer span %s reused", req, parts[2])
		}
		seen[parts[2]] = true
		end(nil)
	}
	tr.finish("")

	var nilTrace *producerTrace
	if h, end := nilTrace.send("q", "x"); h != nil {
		t.Errorf("nil trace gave headers %v", h)
	} else {
		end(nil)
	}
	nilTrace.finish("")
}
