package batch

import (
	"slices"
	"strconv"
	"time"
)

// Reason says why an engine call was dispatched.
type Reason string

const (
	// Slot: the request goes to the engine alone, the moment a slot of the
	// in-flight limit is free (engines that take one request per call and
	// batch continuously inside).
	Slot Reason = "slot"
	// Full: a list group filled the room the engine had, or the most one
	// call takes.
	Full Reason = "full"
	// Window: the batch window passed since a list group's oldest item.
	Window Reason = "window"
	// Idle: nothing was on the engine, so a list group went at once
	// instead of waiting for its window.
	Idle Reason = "idle"
)

// Reasons are every Reason a Batcher gives, for the docs and metric help
// that list them (a test compares).
var Reasons = []Reason{Slot, Full, Window, Idle}

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
	due   time.Time // the request's deadline; zero: none
	order uint64    // insertion order: ties in added go to the first added
}

// less orders a group's entries: the earliest deadline first, entries
// without one after those with one, then the oldest.
func (a entry[T]) less(b entry[T]) bool {
	switch {
	case !a.due.Equal(b.due):
		if a.due.IsZero() || b.due.IsZero() {
			return b.due.IsZero()
		}
		return a.due.Before(b.due)
	case !a.added.Equal(b.added):
		return a.added.Before(b.added)
	}
	return a.order < b.order
}

type group[T any] struct {
	key     string
	perCall int
	entries []entry[T] // in less order; entries[head:] are waiting
	head    int
}

func (g *group[T]) len() int { return len(g.entries) - g.head }

// oldest is when the oldest waiting item was added.
func (g *group[T]) oldest() time.Time {
	o := g.entries[g.head].added
	if g.entries[g.head].due.IsZero() {
		return o // no deadlines in the group: in the order added
	}
	for _, e := range g.entries[g.head+1:] {
		if e.added.Before(o) {
			o = e.added
		}
	}
	return o
}

// before reports whether g's first item goes before h's: an earlier
// deadline, or older.
func (g *group[T]) before(h *group[T]) bool {
	return g.entries[g.head].less(h.entries[h.head])
}

// insert puts e in its place among the waiting entries. Work without a
// deadline arrives in order and is appended; the scan from the tail is
// short.
func (g *group[T]) insert(e entry[T]) {
	g.entries = append(g.entries, e)
	for i := len(g.entries) - 1; i > g.head && e.less(g.entries[i-1]); i-- {
		g.entries[i], g.entries[i-1] = g.entries[i-1], g.entries[i]
	}
}

// Batcher holds the items waiting for the engine, grouped by key. The zero
// value is not usable; call New.
type Batcher[T any] struct {
	window time.Duration
	prefix string
	seq    uint64
	order  uint64
	groups []*group[T] // each holds at least one item
	n      int
	// lists counts the list calls of each key on the engine: a list does
	// not go half full past its window while one of its key runs.
	lists map[string]int
}

// New returns a Batcher whose batch window (for list groups, while the
// engine is busy) is window; batch ids are prefix followed by a sequence
// number.
func New[T any](window time.Duration, prefix string) *Batcher[T] {
	return &Batcher[T]{window: window, prefix: prefix, lists: map[string]int{}}
}

// Ended tells the Batcher that an engine call it returned, for key, has
// ended.
func (b *Batcher[T]) Ended(key string) {
	if b.lists[key] > 1 {
		b.lists[key]--
	} else {
		delete(b.lists, key)
	}
}

func (b *Batcher[T]) group(key string, perCall int) *group[T] {
	for _, g := range b.groups {
		if g.key == key {
			return g
		}
	}
	g := &group[T]{key: key, perCall: max(1, perCall)}
	b.groups = append(b.groups, g)
	return g
}

// Add queues v under key at instant now, with deadline due (zero: none).
// perCall is the most items of this key one engine call takes: 1 for an
// API that takes one request per call, more where it takes a list. Items
// of one key go earliest deadline first, then in the order they were added
// in.
func (b *Batcher[T]) Add(now, due time.Time, key string, perCall int, v T) {
	b.order++
	b.group(key, perCall).insert(entry[T]{v: v, added: now, due: due, order: b.order})
	b.n++
}

// PutBack returns v, taken earlier and added at instant added, with
// deadline due, to its group: it was not run (the engine had no room) and
// keeps its place ahead of younger work.
func (b *Batcher[T]) PutBack(added, due time.Time, key string, perCall int, v T) {
	g := b.group(key, perCall)
	// Ahead of every entry added at the same instant: it was taken first.
	g.insert(entry[T]{v: v, added: added, due: due, order: 0})
	b.n++
}

// Len is the number of items waiting.
func (b *Batcher[T]) Len() int { return b.n }

