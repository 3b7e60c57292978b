package batch_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/batch"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

func sizes[T any](bs []batch.Batch[T]) []int {
	out := make([]int, len(bs))
	for i, b := range bs {
		out[i] = len(b.Items)
	}
	return out
}

func TestReady(t *testing.T) {
	t.Parallel()
	type add struct {
		ms  int
		key string
	}
	tests := []struct {
		name    string
		adds    []add
		now     int
		size    int
		slots   int
		idle    bool
		want    []int
		reasons []batch.Reason
		left    int
	}{
		{name: "busy engine waits for the window", adds: []add{{0, "a"}, {1, "a"}}, now: 5, size: 4, slots: 1, left: 2},
		{name: "idle engine dispatches at once", adds: []add{{0, "a"}}, now: 0, size: 4, slots: 1, idle: true, want: []int{1}, reasons: []batch.Reason{batch.Idle}},
		{name: "full batch goes without waiting", adds: []add{{0, "a"}, {0, "a"}, {0, "a"}, {0, "a"}, {0, "a"}}, now: 0, size: 4, slots: 1, want: []int{4}, reasons: []batch.Reason{batch.Full}, left: 1},
		{name: "window passed", adds: []add{{0, "a"}, {3, "a"}}, now: 10, size: 8, slots: 1, want: []int{2}, reasons: []batch.Reason{batch.Window}},
		{name: "keys never mix", adds: []add{{0, "a"}, {0, "b"}, {0, "a"}}, now: 10, size: 8, slots: 2, want: []int{2, 1}},
		{name: "slots bound the batches", adds: []add{{0, "a"}, {0, "b"}, {0, "c"}}, now: 10, size: 8, slots: 2, want: []int{1, 1}, left: 1},
		{name: "no slots no batch", adds: []add{{0, "a"}}, now: 100, size: 1, slots: 0, idle: true, left: 1},
		{name: "oversized group splits into full batches", adds: []add{{0, "a"}, {0, "a"}, {0, "a"}, {0, "a"}, {0, "a"}}, now: 0, size: 2, slots: 3, want: []int{2, 2}, reasons: []batch.Reason{batch.Full, batch.Full}, left: 1},
		{name: "idle dispatches only the oldest group", adds: []add{{0, "b"}, {1, "a"}}, now: 1, size: 8, slots: 2, idle: true, want: []int{1}, left: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := batch.New[int](10*time.Millisecond, "w-")
			for i, a := range tt.adds {
				b.Add(at(a.ms), a.key, i)
			}
			got := b.Ready(at(tt.now), tt.size, tt.slots, tt.idle)
			if !slices.Equal(sizes(got), tt.want) && !(len(got) == 0 && len(tt.want) == 0) {
				t.Fatalf("batch sizes = %v, want %v", sizes(got), tt.want)
			}
			for i, r := range tt.reasons {
				if got[i].Reason != r {
					t.Errorf("batch %d reason = %s, want %s", i, got[i].Reason, r)
				}
			}
			if b.Len() != tt.left {
				t.Errorf("left = %d, want %d", b.Len(), tt.left)
			}
		})
	}
}

func TestBatchesKeepOrderAndIDs(t *testing.T) {
	t.Parallel()
	b := batch.New[string](time.Second, "w1-")
	for i := range 5 {
		b.Add(at(i), "k", fmt.Sprint(i))
	}
	got := b.Ready(at(5), 3, 2, false)
	if len(got) != 1 || !slices.Equal(got[0].Items, []string{"0", "1", "2"}) || got[0].ID != "w1-1" || !got[0].Oldest.Equal(at(0)) {
		t.Fatalf("got %+v", got)
	}
	if d, ok := b.Deadline(); !ok || !d.Equal(at(3).Add(time.Second)) {
		t.Fatalf("deadline = %v %v, want the window of the oldest leftover", d, ok)
	}
	if rest := b.Drain(); !slices.Equal(rest, []string{"3", "4"}) || b.Len() != 0 {
		t.Fatalf("drain = %v", rest)
	}
	if _, ok := b.Deadline(); ok {
		t.Fatal("deadline with nothing waiting")
	}
}

// BenchmarkBatcher compares batch sizes on the dispatcher's hot path: add a
// batch worth of items, take it.
func BenchmarkBatcher(b *testing.B) {
	for _, size := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			bt := batch.New[int](time.Millisecond, "b-")
			now := t0
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				for j := range size {
					bt.Add(now, "k", j)
				}
				if got := bt.Ready(now, size, 1, false); len(got) != 1 {
					b.Fatal("no batch")
				}
			}
		})
	}
}
