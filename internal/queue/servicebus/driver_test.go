package servicebus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/secret"
)

func TestReceiveMapsAndHolds(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ds := fx.received(t, msg("m1"), msg("m2"))
	if ds[0].ID != "m1" || ds[1].ID != "m2" {
		t.Fatalf("ids = %s, %s", ds[0].ID, ds[1].ID)
	}
	if !ds[0].ReceivedAt.Equal(fx.clock.Now()) {
		t.Errorf("ReceivedAt = %v, want the injected clock's %v", ds[0].ReceivedAt, fx.clock.Now())
	}
	if _, ok := ds[0].Handle.(*lockedMessage); !ok {
		t.Errorf("Handle = %T", ds[0].Handle)
	}
	fx.d.mu.Lock()
	held := len(fx.d.held)
	fx.d.mu.Unlock()
	if held != 2 {
		t.Errorf("held = %d, want 2", held)
	}
}

func TestReceiveAsksForAtMostMax(t *testing.T) {
	t.Parallel()
	tests := []struct{ max, want int }{{1, 1}, {32, 32}, {maxReceive + 1, maxReceive}}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.max), func(t *testing.T) {
			t.Parallel()
			fx := setup(t, Config{})
			fx.recv.batches <- []*azservicebus.ReceivedMessage{msg("m1")}
			if _, err := fx.d.Receive(testContext(t), tt.max); err != nil {
				t.Fatal(err)
			}
			if got := fx.recv.maxes[0]; got != tt.want {
				t.Errorf("ReceiveMessages max = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestReceiveRejectsZeroMax(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	if _, err := fx.d.Receive(testContext(t), 0); err == nil {
		t.Fatal("Receive(0) succeeded")
	}
}

// The SDK returns (nil, nil) after dropping a broken link; Receive keeps
// blocking until a message arrives.
func TestReceiveWaitsThroughEmptyResults(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	fx.recv.batches <- nil
	fx.recv.batches <- nil
	fx.recv.batches <- []*azservicebus.ReceivedMessage{msg("m1")}
	ds, err := fx.d.Receive(testContext(t), 10)
	if err != nil || len(ds) != 1 {
		t.Fatalf("Receive = %d deliveries, %v", len(ds), err)
	}
	if n := len(fx.recv.maxes); n != 3 {
		t.Errorf("ReceiveMessages calls = %d, want 3", n)
	}
}

func TestReceiveReturnsContextError(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := fx.d.Receive(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Receive = %v, want context.DeadlineExceeded", err)
	}
}

func TestReceiveWrapsBrokerErrors(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	fx.recv.receiveErr = &azservicebus.Error{Code: azservicebus.CodeUnauthorizedAccess}
	_, err := fx.d.Receive(testContext(t), 1)
	var sbErr *azservicebus.Error
	if !errors.As(err, &sbErr) || !strings.Contains(err.Error(), `"requests"`) {
		t.Fatalf("Receive = %v, want the SDK error naming the queue", err)
	}
}

func TestStopReceiving(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ds := fx.received(t, msg("m1"))

	done := make(chan error, 1)
	go func() {
		_, err := fx.d.Receive(context.Background(), 1)
		done <- err
	}()
	eventually(t, "Receive to block in the SDK", func() bool {
		fx.recv.mu.Lock()
		defer fx.recv.mu.Unlock()
		return len(fx.recv.maxes) == 2
	})
	if err := fx.d.StopReceiving(testContext(t)); err != nil {
		t.Fatalf("StopReceiving: %v", err)
	}
	if err := <-done; !errors.Is(err, queue.ErrClosed) {
		t.Fatalf("blocked Receive = %v, want ErrClosed", err)
	}
	if _, err := fx.d.Receive(testContext(t), 1); !errors.Is(err, queue.ErrClosed) {
		t.Fatalf("Receive after StopReceiving = %v, want ErrClosed", err)
	}
	if err := fx.d.StopReceiving(testContext(t)); err != nil {
		t.Fatalf("second StopReceiving: %v", err)
	}
	// Held deliveries are still settled and results still published.
	if err := fx.d.Settle(testContext(t), ds[0], queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatalf("Settle after StopReceiving: %v", err)
	}
	if err := fx.d.Publish(testContext(t), queue.Message{To: "results", Body: []byte("r")}); err != nil {
		t.Fatalf("Publish after StopReceiving: %v", err)
	}
}

func TestCloseBeforeReceiveAndTwice(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ctx := testContext(t)
	for i := range 2 {
		if err := fx.d.Close(ctx); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if fx.recv.closed != 1 || fx.clientClosed() != 1 {
		t.Errorf("receiver closed %d times, client %d times, want 1 and 1", fx.recv.closed, fx.clientClosed())
	}
	if _, err := fx.d.Receive(ctx, 1); !errors.Is(err, queue.ErrClosed) {
		t.Errorf("Receive after Close = %v, want ErrClosed", err)
	}
	if err := fx.d.Publish(ctx, queue.Message{To: "results"}); !errors.Is(err, queue.ErrClosed) {
		t.Errorf("Publish after Close = %v, want ErrClosed", err)
	}
	if err := fx.d.Ready(ctx); !errors.Is(err, queue.ErrClosed) {
		t.Errorf("Ready after Close = %v, want ErrClosed", err)
	}
	if err := fx.d.StopReceiving(ctx); err != nil {
		t.Errorf("StopReceiving after Close = %v", err)
	}
}

func TestCloseUnblocksReceiveAndClosesEverything(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ds := fx.received(t, msg("m1"))
	ctx := testContext(t)
	for _, q := range []string{"a", "b"} {
		if err := fx.d.Publish(ctx, queue.Message{To: q}); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := fx.d.Receive(context.Background(), 1)
		done <- err
	}()
	if err := fx.d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, queue.ErrClosed) {
		t.Errorf("Receive during Close = %v, want ErrClosed", err)
	}
	for _, q := range []string{"a", "b"} {
		if n := fx.senders.For(q)[0].Closed(); n != 1 {
			t.Errorf("sender %s closed %d times, want 1", q, n)
		}
	}
	if err := fx.d.Settle(ctx, ds[0], queue.Settlement{Action: queue.Ack}); !errors.Is(err, queue.ErrClosed) {
		t.Errorf("Settle after Close = %v, want ErrClosed", err)
	}
	if !strings.Contains(fx.logs.String(), `"unsettled":1`) {
		t.Errorf("Close did not log the unsettled delivery: %s", fx.logs)
	}
}

func TestSettle(t *testing.T) {
	t.Parallel()
	lockLost := &azservicebus.Error{Code: azservicebus.CodeLockLost}
	tests := []struct {
		name      string
		s         queue.Settlement
		settleErr error
		wantCall  string
		wantStale bool
		wantErr   bool
	}{
		{name: "ack completes", s: queue.Settlement{Action: queue.Ack}, wantCall: "complete m1"},
		{name: "requeue abandons", s: queue.Settlement{Action: queue.Requeue, Reason: "engine_unavailable"}, wantCall: "abandon m1"},
		{name: "dead-letter", s: queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "body is not JSON"}, wantCall: "dead-letter m1"},
		{name: "lost lock on complete is stale", s: queue.Settlement{Action: queue.Ack}, settleErr: lockLost, wantCall: "complete m1", wantStale: true, wantErr: true},
		{name: "lost lock on abandon is stale", s: queue.Settlement{Action: queue.Requeue}, settleErr: fmt.Errorf("wrapped: %w", lockLost), wantCall: "abandon m1", wantStale: true, wantErr: true},
		{name: "closed receiver is stale", s: queue.Settlement{Action: queue.DeadLetter, Reason: "r"}, settleErr: &azservicebus.Error{Code: azservicebus.CodeClosed}, wantCall: "dead-letter m1", wantStale: true, wantErr: true},
		{name: "other errors are not stale", s: queue.Settlement{Action: queue.Ack}, settleErr: errBoom, wantCall: "complete m1", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			fx := setup(t, Config{})
			if tt.settleErr != nil {
				fx.recv.settleErr["m1"] = tt.settleErr
			}
			d := fx.received(t, msg("m1"))[0]
			err := fx.d.Settle(testContext(t), d, tt.s)
			if (err != nil) != tt.wantErr || errors.Is(err, queue.ErrStale) != tt.wantStale {
				t.Fatalf("Settle = %v, want error %v, stale %v", err, tt.wantErr, tt.wantStale)
			}
			if calls := fx.recv.Calls(); len(calls) != 1 || calls[0] != tt.wantCall {
				t.Errorf("calls = %v, want [%s]", calls, tt.wantCall)
			}
			fx.d.mu.Lock()
			held := len(fx.d.held)
			fx.d.mu.Unlock()
			if held != 0 {
				t.Errorf("%d deliveries still held (renewed) after settling", held)
			}
		})
	}
}