// Next removes and returns the next engine call to make at instant now,
// given limit, the in-flight limit, room, the number of requests it still
// allows, and busy, whether any call is on the engine. ok is false when
// nothing should go now.
//
// The oldest work goes first across keys: the group whose oldest item is
// oldest is looked at first, so a steady inflow of one key never starves
// another. A group of one request per call goes at once. A list group goes
// when it fills the room (or the most one call takes), when the window has
// passed since its oldest item, or at once when the engine is idle; until
// then it is passed over for younger groups, for at most the window. A list
// is full when it fills the whole limit (or the most one call takes) and
// there is room for all of it: while a call holds part of the limit, the
// next list waits for the rest rather than go half full.
func (b *Batcher[T]) Next(now time.Time, limit, room int, busy bool) (_ Batch[T], ok bool) {
	if room < 1 || b.n == 0 {
		return Batch[T]{}, false
	}
	var best *group[T]
	var bestReason Reason
	for _, g := range b.groups {
		if best != nil && !g.before(best) {
			continue
		}
		if r, ok := b.ready(g, now, limit, room, busy); ok {
			best, bestReason = g, r
		}
	}
	if best == nil {
		return Batch[T]{}, false
	}
	if best.perCall > 1 {
		b.lists[best.key]++
	}
	return b.take(best, min(room, best.perCall), bestReason), true
}

func (b *Batcher[T]) ready(g *group[T], now time.Time, limit, room int, busy bool) (Reason, bool) {
	full := min(max(1, limit), g.perCall)
	switch {
	case g.perCall == 1:
		return Slot, true
	case g.len() >= full && room >= full:
		return Full, true
	case b.lists[g.key] > 0:
		// A list of this key is on the engine: it fills up while that
		// call runs and goes when it ends (an engine that runs one list
		// at a time gains nothing from a second, half-full one).
		return "", false
	case !now.Before(g.oldest().Add(b.window)):
		return Window, true
	case !busy:
		return Idle, true
	}
	return "", false
}

func (b *Batcher[T]) take(g *group[T], size int, reason Reason) Batch[T] {
	n := min(size, g.len())
	items := make([]T, n)
	for i, e := range g.entries[g.head : g.head+n] {
		items[i] = e.v
	}
	oldest := g.oldest()
	clear(g.entries[g.head : g.head+n]) // let the items be collected
	g.head += n
	b.n -= n
	switch {
	case g.len() == 0:
		for i, x := range b.groups {
			if x == g {
				b.groups = append(b.groups[:i], b.groups[i+1:]...)
				break
			}
		}
	case g.head > len(g.entries)/2:
		g.entries = append(g.entries[:0], g.entries[g.head:]...)
		g.head = 0
	}
	b.seq++
	var id [64]byte // prefix and sequence built in place: one allocation, the string
	return Batch[T]{ID: string(strconv.AppendUint(append(id[:0], b.prefix...), b.seq, 10)), Key: g.key, Items: items, Reason: reason, Oldest: oldest}
}

// Deadline is the instant the earliest window of a list group ends; ok is
// false when no list group waits. Groups of one request per call have no
// window: they wait only for room; nor has a list group whose key has a
// call on the engine: it waits for Ended.
func (b *Batcher[T]) Deadline() (at time.Time, ok bool) {
	for _, g := range b.groups {
		if g.perCall == 1 || b.lists[g.key] > 0 {
			continue // no window: it waits for room, or for its key's call
		}
		d := g.oldest().Add(b.window)
		if !ok || d.Before(at) {
			at, ok = d, true
		}
	}
	return at, ok
}

// Expire removes and returns the items added before instant before: they
// have waited too long and go back to the queue.
func (b *Batcher[T]) Expire(before time.Time) []T {
	return b.remove(func(e entry[T]) bool { return e.added.Before(before) })
}

// Overdue removes and returns the items whose deadline is at or before
// now: they must not reach the engine.
func (b *Batcher[T]) Overdue(now time.Time) []T {
	return b.remove(func(e entry[T]) bool { return !e.due.IsZero() && !e.due.After(now) })
}

// Remove removes and returns the waiting items for which drop is true
// (requests their producer cancelled).
func (b *Batcher[T]) Remove(drop func(T) bool) []T {
	return b.remove(func(e entry[T]) bool { return drop(e.v) })
}

// NextDue is the earliest deadline of the waiting items; ok is false when
// none has one.
func (b *Batcher[T]) NextDue() (at time.Time, ok bool) {
	for _, g := range b.groups {
		if d := g.entries[g.head].due; !d.IsZero() && (!ok || d.Before(at)) {
			at, ok = d, true
		}
	}
	return at, ok
}

// remove takes out the waiting items for which drop is true, keeping the
// others in their order.
func (b *Batcher[T]) remove(drop func(entry[T]) bool) []T {
	var out []T
	for i := 0; i < len(b.groups); {
		g := b.groups[i]
		live := g.entries[g.head:]
		// The dispatcher asks on every pass and the answer is mostly
		// nothing: a group is copied only when something in it goes.
		first := slices.IndexFunc(live, drop)
		if first < 0 {
			i++
			continue
		}
		keep := make([]entry[T], first, len(live))
		copy(keep, live[:first])
		out = append(out, live[first].v)
		for _, e := range live[first+1:] {
			if drop(e) {
				out = append(out, e.v)
			} else {
				keep = append(keep, e)
			}
		}
		b.n -= len(live) - len(keep)
		g.entries, g.head = keep, 0
		if len(keep) == 0 {
			b.groups = slices.Delete(b.groups, i, i+1)
			continue
		}
		i++
	}
	return out
}

// Drain removes and returns every waiting item, oldest group first.
func (b *Batcher[T]) Drain() []T {
	out := make([]T, 0, b.n)
	for b.n > 0 {
		var first *group[T]
		for _, g := range b.groups {
			if first == nil || g.before(first) {
				first = g
			}
		}
		for _, v := range b.take(first, first.len(), "").Items {
			out = append(out, v)
		}
	}
	return out
}
