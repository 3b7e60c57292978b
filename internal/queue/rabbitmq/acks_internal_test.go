package rabbitmq

import "testing"

// TestAckPlan: runs from the oldest unacked tag go as one multiple ack,
// covering the acks held meanwhile, and ending on a tag that was asked for,
// never on one already acked alone or nacked (the broker closes the channel
// over an ack for a tag it no longer holds).
func TestAckPlan(t *testing.T) {
	t.Parallel()
	a := newAcker()
	for tag := uint64(1); tag <= 7; tag++ {
		a.track(tag)
	}
	steps := []struct {
		name  string
		nack  uint64
		asked []uint64
		alone []uint64 // held too long: acked alone after the plan
		last  uint64
	}{
		{name: "not the oldest: held", asked: []uint64{2, 3}, last: 0},
		{name: "the oldest: one run covers it and the held ones", asked: []uint64{1}, last: 3},
		{name: "held, then acked alone", asked: []uint64{5}, alone: []uint64{5}, last: 0},
		{name: "a nacked tag and one acked alone are passed, not ended on", nack: 4, asked: []uint64{6}, last: 6},
		{name: "nothing left but the newest", asked: []uint64{7}, last: 7},
	}
	for _, s := range steps {
		if s.nack != 0 {
			a.settled(s.nack)
		}
		got, coverable := a.plan(s.asked)
		if got != s.last || !coverable {
			t.Fatalf("%s: last = %d (coverable %v), want %d", s.name, got, coverable, s.last)
		}
		a.alone(s.alone)
	}
	if len(a.done) != 0 || a.head != len(a.seen) {
		t.Fatalf("left done %v, head %d of %d", a.done, a.head, len(a.seen))
	}
}

// TestAckPlanMissingTag: a tag missing from the tracked run (a delivery no
// one read, on a consumer left behind) would be covered, unread, by a
// multiple ack: from then on every ack goes alone.
func TestAckPlanMissingTag(t *testing.T) {
	t.Parallel()
	a := newAcker()
	a.track(1)
	a.track(2)
	a.track(5) // 3 and 4 went to a consumer nobody reads
	if got, coverable := a.plan([]uint64{1}); got != 0 || coverable {
		t.Fatalf("last = %d, coverable %v after a gap, want 0 and false (ack alone, at once)", got, coverable)
	}
	a.track(6)
	if got, coverable := a.plan([]uint64{2, 5, 6}); got != 0 || coverable {
		t.Fatalf("last = %d, coverable %v after a gap, want 0 and false (ack alone, at once)", got, coverable)
	}
}