func TestDeadLetterSetsReasonAndProperties(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{Queue: "requests"})
	m := msg("m1")
	m.DeliveryCount = 5
	d := fx.received(t, m)[0]
	long := strings.Repeat("é", maxReasonBytes) // 2 bytes a rune
	if err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.DeadLetter, Reason: "max_attempts", Description: long}); err != nil {
		t.Fatal(err)
	}
	o := fx.recv.deadLetter["m1"]
	if *o.Reason != "max_attempts" || len(*o.ErrorDescription) != maxReasonBytes || !strings.HasPrefix(long, *o.ErrorDescription) {
		t.Errorf("reason %q, description of %d bytes", *o.Reason, len(*o.ErrorDescription))
	}
	want := map[string]any{
		queue.HeaderDeadLetterReason:      "max_attempts",
		queue.HeaderDeadLetterDescription: *o.ErrorDescription,
		queue.HeaderAttempts:              "5",
		queue.HeaderSourceQueue:           "requests",
	}
	for k, v := range want {
		if o.PropertiesToModify[k] != v {
			t.Errorf("property %s = %v, want %v", k, o.PropertiesToModify[k], v)
		}
	}
}

func TestDeadLetterWithoutReason(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	d := fx.received(t, msg("m1"))[0]
	if err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.DeadLetter}); err != nil {
		t.Fatal(err)
	}
	if got := *fx.recv.deadLetter["m1"].Reason; got != "unspecified" {
		t.Errorf("reason = %q", got)
	}
}

