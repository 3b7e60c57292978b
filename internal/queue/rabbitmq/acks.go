package rabbitmq

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// acker coalesces a session's acks. Every delivery read from the consumer
// is tracked in delivery-tag order; the acks asked for are gathered by one
// goroutine, which sends a single ack with multiple=true for the run of
// tags, from the oldest unacked one, that are all settled. On a quorum
// queue each ack frame is a command the broker replicates: acking every
// delivery alone cost the broker several times the commands of a worker
// that acks in order (issue 29: 4,816 ack frames for 5,000 deliveries,
// against 674).
//
// An ack that a run cannot cover yet (an older delivery is still running)
// is held, so that the run covers it when the older one ends, as it
// usually does a moment later. Holding one costs window: the broker counts
// it against the prefetch until it goes. So nothing is held for long, nor
// too many: once the oldest held ack has waited ackHold, or more than two
// thirds of the prefetch are held (the window less the in-flight limit at
// the default window of 3 × limit: the engine's slots can still all be
// fed), the held ones go alone.
//
// A multiple ack covers every unacknowledged tag up to its own, so a tag
// is only ever covered once every tag before it was read and asked to be
// acked; a tag that is nacked instead is marked done only after its nack
// went out. Tags on a channel run 1, 2, 3…: should one ever be missing
// from the tracked run (a delivery nobody read, on a consumer left behind),
// a multiple ack would cover it unread, so from then on every ack goes
// alone, at once.
type acker struct {
	mu   sync.Mutex
	seen []uint64 // tags read from the consumer and not yet covered, in order
	head int
	// done holds the tags settled and not yet passed by head: asked (to be
	// covered by a run: held) or sent (acked alone, or nacked: a run may
	// pass them but must not end on them, since the broker refuses an ack,
	// multiple or not, for a tag it no longer holds).
	done map[uint64]tagState

	next   uint64 // the tag expected next from the consumer
	single bool   // a tag was missing from the run: no more multiple acks

	reqs    chan ackReq
	holdMax atomic.Int64 // the most acks held: two thirds of the prefetch
}

type ackReq struct {
	tag   uint64
	flush chan struct{} // not nil: write every ack held, then close it
}

type tagState uint8

const (
	asked tagState = iota + 1
	sent
)

var errAckLost = errors.New("connection lost before the ack was sent")

// ackHold bounds how long an ack is held for a run to cover it.
const ackHold = 50 * time.Millisecond

func newAcker() *acker {
	return &acker{done: map[uint64]tagState{}, next: 1, reqs: make(chan ackReq, 1024)}
}

// setWindow bounds the held acks for a consumer at prefetch.
func (a *acker) setWindow(prefetch int) {
	a.holdMax.Store(int64(max(1, 2*prefetch/3)))
}

// track records a tag read from the consumer. Tags come in increasing
// order on a channel.
func (a *acker) track(tag uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if tag != a.next {
		a.single, a.seen, a.head, a.done = true, nil, 0, map[uint64]tagState{}
	}
	a.next = tag + 1
	if !a.single {
		a.seen = append(a.seen, tag)
	}
}

// settled marks tag done without an ack of its own (it was nacked): the
// run may pass it.
func (a *acker) settled(tag uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.single {
		a.done[tag] = sent
	}
}

// plan marks the tags asked for and returns last, the newest asked tag of
// the run from the oldest unacked one that is all settled (0: none), which
// one ack with multiple=true covers. The tags asked for and not covered
// stay asked, for a later run to cover, unless coverable is false: a tag
// went missing, and every ack goes alone.
func (a *acker) plan(tags []uint64) (last uint64, coverable bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.single {
		return 0, false
	}
	for _, t := range tags {
		a.done[t] = asked
	}
	for a.head < len(a.seen) {
		t := a.seen[a.head]
		st, ok := a.done[t]
		if !ok {
			break
		}
		if st == asked {
			last = t
		}
		delete(a.done, t)
		a.head++
	}
	if a.head > 256 && a.head > len(a.seen)/2 {
		a.seen = append(a.seen[:0], a.seen[a.head:]...)
		a.head = 0
	}
	return last, true
}

// alone marks asked tags that no run covered as acked alone: a run may pass
// them but no longer end on them.
func (a *acker) alone(tags []uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.single {
		return
	}
	for _, t := range tags {
		a.done[t] = sent
	}
}

// ack asks for tag to be acked and returns: ackLoop writes the frame, at
// once or in a later run (held). Nothing is lost by not waiting for it: an
// ack has no answer in AMQP 0-9-1, so a frame written is no surer to be
// taken than one about to be, and a connection lost before the broker took
// either means it redelivers (results are at least once). Not waiting
// spares the settling goroutine a hand-off and a wake-up per delivery.
// Driver.Close writes the held acks before it closes the connection.
func (s *session) ack(tag uint64) error {
	select {
	case s.acker.reqs <- ackReq{tag: tag}:
		return nil
	case <-s.dead:
		return errAckLost
	}
}

// flushAcks writes every ack asked for so far, held or not, and returns
// once they are written, the session died, or ctx ended.
func (s *session) flushAcks(ctx context.Context) {
	done := make(chan struct{})
	select {
	case s.acker.reqs <- ackReq{flush: done}:
	case <-s.dead:
		return
	case <-ctx.Done():
		return
	}
	select {
	case <-done:
	case <-s.dead:
	case <-ctx.Done():
	}
}

// ackLoop sends the acks asked for, coalesced, until the session dies.
func (s *session) ackLoop() {
	var (
		batch, held []ackReq // held: asked, not yet covered by a run
		tags        []uint64
		timer       = time.NewTimer(ackHold)
	)
	timer.Stop()
	for {
		batch, tags = batch[:0], tags[:0]
		expired := false
		select {
		case r := <-s.acker.reqs:
			batch = append(batch, r)
		case <-timer.C:
			expired = true
		case <-s.dead:
			return
		}
	more:
		for {
			select {
			case r := <-s.acker.reqs:
				batch = append(batch, r)
			default:
				break more
			}
		}
		var flushes []chan struct{}
		wasHeld := len(held) > 0
		for _, r := range batch {
			if r.flush != nil {
				flushes = append(flushes, r.flush)
				continue
			}
			tags = append(tags, r.tag)
			held = append(held, r)
		}
		last, coverable := s.acker.plan(tags)
		// An ack's error is the channel's: the session is dying, and the
		// broker redelivers what it did not take.
		s.consMu.Lock()
		if last != 0 {
			_ = s.cons.Ack(last, true)
		}
		keep := held[:0]
		for _, r := range held {
			if r.tag > last {
				keep = append(keep, r)
			}
		}
		held = keep
		if len(held) > 0 && (!coverable || expired || flushes != nil || int64(len(held)) > s.acker.holdMax.Load()) {
			tags = tags[:0]
			for _, r := range held {
				tags = append(tags, r.tag)
			}
			s.acker.alone(tags)
			for _, r := range held {
				_ = s.cons.Ack(r.tag, false)
			}
			held = held[:0]
		}
		s.consMu.Unlock()
		for _, f := range flushes {
			close(f)
		}
		switch {
		case len(held) == 0:
			timer.Stop()
		case !wasHeld: // an expiry sends every held ack: held is empty after one
			timer.Reset(ackHold) // from the oldest held ack's ask, near enough
		}
	}
}
