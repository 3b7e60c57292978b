package servicebus

// End-to-end tests of the real azservicebus client code against sbpeer, an
// AMQP 1.0 protocol test double on Qpid Proton (not an emulator). They fail,
// not skip, when python3-qpid-proton is missing: run
// internal/queue/servicebus/sbpeer/install.sh.

import (
	"context"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
	"github.com/sous-run/sous/internal/queue/servicebus/sbpeer"
	"github.com/sous-run/sous/internal/secret"
)

const wait = 15 * time.Second

// peerRetries keeps the SDK's retries short, so that a test against a peer
// that went away ends quickly.
var peerRetries = azservicebus.RetryOptions{MaxRetries: 1, RetryDelay: 50 * time.Millisecond, MaxRetryDelay: 200 * time.Millisecond}

// setupPeer starts a peer and a Driver connected to it, receiving from the
// queue "requests". mod adjusts the Config.
func setupPeer(t *testing.T, opts sbpeer.Options, mod func(*Config)) (*Driver, *sbpeer.Peer) {
	t.Helper()
	p := sbpeer.Start(t, opts)
	cfg := Config{
		ConnectionString:  secret.Value(p.ConnectionString()),
		Queue:             "requests",
		LockRenewInterval: -1,
		clientOptions:     &azservicebus.ClientOptions{RetryOptions: peerRetries},
	}
	if mod != nil {
		mod(&cfg)
	}
	return newPeerDriver(t, cfg), p
}

func newPeerDriver(t *testing.T, cfg Config) *Driver {
	t.Helper()
	d, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(testWriter{t}, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if err := d.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func receiveOne(t *testing.T, d *Driver) *queue.Delivery {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	ds, err := d.Receive(ctx, 10)
	if err != nil {
		t.Fatalf("Receive: %v", err)
	}
	if len(ds) != 1 {
		t.Fatalf("Receive returned %d deliveries, want 1", len(ds))
	}
	return ds[0]
}

func publish(t *testing.T, d *Driver, m queue.Message) {
	t.Helper()
	if err := d.Publish(testContext(t), m); err != nil {
		t.Fatalf("Publish: %v", err)
	}
}

func named(name, queue string) func(sbpeer.Event) bool {
	return func(e sbpeer.Event) bool { return e.Name == name && e.Queue == queue }
}

func request(id string) queue.Message {
	return queue.Message{
		To: "requests", MessageID: id, CorrelationID: "corr-" + id, ReplyTo: "results",
		ContentType: "application/json", Body: []byte(`{"prompt":"hi"}`),
		Headers: map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
	}
}

// A request goes in, comes out PeekLocked with every field, its result is
// published with the correlation and session ids, and completing it removes
// it from the queue.
func TestPeerRoundTrip(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, nil)
	start := time.Now()
	publish(t, d, request("req-1"))

	in := p.WaitFor(wait, "the request", named("enqueued", "requests"))
	if in.MessageID != "req-1" || in.CorrelationID != "corr-req-1" || in.ReplyTo != "results" ||
		in.ContentType != "application/json" || in.Body != `{"prompt":"hi"}` ||
		in.ApplicationProperties["traceparent"] != request("").Headers["traceparent"] {
		t.Errorf("the peer got %s", in)
	}

	del := receiveOne(t, d)
	want := request("req-1")
	if del.ID != want.MessageID || del.CorrelationID != want.CorrelationID || del.ReplyTo != want.ReplyTo ||
		del.ContentType != want.ContentType || string(del.Body) != string(want.Body) ||
		del.Headers["traceparent"] != want.Headers["traceparent"] || del.Attempt != 1 {
		t.Errorf("delivery = %+v", del)
	}
	if del.EnqueuedAt.Before(start.Add(-time.Second)) || del.EnqueuedAt.After(time.Now().Add(time.Second)) {
		t.Errorf("EnqueuedAt = %v, want about %v", del.EnqueuedAt, start)
	}
	delivered := p.WaitFor(wait, "the delivery", named("delivered", "requests"))
	if delivered.LockToken == "" || delivered.DeliveryCount != 1 {
		t.Errorf("delivered %s", delivered)
	}

	publish(t, d, queue.Message{
		To: del.ReplyTo, CorrelationID: del.CorrelationKey(), SessionID: "session-7",
		ContentType: "application/json", Body: []byte(`{"id":"req-1","status":"ok"}`),
	})
	out := p.WaitFor(wait, "the result", named("enqueued", "results"))
	if out.CorrelationID != "corr-req-1" || out.SessionID != "session-7" || out.Body != `{"id":"req-1","status":"ok"}` {
		t.Errorf("the peer got the result %s", out)
	}

	if err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatalf("Settle: %v", err)
	}
	done := p.WaitFor(wait, "completion", named("completed", "requests"))
	if done.Via != "link" || done.MessageID != "req-1" {
		t.Errorf("completed %s", done)
	}
	if s := p.Stats()["requests"]; s.Available != 0 || s.Locked != 0 {
		t.Errorf("requests after completion: %+v, want empty", s)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if ds, err := d.Receive(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Receive after completion = %d deliveries, %v; want nothing", len(ds), err)
	}
}

func TestPeerAbandonRedelivers(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, nil)
	publish(t, d, request("req-2"))
	first := receiveOne(t, d)
	if err := d.Settle(testContext(t), first, queue.Settlement{Action: queue.Requeue, Reason: "engine_unavailable"}); err != nil {
		t.Fatalf("Settle: %v", err)
	}
	ab := p.WaitFor(wait, "the abandon", named("abandoned", "requests"))
	if ab.DeliveryCount != 1 {
		t.Errorf("abandoned %s", ab)
	}
	again := receiveOne(t, d)
	if again.ID != "req-2" || again.Attempt != first.Attempt+1 {
		t.Fatalf("redelivery: id %q attempt %d, want req-2 attempt %d", again.ID, again.Attempt, first.Attempt+1)
	}
	if err := d.Settle(testContext(t), again, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatal(err)
	}
	p.WaitFor(wait, "completion", named("completed", "requests"))
}

