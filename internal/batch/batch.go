package batch

import (
	"strconv"
	"time"
)

// Reason says why a batch was dispatched.
type Reason string

const (
	// Full: the group reached the current batch size.
	Full Reason = "full"
	// Window: the batch window passed since the group's oldest item.
	Window Reason = "window"
	// Idle: the engine was idle and nothing else was waiting.
	Idle Reason = "idle"
)

// Batch is a set of items that share a key, to be sent to the engine in one
// call.
type Batch[T any] struct {
	ID     string
	Key    string
	Items  []T
	Reason Reason
	// Oldest is when the oldest item in the batch was added.
	Oldest time.Time
}

type entry[T any] struct {
	v     T
	added time.Time
}

type group[T any] struct {
	key     string
	entries []entry[T]
}

// Batcher collects items into per-key groups. The zero value is not usable;
// call New.
type Batcher[T any] struct {
	window time.Duration
	prefix string
	seq    uint64
	// groups in order of their oldest item, so the oldest work goes first.
	groups []*group[T]
	n      int
}

// New returns a Batcher whose batch window is window; batch ids are prefix
// followed by a sequence number.
func New[T any](window time.Duration, prefix string) *Batcher[T] {
	return &Batcher[T]{window: window, prefix: prefix}
}

// Add queues v under key at instant now.
func (b *Batcher[T]) Add(now time.Time, key string, v T) {
	b.n++
	for _, g := range b.groups {
		if g.key == key {
			g.entries = append(g.entries, entry[T]{v, now})
			return
		}
	}
	b.groups = append(b.groups, &group[T]{key: key, entries: []entry[T]{{v, now}}})
}

// Len is the number of items waiting.
func (b *Batcher[T]) Len() int { return b.n }

// Ready removes and returns the batches to dispatch at instant now: at most
// slots batches of at most size items each. idle reports that no batch is
// running and no more input is waiting, which dispatches the oldest group at
// once instead of waiting for it to fill.
func (b *Batcher[T]) Ready(now time.Time, size, slots int, idle bool) []Batch[T] {
	if size < 1 {
		size = 1
	}
	var out []Batch[T]
	for i := 0; i < len(b.groups) && len(out) < slots; {
		g := b.groups[i]
		var reason Reason
		switch {
		case len(g.entries) >= size:
			reason = Full
		case !now.Before(g.entries[0].added.Add(b.window)):
			reason = Window
		case idle && len(out) == 0:
			reason = Idle
		default:
			i++
			continue
		}
		out = append(out, b.take(g, size, reason))
		if len(g.entries) == 0 {
			b.groups = append(b.groups[:i], b.groups[i+1:]...)
		}
		// A group with leftovers stays at i and is looked at again: it may
		// still be full or past its window.
	}
	return out
}

func (b *Batcher[T]) take(g *group[T], size int, reason Reason) Batch[T] {
	n := min(size, len(g.entries))
	items := make([]T, n)
	for i, e := range g.entries[:n] {
		items[i] = e.v
	}
	oldest := g.entries[0].added
	g.entries = append(g.entries[:0], g.entries[n:]...)
	b.n -= n
	b.seq++
	return Batch[T]{ID: b.prefix + strconv.FormatUint(b.seq, 10), Key: g.key, Items: items, Reason: reason, Oldest: oldest}
}

// Deadline is the instant the oldest waiting group's window ends; ok is false
// when nothing waits.
func (b *Batcher[T]) Deadline() (at time.Time, ok bool) {
	for _, g := range b.groups {
		d := g.entries[0].added.Add(b.window)
		if !ok || d.Before(at) {
			at, ok = d, true
		}
	}
	return at, ok
}

// Drain removes and returns every waiting item, oldest group first.
func (b *Batcher[T]) Drain() []T {
	out := make([]T, 0, b.n)
	for _, g := range b.groups {
		for _, e := range g.entries {
			out = append(out, e.v)
		}
	}
	b.groups, b.n = nil, 0
	return out
}