func TestDeadLetterToAnotherQueue(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{Queue: "requests", DeadLetterQueue: "requests.dlq"})
	m := msg("m1")
	m.ApplicationProperties = map[string]any{"traceparent": "tp"}
	d := fx.received(t, m)[0]
	if err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "no"}); err != nil {
		t.Fatal(err)
	}
	sent := fx.senders.For("requests.dlq")[0].Raw()
	if len(sent) != 1 {
		t.Fatalf("sent %d copies to the dead-letter queue", len(sent))
	}
	p := sent[0].ApplicationProperties
	if p[queue.HeaderDeadLetterReason] != "invalid_json" || p[queue.HeaderSourceQueue] != "requests" || p["traceparent"] != "tp" {
		t.Errorf("copy properties = %v", p)
	}
	if calls := fx.recv.Calls(); len(calls) != 1 || calls[0] != "complete m1" {
		t.Errorf("calls = %v, want the original completed", calls)
	}
}

// received is m as the SDK hands it over: the AMQP message as received in
// RawAMQPMessage, with Body set only for a single data section.
func received(id string, body azservicebus.AMQPAnnotatedMessageBody) *azservicebus.ReceivedMessage {
	until := time.Date(2026, 1, 2, 3, 5, 5, 0, time.UTC)
	m := &azservicebus.ReceivedMessage{
		MessageID: id, DeliveryCount: 1, ReplyTo: sp("results"), LockedUntil: &until,
		ApplicationProperties: map[string]any{"traceparent": "tp", "n": int64(7)},
		RawAMQPMessage: &azservicebus.AMQPAnnotatedMessage{
			Body:                  body,
			ApplicationProperties: map[string]any{"traceparent": "tp", "n": int64(7)},
			Properties:            &azservicebus.AMQPAnnotatedMessageProperties{MessageID: id, ReplyTo: sp("results"), ContentType: sp("application/json")},
			Header:                &azservicebus.AMQPAnnotatedMessageHeader{DeliveryCount: 0, TTL: time.Hour},
			MessageAnnotations: map[any]any{
				"x-opt-locked-until": until, "x-opt-sequence-number": int64(3),
				"x-opt-enqueued-time": until.Add(-time.Minute), "x-opt-partition-key": "p",
				"producer-annotation": "kept",
			},
			DeliveryAnnotations: map[any]any{"x-opt-lock-token": "t"},
			DeliveryTag:         []byte("tag"),
		},
	}
	if len(body.Data) == 1 {
		m.Body = body.Data[0]
	}
	return m
}