func TestPeerDeadLetter(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, nil)
	publish(t, d, request("req-3"))
	del := receiveOne(t, d)
	err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "body is not JSON: unexpected end"})
	if err != nil {
		t.Fatalf("Settle: %v", err)
	}
	dl := p.WaitFor(wait, "the dead-letter", named("deadlettered", "requests"))
	props := dl.ApplicationProperties
	if dl.Reason != "invalid_json" || dl.Description != "body is not JSON: unexpected end" ||
		props[queue.HeaderDeadLetterReason] != "invalid_json" ||
		props[queue.HeaderDeadLetterDescription] != "body is not JSON: unexpected end" ||
		props[queue.HeaderSourceQueue] != "requests" || props[queue.HeaderAttempts] != "1" {
		t.Errorf("dead-lettered %s", dl)
	}

	// The dead-letter sub-queue holds it, with the reasons as headers.
	dlq := newPeerDriver(t, Config{
		ConnectionString: secret.Value(p.ConnectionString()), Queue: "requests/$DeadLetterQueue",
		LockRenewInterval: -1, clientOptions: &azservicebus.ClientOptions{RetryOptions: peerRetries},
	})
	got := receiveOne(t, dlq)
	if got.ID != "req-3" || got.Headers["DeadLetterReason"] != "invalid_json" || got.Headers[queue.HeaderDeadLetterReason] != "invalid_json" {
		t.Errorf("from the dead-letter queue: %+v", got)
	}
}

func TestPeerDeadLetterToAnotherQueue(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, func(c *Config) { c.DeadLetterQueue = "requests.dlq" })
	publish(t, d, request("req-4"))
	del := receiveOne(t, d)
	if err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.DeadLetter, Reason: "max_attempts", Description: "5 attempts"}); err != nil {
		t.Fatal(err)
	}
	cp := p.WaitFor(wait, "the copy", named("enqueued", "requests.dlq"))
	if cp.MessageID != "req-4" || cp.ApplicationProperties[queue.HeaderDeadLetterReason] != "max_attempts" || cp.ReplyTo != "results" {
		t.Errorf("copy %s", cp)
	}
	p.WaitFor(wait, "completion of the original", named("completed", "requests"))
}

func TestPeerReplyToSessionID(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, nil)
	p.Enqueue(sbpeer.Send{Queue: "requests", MessageID: "req-5", ReplyTo: "session-replies", ReplyToSessionID: "client-42", Body: `{"prompt":"x"}`})
	del := receiveOne(t, d)
	if del.ReplyTo != "session-replies" || del.ReplyToSessionID != "client-42" || del.CorrelationKey() != "req-5" {
		t.Errorf("delivery = %+v", del)
	}
}

