package rabbitmq_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/rabbitmq"
)

// TestPauseHandsBackUncounted: while the worker's engine is down, Pause
// cancels the consumer and hands back what the broker had pushed, with no
// attempt counted; nothing arrives until Resume, and then everything does,
// still on its first attempt. A requeue for engine_down is uncounted too,
// and a requeue's extra headers travel with the copy.
func TestPauseHandsBackUncounted(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	q := uniqueQueue(t)
	d := open(t, rabbitmq.Config{Queue: q, DeadLetterQueue: q + ".dlq", Prefetch: 10, Consume: true})
	for i := range 5 {
		if err := d.Publish(ctx, queue.Message{To: q, MessageID: fmt.Sprint("m", i), Body: []byte("{}"), Persistent: true}); err != nil {
			t.Fatal(err)
		}
	}
	held := receiveOne(t, ctx, d) // one in the worker's hands, four pushed
	if err := d.Pause(ctx); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if err := d.Settle(ctx, held, queue.Settlement{Action: queue.Requeue, Reason: queue.ReasonEngineDown, Headers: map[string]string{"x-sous-answered": "invalid_json"}}); err != nil {
		t.Fatalf("requeue: %v", err)
	}
	ch := rawChannel(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		if st.Messages == 5 && st.Consumers == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue has %d ready, %d consumers after Pause; want 5 and 0", st.Messages, st.Consumers)
		}
		time.Sleep(50 * time.Millisecond)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	if ds, err := d.Receive(short, 10); err == nil {
		t.Fatalf("received %d deliveries while paused", len(ds))
	}
	cancel()
	if err := d.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	got := map[string]*queue.Delivery{}
	for len(got) < 5 {
		ds, err := d.Receive(ctx, 10)
		if err != nil {
			t.Fatalf("receive after resume: %v (have %d)", err, len(got))
		}
		for _, del := range ds {
			got[del.ID] = del
		}
	}
	for id, del := range got {
		if del.Attempt != 1 {
			t.Errorf("%s: attempt %d after the pause, want 1", id, del.Attempt)
		}
		if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Ack}); err != nil {
			t.Fatal(err)
		}
	}
	if got[held.ID].Headers["x-sous-answered"] != "invalid_json" {
		t.Errorf("the requeue's header was lost: %v", got[held.ID].Headers)
	}
}