// The copy sent to SOUS_SERVICEBUS_DEAD_LETTER_QUEUE carries the payload
// whatever the body sections: the SDK's ReceivedMessage.Body holds only a
// single data section, and a copy built from it was empty for the others.
func TestDeadLetterCopyKeepsEveryBodyKind(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		body azservicebus.AMQPAnnotatedMessageBody
	}{
		{"one data section", azservicebus.AMQPAnnotatedMessageBody{Data: [][]byte{[]byte(`{"prompt":"hi"}`)}}},
		{"several data sections", azservicebus.AMQPAnnotatedMessageBody{Data: [][]byte{[]byte(`{"prompt":`), []byte(`"hi"}`)}}},
		{"amqp-value string", azservicebus.AMQPAnnotatedMessageBody{Value: `{"prompt":"hi"}`}},
		{"amqp-value binary", azservicebus.AMQPAnnotatedMessageBody{Value: []byte(`{"prompt":"hi"}`)}},
		{"amqp-value map", azservicebus.AMQPAnnotatedMessageBody{Value: map[string]any{"prompt": "hi"}}},
		{"amqp-sequence", azservicebus.AMQPAnnotatedMessageBody{Sequence: [][]any{{"prompt", "hi"}, {int64(2)}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			fx := setup(t, Config{Queue: "requests", DeadLetterQueue: "requests.dlq"})
			d := fx.received(t, received("m1", tt.body))[0]
			if err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "no"}); err != nil {
				t.Fatal(err)
			}
			sent := fx.senders.For("requests.dlq")[0].Raw()
			if len(sent) != 1 {
				t.Fatalf("sent %d copies to the dead-letter queue", len(sent))
			}
			cp := sent[0]
			if !reflect.DeepEqual(cp.Body, tt.body) {
				t.Errorf("copy body = %#v, want the original %#v", cp.Body, tt.body)
			}
			p := cp.ApplicationProperties
			if p[queue.HeaderDeadLetterReason] != "invalid_json" || p[queue.HeaderSourceQueue] != "requests" || p["traceparent"] != "tp" || p["n"] != int64(7) {
				t.Errorf("copy properties = %v", p)
			}
			if cp.Properties == nil || cp.Properties.MessageID != "m1" || deref(cp.Properties.ReplyTo) != "results" {
				t.Errorf("copy AMQP properties = %+v", cp.Properties)
			}
			for k := range cp.MessageAnnotations {
				if s, _ := k.(string); strings.HasPrefix(s, "x-opt-") {
					t.Errorf("the copy carries the broker's annotation %v", k)
				}
			}
			if cp.MessageAnnotations["producer-annotation"] != "kept" {
				t.Errorf("the producer's own annotation was dropped: %v", cp.MessageAnnotations)
			}
			if cp.DeliveryAnnotations != nil || cp.DeliveryTag != nil || (cp.Header != nil && cp.Header.TTL != 0) {
				t.Errorf("the copy carries delivery state: %+v", cp)
			}
			if calls := fx.recv.Calls(); len(calls) != 1 || calls[0] != "complete m1" {
				t.Errorf("calls = %v, want the original completed", calls)
			}
		})
	}
}

func TestDeadLetterToAnotherQueueKeepsTheMessageWhenTheCopyFails(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{DeadLetterQueue: "requests.dlq"})
	fx.senders.failFor["requests.dlq"] = errBoom
	d := fx.received(t, msg("m1"))[0]
	err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.DeadLetter, Reason: "r"})
	if !errors.Is(err, errBoom) || errors.Is(err, queue.ErrStale) {
		t.Fatalf("Settle = %v", err)
	}
	if calls := fx.recv.Calls(); len(calls) != 0 {
		t.Errorf("calls = %v, want none", calls)
	}
}

