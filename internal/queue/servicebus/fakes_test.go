package servicebus

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"

	"github.com/sous-run/sous/internal/queue"
)

// fakeReceiver is a hand-written fake of receiver, settler, lockRenewer and
// peeker: what *azservicebus.Receiver is to the driver.
type fakeReceiver struct {
	batches chan []*azservicebus.ReceivedMessage // ReceiveMessages returns the next one; nil means (nil, nil)
	clock   *fakeClock

	mu         sync.Mutex
	receiveErr error
	maxes      []int
	calls      []string // "complete m1", "abandon m1", "dead-letter m1", "renew m1"
	deadLetter map[string]*azservicebus.DeadLetterOptions
	abandoned  map[string]*azservicebus.AbandonMessageOptions
	settleErr  map[string]error // by MessageID
	renewErr   error
	lockFor    time.Duration // a renewal locks until clock.Now()+lockFor
	renewGate  chan struct{} // when set, each renewal waits for it to close (a slow broker)
	renewing   int           // renewals in progress
	maxRenew   int           // the most renewals in progress at once
	peekErr    error
	peeks      int
	closed     int
}

func newFakeReceiver(clock *fakeClock) *fakeReceiver {
	return &fakeReceiver{
		batches:    make(chan []*azservicebus.ReceivedMessage, 16),
		clock:      clock,
		deadLetter: map[string]*azservicebus.DeadLetterOptions{},
		settleErr:  map[string]error{},
		lockFor:    time.Minute,
	}
}

func (f *fakeReceiver) ReceiveMessages(ctx context.Context, max int, _ *azservicebus.ReceiveMessagesOptions) ([]*azservicebus.ReceivedMessage, error) {
	f.mu.Lock()
	f.maxes = append(f.maxes, max)
	err := f.receiveErr
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case b := <-f.batches:
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (f *fakeReceiver) record(op string, m *azservicebus.ReceivedMessage) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, op+" "+m.MessageID)
	return f.settleErr[m.MessageID]
}

func (f *fakeReceiver) CompleteMessage(_ context.Context, m *azservicebus.ReceivedMessage, _ *azservicebus.CompleteMessageOptions) error {
	return f.record("complete", m)
}

func (f *fakeReceiver) AbandonMessage(_ context.Context, m *azservicebus.ReceivedMessage, o *azservicebus.AbandonMessageOptions) error {
	f.mu.Lock()
	if f.abandoned == nil {
		f.abandoned = map[string]*azservicebus.AbandonMessageOptions{}
	}
	f.abandoned[m.MessageID] = o
	f.mu.Unlock()
	return f.record("abandon", m)
}

func (f *fakeReceiver) DeadLetterMessage(_ context.Context, m *azservicebus.ReceivedMessage, o *azservicebus.DeadLetterOptions) error {
	f.mu.Lock()
	f.deadLetter[m.MessageID] = o
	f.mu.Unlock()
	return f.record("dead-letter", m)
}

// RenewMessageLock updates LockedUntil on success, as the SDK does.
func (f *fakeReceiver) RenewMessageLock(ctx context.Context, m *azservicebus.ReceivedMessage, _ *azservicebus.RenewMessageLockOptions) error {
	f.mu.Lock()
	f.calls = append(f.calls, "renew "+m.MessageID)
	err, lockFor, gate := f.renewErr, f.lockFor, f.renewGate
	f.renewing++
	f.maxRenew = max(f.maxRenew, f.renewing)
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.renewing--
		f.mu.Unlock()
	}()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err != nil {
		return err
	}
	until := f.clock.Now().Add(lockFor)
	m.LockedUntil = &until
	return nil
}

func (f *fakeReceiver) PeekMessages(context.Context, int, *azservicebus.PeekMessagesOptions) ([]*azservicebus.ReceivedMessage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.peeks++
	return nil, f.peekErr
}

func (f *fakeReceiver) Close(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed++
	return nil
}

func (f *fakeReceiver) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeReceiver) count(call string) int {
	n := 0
	for _, c := range f.Calls() {
		if c == call {
			n++
		}
	}
	return n
}

// fakeSender records what was sent to one queue.
type fakeSender struct {
	queue string

	mu     sync.Mutex
	sent   []*azservicebus.Message
	raw    []*azservicebus.AMQPAnnotatedMessage // every send, as the AMQP message that goes out
	err    error
	closed int
}

