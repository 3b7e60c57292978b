package batch_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/batch"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// none is no deadline.
var none time.Time

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

// next calls Next until it says no, and returns the sizes and reasons.
func next[T any](b *batch.Batcher[T], now time.Time, limit, room int, busy bool) (sizes []int, reasons []batch.Reason) {
	for room > 0 {
		bt, ok := b.Next(now, limit, room, busy)
		if !ok {
			break
		}
		sizes = append(sizes, len(bt.Items))
		reasons = append(reasons, bt.Reason)
		room -= len(bt.Items)
		busy = true
	}
	return sizes, reasons
}

func TestNext(t *testing.T) {
	t.Parallel()
	type add struct {
		ms      int
		key     string
		perCall int
	}
	tests := []struct {
		name    string
		adds    []add
		now     int
		limit   int // 0: room
		room    int
		busy    bool
		want    []int
		reasons []batch.Reason
		left    int
	}{
		{name: "one per call goes at once while there is room", adds: []add{{0, "a", 1}, {1, "a", 1}, {2, "a", 1}}, now: 2, room: 2, busy: true, want: []int{1, 1}, reasons: []batch.Reason{batch.Slot, batch.Slot}, left: 1},
		{name: "no room no call", adds: []add{{0, "a", 1}}, now: 100, room: 0, left: 1},
		{name: "busy engine: a list waits for its window", adds: []add{{0, "e", 8}, {1, "e", 8}}, now: 5, room: 8, busy: true, left: 2},
		{name: "idle engine: a list goes at once", adds: []add{{0, "e", 8}}, now: 0, room: 8, want: []int{1}, reasons: []batch.Reason{batch.Idle}},
		{name: "a list that fills the room goes without waiting", adds: []add{{0, "e", 8}, {0, "e", 8}, {0, "e", 8}}, now: 0, room: 2, busy: true, want: []int{2}, reasons: []batch.Reason{batch.Full}, left: 1},
		{name: "a list is cut at the most one call takes", adds: []add{{0, "e", 2}, {0, "e", 2}, {0, "e", 2}}, now: 0, room: 8, busy: true, want: []int{2}, reasons: []batch.Reason{batch.Full}, left: 1},
		{name: "window passed", adds: []add{{0, "e", 8}, {3, "e", 8}}, now: 10, room: 8, busy: true, want: []int{2}, reasons: []batch.Reason{batch.Window}},
		{name: "keys never mix", adds: []add{{0, "a", 8}, {0, "b", 8}, {0, "a", 8}}, now: 10, room: 8, busy: true, want: []int{2, 1}},
		{name: "a list waits for the whole limit, not the half a call left", adds: []add{{0, "e", 8}, {0, "e", 8}, {0, "e", 8}, {0, "e", 8}, {0, "e", 8}, {0, "e", 8}}, now: 5, limit: 8, room: 4, busy: true, left: 6},
		{name: "past its window a list takes the room there is", adds: []add{{0, "e", 8}, {0, "e", 8}, {0, "e", 8}, {0, "e", 8}, {0, "e", 8}, {0, "e", 8}}, now: 10, limit: 8, room: 4, busy: true, want: []int{4}, reasons: []batch.Reason{batch.Window}, left: 2},
		{name: "a list held for its window lets younger single requests pass", adds: []add{{0, "e", 8}, {1, "a", 1}}, now: 2, room: 8, busy: true, want: []int{1}, reasons: []batch.Reason{batch.Slot}, left: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := batch.New[int](10*time.Millisecond, "w-")
			for i, a := range tt.adds {
				b.Add(at(a.ms), none, a.key, a.perCall, i)
			}
			limit := tt.limit
			if limit == 0 {
				limit = tt.room
			}
			got, reasons := next(b, at(tt.now), limit, tt.room, tt.busy)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("call sizes = %v, want %v", got, tt.want)
			}
			for i, r := range tt.reasons {
				if reasons[i] != r {
					t.Errorf("call %d reason = %s, want %s", i, reasons[i], r)
				}
			}
			if b.Len() != tt.left {
				t.Errorf("left = %d, want %d", b.Len(), tt.left)
			}
		})
	}
}

