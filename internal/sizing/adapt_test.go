package sizing_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/sizing"
)

func newAdapter(t *testing.T, max, start int) (*sizing.Sizer, *sizing.Adapter) {
	t.Helper()
	s, err := sizing.New(nil, sizing.Config{Max: max})
	if err != nil {
		t.Fatal(err)
	}
	a, err := sizing.NewAdapter(s, nil, start, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return s, a
}

// An engine that takes every request it gets (no wait queue) and runs as
// many as the slots allow: the slots double up to Max.
func TestAdapterSlowStartToMax(t *testing.T) {
	s, a := newAdapter(t, 256, 4)
	var got []int
	for range 8 {
		got = append(got, a.Observe(a.Slots(), 0))
	}
	want := []int{8, 16, 32, 64, 128, 256, 256, 256}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("slots after each reading = %v, want %v", got, want)
		}
	}
	if d := s.Size(); d.Size != 256 {
		t.Fatalf("decision = %+v, want 256", d)
	}
}

// An engine that runs at most 40 at once and queues the rest: the slots
// settle just above 40, and stay there under a steady load.
func TestAdapterSettlesAboveEngineCapacity(t *testing.T) {
	const capacity = 40
	s, a := newAdapter(t, 256, 4)
	engine := func(inFlight int) (running, waiting int) {
		return min(inFlight, capacity), max(0, inFlight-capacity)
	}
	var seen []int
	for range 60 {
		seen = append(seen, a.Observe(engine(a.Slots())))
	}
	last := seen[len(seen)-20:]
	for _, n := range last {
		margin := max(1, n/16)
		if n < capacity || n > capacity+2*margin+capacity/8 {
			t.Fatalf("slots over the last 20 readings = %v, want just above %d (all readings: %v)", last, capacity, seen)
		}
	}
	if d := s.Size(); d.Reason != sizing.ReasonEngine || d.Size != a.Slots() {
		t.Fatalf("decision = %+v, want the adapter's %d with reason engine", d, a.Slots())
	}
}

// One reading with a queue is a burst, not a full engine: two in a row cut.
func TestAdapterCutsOnlyOnASustainedQueue(t *testing.T) {
	_, a := newAdapter(t, 64, 32)
	if n := a.Observe(20, 12); n != 32 {
		t.Fatalf("after one reading with a queue: slots = %d, want 32 unchanged", n)
	}
	if n := a.Observe(32, 0); n != 64 {
		t.Fatalf("after a reading at the limit with no queue: slots = %d, want 64", n)
	}
	a.Observe(20, 12)
	if n := a.Observe(20, 12); n != 24 { // 20 running + margin 64/16
		t.Fatalf("after two readings with a queue: slots = %d, want 24", n)
	}
	// After a cut, growth is by an eighth.
	if n := a.Observe(24, 0); n != 27 {
		t.Fatalf("growth after a cut: slots = %d, want 27", n)
	}
}

// An engine that runs fewer than the slots with nothing waiting is not
// limited by them: no growth.
func TestAdapterDoesNotGrowWhenUnused(t *testing.T) {
	_, a := newAdapter(t, 64, 16)
	for range 5 {
		if n := a.Observe(3, 0); n != 16 {
			t.Fatalf("slots = %d, want 16 while the engine runs 3", n)
		}
	}
}

// The slots never go below Min.
func TestAdapterKeepsMin(t *testing.T) {
	s, err := sizing.New(nil, sizing.Config{Min: 2, Max: 32})
	if err != nil {
		t.Fatal(err)
	}
	a, err := sizing.NewAdapter(s, nil, 8, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	a.Observe(0, 50)
	if n := a.Observe(0, 50); n != 2 {
		t.Fatalf("slots = %d, want Min 2", n)
	}
}

type queueFunc func() (int, int, bool, error)

func (f queueFunc) Queue(context.Context) (int, int, bool, error) { return f() }

// Run reads on each tick, keeps the slots through failed readings and
// returns when its context ends.
func TestAdapterRun(t *testing.T) {
	s, err := sizing.New(nil, sizing.Config{Max: 64})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	reads := 0
	q := queueFunc(func() (int, int, bool, error) {
		mu.Lock()
		defer mu.Unlock()
		reads++
		switch {
		case reads == 1:
			return 0, 0, false, errors.New("connection refused")
		case reads == 2:
			return 0, 0, false, nil
		}
		return s.Size().Size, 0, true, nil
	})
	a, err := sizing.NewAdapter(s, q, 4, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for s.Size().Size != 64 {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("slots never reached Max: decision %+v", s.Size())
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v, want nil", err)
	}
}

func TestNewAdapterRejectsZeroInterval(t *testing.T) {
	s, err := sizing.New(nil, sizing.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sizing.NewAdapter(s, nil, 4, 0); err == nil {
		t.Fatal("NewAdapter with interval 0: no error")
	}
}
