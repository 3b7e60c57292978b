// Package queuetest is the contract every queue driver passes: the same
// behaviour over RabbitMQ and Service Bus (watermill's pubsub/tests idea).
// A driver's test calls Run with a Harness that opens drivers on a real
// broker (or, for Service Bus, a protocol test double).
package queuetest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
)

// Driver is what the suite needs of a queue driver.
type Driver interface {
	Receive(ctx context.Context, max int) ([]*queue.Delivery, error)
	Publish(ctx context.Context, m queue.Message) error
	Settle(ctx context.Context, d *queue.Delivery, s queue.Settlement) error
	StopReceiving(ctx context.Context) error
}

// Harness opens drivers for the suite.
type Harness struct {
	// Queue returns a fresh queue name for one test.
	Queue func(t *testing.T) string
	// Open returns a driver consuming name, with prefetch as its receive
	// window. It is closed by t.Cleanup.
	Open func(t *testing.T, name string, prefetch int) Driver
	// OpenDeadLetters returns a driver consuming name's dead-letter queue.
	OpenDeadLetters func(t *testing.T, name string) Driver
	// Timeout bounds each wait; default 10s.
	Timeout time.Duration
}

// Run runs the contract.
func Run(t *testing.T, h Harness) {
	if h.Timeout == 0 {
		h.Timeout = 10 * time.Second
	}
	t.Run("RoundTrip", func(t *testing.T) { t.Parallel(); roundTrip(t, h) })
	t.Run("RequeueRedelivers", func(t *testing.T) { t.Parallel(); requeue(t, h) })
	t.Run("DeadLetterReason", func(t *testing.T) { t.Parallel(); deadLetter(t, h) })
	t.Run("ReplyRouting", func(t *testing.T) { t.Parallel(); replyRouting(t, h) })
	t.Run("AckRemoves", func(t *testing.T) { t.Parallel(); ackRemoves(t, h) })
	t.Run("StopReceivingReturnsPrefetched", func(t *testing.T) { t.Parallel(); drain(t, h) })
}

func ctxT(t *testing.T, h Harness) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	t.Cleanup(cancel)
	return ctx
}

func publish(t *testing.T, ctx context.Context, d Driver, to, id, body string) {
	t.Helper()
	err := d.Publish(ctx, queue.Message{To: to, MessageID: id, CorrelationID: "corr-" + id, ReplyTo: to + ".replies",
		ContentType: "application/json", Body: []byte(body), Headers: map[string]string{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, Persistent: true})
	if err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
}

// receiveN collects exactly n deliveries or fails.
func receiveN(t *testing.T, ctx context.Context, d Driver, n int) []*queue.Delivery {
	t.Helper()
	var out []*queue.Delivery
	for len(out) < n {
		got, err := d.Receive(ctx, n-len(out))
		if err != nil {
			t.Fatalf("receive (have %d of %d): %v", len(out), n, err)
		}
		if len(got) > n-len(out) {
			t.Fatalf("Receive returned %d deliveries, asked for at most %d", len(got), n-len(out))
		}
		out = append(out, got...)
	}
	return out
}

// receiveNone asserts nothing arrives within a short while.
func receiveNone(t *testing.T, d Driver, within time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	got, err := d.Receive(ctx, 10)
	if err == nil {
		t.Fatalf("expected no delivery, got %d (first id %q)", len(got), got[0].ID)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("receive: %v", err)
	}
}

func settle(t *testing.T, ctx context.Context, d Driver, del *queue.Delivery, s queue.Settlement) {
	t.Helper()
	if err := d.Settle(ctx, del, s); err != nil {
		t.Fatalf("settle %s %s: %v", del.ID, s.Action, err)
	}
}

func roundTrip(t *testing.T, h Harness) {
	ctx := ctxT(t, h)
	q := h.Queue(t)
	d := h.Open(t, q, 4)
	publish(t, ctx, d, q, "m1", `{"prompt":"hi"}`)
	got := receiveN(t, ctx, d, 1)[0]
	if got.ID != "m1" || got.CorrelationID != "corr-m1" || got.ReplyTo != q+".replies" || string(got.Body) != `{"prompt":"hi"}` || got.ContentType != "application/json" {
		t.Fatalf("delivery fields lost: %+v", got)
	}
	if got.Headers["traceparent"] == "" {
		t.Errorf("string header lost: %v", got.Headers)
	}
	if got.Attempt != 1 {
		t.Errorf("first delivery has Attempt %d, want 1", got.Attempt)
	}
	if got.CorrelationKey() != "corr-m1" {
		t.Errorf("CorrelationKey = %q", got.CorrelationKey())
	}
	settle(t, ctx, d, got, queue.Settlement{Action: queue.Ack})
}

func requeue(t *testing.T, h Harness) {
	ctx := ctxT(t, h)
	q := h.Queue(t)
	d := h.Open(t, q, 1)
	publish(t, ctx, d, q, "r1", `{}`)
	for want := 1; want <= 3; want++ {
		got := receiveN(t, ctx, d, 1)[0]
		if got.ID != "r1" || got.Attempt != want {
			t.Fatalf("delivery %d: id %q attempt %d", want, got.ID, got.Attempt)
		}
		if want < 3 {
			settle(t, ctx, d, got, queue.Settlement{Action: queue.Requeue, Reason: "engine_unavailable"})
		} else {
			settle(t, ctx, d, got, queue.Settlement{Action: queue.Ack})
		}
	}
}

func deadLetter(t *testing.T, h Harness) {
	ctx := ctxT(t, h)
	q := h.Queue(t)
	d := h.Open(t, q, 2)
	publish(t, ctx, d, q, "bad", `not json`)
	got := receiveN(t, ctx, d, 1)[0]
	settle(t, ctx, d, got, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "body is not JSON"})
	dl := h.OpenDeadLetters(t, q)
	dead := receiveN(t, ctx, dl, 1)[0]
	if dead.ID != "bad" || string(dead.Body) != "not json" {
		t.Fatalf("dead letter lost its message: %+v", dead)
	}
	if dead.Headers[queue.HeaderDeadLetterReason] != "invalid_json" || dead.Headers[queue.HeaderDeadLetterDescription] != "body is not JSON" {
		t.Fatalf("dead-letter reason headers missing: %v", dead.Headers)
	}
	settle(t, ctx, dl, dead, queue.Settlement{Action: queue.Ack})
	receiveNone(t, d, 300*time.Millisecond)
}

