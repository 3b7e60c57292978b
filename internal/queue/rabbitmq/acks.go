package rabbitmq

import (
	"errors"
	"sync"
)

// acker coalesces a session's acks. Every delivery read from the consumer
// is tracked in delivery-tag order; the acks asked for meanwhile are
// gathered by one goroutine, which sends a single ack with multiple=true
// for the run of tags, from the oldest unacked one, that are all asked
// for, and acks the others alone, at once. On a quorum queue each ack is
// a command the broker replicates, so a run of answers that end in order
// costs one instead of one each. No ack waits for another delivery: what
// cannot be covered by the run goes alone in the same pass.
//
// A multiple ack covers every unacknowledged tag up to its own, so a tag
// is only ever covered once every tag before it was read and asked to be
// acked; a tag that is nacked instead is marked done only after its nack
// went out. Tags on a channel run 1, 2, 3…: should one ever be missing
// from the tracked run (a delivery nobody read, on a consumer left behind),
// a multiple ack would cover it unread, so from then on every ack goes
// alone.
type acker struct {
	mu   sync.Mutex
	seen []uint64 // tags read from the consumer and not yet covered, in order
	head int
	// done holds the tags settled and not yet passed by head: asked (to be
	// covered by a run) or sent (acked alone, or nacked: a run may pass
	// them but must not end on them, since the broker refuses an ack,
	// multiple or not, for a tag it no longer holds).
	done map[uint64]tagState

	next   uint64 // the tag expected next from the consumer
	single bool   // a tag was missing from the run: no more multiple acks

	reqs chan ackReq
}

type ackReq struct {
	tag  uint64
	done chan error
}

type tagState uint8

const (
	asked tagState = iota + 1
	sent
)

var errAckLost = errors.New("connection lost before the ack was sent")

func newAcker() *acker {
	return &acker{done: map[uint64]tagState{}, next: 1, reqs: make(chan ackReq, 1024)}
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
// one ack with multiple=true covers; the tags asked for beyond it are
// marked sent: the caller acks them alone.
func (a *acker) plan(tags []uint64) (last uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.single {
		return 0
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
	for _, t := range tags {
		if t > last {
			a.done[t] = sent
		}
	}
	if a.head > 256 && a.head > len(a.seen)/2 {
		a.seen = append(a.seen[:0], a.seen[a.head:]...)
		a.head = 0
	}
	return last
}

// ack asks for tag to be acked and waits until the frame is sent.
func (s *session) ack(tag uint64) error {
	r := ackReq{tag: tag, done: make(chan error, 1)}
	select {
	case s.acker.reqs <- r:
	case <-s.dead:
		return errAckLost
	}
	select {
	case err := <-r.done:
		return err
	case <-s.dead:
		return errAckLost
	}
}

// ackLoop sends the acks asked for, coalesced, until the session dies.
func (s *session) ackLoop() {
	var batch []ackReq
	var tags []uint64
	for {
		batch, tags = batch[:0], tags[:0]
		select {
		case r := <-s.acker.reqs:
			batch = append(batch, r)
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
		for _, r := range batch {
			tags = append(tags, r.tag)
		}
		last := s.acker.plan(tags)
		s.consMu.Lock()
		var runErr error
		if last != 0 {
			runErr = s.cons.Ack(last, true)
		}
		for _, r := range batch {
			if r.tag <= last {
				r.done <- runErr
				continue
			}
			r.done <- s.cons.Ack(r.tag, false)
		}
		s.consMu.Unlock()
	}
}
