package deadline

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Source hands out bounds of d (to within step) on contexts that parent
// alone cancels. Create it with New.
type Source struct {
	parent  context.Context
	d, step time.Duration
	now     func() time.Time

	mu  sync.Mutex // held while a new shared context is made
	cur atomic.Pointer[shared]
}

// shared is the deadline context handed out until renew.
type shared struct {
	ctx    context.Context
	cancel context.CancelFunc // never called early: others may hold ctx; its timer ends it
	renew  time.Time
}

// New returns a Source of bounds of d, each ending at most step later than
// d from when it was taken, on contexts cancelled by parent and nothing
// else (see Bound). now is the clock (time.Now if nil); tests inject one.
func New(parent context.Context, d, step time.Duration, now func() time.Time) *Source {
	if now == nil {
		now = time.Now
	}
	return &Source{parent: parent, d: d, step: max(step, time.Millisecond), now: now}
}

// Bound returns ctx with its values, cancelled when ctx is and at a
// deadline between d and d+step from now, and the function that releases
// it. It shares the Source's deadline context when ctx is cancelled by the
// Source's parent and nothing else (ctx.Done() is the parent's, as for any
// context that only adds values to it, or for two contexts that are never
// cancelled). Otherwise it is context.WithTimeout(ctx, d).
func (s *Source) Bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx.Done() != s.parent.Done() {
		return context.WithTimeout(ctx, s.d)
	}
	return bound{deadline: s.shared().ctx, values: ctx}, release
}

// release is a shared bound's cancel function: the shared context ends at
// its own deadline, and others may hold it until then.
func release() {}

func (s *Source) shared() *shared {
	now := s.now()
	if c := s.cur.Load(); c != nil && now.Before(c.renew) {
		return c
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.cur.Load(); c != nil && now.Before(c.renew) {
		return c
	}
	ctx, cancel := context.WithDeadline(s.parent, now.Add(s.d+s.step))
	c := &shared{ctx: ctx, cancel: cancel, renew: now.Add(s.step)}
	s.cur.Store(c)
	return c
}

// bound is ctx's values with the shared deadline context's end.
type bound struct {
	deadline context.Context // cancelled when the parent is, or at the deadline
	values   context.Context
}

func (b bound) Deadline() (time.Time, bool) { return b.deadline.Deadline() }
func (b bound) Done() <-chan struct{}       { return b.deadline.Done() }
func (b bound) Err() error                  { return b.deadline.Err() }

// Value answers from the bounded context, except for the context package's
// own key for the nearest cancelCtx, which it answers with the shared
// deadline context's: a context derived from a bound (net/http derives one
// for every request) then joins that context's children, as it would join
// a context.WithTimeout's, instead of registering an AfterFunc (two
// allocations each); and context.Cause finds the parent's cause, or the
// deadline.
func (b bound) Value(key any) any {
	if key == cancelCtxKey && key != nil {
		return b.deadline.Value(key)
	}
	return b.values.Value(key)
}

// cancelCtxKey is the context package's unexported key for a context's
// nearest cancelCtx, learnt once from the one call that passes it to a
// context of ours: context.Cause asks a done context for it. Should a
// later Go not pass it, cancelCtxKey stays nil and derived contexts
// register an AfterFunc instead: slower, never wrong.
var cancelCtxKey = func() any {
	var p keyProbe
	_ = context.Cause(&p)
	// Only a key that a cancellable context answers and the background
	// does not can be that one.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if p.key == nil || ctx.Value(p.key) == nil || context.Background().Value(p.key) != nil {
		return nil
	}
	return p.key
}()

// keyProbe is a done context that remembers the last key it was asked for.
type keyProbe struct{ key any }

func (*keyProbe) Deadline() (time.Time, bool) { return time.Time{}, false }
func (*keyProbe) Done() <-chan struct{}       { return nil }
func (*keyProbe) Err() error                  { return context.Canceled }
func (p *keyProbe) Value(key any) any         { p.key = key; return nil }

// AfterFunc lets contexts derived from a bound (context.WithCancel and the
// like) follow it without a goroutine each.
func (b bound) AfterFunc(f func()) func() bool { return context.AfterFunc(b.deadline, f) }
