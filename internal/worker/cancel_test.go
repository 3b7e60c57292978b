package worker_test

import (
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/queuetest"
	"github.com/sous-run/sous/internal/wire"
	"github.com/sous-run/sous/internal/worker"
)

func withCorrelation(c string) func(*queue.Delivery) {
	return func(d *queue.Delivery) { d.CorrelationID = c }
}

// A producer's cancellation takes its requests out: those waiting for a
// slot at once, those that arrive later on arrival, each answered
// "cancelled" and acked (no dead letter); the others run.
func TestCancelledRequests(t *testing.T) {
	t.Parallel()
	e := newGateEngine()
	b := queuetest.NewMemBroker()
	w, s, _ := startWorker(t, worker.Config{}, b, e, 0)
	b.Send("a1", `{"prompt":"a1"}`, withCorrelation("sous-batch:B1:0:t"))
	b.Send("a2", `{"prompt":"a2"}`, withCorrelation("sous-batch:B1:1:t"))
	b.Send("b1", `{"prompt":"b1"}`, withCorrelation("sous-batch:B10:0:t"))
	waitWaiting(t, w, 3)
	w.Cancel(wire.Cancel{Prefix: "sous-batch:B1:", Until: time.Now().Add(time.Hour)})
	b.WaitSettled(t, 2)
	b.Send("a3", `{"prompt":"a3"}`, withCorrelation("sous-batch:B1:2:t"))
	b.WaitSettled(t, 3)
	res := results(t, b)
	for _, id := range []string{"a1", "a2", "a3"} {
		st, ok := b.Settlement(id)
		if !ok || st.Action != queue.Ack {
			t.Fatalf("%s: %+v, want acked", id, st)
		}
		r := res["sous-batch:B1:"+map[string]string{"a1": "0", "a2": "1", "a3": "2"}[id]+":t"]
		if r.Status != wire.StatusError || r.Error == nil || r.Error.Code != wire.ReasonCancelled {
			t.Fatalf("%s's result: %+v, want a %q error", id, r, wire.ReasonCancelled)
		}
	}
	s.set(1)
	w.SizeChanged()
	b.WaitSettled(t, 4)
	started, _, _ := e.snapshot()
	if len(started) != 1 || started[0] != "b1" {
		t.Fatalf("the engine ran %q, want only b1 (B10 is not B1)", started)
	}
	// An expired cancel, or one with too short a prefix, is not taken.
	w.Cancel(wire.Cancel{Prefix: "sous-batch:B10:", Until: time.Now().Add(-time.Second)})
	b.Send("b2", `{"prompt":"b2"}`, withCorrelation("sous-batch:B10:1:t"))
	b.WaitSettled(t, 5)
	if st, _ := b.Settlement("b2"); st.Action != queue.Ack || results(t, b)["sous-batch:B10:1:t"].Status != wire.StatusOK {
		t.Fatalf("b2 after an expired cancel: %+v", st)
	}
	if _, err := wire.DecodeCancel([]byte(`{"prefix":"sous","until":"2030-01-01T00:00:00Z"}`)); err == nil {
		t.Fatal("a 4-byte prefix was accepted")
	}
}
