package servicebus

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/secret"
)

// TestLive runs against a real Service Bus namespace when
// SOUS_TEST_SERVICEBUS_CONNECTION_STRING and SOUS_TEST_SERVICEBUS_QUEUE are
// set. The queue must exist, with the default lock duration or longer, and
// be one this test may use: it abandons messages that are not its own. It
// holds one message past its first lock, so it runs for up to the queue's
// lock duration (60s by default).
func TestLive(t *testing.T) {
	cs, q := os.Getenv("SOUS_TEST_SERVICEBUS_CONNECTION_STRING"), os.Getenv("SOUS_TEST_SERVICEBUS_QUEUE")
	if cs == "" || q == "" {
		t.Skip("live Azure Service Bus test skipped: set SOUS_TEST_SERVICEBUS_CONNECTION_STRING and SOUS_TEST_SERVICEBUS_QUEUE (an existing queue the test may use) to run it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	open := func(queue string) *Driver {
		t.Helper()
		d, err := New(ctx, Config{ConnectionString: secret.Value(cs), Queue: queue, LockRenewInterval: 2 * time.Second}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = d.Close(context.WithoutCancel(ctx)) })
		return d
	}
	d := open(q)
	if err := d.Ready(ctx); err != nil {
		t.Fatalf("Ready: %v", err)
	}

	id := fmt.Sprintf("sous-live-%d", time.Now().UnixNano())
	if err := d.Publish(ctx, queue.Message{
		To: q, MessageID: id, CorrelationID: "corr-" + id, ReplyTo: q, ContentType: "application/json",
		Body: []byte(`{"prompt":"live"}`), Headers: map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
	}); err != nil {
		t.Fatalf("Publish: %v", err)
	}

	// mine receives until this test's message arrives, abandoning others.
	mine := func(d *Driver, id string) *queue.Delivery {
		t.Helper()
		for {
			ds, err := d.Receive(ctx, 10)
			if err != nil {
				t.Fatalf("Receive: %v", err)
			}
			var found *queue.Delivery
			for _, del := range ds {
				if del.ID == id && found == nil {
					found = del
					continue
				}
				if err := d.Settle(ctx, del, queue.Settlement{Action: queue.Requeue}); err != nil {
					t.Logf("abandon %s: %v", del.ID, err)
				}
			}
			if found != nil {
				return found
			}
		}
	}

	first := mine(d, id)
	if first.CorrelationID != "corr-"+id || first.Headers["traceparent"] == "" || first.EnqueuedAt.IsZero() {
		t.Errorf("delivery = %+v", first)
	}
	if err := d.Settle(ctx, first, queue.Settlement{Action: queue.Requeue}); err != nil {
		t.Fatalf("abandon: %v", err)
	}
	second := mine(d, id)
	if second.Attempt != first.Attempt+1 {
		t.Errorf("Attempt after abandon = %d, want %d", second.Attempt, first.Attempt+1)
	}
	// Hold it past the end of its first lock: only renewal keeps it.
	if until := second.Handle.(*lockedMessage).msg.LockedUntil; until != nil {
		hold := time.NewTimer(time.Until(*until) + 5*time.Second)
		select {
		case <-hold.C:
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		}
	}
	if err := d.Settle(ctx, second, queue.Settlement{Action: queue.DeadLetter, Reason: "live_test", Description: "dead-lettered by TestLive"}); err != nil {
		t.Fatalf("dead-letter: %v", err)
	}

	dead := mine(open(q+"/$DeadLetterQueue"), id)
	if dead.Headers["DeadLetterReason"] != "live_test" || dead.Headers[queue.HeaderDeadLetterReason] != "live_test" {
		t.Errorf("dead letter headers = %v", dead.Headers)
	}
}