// TestOldestFirstAcrossKeys: under a steady inflow of one key, a request of
// another key goes as soon as it is the oldest waiting, not after the
// inflow stops (the old batcher served the first group while it had
// leftovers: one other-key request among 1000 ran last).
func TestOldestFirstAcrossKeys(t *testing.T) {
	t.Parallel()
	for _, perCall := range []int{1, 4} {
		t.Run(fmt.Sprintf("perCall=%d", perCall), func(t *testing.T) {
			t.Parallel()
			b := batch.New[string](time.Millisecond, "w-")
			ms := 0
			for range 8 {
				b.Add(at(ms), none, "steady", perCall, "steady")
				ms++
			}
			b.Add(at(ms), none, "other", perCall, "other")
			ms++
			order := []string{}
			for range 1000 {
				// Each call that ends is replaced by new work of the steady key.
				bt, ok := b.Next(at(ms), perCall, perCall, true)
				if !ok {
					ms++
					continue
				}
				b.Ended(bt.Key) // the call is over at once
				order = append(order, bt.Items...)
				for range bt.Items {
					b.Add(at(ms), none, "steady", perCall, "steady")
				}
				ms++
				if slices.Contains(order, "other") {
					break
				}
			}
			i := slices.Index(order, "other")
			if i < 0 || i > 8 {
				t.Fatalf("the other key's request ran at position %d of %d (8 older requests were ahead of it)", i, len(order))
			}
		})
	}
}

func TestPutBackKeepsItsPlace(t *testing.T) {
	t.Parallel()
	b := batch.New[string](time.Second, "w-")
	b.Add(at(0), none, "k", 1, "a")
	b.Add(at(1), none, "k", 1, "b")
	b.Add(at(2), none, "j", 1, "c")
	first, _ := b.Next(at(3), 1, 1, false)
	if first.Items[0] != "a" {
		t.Fatalf("first = %v", first.Items)
	}
	b.PutBack(first.Oldest, none, "k", 1, "a") // the engine had no room for it
	var got []string
	for b.Len() > 0 {
		bt, ok := b.Next(at(4), 1, 1, false)
		if !ok {
			t.Fatal("nothing ready")
		}
		got = append(got, bt.Items...)
	}
	if !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("order after put back = %v", got)
	}
}

func TestBatchesKeepOrderAndIDs(t *testing.T) {
	t.Parallel()
	b := batch.New[string](time.Second, "w1-")
	for i := range 5 {
		b.Add(at(i), none, "k", 3, fmt.Sprint(i))
	}
	got, ok := b.Next(at(5), 8, 8, true)
	if !ok || !slices.Equal(got.Items, []string{"0", "1", "2"}) || got.ID != "w1-1" || !got.Oldest.Equal(at(0)) {
		t.Fatalf("got %+v", got)
	}
	if _, ok := b.Deadline(); ok {
		t.Fatal("a deadline for a list whose key has a call on the engine: it waits for Ended")
	}
	b.Ended("k")
	if d, ok := b.Deadline(); !ok || !d.Equal(at(3).Add(time.Second)) {
		t.Fatalf("deadline = %v %v, want the window of the oldest leftover", d, ok)
	}
	b.Add(at(6), none, "one", 1, "x")
	if rest := b.Drain(); !slices.Equal(rest, []string{"3", "4", "x"}) || b.Len() != 0 {
		t.Fatalf("drain = %v", rest)
	}
	if _, ok := b.Deadline(); ok {
		t.Fatal("deadline with nothing waiting")
	}
}

// TestListFillsWhileItsKeyRuns: while a list of one key is on the engine,
// the next list of that key waits for it to end rather than go half full
// past its window (an engine that runs one list at a time got two
// half-full calls in turn: 0.6 of the ideal).
func TestListFillsWhileItsKeyRuns(t *testing.T) {
	t.Parallel()
	b := batch.New[int](10*time.Millisecond, "w-")
	for i := range 8 {
		b.Add(at(0), none, "e", 8, i)
	}
	first, ok := b.Next(at(0), 8, 8, false)
	if !ok || len(first.Items) != 8 {
		t.Fatalf("first list: %v %v", ok, first.Items)
	}
	for i := range 5 {
		b.Add(at(1), none, "e", 8, i)
	}
	if bt, ok := b.Next(at(50), 8, 0, true); ok {
		t.Fatalf("a list went with no room: %v", bt.Items)
	}
	if bt, ok := b.Next(at(50), 8, 4, true); ok {
		t.Fatalf("a half-full list went while its key ran: %d items", len(bt.Items))
	}
	b.Ended("e")
	if bt, ok := b.Next(at(51), 8, 8, false); !ok || len(bt.Items) != 5 {
		t.Fatalf("after the call ended: %v %d", ok, len(bt.Items))
	}
}