// TestRequeueCarriesHeaders: a requeue's headers (the worker marks a
// request whose error result went out before its dead-letter failed) are
// set on the message as Service Bus abandons it.
func TestRequeueCarriesHeaders(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	d := fx.received(t, msg("m1"))[0]
	if err := fx.d.Settle(testContext(t), d, queue.Settlement{Action: queue.Requeue, Reason: "dead_letter_failed", Headers: map[string]string{"x-sous-answered": "invalid_json"}}); err != nil {
		t.Fatal(err)
	}
	fx.recv.mu.Lock()
	o := fx.recv.abandoned["m1"]
	fx.recv.mu.Unlock()
	if o == nil || o.PropertiesToModify["x-sous-answered"] != "invalid_json" {
		t.Fatalf("abandon options %+v, want the header among the properties to modify", o)
	}
}

func TestSettleTwice(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	d := fx.received(t, msg("m1"))[0]
	ctx := testContext(t)
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); err == nil {
		t.Fatal("second Settle succeeded")
	}
	if n := fx.recv.count("complete m1"); n != 1 {
		t.Errorf("completed %d times", n)
	}
}

func TestSettleMayBeRetriedAfterAnError(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	fx.recv.settleErr["m1"] = errBoom
	d := fx.received(t, msg("m1"))[0]
	ctx := testContext(t)
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); !errors.Is(err, errBoom) {
		t.Fatalf("Settle = %v", err)
	}
	fx.recv.mu.Lock()
	delete(fx.recv.settleErr, "m1")
	fx.recv.mu.Unlock()
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatalf("retried Settle = %v", err)
	}
}

func TestSettleRejectsForeignDeliveries(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ctx := testContext(t)
	for _, d := range []*queue.Delivery{{ID: "x"}, {ID: "y", Handle: "rabbit"}} {
		if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Ack}); err == nil {
			t.Errorf("Settle(%q) succeeded", d.ID)
		}
	}
	d := fx.received(t, msg("m1"))[0]
	if err := fx.d.Settle(ctx, d, queue.Settlement{Action: queue.Action(42)}); err == nil {
		t.Error("Settle with an unknown action succeeded")
	}
}

