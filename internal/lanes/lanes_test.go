package lanes_test

import (
	"container/heap"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/lanes"
)

func TestParse(t *testing.T) {
	ls, err := lanes.Parse("interactive=sous.interactive,bulk=sous.bulk:share=0.2", "ignored")
	if err != nil {
		t.Fatal(err)
	}
	want := []lanes.Lane{{Name: "interactive", Queue: "sous.interactive"}, {Name: "bulk", Queue: "sous.bulk", Share: 0.2}}
	if len(ls) != 2 || ls[0] != want[0] || ls[1] != want[1] {
		t.Fatalf("got %+v, want %+v", ls, want)
	}
	ls, err = lanes.Parse("a=q.a,b=q.b:window=2000:share=0.3", "")
	if err != nil || ls[1] != (lanes.Lane{Name: "b", Queue: "q.b", Share: 0.3, Window: 2000}) {
		t.Fatalf("window and share: %+v %v", ls, err)
	}
	ls, err = lanes.Parse("a=q.a, b=q.b, c=q.c", "")
	if err != nil {
		t.Fatal(err)
	}
	if ls[1].Share != lanes.DefaultShare || ls[2].Share != lanes.DefaultShare || ls[0].Share != 0 {
		t.Fatalf("default shares: %+v", ls)
	}
	ls, err = lanes.Parse("", "sous.requests")
	if err != nil || len(ls) != 1 || ls[0] != (lanes.Lane{Name: "default", Queue: "sous.requests"}) {
		t.Fatalf("unset: %+v %v", ls, err)
	}
}

func TestParseRefuses(t *testing.T) {
	for spec, want := range map[string]string{
		"interactive":                     "NAME=QUEUE",
		"a=q,,b=r":                        "lane 2 is empty",
		"a=q,a=r":                         "listed twice",
		"a=q,b=q":                         "two lanes",
		"a=q,b=r:share=2":                 "not a fraction",
		"a=q,b=r:share=x":                 "not a fraction",
		"a=q,b=r:weight=3":                `unknown option "weight=3"`,
		"a=q,b=r:window=0":                "window=0 is not a number",
		"a=q,b=r:share=0.6,c=s:share=0.5": "add up to 1.10",
		"a b=q":                           "a name is",
	} {
		_, err := lanes.Parse(spec, "")
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an error with %q", spec, err, want)
		}
	}
}

// sim runs a two-lane fleet of limit slots on a fake clock: lane 0 and
// lane 1 always have work (saturated) unless has says otherwise, with fixed
// service times. It returns lane 1's share of the slot-seconds.
func sim(t *testing.T, limit int, share float64, service [2]time.Duration, span time.Duration) float64 {
	t.Helper()
	s := lanes.NewScheduler([]float64{0, share})
	now := time.Unix(0, 0)
	on := []int{0, 0}
	ends := &endHeap{}
	used := [2]float64{}
	last := now
	var order []int
	for now.Before(time.Unix(0, 0).Add(span)) {
		dt := now.Sub(last).Seconds()
		for i := range used {
			used[i] += float64(on[i]) * dt
		}
		last = now
		s.Advance(now, on)
		for on[0]+on[1] < limit {
			order = s.Order(order, []bool{true, true}, on, limit)
			l := order[0]
			on[l]++
			heap.Push(ends, end{now.Add(service[l]), l})
		}
		e := heap.Pop(ends).(end)
		now = e.at
		on[e.lane]--
	}
	return used[1] / (used[0] + used[1])
}

type end struct {
	at   time.Time
	lane int
}

type endHeap []end

func (h endHeap) Len() int           { return len(h) }
func (h endHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h endHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *endHeap) Push(x any)        { *h = append(*h, x.(end)) }
func (h *endHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// With both lanes saturated, the lower lane gets its share of slot-time,
// whether its answers are shorter or longer than the higher lane's.
func TestShareHoldsUnderSaturation(t *testing.T) {
	for _, c := range []struct {
		limit   int
		share   float64
		service [2]time.Duration
	}{
		{32, 0.2, [2]time.Duration{time.Second, 5 * time.Second}},
		{32, 0.2, [2]time.Duration{5 * time.Second, 700 * time.Millisecond}},
		{32, 0.1, [2]time.Duration{2 * time.Second, 2 * time.Second}},
		{4, 0.3, [2]time.Duration{time.Second, 3 * time.Second}},
		{1, 0.2, [2]time.Duration{time.Second, time.Second}},
	} {
		got := sim(t, c.limit, c.share, c.service, 20*time.Minute)
		// ±10% on a realistic engine; with a handful of slots one slot is
		// a large step, and the share holds to within half of one.
		tol := 0.1 * c.share
		if c.limit < 16 {
			tol = max(tol, 0.5/float64(c.limit))
		}
		if math.Abs(got-c.share) > tol {
			t.Errorf("limit %d share %.2f service %v: the lower lane got %.3f of the slot-time, want %.2f ±%.3f", c.limit, c.share, c.service, got, c.share, tol)
		}
	}
}

// A lower lane that holds more than its share never gets a slot before a
// higher lane that waits: the higher lane waits only for a slot to free.
func TestHigherLaneFirstWhenLowerHasItsShare(t *testing.T) {
	s := lanes.NewScheduler([]float64{0, 0.2})
	now := time.Unix(100, 0)
	on := []int{0, 31} // a bulk backlog fills the engine
	s.Advance(now, on)
	s.Advance(now.Add(time.Minute), on)
	got := s.Order(nil, []bool{true, true}, on, 32)
	if got[0] != 0 {
		t.Fatalf("order %v: the interactive lane must get the free slot", got)
	}
	// The lower lane alone gets every slot the higher lane leaves.
	if got := s.Order(nil, []bool{false, true}, on, 32); len(got) != 1 || got[0] != 1 {
		t.Fatalf("order %v: the bulk lane must fill the slack", got)
	}
	// Starting cold, the lower lane is owed its share at once, but no more.
	s = lanes.NewScheduler([]float64{0, 0.2})
	s.Advance(now, []int{0, 0})
	taken := []int{0, 0}
	for range 32 {
		l := s.Order(nil, []bool{true, true}, taken, 32)[0]
		taken[l]++
	}
	if taken[1] != 7 { // floor(6.4) by right, and one more while under its share
		t.Fatalf("cold start: the bulk lane took %d of 32 slots, want 7", taken[1])
	}
}