func TestExpire(t *testing.T) {
	t.Parallel()
	b := batch.New[string](time.Second, "w-")
	b.Add(at(0), none, "k", 1, "a")
	b.Add(at(5), none, "j", 4, "b")
	b.Add(at(10), none, "k", 1, "c")
	b.PutBack(at(1), none, "j", 4, "d")
	got := b.Expire(at(6))
	slices.Sort(got)
	if !slices.Equal(got, []string{"a", "b", "d"}) || b.Len() != 1 {
		t.Fatalf("expired %v, %d left; want a, b, d and c left", got, b.Len())
	}
}

// BenchmarkBatcher is the dispatcher's hot path: add a call's worth of
// items, take them; size=1 is continuous dispatch of one request per call.
func BenchmarkBatcher(b *testing.B) {
	for _, size := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			bt := batch.New[int](time.Millisecond, "b-")
			now := t0
			b.ReportAllocs()
			for b.Loop() {
				for j := range size {
					bt.Add(now, none, "k", size, j)
				}
				got, ok := bt.Next(now, size, size, true)
				if !ok || len(got.Items) != size {
					b.Fatal("no call")
				}
				bt.Ended(got.Key)
			}
		})
	}
}

// Within a key, the earliest deadline goes first, then the oldest; work
// without a deadline goes after work with one. Across keys the same.
func TestEarliestDeadlineFirst(t *testing.T) {
	b := batch.New[string](time.Second, "b")
	b.Add(at(0), none, "k", 1, "old, no deadline")
	b.Add(at(1), at(9000), "k", 1, "late deadline")
	b.Add(at(2), at(5000), "k", 1, "early deadline")
	b.Add(at(3), at(5000), "j", 1, "early deadline, younger, other key")
	b.Add(at(4), none, "j", 1, "young, no deadline")
	var got []string
	for {
		bt, ok := b.Next(at(10), 1, 1, false)
		if !ok {
			break
		}
		got = append(got, bt.Items...)
	}
	want := []string{"early deadline", "early deadline, younger, other key", "late deadline", "old, no deadline", "young, no deadline"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("order\n got %q\nwant %q", got, want)
	}
}

// Overdue takes out exactly the items whose deadline has come, and NextDue
// says when the next one comes.
func TestOverdue(t *testing.T) {
	b := batch.New[string](time.Second, "b")
	b.Add(at(0), at(100), "k", 1, "a")
	b.Add(at(1), none, "k", 1, "b")
	b.Add(at(2), at(300), "j", 4, "c")
	b.Add(at(3), at(200), "j", 4, "d")
	if d, ok := b.NextDue(); !ok || !d.Equal(at(100)) {
		t.Fatalf("NextDue = %v %v, want %v", d, ok, at(100))
	}
	if got := b.Overdue(at(99)); len(got) != 0 {
		t.Fatalf("overdue before any deadline: %q", got)
	}
	got := b.Overdue(at(200))
	slices.Sort(got)
	if fmt.Sprint(got) != "[a d]" || b.Len() != 2 {
		t.Fatalf("Overdue(200) = %q, %d left; want [a d], 2 left", got, b.Len())
	}
	if d, ok := b.NextDue(); !ok || !d.Equal(at(300)) {
		t.Fatalf("NextDue = %v %v, want %v", d, ok, at(300))
	}
	b.Overdue(at(300))
	if _, ok := b.NextDue(); ok || b.Len() != 1 {
		t.Fatalf("after the last deadline: NextDue ok=%v, %d left", ok, b.Len())
	}
}