func TestPublish(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ctx := testContext(t)
	m := queue.Message{To: "sb://ns.servicebus.windows.net/replies", SessionID: "s1", CorrelationID: "c1", Body: []byte("r")}
	for range 2 {
		if err := fx.d.Publish(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	ss := fx.senders.For("replies")
	if len(ss) != 1 {
		t.Fatalf("%d senders for replies, want one cached", len(ss))
	}
	sent := ss[0].Sent()
	if len(sent) != 2 || *sent[0].SessionID != "s1" || *sent[0].CorrelationID != "c1" {
		t.Errorf("sent %+v", sent)
	}
	if err := fx.d.Publish(ctx, queue.Message{Body: []byte("r")}); err == nil {
		t.Error("Publish without To succeeded")
	}
}

func TestPublishBoundsTheSenderCache(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{MaxSenders: 2})
	ctx := testContext(t)
	for _, q := range []string{"a", "b", "a", "c"} { // b is the least recently used when c arrives
		if err := fx.d.Publish(ctx, queue.Message{To: q}); err != nil {
			t.Fatal(err)
		}
	}
	if n := fx.senders.For("b")[0].Closed(); n != 1 {
		t.Errorf("evicted sender closed %d times, want 1", n)
	}
	if n := fx.senders.For("a")[0].Closed(); n != 0 {
		t.Errorf("recently used sender closed %d times", n)
	}
	if err := fx.d.Publish(ctx, queue.Message{To: "b"}); err != nil {
		t.Fatal(err)
	}
	if n := len(fx.senders.For("b")); n != 2 {
		t.Errorf("%d senders for b, want a new one after eviction", n)
	}
}

func TestPublishReplacesAFailedSender(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	fx.senders.failFor["a"] = errBoom
	ctx := testContext(t)
	if err := fx.d.Publish(ctx, queue.Message{To: "a"}); !errors.Is(err, errBoom) {
		t.Fatalf("Publish = %v", err)
	}
	first := fx.senders.For("a")[0]
	if first.Closed() != 1 {
		t.Errorf("failed sender closed %d times, want 1", first.Closed())
	}
	delete(fx.senders.failFor, "a")
	if err := fx.d.Publish(ctx, queue.Message{To: "a"}); err != nil {
		t.Fatal(err)
	}
	if n := len(fx.senders.For("a")); n != 2 {
		t.Errorf("%d senders for a, want 2", n)
	}
}

func TestReady(t *testing.T) {
	t.Parallel()
	fx := setup(t, Config{})
	ctx := testContext(t)
	if err := fx.d.Ready(ctx); err != nil || fx.recv.peeks != 1 {
		t.Fatalf("Ready = %v after %d peeks, want nil after 1", err, fx.recv.peeks)
	}
	fx.clock.Advance(readyFresh / 2)
	if err := fx.d.Ready(ctx); err != nil || fx.recv.peeks != 1 {
		t.Fatalf("Ready = %v after %d peeks, want a cached nil", err, fx.recv.peeks)
	}
	fx.clock.Advance(readyFresh)
	fx.recv.peekErr = &azservicebus.Error{Code: azservicebus.CodeConnectionLost}
	if err := fx.d.Ready(ctx); err == nil || fx.recv.peeks != 2 {
		t.Fatalf("Ready = %v after %d peeks, want an error after 2", err, fx.recv.peeks)
	}
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	cs := secret.Value("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0a2V5")
	tests := []struct {
		name    string
		cfg     Config
		wantVar string
	}{
		{"nothing to connect to", Config{Queue: "q"}, "SOUS_SERVICEBUS_CONNECTION_STRING"},
		{"namespace with a scheme", Config{Namespace: "sb://ns.servicebus.windows.net", Queue: "q"}, "SOUS_SERVICEBUS_NAMESPACE"},
		{"bare namespace name", Config{Namespace: "ns", Queue: "q"}, "SOUS_SERVICEBUS_NAMESPACE"},
		{"no queue", Config{ConnectionString: cs}, "SOUS_QUEUE"},
		{"dead-letter queue is the queue", Config{ConnectionString: cs, Queue: "q", DeadLetterQueue: "q"}, "SOUS_SERVICEBUS_DEAD_LETTER_QUEUE"},
		{"negative sender bound", Config{ConnectionString: cs, Queue: "q", MaxSenders: -1}, "SOUS_SERVICEBUS_MAX_SENDERS"},
		{"connection string", Config{ConnectionString: cs, Queue: "q"}, ""},
		{"namespace", Config{Namespace: "ns.servicebus.windows.net", Queue: "q"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.cfg.withDefaults().validate()
			if tt.wantVar == "" {
				if err != nil {
					t.Fatalf("validate = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantVar) {
				t.Fatalf("validate = %v, want an error naming %s", err, tt.wantVar)
			}
		})
	}
}

// The connection string, and above all its key, never appear in errors or
// logs, whatever is wrong with it.
func TestConnectionStringNeverLeaks(t *testing.T) {
	t.Parallel()
	const key = "c3VwZXJzZWNyZXRrZXkx"
	tests := []string{
		"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=" + key + ";UseDevelopmentEmulator=" + key,
		"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=" + key + ";" + key,
		"Endpoint=%zz" + key + ";SharedAccessKeyName=k;SharedAccessKey=" + key,
		"Endpoint=http://" + key + ":1;SharedAccessKeyName=k;SharedAccessKey=" + key + ";UseDevelopmentEmulator=true",
		"SharedAccessKey=" + key,
	}
	for i, cs := range tests {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			var logs syncBuffer
			log := slog.New(slog.NewJSONHandler(&logs, nil))
			cfg := Config{ConnectionString: secret.Value(cs), Queue: "q"}
			d, err := New(context.Background(), cfg, log)
			if err == nil {
				d.Close(context.Background())
				t.Fatalf("New accepted %q", cs)
			}
			t.Logf("New: %v", err)
			log.Info("config", "config", cfg, "err", err)
			out := err.Error() + logs.String() + fmt.Sprintf("%v %+v %#v %s", cfg, cfg, cfg, cfg.ConnectionString)
			if strings.Contains(out, key) {
				t.Fatalf("the key leaked: %s", out)
			}
		})
	}
}
