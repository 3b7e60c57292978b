package rabbitmq

import "testing"

// TestAckPlan: runs from the oldest unacked tag go as one multiple ack,
// ending on a tag that was asked for, never on one already acked alone or
// nacked (the broker closes the channel over an ack for a tag it no longer
// holds); the rest go alone, at once.
func TestAckPlan(t *testing.T) {
	t.Parallel()
	a := newAcker()
	for tag := uint64(1); tag <= 6; tag++ {
		a.track(tag)
	}
	steps := []struct {
		name  string
		nack  uint64
		asked []uint64
		last  uint64
	}{
		{name: "not the oldest: alone", asked: []uint64{2, 3}, last: 0},
		{name: "the oldest: a run over the ones acked alone ends on the last asked", asked: []uint64{1}, last: 1},
		{name: "a nacked tag is passed, not ended on", nack: 4, asked: []uint64{5}, last: 5},
		{name: "nothing left but the newest", asked: []uint64{6}, last: 6},
	}
	for _, s := range steps {
		if s.nack != 0 {
			a.settled(s.nack)
		}
		if got := a.plan(s.asked); got != s.last {
			t.Fatalf("%s: last = %d, want %d", s.name, got, s.last)
		}
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
	if got := a.plan([]uint64{1}); got != 0 {
		t.Fatalf("last = %d after a gap, want 0 (ack alone)", got)
	}
	a.track(6)
	if got := a.plan([]uint64{2, 5, 6}); got != 0 {
		t.Fatalf("last = %d after a gap, want 0 (ack alone)", got)
	}
}
