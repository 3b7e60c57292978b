package queuetest

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/queue"
)

// MemBroker is an in-memory broker for unit tests of code that consumes a
// queue driver (the worker, its observers). It records what is published
// and how each delivery is settled, in order, and fails a second settlement
// of the same delivery. Safe for concurrent use.
type MemBroker struct {
	in      chan *queue.Delivery
	changed chan struct{}

	mu          sync.Mutex
	published   []queue.Message
	events      []string // "publish:<to>:<corr>", "<action>:<id>:<reason>"
	settled     map[string]queue.Settlement
	stopped     bool
	publishHook func(queue.Message) error
}

// NewMemBroker returns an empty MemBroker.
func NewMemBroker() *MemBroker {
	return &MemBroker{in: make(chan *queue.Delivery, 1024), changed: make(chan struct{}, 1), settled: map[string]queue.Settlement{}}
}

// Send queues a JSON delivery with id and body, first attempt, enqueued
// 50ms ago; opts adjust it.
func (b *MemBroker) Send(id, body string, opts ...func(*queue.Delivery)) {
	now := time.Now()
	d := &queue.Delivery{ID: id, Body: []byte(body), ContentType: "application/json", Attempt: 1, ReceivedAt: now, EnqueuedAt: now.Add(-50 * time.Millisecond), EnqueuedResolution: time.Millisecond}
	for _, o := range opts {
		o(d)
	}
	b.in <- d
}

// SetPublishHook makes every publish call f first; an error from f fails
// the publish and nothing is recorded. f runs outside the broker's lock, so
// it may block (a confirm that takes its time) while the broker goes on
// receiving and settling.
func (b *MemBroker) SetPublishHook(f func(queue.Message) error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.publishHook = f
}

// Receive implements the driver contract.
func (b *MemBroker) Receive(ctx context.Context, max int) ([]*queue.Delivery, error) {
	b.mu.Lock()
	stopped := b.stopped
	b.mu.Unlock()
	if stopped {
		return nil, queue.ErrClosed
	}
	var out []*queue.Delivery
	select {
	case d := <-b.in:
		out = append(out, d)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	for len(out) < max {
		select {
		case d := <-b.in:
			out = append(out, d)
		default:
			return out, nil
		}
	}
	return out, nil
}

// Publish implements the driver contract. It keeps a copy of m's headers,
// as a driver that encodes them does: the caller may reuse the map.
func (b *MemBroker) Publish(_ context.Context, m queue.Message) error {
	m.Headers = maps.Clone(m.Headers)
	b.mu.Lock()
	hook := b.publishHook
	b.mu.Unlock()
	if hook != nil {
		if err := hook(m); err != nil {
			return err
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.published = append(b.published, m)
	b.events = append(b.events, "publish:"+m.To+":"+m.CorrelationID)
	return nil
}

// Settle implements the driver contract.
func (b *MemBroker) Settle(_ context.Context, d *queue.Delivery, s queue.Settlement) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, dup := b.settled[d.ID]; dup {
		return fmt.Errorf("delivery %s settled twice", d.ID)
	}
	b.settled[d.ID] = s
	b.events = append(b.events, fmt.Sprintf("%s:%s:%s", s.Action, d.ID, s.Reason))
	select {
	case b.changed <- struct{}{}:
	default:
	}
	return nil
}

// StopReceiving implements the driver contract.
func (b *MemBroker) StopReceiving(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stopped = true
	return nil
}

// Settlement is how delivery id was settled.
func (b *MemBroker) Settlement(id string) (queue.Settlement, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.settled[id]
	return s, ok
}

// SettledCount is how many deliveries were settled.
func (b *MemBroker) SettledCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.settled)
}

// Published returns a copy of what was published, in order.
func (b *MemBroker) Published() []queue.Message {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]queue.Message(nil), b.published...)
}

// Events returns a copy of the publish and settle events, in order.
func (b *MemBroker) Events() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.events...)
}

// Result returns the final result (not a stream chunk) published for
// correlation id corr.
func (b *MemBroker) Result(corr string) (queue.Message, bool) {
	for _, m := range b.Published() {
		if m.CorrelationID == corr && m.Headers["x-sous-status"] != "chunk" {
			return m, true
		}
	}
	return queue.Message{}, false
}

// WaitSettled waits until n deliveries are settled, failing t after 5s.
func (b *MemBroker) WaitSettled(t testing.TB, n int) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		got := b.SettledCount()
		if got >= n {
			return
		}
		select {
		case <-b.changed:
		case <-time.After(10 * time.Millisecond):
		case <-deadline:
			t.Fatalf("only %d of %d deliveries settled", got, n)
		}
	}
}
