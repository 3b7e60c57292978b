package rabbitmq

import (
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// returns matches a session's basic.returns to the publishes they answer,
// without tagging every publish and without a hand-off per publish.
//
// The ordering it rests on: RabbitMQ sends a mandatory message's
// basic.return before that message's confirm, on the same channel, and
// amqp091-go's reader goroutine hands the return to the NotifyReturn
// channel before it processes the confirm. That channel is buffered and is
// read only by drain, under mu, with non-blocking receives, never by a
// goroutine waiting in a receive: so a return stays in the buffer until a
// drain records it, under the same lock a publisher checks under. A
// publisher takes a mark (how many returns were recorded) before it
// publishes; once its confirm is in, its own return, if there is one, is
// either in the buffer or recorded, so it drains and looks through the
// returns recorded since its mark for one with its queue, message id and
// correlation id.
//
// What that cannot tell apart is counted as returned, never as delivered:
// two publishes in flight at once with the same queue, message id and
// correlation id, one of them returned (a queue deleted between the two),
// are both unroutable to their callers, which publish again (a possible
// duplicate, never a loss); so is a publish with more returns in its window
// than the ring holds. A ticker drains too, so returns nobody waits for (a
// publisher that gave up) cannot fill the buffer and stall the reader.
type returns struct {
	ch <-chan amqp.Return // from NotifyReturn, capacity returnBuffer

	mu    sync.Mutex
	count atomic.Uint64 // returns recorded; written under mu
	ring  [returnRing]returned
}

type returned struct {
	queue, messageID, correlationID, text string
}

const (
	returnBuffer = 1024
	returnRing   = 1024
	returnPoll   = 100 * time.Millisecond
)

// mark is taken before a publish: returns recorded after it may be its own.
func (r *returns) mark() uint64 { return r.count.Load() }

// drain records what is in the buffer; the caller holds mu.
func (r *returns) drain() {
	for {
		select {
		case ret, ok := <-r.ch:
			if !ok {
				return
			}
			n := r.count.Load()
			r.ring[n%returnRing] = returned{queue: ret.RoutingKey, messageID: ret.MessageId, correlationID: ret.CorrelationId, text: ret.ReplyText}
			r.count.Store(n + 1)
		default:
			return
		}
	}
}

// find reports whether a publish to queue with these ids, marked at mark
// and since confirmed, was returned, and the broker's reply text.
func (r *returns) find(mark uint64, queue string, p *amqp.Publishing) (text string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drain()
	n := r.count.Load()
	if n == mark {
		return "", false
	}
	if n-mark > returnRing {
		return "more returns at once than can be told apart", true
	}
	for i := mark; i < n; i++ {
		x := &r.ring[i%returnRing]
		if x.queue == queue && x.messageID == p.MessageId && x.correlationID == p.CorrelationId {
			return x.text, true
		}
	}
	return "", false
}

// poll drains every returnPoll until dead closes.
func (r *returns) poll(dead <-chan struct{}) {
	t := time.NewTicker(returnPoll)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			r.mu.Lock()
			r.drain()
			r.mu.Unlock()
		case <-dead:
			return
		}
	}
}
