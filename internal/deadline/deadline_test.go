package deadline_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sous-run/sous/internal/deadline"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type key struct{}

// clock is a settable clock for a Source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestBoundSharesWithinAStep(t *testing.T) {
	t.Parallel()
	clk := &clock{t: time.Now()}
	start := clk.now()
	s := deadline.New(context.Background(), time.Minute, time.Second, clk.now)
	a, _ := s.Bound(context.WithValue(context.Background(), key{}, "a"))
	clk.add(999 * time.Millisecond)
	b, _ := s.Bound(context.WithValue(context.Background(), key{}, "b"))
	if a.Done() != b.Done() {
		t.Fatal("two bounds within a step do not share their deadline context")
	}
	if a.Value(key{}) != "a" || b.Value(key{}) != "b" {
		t.Fatalf("values: %v, %v; want a, b", a.Value(key{}), b.Value(key{}))
	}
	dl, ok := b.Deadline()
	if !ok || dl.Before(clk.now().Add(time.Minute)) || dl.After(start.Add(time.Minute+time.Second)) {
		t.Fatalf("deadline %v (ok %v) of a bound taken at %v: want within [d, d+step]", dl, ok, clk.now())
	}
	clk.add(time.Millisecond)
	c, _ := s.Bound(context.Background())
	if c.Done() == a.Done() {
		t.Fatal("a bound taken a step later shares the old deadline context")
	}
	if dl, _ := c.Deadline(); dl.Before(clk.now().Add(time.Minute)) {
		t.Fatalf("deadline %v is less than d from %v", dl, clk.now())
	}
}

func TestBoundEnds(t *testing.T) {
	t.Parallel()
	s := deadline.New(context.Background(), 5*time.Millisecond, 5*time.Millisecond, nil)
	ctx, cancel := s.Bound(context.WithoutCancel(context.WithValue(context.Background(), key{}, "v")))
	defer cancel()
	if ctx.Err() != nil {
		t.Fatalf("a fresh bound is done: %v", ctx.Err())
	}
	// A context derived from the bound follows it (through AfterFunc).
	child, stop := context.WithCancel(ctx)
	defer stop()
	select {
	case <-child.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("a bound of 5ms is not done after 20s")
	}
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) || !errors.Is(context.Cause(ctx), context.DeadlineExceeded) {
		t.Fatalf("err %v, cause %v: want the deadline", ctx.Err(), context.Cause(ctx))
	}
	if !errors.Is(context.Cause(child), context.DeadlineExceeded) {
		t.Fatalf("derived context's cause %v: want the deadline", context.Cause(child))
	}
	if ctx.Value(key{}) != "v" {
		t.Fatal("the bound lost its context's value")
	}
}

func TestBoundFollowsTheParent(t *testing.T) {
	t.Parallel()
	parent, cancel := context.WithCancelCause(context.Background())
	s := deadline.New(parent, time.Hour, time.Second, nil)
	ctx, release := s.Bound(context.WithValue(parent, key{}, "v")) // values only: shared
	defer release()
	child, stop := context.WithCancel(ctx)
	defer stop()
	stopped := errors.New("drain deadline")
	cancel(stopped)
	<-ctx.Done() // closed by cancel, synchronously
	<-child.Done()
	if !errors.Is(ctx.Err(), context.Canceled) {
		t.Fatalf("err %v: want Canceled", ctx.Err())
	}
	if context.Cause(ctx) != stopped || context.Cause(child) != stopped {
		t.Fatalf("cause %v, derived %v: want the parent's", context.Cause(ctx), context.Cause(child))
	}
}

// A context with a cancellation of its own gets a bound of its own, which
// that cancellation ends.
func TestBoundOfAContextCancelledOtherwise(t *testing.T) {
	t.Parallel()
	s := deadline.New(context.Background(), time.Hour, time.Second, nil)
	own, cancel := context.WithCancel(context.Background())
	ctx, release := s.Bound(own)
	defer release()
	shared, _ := s.Bound(context.Background())
	if ctx.Done() == shared.Done() {
		t.Fatal("a context with its own cancellation got the shared bound")
	}
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > time.Hour {
		t.Fatalf("deadline %v, %v", dl, ok)
	}
	cancel()
	<-ctx.Done()
	if shared.Err() != nil {
		t.Fatal("cancelling one context ended the shared bound")
	}
}

// A context derived from a bound joins the shared deadline context's
// children, as one derived from context.WithTimeout does: no allocation
// more (net/http derives one for every request).
func TestDerivedContextsCostNoMore(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	values := context.WithValue(parent, key{}, "v")
	s := deadline.New(parent, time.Hour, time.Hour, nil)
	shared, _ := s.Bound(values)
	timeout, stop := context.WithTimeout(values, time.Hour)
	defer stop()
	derive := func(ctx context.Context) func() {
		return func() {
			c, cancel := context.WithCancel(ctx)
			_ = c.Done()
			cancel()
		}
	}
	got, want := testing.AllocsPerRun(100, derive(shared)), testing.AllocsPerRun(100, derive(timeout))
	if got > want {
		t.Fatalf("deriving from a bound costs %v allocations, from context.WithTimeout %v", got, want)
	}
}

// BenchmarkBound: a shared bound against context.WithTimeout, on a
// cancellable parent, as the worker's engine calls take it.
func BenchmarkBound(b *testing.B) {
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	values := context.WithValue(parent, key{}, "v")
	b.Run("design=withtimeout", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				ctx, cancel := context.WithTimeout(values, time.Minute)
				_ = ctx.Err()
				cancel()
			}
		})
	})
	b.Run("design=shared", func(b *testing.B) {
		s := deadline.New(parent, time.Minute, time.Second, nil)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				ctx, cancel := s.Bound(values)
				_ = ctx.Err()
				cancel()
			}
		})
	})
}