// While a delivery is held three times longer than its lock, the driver
// renews it through the $management link, and completing it still works.
func TestPeerLockRenewal(t *testing.T) {
	t.Parallel()
	// 12 renewals every 150ms or sooner hold the delivery past its 1.2s lock.
	d, p := setupPeer(t, sbpeer.Options{LockDuration: 1200 * time.Millisecond}, func(c *Config) { c.LockRenewInterval = 150 * time.Millisecond })
	publish(t, d, request("req-6"))
	del := receiveOne(t, d)
	held := time.Now()
	renewals := p.WaitForN(wait, 12, "renewals", func(e sbpeer.Event) bool { return e.Name == "renew_lock" && e.Queue == "requests" })
	if since := time.Since(held); since < 1200*time.Millisecond {
		t.Fatalf("12 renewals in %v: too fast to outlast the lock", since)
	}
	for _, r := range renewals {
		if !r.OK {
			t.Fatalf("renewal failed: %s", r)
		}
	}
	if len(p.Find(func(e sbpeer.Event) bool { return e.Name == "lock_expired" })) != 0 {
		t.Fatal("the lock expired although it was renewed")
	}
	if err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatalf("Settle after renewals: %v", err)
	}
	p.WaitFor(wait, "completion", named("completed", "requests"))
}

// Without renewal, a lock that expires makes the settlement stale, and the
// message comes back with its delivery count raised.
func TestPeerLockExpiredIsStale(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{LockDuration: 300 * time.Millisecond}, nil)
	publish(t, d, request("req-7"))
	del := receiveOne(t, d)
	p.WaitFor(wait, "the lock to expire", named("lock_expired", "requests"))
	err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.Ack})
	if !errors.Is(err, queue.ErrStale) {
		t.Fatalf("Settle = %v, want ErrStale", err)
	}
	p.WaitFor(wait, "the refusal", func(e sbpeer.Event) bool { return e.Name == "lock_lost" })
	again := receiveOne(t, d)
	if again.ID != "req-7" || again.Attempt != 2 {
		t.Errorf("redelivery: id %q attempt %d", again.ID, again.Attempt)
	}
}

// The renewer notices a lock the broker dropped; the settlement is stale.
func TestPeerLockLostFoundByRenewal(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, func(c *Config) { c.LockRenewInterval = 100 * time.Millisecond })
	publish(t, d, request("req-8"))
	del := receiveOne(t, d)
	if n := p.ExpireLocks("requests"); n != 1 {
		t.Fatalf("expired %d locks", n)
	}
	p.WaitFor(wait, "a refused renewal", func(e sbpeer.Event) bool { return e.Name == "renew_lock" && !e.OK })
	if err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.Ack}); !errors.Is(err, queue.ErrStale) {
		t.Fatalf("Settle = %v, want ErrStale", err)
	}
}

func TestPeerStopReceiving(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, nil)
	publish(t, d, request("req-9"))
	held := receiveOne(t, d)

	errc := make(chan error, 1)
	go func() {
		_, err := d.Receive(context.Background(), 5)
		errc <- err
	}()
	eventually(t, "the second Receive to start", func() bool { return len(d.recvSlot) == 1 })
	if err := d.StopReceiving(testContext(t)); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, queue.ErrClosed) {
		t.Fatalf("Receive = %v, want ErrClosed", err)
	}
	if err := d.Settle(testContext(t), held, queue.Settlement{Action: queue.Ack}); err != nil {
		t.Fatalf("Settle after StopReceiving: %v", err)
	}
	p.WaitFor(wait, "completion", named("completed", "requests"))
}

func TestPeerReady(t *testing.T) {
	t.Parallel()
	d, p := setupPeer(t, sbpeer.Options{}, nil)
	if err := d.Ready(testContext(t)); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	p.WaitFor(wait, "the probe", func(e sbpeer.Event) bool { return e.Operation == "com.microsoft:peek-message" })

	p.Stop()
	d.lastOK.Store(0) // forget the successful probe
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	err := d.Ready(ctx)
	if err == nil {
		t.Fatal("Ready succeeded with the broker gone")
	}
	if strings.Contains(err.Error(), sbpeer.Key) {
		t.Errorf("the key leaked: %v", err)
	}
}

