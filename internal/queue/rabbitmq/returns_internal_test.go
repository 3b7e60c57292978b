package rabbitmq

import (
	"fmt"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// TestReturnsMatch: a publish sees a return recorded after its mark with
// its queue and ids, and no other; a return before its mark is not its own;
// when more returns came in its window than the ring holds, it counts as
// returned (a possible duplicate, never a loss).
func TestReturnsMatch(t *testing.T) {
	t.Parallel()
	ch := make(chan amqp.Return, returnBuffer)
	r := &returns{ch: ch}
	ret := func(q, id string) amqp.Return {
		return amqp.Return{RoutingKey: q, MessageId: id, CorrelationId: "c-" + id, ReplyText: "NO_ROUTE"}
	}
	pub := func(id string) *amqp.Publishing { return &amqp.Publishing{MessageId: id, CorrelationId: "c-" + id} }

	before := r.mark()
	ch <- ret("gone", "a") // returned before b's publish
	if text, ok := r.find(before, "gone", pub("a")); !ok || text != "NO_ROUTE" {
		t.Fatalf("a's own return: %q %v", text, ok)
	}
	mark := r.mark()
	if _, ok := r.find(mark, "gone", pub("a")); ok {
		t.Fatal("a return recorded before the mark was taken for a later publish")
	}
	ch <- ret("gone", "b")
	for _, c := range []struct {
		queue, id string
		want      bool
	}{{"gone", "b", true}, {"gone", "c", false}, {"there", "b", false}} {
		if _, ok := r.find(mark, c.queue, pub(c.id)); ok != c.want {
			t.Errorf("%s to %s: returned %v, want %v", c.id, c.queue, ok, c.want)
		}
	}

	mark = r.mark()
	for i := range returnRing + 1 {
		ch <- ret("gone", fmt.Sprint("flood-", i))
		if i%returnBuffer == returnBuffer-1 {
			r.mu.Lock()
			r.drain()
			r.mu.Unlock()
		}
	}
	if text, ok := r.find(mark, "there", pub("unrelated")); !ok {
		t.Fatalf("a window the ring cannot hold was taken as delivered (%q)", text)
	}
}

// TestReturnsPollDrains: returns nobody waits for are drained, so the
// reader that hands them over never blocks on a full buffer for long.
func TestReturnsPollDrains(t *testing.T) {
	t.Parallel()
	ch := make(chan amqp.Return, returnBuffer)
	r := &returns{ch: ch}
	dead := make(chan struct{})
	stopped := make(chan struct{})
	go func() { r.poll(dead); close(stopped) }()
	for i := range 3 * returnBuffer { // blocks unless something drains
		ch <- amqp.Return{RoutingKey: "gone", MessageId: fmt.Sprint(i)}
	}
	close(dead)
	<-stopped
	r.mu.Lock()
	r.drain()
	n := r.count.Load()
	r.mu.Unlock()
	if n != 3*returnBuffer {
		t.Fatalf("recorded %d returns, want %d", n, 3*returnBuffer)
	}
}