func replyRouting(t *testing.T, h Harness) {
	ctx := ctxT(t, h)
	q := h.Queue(t)
	replies := h.Queue(t)
	d := h.Open(t, q, 2)
	r := h.Open(t, replies, 2)
	err := d.Publish(ctx, queue.Message{To: replies, CorrelationID: "c-42", MessageID: "res-1", ContentType: "application/json", Body: []byte(`{"status":"ok"}`), Persistent: true})
	if err != nil {
		t.Fatalf("publish reply: %v", err)
	}
	got := receiveN(t, ctx, r, 1)[0]
	if got.CorrelationID != "c-42" || string(got.Body) != `{"status":"ok"}` {
		t.Fatalf("reply lost its correlation: %+v", got)
	}
	settle(t, ctx, r, got, queue.Settlement{Action: queue.Ack})
}

func ackRemoves(t *testing.T, h Harness) {
	ctx := ctxT(t, h)
	q := h.Queue(t)
	d := h.Open(t, q, 8)
	for i := range 5 {
		publish(t, ctx, d, q, fmt.Sprint("a", i), `{}`)
	}
	seen := map[string]bool{}
	for _, del := range receiveN(t, ctx, d, 5) {
		seen[del.ID] = true
		settle(t, ctx, d, del, queue.Settlement{Action: queue.Ack})
	}
	if len(seen) != 5 {
		t.Fatalf("got %d distinct deliveries, want 5: %v", len(seen), seen)
	}
	receiveNone(t, d, 300*time.Millisecond)
}

func drain(t *testing.T, h Harness) {
	ctx := ctxT(t, h)
	q := h.Queue(t)
	d := h.Open(t, q, 4)
	for i := range 4 {
		publish(t, ctx, d, q, fmt.Sprint("p", i), `{}`)
	}
	// Take one; the driver may hold the other three as prefetched.
	first := receiveN(t, ctx, d, 1)[0]
	if err := d.StopReceiving(ctx); err != nil {
		t.Fatalf("StopReceiving: %v", err)
	}
	if _, err := d.Receive(ctx, 1); !errors.Is(err, queue.ErrClosed) {
		t.Fatalf("Receive after StopReceiving = %v, want ErrClosed", err)
	}
	// In-flight work can still settle after the stop.
	settle(t, ctx, d, first, queue.Settlement{Action: queue.Ack})
	other := h.Open(t, q, 8)
	got := receiveN(t, ctx, other, 3)
	for _, del := range got {
		if del.ID == first.ID {
			t.Fatalf("acked delivery %s came back", del.ID)
		}
		settle(t, ctx, other, del, queue.Settlement{Action: queue.Ack})
	}
}