// Senders are cached per destination, bounded, and closed on Close.
func TestPeerSenders(t *testing.T) {
	t.Parallel()
	p := sbpeer.Start(t, sbpeer.Options{})
	d, err := New(context.Background(), Config{
		ConnectionString: secret.Value(p.ConnectionString()), Queue: "requests", MaxSenders: 2,
		clientOptions: &azservicebus.ClientOptions{RetryOptions: peerRetries},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"a", "b", "a", "c"} {
		publish(t, d, queue.Message{To: q, Body: []byte(q)})
	}
	link := func(q string) string {
		return p.WaitFor(wait, "a sender link to "+q, func(e sbpeer.Event) bool {
			return e.Name == "attach" && e.Role == "sender" && e.Address == q
		}).LinkName
	}
	detach := func(q string) func(sbpeer.Event) bool {
		name := link(q)
		return func(e sbpeer.Event) bool { return e.Name == "detach" && e.LinkName == name }
	}
	if n := len(p.Find(func(e sbpeer.Event) bool { return e.Name == "attach" && e.Role == "sender" && e.Address == "a" })); n != 1 {
		t.Errorf("%d sender links to a, want 1 (cached)", n)
	}
	p.WaitFor(wait, "the evicted sender b to close", detach("b"))
	if len(p.Find(detach("a"))) != 0 || len(p.Find(detach("c"))) != 0 {
		t.Error("a cached sender was closed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	p.WaitFor(wait, "sender a to close", detach("a"))
	p.WaitFor(wait, "sender c to close", detach("c"))
}

// A dead-letter copy to SOUS_SERVICEBUS_DEAD_LETTER_QUEUE keeps the body of
// every kind a producer's AMQP client can send, encoded by the real SDK on
// both sides. (Proton, under the peer, keeps only the last of several data
// sections; TestDeadLetterCopyKeepsEveryBodyKind covers those with fakes.)
func TestPeerDeadLetterCopyKeepsTheBody(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		body azservicebus.AMQPAnnotatedMessageBody
		kind string
		want any // the body the peer reports for the copy
	}{
		{"one data section", azservicebus.AMQPAnnotatedMessageBody{Data: [][]byte{[]byte(`{"prompt":"hi"}`)}}, "data", `{"prompt":"hi"}`},
		{"amqp-value string", azservicebus.AMQPAnnotatedMessageBody{Value: `{"prompt":"hi"}`}, "value", `{"prompt":"hi"}`},
		{"amqp-value binary", azservicebus.AMQPAnnotatedMessageBody{Value: []byte(`{"prompt":"hi"}`)}, "value", `{"prompt":"hi"}`},
		{"amqp-sequence", azservicebus.AMQPAnnotatedMessageBody{Sequence: [][]any{{"prompt", "hi"}}}, "sequence", []any{"prompt", "hi"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, p := setupPeer(t, sbpeer.Options{}, func(c *Config) { c.DeadLetterQueue = "requests.dlq" })
			producer, err := azservicebus.NewClientFromConnectionString(p.ConnectionString(), &azservicebus.ClientOptions{RetryOptions: peerRetries})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = producer.Close(context.Background()) })
			s, err := producer.NewSender("requests", nil)
			if err != nil {
				t.Fatal(err)
			}
			id := "req-" + strings.ReplaceAll(tt.name, " ", "-")
			err = s.SendAMQPAnnotatedMessage(testContext(t), &azservicebus.AMQPAnnotatedMessage{
				Body:                  tt.body,
				Properties:            &azservicebus.AMQPAnnotatedMessageProperties{MessageID: id, ReplyTo: sp("results")},
				ApplicationProperties: map[string]any{"traceparent": "tp"},
			}, nil)
			if err != nil {
				t.Fatalf("send: %v", err)
			}
			del := receiveOne(t, d)
			if err := d.Settle(testContext(t), del, queue.Settlement{Action: queue.DeadLetter, Reason: "invalid_json", Description: "no"}); err != nil {
				t.Fatal(err)
			}
			cp := p.WaitFor(wait, "the copy", named("enqueued", "requests.dlq"))
			if cp.BodyKind != tt.kind || !reflect.DeepEqual(cp.Body, tt.want) {
				t.Errorf("copy body %s %#v, want %s %#v", cp.BodyKind, cp.Body, tt.kind, tt.want)
			}
			if cp.MessageID != id || cp.ReplyTo != "results" || cp.ApplicationProperties["traceparent"] != "tp" ||
				cp.ApplicationProperties[queue.HeaderDeadLetterReason] != "invalid_json" {
				t.Errorf("copy %s", cp)
			}
			p.WaitFor(wait, "completion of the original", named("completed", "requests"))
		})
	}
}