func (s *fakeSender) SendMessage(_ context.Context, m *azservicebus.Message, _ *azservicebus.SendMessageOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.sent = append(s.sent, m)
	// The SDK sends a Message's Body as one data section.
	s.raw = append(s.raw, &azservicebus.AMQPAnnotatedMessage{
		ApplicationProperties: m.ApplicationProperties,
		Body:                  azservicebus.AMQPAnnotatedMessageBody{Data: [][]byte{m.Body}},
		Properties:            &azservicebus.AMQPAnnotatedMessageProperties{MessageID: deref(m.MessageID), ReplyTo: m.ReplyTo, ReplyToGroupID: m.ReplyToSessionID},
	})
	return nil
}

func (s *fakeSender) SendAMQPAnnotatedMessage(_ context.Context, m *azservicebus.AMQPAnnotatedMessage, _ *azservicebus.SendAMQPAnnotatedMessageOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.raw = append(s.raw, m)
	return nil
}

// Raw is every message sent, as AMQP messages, whichever method sent it.
func (s *fakeSender) Raw() []*azservicebus.AMQPAnnotatedMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*azservicebus.AMQPAnnotatedMessage(nil), s.raw...)
}

func (s *fakeSender) Close(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed++
	return nil
}

func (s *fakeSender) Sent() []*azservicebus.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*azservicebus.Message(nil), s.sent...)
}

func (s *fakeSender) Closed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// fakeSenders builds fakeSenders and remembers each, in creation order.
type fakeSenders struct {
	mu      sync.Mutex
	all     []*fakeSender
	failFor map[string]error // SendMessage error for new senders to a queue
}

func (f *fakeSenders) newSender(queue string) (sender, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := &fakeSender{queue: queue, err: f.failFor[queue]}
	f.all = append(f.all, s)
	return s, nil
}

func (f *fakeSenders) For(queue string) []*fakeSender {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*fakeSender
	for _, s := range f.all {
		if s.queue == queue {
			out = append(out, s)
		}
	}
	return out
}

// fakeClock is the driver's injected clock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

type fixture struct {
	d            *Driver
	recv         *fakeReceiver
	senders      *fakeSenders
	clock        *fakeClock
	logs         *syncBuffer
	clientClosed func() int
}

// setup builds a Driver on fakes, closed when the test ends. The renewer is
// not started: tests call renewDue with the fake clock, or startRenewer.
func setup(t *testing.T, cfg Config) *fixture {
	t.Helper()
	if cfg.Queue == "" {
		cfg.Queue = "requests"
	}
	if cfg.ConnectionString == "" && cfg.Namespace == "" {
		cfg.Namespace = "test.servicebus.windows.net"
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	recv := newFakeReceiver(clock)
	senders := &fakeSenders{failFor: map[string]error{}}
	logs := &syncBuffer{}
	var mu sync.Mutex
	clientCloses := 0
	b := backend{
		recv: recv, settle: recv, renew: recv, peek: recv,
		newSender: senders.newSender,
		close: func(context.Context) error {
			mu.Lock()
			defer mu.Unlock()
			clientCloses++
			return nil
		},
	}
	d := newDriver(cfg, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})), b, clock.Now)
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return &fixture{d: d, recv: recv, senders: senders, clock: clock, logs: logs, clientClosed: func() int {
		mu.Lock()
		defer mu.Unlock()
		return clientCloses
	}}
}

// received hands msgs to the driver through one Receive.
func (fx *fixture) received(t *testing.T, msgs ...*azservicebus.ReceivedMessage) []*queue.Delivery {
	t.Helper()
	fx.recv.batches <- msgs
	ds, err := fx.d.Receive(testContext(t), len(msgs))
	if err != nil {
		t.Fatalf("Receive: %v", err)
	}
	if len(ds) != len(msgs) {
		t.Fatalf("Receive returned %d deliveries, want %d", len(ds), len(msgs))
	}
	return ds
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// eventually waits, up to a deadline, for cond.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func msg(id string) *azservicebus.ReceivedMessage {
	return &azservicebus.ReceivedMessage{MessageID: id, Body: []byte(`{"prompt":"hi"}`), DeliveryCount: 1}
}

var errBoom = errors.New("boom")
